"""The evaluation pipeline: generate answers (dense, persona masks, baselines), score them, write the report.

Layout of an output directory::

    run.json                          settings of the run (model, bank, personas, flags, command)
    answers/<persona>/<method>.jsonl  generated answers (method ``dense``, ``persona`` or a baseline name)
    scores/<persona>.jsonl            per-question measures (rewritten by every scoring)
    report.md, report.json, report.png

Methods of a persona come from the bank: the entry named ``<persona>`` is the persona mask
(method ``persona``), entries named ``<persona>@<name>`` are baselines (method ``<name>``).
All masked generation and scoring run through the attached bank (the masked kernels), one persona
id per batch row; the dense model is id 0 of the same attached model.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from persona_kernels.bank import MaskBank

from .generate import (
    PERSONA_SPLITS,
    Answer,
    EvalItem,
    chat_prompt_ids,
    generate_batched,
    load_answers,
    load_items,
    load_personas,
    persona_system_prompt,
    save_answers,
)
from .judge import format_judge_prompt, load_judge_prompt
from .measures import mean, rouge_l_max
from .report import DENSE, PERSONA, method_order, write_report
from .selection import attach_for_eval, fidelity_fn

BASELINE_SEP = "@"


@dataclass
class EvalSettings:
    """What to evaluate and how. ``personas``: ``None`` = every persona the bank has a mask for."""

    data_dir: str
    bank_path: str | None
    out_dir: str
    personas: list[str] | None = None
    max_questions: int | None = None
    max_new_tokens: int = 128
    batch_size: int = 16
    fidelity_rows: int = 8
    model_dir: str | None = None
    device: str = "cpu"
    backend: str | None = None
    command: str | None = None
    notes: list[str] = field(default_factory=list)


def persona_methods(bank: MaskBank, persona: str) -> dict[str, str]:
    """``{method: bank entry}`` for a persona: ``persona`` -> ``<persona>``, ``<m>`` -> ``<persona>@<m>``."""
    methods: dict[str, str] = {}
    if persona in bank.names:
        methods[PERSONA] = persona
    prefix = persona + BASELINE_SEP
    for name in bank.names:
        if name.startswith(prefix) and len(name) > len(prefix):
            methods[name[len(prefix):]] = name
    return methods


def bank_personas(bank: MaskBank) -> list[str]:
    """Personas with at least one entry in the bank, in bank order."""
    seen: list[str] = []
    for name in bank.names:
        persona = name.split(BASELINE_SEP, 1)[0]
        if persona not in seen:
            seen.append(persona)
    return seen


def _log(message: str) -> None:
    print(f"[persona-eval {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _system_for(item: EvalItem, records: dict[str, dict]) -> str | None:
    return persona_system_prompt(records[item.persona]) if item.split in PERSONA_SPLITS else None


def _answers_path(out_dir: Path, persona: str, method: str) -> Path:
    return out_dir / "answers" / persona / f"{method}.jsonl"


def _reusable(path: Path, items: Sequence[EvalItem], systems: Sequence[str | None]) -> list[Answer] | None:
    """Saved answers at ``path`` if they cover exactly these questions with these prompts."""
    if not path.is_file():
        return None
    saved = {a.key: a for a in load_answers(path)}
    if len(saved) != len(items):
        return None
    ordered = []
    for item, system in zip(items, systems):
        answer = saved.get(item.key)
        if answer is None or answer.question != item.question or answer.system != system:
            return None
        ordered.append(answer)
    return ordered


def same_generation(run_dir: Path, max_new_tokens: int, model_dir: str | None) -> bool:
    """Whether ``run_dir/run.json`` records answers generated like ours (same model, same ``max_new_tokens``)."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        return False
    run = json.loads(path.read_text())
    return run.get("max_new_tokens") == max_new_tokens and run.get("model_dir") == model_dir


