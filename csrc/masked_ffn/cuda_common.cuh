// Device helpers shared by the CUDA kernels: element types as raw bits, vector loads,
// activations, a block-wide scan, and host-side error reporting.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <string>

#include "masked_ffn_cuda.h"

namespace persona_kernels {
namespace cuda_detail {

constexpr unsigned kFullMask = 0xffffffffu;

// Element type T seen as raw bits, so loads never alias T objects.
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using Bits = uint32_t;
  __device__ __forceinline__ static float to_float(Bits b) { return __uint_as_float(b); }
  __device__ __forceinline__ static Bits from_float(float f) { return __float_as_uint(f); }
};

template <>
struct Elem<__half> {
  using Bits = uint16_t;
  __device__ __forceinline__ static float to_float(Bits b) { return __half2float(__ushort_as_half(b)); }
  __device__ __forceinline__ static Bits from_float(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

template <>
struct Elem<__nv_bfloat16> {
  using Bits = uint16_t;
  __device__ __forceinline__ static float to_float(Bits b) { return __uint_as_float(static_cast<uint32_t>(b) << 16); }
  __device__ __forceinline__ static Bits from_float(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};

// N consecutive elements of T held as raw 32-bit words (or one 16-bit word when N*sizeof(T) == 2).
// load() issues a single 2/4/8/16-byte load; the address must be aligned to N * sizeof(T).
template <typename T, int N>
struct Packed {
  static constexpr int kBytes = N * static_cast<int>(sizeof(T));
  static_assert(kBytes == 2 || kBytes == 4 || kBytes == 8 || kBytes == 16, "unsupported vector width");
  static constexpr int kWords = kBytes >= 4 ? kBytes / 4 : 1;
  uint32_t w[kWords];

  __device__ __forceinline__ void load(const T* p) {
    if constexpr (kBytes == 16) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
      w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
    } else if constexpr (kBytes == 8) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
      w[0] = v.x, w[1] = v.y;
    } else if constexpr (kBytes == 4) {
      w[0] = __ldg(reinterpret_cast<const unsigned int*>(p));
    } else {
      w[0] = __ldg(reinterpret_cast<const unsigned short*>(p));
    }
  }

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = 0u;
  }

  // Element i (compile-time index after unrolling) as float.
  __device__ __forceinline__ float get(int i) const {
    if constexpr (sizeof(T) == 4) {
      return Elem<T>::to_float(w[i]);
    } else {
      return Elem<T>::to_float(static_cast<uint16_t>(w[i / 2] >> (16 * (i % 2))));
    }
  }
};

__device__ __forceinline__ float activate(float z, Activation activation) {
  if (activation == Activation::kGeluTanh) {
    const float inner = 0.7978845608028654f * (z + 0.044715f * z * z * z);
    return 0.5f * z * (1.0f + tanhf(inner));
  }
  return z / (1.0f + expf(-z));
}

// Group g of `row` (one persona's bitmap) is kept; g must be < num_words * 32.
__device__ __forceinline__ bool group_kept(const int32_t* row, int g) {
  return (static_cast<uint32_t>(__ldg(row + (g >> 5))) >> (g & 31)) & 1u;
}

// Bitmap word w with the bits past n_groups cleared (the spec says they are zero; do not trust it).
__device__ __forceinline__ uint32_t masked_word(const int32_t* row, int w, int n_groups) {
  uint32_t word = static_cast<uint32_t>(__ldg(row + w));
  const int valid = n_groups - w * 32;
  if (valid < 32) word &= valid <= 0 ? 0u : ((1u << valid) - 1u);
  return word;
}

// Position of the n-th (0-based) set bit of `word`; requires n < popcount(word).
__device__ __forceinline__ int nth_set_bit(uint32_t word, int n) {
  for (int i = 0; i < n; ++i) word &= word - 1u;
  return __ffs(static_cast<int>(word)) - 1;
}

// Exclusive prefix sum of `value` over the block; *total gets the block's sum.
// Every thread of the block must call it; blockDim.x must be a multiple of 32.
// `scratch` is 33 ints of shared memory, free again when the function returns.
__device__ __forceinline__ int block_exclusive_sum(int value, int* scratch, int* total) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  int inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int other = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const int warp_total = lane < num_warps ? scratch[lane] : 0;
    int warp_inclusive = warp_total;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int other = __shfl_up_sync(kFullMask, warp_inclusive, offset);
      if (lane >= offset) warp_inclusive += other;
    }
    scratch[lane] = warp_inclusive - warp_total;
    if (lane == 31) scratch[32] = warp_inclusive;
  }
  __syncthreads();
  const int result = scratch[warp] + inclusive - value;
  *total = scratch[32];
  __syncthreads();
  return result;
}

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Blocks of `Kernel` (launched with `threads` threads, static shared memory only) resident at
// once on the whole device: the size of a persistent grid that runs in a single wave. The
// per-SM figure is cached per kernel and device (the kernel is a template argument, so each
// kernel has its own cache, even kernels of one signature), so later calls (and graph captures)
// make no occupancy query.
template <auto Kernel>
cudaError_t resident_grid(int threads, int sm_count, int* blocks) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices];  // static storage: zero-initialised
  int device = 0;
  cudaError_t code = cudaGetDevice(&device);
  if (code != cudaSuccess) return code;
  int per_sm = device < kMaxDevices ? cached[device].load(std::memory_order_relaxed) : 0;
  if (per_sm == 0) {
    code = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, threads, 0);
    if (code != cudaSuccess) return code;
    per_sm = per_sm > 0 ? per_sm : 1;
    if (device < kMaxDevices) cached[device].store(per_sm, std::memory_order_relaxed);
  }
  *blocks = per_sm * sm_count;
  return cudaSuccess;
}

// Records a failed CUDA call in *error and returns kCudaError.
inline CudaStatus cuda_failure(std::string* error, const char* what, cudaError_t code) {
  if (error) *error = std::string("persona_kernels CUDA: ") + what + " failed: " + cudaGetErrorName(code) + ": " + cudaGetErrorString(code);
  return CudaStatus::kCudaError;
}

}  // namespace cuda_detail
}  // namespace persona_kernels

// Returns from the enclosing CudaStatus function when a CUDA call fails.
#define PK_CUDA_TRY(expr)                                                              \
  do {                                                                                 \
    const cudaError_t pk_code_ = (expr);                                               \
    if (pk_code_ != cudaSuccess) return ::persona_kernels::cuda_detail::cuda_failure(error, #expr, pk_code_); \
  } while (0)

// Checks the kernel launch just made (configuration errors surface here, not at the <<<>>> line).
#define PK_CUDA_CHECK_LAUNCH(kernel_name)                                              \
  do {                                                                                 \
    const cudaError_t pk_code_ = cudaGetLastError();                                   \
    if (pk_code_ != cudaSuccess)                                                       \
      return ::persona_kernels::cuda_detail::cuda_failure(error, "launch of " kernel_name, pk_code_); \
  } while (0)
