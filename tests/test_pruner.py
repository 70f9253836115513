"""Tests of the Persona-Pruner (pruner/) on a tiny random Llama model and a character-level tokenizer."""

from __future__ import annotations

import dataclasses
import http.server
import json
import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from persona_kernels.bank import MaskBank
from pruner import FidelityEval, Pruner, PrunerConfig, PrunerInputError, prune_persona
from pruner import baselines as bl
from pruner.chat import answer_ids, split_prompts, system_prompt
from pruner.cli import main as cli_main
from pruner.data import JsonlCache
from pruner.importance import activation_importance, collect_stats, scores_from_importance
from pruner.learn import TrainingData, learn_mask, learn_scales, mean_loss
from pruner.masked_model import keep_count, ste_mask, topk_keep
from pruner.teacher import EndpointTeacher, cached_answers

D_FF, GROUP, LAYERS = 64, 4, 2


class CharTokenizer:
    """Character-level stub tokenizer with a chat template (id 0 is the end-of-turn token)."""

    eos_token_id = 0
    eos_token = "<e>"
    vocab_size = 128

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        system = next((m["content"] for m in messages if m["role"] == "system"), "You help.")
        text = f"S:{system}\n" + "".join(f"U:{m['content']}\n" for m in messages if m["role"] == "user")
        return text + ("A:" if add_generation_prompt else "")

    def encode(self, text, add_special_tokens=False):
        return [min(ord(c), 126) + 1 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i - 1) for i in ids if i != 0)


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=D_FF, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.1)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer()


DESCRIPTION = "A grumpy lighthouse keeper who talks about storms."


def training_data(tokenizer, n: int = 8) -> TrainingData:
    questions = [f"question number {i}?" for i in range(n)]
    answers = [("storm " * (i % 3 + 2)).strip() for i in range(n)]
    prompts = split_prompts(tokenizer, system_prompt(DESCRIPTION), questions)
    return TrainingData(prompts.prefix, prompts.questions, [answer_ids(tokenizer, a) for a in answers], 0)


def init_scores(model, data):
    stats = collect_stats(model, data.prefix, data.batches(4), progress=False)
    return scores_from_importance(activation_importance(stats, model, GROUP))


def small_config(tmp_path, **overrides) -> PrunerConfig:
    values = dict(sparsity=0.5, group_size=GROUP, max_pool=12, n_train=4, max_new_tokens=6, steps=3, batch_size=2,
                  scale_steps=2, checkpoint_every=1, cache_dir=str(tmp_path / "cache"), progress=False)
    values.update(overrides)
    return PrunerConfig(**values)


def test_ste_keeps_exactly_k_and_passes_gradients():
    scores = torch.randn(3, 10, requires_grad=True)
    for ste in ("identity", "sigmoid"):
        mask = ste_mask(scores, 4, ste)
        assert torch.equal(mask.detach().sum(1), torch.full((3,), 4.0))
        assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
        (mask * torch.arange(10.0)).sum().backward()
        assert scores.grad is not None and scores.grad.abs().sum() > 0
        scores.grad = None
    assert keep_count(96, 0.5) == 48 and keep_count(4, 0.99) == 1
    assert torch.equal(topk_keep(torch.tensor([[1.0, 1.0, 0.0]]), 1), torch.tensor([[True, False, False]]))


