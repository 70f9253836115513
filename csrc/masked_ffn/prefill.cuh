// Prefill path (many tokens, compute-bound), fp16/bf16 on tensor cores (WMMA, sm_80+).
//
//   1. sort_tokens_kernel (cuda_index.h): counting sort by persona -> perm, and a list of
//      tiles (persona, first sorted row, rows <= 64) with a device-side count
//   2. prefill_gate_up_kernel: for a tile and 64 of its persona's kept channels (gathered by
//      rank from the bitmap), G = X_tile @ Wg^T and U = X_tile @ Wu^T on tensor cores;
//      epilogue h = act(G) * U * scale -> hidden[sorted row, kept-channel rank] (dtype)
//   3. prefill_down_kernel: for a tile and 64 output columns, Y = H_tile @ Wdown[kept] over
//      the persona's kept channels only; rows written straight to out[token]
// Both GEMM kernels run a persistent grid over (tile, column tile) items, so their launch
// shape depends only on sizes (CUDA-graph capturable). Tiles are 64 x 64 x 32, four warps of
// 32 x 32, operands staged through shared memory with 16-byte loads.
#pragma once

#include <mma.h>

#include <algorithm>

#include "cuda_common.cuh"
#include "cuda_index.h"
#include "cuda_workspace.h"