def generate_all(model, tokenizer, bank: MaskBank, select, personas: Sequence[str], data_dir: str, out_dir: Path,
                 max_questions: int | None, max_new_tokens: int, batch_size: int,
                 reuse_from: Sequence[Path] = (), resume: bool = True) -> None:
    """Generate (or reuse) every persona's answers for dense, its mask and its baselines, in mixed-persona batches.

    Saved answers in ``out_dir`` (if ``resume``) or dense answers in a ``reuse_from`` directory
    are reused when they cover the same questions and prompts; the caller checks that they were
    generated with the same model and ``max_new_tokens`` (:func:`same_generation`).
    """
    records = load_personas(data_dir)
    jobs: list[tuple[str, str, str, EvalItem, str | None]] = []  # persona, method, entry, item, system
    for persona in personas:
        items = load_items(data_dir, persona, max_questions)
        systems = [_system_for(item, records) for item in items]
        methods = {DENSE: DENSE, **persona_methods(bank, persona)}
        for method, entry in methods.items():
            target = _answers_path(out_dir, persona, method)
            found = _reusable(target, items, systems) if resume else None
            if found is None and method == DENSE:
                for other in reuse_from:
                    found = _reusable(_answers_path(Path(other), persona, method), items, systems)
                    if found is not None:
                        save_answers(target, found)
                        _log(f"{persona}/{method}: reused {len(found)} answers from {other}")
                        break
            if found is not None:
                continue
            jobs += [(persona, method, entry, item, system) for item, system in zip(items, systems)]
    if not jobs:
        _log("all answers already generated")
        return
    _log(f"generating {len(jobs)} answers (max_new_tokens={max_new_tokens}, batch {batch_size})")
    prompts = [chat_prompt_ids(tokenizer, system, item.question) for _, _, _, item, system in jobs]
    ids = [bank.persona_id(entry) for _, _, entry, _, _ in jobs]
    started = time.time()

    def progress(done: int, total: int) -> None:
        _log(f"  {done}/{total} answers, {time.time() - started:.0f} s")

    outputs = generate_batched(model, tokenizer, prompts, ids, select, max_new_tokens, batch_size, progress)
    grouped: dict[tuple[str, str], list[Answer]] = {}
    for (persona, method, entry, item, system), answer_ids in zip(jobs, outputs):
        text = tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
        grouped.setdefault((persona, method), []).append(Answer(
            persona, method, entry, item.split, item.index, item.question, system, text, answer_ids, item.references))
    for (persona, method), answers in grouped.items():
        save_answers(_answers_path(out_dir, persona, method), answers)


def saved_personas(out_dir: Path) -> list[str]:
    """Personas with saved answers under ``out_dir/answers``."""
    root = out_dir / "answers"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def score_all(out_dir: Path, personas: Sequence[str], data_dir: str, model=None, tokenizer=None,
              bank: MaskBank | None = None, select=None, judge=None, fidelity_rows: int = 8,
              judge_template: str | None = None) -> tuple[dict, dict]:
    """Score saved answers: fidelity (needs ``model``/``select``), ROUGE-L, optional judge.

    Returns ``(results, entries)``: ``results[persona][method][measure]`` and the bank entry of each method.
    """
    records = load_personas(data_dir)
    template = judge_template if judge_template is not None else (load_judge_prompt() if judge is not None else None)
    results: dict[str, dict[str, dict]] = {}
    entries: dict[str, dict[str, dict]] = {}
    for persona in personas:
        folder = out_dir / "answers" / persona
        answers = {path.stem: load_answers(path) for path in sorted(folder.glob("*.jsonl"))}
        if DENSE not in answers:
            raise FileNotFoundError(f"{folder}: no dense answers (dense.jsonl) to compare with")
        methods = [DENSE] + sorted(m for m in answers if m != DENSE)
        per_question: dict[str, dict[str, dict]] = {m: {a.key: {} for a in answers[m]} for m in methods}
        for method in methods:
            for a in answers[method]:
                if a.split == "rolebench" and a.references:
                    per_question[method][a.key]["rouge_l"] = rouge_l_max(a.answer, a.references)
        if model is not None and select is not None and bank is not None:
            _score_fidelity(model, tokenizer, bank, select, answers, methods, per_question, fidelity_rows)
            _log(f"{persona}: teacher-forced fidelity of {len(methods) - 1} method(s) on {len(answers[DENSE])} dense answers")
        else:
            _carry_fidelity(out_dir / "scores" / f"{persona}.jsonl", per_question)
        if judge is not None:
            record = records.get(persona, {"id": persona, "name": persona, "description": ""})
            for method in methods:
                for a in answers[method]:
                    if a.split in PERSONA_SPLITS:
                        prompt = format_judge_prompt(template, record.get("name", persona), record.get("description", ""),
                                                     a.question, a.answer)
                        s = judge.score(prompt)
                        per_question[method][a.key]["judge"] = s.score
                        per_question[method][a.key]["judge_how"] = s.how
            _log(f"{persona}: judged {sum(len(v) for v in answers.values())} answers")
        results[persona] = {m: _aggregate(per_question[m], answers[m]) for m in methods}
        entries[persona] = {}
        for method in method_order({persona: results[persona]}):
            if method == DENSE:
                continue
            entry = answers[method][0].entry if answers[method] else method
            info = {"entry": entry}
            if bank is not None and entry in bank.names:
                mask = bank.get(entry)
                info.update(method=mask.method, sparsity=mask.sparsity)
            entries[persona][method] = info
        scores_path = out_dir / "scores" / f"{persona}.jsonl"
        scores_path.parent.mkdir(parents=True, exist_ok=True)
        with scores_path.open("w", encoding="utf-8") as handle:
            for method in methods:
                for key, row in per_question[method].items():
                    handle.write(json.dumps({"persona": persona, "method": method, "question": key, **row}) + "\n")
    return results, entries


