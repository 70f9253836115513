// pybind11 module persona_kernels._cuda: the CUDA masked FFN over raw device pointers.
//
// No torch headers: tensors arrive as data_ptr() integers and the stream as the integer
// torch.cuda.current_stream().cuda_stream, so one build works with any torch version.
// Errors: bad arguments raise ValueError (std::invalid_argument), a missing device or a failed
// CUDA call raises RuntimeError (std::runtime_error), each with the launcher's message.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "masked_ffn/masked_ffn_cuda.h"

#ifndef PERSONA_KERNELS_CUDA_ARCHS
#define PERSONA_KERNELS_CUDA_ARCHS "unknown"
#endif
#ifndef PERSONA_KERNELS_NVCC_VERSION
#define PERSONA_KERNELS_NVCC_VERSION "unknown"
#endif

namespace py = pybind11;
using namespace persona_kernels;

namespace {

DType parse_dtype(const std::string& name) {
  if (name == "float32") return DType::kFloat32;
  if (name == "float16") return DType::kFloat16;
  if (name == "bfloat16") return DType::kBFloat16;
  throw std::invalid_argument("dtype must be 'float32', 'float16' or 'bfloat16', got '" + name + "'");
}

Activation parse_activation(const std::string& name) {
  if (name == "silu") return Activation::kSilu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  throw std::invalid_argument("activation must be 'silu' or 'gelu_tanh', got '" + name + "'");
}

CudaPath parse_path(const std::string& name) {
  if (name == "auto") return CudaPath::kAuto;
  if (name == "decode") return CudaPath::kDecode;
  if (name == "prefill") return CudaPath::kPrefill;
  throw std::invalid_argument("path must be 'auto', 'decode' or 'prefill', got '" + name + "'");
}

const char* path_name(CudaPath path) {
  switch (path) {
    case CudaPath::kDecode: return "decode";
    case CudaPath::kPrefill: return "prefill";
    default: return "auto";
  }
}

template <typename T>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

MaskedFFNParams shape_params(int64_t num_tokens, int64_t d_model, int64_t d_ff, int64_t num_personas,
                             int64_t group_size, const std::string& dtype) {
  MaskedFFNParams p;
  p.num_tokens = num_tokens;
  p.d_model = d_model;
  p.d_ff = d_ff;
  p.num_personas = num_personas;
  p.group_size = group_size;
  p.num_words = group_size >= 1 ? (d_ff / group_size + 31) / 32 : 0;
  p.x_row_stride = d_model;
  p.out_row_stride = d_model;
  p.dtype = parse_dtype(dtype);
  return p;
}

void raise_on_error(CudaStatus status, const std::string& error) {
  if (status == CudaStatus::kOk) return;
  if (status == CudaStatus::kInvalidArgument) throw std::invalid_argument(error);
  throw std::runtime_error(error);
}

void masked_ffn(uintptr_t x, uintptr_t gate_up, uintptr_t down_t, uintptr_t persona_ids, uintptr_t keep_bits,
                uintptr_t scales, uintptr_t out, uintptr_t workspace, uint64_t workspace_bytes, int64_t num_tokens,
                int64_t d_model, int64_t d_ff, int64_t num_personas, int64_t group_size, int64_t x_row_stride,
                int64_t out_row_stride, const std::string& dtype, const std::string& activation,
                const std::string& path, uintptr_t stream) {
  MaskedFFNParams p = shape_params(num_tokens, d_model, d_ff, num_personas, group_size, dtype);
  p.x = as_ptr<const void>(x);
  p.gate_up = as_ptr<const void>(gate_up);
  p.down_t = as_ptr<const void>(down_t);
  p.persona_ids = as_ptr<const int32_t>(persona_ids);
  p.keep_bits = as_ptr<const int32_t>(keep_bits);
  p.scales = as_ptr<const float>(scales);
  p.out = as_ptr<void>(out);
  p.x_row_stride = x_row_stride;
  p.out_row_stride = out_row_stride;
  p.activation = parse_activation(activation);
  MaskedFFNCudaConfig config;
  config.path = parse_path(path);
  config.workspace = as_ptr<void>(workspace);
  config.workspace_bytes = static_cast<size_t>(workspace_bytes);
  std::string error;
  raise_on_error(masked_ffn_cuda(p, config, reinterpret_cast<cudaStream_t>(stream), &error), error);
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return count;
}

py::dict build_info() {
  int runtime = 0;
  if (cudaRuntimeGetVersion(&runtime) != cudaSuccess) runtime = -1;
  py::dict info;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  info["cuda_runtime_version"] = runtime;
  info["nvcc_version"] = PERSONA_KERNELS_NVCC_VERSION;
  info["archs"] = PERSONA_KERNELS_CUDA_ARCHS;
  info["decode_max_tokens"] = kCudaDecodeMaxTokens;
  info["max_groups_prefill"] = kCudaMaxWords * 32;
  info["dtypes"] = py::make_tuple("float32", "float16", "bfloat16");
  return info;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "CUDA masked gated FFN over raw device pointers (see csrc/masked_ffn/masked_ffn_cuda.h).";
  m.def("masked_ffn", &masked_ffn, py::arg("x"), py::arg("gate_up"), py::arg("down_t"), py::arg("persona_ids"),
        py::arg("keep_bits"), py::arg("scales"), py::arg("out"), py::arg("workspace"), py::arg("workspace_bytes"),
        py::arg("num_tokens"), py::arg("d_model"), py::arg("d_ff"), py::arg("num_personas"), py::arg("group_size"),
        py::arg("x_row_stride"), py::arg("out_row_stride"), py::arg("dtype"), py::arg("activation"),
        py::arg("path"), py::arg("stream"),
        "Enqueue out[T, d] = masked gated FFN on `stream` (device pointers as ints; scales may be 0 for none;\n"
        "persona_ids int32 [T]; keep_bits int32 [P, ceil(d_ff/G/32)]). Returns without synchronising.\n"
        "Raises ValueError on bad arguments, RuntimeError without a device or on a CUDA error.");
  m.def(
      "workspace_bytes",
      [](int64_t num_tokens, int64_t d_model, int64_t d_ff, int64_t num_personas, int64_t group_size,
         const std::string& dtype, const std::string& path) {
        return masked_ffn_cuda_workspace_bytes(shape_params(num_tokens, d_model, d_ff, num_personas, group_size, dtype),
                                               parse_path(path));
      },
      py::arg("num_tokens"), py::arg("d_model"), py::arg("d_ff"), py::arg("num_personas"), py::arg("group_size"),
      py::arg("dtype"), py::arg("path") = "auto", "Device workspace bytes masked_ffn needs (host-only).");
  m.def(
      "resolve_path",
      [](int64_t num_tokens, const std::string& dtype, const std::string& path, int64_t n_groups) {
        return path_name(masked_ffn_cuda_resolve_path(shape_params(num_tokens, 0, n_groups, 0, 1, dtype), parse_path(path)));
      },
      py::arg("num_tokens"), py::arg("dtype"), py::arg("path") = "auto", py::arg("n_groups") = 0,
      "Which path ('decode'/'prefill') runs for a layer of n_groups channel groups.");
  m.def("device_count", &device_count, "CUDA devices visible to this module's runtime (0 without driver).");
  m.def("build_info", &build_info, "CUDA version, target archs and limits this module was built with.");
}
