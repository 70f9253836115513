// Where each device buffer of a CUDA call lives inside the caller's workspace.
// A function of the sizes and path only, so one workspace serves every step of equal shape
// (fixed addresses: what CUDA-graph capture needs).
#pragma once

#include <cstddef>
#include <cstdint>

#include "masked_ffn_cuda.h"

namespace persona_kernels {
namespace cuda_detail {

// Token rows per prefill tile (the M of the grouped GEMM).
constexpr int kPrefillTileRows = 64;

struct WorkspaceLayout {
  // Decode path.
  size_t union_groups = 0;  // int32 [n_groups]: sorted union of the batch's kept groups
  size_t union_count = 0;   // int32 [1]: its length (device-side)
  size_t hidden = 0;        // fp32 [d_ff, T]: h for union channel u at hidden[u * T + t]
  size_t accum = 0;         // fp32 [T, d]: split-K accumulation of the output
  // Prefill path.
  size_t counts = 0;        // int32 [P + 1]: tokens per persona (slot P: out-of-range ids)
  size_t cursor = 0;        // int32 [P + 1]: segment starts, then scatter cursors
  size_t perm = 0;          // int32 [T]: token at each sorted position
  size_t tiles = 0;         // int4 [tile_capacity]: (persona, first sorted row, rows, 0)
  size_t tile_count = 0;    // int32 [1]
  size_t hidden_lowp = 0;   // dtype [T, d_ff]: h of sorted row r, kept channel k at [r * d_ff + k]
  size_t tile_capacity = 0;
  size_t total = 0;         // bytes
};

inline size_t dtype_bytes(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

inline size_t align_up(size_t n) { return (n + 255) / 256 * 256; }

// Offsets (bytes from the workspace start, each 256-aligned) for `path` (kDecode or kPrefill).
inline WorkspaceLayout plan_workspace(const MaskedFFNParams& p, CudaPath path) {
  WorkspaceLayout w;
  const size_t T = static_cast<size_t>(p.num_tokens), d = static_cast<size_t>(p.d_model);
  const size_t d_ff = static_cast<size_t>(p.d_ff), P = static_cast<size_t>(p.num_personas);
  size_t at = 0;
  auto take = [&at](size_t bytes) {
    const size_t offset = at;
    at += align_up(bytes);
    return offset;
  };
  if (T == 0 || d == 0 || d_ff == 0) return w;
  if (path == CudaPath::kDecode) {
    const size_t n_groups = d_ff / static_cast<size_t>(p.group_size);
    w.union_groups = take(4 * n_groups);
    w.union_count = take(4);
    w.hidden = take(4 * d_ff * T);
    w.accum = take(4 * T * d);
  } else {
    const size_t rows = static_cast<size_t>(kPrefillTileRows);
    w.tile_capacity = (T + rows - 1) / rows + (P + 1 < T ? P + 1 : T);
    w.counts = take(4 * (P + 1));
    w.cursor = take(4 * (P + 1));
    w.perm = take(4 * T);
    w.tiles = take(16 * w.tile_capacity);
    w.tile_count = take(4);
    w.hidden_lowp = take(dtype_bytes(p.dtype) * T * d_ff);
  }
  w.total = at;
  return w;
}

}  // namespace cuda_detail
}  // namespace persona_kernels
