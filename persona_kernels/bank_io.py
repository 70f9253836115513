"""Reading and writing mask banks as safetensors files (the layout is specified in docs/FORMAT.md).

Saves are atomic: the file is written beside its destination, synced, then renamed over it.
Loads validate everything and raise :class:`MaskBankError` naming what is wrong.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from .bank import FORMAT_NAME, FORMAT_VERSION, HIDDEN_VECTORS, MaskBank, MaskBankError, PersonaMask
from .masks import channel_keep, ids_to_keep, keep_to_bits, num_words, padding_rows

_REQUIRED = ("kept_groups", "kept_offsets", "bitmaps")
_KNOWN = (*_REQUIRED, "scales", "scale_offsets", "permutation", *HIDDEN_VECTORS)


def _checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    digest.update(json.dumps({k: v for k, v in metadata.items() if k != "checksum"}, sort_keys=True).encode())
    return digest.hexdigest()


def bank_to_tensors(bank: MaskBank) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Serialise a bank into the safetensors tensors and header metadata of docs/FORMAT.md."""
    kept, offsets, scales, scale_offsets = [], [0], [], [0]
    has_scales = any(p.scales is not None for p in bank.personas)
    for persona in bank.personas:
        for layer in range(bank.n_layers):
            ids = torch.nonzero(persona.keep[layer]).flatten().to(torch.int32)
            kept.append(ids)
            offsets.append(offsets[-1] + ids.numel())
            if has_scales:
                if persona.scales is not None:
                    scales.append(persona.scales[layer][channel_keep(persona.keep[layer], bank.group_size)].float())
                    scale_offsets.append(scale_offsets[-1] + scales[-1].numel())
                else:
                    scale_offsets.append(scale_offsets[-1])
    words = num_words(bank.n_groups)
    tensors = {
        "kept_groups": torch.cat(kept) if kept else torch.zeros(0, dtype=torch.int32),
        "kept_offsets": torch.tensor(offsets, dtype=torch.int64),
        "bitmaps": keep_to_bits(torch.stack([p.keep for p in bank.personas]))
        if bank.personas
        else torch.zeros(0, bank.n_layers, words, dtype=torch.int32),
    }
    if has_scales:
        tensors["scales"] = torch.cat(scales) if scales else torch.zeros(0)
        tensors["scale_offsets"] = torch.tensor(scale_offsets, dtype=torch.int64)
    for key in HIDDEN_VECTORS:
        rows = [getattr(p, key).float() for p in bank.personas if getattr(p, key) is not None]
        if rows:
            tensors[key] = torch.stack(rows).contiguous()
    if bank.permutation is not None:
        tensors["permutation"] = bank.permutation.to(torch.int32).contiguous()
    table = [
        {
            "id": index + 1,
            "name": p.name,
            "description": p.description,
            "method": p.method,
            "sparsity": round(p.sparsity, 6),
            "has_scales": p.scales is not None,
            "has_input_gains": p.input_gains is not None,
            "has_output_bias": p.output_bias is not None,
            "report": p.report,
        }
        for index, p in enumerate(bank.personas)
    ]
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "base_model": bank.base_model,
        "fingerprint": bank.fingerprint,
        "n_layers": str(bank.n_layers),
        "d_ff": str(bank.d_ff),
        "group_size": str(bank.group_size),
        "personas": json.dumps(table),
    }
    if bank.weight_sample is not None:  # optional: readers that predate it ignore it (the checksum covers it)
        metadata["weight_sample"] = base64.b64encode(bank.weight_sample.to(torch.float32).numpy().tobytes()).decode()
        metadata["weight_dtype"] = bank.weight_dtype or "float32"
    metadata["checksum"] = _checksum(tensors, metadata)
    return tensors, metadata


def _decode_weight_sample(metadata: dict[str, str], where: str) -> torch.Tensor | None:
    encoded = metadata.get("weight_sample")
    if encoded is None:
        return None
    try:
        raw = base64.b64decode(encoded, validate=True)
    except ValueError as error:
        raise MaskBankError(f"{where}: weight_sample is not valid base64") from error
    if len(raw) % 4:
        raise MaskBankError(f"{where}: weight_sample is not a whole number of float32 values")
    return torch.frombuffer(bytearray(raw), dtype=torch.float32).clone()


