// pybind11 module persona_kernels._cpu: the CPU masked FFN over raw host pointers.
// Taking integers (tensor.data_ptr()) instead of torch tensors keeps the build free of torch, so
// one binary works with every torch version. Invalid arguments raise ValueError naming the problem.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "masked_ffn/masked_ffn.h"

namespace py = pybind11;
using namespace persona_kernels;

namespace {

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument("persona_kernels._cpu.masked_ffn: " + message);
}

Activation parse_activation(const std::string& name) {
  if (name == "silu") return Activation::kSilu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  throw std::invalid_argument("persona_kernels._cpu.masked_ffn: unknown activation '" + name +
                              "'; expected 'silu' or 'gelu_tanh'");
}

DType parse_dtype(const std::string& name) {
  if (name == "float32") return DType::kFloat32;
  if (name == "float16") return DType::kFloat16;
  if (name == "bfloat16") return DType::kBFloat16;
  throw std::invalid_argument("persona_kernels._cpu.masked_ffn: unsupported dtype '" + name +
                              "'; expected 'float32', 'float16' or 'bfloat16'");
}

CpuIsa parse_isa(const std::string& name) {
  CpuIsa isa;
  if (name == "auto") isa = CpuIsa::kAuto;
  else if (name == "generic") isa = CpuIsa::kGeneric;
  else if (name == "avx2") isa = CpuIsa::kAvx2;
  else throw std::invalid_argument("persona_kernels._cpu: unknown isa '" + name + "'; expected auto, generic or avx2");
  if (!cpu_isa_supported(isa)) throw std::invalid_argument("persona_kernels._cpu: isa '" + name + "' is not supported on this CPU/build");
  return isa;
}

void masked_ffn(uintptr_t x, uintptr_t gate_up, uintptr_t down_t, uintptr_t persona_ids, uintptr_t keep_bits,
                uintptr_t scales, uintptr_t input_gains, uintptr_t output_bias, uintptr_t out, int64_t num_tokens,
                int64_t d_model, int64_t d_ff,
                int64_t num_personas, int64_t group_size, const std::string& activation, const std::string& dtype,
                int num_threads, const std::string& isa) {
  MaskedFFNParams p;
  p.activation = parse_activation(activation);
  p.dtype = parse_dtype(dtype);
  const CpuIsa cpu_isa = parse_isa(isa);
  require(num_tokens >= 0, "num_tokens must be >= 0, got " + std::to_string(num_tokens));
  require(d_model >= 1, "d_model must be >= 1, got " + std::to_string(d_model));
  require(d_ff >= 1, "d_ff must be >= 1, got " + std::to_string(d_ff));
  require(group_size >= 1 && d_ff % group_size == 0,
          "group_size " + std::to_string(group_size) + " does not divide d_ff " + std::to_string(d_ff));
  require(num_threads >= 0, "num_threads must be >= 0 (0 = OpenMP default), got " + std::to_string(num_threads));
  p.num_tokens = num_tokens;
  p.d_model = d_model;
  p.d_ff = d_ff;
  p.num_personas = num_personas;
  p.group_size = group_size;
  p.num_words = (d_ff / group_size + 31) / 32;
  p.x_row_stride = p.out_row_stride = d_model;
  if (num_tokens == 0) return;
  require(num_personas >= 1, "num_personas must be >= 1, got " + std::to_string(num_personas));
  require(x != 0, "x is a null pointer");
  require(gate_up != 0, "gate_up is a null pointer");
  require(down_t != 0, "down_t is a null pointer");
  require(persona_ids != 0, "persona_ids is a null pointer");
  require(keep_bits != 0, "keep_bits is a null pointer");
  require(out != 0, "out is a null pointer");
  p.x = reinterpret_cast<const void*>(x);
  p.gate_up = reinterpret_cast<const void*>(gate_up);
  p.down_t = reinterpret_cast<const void*>(down_t);
  p.persona_ids = reinterpret_cast<const int32_t*>(persona_ids);
  p.keep_bits = reinterpret_cast<const int32_t*>(keep_bits);
  p.scales = reinterpret_cast<const float*>(scales);
  p.input_gains = reinterpret_cast<const float*>(input_gains);
  p.output_bias = reinterpret_cast<const float*>(output_bias);
  p.out = reinterpret_cast<void*>(out);
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int32_t id = p.persona_ids[t];
    require(id >= 0 && id < num_personas, "persona id out of range: persona_ids[" + std::to_string(t) + "] = " +
                                              std::to_string(id) + " but there are " + std::to_string(num_personas) +
                                              " personas");
  }
  py::gil_scoped_release release;
  masked_ffn_cpu(p, num_threads, cpu_isa);
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "persona_kernels CPU kernels (C++/OpenMP) over raw host pointers";
  m.def("masked_ffn", &masked_ffn, R"doc(
Masked gated FFN for a batch of mixed personas, written into ``out``.

Semantics: ``persona_kernels.reference.masked_ffn_reference``. Every pointer is a host address
(``tensor.data_ptr()``) of a contiguous buffer:
  x [T, d], gate_up [d_ff, 2, d], down_t [d_ff, d], out [T, d]: all of ``dtype``;
  persona_ids [T] int32; keep_bits [P, ceil(d_ff / G / 32)] int32;
  scales [P, d_ff] float32, or 0 for none;
  input_gains [P, d] float32, or 0 for none: x[t] is multiplied by input_gains[persona_ids[t]] in
  float32 and rounded to ``dtype`` before the projections (fused into the load of the token tile);
  output_bias [P, d] float32, or 0 for none: output_bias[persona_ids[t]] is added in float32 to the
  output rounded to ``dtype``, and the sum rounded again (fused into the store).
``out`` is fully overwritten. The GIL is released while the kernel runs.
)doc",
        py::arg("x"), py::arg("gate_up"), py::arg("down_t"), py::arg("persona_ids"), py::arg("keep_bits"),
        py::arg("scales"), py::arg("input_gains"), py::arg("output_bias"), py::arg("out"), py::arg("num_tokens"), py::arg("d_model"), py::arg("d_ff"),
        py::arg("num_personas"), py::arg("group_size"), py::arg("activation"), py::arg("dtype"),
        py::arg("num_threads") = 0, py::arg("isa") = "auto");
  m.def("isa", [](const std::string& name) { return std::string(cpu_isa_name(parse_isa(name))); },
        py::arg("name") = "auto", "The instruction set ``name`` resolves to (``avx2`` or ``generic``).");
  m.def("isa_supported", [](const std::string& name) {
        try { parse_isa(name); return true; } catch (const std::invalid_argument&) { return false; }
      }, py::arg("name"), "Whether instruction set ``name`` can run here.");
  m.def("openmp", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  }, "Whether the extension was built with OpenMP.");
  m.attr("TOKEN_TILE") = kCpuTokenTile;
}
