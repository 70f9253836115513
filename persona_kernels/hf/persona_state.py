"""The per-step persona state every masked layer of an attached model shares: fixed device buffers of
the current persona of each batch row, expanded to per-token ids (and the Triton path's ``StepMeta``)
once per forward."""

from __future__ import annotations

import torch
from torch import nn

from ..bank import DENSE_PERSONA_ID
from ..ops import resolve_backend
from ..step_meta import StepMeta


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
            configure_state(self, self.requested_backend)
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


def configure_state(state: PersonaState, backend: str | None) -> None:
    """Switch the shared-``StepMeta`` Triton path on when ``backend`` resolves to ``triton`` on the state's device.

    Resolved here, once: a ``PERSONA_KERNELS_BACKEND`` set later does not re-route the attached model.
    An existing ``StepMeta`` is kept (not freed) while another backend runs, so a CUDA graph captured
    on the Triton path still finds its buffers when the backend is switched back.
    """
    state.__dict__["requested_backend"] = backend
    state.__dict__["use_meta"] = resolve_backend(state.row_ids.device, backend) == "triton"
    state.__dict__["prepared_tokens"] = -1  # the next forward refills what the new path reads

