// CPU entry points of the masked gated FFN (semantics: masked_ffn_params.h).
// The CUDA launchers are declared separately in masked_ffn_cuda.h.
#pragma once

#include "masked_ffn_params.h"

namespace persona_kernels {

// Instruction set of the CPU kernel's inner loops.
enum class CpuIsa : int32_t {
  kAuto = 0,     // the best one this CPU supports
  kGeneric = 1,  // portable code (whatever the compiler's baseline vectorises to)
  kAvx2 = 2,     // x86-64 AVX2 + FMA + F16C
};

// True when `isa` can run on this CPU in this build (kAuto always can).
bool cpu_isa_supported(CpuIsa isa);

// Name ("avx2", "generic") of the instruction set kAuto resolves to.
const char* cpu_isa_name(CpuIsa isa);

// Computes params.out on the host. Decode-oriented: the union of the batch's kept groups is
// walked once (weights outer, tokens inner), split over `num_threads` OpenMP threads
// (0 = OpenMP's default), each accumulating a private fp32 partial output that is then summed.
// Tokens are processed in tiles of kCpuTokenTile, so weights stream once per tile.
// Preconditions (checked by the bindings, not here): the params describe valid buffers,
// persona ids are in range, group_size divides d_ff. Thread-safe: calls may run concurrently.
void masked_ffn_cpu(const MaskedFFNParams& params, int num_threads = 0, CpuIsa isa = CpuIsa::kAuto);

// Tokens per tile of the CPU kernel.
constexpr int kCpuTokenTile = 16;

}  // namespace persona_kernels
