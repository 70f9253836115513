"""Tests of the evaluation package: measures with known answers, judge scoring and client, report and rescore."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from pruner.evaluation.judge import (
    HFJudge,
    OpenAIJudge,
    format_judge_prompt,
    integer_token,
    load_judge_prompt,
    parse_score_text,
    score_from_response,
    score_from_top_logprobs,
)
from pruner.evaluation.measures import drop, lcs_length, rouge_l_f1, rouge_l_max, share_removed, token_kl_top1
from pruner.evaluation.report import summarize

# ---------------------------------------------------------------- ROUGE-L


def test_rouge_identical_is_one():
    text = "All work and no play makes Jack a dull boy."
    assert rouge_l_f1(text, text) == 1.0
    assert rouge_l_f1(text, text.upper()) == 1.0  # lowercased


def test_rouge_disjoint_is_zero():
    assert rouge_l_f1("the cat sat", "dogs bark loudly") == 0.0
    assert rouge_l_f1("", "anything") == 0.0


def test_rouge_partial_by_hand():
    # LCS("the cat sat on the mat", "the cat lay on a mat") = the cat on mat = 4; P = R = 4/6.
    assert lcs_length("the cat sat on the mat".split(), "the cat lay on a mat".split()) == 4
    assert rouge_l_f1("the cat sat on the mat", "The cat lay on a mat!") == pytest.approx(2 / 3)
    # Unequal lengths: cand "a b c d" vs ref "a c": LCS 2, P = 2/4, R = 2/2, F = 2*0.5*1/1.5 = 2/3.
    assert rouge_l_f1("a b c d", "a c") == pytest.approx(2 / 3)
    assert rouge_l_max("a b c d", ["x y", "a c", "a b c d"]) == 1.0
    assert rouge_l_max("a b", []) == 0.0


# ---------------------------------------------------------------- KL / top-1


def test_kl_identical_is_zero_and_top1_one():
    logits = torch.randn(3, 5, 11)
    kl, agree = token_kl_top1(logits, logits.clone())
    assert kl.shape == (3, 5) and torch.allclose(kl, torch.zeros(3, 5), atol=1e-6)
    assert torch.equal(agree, torch.ones(3, 5))


def test_kl_by_hand():
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.9, 0.1]]).log()
    kl, agree = token_kl_top1(p, q)
    assert float(kl[0]) == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), rel=1e-5)
    assert float(agree[0]) == 1.0  # argmax of a tie is index 0, same as q's
    from pruner.chat import kl_divergence  # the pruner's KL: the same measure

    a, b = torch.randn(4, 7, 13), torch.randn(4, 7, 13)
    torch.testing.assert_close(token_kl_top1(a, b)[0], kl_divergence(a, b).clamp_min(0))
    _, disagree = token_kl_top1(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]]))
    assert float(disagree[0]) == 0.0


# ---------------------------------------------------------------- judge scoring


def _top(pairs):
    return [{"token": t, "logprob": math.log(p)} for t, p in pairs]


def test_judge_weighted_mean_by_hand():
    top = _top([("80", 0.5), ("90", 0.25), (" 70", 0.125), ("hello", 0.0625), ("101", 0.03), ("07", 0.02)])
    score, mass = score_from_top_logprobs(top)
    # integer tokens: 80 (0.5), 90 (0.25), 70 (0.125); "101" is out of range, "07" not canonical.
    assert mass == pytest.approx(0.875)
    assert score == pytest.approx((80 * 0.5 + 90 * 0.25 + 70 * 0.125) / 0.875)


def test_judge_low_mass_falls_back_to_text():
    payload = {"choices": [{"message": {"content": "I'd say 85/100"},
                            "logprobs": {"content": [{"token": "I", "logprob": -0.1,
                                                      "top_logprobs": _top([("I", 0.9), ("50", 0.1)])}]}}]}
    result = score_from_response(payload)
    assert result.how == "text" and result.score == 85.0 and result.mass == pytest.approx(0.1)


def test_judge_text_parsing():
    assert parse_score_text("Score: 72.") == 72.0
    assert parse_score_text("150 is too many; 42") == 42.0
    assert parse_score_text("no number here") is None
    assert integer_token(" 100") == 100 and integer_token("1000") is None and integer_token("x") is None


def test_judge_prompt_template_fills():
    text = format_judge_prompt(load_judge_prompt(), "Jack", "A caretaker {braces}", "Q?", "A {x}")
    assert "Jack" in text and "A caretaker {braces}" in text and "A {x}" in text and "{question}" not in text


class _FakeOpenAI(BaseHTTPRequestHandler):
    requests: list = []
    with_logprobs = True

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        choice = {"message": {"role": "assistant", "content": "7"}}
        if self.with_logprobs and body.get("logprobs"):
            choice["logprobs"] = {"content": [{"token": "70", "logprob": math.log(0.6),
                                               "top_logprobs": _top([("70", 0.6), ("60", 0.2), ("x", 0.2)])}]}
        elif not body.get("logprobs"):
            choice["message"]["content"] = "Rating: 55"
        data = json.dumps({"choices": [choice]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    _FakeOpenAI.requests = []
    server = HTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_openai_judge_client(fake_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    _FakeOpenAI.with_logprobs = True
    judge = OpenAIJudge(f"http://127.0.0.1:{fake_server.server_port}/v1", "fake-judge")
    result = judge.score("rate this")
    assert result.how == "logprobs" and result.score == pytest.approx((70 * 0.6 + 60 * 0.2) / 0.8)
    request = _FakeOpenAI.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    body = request["body"]
    assert body["model"] == "fake-judge" and body["max_tokens"] == 1
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["messages"] == [{"role": "user", "content": "rate this"}]


def test_openai_judge_without_logprobs_parses_text(fake_server):
    _FakeOpenAI.with_logprobs = False
    judge = OpenAIJudge(f"http://127.0.0.1:{fake_server.server_port}/v1/chat/completions", "fake-judge", api_key="")
    result = judge.score("rate this")
    # first reply "7" parses as 7 from text (no logprobs): no retry needed
    assert result.how == "text" and result.score == 7.0
    assert len(_FakeOpenAI.requests) == 1 and _FakeOpenAI.requests[0]["auth"] is None


# ---------------------------------------------------------------- drop / share


def test_drop_and_share_arithmetic():
    assert drop(0.8, 0.7, higher_is_better=True) == pytest.approx(0.1)
    assert drop(0.0, 0.3, higher_is_better=False) == pytest.approx(0.3)
    assert drop(None, 0.3) is None
    share, best = share_removed(0.1, {"wanda": 0.3, "random": 0.2, "missing": None})
    assert best == "random" and share == pytest.approx((0.2 - 0.1) / 0.2)
    assert share_removed(0.1, {"a": 0.0}) == (None, "a")  # best baseline lost nothing: undefined
    assert share_removed(0.1, {}) == (None, None)
    worse, _ = share_removed(0.4, {"a": 0.2})
    assert worse == pytest.approx(-1.0)


def test_summarize_paper_form():
    results = {
        "p1": {"dense": {"top1": 1.0, "kl": 0.0}, "persona": {"top1": 0.9, "kl": 0.1}, "wanda": {"top1": 0.8, "kl": 0.4}},
        "p2": {"dense": {"top1": 1.0, "kl": 0.0}, "persona": {"top1": 0.7, "kl": 0.3}, "wanda": {"top1": 0.6, "kl": 0.2}},
    }
    s = summarize(results)
    assert s["top1"]["p1"]["drops"]["persona"] == pytest.approx(0.1)
    assert s["top1"]["p1"]["share"] == pytest.approx(0.5)
    assert s["kl"]["p2"]["share"] == pytest.approx((0.2 - 0.3) / 0.2)
    assert s["kl"]["mean"]["values"]["persona"] == pytest.approx(0.2)
    assert s["kl"]["mean"]["share"] == pytest.approx((0.3 - 0.2) / 0.3)
    assert "rouge_l" not in s
    from pruner.evaluation.report import headline_markdown

    table = headline_markdown({"s0.5": {"results": results, "summary": s}})
    assert "| s0.5 | persona | 0.200 (share 0.33 vs wanda) | 0.800 (share 0.33 vs wanda) |" in table


# ---------------------------------------------------------------- tiny model: generation, report, rescore

WORDS = ("hello world the cat sat on mat jack hotel dog you are a helpful assistant user system answer "
         "question what is why how caretaker stay in character as would").split()
PERSONA = "tiny_jack"


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "</s>", "<", ">", ".", "?", ",", "!", "'"]
    numbers = [str(i) for i in range(11)] + ["100"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(specials + numbers + WORDS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    tok.chat_template = ("{% for m in messages %}< {{ m['role'] }} > {{ m['content'] }} </s> {% endfor %}"
                         "{% if add_generation_prompt %}< assistant > {% endif %}")
    return tok


def _tiny_model(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                         pad_token_id=1, eos_token_id=2, bos_token_id=2, tie_word_embeddings=True,
                         initializer_range=0.5)
    model = LlamaForCausalLM(config).eval()
    model.config.name_or_path = "tiny-llama"
    return model


def _tiny_bank(model):
    from persona_kernels.bank import MaskBank, PersonaMask
    from persona_kernels.hf.ffn import model_ffn_shape, model_fingerprint, model_name

    n_layers, d_ff, _ = model_ffn_shape(model)
    keep_a = torch.tensor([[True, True, False, True], [True, False, True, True]])
    keep_b = torch.tensor([[False, True, True, True], [True, True, True, False]])
    return MaskBank(model_name(model), model_fingerprint(model), n_layers, d_ff, 16, [
        PersonaMask(PERSONA, keep_a, method="persona-pruner"),
        PersonaMask(f"{PERSONA}@random", keep_b, method="random"),
    ])


def _tiny_data(root):
    (root / "personas").mkdir(parents=True)
    (root / "eval").mkdir()
    (root / "rolebench").mkdir()
    (root / "personas" / "personas.jsonl").write_text(json.dumps(
        {"id": PERSONA, "name": "Jack", "kind": "character", "description": "the caretaker of the hotel"}) + "\n")
    rows = [{"persona": PERSONA, "split": s, "question": q} for s, q in
            [("specific", "what is the hotel ?"), ("specific", "how is the cat ?"),
             ("general", "what is a dog ?"), ("general", "why the mat ?"), ("specific", "unused question")]]
    (root / "eval" / f"{PERSONA}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rb = [{"persona": PERSONA, "question": "Jack , how is the hotel ?", "references": ["the hotel is a hotel", "cat"]},
          {"persona": PERSONA, "question": "Jack , why you ?", "references": ["you are the caretaker"]}]
    (root / "rolebench" / f"{PERSONA}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rb))


@pytest.fixture(scope="module")
def tiny():
    tokenizer = _tiny_tokenizer()
    model = _tiny_model(len(tokenizer))
    bank = _tiny_bank(model)
    return model, tokenizer, bank


def test_mixed_persona_batch_matches_single_persona_batches(tiny):
    from pruner.evaluation.generate import chat_prompt_ids, generate_batched
    from pruner.evaluation.selection import attach_for_eval

    model, tokenizer, bank = tiny
    select = attach_for_eval(model, bank)
    prompts = [chat_prompt_ids(tokenizer, "you are jack", q) for q in ("what is the hotel ?", "why ?", "how is the cat on the mat ?")]
    mixed = generate_batched(model, tokenizer, prompts * 3, [0, 0, 0, 1, 1, 1, 2, 2, 2], select, max_new_tokens=5, batch_size=9)
    for pid in range(3):
        alone = generate_batched(model, tokenizer, prompts, [pid] * 3, select, max_new_tokens=5, batch_size=3)
        assert mixed[3 * pid: 3 * pid + 3] == alone
    assert mixed[0:3] != mixed[3:6] or mixed[0:3] != mixed[6:9]  # masks change something
    # Teacher-forced logits: a mixed batch equals each persona alone, and masks differ from dense.
    from pruner.evaluation.generate import left_pad

    ids, mask = left_pad([prompts[2]] * 3, 1)
    with torch.no_grad(), select(torch.tensor([0, 1, 2])):
        mixed_logits = model(input_ids=ids, attention_mask=mask).logits
    for pid in range(3):
        with torch.no_grad(), select(torch.tensor([pid])):
            alone_logits = model(input_ids=ids[:1], attention_mask=mask[:1]).logits
        torch.testing.assert_close(mixed_logits[pid], alone_logits[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(mixed_logits[0], mixed_logits[1])


def test_evaluate_then_rescore(tiny, tmp_path):
    from pruner.evaluation.generate import load_answers
    from pruner.evaluation.runner import EvalSettings, evaluate, rescore

    model, tokenizer, bank = tiny
    data = tmp_path / "data"
    _tiny_data(data)
    out = tmp_path / "out"
    settings = EvalSettings(str(data), None, str(out), [PERSONA], max_questions=2, max_new_tokens=4,
                            batch_size=4, command="persona-eval --test")
    paths = evaluate(settings, model=model, tokenizer=tokenizer, bank=bank)
    assert {"md", "json"} <= set(paths) and paths["md"].read_text().startswith("# Persona evaluation report")
    for method in ("dense", "persona", "random"):
        answers = load_answers(out / "answers" / PERSONA / f"{method}.jsonl")
        assert len(answers) == 6 and {a.split for a in answers} == {"specific", "general", "rolebench"}
        assert all(a.system is None for a in answers if a.split == "general")
        assert all("the caretaker of the hotel" in a.system for a in answers if a.split != "general")
    report = json.loads(paths["json"].read_text())
    dense = report["results"][PERSONA]["dense"]
    assert dense["kl"] == 0.0 and dense["top1"] == 1.0 and dense["general_top1"] == 1.0
    persona = report["results"][PERSONA]["persona"]
    assert persona["kl"] > 0 and 0 <= persona["top1"] <= 1 and persona["general_kl"] > 0
    assert 0 <= persona["rouge_l"] <= 1
    assert report["meta"]["judge"].startswith("none")

    # A second bank's run reuses the dense answers of the first (same model and max_new_tokens) ...
    import pruner.evaluation.runner as runner

    generated: list[int] = []
    real = runner.generate_batched

    def counting(model_, tokenizer_, prompts, ids, *args, **kwargs):
        generated.extend(ids)
        return real(model_, tokenizer_, prompts, ids, *args, **kwargs)

    runner.generate_batched = counting
    try:
        out2 = tmp_path / "out2"
        evaluate(EvalSettings(str(data), None, str(out2), [PERSONA], max_questions=2, max_new_tokens=4, batch_size=4),
                 model=model, tokenizer=tokenizer, bank=bank, reuse_from=[str(out)])
        assert 0 not in generated and len(generated) == 12  # masks only
        assert load_answers(out2 / "answers" / PERSONA / "dense.jsonl") == load_answers(out / "answers" / PERSONA / "dense.jsonl")
        generated.clear()  # ... but not when max_new_tokens differs (and a rerun in place regenerates then)
        evaluate(EvalSettings(str(data), None, str(out2), [PERSONA], max_questions=2, max_new_tokens=3, batch_size=4),
                 model=model, tokenizer=tokenizer, bank=bank, reuse_from=[str(out)])
        assert generated.count(0) == 6 and len(generated) == 18
    finally:
        runner.generate_batched = real

    # Rescore with hand-made answers: ROUGE-L must follow the text, with no regeneration.
    rolebench = [a for a in load_answers(out / "answers" / PERSONA / "persona.jsonl")]
    from pruner.evaluation.generate import save_answers

    for a in rolebench:
        if a.split == "rolebench":
            a.answer = a.references[0]
    save_answers(out / "answers" / PERSONA / "persona.jsonl", rolebench)
    rescored = rescore(out, fidelity=False)
    again = json.loads(rescored["json"].read_text())
    assert again["results"][PERSONA]["persona"]["rouge_l"] == 1.0
    assert again["results"][PERSONA]["persona"]["kl"] == report["results"][PERSONA]["persona"]["kl"]  # kept, not recomputed
    assert again["meta"]["command"] == "persona-eval --test"


def test_hf_judge_scores_from_number_tokens(tiny):
    model, tokenizer, _ = tiny
    from persona_kernels.hf import detach_bank
    from persona_kernels.hf.attachment import attachment

    if attachment(model) is not None:
        detach_bank(model)
    judge = HFJudge("tiny", model=model, tokenizer=tokenizer, min_mass=0.0)
    result = judge.score("rate the cat")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "rate the cat"}], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([list(ids)])).logits[0, -1].double(), -1)
    values = {tokenizer.convert_tokens_to_ids(str(v)): v for v in list(range(11)) + [100]}
    expected = sum(probs[i] * v for i, v in values.items()) / sum(probs[i] for i in values)
    assert result.how == "logprobs" and result.score == pytest.approx(float(expected), rel=1e-6)
