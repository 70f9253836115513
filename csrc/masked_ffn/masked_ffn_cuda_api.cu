// The public CUDA entry points (masked_ffn_cuda.h): argument checks, device check, dispatch
// by dtype. Host code only; the kernels live in the per-dtype files.
#include <cstdint>
#include <limits>
#include <string>

#include "cuda_run.cuh"
#include "cuda_workspace.h"
#include "masked_ffn_cuda.h"

namespace persona_kernels {
namespace {

using cuda_detail::plan_workspace;

CudaStatus invalid(std::string* error, const std::string& message) {
  if (error) *error = "persona_kernels CUDA: " + message;
  return CudaStatus::kInvalidArgument;
}

// Host-side checks of everything the kernels rely on; nothing touches the device.
CudaStatus check_params(const MaskedFFNParams& p, const MaskedFFNCudaConfig& config, CudaPath path,
                        std::string* error) {
  constexpr int64_t kMaxDim = int64_t{1} << 30;  // keeps every int index in the kernels in range
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16)
    return invalid(error, "unknown dtype code " + std::to_string(static_cast<int>(p.dtype)));
  if (p.activation != Activation::kSilu && p.activation != Activation::kGeluTanh)
    return invalid(error, "unknown activation code " + std::to_string(static_cast<int>(p.activation)));
  if (p.input_gains != nullptr)
    return invalid(error, "input_gains are not fused into the CUDA kernels; multiply x by them first "
                          "(persona_kernels.reference.apply_input_gains)");
  if (p.output_bias != nullptr)
    return invalid(error, "output_bias is not fused into the CUDA kernels; add it to the output afterwards "
                          "(persona_kernels.reference.apply_output_bias)");
  if (path != CudaPath::kDecode && path != CudaPath::kPrefill)
    return invalid(error, "unknown path code " + std::to_string(static_cast<int>(path)));
  if (p.num_tokens < 0 || p.d_model < 0 || p.d_ff < 0 || p.num_personas < 0)
    return invalid(error, "num_tokens, d_model, d_ff and num_personas must be >= 0");
  if (p.num_tokens >= kMaxDim || p.d_model >= kMaxDim || p.d_ff >= kMaxDim || p.num_personas >= kMaxDim)
    return invalid(error, "num_tokens, d_model, d_ff and num_personas must be < 2^30");
  if (p.group_size < 1 || p.d_ff % p.group_size != 0)
    return invalid(error, "group_size " + std::to_string(p.group_size) + " does not divide d_ff " + std::to_string(p.d_ff));
  const int64_t n_groups = p.d_ff / p.group_size;
  if (p.num_words != (n_groups + 31) / 32)
    return invalid(error, "num_words is " + std::to_string(p.num_words) + ", expected ceil(d_ff / group_size / 32) = " +
                              std::to_string((n_groups + 31) / 32));
  if (p.num_tokens == 0 || p.d_model == 0) return CudaStatus::kOk;
  if (p.x_row_stride < p.d_model || p.out_row_stride < p.d_model)
    return invalid(error, "x_row_stride and out_row_stride must be >= d_model");
  if (p.out == nullptr) return invalid(error, "out is a null pointer");
  if (p.d_ff == 0) return CudaStatus::kOk;
  if (!p.x || !p.gate_up || !p.down_t || !p.persona_ids || !p.keep_bits)
    return invalid(error, "null pointer among x, gate_up, down_t, persona_ids, keep_bits");
  if (path == CudaPath::kPrefill && p.dtype == DType::kFloat32)
    return invalid(error, "the prefill path supports float16/bfloat16 only (use path decode or auto for float32)");
  if (path == CudaPath::kPrefill && p.num_words > kCudaMaxWords)
    return invalid(error, "the prefill path supports at most " + std::to_string(kCudaMaxWords * 32) +
                              " groups per layer, got " + std::to_string(n_groups));
  // The decode down kernel puts column blocks of 128 threads on grid.y (at most 65535 blocks).
  constexpr int64_t kMaxDecodeDModel = 65535LL * 128;
  if (path == CudaPath::kDecode && p.d_model > kMaxDecodeDModel)
    return invalid(error, "the decode path supports d_model up to " + std::to_string(kMaxDecodeDModel) + ", got " +
                              std::to_string(p.d_model));
  const size_t needed = plan_workspace(p, path).total;
  if (config.workspace == nullptr || config.workspace_bytes < needed)
    return invalid(error, std::string("workspace is ") +
                              (config.workspace ? std::to_string(config.workspace_bytes) + " bytes" : "null") +
                              "; this call needs " + std::to_string(needed) + " bytes (masked_ffn_cuda_workspace_bytes)");
  if ((reinterpret_cast<uintptr_t>(config.workspace) & 255u) != 0) return invalid(error, "workspace must be 256-byte aligned");
  return CudaStatus::kOk;
}

CudaStatus check_device(int* sm_count, std::string* error) {
  int count = 0;
  const cudaError_t code = cudaGetDeviceCount(&count);
  if (code != cudaSuccess || count == 0) {
    (void)cudaGetLastError();  // leave no error behind for the next CUDA user
    if (error) {
      *error = std::string("persona_kernels CUDA: no CUDA device available (cudaGetDeviceCount: ") +
               (code == cudaSuccess ? "0 devices" : cudaGetErrorString(code)) + ")";
    }
    return CudaStatus::kNoDevice;
  }
  int device = 0;
  PK_CUDA_TRY(cudaGetDevice(&device));
  PK_CUDA_TRY(cudaDeviceGetAttribute(sm_count, cudaDevAttrMultiProcessorCount, device));
  return CudaStatus::kOk;
}

}  // namespace

