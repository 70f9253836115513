// Index kernels shared by every dtype: the union of kept groups (decode) and the counting
// sort of tokens by persona (prefill). One block each: the inputs are a few KB.
#include "cuda_common.cuh"
#include "cuda_index.h"

namespace persona_kernels {
namespace cuda_detail {
namespace {

constexpr int kIndexThreads = 1024;

__global__ void __launch_bounds__(kIndexThreads)
    union_groups_kernel(const int32_t* __restrict__ persona_ids, int num_tokens,
                        const int32_t* __restrict__ keep_bits, int num_personas, int num_words,
                        int n_groups, int32_t* __restrict__ union_groups, int32_t* __restrict__ union_count) {
  __shared__ int scratch[33];
  int base = 0;
  for (int w0 = 0; w0 < num_words; w0 += blockDim.x) {
    const int w = w0 + threadIdx.x;
    uint32_t word = 0;
    if (w < num_words) {
      for (int t = 0; t < num_tokens && word != kFullMask; ++t) {
        const int p = __ldg(persona_ids + t);
        if (p >= 0 && p < num_personas) word |= masked_word(keep_bits + static_cast<int64_t>(p) * num_words, w, n_groups);
      }
    }
    int total = 0;
    int at = base + block_exclusive_sum(__popc(word), scratch, &total);
    while (word != 0u) {
      union_groups[at++] = w * 32 + (__ffs(static_cast<int>(word)) - 1);
      word &= word - 1u;
    }
    base += total;
  }
  if (threadIdx.x == 0) *union_count = base;
}

__global__ void __launch_bounds__(kIndexThreads)
    sort_tokens_kernel(const int32_t* __restrict__ persona_ids, int num_tokens, int num_personas, int tile_rows,
                       int32_t* __restrict__ counts, int32_t* __restrict__ cursor, int32_t* __restrict__ perm,
                       int4* __restrict__ tiles, int32_t* __restrict__ tile_count) {
  __shared__ int scratch[33];
  const int slots = num_personas + 1;
  auto slot_of = [num_personas](int p) { return (p >= 0 && p < num_personas) ? p : num_personas; };

  for (int i = threadIdx.x; i < slots; i += blockDim.x) counts[i] = 0;
  __syncthreads();
  for (int t = threadIdx.x; t < num_tokens; t += blockDim.x) atomicAdd(counts + slot_of(__ldg(persona_ids + t)), 1);
  __syncthreads();

  int row_base = 0, tile_base = 0;
  for (int i0 = 0; i0 < slots; i0 += blockDim.x) {
    const int i = i0 + threadIdx.x;
    const int count = i < slots ? counts[i] : 0;
    const int n_tiles = (count + tile_rows - 1) / tile_rows;
    int rows_total = 0, tiles_total = 0;
    const int first_row = row_base + block_exclusive_sum(count, scratch, &rows_total);
    const int first_tile = tile_base + block_exclusive_sum(n_tiles, scratch, &tiles_total);
    if (i < slots) {
      cursor[i] = first_row;
      for (int k = 0; k < n_tiles; ++k) {
        tiles[first_tile + k] = make_int4(i, first_row + k * tile_rows, min(tile_rows, count - k * tile_rows), 0);
      }
    }
    row_base += rows_total;
    tile_base += tiles_total;
  }
  __syncthreads();
  for (int t = threadIdx.x; t < num_tokens; t += blockDim.x) {
    perm[atomicAdd(cursor + slot_of(__ldg(persona_ids + t)), 1)] = t;
  }
  if (threadIdx.x == 0) *tile_count = tile_base;
}

}  // namespace

CudaStatus launch_union_groups(const int32_t* persona_ids, int num_tokens, const int32_t* keep_bits,
                               int num_personas, int num_words, int n_groups, int32_t* union_groups,
                               int32_t* union_count, cudaStream_t stream, std::string* error) {
  union_groups_kernel<<<1, kIndexThreads, 0, stream>>>(persona_ids, num_tokens, keep_bits, num_personas, num_words,
                                                       n_groups, union_groups, union_count);
  PK_CUDA_CHECK_LAUNCH("union_groups_kernel");
  return CudaStatus::kOk;
}

CudaStatus launch_sort_tokens(const int32_t* persona_ids, int num_tokens, int num_personas, int tile_rows,
                              int32_t* counts, int32_t* cursor, int32_t* perm, int4* tiles,
                              int32_t* tile_count, cudaStream_t stream, std::string* error) {
  sort_tokens_kernel<<<1, kIndexThreads, 0, stream>>>(persona_ids, num_tokens, num_personas, tile_rows, counts,
                                                      cursor, perm, tiles, tile_count);
  PK_CUDA_CHECK_LAUNCH("sort_tokens_kernel");
  return CudaStatus::kOk;
}

}  // namespace cuda_detail
}  // namespace persona_kernels
