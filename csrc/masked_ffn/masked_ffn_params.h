// Parameters of one masked gated FFN call, shared by the CPU and CUDA launchers.
//
// Semantics (persona_kernels/reference.py is the spec), for tokens t in [0, num_tokens):
//
//   x'[t]   = round_to_dtype(float(x[t]) * input_gains[p(t)])   (x'[t] = x[t] when input_gains is null)
//   h[t, c] = act(gate_up[c, 0] . x'[t]) * (gate_up[c, 1] . x'[t])        c in [0, d_ff)
//   y[t]    = sum_c keep[p(t), c / G] * scale[p(t), c] * h[t, c] * down_t[c]
//   out[t]  = y[t], or round_to_dtype(float(round_to_dtype(y[t])) + output_bias[p(t)]) with an output bias
//
// where p(t) = persona_ids[t], keep[p, g] = bit (g % 32) of keep_bits[p * num_words + g / 32],
// and scale is 1 when `scales` is null. In the style of flash-attn's Flash_fwd_params: plain
// pointers and sizes only, so the struct is the same for every torch version and device.
#pragma once

#include <cstdint>

namespace persona_kernels {

// Gate activation. Values are part of the binding ABI; append only.
enum class Activation : int32_t {
  kSilu = 0,      // z * sigmoid(z)                      (Llama, Qwen, Mistral, SmolLM)
  kGeluTanh = 1,  // 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))   (Gemma)
};

// Element type of x, gate_up, down_t and out (all four share it). Append only.
enum class DType : int32_t {
  kFloat32 = 0,
  kFloat16 = 1,   // IEEE binary16
  kBFloat16 = 2,  // bfloat16: the upper 16 bits of a float32
};

struct MaskedFFNParams {
  // Inputs (device or host pointers, as the launcher expects).
  const void* x = nullptr;               // [num_tokens, x_row_stride] of dtype, row t at x + t * x_row_stride
  const void* gate_up = nullptr;         // [d_ff, 2, d_model] of dtype, contiguous
  const void* down_t = nullptr;          // [d_ff, d_model] of dtype, contiguous
  const int32_t* persona_ids = nullptr;  // [num_tokens], each in [0, num_personas)
  const int32_t* keep_bits = nullptr;    // [num_personas, num_words] group bitmaps
  const float* scales = nullptr;         // [num_personas, d_ff] or null (all ones)
  const float* input_gains = nullptr;    // [num_personas, d_model] or null (all ones); CPU launcher only
  const float* output_bias = nullptr;    // [num_personas, d_model] or null (all zeros); CPU launcher only
  // Output, fully overwritten (never read).
  void* out = nullptr;                   // [num_tokens, out_row_stride] of dtype

  int64_t num_tokens = 0;      // T (may be 0)
  int64_t d_model = 0;         // d
  int64_t d_ff = 0;            // intermediate channels
  int64_t num_personas = 0;    // P, rows of keep_bits (and scales)
  int64_t num_words = 0;       // ceil(d_ff / group_size / 32)
  int64_t group_size = 1;      // G, divides d_ff
  int64_t x_row_stride = 0;    // elements between rows of x (>= d_model)
  int64_t out_row_stride = 0;  // elements between rows of out (>= d_model)

  Activation activation = Activation::kSilu;
  DType dtype = DType::kFloat32;
};

}  // namespace persona_kernels
