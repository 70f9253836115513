"""The ``triton`` backend: decode and prefill Triton kernels behind one launcher.

:func:`masked_ffn` is the backend contract used by :mod:`persona_kernels.ops`;
:func:`masked_ffn_triton` is the full launcher for callers that keep persistent buffers
(a :class:`~persona_kernels.step_meta.StepMeta` and an ``out`` tensor) across steps, e.g. under
CUDA graphs. Kernels run on CUDA tensors, or on CPU tensors through the Triton interpreter
(``TRITON_INTERPRET=1`` set before Triton is imported).
"""

from __future__ import annotations

import contextlib

import torch

from ..masks import num_words
from ..contract import output_buffer
from ..reference import ACTIVATIONS, apply_input_gains
from ..step_meta import StepMeta, max_tiles

try:
    import triton

    from ..triton_kernels import decode, prefill
    from ..triton_kernels.common import ACTIVATION_CODES, INTERPRET

    _IMPORT_ERROR = ""
except ImportError as error:  # triton missing or incompatible
    triton = None
    INTERPRET = False
    _IMPORT_ERROR = str(error)

FUSES_INPUT_GAINS = True  # the backend applies the gains itself (in the kernels, or one pre-pass for large decode blocks)
FUSES_OUTPUT_BIAS = True  # and adds the output bias as the output is stored (down kernel or split reduction)

PATHS = ("decode", "prefill")
DECODE_MAX_TOKENS = 64
"""Token counts up to this always take the decode path."""
DECODE_MAX_MIXED_TOKENS = 1024
"""Up to this many tokens, decode is kept while the average persona segment is under 16 tokens."""
PREFILL_BLOCK_M = 16 if INTERPRET else 64
"""Prefill tile rows of the metadata built on the fly (small under the interpreter to cover tiling)."""
DECODE_FUSED_GAINS_MAX_BLOCK_T = 16
"""The largest decode token block whose gate/up kernel may fuse the gains (the variants
``compile_check`` builds): each program re-loads a ``[BLOCK_T, d]`` fp32 gains tile, more bytes than
its own weight chunk once ``BLOCK_T`` passes ``BLOCK_C``, and on sm_90 no fp32 config fits at 64."""
DECODE_FUSED_GAINS_MAX_TOKENS = 4
"""Decode multiplies tokens by their gains inside the gate/up kernel up to this many tokens; above
it the tokens are multiplied once beforehand (``reference.apply_input_gains``, the same rounding).
Measured on an H200 (benchmarks/RESULTS.md, 8B FFN, bf16, graph replay): fused, the gains cost
+5-6% at 1 and 4 tokens but +38-53% at 16 (every program re-reads the tile); the separate pass
costs +12-23% at 32 and 64 tokens."""
REDUCE_SPLITS_BLOCK = 1024
"""Elements per program of ``reduce_splits_kernel``."""


def is_available() -> bool:
    """True when Triton imports and there is a GPU, or the interpreter is switched on."""
    return triton is not None and (INTERPRET or torch.cuda.is_available())


def unavailable_reason() -> str:
    """Why the backend cannot run here, with the fix."""
    if triton is None:
        return f"triton did not import ({_IMPORT_ERROR}); `pip install triton`"
    return "no CUDA device; set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU (slowly)"


def choose_path(n_tokens: int, n_personas: int) -> str:
    """Pick ``"decode"`` or ``"prefill"`` from host-known sizes only (no sync, graph-safe).

    Decode streams the union of kept groups once and masks per token: best while few tokens
    share each weight byte. Prefill runs a grouped GEMM per persona segment: best once segments
    are long. The batch's distinct persona count lives on the device, so ``min(P, T)`` bounds it.
    """
    if n_tokens <= DECODE_MAX_TOKENS:
        return "decode"
    if n_tokens <= DECODE_MAX_MIXED_TOKENS and n_tokens < 16 * min(n_personas, n_tokens):
        return "decode"
    return "prefill"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def _token_block(n_tokens: int) -> int:
    """Decode token block: a power of two in [16, 64] (``tl.dot`` needs 16 rows)."""
    return min(64, max(16, triton.next_power_of_2(n_tokens)))


def _t_class(n_tokens: int) -> int:
    """Coarse token-count bucket for the prefill autotuning key."""
    return 0 if n_tokens < 512 else 1 if n_tokens < 4096 else 2


def _precision_flags(dtype: torch.dtype) -> dict[str, bool]:
    """Constexprs that depend on the dtype: exact fp32 dots (fp32, and bf16 under the interpreter,
    whose bf16 ``tl.dot`` is wrong) and round-to-nearest-even bf16 casts by hand (the interpreter
    truncates) for every rounding the contract has: gained tokens, ``h``, the output."""
    interpreted_bf16 = INTERPRET and dtype == torch.bfloat16
    return {"FP32_DOT": dtype == torch.float32 or interpreted_bf16, "BF16_RNE_BY_HAND": interpreted_bf16}