FIDELITY_FIELDS = ("kl", "top1", "tokens", "general_kl", "general_top1", "general_tokens")


def _carry_fidelity(path: Path, per_question: dict[str, dict[str, dict]]) -> None:
    """Keep the fidelity measures of an earlier scoring (``scores/<persona>.jsonl``) when not recomputing them."""
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            target = per_question.get(row.get("method"), {}).get(row.get("question"))
            if target is not None:
                target.update({k: row[k] for k in FIDELITY_FIELDS if k in row})


def _score_fidelity(model, tokenizer, bank, select, answers, methods, per_question, fidelity_rows) -> None:
    dense = answers[DENSE]
    masked = [m for m in methods if m != DENSE]
    entry_of = {m: answers[m][0].entry for m in masked if answers[m]}
    ids = [bank.persona_id(entry_of[m]) for m in masked if m in entry_of]
    if not ids:
        return
    prompts = [chat_prompt_ids(tokenizer, a.system, a.question) for a in dense]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stats = fidelity_fn()(model, prompts, [a.answer_ids for a in dense], ids, select, pad_id, fidelity_rows)
    for method in masked:
        if method not in entry_of:
            continue
        pid = bank.persona_id(entry_of[method])
        for a, per_id in zip(dense, stats):
            s = per_id[pid]
            row = per_question[method].setdefault(a.key, {})
            prefix = "" if a.split in PERSONA_SPLITS else "general_"
            row.update({f"{prefix}kl": s.mean_kl, f"{prefix}top1": s.top1, f"{prefix}tokens": s.n})
    for a in dense:
        prefix = "" if a.split in PERSONA_SPLITS else "general_"
        per_question[DENSE].setdefault(a.key, {}).update({f"{prefix}kl": 0.0, f"{prefix}top1": 1.0})


def _aggregate(rows: dict[str, dict], answers: Sequence[Answer]) -> dict[str, float | None]:
    """Mean over questions of each measure (KL/top-1 token-weighted within a question, then per-question mean)."""
    out: dict[str, float | None] = {}
    for measure in ("kl", "top1", "general_kl", "general_top1", "rouge_l", "judge"):
        out[measure] = mean(row.get(measure) for row in rows.values())
    out["answers"] = len(answers)
    out["mean_answer_tokens"] = mean(len(a.answer_ids) for a in answers)
    return out


def _run_meta(settings: EvalSettings, model, bank: MaskBank | None, judge, personas) -> dict:
    from persona_kernels.hf.ffn import model_name

    return {
        "command": settings.command,
        "base_model": model_name(model) if model is not None else None,
        "bank": settings.bank_path,
        "personas": list(personas),
        "judge": judge.name if judge is not None else "none (judge-free measures only)",
        "max_new_tokens": settings.max_new_tokens,
        "max_questions": settings.max_questions,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "notes": list(settings.notes),
    }


def load_model_and_tokenizer(model_dir: str | None, device: str = "cpu"):
    """The base model: ``model_dir`` (a local Hugging Face directory) or the embedded default model."""
    from persona_kernels.hf.default_model import load_default_model, load_model

    model, tokenizer = load_model(model_dir) if model_dir else load_default_model()
    if tokenizer is None:
        raise ValueError(f"{model_dir}: no tokenizer in the model directory")
    return model.to(device).eval(), tokenizer


