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
"""

from __future__ import annotations

import contextlib
import functools
import operator
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..bank import DENSE_PERSONA_ID, DENSE_PERSONA_NAME, MaskBank, MaskBankError
from ..fingerprint import ffn_fingerprint, ffn_weight_sample
from ..layout import PackedFFN, pack_ffn, unpack_ffn
from ..ops import masked_ffn, resolve_backend
from ..step_meta import StepMeta

_ATTR = "_persona_kernels_attachment"


class PersonaState(nn.Module):
    """The current persona of each batch row and the per-step metadata, in device buffers shared by every layer.

    Buffers (all on the model's device, addresses stable while capacity suffices):

    - ``row_table``: int32 ``[1 + capacity_rows]``: entry 0 counts the current list's entries,
      ``row_ids`` (the rest) holds them. :meth:`set_ids` writes both (a ``fill_`` of ``row_ids`` for
      one persona, which makes any count read right; else one non-blocking copy from a pinned
      host staging ring on CUDA; plain stores into the buffer's memory on the CPU).
    - ``token_ids_buffer``: int32 ``[capacity_tokens]``; :meth:`prepare` refills its first
      ``batch * seq`` entries on every call: row ``b`` of the batch gets ``row_ids[b * count //
      batch]``, computed on the device, so a replayed graph follows a list of another length too.
    - ``keep_bits``: int32 ``[L, P + 1, W]``, every layer's bitmaps (each :class:`MaskedMLP` holds a
      view of its layer), digested by the shared :class:`~persona_kernels.step_meta.StepMeta`.
    - ``meta`` (not a registered buffer): one ``StepMeta`` for all layers, made on first need and
      refilled by :meth:`prepare` while the model runs on the Triton backend (``use_meta``).

    The model's forward pre-hook calls :meth:`prepare` once per forward, so the per-token ids and
    the metadata are rewritten by device ops inside every forward: a CUDA graph captured around a
    forward replays them too, and reads whatever ids :func:`set_persona` wrote into ``row_ids``
    since. Buffers grow (reallocate, doubling) only when a call needs more rows or tokens than any
    call before; capture graphs after a warm-up forward at the largest shape (or call
    :meth:`reserve`) and one eager forward at each shape you capture (the Triton kernels tune per
    shape class, and tuning inside a capture raises), and never switch persona inside a capture.
    """

    STAGING_SLOTS = 4
    """Pinned host staging rows on CUDA: a slot is reused only after its previous copy ran."""

    DEFAULT_CAPACITY_ROWS = 64
    """Batch rows the buffers hold before they first grow; also the StepMeta's persona slots."""

    def __init__(
        self,
        device: torch.device | str = "cpu",
        capacity_rows: int = DEFAULT_CAPACITY_ROWS,
        capacity_tokens: int = 4096,
        keep_bits: torch.Tensor | None = None,
        n_groups: int = 0,
    ):
        super().__init__()
        table = torch.zeros(1 + capacity_rows, dtype=torch.int32, device=device)
        table[0] = 1
        self.register_buffer("row_table", table, persistent=False)
        self.register_buffer("token_ids_buffer", torch.zeros(capacity_tokens, dtype=torch.int32, device=device), persistent=False)
        self.register_buffer("keep_bits", keep_bits, persistent=False)
        self.n_groups = n_groups
        self.use_meta = False
        self.requested_backend: str | None = None  # as given to attach_bank / set_backend
        self.meta: StepMeta | None = None
        self.host_ids: list[int] = [DENSE_PERSONA_ID]
        self.version = 0
        self.prepared_tokens = -1  # tokens of the last prepare; -1: none since the last switch or growth
        self.token_view: torch.Tensor | None = None
        self._bind()

    # ---------------------------------------------------------------- plain-attribute aliases

    def _bind(self) -> None:
        """Refresh the hot-path aliases of the buffers (after init, growth, or ``model.to``).

        The hot paths read and write plain instance attributes (``__dict__``), never through
        ``nn.Module.__getattr__``/``__setattr__``, which cost a microsecond or more each.
        """
        d = self.__dict__
        table = self._buffers["row_table"]
        d["_table"], d["_count"], d["_rows"] = table, table[:1], table[1:]
        d["_tokens"] = self._buffers["token_ids_buffer"]
        d["_cuda"] = table.device.type == "cuda"
        d["_table_np"] = None if d["_cuda"] else _numpy_view(table)
        d["_staging"] = d["_staging_np"] = None
        d["_events"] = []
        d["_slot"] = 0
        if d["_cuda"]:
            staging = torch.zeros(self.STAGING_SLOTS, table.numel(), dtype=torch.int32, pin_memory=True)
            d["_staging"] = list(staging.unbind(0))
            d["_staging_np"] = _numpy_view(staging)
            d["_events"] = [torch.cuda.Event() for _ in range(self.STAGING_SLOTS)]
        if self.meta is not None and self.meta.token_ids.device != table.device:
            d["meta"] = None
        d["prepared_tokens"] = -1
        d["token_view"] = None

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module._apply`` (``.to``, ``.cuda``, ``share_memory``, ...), then re-bind the aliases to
        the buffers' (possibly new) memory, and re-resolve the backend when the device type changed."""
        before = (self._table.device.type, self._table.data_ptr(), self._tokens.data_ptr())
        result = super()._apply(fn, recurse)
        table, tokens = self._buffers["row_table"], self._buffers["token_ids_buffer"]
        # Storage can move under the same tensor objects (share_memory_); the state is applied once per
        # layer that holds it, so re-bind (new pinned staging on CUDA) only when something moved.
        if (table.device.type, table.data_ptr(), tokens.data_ptr()) != before or table is not self._table:
            self._bind()
        if table.device.type != before[0]:
            _configure_state(self, self.requested_backend)
        return result

    _ALIASES = ("_table", "_count", "_rows", "_tokens", "_table_np", "_staging", "_staging_np", "_events", "_slot")

    def __getstate__(self) -> dict:
        """State for ``copy.deepcopy`` and pickling, without the aliases :meth:`_bind` derives (a
        copied NumPy view would no longer share the copied table's memory; CUDA events do not copy)."""
        state = self.__dict__.copy()
        for key in self._ALIASES:
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._bind()

    @property
    def row_ids(self) -> torch.Tensor:
        """int32 ``[capacity_rows]`` device buffer of the current persona list (a view of ``row_table``)."""
        return self._rows

    # ----------------------------------------------------------------------------- capacity

    def reserve(self, rows: int, tokens: int) -> None:
        """Grow the buffers (never shrink) to hold ``rows`` persona rows and ``tokens`` tokens per forward.

        Call it (or run one forward at the largest shape) before capturing CUDA graphs: growth
        reallocates, and a captured graph keeps reading the old addresses.
        """
        if rows > self._rows.numel():
            table = _grown(self._table, 1 + rows)
            table[: self._table.numel()].copy_(self._table)
            self._buffers["row_table"] = table
        if tokens > self._tokens.numel():
            self._buffers["token_ids_buffer"] = _grown(self._tokens, tokens)
        if self._table is not self._buffers["row_table"] or self._tokens is not self._buffers["token_ids_buffer"]:
            self._bind()
        if self.meta is not None or (self.use_meta and tokens > 0):
            self._ensure_meta(tokens)  # also while another backend runs: its slots must cover the rows when Triton is back

    def _ensure_meta(self, tokens: int) -> StepMeta:
        """The shared ``StepMeta``, remade when a forward needs more tokens (doubling) or the row
        capacity outgrew its persona slots. A step holds at most one persona per batch row, so
        slots are bounded by the row capacity, not by the bank's persona count."""
        meta = self.meta
        n_personas = self.keep_bits.shape[1]
        rows = self._rows.numel()
        if meta is None or meta.max_tokens < tokens or meta.max_slots < min(n_personas, rows, meta.max_tokens):
            from ..backends.triton_backend import PREFILL_BLOCK_M

            if meta is None:
                capacity = tokens
            elif tokens > meta.max_tokens:
                capacity = max(tokens, 2 * meta.max_tokens)
            else:
                capacity = meta.max_tokens
            meta = StepMeta.make(capacity, self.n_groups, n_personas, self._rows.device, n_layers=self.keep_bits.shape[0],
                                 block_m=PREFILL_BLOCK_M, prefill=True, max_slots=rows)
            self.__dict__["meta"] = meta
        return meta

    # ----------------------------------------------------------------------------- hot paths

    def set_ids(self, ids: list[int]) -> None:
        """Make ``ids`` (validated persona ids: one, or one per batch row) current; host work only plus
        one device op (``fill_`` or a non-blocking copy from pinned memory). Allocates nothing once
        the row capacity suffices. ``ids`` is kept (not copied): do not mutate it afterwards."""
        n = len(ids)
        if n == 0:
            raise ValueError("a persona list needs at least one entry")
        d = self.__dict__
        if n > d["_rows"].numel():
            self.reserve(n, 0)
        if d["_cuda"]:
            if n == 1:
                d["_rows"].fill_(ids[0])
            else:
                slot = d["_slot"]
                d["_slot"] = (slot + 1) % self.STAGING_SLOTS
                event = d["_events"][slot]
                event.synchronize()  # the slot's previous copy has read it (returns at once if never recorded)
                staging = d["_staging_np"][slot]
                staging[0] = n
                staging[1 : n + 1] = ids
                d["_table"].copy_(d["_staging"][slot], non_blocking=True)  # count and ids in one copy
                event.record()
        else:
            table = d["_table_np"]
            table[0] = n
            table[1 : n + 1] = ids
        d["host_ids"] = ids
        d["version"] += 1
        d["prepared_tokens"] = -1

    def prepare(self, batch: int, seq: int) -> torch.Tensor:
        """Refill the per-token ids (and, on the Triton path, the shared ``StepMeta``) for a ``[batch, seq]`` forward.

        Always rewrites the buffers with device ops (an expand-copy of ``row_ids``; the StepMeta's
        sort/scan/scatter), so it is graph-capturable, needs no host sync, and allocates no
        persistent buffer while capacity suffices (the StepMeta refill uses a few temporaries). Returns the per-token ids ``[batch * seq]`` (a view of the fixed buffer).
        Raises ``ValueError`` when the persona list does not cover the batch.
        """
        d = self.__dict__
        rows = len(d["host_ids"])
        if batch % rows:
            raise ValueError(
                f"persona list has {rows} entries but the batch has {batch} rows; give one persona per row "
                "(or a single persona for the whole batch)"
            )
        total = batch * seq
        if total > d["_tokens"].numel():
            self.reserve(rows, total)
        view = d["_tokens"][:total]
        if total:
            self._expand_rows(view, batch, seq)
            if d["use_meta"]:
                meta = d["meta"]
                if meta is None or meta.max_tokens < total:
                    meta = self._ensure_meta(total)
                meta.prepare(view, self.keep_bits)
        d["token_view"] = view
        d["prepared_tokens"] = total
        return view

    def _expand_rows(self, out: torch.Tensor, batch: int, seq: int) -> None:
        """``out [batch * seq]`` = each token's persona: batch row ``b`` takes ``row_ids[b * count // batch]``.

        Device ops on sizes and buffers only (never on the host list), so a CUDA graph captured
        with one persona list replays right after :meth:`set_ids` wrote a list of another length.
        """
        d = self.__dict__
        rows = d["_rows"]
        index = torch.arange(batch, dtype=torch.int32, device=rows.device) * d["_count"] // batch
        out.view(batch, seq).copy_(rows.index_select(0, index).view(batch, 1).expand(batch, seq))

    def token_ids(self, batch: int, seq: int) -> torch.Tensor:
        """Deprecated alias of :meth:`prepare` (the model's forward pre-hook calls it already)."""
        return self.prepare(batch, seq)


def _numpy_view(tensor: torch.Tensor):
    """A NumPy array sharing ``tensor``'s (CPU) memory, for stores without creating tensors."""
    return tensor.numpy()


def _grown(buffer: torch.Tensor, needed: int) -> torch.Tensor:
    """A zeroed buffer like ``buffer`` with room for ``needed`` entries (at least double)."""
    return torch.zeros(max(needed, 2 * buffer.numel()), dtype=buffer.dtype, device=buffer.device)


class MaskedMLP(nn.Module):
    """A gated MLP computed by :func:`persona_kernels.masked_ffn` over packed shared weights.

    Parameters ``gate_up [d_ff, 2, d]`` and ``down_t [d_ff, d]`` are the layer's packed weights (in the
    bank's permuted channel order when it has a permutation); buffers ``keep_bits [P + 1, words]``,
    ``scales [P + 1, d_ff]``, ``input_gains [P + 1, d]`` and ``output_bias [P + 1, d]`` (the last three
    may be ``None``) are this layer's slice of the bank; ``persona_state`` is the model-wide
    :class:`PersonaState`.
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
        layer_index: int = 0,
        input_gains: torch.Tensor | None = None,
        output_bias: torch.Tensor | None = None,
    ):
        super().__init__()
        self.gate_up = nn.Parameter(packed.gate_up, requires_grad=False)
        self.down_t = nn.Parameter(packed.down_t, requires_grad=False)
        self.register_buffer("keep_bits", keep_bits, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("input_gains", input_gains, persistent=False)
        self.register_buffer("output_bias", output_bias, persistent=False)
        self.register_buffer("permutation", permutation, persistent=False)
        self.persona_state = state
        self.activation = packed.activation
        self.group_size = group_size
        self.backend = backend
        self.layer_index = layer_index
        # The emptied original MLP, kept (unregistered) so detach_bank can restore it.
        object.__setattr__(self, "_original", original)

    FLOAT32_TABLES = ("scales", "input_gains", "output_bias")
    """Per-persona tables the kernels read in float32, whatever the weights' dtype."""

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module._apply``, except that a dtype cast (``model.half()``, ``.to(torch.bfloat16)``)
        leaves the float32 per-persona tables in float32: they follow the device only, as when a bank
        is attached to a model cast beforehand."""
        tables = {name: self._buffers[name] for name in self.FLOAT32_TABLES if self._buffers.get(name) is not None}
        result = super()._apply(fn, recurse)
        for name, before in tables.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return result

    @property
    def packed(self) -> PackedFFN:
        """The layer's weights as a :class:`PackedFFN` (views, no copy)."""
        return PackedFFN(self.gate_up, self.down_t, self.activation)

    def unpacked_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copies of ``(W_gate, W_up, W_down)`` in the original channel order."""
        return unpack_ffn(PackedFFN(self.gate_up.detach(), self.down_t.detach(), self.activation), self.permutation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, S, d]`` (or ``[T, d]``, one row) -> same shape; row ``b`` uses the state's persona of row ``b``.

        Reads the per-token ids (and on the Triton path the shared ``StepMeta``, at ``layer_index``)
        that the model's forward pre-hook prepared. Only when none were prepared for this call (the
        MLP run outside the attached model's forward, or after a switch with no forward since) does
        it call :meth:`PersonaState.prepare` itself.
        """
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        n_tokens = tokens.shape[0]
        state = self.persona_state
        ids = state.token_view
        if state.prepared_tokens != n_tokens:
            batch = shape[0] if x.dim() >= 3 else 1
            ids = state.prepare(batch, n_tokens // batch if batch else 0)
        if state.use_meta:
            out = _masked_ffn_triton(
                tokens, self.gate_up, self.down_t, ids, self.keep_bits, self.scales,
                group_size=self.group_size, activation=self.activation, meta=state.meta, layer=self.layer_index,
                input_gains=self.input_gains, output_bias=self.output_bias,
            )
        else:
            out = masked_ffn(
                tokens, self.gate_up, self.down_t, ids, self.keep_bits, self.scales,
                group_size=self.group_size, activation=self.activation, backend=self.backend, check_ids=False,
                input_gains=self.input_gains, output_bias=self.output_bias,
            )
        return out.view(shape)

    def extra_repr(self) -> str:
        d_ff, _, d = self.gate_up.shape
        return (
            f"d_model={d}, d_ff={d_ff}, group_size={self.group_size}, activation={self.activation}, "
            f"personas={self.keep_bits.shape[0]}, scales={self.scales is not None}, "
            f"input_gains={self.input_gains is not None}, output_bias={self.output_bias is not None}, backend={self.backend}, "
            f"layer_index={self.layer_index}"
        )


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
    return getattr(model, _ATTR, None)


def is_attached(model: nn.Module) -> bool:
    """True when a mask bank is attached to ``model``."""
    return attachment(model) is not None


def attached_bank(model: nn.Module) -> MaskBank:
    """The bank attached to ``model`` (``ValueError`` if none)."""
    return _require(model).bank


def _masked_ffn_triton(*args, **kwargs) -> torch.Tensor:
    """:func:`persona_kernels.backends.triton_backend.masked_ffn_triton`, imported on first use."""
    from ..backends.triton_backend import masked_ffn_triton

    return masked_ffn_triton(*args, **kwargs)


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
    :func:`~persona_kernels.masked_ffn` call (``None``: the dispatcher's choice). When the backend
    resolves to ``triton`` (``None`` on a GPU), the layers instead call the Triton launcher with one
    ``StepMeta`` shared by all layers, prepared once per forward (see :class:`PersonaState`).
    """
    from .ffn import find_ffn_layers, ffn_weights, model_ffn_shape, model_name

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
        info = Attachment(bank=bank, state=state, fingerprint=fingerprint, backend=backend, lookup=_persona_lookup(bank),
                          weight_sample=weight_sample)
        _configure_state(state, backend)
        object.__setattr__(model, _ATTR, info)
        info.hooks.append(model.register_forward_pre_hook(_forward_pre_hook, with_kwargs=True))
        info.hooks.append(model.register_forward_hook(_forward_hook, always_call=True))
        for name in ("generate", "forward"):
            if hasattr(type(model), name):  # a bare decoder (LlamaModel) has no generate
                object.__setattr__(model, name, _with_persona_keyword(model, name))
    except BaseException:
        _undo_attach(model, converted)
        raise
    return model


def detach_bank(model: nn.Module) -> nn.Module:
    """Undo :func:`attach_bank`: restore plain MLPs with weights unpacked to the original order; return ``model``."""
    from .ffn import find_ffn_layers

    _require(model)
    _undo_attach(model, find_ffn_layers(model))
    return model


def _undo_attach(model: nn.Module, layers) -> None:
    """Restore ``layers``' original MLPs and remove whatever of the attachment exists (also halfway)."""
    _restore_layers(layers)
    info = model.__dict__.pop(_ATTR, None)
    for hook in info.hooks if info is not None else ():
        hook.remove()
    for name in ("generate", "forward"):
        _remove_persona_keyword(model, name)


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
    from .ffn import find_ffn_layers

    info = _require(model)
    layers = find_ffn_layers(model)
    if backend is not None:
        resolve_backend(layers[0].mlp.gate_up.device, backend)
    info.backend = backend
    for layer in layers:
        layer.mlp.backend = backend
    _configure_state(info.state, backend)


def _configure_state(state: PersonaState, backend: str | None) -> None:
    """Switch the shared-``StepMeta`` Triton path on when ``backend`` resolves to ``triton`` on the state's device.

    Resolved here, once: a ``PERSONA_KERNELS_BACKEND`` set later does not re-route the attached model.
    An existing ``StepMeta`` is kept (not freed) while another backend runs, so a CUDA graph captured
    on the Triton path still finds its buffers when the backend is switched back.
    """
    state.__dict__["requested_backend"] = backend
    state.__dict__["use_meta"] = resolve_backend(state.row_ids.device, backend) == "triton"
    state.__dict__["prepared_tokens"] = -1  # the next forward refills what the new path reads


def resolve_persona_ids(bank: MaskBank, persona) -> list[int]:
    """Validate a persona spec (name/id/None, or a list, tuple, tensor or NumPy array of them) against
    ``bank``; return the ids."""
    if hasattr(persona, "tolist") and getattr(persona, "ndim", 0) > 0:  # torch tensors, NumPy arrays
        persona = persona.reshape(-1).tolist()
    if isinstance(persona, Sequence) and not isinstance(persona, (str, bytes)):
        if not persona:
            raise ValueError("a persona list needs at least one entry")
        return [_resolve_one(bank, entry) for entry in persona]
    return [_resolve_one(bank, persona)]


def _resolve_one(bank: MaskBank, entry) -> int:
    """One persona: a name, an integer id (not a bool), or None."""
    if entry is None or isinstance(entry, str):
        return bank.persona_id(entry)
    nested = isinstance(entry, Sequence) or getattr(entry, "ndim", 0) > 0
    try:
        if isinstance(entry, (bool, bytes)) or nested:
            raise TypeError
        index = operator.index(entry)
    except TypeError as error:
        raise MaskBankError(f"a persona is a name, an integer id, None or a list of those; got {entry!r}") from error
    return bank.persona_id(int(index))


def _persona_lookup(bank: MaskBank) -> dict:
    """``{name: id, id: id, None: 0, "dense": 0}`` for every persona of ``bank`` as attached."""
    lookup: dict = {None: DENSE_PERSONA_ID, DENSE_PERSONA_NAME: DENSE_PERSONA_ID}
    lookup.update({i: i for i in range(len(bank.personas) + 1)})
    lookup.update({name: i + 1 for i, name in enumerate(bank.names)})
    return lookup


_FAST_TYPES = (str, int, type(None))


def _resolve_fast(info: Attachment, persona) -> list[int]:
    """:func:`resolve_persona_ids` against the attach-time lookup: dict hits for names, ids and None;
    anything unusual (tensors, NumPy ints, errors) goes through the general resolver."""
    lookup = info.lookup
    kind = type(persona)
    if kind in _FAST_TYPES:
        pid = lookup.get(persona)
        if pid is not None:
            return [pid]
    elif kind is list or kind is tuple:
        ids = [lookup.get(entry) if type(entry) in _FAST_TYPES else None for entry in persona]
        if ids and None not in ids:
            return ids
    ids = resolve_persona_ids(info.bank, persona)
    n_ids = info.state.keep_bits.shape[1]  # ids 0..P have bitmaps on the device
    bad = [i for i in ids if not 0 <= i < n_ids]
    if bad:  # a persona added to the bank after attach has no bitmap on the device
        raise MaskBankError(f"persona id {bad[0]} out of range: the attached bank has ids 0..{n_ids - 1}")
    return ids


def set_persona(model: nn.Module, persona) -> list[int]:
    """Make ``persona`` (see module docstring) the current persona of ``model``; return the ids set.

    Validates on the host (a dict lookup built at attach), then writes the ids and their count into
    the fixed ``row_table`` buffer (one ``fill_``, or one non-blocking copy from pinned memory on
    CUDA; no tensor is created, no weight touched). The next forward's pre-hook expands them to
    per-token ids on the device, so a CUDA graph replayed after this call reads the new ids, also
    when the list has another length than at capture (give a length that divides the captured
    batch: row ``b`` of ``B`` takes entry ``b * n // B``). Do not call it while a CUDA graph is being
    captured.
    """
    info = getattr(model, _ATTR, None)
    if info is None:
        info = _require(model)
    ids = _resolve_fast(info, persona)
    info.state.set_ids(ids)
    return ids[:]  # the state keeps `ids` itself


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


def _forward_pre_hook(model, args, kwargs):
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


def _forward_hook(model, args, output):
    info = attachment(model)
    if info is not None and info.saved:
        previous = info.saved.pop()
        if previous is not None:
            info.state.set_ids(previous)
    return output


_INNER = "_persona_kernels_inner_{}"
"""Attribute holding an instance-level ``generate``/``forward`` found at attach (accelerate's device
hooks put one there), which the persona wrapper calls and :func:`detach_bank` puts back."""


def _with_persona_keyword(model: nn.Module, name: str):
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


def _remove_persona_keyword(model: nn.Module, name: str) -> None:
    """Undo :func:`_with_persona_keyword` when the wrapper is still what the model holds: put back what
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
