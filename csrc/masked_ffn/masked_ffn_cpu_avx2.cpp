// The CPU kernel's inner loops for x86-64 with AVX2, FMA and F16C, chosen at run time.
// Standard headers come first: only this file's own code is compiled for the AVX2 target, so no
// inline library code built for AVX2 can leak into the generic path through the linker.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_blocks.h"
#include "cpu_convert.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define PK_HAVE_AVX2_INTRINSICS 1
#define PK_RUN_BLOCKS run_blocks_avx2
#include "cpu_kernel_impl.h"
#pragma GCC pop_options

bool persona_kernels::cpu::avx2_compiled() { return true; }
#else
void persona_kernels::cpu::run_blocks_avx2(const TileArgs&, const Block*, int64_t, float*, float*) {}
bool persona_kernels::cpu::avx2_compiled() { return false; }
#endif
