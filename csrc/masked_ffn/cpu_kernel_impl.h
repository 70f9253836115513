// The CPU kernel's inner loops, written once over 8-wide float vectors (GCC/Clang vector
// extensions) and compiled once per instruction set: included by masked_ffn_cpu_generic.cpp and
// by masked_ffn_cpu_avx2.cpp (after `#pragma GCC target("avx2,fma,f16c")`).
//
// The including file defines PK_RUN_BLOCKS (the exported function's name) and optionally
// PK_HAVE_AVX2_INTRINSICS. Everything else has internal linkage, so the two compilations never
// merge at link time. Include standard headers before this file, never after the target pragma.
//
// Per block (<= kBlockChannels consecutive channels kept by the same tile tokens):
//   1. for each channel, gate and up dot products with every active token (weights loaded and
//      converted once, reused across a sub-tile of tokens held in registers);
//   2. hidden = act(gate) * up * scale, into a small [channels, tokens] scratch;
//   3. acc[token] += sum_c hidden[c, token] * down_t[c], walking d in register-sized chunks so
//      each chunk of acc is loaded and stored once per block, not once per channel.

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_blocks.h"
#include "cpu_convert.h"

namespace persona_kernels {
namespace cpu {
namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

#define PK_INLINE inline __attribute__((always_inline))

PK_INLINE v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

PK_INLINE void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }

PK_INLINE v8f splat8(float s) { return v8f{s, s, s, s, s, s, s, s}; }

PK_INLINE float hsum8(v8f v) {
#ifdef PK_HAVE_AVX2_INTRINSICS
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
#else
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
#endif
}

// Element loaders. One step covers kStep weights, loaded as kVecs float vectors. bf16 steps are
// 16 weights read as eight 32-bit words: the even elements are `word << 16`, the odd ones
// `word & 0xffff0000`, two cheap integer ops instead of a widening convert per 8 weights. The
// x and accumulator rows of a bf16 call are stored in the matching order (see stored_index in cpu_blocks.h).
template <DType DT> struct Elem;

template <> struct Elem<DType::kFloat32> {
  using T = float;
  static constexpr int kVecs = 1;
  static PK_INLINE void load(const T* p, v8f* w) { w[0] = ::persona_kernels::cpu::load8(p); }
  static PK_INLINE float load1(const T* p) { return *p; }
};

template <> struct Elem<DType::kBFloat16> {
  using T = uint16_t;
  static constexpr int kVecs = 2;
  static PK_INLINE void load(const T* p, v8f* w) {
    v8u words;
    std::memcpy(&words, p, sizeof words);
    w[0] = (v8f)(words << 16);
    w[1] = (v8f)(words & 0xffff0000u);
  }
  static PK_INLINE float load1(const T* p) { return bf16_to_float(*p); }
};

template <> struct Elem<DType::kFloat16> {
  using T = uint16_t;
  static constexpr int kVecs = 1;
  static PK_INLINE void load(const T* p, v8f* w) {
#ifdef PK_HAVE_AVX2_INTRINSICS
    w[0] = (v8f)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
    for (int i = 0; i < 8; ++i) w[0][i] = fp16_to_float(p[i]);
#endif
  }
  static PK_INLINE float load1(const T* p) { return fp16_to_float(*p); }
};

PK_INLINE float activate(float z, Activation activation) {
  if (activation == Activation::kSilu) return z / (1.0f + std::exp(-z));
  const float inner = 0.7978845608028654f * (z + 0.044715f * z * z * z);
  return 0.5f * z * (1.0f + std::tanh(inner));
}

// gate[t] = g . x[t], up[t] = u . x[t] for NT tokens; U independent steps hide FMA latency.
template <DType DT, int NT, int U>
PK_INLINE void gate_up_dots(const typename Elem<DT>::T* g, const typename Elem<DT>::T* u,
                            const float* const* xs, int64_t d, float* gate, float* up) {
  constexpr int V = Elem<DT>::kVecs, S = 8 * V;
  v8f acc_g[NT][U], acc_u[NT][U];
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 8
    for (int k = 0; k < U; ++k) acc_g[t][k] = acc_u[t][k] = splat8(0.0f);
  const int64_t d_vec = d / S * S;
  int64_t j = 0;
  for (; j + S * U <= d_vec; j += S * U) {
#pragma GCC unroll 8
    for (int k = 0; k < U; ++k) {
      v8f wg[V], wu[V];
      Elem<DT>::load(g + j + S * k, wg);
      Elem<DT>::load(u + j + S * k, wu);
#pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) {
#pragma GCC unroll 2
        for (int v = 0; v < V; ++v) {
          const v8f xv = load8(xs[t] + j + S * k + 8 * v);
          acc_g[t][k] += wg[v] * xv;
          acc_u[t][k] += wu[v] * xv;
        }
      }
    }
  }
  for (; j < d_vec; j += S) {
    v8f wg[V], wu[V];
    Elem<DT>::load(g + j, wg);
    Elem<DT>::load(u + j, wu);
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) {
        const v8f xv = load8(xs[t] + j + 8 * v);
        acc_g[t][0] += wg[v] * xv;
        acc_u[t][0] += wu[v] * xv;
      }
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t) {
#pragma GCC unroll 8
    for (int k = 1; k < U; ++k) {
      acc_g[t][0] += acc_g[t][k];
      acc_u[t][0] += acc_u[t][k];
    }
    gate[t] = hsum8(acc_g[t][0]);
    up[t] = hsum8(acc_u[t][0]);
  }
  for (; j < d; ++j) {
    const float wg = Elem<DT>::load1(g + j);
    const float wu = Elem<DT>::load1(u + j);
    for (int t = 0; t < NT; ++t) {
      gate[t] += wg * xs[t][j];
      up[t] += wu * xs[t][j];
    }
  }
}