def _run_decode(x, gate_up, down_t, bits, scales, gains, bias, group_size, act, meta, layer, out) -> None:
    T, d = x.shape
    d_ff = gate_up.shape[0]
    flags = _precision_flags(x.dtype)
    block_t = _token_block(T)
    t_blocks = triton.cdiv(T, block_t)
    union_ids, union_count = meta.union_ids[layer], meta.union_count[layer : layer + 1]
    if gains is not None and (T > DECODE_FUSED_GAINS_MAX_TOKENS or block_t > DECODE_FUSED_GAINS_MAX_BLOCK_T):
        x, gains = apply_input_gains(x, gains, meta.token_ids[:T]), None
    h = torch.empty(T, d_ff, dtype=x.dtype, device=x.device)
    decode.decode_gate_up_kernel[lambda m: (t_blocks, triton.cdiv(d_ff, m["BLOCK_C"]))](
        x, x.stride(0), gate_up, meta.token_ids, bits, bits.shape[1],
        scales if scales is not None else bits, gains if gains is not None else bits,
        union_ids, union_count, h, h.stride(0), T, d, d_ff, group_size,
        ACT=act, HAS_SCALES=scales is not None, HAS_GAINS=gains is not None,
        **flags, BLOCK_T=block_t,
    )
    d_tiles = triton.cdiv(d, decode.DOWN_BLOCK_D)
    splits = max(1, min(triton.cdiv(2 * _num_sms(x.device), t_blocks * d_tiles), triton.cdiv(d_ff, 256)))
    common = dict(**flags, BLOCK_T=block_t, BLOCK_D=decode.DOWN_BLOCK_D)
    grid = (t_blocks, d_tiles, splits)
    bias_arg = bias if bias is not None else bits
    if splits == 1:
        decode.decode_down_kernel[grid](
            h, h.stride(0), down_t, union_ids, union_count, out, out.stride(0), meta.token_ids, bias_arg,
            T, d, d_ff, group_size, SPLIT=False, HAS_BIAS=bias is not None, **common,
        )
        return
    part = torch.empty(splits, T, d, dtype=torch.float32, device=x.device)
    decode.decode_down_kernel[grid](
        h, h.stride(0), down_t, union_ids, union_count, part, d, meta.token_ids, bits, T, d, d_ff, group_size,
        SPLIT=True, HAS_BIAS=False, **common,
    )
    decode.reduce_splits_kernel[(triton.cdiv(T * d, REDUCE_SPLITS_BLOCK),)](
        part, out, out.stride(0), meta.token_ids, bias_arg, T, d, splits, HAS_BIAS=bias is not None,
        BF16_RNE_BY_HAND=flags["BF16_RNE_BY_HAND"], BLOCK=REDUCE_SPLITS_BLOCK,
    )


def _run_prefill(x, gate_up, down_t, scales, gains, bias, group_size, act, meta, layer, out) -> None:
    T, d = x.shape
    d_ff = gate_up.shape[0]
    flags = _precision_flags(x.dtype)
    tiles = max_tiles(T, meta.max_slots, meta.block_m)
    slot_ids, slot_count = meta.slot_ids[layer], meta.slot_count[layer]
    h = torch.empty(T, d_ff, dtype=x.dtype, device=x.device)
    t_class = _t_class(T)
    prefill.prefill_gate_up_kernel[lambda m: (tiles, triton.cdiv(d_ff, m["BLOCK_N"]))](
        x, x.stride(0), gate_up, meta.token_order, meta.slot_persona, meta.slot_start,
        meta.tile_slot, meta.tile_start, meta.n_tiles, slot_ids, slot_count, meta.n_groups,
        scales if scales is not None else slot_count, gains if gains is not None else slot_count,
        h, h.stride(0), d, d_ff, group_size, t_class,
        ACT=act, HAS_SCALES=scales is not None, HAS_GAINS=gains is not None,
        **flags, BLOCK_M=meta.block_m,
    )
    prefill.prefill_down_kernel[lambda m: (tiles, triton.cdiv(d, m["BLOCK_N"]))](
        h, h.stride(0), down_t, meta.token_order, meta.slot_persona, meta.slot_start,
        meta.tile_slot, meta.tile_start, meta.n_tiles, slot_ids, slot_count, meta.n_groups,
        bias if bias is not None else slot_count, out, out.stride(0), d, d_ff, group_size, t_class,
        HAS_BIAS=bias is not None, **flags, BLOCK_M=meta.block_m,
    )


