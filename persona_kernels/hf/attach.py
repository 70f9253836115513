"""Attach a :class:`~persona_kernels.bank.MaskBank` to a loaded Hugging Face model, in place.

After :func:`attach_bank`, every decoder layer's MLP is a :class:`MaskedMLP` that runs
:func:`persona_kernels.masked_ffn` on the layer's packed shared weights (packed once; the original
``gate_proj``/``up_proj``/``down_proj`` weights are freed, so no second copy stays in memory).
All layers share one :class:`PersonaState`: fixed device buffers holding the current persona id
of each batch row. Choosing a persona writes a few integers into that buffer; no weight moves.

Persona specs everywhere: a persona name, an id (0 = dense), ``None``/``"dense"`` (the dense
model), or a list of those, one per batch row (row ``b`` of the batch uses entry ``b``; if the
batch is ``k`` times longer than the list, as with ``num_return_sequences=k``, each entry covers
``k`` consecutive rows). Names and ids are validated on the host when the persona is set, so
the op itself runs with ``check_ids=False``.

Ways to choose the persona::

    attach_bank(model, bank)
    set_persona(model, "pirate")                      # sticky, until changed
    with persona(model, ["pirate", None]):            # scoped, per batch row
        logits = model(**batch).logits
    model(**batch, persona="pirate")                  # one forward call
    model.generate(**inputs, persona="pirate")        # one generate call
    generate_as(model, inputs, persona="pirate", max_new_tokens=20)
    detach_bank(model)                                # plain MLPs again
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..bank import DENSE_PERSONA_ID, MaskBank, MaskBankError
from ..fingerprint import ffn_fingerprint
from ..layout import PackedFFN, pack_ffn, unpack_ffn
from ..ops import masked_ffn, resolve_backend

_ATTR = "_persona_kernels_attachment"


class PersonaState(nn.Module):
    """The current persona of each batch row, in fixed device buffers shared by every :class:`MaskedMLP`.

    ``row_ids``: int32 ``[capacity_rows]``, the first ``n_rows`` hold the current persona ids.
    ``token_ids``: int32 ``[capacity_tokens]``, refilled in place with per-token ids (row ids
    repeated over the sequence) once per forward shape. Buffers grow (reallocate) only when a call
    needs more rows or tokens than ever before; a persona switch never reallocates.
    """

    def __init__(self, device: torch.device | str = "cpu", capacity_rows: int = 64, capacity_tokens: int = 4096):
        super().__init__()
        self.register_buffer("row_ids", torch.zeros(capacity_rows, dtype=torch.int32, device=device), persistent=False)
        self.register_buffer("token_ids_buffer", torch.zeros(capacity_tokens, dtype=torch.int32, device=device), persistent=False)
        self.host_ids: list[int] = [DENSE_PERSONA_ID]
        self.version = 0
        self._filled: tuple[int, int, int, int] | None = None

    def set_ids(self, ids: Sequence[int]) -> None:
        """Write validated persona ids (one, or one per batch row) into the device buffer."""
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("a persona list needs at least one entry")
        if len(ids) > self.row_ids.numel():
            self.row_ids = torch.zeros(max(len(ids), 2 * self.row_ids.numel()), dtype=torch.int32, device=self.row_ids.device)
        self.row_ids[: len(ids)].copy_(torch.tensor(ids, dtype=torch.int32))
        self.host_ids = ids
        self.version += 1

    def token_ids(self, batch: int, seq: int) -> torch.Tensor:
        """Per-token ids ``[batch * seq]`` (a view of the fixed buffer) for a ``[batch, seq, d]`` input."""
        rows = len(self.host_ids)
        if batch % rows:
            raise ValueError(
                f"persona list has {rows} entries but the batch has {batch} rows; give one persona per row "
                "(or a single persona for the whole batch)"
            )
        total = batch * seq
        key = (batch, seq, self.version, self.token_ids_buffer.data_ptr())
        if self._filled != key:
            if total > self.token_ids_buffer.numel():
                self.token_ids_buffer = torch.zeros(
                    max(total, 2 * self.token_ids_buffer.numel()), dtype=torch.int32, device=self.token_ids_buffer.device
                )
            view = self.token_ids_buffer[:total].view(rows, batch // rows, seq)
            view.copy_(self.row_ids[:rows].view(rows, 1, 1).expand(rows, batch // rows, seq))
            self._filled = (batch, seq, self.version, self.token_ids_buffer.data_ptr())
        return self.token_ids_buffer[:total]


class MaskedMLP(nn.Module):
    """A gated MLP computed by :func:`persona_kernels.masked_ffn` over packed shared weights.

    Parameters ``gate_up [d_ff, 2, d]`` and ``down_t [d_ff, d]`` are the layer's packed weights (in the
    bank's permuted channel order when it has a permutation); buffers ``keep_bits [P + 1, words]`` and
    ``scales [P + 1, d_ff]`` (or ``None``) are this layer's slice of the bank; ``persona_state`` is
    the model-wide :class:`PersonaState`.
    """

    def __init__(
        self,
        packed: PackedFFN,
        keep_bits: torch.Tensor,
        scales: torch.Tensor | None,
        state: PersonaState,
        group_size: int,
        permutation: torch.Tensor | None = None,
        backend: str | None = None,
        original: nn.Module | None = None,
    ):
        super().__init__()
        self.gate_up = nn.Parameter(packed.gate_up, requires_grad=False)
        self.down_t = nn.Parameter(packed.down_t, requires_grad=False)
        self.register_buffer("keep_bits", keep_bits, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("permutation", permutation, persistent=False)
        self.persona_state = state
        self.activation = packed.activation
        self.group_size = group_size
        self.backend = backend
        # The emptied original MLP, kept (unregistered) so detach_bank can restore it.
        object.__setattr__(self, "_original", original)

    @property
    def packed(self) -> PackedFFN:
        """The layer's weights as a :class:`PackedFFN` (views, no copy)."""
        return PackedFFN(self.gate_up, self.down_t, self.activation)

    def unpacked_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copies of ``(W_gate, W_up, W_down)`` in the original channel order."""
        return unpack_ffn(PackedFFN(self.gate_up.detach(), self.down_t.detach(), self.activation), self.permutation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, S, d]`` (or ``[T, d]``, one row) -> ``[B, S, d]``; row ``b`` uses the state's persona of row ``b``."""
        shape = x.shape
        batch = shape[0] if x.dim() >= 3 else 1
        tokens = x.reshape(-1, shape[-1])
        ids = self.persona_state.token_ids(batch, tokens.shape[0] // batch if batch else 0)
        out = masked_ffn(
            tokens, self.gate_up, self.down_t, ids, self.keep_bits, self.scales,
            group_size=self.group_size, activation=self.activation, backend=self.backend, check_ids=False,
        )
        return out.view(shape)

    def extra_repr(self) -> str:
        d_ff, _, d = self.gate_up.shape
        return (
            f"d_model={d}, d_ff={d_ff}, group_size={self.group_size}, activation={self.activation}, "
            f"personas={self.keep_bits.shape[0]}, scales={self.scales is not None}, backend={self.backend}"
        )


@dataclass
class Attachment:
    """What :func:`attach_bank` records on the model (``model._persona_kernels_attachment``)."""

    bank: MaskBank
    state: PersonaState
    fingerprint: str
    backend: str | None
    hooks: list = field(default_factory=list)
    saved: list = field(default_factory=list)  # persona stack for per-call `persona=` kwargs


def attachment(model: nn.Module) -> Attachment | None:
    """The model's :class:`Attachment`, or ``None`` if no bank is attached."""
    return getattr(model, _ATTR, None)


def is_attached(model: nn.Module) -> bool:
    """True when a mask bank is attached to ``model``."""
    return attachment(model) is not None


def attached_bank(model: nn.Module) -> MaskBank:
    """The bank attached to ``model`` (``ValueError`` if none)."""
    return _require(model).bank


def _require(model: nn.Module) -> Attachment:
    info = attachment(model)
    if info is None:
        raise ValueError("no mask bank is attached to this model; call attach_bank(model, bank) first")
    return info


def _empty_weight(weight: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.empty(0, dtype=weight.dtype, device=weight.device), requires_grad=False)


def attach_bank(model: nn.Module, bank: MaskBank, *, backend: str | None = None) -> nn.Module:
    """Attach ``bank`` to ``model`` in place and return ``model``; the current persona starts as dense.

    Refuses (with the bank's :class:`~persona_kernels.bank.ModelMismatchError`) a bank made for a
    different model, before changing anything. ``backend`` is passed to every
    :func:`~persona_kernels.masked_ffn` call (``None``: the dispatcher's choice).
    """
    from .ffn import find_ffn_layers, ffn_weights, model_ffn_shape, model_name

    if is_attached(model):
        raise ValueError("a mask bank is already attached to this model; call detach_bank(model) first")
    layers = find_ffn_layers(model)
    n_layers, d_ff, _ = model_ffn_shape(model)
    fingerprint = ffn_fingerprint(ffn_weights(model))
    bank.check_model(fingerprint, n_layers, d_ff, model_name(model))
    device = layers[0].mlp.gate_proj.weight.device
    if backend is not None:
        resolve_backend(device, backend)  # fail now, not at the first forward
    keep_bits = bank.keep_bits(device)  # [L, P + 1, words]
    scales = bank.scales_table(device)  # [L, P + 1, d_ff] or None
    permutation = None if bank.permutation is None else bank.permutation.to(device)
    state = PersonaState(device)
    for layer in layers:
        mlp = layer.mlp
        perm = None if permutation is None else permutation[layer.index]
        packed = pack_ffn(
            mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach(), layer.activation, perm
        )
        grads = {}
        for name in ("gate_proj", "up_proj", "down_proj"):
            linear = getattr(mlp, name)
            grads[name] = linear.weight.requires_grad
            linear.weight = _empty_weight(linear.weight)  # free the unpacked copy
        object.__setattr__(mlp, "_persona_kernels_requires_grad", grads)
        layer.parent.mlp = MaskedMLP(
            packed,
            keep_bits[layer.index],
            None if scales is None else scales[layer.index],
            state,
            bank.group_size,
            perm,
            backend,
            original=mlp,
        )
    info = Attachment(bank=bank, state=state, fingerprint=fingerprint, backend=backend)
    object.__setattr__(model, _ATTR, info)
    info.hooks.append(model.register_forward_pre_hook(_forward_pre_hook, with_kwargs=True))
    info.hooks.append(model.register_forward_hook(_forward_hook, always_call=True))
    object.__setattr__(model, "generate", _make_generate(model))
    return model


def detach_bank(model: nn.Module) -> nn.Module:
    """Undo :func:`attach_bank`: restore plain MLPs with weights unpacked to the original order; return ``model``."""
    from .ffn import find_ffn_layers

    info = _require(model)
    for layer in find_ffn_layers(model):
        masked = layer.mlp
        original = masked._original
        grads = getattr(original, "_persona_kernels_requires_grad", {})
        for name, weight in zip(("gate_proj", "up_proj", "down_proj"), masked.unpacked_weights()):
            getattr(original, name).weight = nn.Parameter(weight, requires_grad=grads.get(name, True))
        layer.parent.mlp = original
    for hook in info.hooks:
        hook.remove()
    object.__delattr__(model, _ATTR)
    if "generate" in model.__dict__:
        object.__delattr__(model, "generate")
    return model


def set_backend(model: nn.Module, backend: str | None) -> None:
    """Run the attached model's masked FFNs on ``backend`` (``None``: the dispatcher's choice)."""
    from .ffn import find_ffn_layers

    info = _require(model)
    layers = find_ffn_layers(model)
    if backend is not None:
        resolve_backend(layers[0].mlp.gate_up.device, backend)
    info.backend = backend
    for layer in layers:
        layer.mlp.backend = backend


def resolve_persona_ids(bank: MaskBank, persona) -> list[int]:
    """Validate a persona spec (name/id/None or a list of them) against ``bank``; return the ids."""
    if persona is None or isinstance(persona, str):
        return [bank.persona_id(persona)]
    if isinstance(persona, torch.Tensor):
        persona = persona.flatten().tolist()
    if isinstance(persona, Sequence):
        if not persona:
            raise ValueError("a persona list needs at least one entry")
        return [resolve_persona_ids(bank, entry)[0] for entry in persona]
    try:
        index = operator.index(persona)
    except TypeError as error:
        raise MaskBankError(f"a persona is a name, an id, None or a list of those; got {persona!r}") from error
    return [bank.persona_id(int(index))]


def set_persona(model: nn.Module, persona) -> list[int]:
    """Make ``persona`` (see module docstring) the current persona of ``model``; return the ids set.

    Writes integers into the persona buffer only; no weight tensor is touched.
    """
    info = _require(model)
    ids = resolve_persona_ids(info.bank, persona)
    info.state.set_ids(ids)
    return ids


def current_persona(model: nn.Module) -> list[int]:
    """The current persona ids (one entry, or one per batch row)."""
    return list(_require(model).state.host_ids)


@contextlib.contextmanager
def persona(model: nn.Module, persona_spec) -> Iterator[list[int]]:
    """Context manager: run the block as ``persona_spec``, then restore the previous persona."""
    info = _require(model)
    previous = list(info.state.host_ids)
    ids = set_persona(model, persona_spec)
    try:
        yield ids
    finally:
        info.state.set_ids(previous)


_UNSET = object()


def _forward_pre_hook(model, args, kwargs):
    info = attachment(model)
    spec = kwargs.pop("persona", _UNSET) if info is not None else _UNSET
    if info is not None:
        info.saved.append(None if spec is _UNSET else list(info.state.host_ids))
        if spec is not _UNSET:
            set_persona(model, spec)  # on failure the always-called forward hook pops the entry
    return args, kwargs


def _forward_hook(model, args, output):
    info = attachment(model)
    if info is not None and info.saved:
        previous = info.saved.pop()
        if previous is not None:
            info.state.set_ids(previous)
    return output


def _make_generate(model: nn.Module):
    cls_generate = type(model).generate

    def generate(*args, persona=_UNSET, **kwargs):
        """``model.generate`` with an optional ``persona=`` (name/id/None or one per batch row)."""
        if persona is _UNSET:
            return cls_generate(model, *args, **kwargs)
        with _persona_cm(model, persona):
            return cls_generate(model, *args, **kwargs)

    generate.__doc__ = (cls_generate.__doc__ or "") + "\n\npersona: persona-kernels persona spec for this call."
    return generate


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
    with _persona_cm(model, persona):
        return type(model).generate(model, **kwargs)
