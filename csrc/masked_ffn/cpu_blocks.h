// Internal interface between the CPU planner (masked_ffn_cpu.cpp) and the per-ISA inner loops
// (masked_ffn_cpu_avx2.cpp, masked_ffn_cpu_generic.cpp). Plain structs only: the per-ISA
// translation units are compiled with different target flags and must not share inline STL code.
#pragma once

#include <cstdint>

#include "masked_ffn.h"

namespace persona_kernels {
namespace cpu {

// Most channels one block covers; a block lies inside one run of groups that the same tokens keep.
constexpr int kBlockChannels = 16;

// A run of consecutive kept channels and the tile tokens (indices into the tile) that keep them.
struct Block {
  int64_t c0;
  int32_t num_channels;
  int32_t num_tokens;
  int32_t tokens[kCpuTokenTile];
};

// What every block of one token tile shares.
struct TileArgs {
  const void* gate_up;          // [d_ff, 2, d]
  const void* down_t;           // [d_ff, d]
  const float* scales;          // [P, d_ff] or null
  const float* x;               // [tile tokens, d] fp32 copy of the tile's tokens
  const int32_t* personas;      // [tile tokens]
  int64_t d;
  int64_t d_ff;
  Activation activation;
  DType dtype;
};

// Where element j of a token's x or accumulator row is stored. bf16 rows are split into steps of
// 16 elements stored even elements first, then odd ones, the order in which the kernel widens
// bf16 weights; the last d % 16 elements, and every element of other dtypes, stay in place.
inline int64_t stored_index(int64_t j, int64_t d, DType dtype) {
  if (dtype != DType::kBFloat16 || j >= d / 16 * 16) return j;
  const int64_t r = j & 15;
  return (j - r) + (r & 1) * 8 + (r >> 1);
}

// Accumulates the blocks' contributions into acc ([tile tokens, d] fp32, row stride d).
// hidden is scratch of kBlockChannels * kCpuTokenTile floats.
void run_blocks_generic(const TileArgs& args, const Block* blocks, int64_t num_blocks, float* acc, float* hidden);
void run_blocks_avx2(const TileArgs& args, const Block* blocks, int64_t num_blocks, float* acc, float* hidden);
bool avx2_compiled();

}  // namespace cpu
}  // namespace persona_kernels
