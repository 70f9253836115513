"""Attach a :class:`~persona_kernels.bank.MaskBank` to a loaded Hugging Face model, in place.

After :func:`attach_bank`, every decoder layer's MLP is a :class:`MaskedMLP` that runs
:func:`persona_kernels.masked_ffn` on the layer's packed shared weights (packed once; the original
``gate_proj``/``up_proj``/``down_proj`` weights are freed, so no second copy stays in memory).
All layers share one :class:`PersonaState`: fixed device buffers holding the current persona id
of each batch row. Choosing a persona writes a few integers into that buffer; no weight moves.
One forward pre-hook on the model expands them to per-token ids (and, on the Triton backend,
refills one ``StepMeta`` for all layers) with device ops at the start of every forward, so a
CUDA graph captured around the forward stays right across persona switches. Capture after a
warm-up forward at the largest shape (buffers grow, and move, only when a call needs more room
than any before) and switch personas between replays, never inside a capture.

Persona specs everywhere: a persona name, an id (0 = dense), ``None``/``"dense"`` (the dense
model), or a list of those, one per batch row (row ``b`` of the batch uses entry ``b``; if the
batch is ``k`` times longer than the list, as with ``num_return_sequences=k``, each entry covers
``k`` consecutive rows; the list's length must divide the caller's batch, or, for ``generate``
without beams, equal it times ``num_return_sequences``: one persona per returned sequence). Names
and ids are validated on the host when the persona is set, so the op itself runs with
``check_ids=False``.

Ways to choose the persona::

    attach_bank(model, bank)
    set_persona(model, "pirate")                      # sticky, until changed
    with persona(model, ["pirate", None]):            # scoped, per batch row
        logits = model(**batch).logits
    model(**batch, persona="pirate")                  # one forward call
    model.generate(**inputs, persona="pirate")        # one generate call
    generate_as(model, inputs, persona="pirate", max_new_tokens=20)
    detach_bank(model)                                # plain MLPs again

Limits: the attached model is for inference (the masked FFN op has no backward); it holds its own
copy of the bank's tables as of attach, so a persona added to or changed in the bank afterwards
needs ``detach_bank`` and ``attach_bank`` again.

The pieces, one job per module (each imports only those listed before it):
:mod:`~persona_kernels.hf.persona_state` (the shared per-step id buffers),
:mod:`~persona_kernels.hf.masked_mlp` (the layer module), :mod:`~persona_kernels.hf.attachment`
(what is recorded on the model), :mod:`~persona_kernels.hf.personas` (choosing the persona),
:mod:`~persona_kernels.hf.persona_keyword` (``persona=`` on forward/generate), and this module
(attach, detach, backend).
"""

from __future__ import annotations

import torch
from torch import nn

from ..bank import MaskBank
from ..fingerprint import ffn_fingerprint, ffn_weight_sample
from ..layout import pack_ffn
from ..ops import resolve_backend
from .attachment import ATTACHMENT_ATTR, Attachment, is_attached, require_attachment
from .ffn import ffn_weights, find_ffn_layers, model_ffn_shape, model_name
from .masked_mlp import MaskedMLP
from .persona_keyword import add_persona_keyword, forward_hook, forward_pre_hook, remove_persona_keyword
from .persona_state import PersonaState, configure_state
from .personas import persona_lookup


def _empty_weight(weight: torch.Tensor) -> nn.Parameter:
    """A zero-size stand-in for a freed weight, same dtype and device."""
    return nn.Parameter(torch.empty(0, dtype=weight.dtype, device=weight.device), requires_grad=False)