def save_bank(bank: MaskBank, path: str | Path) -> None:
    """Write ``bank`` to ``path`` atomically; on any failure the previous file is left untouched.

    The bank is validated first (:meth:`MaskBank.validate`): a bank edited in place into a state that
    loading refuses raises :class:`MaskBankError` before anything is written.
    """
    bank.validate()
    path = Path(path)
    tensors, metadata = bank_to_tensors(bank)
    payload = safetensors_save(tensors, metadata=metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp_name, _new_file_mode(path))
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _new_file_mode(path: Path) -> int:
    """The replaced file's mode, else what a plain ``open`` would give (mkstemp makes files 0600)."""
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise MaskBankError(f"mask bank {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise MaskBankError(f"cannot read mask bank {str(path)!r}: truncated or not a safetensors file ({error})") from error
    return tensors, metadata


def _int_field(metadata: dict[str, str], key: str, path: Path) -> int:
    try:
        return int(metadata[key])
    except (KeyError, ValueError) as error:
        raise MaskBankError(f"mask bank {str(path)!r}: header field {key!r} is missing or not an integer") from error


def load_bank(path: str | Path) -> MaskBank:
    """Read a bank from ``path`` and validate it fully (see docs/FORMAT.md for every check)."""
    path = Path(path)
    tensors, metadata = _read(path)
    where = f"mask bank {str(path)!r}"
    if metadata.get("format") != FORMAT_NAME:
        raise MaskBankError(f"{where} is not a persona mask bank (header format {metadata.get('format')!r})")
    version = _int_field(metadata, "format_version", path)
    if version != FORMAT_VERSION:
        raise MaskBankError(f"{where} has format version {version}; this persona-kernels reads version {FORMAT_VERSION}")
    if metadata.get("checksum") != _checksum(tensors, metadata):
        raise MaskBankError(f"{where}: checksum mismatch, the file was edited or corrupted after it was written")
    missing = [name for name in _REQUIRED if name not in tensors]
    if missing:
        raise MaskBankError(f"{where}: missing tensors {missing}")
    unknown = sorted(name for name in tensors if name not in _KNOWN)
    if unknown:
        raise MaskBankError(f"{where}: unknown tensors {unknown} (written by a newer persona-kernels?)")
    n_layers, d_ff, group_size = (_int_field(metadata, k, path) for k in ("n_layers", "d_ff", "group_size"))
    if group_size < 1 or d_ff % group_size:
        raise MaskBankError(f"{where}: group size {group_size} does not divide d_ff {d_ff}")
    try:
        table = json.loads(metadata["personas"])
    except (KeyError, json.JSONDecodeError) as error:
        raise MaskBankError(f"{where}: persona table is missing or not valid JSON") from error
    if not isinstance(table, list):
        raise MaskBankError(f"{where}: persona table must be a JSON list, got {type(table).__name__}")
    for index, entry in enumerate(table):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise MaskBankError(f"{where}: persona table entry {index} is not an object with a string name")
        for key in ("description", "method"):
            if not isinstance(entry.get(key, ""), str):
                raise MaskBankError(f"{where}: persona table entry {index}: {key} must be a string")
        if not isinstance(entry.get("report", {}), dict):
            raise MaskBankError(f"{where}: persona table entry {index}: report must be an object")
    n_groups, n_personas = d_ff // group_size, len(table)
    keep = _decode_keep(tensors, n_personas, n_layers, n_groups, where)
    scales = _decode_scales(tensors, table, keep, group_size, d_ff, where)
    vectors = {key: _decode_hidden_vectors(tensors, table, n_layers, key, where) for key in HIDDEN_VECTORS}
    personas = []
    for index, entry in enumerate(table):
        if entry.get("id") != index + 1:
            raise MaskBankError(f"{where}: persona table ids must be 1..{n_personas} in order, got {entry.get('id')} at {index}")
        personas.append(
            PersonaMask(
                name=entry["name"],
                keep=keep[index],
                description=entry.get("description", ""),
                method=entry.get("method", "unknown"),
                scales=scales[index],
                report=entry.get("report", {}),
                **{key: rows[index] for key, rows in vectors.items()},
            )
        )
    permutation = tensors.get("permutation")
    return MaskBank(
        base_model=metadata.get("base_model", ""),
        fingerprint=metadata.get("fingerprint", ""),
        n_layers=n_layers,
        d_ff=d_ff,
        group_size=group_size,
        personas=personas,
        permutation=None if permutation is None else permutation.to(torch.int64),
        weight_sample=_decode_weight_sample(metadata, where),
        weight_dtype=metadata.get("weight_dtype"),
    )


def _decode_keep(tensors: dict[str, torch.Tensor], n_personas: int, n_layers: int, n_groups: int, where: str) -> torch.Tensor:
    ids, offsets, bits = tensors["kept_groups"], tensors["kept_offsets"], tensors["bitmaps"]
    if ids.dtype != torch.int32 or offsets.dtype != torch.int64 or bits.dtype != torch.int32:
        raise MaskBankError(f"{where}: kept_groups/bitmaps must be int32 and kept_offsets int64")
    if tuple(offsets.shape) != (n_personas * n_layers + 1,) or int(offsets[0]) != 0 or int(offsets[-1]) != ids.numel():
        raise MaskBankError(f"{where}: kept_offsets do not partition kept_groups into {n_personas} personas x {n_layers} layers")
    if tuple(bits.shape) != (n_personas, n_layers, num_words(n_groups)):
        raise MaskBankError(
            f"{where}: bitmaps shape {list(bits.shape)} does not match {n_personas} personas x {n_layers} layers x "
            f"{num_words(n_groups)} words (wrong group size?)"
        )
    keep = torch.zeros(n_personas, n_layers, n_groups, dtype=torch.bool)
    for segment in range(n_personas * n_layers):
        start, stop = int(offsets[segment]), int(offsets[segment + 1])
        persona, layer = divmod(segment, n_layers)
        group_ids = ids[start:stop]
        if stop < start:
            raise MaskBankError(f"{where}: kept_offsets decrease at persona {persona + 1} layer {layer}")
        if group_ids.numel() and (int(group_ids.min()) < 0 or int(group_ids.max()) >= n_groups):
            raise MaskBankError(
                f"{where}: persona {persona + 1} layer {layer} has group ids out of range [0, {n_groups}) "
                f"(min {int(group_ids.min())}, max {int(group_ids.max())}; wrong group size?)"
            )
        if group_ids.numel() > 1 and not bool((group_ids[1:] > group_ids[:-1]).all()):
            raise MaskBankError(f"{where}: persona {persona + 1} layer {layer} has duplicate or unsorted group ids")
        keep[persona, layer] = ids_to_keep(group_ids, n_groups)
    stray = padding_rows(bits, n_groups)
    if bool(stray.any()):
        persona, layer = (int(i) for i in torch.nonzero(stray)[0])
        raise MaskBankError(f"{where}: bitmaps of persona {persona + 1} layer {layer} set bits past the last group "
                            f"(group {n_groups - 1})")
    if not torch.equal(keep_to_bits(keep), bits):
        raise MaskBankError(f"{where}: bitmaps disagree with kept_groups")
    return keep


def _decode_scales(
    tensors: dict[str, torch.Tensor], table: list[dict], keep: torch.Tensor, group_size: int, d_ff: int, where: str
) -> list[torch.Tensor | None]:
    wanted = [bool(entry.get("has_scales")) for entry in table]
    if not any(wanted):
        if "scales" in tensors:
            raise MaskBankError(f"{where}: holds scales but no persona is marked has_scales")
        return [None] * len(table)
    if "scales" not in tensors or "scale_offsets" not in tensors:
        raise MaskBankError(f"{where}: personas are marked has_scales but the scales tensors are missing")
    flat, offsets = tensors["scales"], tensors["scale_offsets"]
    n_personas, n_layers = keep.shape[:2]
    if flat.dtype != torch.float32 or tuple(offsets.shape) != (n_personas * n_layers + 1,) or int(offsets[-1]) != flat.numel():
        raise MaskBankError(f"{where}: scale_offsets do not partition scales into {n_personas} personas x {n_layers} layers")
    if not torch.isfinite(flat).all():
        raise MaskBankError(f"{where}: scales contain NaN or infinity")
    result: list[torch.Tensor | None] = []
    for persona in range(n_personas):
        table_scales = torch.ones(n_layers, d_ff) if wanted[persona] else None
        for layer in range(n_layers):
            start, stop = int(offsets[persona * n_layers + layer]), int(offsets[persona * n_layers + layer + 1])
            channels = channel_keep(keep[persona, layer], group_size)
            expected = int(channels.sum()) if wanted[persona] else 0
            if stop - start != expected:
                raise MaskBankError(
                    f"{where}: persona {persona + 1} layer {layer} has {stop - start} scales, expected {expected} (one per kept channel)"
                )
            if table_scales is not None:
                table_scales[layer, channels] = flat[start:stop]
        result.append(table_scales)
    return result


def _decode_hidden_vectors(tensors: dict[str, torch.Tensor], table: list[dict], n_layers: int, key: str,
                           where: str) -> list[torch.Tensor | None]:
    """Per-persona ``[L, d_model]`` rows of the optional tensor ``key`` (``input_gains`` or ``output_bias``)."""
    flag = f"has_{key}"
    wanted = [bool(entry.get(flag)) for entry in table]
    if not any(wanted):
        if key in tensors:
            raise MaskBankError(f"{where}: holds {key} but no persona is marked {flag}")
        return [None] * len(table)
    if key not in tensors:
        raise MaskBankError(f"{where}: personas are marked {flag} but the {key} tensor is missing")
    stacked = tensors[key]
    count = sum(wanted)
    if stacked.dtype != torch.float32 or stacked.dim() != 3 or tuple(stacked.shape[:2]) != (count, n_layers):
        raise MaskBankError(
            f"{where}: {key} must be float32 [{count}, {n_layers}, d_model] (one row per persona marked "
            f"{flag}), got {stacked.dtype} {list(stacked.shape)}"
        )
    if not torch.isfinite(stacked).all():
        raise MaskBankError(f"{where}: {key} contain NaN or infinity")
    rows = iter(stacked)
    return [next(rows).clone() if flagged else None for flagged in wanted]
