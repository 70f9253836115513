"""Shared set-up of the exploratory scale scripts: the default model, one persona's calibration data and
its held-out fidelity measure, with the settings of docs/SCALES.md's recipe (160 sequences, 32-token answers)."""
import argparse
from pathlib import Path

import torch

from persona_kernels.hf.default_model import load_default_model
from pruner.config import PrunerConfig
from pruner.data import JsonlCache, load_personas
from pruner.experiment import SHARED, persona_fidelity
from pruner.pipeline import Pruner


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--cache-dir`` (pruner cache with the persona's teacher answers) and ``--eval-cache`` (dense eval answers)."""
    parser.add_argument("--cache-dir", default="/tmp/scache")
    parser.add_argument("--eval-cache", default="/tmp/scales_eval_answers.jsonl")
    parser.add_argument("--n-eval", type=int, default=8, help="eval questions (half persona-specific, half general)")
    parser.add_argument("--data-dir", default=str(SHARED), help=f"persona descriptions and eval questions (default {SHARED})")


def persona_run(persona: str, group_size: int, cache_dir: str, eval_cache: str, sparsity: float = 0.5, n_eval: int = 8,
                data_dir: str = str(SHARED)):
    """``(model, pruner, data, fidelity)`` for ``persona`` (one thread, as the runs in the docs); ``data_dir``
    holds ``personas/personas.jsonl`` and the eval questions."""
    torch.set_num_threads(1)
    model, tokenizer = load_default_model()
    config = PrunerConfig(group_size=group_size, sparsity=sparsity, n_train=160, max_pool=160, keep_fraction=1.0,
                          max_new_tokens=32, batch_size=4, progress=False, cache_dir=cache_dir)
    pruner = Pruner(model, tokenizer, config)
    description = load_personas(Path(data_dir) / "personas" / "personas.jsonl", [persona])[0]["description"]
    data, _ = pruner.persona_data(description)
    fidelity = persona_fidelity(model, tokenizer, persona, description,
                                argparse.Namespace(data_dir=data_dir, n_eval=n_eval, eval_tokens=32),
                                JsonlCache(eval_cache), pruner.fingerprint)
    return model, pruner, data, fidelity
