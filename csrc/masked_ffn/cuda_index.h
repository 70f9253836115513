// Launchers of the dtype-independent index kernels (masked_ffn_cuda_index.cu): they turn
// persona ids and bitmaps into device-side work lists of fixed capacity.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "masked_ffn_cuda.h"

namespace persona_kernels {
namespace cuda_detail {

// union_groups[0 .. *union_count) = sorted ids of the groups kept by at least one token's
// persona (ids outside [0, num_personas) keep nothing). union_groups holds n_groups ints.
CudaStatus launch_union_groups(const int32_t* persona_ids, int num_tokens, const int32_t* keep_bits,
                               int num_personas, int num_words, int n_groups, int32_t* union_groups,
                               int32_t* union_count, cudaStream_t stream, std::string* error);

// Counting sort of tokens by persona (slot num_personas collects out-of-range ids):
// perm[sorted row] = token, and tiles[0 .. *tile_count) = int4 (persona, first sorted row,
// rows <= tile_rows, 0), each persona's rows split into tiles of at most tile_rows.
// counts and cursor hold num_personas + 1 ints; tiles holds the capacity of cuda_workspace.h.
CudaStatus launch_sort_tokens(const int32_t* persona_ids, int num_tokens, int num_personas, int tile_rows,
                              int32_t* counts, int32_t* cursor, int32_t* perm, int4* tiles,
                              int32_t* tile_count, cudaStream_t stream, std::string* error);

}  // namespace cuda_detail
}  // namespace persona_kernels
