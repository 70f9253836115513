"""Conversions between the three forms of a channel-group mask.

- ``keep``: bool ``[..., n_groups]``, True where a group of ``G`` channels is kept.
- ``bits``: int32 ``[..., ceil(n_groups / 32)]``; group ``g`` is bit ``g % 32`` of word ``g // 32``
  (two's complement: bit 31 is the sign bit). Bits past ``n_groups`` (padding) are zero:
  :func:`keep_to_bits` never sets them and :func:`padding_rows` finds rows that do.
- ``ids``: sorted int32 group ids of the kept groups (one persona, one layer).
"""

from __future__ import annotations

import torch

WORD_BITS = 32


def num_words(n_groups: int) -> int:
    """Number of int32 words that hold ``n_groups`` bits."""
    return (n_groups + WORD_BITS - 1) // WORD_BITS


def keep_to_bits(keep: torch.Tensor) -> torch.Tensor:
    """Pack a bool ``[..., n_groups]`` mask into int32 ``[..., num_words(n_groups)]`` words."""
    n_groups = keep.shape[-1]
    words = num_words(n_groups)
    padded = torch.zeros(*keep.shape[:-1], words * WORD_BITS, dtype=torch.int64, device=keep.device)
    padded[..., :n_groups] = keep.to(torch.int64)
    weights = torch.bitwise_left_shift(
        torch.ones(WORD_BITS, dtype=torch.int64, device=keep.device),
        torch.arange(WORD_BITS, device=keep.device),
    )
    packed = (padded.view(*keep.shape[:-1], words, WORD_BITS) * weights).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def bits_to_keep(bits: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Unpack int32 ``[..., words]`` bitmaps into a bool ``[..., n_groups]`` mask."""
    shifts = torch.arange(WORD_BITS, device=bits.device, dtype=torch.int32)
    unpacked = torch.bitwise_and(torch.bitwise_right_shift(bits.to(torch.int32).unsqueeze(-1), shifts), 1)
    return unpacked.reshape(*bits.shape[:-1], bits.shape[-1] * WORD_BITS)[..., :n_groups].bool()


def padding_rows(bits: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Bool ``[...]`` over the bitmaps of int32 ``bits [..., words]``: True where a padding bit (past
    group ``n_groups - 1``, in the last word) is set. Device ops only, no host sync."""
    used = n_groups % WORD_BITS
    if used == 0 or bits.shape[-1] == 0:
        return torch.zeros(bits.shape[:-1], dtype=torch.bool, device=bits.device)
    return torch.bitwise_and(bits[..., -1], -(1 << used)) != 0  # -(1 << used): bits used..31 set


def check_padding(bits: torch.Tensor, n_groups: int, name: str = "keep_bits") -> None:
    """Raise ``ValueError`` naming the rows of ``bits [rows, words]`` that set a padding bit (one host sync)."""
    rows = torch.nonzero(padding_rows(bits, n_groups).cpu()).flatten().tolist()
    if rows:
        shown = f"{rows[:8]}{' ...' if len(rows) > 8 else ''}"
        raise ValueError(f"{name} sets bits past the last group (group {n_groups - 1}) in rows {shown}; "
                         "padding bits must be zero")


def keep_to_ids(keep: torch.Tensor) -> torch.Tensor:
    """Sorted int32 ids of the True entries of a 1-D bool mask."""
    return torch.nonzero(keep, as_tuple=False).flatten().to(torch.int32)


def ids_to_keep(ids: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Bool ``[n_groups]`` mask with True at ``ids`` (ids must be in range)."""
    keep = torch.zeros(n_groups, dtype=torch.bool, device=ids.device)
    keep[ids.long()] = True
    return keep


def dense_bits(n_groups: int, rows: int = 1, device: torch.device | str | None = None) -> torch.Tensor:
    """Bitmap rows with every one of ``n_groups`` groups kept (the dense persona)."""
    return keep_to_bits(torch.ones(rows, n_groups, dtype=torch.bool, device=device))


def channel_keep(keep: torch.Tensor, group_size: int) -> torch.Tensor:
    """Expand a group mask ``[..., n_groups]`` to a channel mask ``[..., n_groups * G]``."""
    return keep.repeat_interleave(group_size, dim=-1)
