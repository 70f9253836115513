"""Differentiable channel masks on a Hugging Face model's FFNs (hooks on each ``down_proj`` input).

``y = down_proj(multiplier[layer] * act(gate(x)) * up(x))`` where ``multiplier`` is ``[L, d_ff]``:
a hard top-k group mask with a straight-through gradient while learning the mask, and
``mask * scales`` while learning scales or evaluating. Optional FFN input gains ``[L, d_model]``
multiply each MLP's input and an optional FFN output bias ``[L, d_model]`` is added to its output
(hooks on each MLP).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch
from torch import nn

from persona_kernels.hf.ffn import FFNLayer, find_ffn_layers


def keep_count(n_groups: int, sparsity: float) -> int:
    """Groups kept per layer: ``round((1 - sparsity) * n_groups)``, at least 1."""
    return max(1, min(n_groups, round((1.0 - sparsity) * n_groups)))


def topk_keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool ``[L, n_groups]``: the ``k`` highest scores of each row (ties broken by lower index)."""
    index = torch.sort(scores.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(1, index, True)
    return keep


def ste_mask(scores: torch.Tensor, k: int, ste: str = "identity") -> torch.Tensor:
    """Hard top-k mask ``[L, n_groups]`` (float 0/1) in the forward pass, gradient to ``scores`` in the backward.

    ``identity``: d mask / d score = 1. ``sigmoid``: the gradient of ``sigmoid(score)``.
    """
    hard = topk_keep(scores, k).to(scores.dtype)
    soft = scores if ste == "identity" else torch.sigmoid(scores)
    return hard + (soft - soft.detach())  # exactly the hard mask in the forward pass


def expand_groups(mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[L, n_groups]`` -> ``[L, n_groups * G]`` (each group's value repeated over its channels)."""
    return mask.repeat_interleave(group_size, dim=-1)


def _check_unattached(model: nn.Module) -> None:
    from persona_kernels.hf import is_attached

    if is_attached(model):
        raise ValueError("the pruner's hooks need plain MLPs; detach the mask bank first (persona_kernels.hf.detach_bank)")


@contextlib.contextmanager
def _removed_after(handles: list) -> Iterator[None]:
    """Remove the hook ``handles`` when the block ends, however it ends."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _per_forward(value: Callable[[], torch.Tensor] | torch.Tensor) -> Callable[[int], torch.Tensor]:
    """``row(layer)``: ``value[layer]``, with a callable ``value`` evaluated once per forward (at layer 0)."""
    current: dict[str, torch.Tensor] = {}

    def row(index: int) -> torch.Tensor:
        if index == 0 or "value" not in current:
            current["value"] = value() if callable(value) else value
        return current["value"][index]

    return row


@contextlib.contextmanager
def _multiplied_inputs(model: nn.Module, value: Callable[[], torch.Tensor] | torch.Tensor,
                       module_of: Callable[[FFNLayer], nn.Module]) -> Iterator[None]:
    """Within the block, the input of ``module_of(layer)`` is multiplied by ``value[layer]`` in every FFN layer."""
    _check_unattached(model)
    row = _per_forward(value)
    handles = [module_of(layer).register_forward_pre_hook(
        lambda module, args, k=layer.index: (args[0] * row(k).to(args[0].dtype),) + tuple(args[1:]))
        for layer in find_ffn_layers(model)]
    with _removed_after(handles):
        yield


def channel_multiplier(model: nn.Module, multiplier: Callable[[], torch.Tensor] | torch.Tensor) -> AbstractContextManager[None]:
    """Within the block, every FFN's activated product is multiplied by ``multiplier[layer]`` (``[L, d_ff]``).

    ``multiplier`` may be a callable evaluated once per forward of layer 0 (so a fresh STE mask is
    built per forward and shared by all layers).
    """
    return _multiplied_inputs(model, multiplier, lambda layer: layer.mlp.down_proj)


def input_gain(model: nn.Module, gains: Callable[[], torch.Tensor] | torch.Tensor) -> AbstractContextManager[None]:
    """Within the block, every FFN's input is multiplied by ``gains[layer]`` (``[L, d_model]``).

    ``gains`` may be a callable evaluated once per forward of layer 0, as in :func:`channel_multiplier`.
    """
    return _multiplied_inputs(model, gains, lambda layer: layer.mlp)


@contextlib.contextmanager
def output_bias(model: nn.Module, bias: Callable[[], torch.Tensor] | torch.Tensor) -> Iterator[None]:
    """Within the block, ``bias[layer]`` (``[L, d_model]``) is added to every FFN's output.

    ``bias`` may be a callable evaluated once per forward of layer 0, as in :func:`channel_multiplier`.
    """
    _check_unattached(model)
    row = _per_forward(bias)
    handles = [layer.mlp.register_forward_hook(lambda module, args, out, k=layer.index: out + row(k).to(out.dtype))
               for layer in find_ffn_layers(model)]
    with _removed_after(handles):
        yield


@contextlib.contextmanager
def fixed_mask(model: nn.Module, keep: torch.Tensor, group_size: int, scales: torch.Tensor | None = None,
               input_gains: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> Iterator[None]:
    """Run the model as the persona ``keep`` (bool ``[L, n_groups]``) with optional ``scales`` ``[L, d_ff]``,
    ``input_gains`` ``[L, d_model]`` and FFN output ``bias`` ``[L, d_model]``."""
    device = next(model.parameters()).device
    factor = expand_groups(keep.float(), group_size)
    if scales is not None:
        factor = factor * scales.float()
    gains = contextlib.nullcontext() if input_gains is None else input_gain(model, input_gains.float().to(device))
    added = contextlib.nullcontext() if bias is None else output_bias(model, bias.float().to(device))
    with channel_multiplier(model, factor.to(device)), gains, added:
        yield


def freeze(model: nn.Module) -> None:
    """``requires_grad = False`` on every model parameter (the pruner only trains scores and scales)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)


@contextlib.contextmanager
def ffn_activation_hook(model: nn.Module, observe: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """Call ``observe(layer, h)`` with every FFN's activated product ``h`` ``[..., d_ff]`` (the down_proj input)."""
    _check_unattached(model)
    handles = []
    for layer in find_ffn_layers(model):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=layer.index: observe(i, a[0])))
    with _removed_after(handles):
        yield
