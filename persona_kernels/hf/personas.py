"""Choosing the persona of an attached model: validating persona specs against the bank, setting the
current persona (sticky or scoped) by writing ids into the shared state's buffers."""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator, Sequence

from torch import nn

from ..bank import DENSE_PERSONA_ID, DENSE_PERSONA_NAME, MaskBank, MaskBankError
from .attachment import ATTACHMENT_ATTR, Attachment, require_attachment


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


def persona_lookup(bank: MaskBank) -> dict:
    """``{name: id, id: id, None: 0, "dense": 0}`` for every persona of ``bank`` as attached."""
    lookup: dict = {None: DENSE_PERSONA_ID, DENSE_PERSONA_NAME: DENSE_PERSONA_ID}
    lookup.update({i: i for i in range(len(bank.personas) + 1)})
    lookup.update({name: i + 1 for i, name in enumerate(bank.names)})
    return lookup


_FAST_TYPES = (str, int, type(None))


def resolve_fast(info: Attachment, persona) -> list[int]:
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
    info = getattr(model, ATTACHMENT_ATTR, None)
    if info is None:
        info = require_attachment(model)
    ids = resolve_fast(info, persona)
    info.state.set_ids(ids)
    return ids[:]  # the state keeps `ids` itself


def current_persona(model: nn.Module) -> list[int]:
    """The current persona ids (one entry, or one per batch row)."""
    return list(require_attachment(model).state.host_ids)


@contextlib.contextmanager
def persona(model: nn.Module, persona_spec) -> Iterator[list[int]]:
    """Context manager: run the block as ``persona_spec``, then restore the previous persona."""
    info = require_attachment(model)
    previous = list(info.state.host_ids)
    ids = set_persona(model, persona_spec)
    try:
        yield ids
    finally:
        info.state.set_ids(previous)

