"""The ``reference`` backend: the plain-PyTorch specification, available everywhere."""

from __future__ import annotations

import torch

from ..reference import masked_ffn_reference


FUSES_INPUT_GAINS = True


def is_available() -> bool:
    """The reference backend always runs."""
    return True


def unavailable_reason() -> str:
    """Never unavailable."""
    return ""


def masked_ffn(x, gate_up, down_t, persona_ids, keep_bits, scales, group_size, activation, *,
               input_gains=None) -> torch.Tensor:
    """Compute the masked FFN with :func:`masked_ffn_reference` (float32 inside)."""
    return masked_ffn_reference(x, gate_up, down_t, persona_ids, keep_bits, scales, group_size, activation,
                                input_gains=input_gains)
