// CUDA entry points of the masked gated FFN, for Python bindings and C++ serving stacks.
//
// Semantics and the parameter struct: masked_ffn_params.h (shared with the CPU kernel).
// All pointers in MaskedFFNParams are device pointers here. Nothing is allocated: the caller
// passes a device workspace of masked_ffn_cuda_workspace_bytes() bytes, so a call does only
// stream-ordered work (kernels and memsets on `stream`) and can be captured in a CUDA graph.
//
// Usage:
//   persona_kernels::MaskedFFNParams p = ...;            // device pointers, sizes, dtype
//   persona_kernels::MaskedFFNCudaConfig cfg;             // path = kAuto
//   cfg.workspace_bytes = persona_kernels::masked_ffn_cuda_workspace_bytes(p, cfg.path);
//   cudaMalloc(&cfg.workspace, cfg.workspace_bytes);     // once; reuse for equal shapes
//   std::string error;
//   if (persona_kernels::masked_ffn_cuda(p, cfg, stream, &error) != CudaStatus::kOk) { ... }
//
// Persona ids outside [0, num_personas) are not an error on the device: such tokens keep no
// channel and their output rows are zero (validate ids on the host if that must be an error).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "masked_ffn_params.h"

namespace persona_kernels {

// Which kernel family runs. Values are part of the binding ABI; append only.
enum class CudaPath : int32_t {
  kAuto = 0,     // decode for num_tokens <= kCudaDecodeMaxTokens (and always for fp32), else prefill
  kDecode = 1,   // union of kept groups, CUDA-core GEMV, fp32 split-K accumulation (any dtype, any T)
  kPrefill = 2,  // tokens sorted by persona, tensor-core (WMMA) grouped GEMM (fp16/bf16 only)
};

// Result of a call. On anything but kOk, `*error` (when not null) says what and why.
enum class CudaStatus : int32_t {
  kOk = 0,
  kInvalidArgument = 1,  // bad sizes, null pointers, unsupported dtype for the path; nothing launched
  kNoDevice = 2,         // no CUDA device (or driver) in this process; nothing launched
  kCudaError = 3,        // a CUDA call failed (the message names it and CUDA's error string)
};

// Largest token count kAuto sends to the decode path.
constexpr int64_t kCudaDecodeMaxTokens = 64;

// Largest number of bitmap words (groups / 32) a persona may have on the prefill path
// (its per-block word prefix lives in shared memory): 65536 groups.
constexpr int64_t kCudaMaxWords = 2048;

struct MaskedFFNCudaConfig {
  CudaPath path = CudaPath::kAuto;
  void* workspace = nullptr;   // device memory, 256-byte aligned (cudaMalloc / torch are)
  size_t workspace_bytes = 0;  // at least masked_ffn_cuda_workspace_bytes(params, path)
};

// The path kAuto resolves to for these params (other values are returned unchanged).
CudaPath masked_ffn_cuda_resolve_path(const MaskedFFNParams& params, CudaPath path);

// Device workspace the call needs, in bytes (a function of the sizes, dtype and path only;
// never of persona ids or masks). 0 when num_tokens, d_model or d_ff is 0. Host-only.
size_t masked_ffn_cuda_workspace_bytes(const MaskedFFNParams& params, CudaPath path);

// Checks the arguments (host-side only: sizes, null pointers, workspace size), then enqueues
// the computation of params.out on `stream` on the current device. Returns without waiting.
// Thread-safe; concurrent calls need distinct workspaces.
CudaStatus masked_ffn_cuda(const MaskedFFNParams& params, const MaskedFFNCudaConfig& config,
                           cudaStream_t stream, std::string* error);

// Human-readable name of a status ("ok", "invalid argument", ...).
const char* cuda_status_name(CudaStatus status);

}  // namespace persona_kernels