def test_learned_mask_reduces_training_loss(model, tokenizer):
    data = training_data(tokenizer)
    init = init_scores(model, data)
    k = keep_count(D_FF // GROUP, 0.5)
    keep, result = learn_mask(model, data, init, k, GROUP, steps=30, lr=0.1, batch_size=4, seed=0, progress=False)
    assert torch.equal(keep.sum(1), torch.full((LAYERS,), k))
    assert mean_loss(model, data, keep, GROUP) < mean_loss(model, data, topk_keep(init, k), GROUP)
    assert all(not p.requires_grad for p in model.parameters())
    recovery, _ = learn_scales(model, data, keep, GROUP, steps=5, lr=0.05, batch_size=4, seed=0, progress=False)
    scales = recovery.scales
    assert scales.shape == (LAYERS, D_FF) and recovery.input_gains is None and recovery.output_bias is None
    assert torch.all(scales[~keep.repeat_interleave(GROUP, 1)] == 1)


@pytest.mark.parametrize("gains, bias", [(True, False), (False, True), (True, True)], ids=["gains", "bias", "gains-bias"])
def test_gains_and_bias_learned_jointly_with_their_own_steps(model, tokenizer, tmp_path, gains, bias):
    data = training_data(tokenizer)
    keep = topk_keep(init_scores(model, data), keep_count(D_FF // GROUP, 0.5))
    kwargs = dict(lr=0.05, batch_size=4, seed=0, kl_weight=1.0, input_gains=gains, gain_lr=0.01, bias=bias, bias_lr=0.002,
                  progress=False)
    one, _ = learn_scales(model, data, keep, GROUP, steps=1, **kwargs)
    hidden = model.config.hidden_size
    assert (one.input_gains is not None) == gains and (one.output_bias is not None) == bias
    # Adam's first step moves every parameter by its learning rate (up to eps): 0.05 for scales, 0.01 for
    # gains (from 1), 0.002 for the bias (from 0)
    kept = keep.repeat_interleave(GROUP, 1)
    assert float((one.scales[kept] - 1).abs().max()) == pytest.approx(0.05, rel=1e-3)
    if gains:
        assert one.input_gains.shape == (LAYERS, hidden) and torch.isfinite(one.input_gains).all()
        assert float((one.input_gains - 1).abs().max()) == pytest.approx(0.01, rel=1e-3)
    if bias:
        assert one.output_bias.shape == (LAYERS, hidden) and torch.isfinite(one.output_bias).all()
        assert float(one.output_bias.abs().max()) == pytest.approx(0.002, rel=1e-3)
    full, first = learn_scales(model, data, keep, GROUP, steps=6, **kwargs)
    ckpt = tmp_path / "recovery.pt"
    learn_scales(model, data, keep, GROUP, steps=6, checkpoint=ckpt, checkpoint_every=2, stop_after=3, **kwargs)
    resumed, again = learn_scales(model, data, keep, GROUP, steps=6, checkpoint=ckpt, checkpoint_every=2, **kwargs)
    assert again.resumed_at == 2
    for name in ("scales", "input_gains", "output_bias"):
        if getattr(full, name) is not None:
            torch.testing.assert_close(getattr(resumed, name), getattr(full, name))
    assert first.curve[-1][1] < first.curve[0][1]


def test_same_seed_same_mask_and_resume_matches(model, tokenizer, tmp_path):
    data = training_data(tokenizer)
    init = init_scores(model, data)
    kwargs = dict(steps=8, lr=0.1, batch_size=3, seed=3, progress=False)
    first, r1 = learn_mask(model, data, init, 8, GROUP, **kwargs)
    second, r2 = learn_mask(model, data, init, 8, GROUP, **kwargs)
    assert torch.equal(first, second) and torch.equal(r1.value, r2.value)
    ckpt = tmp_path / "ckpt.pt"
    learn_mask(model, data, init, 8, GROUP, checkpoint=ckpt, checkpoint_every=2, stop_after=5, **kwargs)  # "interrupted"
    resumed, r3 = learn_mask(model, data, init, 8, GROUP, checkpoint=ckpt, checkpoint_every=2, **kwargs)
    assert r3.resumed_at == 4
    assert torch.equal(resumed, first)
    torch.testing.assert_close(r3.value, r1.value)
    assert [s for s, _ in r3.curve] == list(range(8))


def test_baselines_shape_and_sparsity(model, tokenizer, tmp_path):
    pruner = Pruner(model, tokenizer, small_config(tmp_path, baselines=("random", "magnitude", "wanda", "flap", "generic-learned")))
    k = keep_count(D_FF // GROUP, 0.5)
    for method in ("random", "magnitude", "wanda", "flap", "generic-learned"):
        mask = pruner.baseline("p", DESCRIPTION, method)
        assert mask.keep.shape == (LAYERS, D_FF // GROUP) and mask.keep.dtype == torch.bool
        assert torch.equal(mask.keep.sum(1), torch.full((LAYERS,), k)), method
        assert mask.name == f"p@{method}" and mask.method == method
    assert torch.equal(bl.random_mask(2, 16, 5, seed=1), bl.random_mask(2, 16, 5, seed=1))


@pytest.mark.parametrize("kl_weight", [0.0, 1.0])
def test_generic_learned_uses_the_persona_masks_loss(model, tokenizer, tmp_path, monkeypatch, kl_weight):
    import pruner.pipeline as pipeline

    seen = []
    real = pipeline.learn_mask

    def recording(*args, **kwargs):
        seen.append(kwargs["kl_weight"])
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "learn_mask", recording)
    pruner = Pruner(model, tokenizer, small_config(tmp_path, kl_weight=kl_weight, baselines=("generic-learned",)))
    persona, generic = pruner.prune("p", DESCRIPTION)
    assert seen == [kl_weight, kl_weight]  # the persona mask, then the generic one: the same loss
    assert generic.report["kl_weight"] == kl_weight
    pruner.config.kl_weight = kl_weight + 0.5  # another loss is another generic mask, not the cached one
    pruner.baseline("p", DESCRIPTION, "generic-learned")
    assert seen[-1] == kl_weight + 0.5


def test_config_from_a_reports_dict_round_trips_and_ignores_unknown_keys(tmp_path):
    config = small_config(tmp_path, kl_weight=0.5, baselines=("wanda", "flap"), input_gains=True)
    recorded = json.loads(json.dumps(config.to_dict()))  # as a bank report stores it
    assert PrunerConfig.from_dict(recorded) == config
    assert PrunerConfig.from_dict({**recorded, "from_a_newer_version": 1}) == config
    assert PrunerConfig.from_dict({"sparsity": 0.25}) == PrunerConfig(sparsity=0.25)  # an older report: defaults


def test_bad_inputs_raise_before_work(model, tokenizer, tmp_path, monkeypatch):
    import pruner.pipeline as pipeline

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the input was validated")

    monkeypatch.setattr(pipeline, "signatures", no_work)
    monkeypatch.setattr(pipeline, "reference_signatures", no_work)
    with pytest.raises(PrunerInputError, match="empty"):
        prune_persona(model, tokenizer, "p", "   ", small_config(tmp_path))
    with pytest.raises(PrunerInputError, match="characters"):
        prune_persona(model, tokenizer, "p", "x" * 5000, small_config(tmp_path))
    for sparsity in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(PrunerInputError, match="sparsity"):
            prune_persona(model, tokenizer, "p", DESCRIPTION, small_config(tmp_path, sparsity=sparsity))
    with pytest.raises(PrunerInputError, match="does not divide"):
        prune_persona(model, tokenizer, "p", DESCRIPTION, small_config(tmp_path, group_size=5))
    for weights in ({"kl_weight": -1.0}, {"scale_kl_weight": -0.5}):
        with pytest.raises(PrunerInputError, match="kl weights must be non-negative"):
            prune_persona(model, tokenizer, "p", DESCRIPTION, small_config(tmp_path, **weights))
    with pytest.raises(PrunerInputError, match="gain_lr must be positive"):
        prune_persona(model, tokenizer, "p", DESCRIPTION, small_config(tmp_path, input_gains=True, gain_lr=0.0))
    with pytest.raises(PrunerInputError, match="input gains are learned together with the scales"):
        prune_persona(model, tokenizer, "p", DESCRIPTION, small_config(tmp_path, input_gains=True, scales=False))
    with pytest.raises(PrunerInputError, match="bias_lr must be positive"):
        prune_persona(model, tokenizer, "p", DESCRIPTION, small_config(tmp_path, output_bias=True, bias_lr=-1.0))
    with pytest.raises(PrunerInputError, match="output bias is learned together with the scales"):
        prune_persona(model, tokenizer, "p", DESCRIPTION, small_config(tmp_path, output_bias=True, scales=False))
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=128))
    with pytest.raises(PrunerInputError, match="gated FFN"):
        prune_persona(gpt2, tokenizer, "p", DESCRIPTION, small_config(tmp_path))
    with pytest.raises(PrunerInputError, match="reserved"):
        prune_persona(model, tokenizer, "dense", DESCRIPTION, small_config(tmp_path))


def test_cli_rejects_bad_input_without_loading_a_model(tmp_path, monkeypatch, capsys):
    import persona_kernels.hf.default_model as default_model

    monkeypatch.setattr(default_model, "load_default_model", lambda *a, **k: pytest.fail("model loaded"))
    bank = str(tmp_path / "bank.safetensors")
    assert cli_main(["--description", "", "--name", "x", "--bank", bank]) == 2
    assert cli_main(["--description", "a pirate", "--name", "x", "--bank", bank, "--sparsity", "1.2"]) == 2
    assert cli_main(["--description", "a pirate", "--name", "x", "--bank", bank, "--baselines", "nope"]) == 2
    assert "sparsity" in capsys.readouterr().err


def test_bank_holds_persona_with_method_and_report(model, tokenizer, tmp_path):
    config = small_config(tmp_path, baselines=("random", "wanda"))
    pruner = Pruner(model, tokenizer, config)
    masks = pruner.prune("keeper", DESCRIPTION)
    path = tmp_path / "bank.safetensors"
    pruner.add_to_bank(path, masks)
    bank = MaskBank.load(path)
    assert bank.names == ["keeper", "keeper@random", "keeper@wanda"]
    entry = bank.get("keeper")
    assert entry.method == "persona-pruner" and entry.description == DESCRIPTION
    assert abs(entry.sparsity - 0.5) < 1e-6 and entry.scales is not None
    for key in ("train_sequences", "sensitivity_s", "teacher_s", "learn_s", "loss_curve", "scales_s"):
        assert key in entry.report
    assert bank.group_size == GROUP and bank.d_ff == D_FF and bank.n_layers == LAYERS
    # a second run replaces the persona in place and reuses the cached answers and checkpoints
    again = Pruner(model, tokenizer, config).prune("keeper", DESCRIPTION)
    assert torch.equal(again[0].keep, masks[0].keep) and again[0].report["resumed_at_step"] == config.steps
    pruner.add_to_bank(path, again[:1])
    assert MaskBank.load(path).names == ["keeper", "keeper@random", "keeper@wanda"]


def test_pruner_learns_input_gains_and_bias_into_the_bank(model, tokenizer, tmp_path):
    pruner = Pruner(model, tokenizer, small_config(tmp_path, input_gains=True, output_bias=True, scale_steps=3))
    masks = pruner.prune("keeper", DESCRIPTION)
    path = tmp_path / "bank.safetensors"
    pruner.add_to_bank(path, masks)
    entry = MaskBank.load(path).get("keeper")
    assert entry.input_gains is not None and entry.input_gains.shape == (LAYERS, model.config.hidden_size)
    assert not torch.allclose(entry.input_gains, torch.ones_like(entry.input_gains))
    assert entry.output_bias is not None and entry.output_bias.shape == (LAYERS, model.config.hidden_size)
    assert not torch.allclose(entry.output_bias, torch.zeros_like(entry.output_bias))
    assert entry.report["config"]["input_gains"] and entry.report["config"]["output_bias"] and entry.scales is not None
    plain = Pruner(model, tokenizer, small_config(tmp_path, scale_steps=3)).prune("keeper", DESCRIPTION)[0]
    assert plain.input_gains is None and plain.output_bias is None
    assert torch.equal(plain.keep, entry.keep)  # same mask, separate scale checkpoint
    gains_only = Pruner(model, tokenizer, small_config(tmp_path, input_gains=True, scale_steps=3)).prune("keeper", DESCRIPTION)[0]
    assert gains_only.output_bias is None  # not resumed from the gains+bias checkpoint


def test_fidelity_dense_is_exact_and_random_is_not(model, tokenizer):
    questions = ["who are you?", "what do you fear?", "tell me about the sea."]
    fidelity = FidelityEval(model, tokenizer, DESCRIPTION, questions, max_new_tokens=5)
    n_groups = D_FF // GROUP
    dense = fidelity.measure(torch.ones(LAYERS, n_groups, dtype=torch.bool), GROUP)
    assert dense["kl"] < 1e-6 and dense["top1"] == 1.0 and dense["tokens"] == 3 * 6
    random = bl.random_mask(LAYERS, n_groups, n_groups // 2, seed=0)
    assert fidelity.measure(random, GROUP)["kl"] > 1e-7


def test_fidelity_per_question_means_recombine_to_the_token_mean(model, tokenizer):
    """Each question's KL is the mean over its own answer tokens: weighted by token counts they give the
    headline KL, and a question's value changes only with its own answer (batches of 2 split the 3 questions)."""
    questions = ["who are you?", "what do you fear most of all, captain?", "tell me about the sea."]
    fidelity = FidelityEval(model, tokenizer, DESCRIPTION, questions, max_new_tokens=5, batch_size=2)
    random = bl.random_mask(LAYERS, D_FF // GROUP, D_FF // GROUP // 2, seed=3)
    score = fidelity.measure_questions(random, GROUP)
    lengths = [len(a) for a in fidelity.data.answers]
    assert len(score["question_kl"]) == len(score["question_top1"]) == 3
    weighted = sum(k * n for k, n in zip(score["question_kl"], lengths)) / sum(lengths)
    assert abs(weighted - score["kl"]) < 1e-5 * score["kl"] and min(score["question_kl"]) > 0
    alone = FidelityEval(model, tokenizer, DESCRIPTION, questions[2:], max_new_tokens=5).measure_questions(random, GROUP)
    assert abs(alone["question_kl"][0] - score["question_kl"][2]) < 1e-4 * score["question_kl"][2]


def test_fidelity_attached_bank_agrees_with_hooks(tokenizer):
    from persona_kernels.hf.ffn import model_fingerprint

    model = tiny_model(seed=1)
    n_groups = D_FF // GROUP
    keep = bl.random_mask(LAYERS, n_groups, 9, seed=2)
    scales = 1 + 0.1 * torch.randn(LAYERS, D_FF)
    from persona_kernels.bank import PersonaMask

    gains = 1 + 0.2 * torch.randn(LAYERS, model.config.hidden_size)
    bias = 0.1 * torch.randn(LAYERS, model.config.hidden_size)
    bank = MaskBank("tiny", model_fingerprint(model), LAYERS, D_FF, GROUP, [
        PersonaMask("p", keep, "d", "random", scales), PersonaMask("g", keep, "d", "random", scales, input_gains=gains),
        PersonaMask("b", keep, "d", "random", scales, input_gains=gains, output_bias=bias)])
    fidelity = FidelityEval(model, tokenizer, DESCRIPTION, ["who are you?", "a long question about storms?"], max_new_tokens=5)
    for name, persona_gains, persona_bias in (("p", None, None), ("g", gains, None), ("b", gains, bias)):
        hooked = fidelity.measure(keep, GROUP, scales, persona_gains, persona_bias)
        attached = fidelity.measure_attached(bank, name)
        assert hooked["kl"] > 1e-7
        assert abs(hooked["kl"] - attached["kl"]) < 1e-3 * hooked["kl"] + 1e-9 and hooked["top1"] == attached["top1"]
    assert abs(fidelity.measure(keep, GROUP, scales)["kl"] - fidelity.measure(keep, GROUP, scales, gains)["kl"]) > 1e-6
    assert abs(fidelity.measure(keep, GROUP, scales, gains)["kl"] - fidelity.measure(keep, GROUP, scales, gains, bias)["kl"]) > 1e-6


def test_generation_with_shared_prefix_matches_plain_generate(model, tokenizer):
    from pruner.generate import generate_answers

    questions = ["hi?", "a much longer question here?"]
    prompts = split_prompts(tokenizer, system_prompt(DESCRIPTION), questions)
    answers = generate_answers(model, tokenizer, prompts.prefix, prompts.questions, 6)
    for question, answer in zip(prompts.questions, answers):
        ids = torch.tensor([prompts.prefix + question])
        out = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=0, pad_token_id=0)
        assert tokenizer.decode(out[0, ids.shape[1]:].tolist()).strip() == answer


def test_teacher_cache_resumes(model, tokenizer, tmp_path):
    calls = []

    class CountingTeacher:
        identity = "counting"

        def answer(self, system, questions, max_new_tokens, temperature, seed, on_batch, progress=True):
            calls.append(list(questions))
            on_batch(questions, [q.upper() for q in questions])

    cache = JsonlCache(tmp_path / "answers.jsonl")
    assert cached_answers(CountingTeacher(), cache, "sys", ["a", "b"], 5) == ["A", "B"]
    reopened = JsonlCache(tmp_path / "answers.jsonl")
    assert cached_answers(CountingTeacher(), reopened, "sys", ["a", "b", "c"], 5) == ["A", "B", "C"]
    assert calls == [["a", "b"], ["c"]]


def test_endpoint_teacher_against_fake_server(monkeypatch):
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body, self.headers.get("Authorization")))
            reply = json.dumps({"choices": [{"message": {"content": " Arr, " + body["messages"][-1]["content"]}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("OPENAI_API_KEY", "test-key")
        teacher = EndpointTeacher(f"http://127.0.0.1:{server.server_address[1]}/v1", "fake-model")
        got = []
        teacher.answer("be a pirate", ["hello"], 10, 0.0, 0, lambda q, a: got.extend(a), progress=False)
    finally:
        server.shutdown()
    assert got == ["Arr, hello"]
    path, body, auth = seen[0]
    assert path == "/v1/chat/completions" and body["model"] == "fake-model" and body["max_tokens"] == 10
    assert body["messages"][0] == {"role": "system", "content": "be a pirate"} and auth == "Bearer test-key"


def test_scale_study_table_reports_reduction_and_mean(tmp_path) -> None:
    from pruner.scale_study import write_table

    row = dict(persona="a", sparsity=0.5, kl_mask=2.0, top1_mask=0.2, kl_scaled=1.0, top1_scaled=0.4, reduction=0.5,
               train_sequences=64, scale_steps=30, scales_s=10.0)
    other = dict(row, persona="b", kl_mask=4.0, kl_scaled=4.0, reduction=0.0)
    write_table([row, other], tmp_path / "t.md")
    text = (tmp_path / "t.md").read_text()
    assert "| 0.5 | a | 2.000 (0.200) | 1.000 (0.400) | 50.0% |" in text
    assert "| 0.5 | **mean** | 3.000 (0.200) | 2.500 (0.400) | 16.7% (of the mean) |" in text


def test_scale_study_measures_writes_bank_and_resumes(model, tokenizer, tmp_path) -> None:
    from pruner.scale_study import build_parser, study

    data_dir = tmp_path / "data"
    (data_dir / "personas").mkdir(parents=True)
    (data_dir / "eval").mkdir()
    (data_dir / "personas" / "personas.jsonl").write_text(json.dumps({"id": "keeper", "description": DESCRIPTION}) + "\n")
    (data_dir / "eval" / "keeper.jsonl").write_text("".join(
        json.dumps({"persona": "keeper", "split": split, "question": q}) + "\n"
        for split, q in [("specific", "who are you?"), ("specific", "what do you fear?"), ("general", "name a colour.")]))
    config = small_config(tmp_path, scales=False)
    pruner = Pruner(model, tokenizer, config)
    bank_path = tmp_path / "bank.safetensors"
    pruner.add_to_bank(bank_path, pruner.prune("keeper", DESCRIPTION))
    bank_out = tmp_path / "scaled.safetensors"
    args_list = [
        "--bank", str(bank_path), "--personas", "keeper", "--data-dir", str(data_dir), "--n-eval", "2",
        "--eval-tokens", "4", "--out", str(tmp_path / "study"), "--n-train", "4", "--max-pool", "12",
        "--max-new-tokens", "6", "--scale-steps", "3", "--batch-size", "2", "--cache-dir", str(tmp_path / "cache"),
        "--bank-out", str(bank_out)]
    args = build_parser().parse_args(args_list)
    rows = study(model, tokenizer, args)
    assert len(rows) == 1 and rows[0]["persona"] == "keeper" and rows[0]["kl_mask"] > 0
    assert rows[0]["reduction"] == pytest.approx(1 - rows[0]["kl_scaled"] / rows[0]["kl_mask"])
    before, after = MaskBank.load(bank_path).get("keeper"), MaskBank.load(bank_out).get("keeper")
    assert before.scales is None and after.scales is not None and torch.equal(before.keep, after.keep)
    assert not torch.allclose(after.scales, torch.ones_like(after.scales))
    assert after.report["scale_steps"] == 3
    assert (tmp_path / "study" / "scales.md").read_text().count("| keeper |") == 1
    again = study(model, tokenizer, args)  # resumes: the persona is not relearned, the written bank kept
    assert len(again) == 1 and torch.equal(MaskBank.load(bank_out).get("keeper").scales, after.scales)
    bank_out.unlink()  # measured earlier, but its bank entry is gone: relearned, and its row replaced, not doubled
    relearned = study(model, tokenizer, args)
    assert len(relearned) == 1 and MaskBank.load(bank_out).get("keeper").scales is not None
    assert len((tmp_path / "study" / "scales.jsonl").read_text().splitlines()) == 1
    other = MaskBank.load(bank_path)
    other.add(dataclasses.replace(before, name="extra"))
    other.save(bank_out)  # an unrelated file at --bank-out is refused, not overwritten
    with pytest.raises(PrunerInputError, match="not a copy"):
        study(model, tokenizer, args)
    assert MaskBank.load(bank_out).names == ["keeper", "extra"]
    bank_out.unlink()
    study(model, tokenizer, args)
    gained = build_parser().parse_args([*args_list, "--input-gains", "--gain-lr", "0.02"])
    rows = study(model, tokenizer, gained)  # another recipe: a second row, and the entry now carries gains too
    assert len(rows) == 2 and rows[1]["input_gains"] and rows[1]["gain_lr"] == 0.02 and "gain_range" in rows[1]
    entry = MaskBank.load(bank_out).get("keeper")
    assert entry.input_gains is not None and entry.report["input_gains"] and entry.scales is not None
    assert len(study(model, tokenizer, gained)) == 2  # resumes