def attach_bank(model: nn.Module, bank: MaskBank, *, backend: str | None = None) -> nn.Module:
    """Attach ``bank`` to ``model`` in place and return ``model``; the current persona starts as dense.

    Refuses (with the bank's :class:`~persona_kernels.bank.ModelMismatchError`) a bank made for a
    different model, before changing anything. ``backend`` is passed to every
    :func:`~persona_kernels.masked_ffn` call (``None``: the dispatcher's choice). When the backend
    resolves to ``triton`` (``None`` on a GPU), the layers instead call the Triton launcher with one
    ``StepMeta`` shared by all layers, prepared once per forward (see :class:`PersonaState`).
    """
    if is_attached(model):
        raise ValueError("a mask bank is already attached to this model; call detach_bank(model) first")
    layers = find_ffn_layers(model)
    n_layers, d_ff, d_model = model_ffn_shape(model)
    weights = ffn_weights(model)
    fingerprint, weight_sample = ffn_fingerprint(weights), ffn_weight_sample(weights)
    bank.check_model(fingerprint, n_layers, d_ff, model_name(model), d_model, weight_sample)
    device = layers[0].mlp.gate_proj.weight.device
    if backend is not None:
        resolve_backend(device, backend)  # fail now, not at the first forward
    keep_bits = bank.keep_bits(device)  # [L, P + 1, words]
    scales = bank.scales_table(device)  # [L, P + 1, d_ff] or None
    gains = bank.input_gains_table(device)  # [L, P + 1, d_model] or None
    biases = bank.output_bias_table(device)  # [L, P + 1, d_model] or None
    permutation = None if bank.permutation is None else bank.permutation.to(device)
    state = PersonaState(device, keep_bits=keep_bits, n_groups=bank.n_groups)
    converted = []  # layers swapped so far: swapped back if a later one fails (out of memory, say)
    try:
        for layer in layers:
            mlp = layer.mlp
            perm = None if permutation is None else permutation[layer.index]
            packed = pack_ffn(
                mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach(), layer.activation, perm
            )
            masked = MaskedMLP(
                packed,
                keep_bits[layer.index],
                None if scales is None else scales[layer.index],
                state,
                bank.group_size,
                perm,
                backend,
                original=mlp,
                layer_index=layer.index,
                input_gains=None if gains is None else gains[layer.index],
                output_bias=None if biases is None else biases[layer.index],
            )
            grads = {}
            for name in ("gate_proj", "up_proj", "down_proj"):
                linear = getattr(mlp, name)
                grads[name] = linear.weight.requires_grad
                linear.weight = _empty_weight(linear.weight)  # free the unpacked copy
            object.__setattr__(mlp, "_persona_kernels_requires_grad", grads)
            layer.parent.mlp = masked
            converted.append(layer)
        info = Attachment(bank=bank, state=state, fingerprint=fingerprint, backend=backend, lookup=persona_lookup(bank),
                          weight_sample=weight_sample)
        configure_state(state, backend)
        object.__setattr__(model, ATTACHMENT_ATTR, info)
        info.hooks.append(model.register_forward_pre_hook(forward_pre_hook, with_kwargs=True))
        info.hooks.append(model.register_forward_hook(forward_hook, always_call=True))
        for name in ("generate", "forward"):
            if hasattr(type(model), name):  # a bare decoder (LlamaModel) has no generate
                object.__setattr__(model, name, add_persona_keyword(model, name))
    except BaseException:
        _undo_attach(model, converted)
        raise
    return model


def detach_bank(model: nn.Module) -> nn.Module:
    """Undo :func:`attach_bank`: restore plain MLPs with weights unpacked to the original order; return ``model``."""
    require_attachment(model)
    _undo_attach(model, find_ffn_layers(model))
    return model


def _undo_attach(model: nn.Module, layers) -> None:
    """Restore ``layers``' original MLPs and remove whatever of the attachment exists (also halfway)."""
    _restore_layers(layers)
    info = model.__dict__.pop(ATTACHMENT_ATTR, None)
    for hook in info.hooks if info is not None else ():
        hook.remove()
    for name in ("generate", "forward"):
        remove_persona_keyword(model, name)


def _restore_layers(layers) -> None:
    """Put each layer's original MLP back, its weights unpacked to the original channel order."""
    for layer in layers:
        masked = layer.parent.mlp
        if not isinstance(masked, MaskedMLP):
            continue
        original = masked._original
        grads = getattr(original, "_persona_kernels_requires_grad", {})
        for name, weight in zip(("gate_proj", "up_proj", "down_proj"), masked.unpacked_weights()):
            getattr(original, name).weight = nn.Parameter(weight, requires_grad=grads.get(name, True))
        layer.parent.mlp = original


def set_backend(model: nn.Module, backend: str | None) -> None:
    """Run the attached model's masked FFNs on ``backend`` (``None``: the dispatcher's choice)."""
    info = require_attachment(model)
    layers = find_ffn_layers(model)
    if backend is not None:
        resolve_backend(layers[0].mlp.gate_up.device, backend)
    info.backend = backend
    for layer in layers:
        layer.mlp.backend = backend
    configure_state(info.state, backend)

