"""Where a capability run keeps its results: one JSON line per (item, method) under
``<out>/items/<suite>/<persona>/<method>.jsonl``, and the method names those files use."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

DENSE, PERSONA, RECOVERY = "dense", "persona", "persona+recovery"
SHARED = "_shared"
"""The persona folder of rows that do not depend on a persona (the dense model's multiple choice)."""


def item_path(out_dir: Path, suite: str, persona: str, method: str) -> Path:
    """Where one (suite, persona, method)'s item lines live."""
    return out_dir / "items" / suite / persona / f"{method}.jsonl"


def read_lines(path: Path) -> dict[str, dict]:
    """Saved item lines by item id (a torn last line from an interrupted write is skipped)."""
    rows: dict[str, dict] = {}
    if path.is_file():
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                rows[row["id"]] = row
    return rows


def append_lines(path: Path, rows: Sequence[dict]) -> None:
    """Append ``rows`` as JSON lines to ``path`` (creating its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
