// The float32 instantiation of the CUDA masked FFN (one dtype per file: nvcc compiles them in parallel).
#include "cuda_run.cuh"

namespace persona_kernels {
namespace cuda_detail {

CudaStatus run_masked_ffn_fp32(const MaskedFFNParams& p, const MaskedFFNCudaConfig& config, CudaPath path,
                            int sm_count, cudaStream_t stream, std::string* error) {
  return run_masked_ffn<float>(p, config, path, sm_count, stream, error);
}

}  // namespace cuda_detail
}  // namespace persona_kernels