// acc[t][j : j + S U] += sum_{c < nc} hidden[c * kCpuTokenTile + t] * down[c * d + j : ...] for NT tokens.
template <DType DT, int NT, int U>
PK_INLINE void down_step(const typename Elem<DT>::T* down, int64_t d, int64_t j, int nc, const float* hidden,
                         float* const* acc) {
  constexpr int V = Elem<DT>::kVecs, S = 8 * V;
  v8f a[NT][U * V];
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 8
    for (int k = 0; k < U * V; ++k) a[t][k] = load8(acc[t] + j + 8 * k);
  for (int c = 0; c < nc; ++c) {
    v8f w[U * V];
#pragma GCC unroll 8
    for (int k = 0; k < U; ++k) Elem<DT>::load(down + c * d + j + S * k, w + V * k);
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const v8f h = splat8(hidden[c * kCpuTokenTile + t]);
#pragma GCC unroll 8
      for (int k = 0; k < U * V; ++k) a[t][k] += h * w[k];
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 8
    for (int k = 0; k < U * V; ++k) store8(acc[t] + j + 8 * k, a[t][k]);
}

// acc[t] += sum_{c < nc} hidden[c * kCpuTokenTile + t] * down[c] (rows of length d) for NT tokens.
template <DType DT, int NT, int U>
PK_INLINE void down_axpy(const typename Elem<DT>::T* down, int64_t d, int nc, const float* hidden,
                         float* const* acc) {
  constexpr int S = 8 * Elem<DT>::kVecs;
  const int64_t d_vec = d / S * S;
  int64_t j = 0;
  for (; j + S * U <= d_vec; j += S * U) down_step<DT, NT, U>(down, d, j, nc, hidden, acc);
  for (; j < d_vec; j += S) down_step<DT, NT, 1>(down, d, j, nc, hidden, acc);
  for (; j < d; ++j) {
    for (int t = 0; t < NT; ++t) {
      float s = acc[t][j];
      for (int c = 0; c < nc; ++c) s += hidden[c * kCpuTokenTile + t] * Elem<DT>::load1(down + c * d + j);
      acc[t][j] = s;
    }
  }
}

// One token, two channels: gate/up dots of channels c and c + 1 (rows g0, u0 = g0 + d, g1 = g0 + 2d,
// u1 = g0 + 3d), four weight streams in flight at once, which draws more memory bandwidth from one
// core than two.
template <DType DT>
PK_INLINE void gate_up_dots_two_channels(const typename Elem<DT>::T* g0, const float* x, int64_t d, float* out4) {
  constexpr int V = Elem<DT>::kVecs, S = 8 * V;
  v8f acc[4][2];
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = splat8(0.0f);
  const int64_t d_vec = d / S * S;
  int64_t j = 0;
  for (; j + 2 * S <= d_vec; j += 2 * S) {
#pragma GCC unroll 2
    for (int k = 0; k < 2; ++k) {
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        v8f w[V];
        Elem<DT>::load(g0 + r * d + j + S * k, w);
#pragma GCC unroll 2
        for (int v = 0; v < V; ++v) acc[r][k] += w[v] * load8(x + j + S * k + 8 * v);
      }
    }
  }
  for (; j < d_vec; j += S) {
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      v8f w[V];
      Elem<DT>::load(g0 + r * d + j, w);
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) acc[r][0] += w[v] * load8(x + j + 8 * v);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r) out4[r] = hsum8(acc[r][0] + acc[r][1]);
  for (; j < d; ++j)
    for (int r = 0; r < 4; ++r) out4[r] += Elem<DT>::load1(g0 + r * d + j) * x[j];
}

// Register tiling: tokens per sub-tile and steps per iteration, chosen so the accumulators plus
// temporaries fit in 16 vector registers and at least 4 FMA chains run in parallel.
template <DType DT, int NT>
PK_INLINE void gate_up_dots_nt(const typename Elem<DT>::T* g, const typename Elem<DT>::T* u,
                               const float* const* xs, int64_t d, float* gate, float* up) {
  gate_up_dots<DT, NT, (NT == 1 ? 4 : NT == 2 ? 2 : 1)>(g, u, xs, d, gate, up);
}

template <DType DT, int NT>
PK_INLINE void down_axpy_nt(const typename Elem<DT>::T* down, int64_t d, int nc, const float* hidden,
                            float* const* acc) {
  constexpr int V = Elem<DT>::kVecs;
  down_axpy<DT, NT, (NT * V <= 2 ? 4 / V : NT * V <= 4 ? 2 / V : 1)>(down, d, nc, hidden, acc);
}