def masked_ffn_triton(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down_t: torch.Tensor,
    persona_ids: torch.Tensor,
    keep_bits: torch.Tensor,
    scales: torch.Tensor | None = None,
    *,
    group_size: int,
    activation: str = "silu",
    meta: StepMeta | None = None,
    layer: int = 0,
    out: torch.Tensor | None = None,
    path: str | None = None,
    input_gains: torch.Tensor | None = None,
    output_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked gated FFN with the Triton kernels (arguments as validated by ``contract.check_masked_ffn_args``).

    Semantics: :func:`persona_kernels.reference.masked_ffn_reference`.

    Args:
        x: ``[T, d]`` tokens; fp32, fp16 or bf16.
        gate_up: ``[d_ff, 2, d]`` packed gate/up rows (x's dtype; made contiguous).
        down_t: ``[d_ff, d]`` transposed down projection (x's dtype; made contiguous).
        persona_ids: ``[T]`` ids; read only when ``meta`` is None (else ``meta`` already holds them).
        keep_bits: ``[P, W]`` int32 bitmaps of this layer (the per-token bit test reads them).
        scales: optional ``[P, d_ff]`` per-channel scales (used in fp32).
        group_size: channels per group ``G``.
        activation: ``"silu"`` or ``"gelu_tanh"``.
        meta: a :class:`StepMeta` already prepared for this step (persistent buffers, e.g. for CUDA
            graphs); None builds one for this call.
        layer: which layer of ``meta`` to use.
        out: optional ``[T, d]`` output (x's dtype and device, unit column stride, rows that do not
            overlap: :func:`persona_kernels.contract.output_buffer`); written in full.
        path: ``"decode"``, ``"prefill"`` or None for :func:`choose_path`.
        input_gains: optional ``[P, d]`` per-persona gains multiplying each token as it is loaded
            (:func:`persona_kernels.reference.apply_input_gains`; used in fp32).
        output_bias: optional ``[P, d]`` per-persona bias added as the output is stored
            (:func:`persona_kernels.reference.apply_output_bias`; used in fp32).

    Returns:
        ``out``, or a new row-major ``[T, d]`` tensor, in x's dtype.
    """
    if not is_available():
        raise RuntimeError(f"triton backend unavailable: {unavailable_reason()}")
    expected = "cpu" if INTERPRET else "cuda"
    if x.device.type != expected:
        raise ValueError(f"the triton backend needs {expected} tensors here (TRITON_INTERPRET={int(INTERPRET)}), got {x.device}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    T, d = x.shape
    d_ff = gate_up.shape[0]
    n_groups = d_ff // group_size
    if keep_bits.shape[1] != num_words(n_groups):
        raise ValueError(f"keep_bits has {keep_bits.shape[1]} words; d_ff={d_ff}, G={group_size} needs {num_words(n_groups)}")
    path = path or choose_path(T, keep_bits.shape[0])
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS} or None, got {path!r}")
    out = output_buffer(x, out)
    if T == 0:
        return out
    if meta is None:
        meta = StepMeta.make(T, n_groups, keep_bits.shape[0], x.device, block_m=PREFILL_BLOCK_M, prefill=path == "prefill")
        meta.prepare(persona_ids, keep_bits)
    elif (meta.n_tokens, meta.n_groups, meta.n_personas) != (T, n_groups, keep_bits.shape[0]) or not 0 <= layer < meta.n_layers:
        raise ValueError(
            f"meta was prepared for {meta.n_tokens} tokens, {meta.n_groups} groups, {meta.n_personas} personas, "
            f"{meta.n_layers} layers; call has {T} tokens, {n_groups} groups, {keep_bits.shape[0]} personas, layer {layer}"
        )
    if path == "prefill" and not meta.has_prefill:
        raise ValueError("path 'prefill' needs a StepMeta made with prefill=True")
    if x.stride(1) != 1:
        x = x.contiguous()
    gate_up, down_t, bits = gate_up.contiguous(), down_t.contiguous(), keep_bits.contiguous()
    if scales is not None:
        scales = scales.to(torch.float32).contiguous()
    input_gains, output_bias = (_persona_vectors(name, table, keep_bits.shape[0], d)
                                for name, table in (("input_gains", input_gains), ("output_bias", output_bias)))
    act = ACTIVATION_CODES[activation]
    with _on_device(x.device):  # Triton launches on the current device, whatever the tensors' device
        if path == "decode":
            _run_decode(x, gate_up, down_t, bits, scales, input_gains, output_bias, group_size, act, meta, layer, out)
        else:
            _run_prefill(x, gate_up, down_t, scales, input_gains, output_bias, group_size, act, meta, layer, out)
    return out


def _persona_vectors(name: str, table: torch.Tensor | None, n_personas: int, d: int) -> torch.Tensor | None:
    """A ``[P, d]`` per-persona table (input gains, output bias) as the kernels read it: fp32, contiguous."""
    if table is None:
        return None
    if tuple(table.shape) != (n_personas, d):
        raise ValueError(f"{name} must be [{n_personas}, {d}], got {tuple(table.shape)}")
    return table.to(torch.float32).contiguous()


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current for the launches (a no-op when it already is, or on the interpreter)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def masked_ffn(x, gate_up, down_t, persona_ids, keep_bits, scales, group_size, activation, *,
               input_gains=None, output_bias=None) -> torch.Tensor:
    """Backend contract of :mod:`persona_kernels.ops`: a new output, path chosen by :func:`choose_path`."""
    return masked_ffn_triton(x, gate_up, down_t, persona_ids, keep_bits, scales, group_size=group_size,
                             activation=activation, input_gains=input_gains, output_bias=output_bias)
