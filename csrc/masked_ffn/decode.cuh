// Decode path (few tokens, memory-bound): walk the union of the batch's kept groups once,
// weights outer and tokens inner, skipping per token the groups its persona lacks.
//
//   1. union_groups_kernel (cuda_index.h)  -> union_groups[0 .. C/G), C = kept union channels
//   2. decode_gate_up_kernel: one warp per union channel u (grid-stride); 16-byte loads of the
//      channel's gate and up rows, fp32 dots for a tile of tokens, warp-shuffle reduction,
//      h = act(gate) * up * scale (0 where the token's persona lacks the group) -> hidden[u, t]
//   3. decode_down_kernel: accum[t, :] += sum_u hidden[u, t] * down_t[c(u), :]; blocks split
//      the columns (16-byte loads per thread), the union channels (split-K) and token tiles;
//      partial sums go to the fp32 accumulator with (vector) atomics
//   4. cast_output_kernel: out = accum in the output dtype
#pragma once

#include <algorithm>

#include "cuda_common.cuh"
#include "cuda_index.h"
#include "cuda_workspace.h"

namespace persona_kernels {
namespace cuda_detail {

constexpr int kGateUpThreads = 256;
constexpr int kDownThreads = 128;
constexpr int kDownUnroll = 4;    // down rows in flight per thread

template <typename T>
struct DecodeArgs {
  const T* x;
  int64_t x_stride;
  const T* gate_up;
  const T* down_t;
  const int32_t* persona_ids;
  const int32_t* keep_bits;
  const float* scales;
  const int32_t* union_groups;
  const int32_t* union_count;
  float* hidden;
  float* accum;
  T* out;
  int64_t out_stride;
  int num_tokens, d, d_ff, group_size, num_words, num_personas;
  Activation activation;
};

// VEC elements per load (VEC * sizeof(T) == 16 on the vector path, 1 on the scalar path);
// TT tokens per tile (2 * TT fp32 accumulators per lane).
template <typename T, int VEC, int TT>
__global__ void __launch_bounds__(kGateUpThreads) decode_gate_up_kernel(const DecodeArgs<T> a) {
  static_assert(TT <= 32, "one lane per token of a tile");
  // 16-byte loads in flight per row per lane; fewer with more tokens (registers, more reuse).
  constexpr int kGateUpUnroll = TT <= 2 ? 4 : 2;
  const int lane = threadIdx.x & 31;
  const int first_warp = static_cast<int>((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
  const int num_warps = static_cast<int>((gridDim.x * blockDim.x) >> 5);
  const int num_channels = __ldg(a.union_count) * a.group_size;

  for (int u = first_warp; u < num_channels; u += num_warps) {
    const int g = __ldg(a.union_groups + u / a.group_size);
    const int c = g * a.group_size + u % a.group_size;
    const T* w_gate = a.gate_up + static_cast<int64_t>(c) * 2 * a.d;
    const T* w_up = w_gate + a.d;

    for (int t0 = 0; t0 < a.num_tokens; t0 += TT) {
      const int t = t0 + lane;
      bool keep = false;
      float scale = 0.0f;
      if (lane < TT && t < a.num_tokens) {
        const int p = __ldg(a.persona_ids + t);
        if (p >= 0 && p < a.num_personas) {
          keep = group_kept(a.keep_bits + static_cast<int64_t>(p) * a.num_words, g);
          if (keep) scale = a.scales ? __ldg(a.scales + static_cast<int64_t>(p) * a.d_ff + c) : 1.0f;
        }
      }
      const unsigned tile_keep = __ballot_sync(kFullMask, keep);
      float h = 0.0f;
      if (tile_keep != 0u) {
        float acc_gate[TT], acc_up[TT];
#pragma unroll
        for (int tt = 0; tt < TT; ++tt) acc_gate[tt] = acc_up[tt] = 0.0f;

        for (int k0 = lane * VEC; k0 < a.d; k0 += 32 * VEC * kGateUpUnroll) {
          Packed<T, VEC> wg[kGateUpUnroll], wu[kGateUpUnroll];
#pragma unroll
          for (int j = 0; j < kGateUpUnroll; ++j) {
            const int k = k0 + j * 32 * VEC;
            if (k < a.d) {
              wg[j].load(w_gate + k);
              wu[j].load(w_up + k);
            } else {
              wg[j].zero();
              wu[j].zero();
            }
          }
#pragma unroll
          for (int tt = 0; tt < TT; ++tt) {
            if (!((tile_keep >> tt) & 1u)) continue;  // warp-uniform
            const T* x_row = a.x + static_cast<int64_t>(t0 + tt) * a.x_stride;
#pragma unroll
            for (int j = 0; j < kGateUpUnroll; ++j) {
              const int k = k0 + j * 32 * VEC;
              if (k < a.d) {
                Packed<T, VEC> xv;
                xv.load(x_row + k);
#pragma unroll
                for (int v = 0; v < VEC; ++v) {
                  const float xe = xv.get(v);
                  acc_gate[tt] = fmaf(wg[j].get(v), xe, acc_gate[tt]);
                  acc_up[tt] = fmaf(wu[j].get(v), xe, acc_up[tt]);
                }
              }
            }
          }
        }
#pragma unroll
        for (int tt = 0; tt < TT; ++tt) {
          if (!((tile_keep >> tt) & 1u)) continue;  // warp-uniform
#pragma unroll
          for (int offset = 16; offset > 0; offset >>= 1) {
            acc_gate[tt] += __shfl_xor_sync(kFullMask, acc_gate[tt], offset);
            acc_up[tt] += __shfl_xor_sync(kFullMask, acc_up[tt], offset);
          }
          if (lane == tt) h = activate(acc_gate[tt], a.activation) * acc_up[tt] * scale;
        }
      }
      if (lane < TT && t < a.num_tokens) a.hidden[static_cast<int64_t>(u) * a.num_tokens + t] = keep ? h : 0.0f;
    }
  }
}

// Adds VEC floats to dst (16-byte aligned when VEC % 4 == 0).
template <int VEC>
__device__ __forceinline__ void atomic_add_vec(float* dst, const float (&v)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kVector = VEC % 4 == 0;
#else
  constexpr bool kVector = false;
#endif
  if constexpr (kVector) {
#pragma unroll
    for (int q = 0; q < VEC / 4; ++q) {
      atomicAdd(reinterpret_cast<float4*>(dst) + q, make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]));
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) atomicAdd(dst + i, v[i]);
  }
}

// grid = (token tiles of TT, column blocks of kDownThreads * VEC, split-K slices of the union).
template <typename T, int VEC, int TT>
__global__ void __launch_bounds__(kDownThreads) decode_down_kernel(const DecodeArgs<T> a) {
  const int t0 = blockIdx.x * TT;
  const int tokens = min(TT, a.num_tokens - t0);
  const int col = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
  const int num_channels = __ldg(a.union_count) * a.group_size;
  const int chunk = (num_channels + gridDim.z - 1) / gridDim.z;
  const int u_begin = blockIdx.z * chunk;
  const int u_end = min(num_channels, u_begin + chunk);
  if (col >= a.d || u_begin >= u_end) return;

  float acc[TT][VEC];
#pragma unroll
  for (int tt = 0; tt < TT; ++tt)
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[tt][v] = 0.0f;

  for (int u0 = u_begin; u0 < u_end; u0 += kDownUnroll) {
    Packed<T, VEC> w[kDownUnroll];
#pragma unroll
    for (int j = 0; j < kDownUnroll; ++j) {
      const int u = u0 + j;
      if (u < u_end) {
        const int c = __ldg(a.union_groups + u / a.group_size) * a.group_size + u % a.group_size;
        w[j].load(a.down_t + static_cast<int64_t>(c) * a.d + col);
      } else {
        w[j].zero();
      }
    }
#pragma unroll
    for (int j = 0; j < kDownUnroll; ++j) {
      const int u = u0 + j;
      if (u >= u_end) break;
      const float* h_row = a.hidden + static_cast<int64_t>(u) * a.num_tokens + t0;
#pragma unroll
      for (int tt = 0; tt < TT; ++tt) {
        if (tt < tokens) {
          const float h = __ldg(h_row + tt);
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[tt][v] = fmaf(h, w[j].get(v), acc[tt][v]);
        }
      }
    }
  }
#pragma unroll
  for (int tt = 0; tt < TT; ++tt) {
    if (tt < tokens) atomic_add_vec<VEC>(a.accum + static_cast<int64_t>(t0 + tt) * a.d + col, acc[tt]);
  }
}

template <typename T>
__global__ void cast_output_kernel(const DecodeArgs<T> a) {
  using Bits = typename Elem<T>::Bits;
  const int64_t n = static_cast<int64_t>(a.num_tokens) * a.d;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / a.d, k = i % a.d;
    reinterpret_cast<Bits*>(a.out)[t * a.out_stride + k] = Elem<T>::from_float(a.accum[i]);
  }
}

template <typename T, int VEC, int TT>
CudaStatus launch_decode_kernels(const DecodeArgs<T>& a, int sm_count, cudaStream_t stream, std::string* error) {
  int resident = 0;
  PK_CUDA_TRY((resident_grid<decode_gate_up_kernel<T, VEC, TT>>(kGateUpThreads, sm_count, &resident)));
  const int gate_up_blocks = std::max(1, std::min(ceil_div(a.d_ff, kGateUpThreads / 32), resident));
  decode_gate_up_kernel<T, VEC, TT><<<gate_up_blocks, kGateUpThreads, 0, stream>>>(a);
  PK_CUDA_CHECK_LAUNCH("decode_gate_up_kernel");

  const dim3 down_grid(ceil_div(a.num_tokens, TT), ceil_div(a.d, static_cast<int64_t>(kDownThreads) * VEC), 1);
  const int64_t blocks_per_split = static_cast<int64_t>(down_grid.x) * down_grid.y;
  const int64_t wanted_splits = (4LL * sm_count + blocks_per_split - 1) / blocks_per_split;
  const int64_t max_splits = std::max<int64_t>(1, std::min<int64_t>(65535, a.d_ff / 16));
  const dim3 grid(down_grid.x, down_grid.y, static_cast<unsigned>(std::max<int64_t>(1, std::min(wanted_splits, max_splits))));
  decode_down_kernel<T, VEC, TT><<<grid, kDownThreads, 0, stream>>>(a);
  PK_CUDA_CHECK_LAUNCH("decode_down_kernel");

  const int64_t n = static_cast<int64_t>(a.num_tokens) * a.d;
  const int cast_blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, 8LL * sm_count)));
  cast_output_kernel<T><<<cast_blocks, 256, 0, stream>>>(a);
  PK_CUDA_CHECK_LAUNCH("cast_output_kernel");
  return CudaStatus::kOk;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Enqueues the decode path. `vector` selects 16-byte loads (the caller checked alignment).
