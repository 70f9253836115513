// run_masked_ffn<T>: carves the workspace and enqueues the decode or prefill path for one
// element type. Arguments were validated by masked_ffn_cuda() (masked_ffn_cuda_api.cu);
// each masked_ffn_cuda_<dtype>.cu instantiates it once so nvcc compiles dtypes in parallel.
#pragma once

#include <type_traits>

#include "cuda_common.cuh"
#include "cuda_workspace.h"
#include "decode.cuh"
#include "prefill.cuh"

namespace persona_kernels {
namespace cuda_detail {

template <typename T>
CudaStatus run_masked_ffn(const MaskedFFNParams& p, const MaskedFFNCudaConfig& config, CudaPath path,
                          int sm_count, cudaStream_t stream, std::string* error) {
  const WorkspaceLayout layout = plan_workspace(p, path);
  char* workspace = static_cast<char*>(config.workspace);
  constexpr int64_t kVec = 16 / static_cast<int64_t>(sizeof(T));
  const bool vector = p.d_model % kVec == 0 && p.x_row_stride % kVec == 0 && aligned16(p.x) &&
                      aligned16(p.gate_up) && aligned16(p.down_t);
  if (path == CudaPath::kDecode) return launch_decode<T>(p, layout, workspace, vector, sm_count, stream, error);
  if constexpr (std::is_same_v<T, float>) {
    if (error) *error = "persona_kernels CUDA: the prefill path supports float16/bfloat16 only";
    return CudaStatus::kInvalidArgument;
  } else {
    return launch_prefill<T>(p, layout, workspace, vector && p.d_ff % kVec == 0, sm_count, stream, error);
  }
}

// Entry points per element type, defined in masked_ffn_cuda_{fp32,fp16,bf16}.cu.
CudaStatus run_masked_ffn_fp32(const MaskedFFNParams&, const MaskedFFNCudaConfig&, CudaPath, int, cudaStream_t, std::string*);
CudaStatus run_masked_ffn_fp16(const MaskedFFNParams&, const MaskedFFNCudaConfig&, CudaPath, int, cudaStream_t, std::string*);
CudaStatus run_masked_ffn_bf16(const MaskedFFNParams&, const MaskedFFNCudaConfig&, CudaPath, int, cudaStream_t, std::string*);

}  // namespace cuda_detail
}  // namespace persona_kernels
