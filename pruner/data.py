"""Instruction pools, persona files, the package's assets, and the append-only JSONL cache of generated data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .config import PrunerInputError

ASSETS = Path(__file__).parent / "assets"


def text_hash(text: str) -> str:
    """Short stable hash of a text (cache keys)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file (blank lines skipped)."""
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


def load_pool(path: str | Path | None = None, limit: int | None = None) -> list[str]:
    """Instructions of a pool JSONL (field ``instruction``, or ``question``); ``None``: the package's generic pool.

    A larger pool is subsampled deterministically (evenly spaced rows) down to ``limit``.
    """
    rows = read_jsonl(path if path is not None else ASSETS / "generic_pool.jsonl")
    instructions = [str(r.get("instruction") or r.get("question") or "").strip() for r in rows]
    instructions = [i for i in dict.fromkeys(instructions) if i]
    if not instructions:
        raise PrunerInputError(f"instruction pool {path} holds no instructions")
    if limit is not None and len(instructions) > limit:
        step = len(instructions) / limit
        instructions = [instructions[int(i * step)] for i in range(limit)]
    return instructions


def reference_personas() -> list[str]:
    """Descriptions of the package's reference personas (the contrast of the sensitivity filter)."""
    return [r["description"] for r in read_jsonl(ASSETS / "reference_personas.jsonl")]


def load_personas(path: str | Path, ids: list[str] | None = None) -> list[dict]:
    """Persona rows (``id``, ``description``, ...) of a personas JSONL, optionally only ``ids`` (in that order)."""
    rows = read_jsonl(path)
    by_id = {r["id"]: r for r in rows}
    if ids is None:
        return rows
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise PrunerInputError(f"persona ids {missing} are not in {path}; it holds {sorted(by_id)}")
    return [by_id[i] for i in ids]


class JsonlCache:
    """Append-only JSONL store of generated rows keyed by a string; an interrupted run keeps what it wrote."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: dict[str, dict] = {}
        if self.path.is_file():
            with open(self.path, encoding="utf-8") as stream:
                for line in stream:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by an interruption
                        continue
                    self.rows[row["key"]] = row

    def get(self, key: str) -> dict | None:
        """The stored row for ``key`` or ``None``."""
        return self.rows.get(key)

    def put_many(self, rows: list[dict]) -> None:
        """Append rows (each with a ``key``) and flush them to disk."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as stream:
            for row in rows:
                stream.write(json.dumps(row) + "\n")
                self.rows[row["key"]] = row
            stream.flush()
