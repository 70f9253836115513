"""The offline model cache: where dequantised safetensors copies of GGUF models live, and the
conversion that writes one atomically (used by the default model and the split-GGUF models)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

COMPLETE_MARKER = "persona_kernels_cache_complete"
"""File written last into a cache directory: its presence means the copy is complete."""


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache directory: ``cache_dir``, else ``$PERSONA_KERNELS_CACHE``, else ``~/.cache/persona-kernels``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("PERSONA_KERNELS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "persona-kernels"


def set_model_name(model, tokenizer, name: str) -> None:
    """Record ``name`` as the model's (and tokenizer's) ``name_or_path``: banks check it."""
    model.config.name_or_path = name
    model.name_or_path = name
    if tokenizer is not None:
        tokenizer.name_or_path = name


def convert_gguf(gguf: Path, target: Path, name: str) -> None:
    """Dequantise the GGUF file ``gguf`` into a safetensors checkpoint at ``target`` (atomically), named ``name``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers refuses to save a model it believes is quantised; the weights are dense now.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False if attr == "is_quantized" else None)
            except (AttributeError, TypeError):
                pass
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    set_model_name(model, tokenizer, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        model.save_pretrained(str(temp), safe_serialization=True)
        tokenizer.save_pretrained(str(temp))
        (temp / COMPLETE_MARKER).write_text(f"{gguf}\n")
        os.chmod(temp, 0o755)
        try:
            os.replace(temp, target)
        except OSError:
            if not (target / COMPLETE_MARKER).is_file():  # lost a race to a broken dir: replace it
                shutil.rmtree(target, ignore_errors=True)
                os.replace(temp, target)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