template <typename T>
CudaStatus launch_decode(const MaskedFFNParams& p, const WorkspaceLayout& layout, char* workspace, bool vector,
                         int sm_count, cudaStream_t stream, std::string* error) {
  DecodeArgs<T> a;
  a.x = static_cast<const T*>(p.x);
  a.x_stride = p.x_row_stride;
  a.gate_up = static_cast<const T*>(p.gate_up);
  a.down_t = static_cast<const T*>(p.down_t);
  a.persona_ids = p.persona_ids;
  a.keep_bits = p.keep_bits;
  a.scales = p.scales;
  a.union_groups = reinterpret_cast<const int32_t*>(workspace + layout.union_groups);
  a.union_count = reinterpret_cast<const int32_t*>(workspace + layout.union_count);
  a.hidden = reinterpret_cast<float*>(workspace + layout.hidden);
  a.accum = reinterpret_cast<float*>(workspace + layout.accum);
  a.out = static_cast<T*>(p.out);
  a.out_stride = p.out_row_stride;
  a.num_tokens = static_cast<int>(p.num_tokens);
  a.d = static_cast<int>(p.d_model);
  a.d_ff = static_cast<int>(p.d_ff);
  a.group_size = static_cast<int>(p.group_size);
  a.num_words = static_cast<int>(p.num_words);
  a.num_personas = static_cast<int>(p.num_personas);
  a.activation = p.activation;

  const CudaStatus st = launch_union_groups(p.persona_ids, a.num_tokens, p.keep_bits, a.num_personas, a.num_words,
                                            a.d_ff / a.group_size, reinterpret_cast<int32_t*>(workspace + layout.union_groups),
                                            reinterpret_cast<int32_t*>(workspace + layout.union_count), stream, error);
  if (st != CudaStatus::kOk) return st;
  PK_CUDA_TRY(cudaMemsetAsync(a.accum, 0, sizeof(float) * static_cast<size_t>(a.num_tokens) * a.d, stream));

  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  const bool small = a.num_tokens <= 2;
  if (vector) {
    return small ? launch_decode_kernels<T, kVec, 2>(a, sm_count, stream, error)
                 : launch_decode_kernels<T, kVec, 8>(a, sm_count, stream, error);
  }
  return small ? launch_decode_kernels<T, 1, 2>(a, sm_count, stream, error)
               : launch_decode_kernels<T, 1, 8>(a, sm_count, stream, error);
}

}  // namespace cuda_detail
}  // namespace persona_kernels
