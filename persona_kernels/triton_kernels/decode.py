"""Decode kernels (1 to ~128 tokens, memory-bound): stream the union of the batch's kept groups once.

Three launches, each reading its weights once per token block:

1. :func:`decode_gate_up_kernel`: for a chunk of union channels (weights outer) and a block of
   tokens (tokens inner), ``h[t, j] = scale[p(t), c_j] * act(x[t] . Wg[c_j]) * (x[t] . Wu[c_j])``
   where ``c_j`` is the ``j``-th kept channel of the union; where the token's persona lacks
   ``c_j``'s group, ``h[t, j]`` is selected to be exactly 0, so nothing of that channel (an inf or
   NaN scale included) reaches the output. ``h`` is ``[T, d_ff]`` in x's dtype, columns past the
   union unused.
2. :func:`decode_down_kernel`: split-K over the union channels: program ``(t-block, d-tile, split)``
   accumulates ``h[:, slice] @ down_t[c_slice, d-tile]`` in fp32 and stores the partial
   ``[S, T, d]`` (or, with one split, the final output directly).
3. :func:`reduce_splits_kernel`: sums the ``S`` partials in a fixed order (deterministic, so CUDA
   graph replays are bitwise equal) and casts to the output dtype.

With input gains and more than 16 tokens, the launcher multiplies the tokens by their gains once
beforehand (the gate/up kernel fuses the gains only for small token blocks).

Union ids and their count are read from device memory (:class:`persona_kernels.step_meta.StepMeta`),
so a captured graph stays valid when the batch's personas change.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import INTERPRET, activate, configs, gain_tokens, mma, output_value, round_to, time_configs

DOWN_BLOCK_D = 32 if INTERPRET else 128
"""Output columns per program of the down kernel (fixed: the launcher sizes the split count by it)."""


@triton.autotune(
    configs=configs(
        [  # the first one fits every dtype and token block on sm_90 (the single config without autotuning)
            triton.Config({"BLOCK_C": 32, "BLOCK_D": 128}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_C": 16, "BLOCK_D": 256}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_C": 32, "BLOCK_D": 256}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_C": 64, "BLOCK_D": 128}, num_warps=8, num_stages=3),
        ],
        triton.Config({"BLOCK_C": 32, "BLOCK_D": 32}),
    ),
    key=["d", "d_ff", "BLOCK_T"],
    do_bench=time_configs,
)
@triton.jit
def decode_gate_up_kernel(
    x_ptr, stride_xt,          # [T, d], unit column stride
    gate_up_ptr,               # [d_ff, 2, d] contiguous
    token_ids_ptr,             # [T] int32 persona of each token
    bits_ptr, n_words,         # [P, n_words] int32 group bitmaps
    scales_ptr,                # [P, d_ff] fp32 (unused without HAS_SCALES)
    gains_ptr,                 # [P, d] fp32 input gains (unused without HAS_GAINS)
    union_ids_ptr,             # [n_groups] int32, first union_count entries are the union
    union_count_ptr,           # [1] int32
    h_ptr, stride_ht,          # [T, >= d_ff] workspace, x's dtype
    T, d, d_ff, G,
    ACT: tl.constexpr, HAS_SCALES: tl.constexpr, HAS_GAINS: tl.constexpr, BF16_RNE_BY_HAND: tl.constexpr,
    FP32_DOT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(cdiv(T, BLOCK_T), cdiv(d_ff, BLOCK_C))``; token blocks vary fastest so programs
    sharing a weight chunk run together and re-reads hit L2. With ``HAS_GAINS`` each token is
    multiplied by its persona's gains as it is loaded (fp32, rounded back to x's dtype)."""
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_ch = tl.load(union_count_ptr) * G
    if pid_c * BLOCK_C >= n_ch:
        return
    j = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    j_ok = j < n_ch
    group = tl.load(union_ids_ptr + j // G, mask=j_ok, other=0)
    channel = (group * G + j % G).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    t_row = t.to(tl.int64)  # row offsets in int64: a strided x (a slice of a larger tensor) passes 2^31 elements
    persona = tl.load(token_ids_ptr + t, mask=t_ok, other=0)

    w_row = gate_up_ptr + channel[None, :] * (2 * d)
    acc_g = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_D):
        k = k0 + tl.arange(0, BLOCK_D)
        k_ok = k < d
        xa = tl.load(x_ptr + t_row[:, None] * stride_xt + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_GAINS:
            gain = tl.load(gains_ptr + persona[:, None].to(tl.int64) * d + k[None, :],
                           mask=t_ok[:, None] & k_ok[None, :], other=0.0)
            xa = gain_tokens(xa, gain, BF16_RNE_BY_HAND)
        w_ok = k_ok[:, None] & j_ok[None, :]
        wg = tl.load(w_row + k[:, None], mask=w_ok, other=0.0)
        wu = tl.load(w_row + d + k[:, None], mask=w_ok, other=0.0)
        acc_g = mma(xa, wg, acc_g, FP32_DOT)
        acc_u = mma(xa, wu, acc_u, FP32_DOT)

    word = tl.load(bits_ptr + persona[:, None] * n_words + (group >> 5)[None, :])
    kept = ((word >> (group & 31)[None, :]) & 1) != 0
    h = activate(acc_g, ACT) * acc_u
    if HAS_SCALES:  # dropped channels' scales are never read
        s_ok = kept & t_ok[:, None] & j_ok[None, :]
        h *= tl.load(scales_ptr + persona[:, None].to(tl.int64) * d_ff + channel[None, :], mask=s_ok, other=0.0)
    h = tl.where(kept, h, 0.0)  # a select, not a product: exactly 0 even where h overflowed
    tl.store(h_ptr + t_row[:, None] * stride_ht + j[None, :], round_to(h, h_ptr.dtype.element_ty, BF16_RNE_BY_HAND),
             mask=t_ok[:, None] & j_ok[None, :])


@triton.autotune(
    configs=configs(
        [
            triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_K": 128}, num_warps=8, num_stages=3),
        ],
        triton.Config({"BLOCK_K": 32}),
    ),
    key=["d", "d_ff", "BLOCK_T"],
    do_bench=time_configs,
)
@triton.jit
def decode_down_kernel(
    h_ptr, stride_ht,          # [T, >= d_ff] from decode_gate_up_kernel
    down_ptr,                  # [d_ff, d] contiguous
    union_ids_ptr, union_count_ptr,
    part_ptr,                  # [S, T, d] fp32 partials (SPLIT) or [T, d] output rows (not SPLIT)
    stride_pt,                 # row stride of part_ptr
    token_ids_ptr,             # [T] int32 persona of each token (read with HAS_BIAS)
    bias_ptr,                  # [P, d] fp32 output bias (unused without HAS_BIAS)
    T, d, d_ff, G,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, BF16_RNE_BY_HAND: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid ``(cdiv(T, BLOCK_T), cdiv(d, BLOCK_D), S)``; split ``s`` owns an equal slice of union channels.
    Without ``SPLIT`` the rows are the output, the bias (``HAS_BIAS``) added as they are stored; with it
    ``reduce_splits_kernel`` adds it."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_ch = tl.load(union_count_ptr) * G
    per_split = tl.cdiv(tl.cdiv(n_ch, BLOCK_K), tl.num_programs(2)) * BLOCK_K
    lo = pid_s * per_split
    hi = tl.minimum(lo + per_split, n_ch)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    t_row = t.to(tl.int64)
    n = pid_n * BLOCK_D + tl.arange(0, BLOCK_D)
    n_ok = n < d

    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k0 in range(lo, hi, BLOCK_K):
        j = k0 + tl.arange(0, BLOCK_K)
        j_ok = j < hi
        group = tl.load(union_ids_ptr + j // G, mask=j_ok, other=0)
        channel = (group * G + j % G).to(tl.int64)
        hv = tl.load(h_ptr + t_row[:, None] * stride_ht + j[None, :], mask=t_ok[:, None] & j_ok[None, :], other=0.0)
        w = tl.load(down_ptr + channel[:, None] * d + n[None, :], mask=j_ok[:, None] & n_ok[None, :], other=0.0)
        acc = mma(hv, w, acc, FP32_DOT)

    dest = part_ptr + t_row[:, None] * stride_pt + n[None, :]
    store_ok = t_ok[:, None] & n_ok[None, :]
    if SPLIT:
        dest += pid_s.to(tl.int64) * T * d
        tl.store(dest, acc, mask=store_ok)  # fp32 partials
    else:
        bias = 0.0
        if HAS_BIAS:
            persona = tl.load(token_ids_ptr + t, mask=t_ok, other=0)
            bias = tl.load(bias_ptr + persona[:, None].to(tl.int64) * d + n[None, :], mask=store_ok, other=0.0)
        tl.store(dest, output_value(acc, bias, part_ptr.dtype.element_ty, HAS_BIAS, BF16_RNE_BY_HAND), mask=store_ok)


@triton.jit
def reduce_splits_kernel(
    part_ptr,                  # [S, T, d] fp32
    out_ptr, stride_ot,        # [T, d] output, unit column stride
    token_ids_ptr,             # [T] int32 persona of each token (read with HAS_BIAS)
    bias_ptr,                  # [P, d] fp32 output bias (unused without HAS_BIAS)
    T, d, S,
    HAS_BIAS: tl.constexpr, BF16_RNE_BY_HAND: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid ``(cdiv(T * d, BLOCK),)``: ``out = sum_s part[s]`` in split order, cast to out's dtype
    (plus the token's persona's output bias with ``HAS_BIAS``)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < T * d
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, S):
        acc += tl.load(part_ptr + s * T * d + offs, mask=ok, other=0.0)
    row, col = offs // d, offs % d
    bias = 0.0
    if HAS_BIAS:
        persona = tl.load(token_ids_ptr + row, mask=ok, other=0)
        bias = tl.load(bias_ptr + persona.to(tl.int64) * d + col, mask=ok, other=0.0)
    tl.store(out_ptr + row.to(tl.int64) * stride_ot + col,
             output_value(acc, bias, out_ptr.dtype.element_ty, HAS_BIAS, BF16_RNE_BY_HAND), mask=ok)
