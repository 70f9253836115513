// CPU masked gated FFN: plans the work of each token tile (which channels which tokens keep),
// splits it over OpenMP threads, and reduces the threads' fp32 partial outputs.
// The arithmetic lives in cpu_kernel_impl.h, compiled once per instruction set.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_blocks.h"
#include "cpu_convert.h"
#include "masked_ffn.h"

namespace persona_kernels {
namespace {

using cpu::Block;
using cpu::TileArgs;
using RunBlocks = void (*)(const TileArgs&, const Block*, int64_t, float*, float*);

bool cpu_has_avx2() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  return cpu::avx2_compiled() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

CpuIsa resolve_isa(CpuIsa isa) {
  if (isa != CpuIsa::kAuto) return isa;
  static const bool has_avx2 = cpu_has_avx2();
  return has_avx2 ? CpuIsa::kAvx2 : CpuIsa::kGeneric;
}

float load_scalar(const void* base, int64_t i, DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(base)[i];
    case DType::kFloat16: return cpu::fp16_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::kBFloat16: return cpu::bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  }
  return 0.0f;
}

void store_scalar(void* base, int64_t i, float value, DType dtype) {
  switch (dtype) {
    case DType::kFloat32: static_cast<float*>(base)[i] = value; break;
    case DType::kFloat16: static_cast<uint16_t*>(base)[i] = cpu::float_to_fp16(value); break;
    case DType::kBFloat16: static_cast<uint16_t*>(base)[i] = cpu::float_to_bf16(value); break;
  }
}

// What the reference does to a gained token: the fp32 product, rounded to the tokens' dtype.
float round_to_dtype(float value, DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return value;
    case DType::kFloat16: return cpu::fp16_to_float(cpu::float_to_fp16(value));
    case DType::kBFloat16: return cpu::bf16_to_float(cpu::float_to_bf16(value));
  }
  return value;
}

// Bit mask over the tile's tokens of those whose persona keeps group g.
uint32_t tokens_keeping(const MaskedFFNParams& p, const int32_t* personas, int num_tokens, int64_t g) {
  uint32_t mask = 0;
  const int64_t word = g >> 5;
  const int bit = static_cast<int>(g & 31);
  for (int i = 0; i < num_tokens; ++i) {
    const uint32_t bits = static_cast<uint32_t>(p.keep_bits[personas[i] * p.num_words + word]);
    mask |= ((bits >> bit) & 1u) << i;
  }
  return mask;
}

// Runs of consecutive groups kept by the same tokens, cut into blocks of <= kBlockChannels channels.
void plan_blocks(const MaskedFFNParams& p, const int32_t* personas, int num_tokens, std::vector<Block>& blocks) {
  blocks.clear();
  const int64_t num_groups = p.d_ff / p.group_size;
  int64_t g = 0;
  while (g < num_groups) {
    const uint32_t mask = tokens_keeping(p, personas, num_tokens, g);
    int64_t end = g + 1;
    while (end < num_groups && tokens_keeping(p, personas, num_tokens, end) == mask) ++end;
    if (mask != 0) {
      Block block{};
      for (int i = 0; i < num_tokens; ++i)
        if ((mask >> i) & 1u) block.tokens[block.num_tokens++] = i;
      for (int64_t c = g * p.group_size; c < end * p.group_size; c += cpu::kBlockChannels) {
        block.c0 = c;
        block.num_channels = static_cast<int32_t>(std::min<int64_t>(cpu::kBlockChannels, end * p.group_size - c));
        blocks.push_back(block);
      }
    }
    g = end;
  }
}

}  // namespace

bool cpu_isa_supported(CpuIsa isa) {
  if (isa == CpuIsa::kAvx2) return cpu_has_avx2();
  return isa == CpuIsa::kAuto || isa == CpuIsa::kGeneric;
}

const char* cpu_isa_name(CpuIsa isa) { return resolve_isa(isa) == CpuIsa::kAvx2 ? "avx2" : "generic"; }

