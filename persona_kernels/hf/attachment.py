"""The record :func:`~persona_kernels.hf.attach_bank` leaves on a model, and how to find it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..bank import MaskBank
from .persona_state import PersonaState

ATTACHMENT_ATTR = "_persona_kernels_attachment"


@dataclass
class Attachment:
    """What :func:`attach_bank` records on the model (``model._persona_kernels_attachment``)."""

    bank: MaskBank
    state: PersonaState
    fingerprint: str
    backend: str | None
    lookup: dict = field(default_factory=dict)  # name / id / None -> validated id, built once at attach
    hooks: list = field(default_factory=list)
    saved: list = field(default_factory=list)  # persona stack for per-call `persona=` kwargs
    weight_sample: tuple[torch.Tensor, str] | None = None  # ffn_weight_sample at attach (weights are packed since)


def attachment(model: nn.Module) -> Attachment | None:
    """The model's :class:`Attachment`, or ``None`` if no bank is attached."""
    return getattr(model, ATTACHMENT_ATTR, None)


def is_attached(model: nn.Module) -> bool:
    """True when a mask bank is attached to ``model``."""
    return attachment(model) is not None


def attached_bank(model: nn.Module) -> MaskBank:
    """The bank attached to ``model`` (``ValueError`` if none)."""
    return require_attachment(model).bank


def require_attachment(model: nn.Module) -> Attachment:
    """The model's :class:`Attachment`; ``ValueError`` naming :func:`attach_bank` if none."""
    info = attachment(model)
    if info is None:
        raise ValueError("no mask bank is attached to this model; call attach_bank(model, bank) first")
    return info