CudaPath masked_ffn_cuda_resolve_path(const MaskedFFNParams& params, CudaPath path) {
  if (path != CudaPath::kAuto) return path;
  if (params.dtype == DType::kFloat32 || params.num_tokens <= kCudaDecodeMaxTokens) return CudaPath::kDecode;
  if (params.num_words > kCudaMaxWords) return CudaPath::kDecode;  // more groups than the prefill prefix holds
  return CudaPath::kPrefill;
}

size_t masked_ffn_cuda_workspace_bytes(const MaskedFFNParams& params, CudaPath path) {
  if (params.group_size < 1) return 0;
  return plan_workspace(params, masked_ffn_cuda_resolve_path(params, path)).total;
}

CudaStatus masked_ffn_cuda(const MaskedFFNParams& params, const MaskedFFNCudaConfig& config, cudaStream_t stream,
                           std::string* error) {
  const CudaPath path = masked_ffn_cuda_resolve_path(params, config.path);
  CudaStatus status = check_params(params, config, path, error);
  if (status != CudaStatus::kOk) return status;
  int sm_count = 0;
  status = check_device(&sm_count, error);
  if (status != CudaStatus::kOk) return status;
  if (params.num_tokens == 0 || params.d_model == 0) return CudaStatus::kOk;
  if (params.d_ff == 0) {  // nothing kept anywhere: the output is zero
    const size_t elem = cuda_detail::dtype_bytes(params.dtype);
    PK_CUDA_TRY(cudaMemset2DAsync(params.out, elem * params.out_row_stride, 0, elem * params.d_model,
                                  params.num_tokens, stream));
    return CudaStatus::kOk;
  }
  switch (params.dtype) {
    case DType::kFloat32: return cuda_detail::run_masked_ffn_fp32(params, config, path, sm_count, stream, error);
    case DType::kFloat16: return cuda_detail::run_masked_ffn_fp16(params, config, path, sm_count, stream, error);
    case DType::kBFloat16: return cuda_detail::run_masked_ffn_bf16(params, config, path, sm_count, stream, error);
  }
  return invalid(error, "unknown dtype");
}

const char* cuda_status_name(CudaStatus status) {
  switch (status) {
    case CudaStatus::kOk: return "ok";
    case CudaStatus::kInvalidArgument: return "invalid argument";
    case CudaStatus::kNoDevice: return "no device";
    case CudaStatus::kCudaError: return "CUDA error";
  }
  return "unknown status";
}

}  // namespace persona_kernels