void masked_ffn_cpu(const MaskedFFNParams& p, int num_threads, CpuIsa isa) {
  const int64_t T = p.num_tokens, d = p.d_model;
  if (T <= 0) return;
  const RunBlocks run_blocks = resolve_isa(isa) == CpuIsa::kAvx2 ? cpu::run_blocks_avx2 : cpu::run_blocks_generic;
#ifdef _OPENMP
  if (num_threads <= 0) num_threads = omp_get_max_threads();
  num_threads = std::min(num_threads, std::max(omp_get_num_procs(), omp_get_max_threads()));  // scratch scales with it
#else
  num_threads = 1;
#endif
  const int64_t tile = std::min<int64_t>(T, kCpuTokenTile);
  // Scratch reused across calls by this calling thread: [tile, d] fp32 x, and per worker thread
  // a [tile, d] accumulator plus the hidden-value scratch.
  thread_local std::vector<float> x_tile, acc, hidden;
  thread_local std::vector<Block> blocks;
  x_tile.resize(tile * d);
  acc.resize(static_cast<size_t>(num_threads) * tile * d);
  hidden.resize(static_cast<size_t>(num_threads) * cpu::kBlockChannels * kCpuTokenTile);

  for (int64_t t0 = 0; t0 < T; t0 += kCpuTokenTile) {
    const int nt = static_cast<int>(std::min<int64_t>(kCpuTokenTile, T - t0));
    const int32_t* personas = p.persona_ids + t0;
    plan_blocks(p, personas, nt, blocks);
    const int workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, blocks.size())));
    // Blocks are dealt out dynamically in chunks (about 8 per thread), so a thread that the OS
    // preempts, or that drew denser blocks, does not hold the others at the barrier.
    const int64_t num_blocks = static_cast<int64_t>(blocks.size());
    const int64_t chunk = std::max<int64_t>(1, num_blocks / (8 * workers));
    const int64_t num_chunks = (num_blocks + chunk - 1) / chunk;
    for (int i = 0; i < nt; ++i) {
      float* const row = x_tile.data() + static_cast<int64_t>(i) * d;
      const int64_t x_offset = (t0 + i) * p.x_row_stride;
      if (p.input_gains == nullptr) {
        for (int64_t j = 0; j < d; ++j) row[cpu::stored_index(j, d, p.dtype)] = load_scalar(p.x, x_offset + j, p.dtype);
      } else {
        const float* const gains = p.input_gains + static_cast<int64_t>(personas[i]) * d;
        for (int64_t j = 0; j < d; ++j)
          row[cpu::stored_index(j, d, p.dtype)] = round_to_dtype(load_scalar(p.x, x_offset + j, p.dtype) * gains[j], p.dtype);
      }
    }
    const TileArgs args{p.gate_up, p.down_t, p.scales, x_tile.data(), personas, d, p.d_ff, p.activation, p.dtype};
    float* const acc_base = acc.data();
    float* const hidden_base = hidden.data();
    const Block* const block_base = blocks.data();
    // Threads that actually ran: OpenMP may give a smaller team than asked (OMP_THREAD_LIMIT,
    // OMP_DYNAMIC, a caller's outer parallel region), and only their slices are zeroed.
    int team = 1;

#ifdef _OPENMP
#pragma omp parallel num_threads(workers)
#endif
    {
#ifdef _OPENMP
      const int k = omp_get_thread_num();
      if (k == 0) team = omp_get_num_threads();
#else
      const int k = 0;
#endif
      float* my_acc = acc_base + static_cast<int64_t>(k) * nt * d;
      std::memset(my_acc, 0, sizeof(float) * nt * d);
      float* const my_hidden = hidden_base + static_cast<int64_t>(k) * cpu::kBlockChannels * kCpuTokenTile;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1) nowait
#endif
      for (int64_t c = 0; c < num_chunks; ++c) {
        const int64_t first = c * chunk;
        run_blocks(args, block_base + first, std::min(chunk, num_blocks - first), my_acc, my_hidden);
      }
    }
    // The calling thread sums the partials: one fork and one join per tile, no inner barrier
    // (barriers dominate decode latency when cores are shared with other processes).
    for (int i = 0; i < nt; ++i) {
      for (int64_t j = 0; j < d; ++j) {
        const int64_t stored = static_cast<int64_t>(i) * d + cpu::stored_index(j, d, p.dtype);
        float sum = acc_base[stored];
        for (int w = 1; w < team; ++w) sum += acc_base[static_cast<int64_t>(w) * nt * d + stored];
        if (p.output_bias != nullptr)  // the reference adds the bias to the rounded output
          sum = round_to_dtype(sum, p.dtype) + p.output_bias[static_cast<int64_t>(personas[i]) * d + j];
        store_scalar(p.out, (t0 + i) * p.out_row_stride + j, sum, p.dtype);
      }
    }
  }
}

}  // namespace persona_kernels
