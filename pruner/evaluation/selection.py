"""The hook between evaluation and the model: attach the bank, choose a persona per batch row.

:func:`attach_for_eval` attaches a :class:`~persona_kernels.bank.MaskBank` to a model in place
(:func:`persona_kernels.hf.attach_bank`; MLPs then run through the masked kernels) and
returns a selector, ``select(ids[B]) -> context manager``, that runs a batch with one persona id
per row (0 = dense). The fidelity measure is picked here too (:func:`fidelity_fn`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from persona_kernels.bank import MaskBank
from persona_kernels.hf import attach_bank, detach_bank, persona
from persona_kernels.hf.attachment import attachment

Selector = Callable[[torch.Tensor], AbstractContextManager]


def attach_for_eval(model, bank: MaskBank, backend: str | None = None) -> Selector:
    """Attach ``bank`` to ``model`` (in place; a different bank already attached is detached first) and return a selector."""
    info = attachment(model)
    if info is not None and info.bank is not bank:
        detach_bank(model)
        info = None
    if info is None:
        attach_bank(model, bank, backend=backend)

    def select(ids: torch.Tensor) -> AbstractContextManager:
        return persona(model, [int(i) for i in ids.flatten().tolist()])

    return select


def fidelity_fn():
    """The teacher-forced fidelity measure: ``f(model, prompts, answers, persona_ids, select, pad_id, max_rows)``."""
    from .teacher_forced import teacher_forced_fidelity

    return teacher_forced_fidelity
