"""Per-step device metadata for the Triton kernels, in fixed-capacity buffers (CUDA-graph safe).

Pattern: vLLM's LoRA kernel metadata. :meth:`StepMeta.make` allocates every buffer once;
:meth:`StepMeta.prepare` refills them in place from the step's persona ids and masks with
capturable torch ops only (sort, cumsum, scatter, searchsorted; no ``.item()``, no ``nonzero``,
no host sync). Kernels read counts and loop bounds from these buffers, so a CUDA graph captured
around ``prepare`` plus the layer calls replays correctly after new persona ids are written into
the captured id tensor; buffer addresses never change.

Contents after ``prepare(persona_ids [T], keep_bits)``:

- step level: ``token_ids`` (int32 ids), ``token_order`` (stable argsort of the ids: sorted row
  -> token), "slots" = the distinct personas of the batch in ascending id order:
  ``slot_persona``, ``slot_start`` (first sorted row of each slot; ``T`` for unused slots and at
  index ``max_slots``), ``n_slots``; the prefill tile table (``block_m`` rows per tile, never
  crossing a slot): ``tile_slot``, ``tile_start``, ``n_tiles``.
- per layer ``l``: ``union_ids[l]`` (sorted kept group ids of the union over the batch's personas,
  valid up to ``union_count[l]``) for decode, and with ``prefill=True`` ``slot_ids[l, s]`` /
  ``slot_count[l, s]`` (each slot's sorted kept group ids) for prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .masks import bits_to_keep


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def max_tiles(n_tokens: int, n_slots: int, block_m: int) -> int:
    """Upper bound on prefill tiles: every slot may waste at most one partial tile."""
    return _cdiv(n_tokens, block_m) + min(n_slots, n_tokens)


def _compact(keep: torch.Tensor, ids_out: torch.Tensor, count_out: torch.Tensor) -> None:
    """Write the sorted indices of True entries of ``keep [..., n]`` to the front of ``ids_out``
    and their number to ``count_out [...]`` (a cumsum + scatter; entries past the count are 0)."""
    n = keep.shape[-1]
    position = torch.cumsum(keep, dim=-1) - 1
    target = torch.where(keep, position, n - 1)
    source = torch.where(keep, torch.arange(n, device=keep.device, dtype=torch.int32), 0)
    ids_out.zero_()
    ids_out.scatter_(-1, target, source)
    count_out.copy_(keep.sum(-1))


@dataclass
class StepMeta:
    """Fixed-capacity device buffers describing one step's batch (see module docstring)."""

    max_tokens: int
    n_groups: int
    n_personas: int
    n_layers: int
    block_m: int
    token_ids: torch.Tensor      # [max_tokens] int32
    token_order: torch.Tensor    # [max_tokens] int32
    slot_persona: torch.Tensor   # [max_slots] int32
    slot_start: torch.Tensor     # [max_slots + 1] int32
    n_slots: torch.Tensor        # [1] int32
    tile_slot: torch.Tensor      # [max_tiles] int32
    tile_start: torch.Tensor     # [max_tiles] int32
    n_tiles: torch.Tensor        # [1] int32
    union_ids: torch.Tensor      # [n_layers, n_groups] int32
    union_count: torch.Tensor    # [n_layers] int32
    slot_ids: torch.Tensor | None    # [n_layers, max_slots, n_groups] int32 (prefill only)
    slot_count: torch.Tensor | None  # [n_layers, max_slots] int32 (prefill only)
    n_tokens: int = 0

    @property
    def max_slots(self) -> int:
        """Most distinct personas one step can hold: ``min(n_personas, max_tokens, max_slots asked at make)``."""
        return self.slot_persona.shape[0]

    @property
    def has_prefill(self) -> bool:
        """Whether per-persona kept lists (needed by the prefill kernels) are maintained."""
        return self.slot_ids is not None

    @classmethod
    def make(
        cls,
        max_tokens: int,
        n_groups: int,
        n_personas: int,
        device: torch.device | str,
        n_layers: int = 1,
        block_m: int = 64,
        prefill: bool = True,
        max_slots: int | None = None,
    ) -> "StepMeta":
        """Allocate the buffers once.

        Args:
            max_tokens: most tokens any step will carry.
            n_groups: channel groups per layer (``d_ff // G``).
            n_personas: rows of the bank's bitmaps ``P``.
            device: where the kernels run.
            n_layers: layers whose masks :meth:`prepare` digests in one go (``keep_bits [L, P, W]``).
            block_m: prefill rows per tile (the prefill kernels' ``BLOCK_M``: 16, 32, 64 or 128).
            prefill: also keep per-persona kept lists (``n_layers * max_slots * n_groups`` int32);
                a decode-only metadata object skips them.
            max_slots: most distinct personas any step will carry (default: no bound beyond
                ``min(n_personas, max_tokens)``). It bounds the prefill lists by the batch instead of
                the bank; the caller must guarantee it (an attached model does: one persona per batch
                row), since :meth:`prepare` cannot check it without a host sync.
        """
        if block_m not in (16, 32, 64, 128):
            raise ValueError(f"block_m must be 16, 32, 64 or 128, got {block_m}")
        if max_tokens < 1 or n_groups < 1 or n_personas < 1 or n_layers < 1:
            raise ValueError("max_tokens, n_groups, n_personas and n_layers must be positive")
        if max_slots is not None and max_slots < 1:
            raise ValueError(f"max_slots must be positive, got {max_slots}")
        slots = min(n_personas, max_tokens, max_slots or n_personas)
        tiles = max_tiles(max_tokens, slots, block_m)

        def buf(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.int32, device=device)

        return cls(
            max_tokens=max_tokens, n_groups=n_groups, n_personas=n_personas, n_layers=n_layers, block_m=block_m,
            token_ids=buf(max_tokens), token_order=buf(max_tokens),
            slot_persona=buf(slots), slot_start=buf(slots + 1), n_slots=buf(1),
            tile_slot=buf(tiles), tile_start=buf(tiles), n_tiles=buf(1),
            union_ids=buf(n_layers, n_groups), union_count=buf(n_layers),
            slot_ids=buf(n_layers, slots, n_groups) if prefill else None,
            slot_count=buf(n_layers, slots) if prefill else None,
        )

    def prepare(self, persona_ids: torch.Tensor, keep_bits: torch.Tensor) -> "StepMeta":
        """Refill every buffer in place for a step (graph-capturable; returns ``self``).

        Args:
            persona_ids: ``[T]`` int32/int64 ids, ``1 <= T <= max_tokens``, each in ``[0, n_personas)``
                (not checked here: that would synchronise).
            keep_bits: ``[P, W]`` (one layer; needs ``n_layers == 1``) or ``[n_layers, P, W]`` bitmaps.
        """
        T = persona_ids.shape[0]
        if not 1 <= T <= self.max_tokens:
            raise ValueError(f"step has {T} tokens; this StepMeta holds 1 to {self.max_tokens}")
        bits = keep_bits.unsqueeze(0) if keep_bits.dim() == 2 else keep_bits
        if bits.dim() != 3 or bits.shape[0] != self.n_layers or bits.shape[1] != self.n_personas:
            raise ValueError(
                f"keep_bits must be [{self.n_personas}, W] or [{self.n_layers}, {self.n_personas}, W], "
                f"got {tuple(keep_bits.shape)}"
            )
        device = self.token_ids.device
        self.n_tokens = T
        S = self.max_slots

        ids = persona_ids.to(torch.int32)
        self.token_ids[:T].copy_(ids)
        sorted_ids, order = torch.sort(ids, stable=True)
        self.token_order[:T].copy_(order)

        # Slots: one per distinct persona, ascending.
        is_new = torch.ones(T, dtype=torch.bool, device=device)
        is_new[1:] = sorted_ids[1:] != sorted_ids[:-1]
        slot_of_row = torch.cumsum(is_new, 0) - 1
        rows = torch.arange(T, dtype=torch.int32, device=device)
        self.n_slots.copy_(is_new.sum().reshape(1))
        self.slot_start.fill_(T)
        self.slot_start.scatter_reduce_(0, slot_of_row, rows, reduce="amin")
        self.slot_persona.zero_()
        self.slot_persona.scatter_(0, slot_of_row, sorted_ids)

        # Tile table: ceil(count / block_m) tiles per slot, in slot order.
        counts = self.slot_start[1:] - self.slot_start[:-1]
        tiles_per_slot = (counts + self.block_m - 1) // self.block_m
        tile_end = torch.cumsum(tiles_per_slot, 0)
        self.n_tiles.copy_(tile_end[-1:])
        tile = torch.arange(self.tile_slot.shape[0], dtype=torch.int32, device=device)
        slot = torch.searchsorted(tile_end, tile, right=True).clamp_(max=S - 1)
        first_tile = tile_end[slot] - tiles_per_slot[slot]
        self.tile_slot.copy_(slot)
        self.tile_start.copy_(self.slot_start[slot] + (tile - first_tile) * self.block_m)

        # Kept groups per layer: each slot's list (prefill) and the union over slots (decode).
        valid = torch.arange(S, device=device) < self.n_slots
        keep = bits_to_keep(bits[:, self.slot_persona.long()], self.n_groups) & valid[None, :, None]
        if self.slot_ids is not None:
            _compact(keep, self.slot_ids, self.slot_count)
        _compact(keep.any(1), self.union_ids, self.union_count)
        return self
