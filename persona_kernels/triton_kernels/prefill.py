"""Prefill kernels (many tokens, compute-bound): a grouped GEMM over persona segments.

Tokens are visited in persona-sorted order through ``token_order`` (a permutation; activations
are gathered by index, never copied). The sorted rows are cut into tiles of ``BLOCK_M`` rows that
never cross a persona segment (:class:`persona_kernels.step_meta.StepMeta` builds the tile
table on the device). Each persona's kept channels are a compacted list (``slot_ids``), so
weight tiles are gathered rows of the shared packed weights and no FLOP is spent on dropped
channels.

1. :func:`prefill_gate_up_kernel`: program ``(tile, channel block)`` computes
   ``h[r, j] = scale * act(x[tok(r)] @ Wg[c_j]^T) * (x[tok(r)] @ Wu[c_j]^T)`` with ``tl.dot`` and
   writes it (x's dtype) into the ``[T, d_ff]`` workspace at sorted row ``r``, compacted column ``j``.
2. :func:`prefill_down_kernel`: program ``(tile, output block)`` accumulates
   ``h[r, :K] @ down_t[c_:K]`` in fp32 over the persona's kept channels only and writes the rows
   back to their original token positions.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import activate, configs, gain_tokens, mma, output_value, round_to, time_configs


@triton.autotune(
    configs=configs(
        [
            triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        ],
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}),
    ),
    key=["d", "d_ff", "T_CLASS"],
    do_bench=time_configs,
)
@triton.jit
def prefill_gate_up_kernel(
    x_ptr, stride_xt,          # [T, d], unit column stride
    gate_up_ptr,               # [d_ff, 2, d] contiguous
    token_order_ptr,           # [T] int32: sorted row -> token
    slot_persona_ptr,          # [S] int32 persona of each slot
    slot_start_ptr,            # [S + 1] int32 first sorted row of each slot
    tile_slot_ptr, tile_start_ptr, n_tiles_ptr,  # tile table and its device-side length
    slot_ids_ptr, slot_count_ptr, n_groups,      # [S, n_groups] kept group ids per slot, [S] counts
    scales_ptr,                # [P, d_ff] fp32 (unused without HAS_SCALES)
    gains_ptr,                 # [P, d] fp32 input gains (unused without HAS_GAINS)
    h_ptr, stride_ht,          # [T, >= d_ff] workspace, x's dtype
    d, d_ff, G, T_CLASS,
    ACT: tl.constexpr, HAS_SCALES: tl.constexpr, HAS_GAINS: tl.constexpr, BF16_RNE_BY_HAND: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid ``(max_tiles, cdiv(d_ff, BLOCK_N))``; programs past the tile count or past the
    persona's kept channels exit at once. With ``HAS_GAINS`` the tile's rows are multiplied by
    their (one) persona's gains as they are loaded (fp32, rounded back to x's dtype)."""
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    if tile >= tl.load(n_tiles_ptr):
        return
    slot = tl.load(tile_slot_ptr + tile)
    n_ch = tl.load(slot_count_ptr + slot) * G
    if pid_n * BLOCK_N >= n_ch:
        return
    rows = tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_M)
    r_ok = rows < tl.load(slot_start_ptr + slot + 1)
    token = tl.load(token_order_ptr + rows, mask=r_ok, other=0)
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = j < n_ch
    group = tl.load(slot_ids_ptr + slot * n_groups + j // G, mask=j_ok, other=0)
    channel = (group * G + j % G).to(tl.int64)
    persona = tl.load(slot_persona_ptr + slot).to(tl.int64)

    x_row = x_ptr + token[:, None].to(tl.int64) * stride_xt
    w_row = gate_up_ptr + channel[None, :] * (2 * d)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < d
        xa = tl.load(x_row + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_GAINS:
            gain = tl.load(gains_ptr + persona * d + k, mask=k_ok, other=0.0)
            xa = gain_tokens(xa, gain[None, :], BF16_RNE_BY_HAND)
        w_ok = k_ok[:, None] & j_ok[None, :]
        wg = tl.load(w_row + k[:, None], mask=w_ok, other=0.0)
        wu = tl.load(w_row + d + k[:, None], mask=w_ok, other=0.0)
        acc_g = mma(xa, wg, acc_g, FP32_DOT)
        acc_u = mma(xa, wu, acc_u, FP32_DOT)

    h = activate(acc_g, ACT) * acc_u
    if HAS_SCALES:
        h *= tl.load(scales_ptr + persona * d_ff + channel, mask=j_ok, other=0.0)[None, :]
    dest = h_ptr + rows[:, None].to(tl.int64) * stride_ht + j[None, :]
    tl.store(dest, round_to(h, h_ptr.dtype.element_ty, BF16_RNE_BY_HAND), mask=r_ok[:, None] & j_ok[None, :])


@triton.autotune(
    configs=configs(
        [
            triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=5),
        ],
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}),
    ),
    key=["d", "d_ff", "T_CLASS"],
    do_bench=time_configs,
)
@triton.jit
def prefill_down_kernel(
    h_ptr, stride_ht,          # [T, >= d_ff] from prefill_gate_up_kernel
    down_ptr,                  # [d_ff, d] contiguous
    token_order_ptr, slot_persona_ptr, slot_start_ptr,
    tile_slot_ptr, tile_start_ptr, n_tiles_ptr,
    slot_ids_ptr, slot_count_ptr, n_groups,
    bias_ptr,                  # [P, d] fp32 output bias (unused without HAS_BIAS)
    out_ptr, stride_ot,        # [T, d] output, unit column stride
    d, d_ff, G, T_CLASS,
    HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, BF16_RNE_BY_HAND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid ``(max_tiles, cdiv(d, BLOCK_N))``; a persona that keeps nothing gets zero rows (plus its
    output bias with ``HAS_BIAS``, added as the rows are stored)."""
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    if tile >= tl.load(n_tiles_ptr):
        return
    slot = tl.load(tile_slot_ptr + tile)
    n_ch = tl.load(slot_count_ptr + slot) * G
    rows = tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_M)
    r_ok = rows < tl.load(slot_start_ptr + slot + 1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < d

    h_row = h_ptr + rows[:, None].to(tl.int64) * stride_ht
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_ch, BLOCK_K):
        j = k0 + tl.arange(0, BLOCK_K)
        j_ok = j < n_ch
        group = tl.load(slot_ids_ptr + slot * n_groups + j // G, mask=j_ok, other=0)
        channel = (group * G + j % G).to(tl.int64)
        hv = tl.load(h_row + j[None, :], mask=r_ok[:, None] & j_ok[None, :], other=0.0)
        w = tl.load(down_ptr + channel[:, None] * d + n[None, :], mask=j_ok[:, None] & n_ok[None, :], other=0.0)
        acc = mma(hv, w, acc, FP32_DOT)

    token = tl.load(token_order_ptr + rows, mask=r_ok, other=0)
    dest = out_ptr + token[:, None].to(tl.int64) * stride_ot + n[None, :]
    bias = 0.0
    if HAS_BIAS:
        persona = tl.load(slot_persona_ptr + slot).to(tl.int64)
        bias = tl.load(bias_ptr + persona * d + n, mask=n_ok, other=0.0)[None, :]
    tl.store(dest, output_value(acc, bias, out_ptr.dtype.element_ty, HAS_BIAS, BF16_RNE_BY_HAND),
             mask=r_ok[:, None] & n_ok[None, :])
