"""The ``persona=`` keyword of an attached model's ``forward`` and ``generate``: the forward hooks that
apply it and prepare the per-token ids once per forward, the method wrappers, and :func:`generate_as`."""

from __future__ import annotations

import functools
import types
from collections.abc import Mapping

import torch
from torch import nn

from .attachment import attachment
from .personas import persona, set_persona

_UNSET = object()


def _input_shape(args: tuple, kwargs: dict) -> tuple[int, int] | None:
    """``(batch, seq)`` of a causal LM forward call (``input_ids`` or ``inputs_embeds``), or None."""
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor):
        ids = args[0]
    if ids is None:
        ids = kwargs.get("inputs_embeds")
        if ids is None:
            return None
        return (ids.shape[0], ids.shape[1]) if ids.dim() >= 3 else (1, ids.shape[0])
    return (ids.shape[0], ids.shape[1]) if ids.dim() >= 2 else (1, ids.shape[0])


def forward_pre_hook(model, args, kwargs):
    """Once per model forward: apply a ``persona=`` keyword, then :meth:`PersonaState.prepare` the
    per-token ids (and the shared Triton ``StepMeta``) for the call's ``[batch, seq]`` on the device."""
    info = attachment(model)
    if info is None:
        return args, kwargs
    spec = kwargs.pop("persona", _UNSET)
    info.saved.append(None if spec is _UNSET else info.state.host_ids)
    if spec is not _UNSET:
        set_persona(model, spec)  # on failure the always-called forward hook pops the entry
    shape = _input_shape(args, kwargs)
    if shape is not None:
        info.state.prepare(*shape)
    return args, kwargs


def forward_hook(model, args, output):
    info = attachment(model)
    if info is not None and info.saved:
        previous = info.saved.pop()
        if previous is not None:
            info.state.set_ids(previous)
    return output


_INNER = "_persona_kernels_inner_{}"
"""Attribute holding an instance-level ``generate``/``forward`` found at attach (accelerate's device
hooks put one there), which the persona wrapper calls and :func:`detach_bank` puts back."""


def add_persona_keyword(model: nn.Module, name: str):
    """``model``'s ``generate`` or ``forward`` with an optional ``persona=`` keyword (name/id/None or
    one per input row): ``forward`` for callers that call it directly (PEFT wrappers do), bypassing
    the hooks that read it from ``model(...)``.

    It calls the instance-level method found there at attach (kept on the model, so a deep copy
    keeps its own), else the class's. Bound as a method, not a closure over ``model``, so a deep copy
    binds its own copy; the signature is the class method's (transformers inspects ``forward``).
    """
    inner = model.__dict__.get(name)
    if inner is not None:
        object.__setattr__(model, _INNER.format(name), inner)
    method = getattr(type(model), name)
    inner_name = _INNER.format(name)

    @functools.wraps(method)
    def with_persona(self: nn.Module, *args, persona=_UNSET, **kwargs):
        call = self.__dict__.get(inner_name) or functools.partial(method, self)
        if persona is _UNSET:
            return call(*args, **kwargs)
        with _persona_cm(self, persona) as ids:
            per_row = _samples_per_row(self, kwargs) if name == "generate" else 1
            _check_rows_divide_batch(ids, _input_shape(args, kwargs), per_row)
            return call(*args, **kwargs)

    with_persona._persona_kernels_wrapper = True
    return types.MethodType(with_persona, model)


def remove_persona_keyword(model: nn.Module, name: str) -> None:
    """Undo :func:`add_persona_keyword` when the wrapper is still what the model holds: put back what
    was there before. A wrapper installed over ours since (accelerate's hooks) is left in place; it
    calls ours, which passes straight through without ``persona=``."""
    current = model.__dict__.get(name)
    if not getattr(getattr(current, "__func__", None), "_persona_kernels_wrapper", False):
        return
    object.__delattr__(model, name)
    inner = model.__dict__.pop(_INNER.format(name), None)
    if inner is not None:
        object.__setattr__(model, name, inner)


def _samples_per_row(model: nn.Module, kwargs: dict) -> int:
    """Output rows ``generate`` makes per input row without beam search (``num_return_sequences``);
    1 with beams, whose candidates of one row must share its persona."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
    samples = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1)) or 1
    return 1 if beams > 1 else int(samples)


def _check_rows_divide_batch(ids: list[int], shape: tuple[int, int] | None, per_row: int = 1) -> None:
    """Refuse a persona list that neither divides the caller's batch nor gives one persona per output
    row (``batch * per_row`` entries): ``generate`` expands the batch for ``num_return_sequences`` or
    beams, after which another length could divide the expanded batch and mix personas within one
    input row."""
    if shape is None or shape[0] % len(ids) == 0 or len(ids) == shape[0] * per_row:
        return
    raise ValueError(
        f"persona list has {len(ids)} entries but the input has {shape[0]} rows; give one persona per row "
        "(or a single persona for the whole batch, or one per returned sequence)"
    )


_persona_cm = persona


def generate_as(model: nn.Module, inputs, persona=None, **generate_kwargs):
    """Run ``model.generate`` as ``persona`` (one, or one per batch row) and return its output.

    ``inputs``: an ``input_ids`` tensor ``[B, S]`` or a mapping such as a tokenizer's ``BatchEncoding``
    (``input_ids``, ``attention_mask``, ...). Other keyword arguments go to ``generate``.
    """
    kwargs = dict(generate_kwargs)
    if isinstance(inputs, torch.Tensor):
        kwargs["input_ids"] = inputs
    elif isinstance(inputs, Mapping):
        kwargs.update(inputs)
    else:
        raise TypeError(f"inputs must be an input_ids tensor or a mapping of model inputs, got {type(inputs).__name__}")
    with _persona_cm(model, persona) as ids:
        _check_rows_divide_batch(ids, _input_shape((), kwargs), _samples_per_row(model, kwargs))
        return type(model).generate(model, **kwargs)