constexpr int kDotTokens = 4;  // tokens per gate/up register sub-tile
template <DType DT>
constexpr int kAxpyTokens = 8 / Elem<DT>::kVecs;  // tokens per down register sub-tile

template <DType DT>
void run_blocks_typed(const TileArgs& args, const Block* blocks, int64_t num_blocks, float* acc, float* hidden) {
  using T = typename Elem<DT>::T;
  const int64_t d = args.d;
  const T* gate_up = static_cast<const T*>(args.gate_up);
  const T* down_t = static_cast<const T*>(args.down_t);
  for (int64_t b = 0; b < num_blocks; ++b) {
    const Block& block = blocks[b];
    const int nt = block.num_tokens;
    const float* xs[kCpuTokenTile];
    float* accs[kCpuTokenTile];
    for (int i = 0; i < nt; ++i) {
      xs[i] = args.x + block.tokens[i] * d;
      accs[i] = acc + block.tokens[i] * d;
    }
    int c = 0;
    if (nt == 1) {
      for (; c + 2 <= block.num_channels; c += 2) {
        float dots[4];  // gate c, up c, gate c + 1, up c + 1
        gate_up_dots_two_channels<DT>(gate_up + (block.c0 + c) * 2 * d, xs[0], d, dots);
        for (int k = 0; k < 2; ++k) {
          float h = activate(dots[2 * k], args.activation) * dots[2 * k + 1];
          if (args.scales != nullptr) h *= args.scales[args.personas[block.tokens[0]] * args.d_ff + block.c0 + c + k];
          hidden[(c + k) * kCpuTokenTile] = h;
        }
      }
    }
    for (; c < block.num_channels; ++c) {
      const int64_t channel = block.c0 + c;
      const T* g = gate_up + channel * 2 * d;
      const T* u = g + d;
      float* gate = hidden + c * kCpuTokenTile;  // holds the gate, then the hidden value
      float up[kCpuTokenTile];
      for (int i = 0; i < nt; i += kDotTokens) {
        switch (nt - i < kDotTokens ? nt - i : kDotTokens) {
          case 1: gate_up_dots_nt<DT, 1>(g, u, xs + i, d, gate + i, up + i); break;
          case 2: gate_up_dots_nt<DT, 2>(g, u, xs + i, d, gate + i, up + i); break;
          case 3: gate_up_dots_nt<DT, 3>(g, u, xs + i, d, gate + i, up + i); break;
          default: gate_up_dots_nt<DT, 4>(g, u, xs + i, d, gate + i, up + i); break;
        }
      }
      for (int i = 0; i < nt; ++i) {
        float h = activate(gate[i], args.activation) * up[i];
        if (args.scales != nullptr) h *= args.scales[args.personas[block.tokens[i]] * args.d_ff + channel];
        gate[i] = h;
      }
    }
    const T* down = down_t + block.c0 * d;
    const int nc = block.num_channels;
    constexpr int kTokens = kAxpyTokens<DT>;
    for (int i = 0; i < nt; i += kTokens) {
      switch (nt - i < kTokens ? nt - i : kTokens) {
        case 1: down_axpy_nt<DT, (1 < kTokens ? 1 : kTokens)>(down, d, nc, hidden + i, accs + i); break;
        case 2: down_axpy_nt<DT, (2 < kTokens ? 2 : kTokens)>(down, d, nc, hidden + i, accs + i); break;
        case 3: down_axpy_nt<DT, (3 < kTokens ? 3 : kTokens)>(down, d, nc, hidden + i, accs + i); break;
        case 4: down_axpy_nt<DT, (4 < kTokens ? 4 : kTokens)>(down, d, nc, hidden + i, accs + i); break;
        case 5: down_axpy_nt<DT, (5 < kTokens ? 5 : kTokens)>(down, d, nc, hidden + i, accs + i); break;
        case 6: down_axpy_nt<DT, (6 < kTokens ? 6 : kTokens)>(down, d, nc, hidden + i, accs + i); break;
        case 7: down_axpy_nt<DT, (7 < kTokens ? 7 : kTokens)>(down, d, nc, hidden + i, accs + i); break;
        default: down_axpy_nt<DT, kTokens>(down, d, nc, hidden + i, accs + i); break;
      }
    }
  }
}

}  // namespace

void PK_RUN_BLOCKS(const TileArgs& args, const Block* blocks, int64_t num_blocks, float* acc, float* hidden) {
  switch (args.dtype) {
    case DType::kFloat32: run_blocks_typed<DType::kFloat32>(args, blocks, num_blocks, acc, hidden); break;
    case DType::kFloat16: run_blocks_typed<DType::kFloat16>(args, blocks, num_blocks, acc, hidden); break;
    case DType::kBFloat16: run_blocks_typed<DType::kBFloat16>(args, blocks, num_blocks, acc, hidden); break;
  }
}

}  // namespace cpu
}  // namespace persona_kernels