namespace persona_kernels {
namespace cuda_detail {

constexpr int kBM = kPrefillTileRows;  // token rows per tile
constexpr int kBN = 64;                // channels (phase 1) or output columns (phase 2) per tile
constexpr int kBK = 32;                // reduction step
constexpr int kPrefillThreads = 128;   // 4 warps, 2 x 2, each 32 x 32 of the tile
constexpr int kLdA = kBK + 8;          // shared-memory row pitch (elements) of K-contiguous tiles
constexpr int kLdB = kBN + 8;          // pitch of the N-contiguous down tile
constexpr int kLdC = kBN + 4;          // pitch of the fp32 epilogue tile

template <typename T>
struct PrefillArgs {
  const T* x;
  int64_t x_stride;
  const T* gate_up;
  const T* down_t;
  const int32_t* keep_bits;
  const float* scales;
  const int32_t* perm;
  const int4* tiles;
  const int32_t* tile_count;
  T* hidden;  // [T, d_ff]
  T* out;
  int64_t out_stride;
  int d, d_ff, group_size, num_words, num_personas;
  Activation activation;
};

// Shared state of a block for the current tile's persona.
struct PersonaSmem {
  int prefix[kCudaMaxWords + 1];  // prefix[w] = kept groups in words < w
  int scratch[33];
};

// Fills s.prefix for persona p (all threads call); returns its kept group count (0 for p outside
// [0, num_personas), the slot of out-of-range ids).
__device__ __forceinline__ int load_persona_prefix(const int32_t* keep_bits, int p, int num_personas, int num_words,
                                                   int n_groups, PersonaSmem& s) {
  if (p < 0 || p >= num_personas) return 0;
  const int32_t* row = keep_bits + static_cast<int64_t>(p) * num_words;
  int base = 0;
  for (int w0 = 0; w0 < num_words; w0 += blockDim.x) {
    const int w = w0 + threadIdx.x;
    const int count = w < num_words ? __popc(masked_word(row, w, n_groups)) : 0;
    int total = 0;
    const int before = block_exclusive_sum(count, s.scratch, &total);
    if (w < num_words) s.prefix[w] = base + before;
    base += total;
  }
  __syncthreads();
  return base;
}

// Channel id of the persona's k-th kept channel (k < kept groups * G), by rank in its bitmap.
__device__ __forceinline__ int kept_channel(const int32_t* row, const PersonaSmem& s, int num_words, int n_groups,
                                            int group_size, int k) {
  const int rank = k / group_size;
  int lo = 0, hi = num_words - 1;  // largest w with prefix[w] <= rank
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (s.prefix[mid] <= rank) lo = mid;
    else hi = mid - 1;
  }
  const int bit = nth_set_bit(masked_word(row, lo, n_groups), rank - s.prefix[lo]);
  return (lo * 32 + bit) * group_size + k % group_size;
}

// Copies elements [k, k + 8) of row (16-bit raw) to dst (16-byte aligned shared memory),
// zeros for a null row and for elements at or past `limit`. kVec: row + k is 16-byte aligned.
template <bool kVec>
__device__ __forceinline__ void load_chunk8(const uint16_t* row, int k, int limit, uint16_t* dst) {
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  if (row != nullptr && k < limit) {
    if (kVec && k + 8 <= limit) {
      v = __ldg(reinterpret_cast<const uint4*>(row + k));
    } else {
      uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        if (k + q < limit) w[q / 2] |= static_cast<uint32_t>(__ldg(row + k + q)) << (16 * (q % 2));
      }
      v = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
  *reinterpret_cast<uint4*>(dst) = v;
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kPrefillThreads) prefill_gate_up_kernel(const PrefillArgs<T> a, int n_col_tiles) {
  using namespace nvcuda;
  constexpr int kStageBytes = 3 * kBM * kLdA * 2;
  constexpr int kEpilogueBytes = 2 * kBM * kLdC * 4;
  __shared__ __align__(128) unsigned char raw[kStageBytes > kEpilogueBytes ? kStageBytes : kEpilogueBytes];
  __shared__ PersonaSmem persona;
  __shared__ int s_chan[kBN];
  __shared__ int s_token[kBM];
  uint16_t* s_a = reinterpret_cast<uint16_t*>(raw);  // [kBM][kLdA] tokens x k
  uint16_t* s_gate = s_a + kBM * kLdA;               // [kBN][kLdA] channels x k
  uint16_t* s_up = s_gate + kBN * kLdA;
  float* s_g = reinterpret_cast<float*>(raw);        // epilogue [kBM][kLdC], aliases the stages
  float* s_u = s_g + kBM * kLdC;

  const int tid = threadIdx.x, warp = tid >> 5, wm = warp >> 1, wn = warp & 1;
  const int n_groups = a.d_ff / a.group_size;
  const int64_t num_tiles = __ldg(a.tile_count);
  const int64_t num_items = num_tiles * n_col_tiles;
  const uint16_t* x_bits = reinterpret_cast<const uint16_t*>(a.x);
  const uint16_t* w_bits = reinterpret_cast<const uint16_t*>(a.gate_up);
  using Bits = typename Elem<T>::Bits;

  for (int64_t item = blockIdx.x; item < num_items; item += gridDim.x) {
    const int4 tile = a.tiles[item % num_tiles];
    const int j = static_cast<int>(item / num_tiles);
    const int p = tile.x, row0 = tile.y, rows = tile.z;
    const int kept = load_persona_prefix(a.keep_bits, p, a.num_personas, a.num_words, n_groups, persona) * a.group_size;
    if (j * kBN >= kept) continue;  // block-uniform
    const int n_valid = min(kBN, kept - j * kBN);
    const int32_t* bits_row = a.keep_bits + static_cast<int64_t>(p) * a.num_words;
    if (tid < kBN) s_chan[tid] = tid < n_valid ? kept_channel(bits_row, persona, a.num_words, n_groups, a.group_size, j * kBN + tid) : -1;
    if (tid < kBM) s_token[tid] = tid < rows ? __ldg(a.perm + row0 + tid) : -1;
    __syncthreads();

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_g[2][2], acc_u[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        wmma::fill_fragment(acc_g[i][jj], 0.0f);
        wmma::fill_fragment(acc_u[i][jj], 0.0f);
      }

    for (int k0 = 0; k0 < a.d; k0 += kBK) {
      for (int i = tid; i < kBM * (kBK / 8); i += kPrefillThreads) {
        const int r = i / (kBK / 8), kk = (i % (kBK / 8)) * 8;
        const int token = s_token[r];
        load_chunk8<kVec>(token >= 0 ? x_bits + token * a.x_stride : nullptr, k0 + kk, a.d, s_a + r * kLdA + kk);
      }
      for (int i = tid; i < kBN * (kBK / 8); i += kPrefillThreads) {
        const int n = i / (kBK / 8), kk = (i % (kBK / 8)) * 8;
        const int c = s_chan[n];
        const uint16_t* gate_row = c >= 0 ? w_bits + static_cast<int64_t>(c) * 2 * a.d : nullptr;
        load_chunk8<kVec>(gate_row, k0 + kk, a.d, s_gate + n * kLdA + kk);
        load_chunk8<kVec>(gate_row ? gate_row + a.d : nullptr, k0 + kk, a.d, s_up + n * kLdA + kk);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fg[2], fu[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          wmma::load_matrix_sync(fa[i], reinterpret_cast<const T*>(s_a + (wm * 32 + i * 16) * kLdA + kk), kLdA);
          wmma::load_matrix_sync(fg[i], reinterpret_cast<const T*>(s_gate + (wn * 32 + i * 16) * kLdA + kk), kLdA);
          wmma::load_matrix_sync(fu[i], reinterpret_cast<const T*>(s_up + (wn * 32 + i * 16) * kLdA + kk), kLdA);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int jj = 0; jj < 2; ++jj) {
            wmma::mma_sync(acc_g[i][jj], fa[i], fg[jj], acc_g[i][jj]);
            wmma::mma_sync(acc_u[i][jj], fa[i], fu[jj], acc_u[i][jj]);
          }
      }
      __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        const int offset = (wm * 32 + i * 16) * kLdC + wn * 32 + jj * 16;
        wmma::store_matrix_sync(s_g + offset, acc_g[i][jj], kLdC, wmma::mem_row_major);
        wmma::store_matrix_sync(s_u + offset, acc_u[i][jj], kLdC, wmma::mem_row_major);
      }
    __syncthreads();
    Bits* hidden = reinterpret_cast<Bits*>(a.hidden);
    for (int e = tid; e < kBM * kBN; e += kPrefillThreads) {
      const int r = e / kBN, n = e % kBN;
      if (r < rows && n < n_valid) {
        const float scale = a.scales ? __ldg(a.scales + static_cast<int64_t>(p) * a.d_ff + s_chan[n]) : 1.0f;
        const float h = activate(s_g[r * kLdC + n], a.activation) * s_u[r * kLdC + n] * scale;
        hidden[static_cast<int64_t>(row0 + r) * a.d_ff + j * kBN + n] = Elem<T>::from_float(h);
      }
    }
    __syncthreads();
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kPrefillThreads) prefill_down_kernel(const PrefillArgs<T> a, int n_col_tiles) {
  using namespace nvcuda;
  constexpr int kStageBytes = (kBM * kLdA + kBK * kLdB) * 2;
  constexpr int kEpilogueBytes = kBM * kLdC * 4;
  __shared__ __align__(128) unsigned char raw[kStageBytes > kEpilogueBytes ? kStageBytes : kEpilogueBytes];
  __shared__ PersonaSmem persona;
  __shared__ int s_chan[kBK];
  __shared__ int s_token[kBM];
  uint16_t* s_h = reinterpret_cast<uint16_t*>(raw);  // [kBM][kLdA] sorted rows x kept channels
  uint16_t* s_w = s_h + kBM * kLdA;                  // [kBK][kLdB] kept channels x output columns
  float* s_y = reinterpret_cast<float*>(raw);        // epilogue [kBM][kLdC]

  const int tid = threadIdx.x, warp = tid >> 5, wm = warp >> 1, wn = warp & 1;
  const int n_groups = a.d_ff / a.group_size;
  const int64_t num_tiles = __ldg(a.tile_count);
  const int64_t num_items = num_tiles * n_col_tiles;
  const uint16_t* h_bits = reinterpret_cast<const uint16_t*>(a.hidden);
  const uint16_t* w_bits = reinterpret_cast<const uint16_t*>(a.down_t);
  using Bits = typename Elem<T>::Bits;
  Bits* out = reinterpret_cast<Bits*>(a.out);

  for (int64_t item = blockIdx.x; item < num_items; item += gridDim.x) {
    const int4 tile = a.tiles[item % num_tiles];
    const int n0 = static_cast<int>(item / num_tiles) * kBN;
    const int p = tile.x, row0 = tile.y, rows = tile.z;
    const int kept = load_persona_prefix(a.keep_bits, p, a.num_personas, a.num_words, n_groups, persona) * a.group_size;
    const int32_t* bits_row = a.keep_bits + static_cast<int64_t>(p) * a.num_words;
    if (tid < kBM) s_token[tid] = tid < rows ? __ldg(a.perm + row0 + tid) : -1;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) wmma::fill_fragment(acc[i][jj], 0.0f);

    for (int kc0 = 0; kc0 < kept; kc0 += kBK) {
      if (tid < kBK) s_chan[tid] = kc0 + tid < kept ? kept_channel(bits_row, persona, a.num_words, n_groups, a.group_size, kc0 + tid) : -1;
      for (int i = tid; i < kBM * (kBK / 8); i += kPrefillThreads) {
        const int r = i / (kBK / 8), kk = (i % (kBK / 8)) * 8;
        const uint16_t* h_row = r < rows ? h_bits + static_cast<int64_t>(row0 + r) * a.d_ff + kc0 : nullptr;
        load_chunk8<kVec>(h_row, kk, kept - kc0, s_h + r * kLdA + kk);
      }
      __syncthreads();
      for (int i = tid; i < kBK * (kBN / 8); i += kPrefillThreads) {
        const int k = i / (kBN / 8), nn = (i % (kBN / 8)) * 8;
        const int c = s_chan[k];
        load_chunk8<kVec>(c >= 0 ? w_bits + static_cast<int64_t>(c) * a.d + n0 : nullptr, nn, a.d - n0, s_w + k * kLdB + nn);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          wmma::load_matrix_sync(fa[i], reinterpret_cast<const T*>(s_h + (wm * 32 + i * 16) * kLdA + kk), kLdA);
          wmma::load_matrix_sync(fb[i], reinterpret_cast<const T*>(s_w + kk * kLdB + wn * 32 + i * 16), kLdB);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int jj = 0; jj < 2; ++jj) wmma::mma_sync(acc[i][jj], fa[i], fb[jj], acc[i][jj]);
      }
      __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        wmma::store_matrix_sync(s_y + (wm * 32 + i * 16) * kLdC + wn * 32 + jj * 16, acc[i][jj], kLdC, wmma::mem_row_major);
      }
    __syncthreads();
    for (int e = tid; e < kBM * kBN; e += kPrefillThreads) {
      const int r = e / kBN, n = e % kBN;
      if (r < rows && n0 + n < a.d) out[static_cast<int64_t>(s_token[r]) * a.out_stride + n0 + n] = Elem<T>::from_float(s_y[r * kLdC + n]);
    }
    __syncthreads();
  }
}

// Enqueues the prefill path. `vector`: x, gate_up, down_t and the workspace allow 16-byte
// loads (pointers 16-byte aligned; d, x_row_stride and d_ff multiples of 8).
template <typename T>
CudaStatus launch_prefill(const MaskedFFNParams& p, const WorkspaceLayout& layout, char* workspace, bool vector,
                          int sm_count, cudaStream_t stream, std::string* error) {
  PrefillArgs<T> a;
  a.x = static_cast<const T*>(p.x);
  a.x_stride = p.x_row_stride;
  a.gate_up = static_cast<const T*>(p.gate_up);
  a.down_t = static_cast<const T*>(p.down_t);
  a.keep_bits = p.keep_bits;
  a.scales = p.scales;
  a.perm = reinterpret_cast<const int32_t*>(workspace + layout.perm);
  a.tiles = reinterpret_cast<const int4*>(workspace + layout.tiles);
  a.tile_count = reinterpret_cast<const int32_t*>(workspace + layout.tile_count);
  a.hidden = reinterpret_cast<T*>(workspace + layout.hidden_lowp);
  a.out = static_cast<T*>(p.out);
  a.out_stride = p.out_row_stride;
  a.d = static_cast<int>(p.d_model);
  a.d_ff = static_cast<int>(p.d_ff);
  a.group_size = static_cast<int>(p.group_size);
  a.num_words = static_cast<int>(p.num_words);
  a.num_personas = static_cast<int>(p.num_personas);
  a.activation = p.activation;

  const CudaStatus st = launch_sort_tokens(
      p.persona_ids, static_cast<int>(p.num_tokens), a.num_personas, kBM,
      reinterpret_cast<int32_t*>(workspace + layout.counts), reinterpret_cast<int32_t*>(workspace + layout.cursor),
      reinterpret_cast<int32_t*>(workspace + layout.perm), reinterpret_cast<int4*>(workspace + layout.tiles),
      reinterpret_cast<int32_t*>(workspace + layout.tile_count), stream, error);
  if (st != CudaStatus::kOk) return st;

  const int gate_up_col_tiles = ceil_div(a.d_ff, kBN);
  const int down_col_tiles = ceil_div(a.d, kBN);
  const int64_t capacity = static_cast<int64_t>(layout.tile_capacity);
  const auto gate_up_kernel = vector ? prefill_gate_up_kernel<T, true> : prefill_gate_up_kernel<T, false>;
  const auto down_kernel = vector ? prefill_down_kernel<T, true> : prefill_down_kernel<T, false>;
  int gate_up_resident = 0, down_resident = 0;
  PK_CUDA_TRY((vector ? resident_grid<prefill_gate_up_kernel<T, true>>(kPrefillThreads, sm_count, &gate_up_resident)
                      : resident_grid<prefill_gate_up_kernel<T, false>>(kPrefillThreads, sm_count, &gate_up_resident)));
  PK_CUDA_TRY((vector ? resident_grid<prefill_down_kernel<T, true>>(kPrefillThreads, sm_count, &down_resident)
                      : resident_grid<prefill_down_kernel<T, false>>(kPrefillThreads, sm_count, &down_resident)));
  const int gate_up_blocks = static_cast<int>(std::min<int64_t>(capacity * gate_up_col_tiles, gate_up_resident));
  const int down_blocks = static_cast<int>(std::min<int64_t>(capacity * down_col_tiles, down_resident));
  gate_up_kernel<<<gate_up_blocks, kPrefillThreads, 0, stream>>>(a, gate_up_col_tiles);
  PK_CUDA_CHECK_LAUNCH("prefill_gate_up_kernel");
  down_kernel<<<down_blocks, kPrefillThreads, 0, stream>>>(a, down_col_tiles);
  PK_CUDA_CHECK_LAUNCH("prefill_down_kernel");
  return CudaStatus::kOk;
}

}  // namespace cuda_detail
}  // namespace persona_kernels
