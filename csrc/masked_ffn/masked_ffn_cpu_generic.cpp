// The CPU kernel's inner loops for the compiler's baseline instruction set (any CPU).
#include <cmath>
#include <cstdint>
#include <cstring>

#define PK_RUN_BLOCKS run_blocks_generic
#include "cpu_kernel_impl.h"
