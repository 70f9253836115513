"""The operation's argument contract: what ``masked_ffn`` accepts, and the output every backend writes.

Shared by the dispatcher (:mod:`persona_kernels.ops`) and the backends that take a caller's
``out`` (:mod:`persona_kernels.backends`), so neither imports the other.
"""

from __future__ import annotations

import torch

from .masks import check_padding, num_words, padding_rows
from .reference import ACTIVATIONS


def check_masked_ffn_args(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down_t: torch.Tensor,
    persona_ids: torch.Tensor,
    keep_bits: torch.Tensor,
    scales: torch.Tensor | None,
    group_size: int,
    activation: str,
    check_ids: bool = True,
    input_gains: torch.Tensor | None = None,
    output_bias: torch.Tensor | None = None,
) -> None:
    """Raise ``ValueError`` naming the first argument that breaks the operation's contract."""
    if x.dim() != 2:
        raise ValueError(f"x must be [T, d], got shape {tuple(x.shape)}")
    T, d = x.shape
    if gate_up.dim() != 3 or gate_up.shape[1] != 2 or gate_up.shape[2] != d:
        raise ValueError(f"gate_up must be [d_ff, 2, {d}], got {tuple(gate_up.shape)}")
    d_ff = gate_up.shape[0]
    if tuple(down_t.shape) != (d_ff, d):
        raise ValueError(f"down_t must be [{d_ff}, {d}], got {tuple(down_t.shape)}")
    if not (x.dtype == gate_up.dtype == down_t.dtype):
        raise ValueError(f"x, gate_up and down_t must share a dtype, got {x.dtype}, {gate_up.dtype}, {down_t.dtype}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype {x.dtype} is not supported; use float32, float16 or bfloat16")
    if not (x.device == gate_up.device == down_t.device == persona_ids.device == keep_bits.device):
        raise ValueError("x, gate_up, down_t, persona_ids and keep_bits must be on one device")
    if group_size < 1 or d_ff % group_size != 0:
        raise ValueError(f"group_size {group_size} does not divide d_ff {d_ff}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if persona_ids.dim() != 1 or persona_ids.shape[0] != T:
        raise ValueError(f"persona_ids must be [{T}], got {tuple(persona_ids.shape)}")
    if persona_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"persona_ids must be int32 or int64, got {persona_ids.dtype}")
    words = num_words(d_ff // group_size)
    if keep_bits.dim() != 2 or keep_bits.shape[1] != words or keep_bits.dtype != torch.int32:
        raise ValueError(
            f"keep_bits must be int32 [P, {words}] for d_ff={d_ff}, G={group_size}, "
            f"got {keep_bits.dtype} {tuple(keep_bits.shape)}"
        )
    n_personas = keep_bits.shape[0]
    for name, table, width in (("scales", scales, d_ff), ("input_gains", input_gains, d), ("output_bias", output_bias, d)):
        if table is not None and (tuple(table.shape) != (n_personas, width) or table.device != x.device
                                  or not table.is_floating_point()):
            raise ValueError(
                f"{name} must be float [{n_personas}, {width}] on {x.device}, got {table.dtype} "
                f"{tuple(table.shape)} on {table.device}"
            )
    if check_ids and not torch.compiler.is_compiling():
        _check_contents(persona_ids, keep_bits, d_ff // group_size)


def _check_contents(persona_ids: torch.Tensor, keep_bits: torch.Tensor, n_groups: int) -> None:
    """Persona ids in range and no padding bit set in ``keep_bits``: one read back to the host."""
    flags = [padding_rows(keep_bits, n_groups).any()]
    if persona_ids.numel():
        flags += [persona_ids.min(), persona_ids.max()]
    values = torch.stack([flag.to(torch.int64) for flag in flags]).tolist()
    if values[0]:
        check_padding(keep_bits, n_groups)
    if len(values) == 3 and (values[1] < 0 or values[2] >= keep_bits.shape[0]):
        raise ValueError(f"persona id out of range: ids span [{values[1]}, {values[2]}] but keep_bits has "
                         f"{keep_bits.shape[0]} rows")


def output_buffer(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The ``[T, d]`` output of a call on ``x``: a fresh row-major tensor when ``out`` is None, else
    ``out`` once checked to be writable row by row (x's dtype and device, unit column stride,
    rows that do not overlap), which the backends that take one require."""
    T, d = x.shape
    if out is None:
        return torch.empty((T, d), dtype=x.dtype, device=x.device)
    if (tuple(out.shape) != (T, d) or out.dtype != x.dtype or out.device != x.device
            or (d > 1 and out.stride(1) != 1) or (T > 1 and out.stride(0) < d)):
        raise ValueError(
            f"out must be a [{T}, {d}] {x.dtype} tensor on {x.device} with unit column stride and rows that do "
            f"not overlap, got {out.dtype} {tuple(out.shape)} with strides {out.stride()} on {out.device}"
        )
    return out
