"""The packed, kernel-friendly layout of one layer's shared dense FFN weights.

Packing happens once at load time and puts each channel's weights in contiguous rows, so
gathering kept channels reads whole rows:

- ``gate_up``: ``[d_ff, 2, d]``; ``gate_up[c, 0] = W_gate[c]`` and ``gate_up[c, 1] = W_up[c]``.
- ``down_t``: ``[d_ff, d]``; ``down_t[c] = W_down[:, c]``.

An optional channel permutation ``perm`` (``[d_ff]``, packed channel ``i`` is original channel
``perm[i]``) is applied to both, which leaves the FFN's function unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedFFN:
    """One layer's shared FFN weights in the packed layout (see module docstring)."""

    gate_up: torch.Tensor
    down_t: torch.Tensor
    activation: str

    @property
    def d_ff(self) -> int:
        """Number of intermediate channels."""
        return self.gate_up.shape[0]

    @property
    def d_model(self) -> int:
        """Hidden size ``d``."""
        return self.gate_up.shape[2]


def pack_ffn(
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str,
    perm: torch.Tensor | None = None,
) -> PackedFFN:
    """Pack ``W_gate, W_up: [d_ff, d]`` and ``W_down: [d, d_ff]`` into a :class:`PackedFFN`."""
    d_ff, d = w_gate.shape
    if w_up.shape != (d_ff, d) or w_down.shape != (d, d_ff):
        raise ValueError(
            f"FFN weight shapes disagree: gate {tuple(w_gate.shape)}, up {tuple(w_up.shape)}, "
            f"down {tuple(w_down.shape)}; expected [d_ff, d], [d_ff, d], [d, d_ff]"
        )
    gate_up = torch.stack((w_gate, w_up), dim=1)
    down_t = w_down.T
    if perm is not None:
        perm = perm.to(device=w_gate.device, dtype=torch.long)
        gate_up, down_t = gate_up[perm], down_t[perm]
    return PackedFFN(gate_up.contiguous(), down_t.contiguous(), activation)


def unpack_ffn(packed: PackedFFN, perm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Invert :func:`pack_ffn`: return ``(W_gate, W_up, W_down)`` in the original channel order."""
    gate_up, down_t = packed.gate_up, packed.down_t
    if perm is not None:
        inverse = torch.argsort(perm.to(device=gate_up.device, dtype=torch.long))
        gate_up, down_t = gate_up[inverse], down_t[inverse]
    return gate_up[:, 0].contiguous(), gate_up[:, 1].contiguous(), down_t.T.contiguous()