def evaluate(settings: EvalSettings, judge=None, model=None, tokenizer=None, bank: MaskBank | None = None,
             reuse_from: Sequence[str] = ()) -> dict[str, Path]:
    """Generate, score and report. Pass ``model``/``tokenizer``/``bank`` to skip loading them. Returns report paths."""
    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if bank is None:
        if settings.bank_path is None:
            raise ValueError("a mask bank is needed (bank_path)")
        bank = MaskBank.load(settings.bank_path)
    if model is None:
        model, tokenizer = load_model_and_tokenizer(settings.model_dir, settings.device)
    personas = settings.personas or bank_personas(bank)
    missing = [p for p in personas if not persona_methods(bank, p)]
    if missing:
        raise ValueError(f"the bank has no entries for persona(s) {missing}; it holds {bank.names}")
    select = attach_for_eval(model, bank, settings.backend)
    resume = same_generation(out_dir, settings.max_new_tokens, settings.model_dir)
    reusable = [Path(p) for p in reuse_from if same_generation(Path(p), settings.max_new_tokens, settings.model_dir)]
    for other in set(map(str, reuse_from)) - set(map(str, reusable)):
        _log(f"not reusing {other}: made with another model or max_new_tokens (or has no run.json)")
    (out_dir / "run.json").write_text(json.dumps({
        "data_dir": str(settings.data_dir), "bank_path": settings.bank_path, "model_dir": settings.model_dir,
        "personas": list(personas), "max_questions": settings.max_questions, "max_new_tokens": settings.max_new_tokens,
        "command": settings.command, "notes": settings.notes,
    }, indent=2) + "\n")
    generate_all(model, tokenizer, bank, select, personas, settings.data_dir, out_dir, settings.max_questions,
                 settings.max_new_tokens, settings.batch_size, reusable, resume)
    _log("scoring")
    results, entries = score_all(out_dir, personas, settings.data_dir, model, tokenizer, bank, select, judge,
                                 settings.fidelity_rows)
    meta = _run_meta(settings, model, bank, judge, personas) | {"entries": entries}
    return write_report(out_dir, results, meta)


def rescore(out_dir: str | Path, judge=None, model=None, tokenizer=None, bank: MaskBank | None = None,
            fidelity: bool = True, data_dir: str | None = None, device: str = "cpu", backend: str | None = None,
            command: str | None = None) -> dict[str, Path]:
    """Re-score saved answers in ``out_dir`` (no generation) and rewrite the report.

    Fidelity needs the base model and the bank (from ``run.json`` unless given); ``fidelity=False``
    recomputes the text measures only (ROUGE-L, judge) and keeps the saved fidelity scores.
    """
    out_dir = Path(out_dir)
    run = json.loads((out_dir / "run.json").read_text()) if (out_dir / "run.json").is_file() else {}
    data_dir = data_dir or run.get("data_dir")
    if data_dir is None:
        raise ValueError(f"{out_dir}/run.json names no data_dir; pass data_dir")
    personas = run.get("personas") or saved_personas(out_dir)
    select = None
    if bank is None and run.get("bank_path") and (fidelity or Path(run["bank_path"]).is_file()):
        bank = MaskBank.load(run["bank_path"])  # for fidelity, and for the entries' methods and sparsities
    if fidelity:
        if model is None:
            model, tokenizer = load_model_and_tokenizer(run.get("model_dir"), device)
        select = attach_for_eval(model, bank, backend)
    settings = EvalSettings(data_dir, run.get("bank_path"), str(out_dir), personas, run.get("max_questions"),
                            run.get("max_new_tokens", 0), command=run.get("command") or command, notes=run.get("notes") or [])
    results, entries = score_all(out_dir, personas, data_dir, model if fidelity else None, tokenizer, bank, select, judge)
    meta = _run_meta(settings, model, bank, judge, personas) | {"entries": entries}
    previous = out_dir / "report.json"
    if meta.get("base_model") is None and previous.is_file():
        meta["base_model"] = json.loads(previous.read_text()).get("meta", {}).get("base_model")
    if command:
        meta["rescore_command"] = command
    return write_report(out_dir, results, meta)
