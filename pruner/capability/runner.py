"""The capability evaluation: every suite's items, for dense, the persona masks and the baselines, cached per item.

Layout of an output directory::

    run.json                                     settings (model, bank, suites, items, seed, command)
    items/<suite>/<persona>/<method>.jsonl       one line per item: raw outputs and its scores
    items/<suite>/_shared/dense.jsonl            multiple-choice suites: dense needs no persona
    report.md, report.json, report.png

Methods come from the bank as in ``persona-eval`` (:func:`pruner.evaluation.runner.persona_methods`):
``<p>`` is the persona mask, ``<p>@<name>`` a baseline. ``persona`` is the mask alone (scales,
input gains and output bias dropped); ``persona+recovery`` is the same entry with the recovery
it carries. Everything runs through the attached bank (one persona id per batch row, id 0 = dense).

Multiple-choice suites score the plain context with no system prompt (the standard protocol: what
the mask keeps of the model's knowledge); generative suites are asked in persona (system prompt =
the persona prompt, plus the tool list for ``tools``). Each item line is appended as soon as it is
scored, so an interrupted run resumes; a line is reused only when its prompt and its bank entry's
mask are unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from persona_kernels.bank import MaskBank, PersonaMask
from pruner.evaluation.generate import chat_prompt_ids, generate_batched, load_personas, persona_system_prompt
from pruner.evaluation.runner import persona_methods
from pruner.evaluation.selection import attach_for_eval

from .items import GenItem, MCItem, subset
from .mc import encode_item, loglikelihoods, score_mc
from .persona_check import persona_pmi
from .store import DENSE, PERSONA, RECOVERY, SHARED, append_lines, item_path, read_lines
from .suites import SUITES, Suite, get_suite

RECOVERY_FIELDS = ("scales", "input_gains", "output_bias")


@dataclass
class CapabilitySettings:
    """What to evaluate. ``items``: per-suite item counts (``None`` = the suite's default, 0 = all)."""

    out_dir: str
    bank_path: str | None
    data_dir: str = "../shared/data"
    model: str | None = None
    personas: list[str] | None = None
    methods: list[str] | None = None
    suites: list[str] = field(default_factory=lambda: list(SUITES))
    items: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    batch_size: int = 8
    mc_batch: int = 8
    max_new_tokens: dict[str, int] = field(default_factory=dict)
    persona_check: bool = True
    device: str = "cpu"
    backend: str | None = None
    command: str | None = None
    notes: list[str] = field(default_factory=list)


def _log(message: str) -> None:
    print(f"[persona-eval capability {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _has_recovery(mask: PersonaMask) -> bool:
    return any(getattr(mask, f) is not None for f in RECOVERY_FIELDS)


def mask_digest(mask: PersonaMask | None) -> str:
    """A short hash of what a bank entry computes with (keep bits and recovery tensors); ``dense`` for none."""
    if mask is None:
        return DENSE
    h = hashlib.sha1(mask.keep.to(torch.uint8).numpy().tobytes())
    for name in RECOVERY_FIELDS:
        value = getattr(mask, name)
        h.update(name.encode() + (b"-" if value is None else value.float().numpy().tobytes()))
    return h.hexdigest()[:16]


def eval_bank(bank: MaskBank, personas: Sequence[str], methods: Sequence[str] | None) -> tuple[MaskBank, dict[str, dict[str, str]]]:
    """A bank holding only what is evaluated, and ``{persona: {method: entry name}}`` into it.

    ``methods``: ``None`` = the persona mask, ``persona+recovery`` where the entry carries recovery,
    and every baseline. Unknown methods for a persona are an error naming what the bank has.
    """
    entries: list[PersonaMask] = []
    table: dict[str, dict[str, str]] = {}
    for persona in personas:
        found = persona_methods(bank, persona)
        if not found:
            raise ValueError(f"the bank has no entries for persona {persona!r}; it holds {bank.names}")
        available = dict.fromkeys(m for m in found if m != PERSONA)
        if PERSONA in found:
            available = {PERSONA: None, **({RECOVERY: None} if _has_recovery(bank.get(found[PERSONA])) else {}), **available}
        wanted = list(available) if methods is None else [m for m in methods if m != DENSE]
        missing = [m for m in wanted if m not in available]
        if missing:
            raise ValueError(f"persona {persona!r} has no method(s) {missing} in the bank; it has {list(available)}")
        table[persona] = {}
        for method in wanted:
            if method in (PERSONA, RECOVERY):
                source = bank.get(found[PERSONA])
                mask = dataclasses.replace(source, **{f: None for f in RECOVERY_FIELDS}) if method == PERSONA else source
                name = persona if method == PERSONA else f"{persona}@{RECOVERY}"
                mask = dataclasses.replace(mask, name=name)
            else:
                mask = bank.get(found[method])
                name = mask.name
            entries.append(mask)
            table[persona][method] = name
    return dataclasses.replace(bank, personas=entries), table


def _key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


@dataclass
class _Job:
    suite: Suite
    persona: str  # SHARED for persona-free dense rows
    method: str
    pid: int
    digest: str
    item: MCItem | GenItem
    system: str | None = None
    prompt: list[int] | None = None

    @property
    def key(self) -> str:
        if isinstance(self.item, MCItem):
            return _key(self.item.context, self.item.choices, self.digest)
        return _key(self.system, self.item.user, self.digest, self.suite.max_new_tokens)


def _system(record: dict | None, item: GenItem) -> str | None:
    persona = persona_system_prompt(record) if (record is not None and item.persona_prompt) else None
    parts = [p for p in (persona, item.system_extra) if p]
    return "\n\n".join(parts) if parts else None


def suite_items(suite: Suite, n: int | None, seed: int) -> list:
    """The suite's items, a seeded subset of ``n`` (``None``: the suite's default count, 0: all)."""
    count = suite.default_items if n is None else (None if n == 0 else n)
    return subset(suite.load(), count, seed)


def _pending(jobs: Sequence[_Job], out_dir: Path) -> list[_Job]:
    cache: dict[Path, dict[str, dict]] = {}
    todo = []
    for job in jobs:
        path = item_path(out_dir, job.suite.name, job.persona, job.method)
        if path not in cache:
            cache[path] = read_lines(path)
        saved = cache[path].get(job.item.id)
        if saved is None or saved.get("key") != job.key:
            todo.append(job)
    return todo


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True)


def run_mc(model, tokenizer, select, jobs: Sequence[_Job], out_dir: Path, batch: int, max_tokens: int = 4096) -> None:
    """Score multiple-choice jobs in batches of up to ``batch`` items (and about ``max_tokens`` tokens), appending lines."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = {}
    for job in jobs:
        if job.item.id not in encoded:
            encoded[job.item.id] = encode_item(tokenizer, job.item)
    order = sorted(jobs, key=lambda j: len(encoded[j.item.id].context))
    with _progress(len(order), f"{jobs[0].suite.name}") as bar:
        start = 0
        while start < len(order):
            chunk, tokens = [], 0
            while start < len(order) and len(chunk) < batch:
                request = encoded[order[start].item.id]
                size = len(request.context) + sum(len(c) for c in request.continuations)
                if chunk and tokens + size > max_tokens:
                    break
                chunk.append(order[start])
                tokens += size
                start += 1
            requests = [dataclasses.replace(encoded[j.item.id], persona_id=j.pid) for j in chunk]
            lls = loglikelihoods(model, requests, select, pad_id)
            by_path: dict[Path, list[dict]] = {}
            for job, request, ll in zip(chunk, requests, lls):
                n_tokens = [len(c) for c in request.continuations]
                row = {"id": job.item.id, "key": job.key, "persona": job.persona, "method": job.method,
                       "lls": ll, "n_tokens": n_tokens, "gold": job.item.gold, **score_mc(job.item, ll, n_tokens)}
                by_path.setdefault(item_path(out_dir, job.suite.name, job.persona, job.method), []).append(row)
            for path, rows in by_path.items():
                append_lines(path, rows)
            bar.update(len(chunk))


def run_gen(model, tokenizer, select, jobs: Sequence[_Job], out_dir: Path, batch_size: int, max_new_tokens: int,
            persona_check: bool, systems_for_check: dict[str, str]) -> None:
    """Generate, score and append generative jobs, ``4 * batch_size`` answers at a time (shortest prompts first)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(jobs, key=lambda j: len(j.prompt))
    suite = jobs[0].suite
    step = 4 * batch_size
    with _progress(len(order), suite.name) as bar:
        for start in range(0, len(order), step):
            chunk = order[start:start + step]
            outputs = generate_batched(model, tokenizer, [j.prompt for j in chunk], [j.pid for j in chunk], select,
                                       max_new_tokens, batch_size)
            texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs]
            pmis: list[float | None] = [None] * len(chunk)
            if persona_check and suite.persona_check:
                pmis = persona_pmi(model, tokenizer, select, [systems_for_check[j.persona] for j in chunk],
                                   [j.item.user for j in chunk], outputs, pad_id, batch_rows=batch_size)
            by_path: dict[Path, list[dict]] = {}
            for job, ids, text, pmi in zip(chunk, outputs, texts, pmis):
                row = {"id": job.item.id, "key": job.key, "persona": job.persona, "method": job.method,
                       "answer": text, "answer_tokens": len(ids), **suite.score(job.item, text, job.system)}
                if suite.persona_check:
                    row.update(persona_pmi=pmi, in_persona=None if pmi is None else float(pmi > 0))
                by_path.setdefault(item_path(out_dir, suite.name, job.persona, job.method), []).append(row)
            for path, rows in by_path.items():
                append_lines(path, rows)
            bar.update(len(chunk))


def _run_meta(settings: CapabilitySettings, model, table, personas, item_counts) -> dict:
    from persona_kernels.hf.ffn import model_name

    return {
        "kind": "capability",
        "command": settings.command,
        "model": settings.model,
        "base_model": model_name(model) if model is not None else None,
        "bank": settings.bank_path,
        "data_dir": str(settings.data_dir),
        "personas": list(personas),
        "entries": table,
        "suites": list(settings.suites),
        "items": item_counts,
        "seed": settings.seed,
        "max_new_tokens": {s: settings.max_new_tokens.get(s, get_suite(s).max_new_tokens) for s in settings.suites
                           if get_suite(s).kind == "gen"},
        "persona_check": settings.persona_check,
        "notes": list(settings.notes),
    }


def evaluate_capability(settings: CapabilitySettings, model=None, tokenizer=None, bank: MaskBank | None = None) -> dict[str, Path]:
    """Run (or resume) every suite for every persona's methods and dense, then write the report; returns its paths."""
    from .report import write_capability_report

    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if bank is None and settings.bank_path is not None:
        bank = MaskBank.load(settings.bank_path)
    for name in settings.suites:
        get_suite(name)
    if bank is None:  # dense only: the model's own scores, e.g. before any mask is learned for it
        if not settings.personas:
            raise ValueError("without a bank, name the personas whose prompts the generative suites use")
        personas, small, table = list(settings.personas), None, {p: {} for p in settings.personas}
    else:
        personas = settings.personas or list(dict.fromkeys(n.split("@", 1)[0] for n in bank.names))
        small, table = eval_bank(bank, personas, settings.methods)
    run_path = out_dir / "run.json"
    if run_path.is_file():
        previous = json.loads(run_path.read_text())
        if previous.get("model") != settings.model:
            raise ValueError(f"{out_dir} holds results of model {previous.get('model')!r}, not {settings.model!r}; "
                             "use another --out")
    if model is None:
        from pruner.evaluation.runner import load_model_and_tokenizer

        began = time.perf_counter()
        model, tokenizer = load_model_and_tokenizer(settings.model, settings.device)
        _log(f"model loaded in {time.perf_counter() - began:.0f} s")
    select = attach_for_eval(model, small, settings.backend) if small is not None else (lambda ids: contextlib.nullcontext())
    records = load_personas(settings.data_dir)
    unknown = [p for p in personas if p not in records]
    if unknown:
        raise ValueError(f"persona(s) {unknown} are not in {settings.data_dir}/personas/personas.jsonl")
    item_counts: dict[str, int] = {}
    timings: dict[str, float] = {}
    meta = _run_meta(settings, model, table, personas, item_counts)
    for name in settings.suites:
        suite = get_suite(name)
        items = suite_items(suite, settings.items.get(name), settings.seed)
        item_counts[name] = len(items)
        run_path.write_text(json.dumps(meta | {"items": item_counts, "timings_s": timings}, indent=2) + "\n")
        jobs: list[_Job] = []
        for persona in personas:
            record = records[persona]
            methods = [(DENSE, 0, None)] + [(m, small.persona_id(e), small.get(e)) for m, e in table[persona].items()]
            for method, pid, mask in methods:
                owner = SHARED if (suite.kind == "mc" and method == DENSE) else persona
                if suite.kind == "mc" and method == DENSE and persona != personas[0]:
                    continue
                for item in items:
                    job = _Job(suite, owner, method, pid, mask_digest(mask), item)
                    if suite.kind == "gen":
                        job.system = _system(record, item)
                        job.prompt = chat_prompt_ids(tokenizer, job.system, item.user)
                    jobs.append(job)
        todo = _pending(jobs, out_dir)
        _log(f"{name}: {len(items)} items, {len(jobs)} (item, method) pairs, {len(todo)} to run")
        began = time.perf_counter()
        if todo and suite.kind == "mc":
            run_mc(model, tokenizer, select, todo, out_dir, settings.mc_batch)
        elif todo:
            systems = {p: persona_system_prompt(records[p]) for p in personas}
            run_gen(model, tokenizer, select, todo, out_dir, settings.batch_size,
                    settings.max_new_tokens.get(name, suite.max_new_tokens), settings.persona_check, systems)
        if todo:
            timings[name] = round(time.perf_counter() - began, 1)
            _log(f"{name}: {len(todo)} pairs in {timings[name]:.0f} s ({timings[name] / len(todo):.2f} s per pair)")
    meta = meta | {"items": item_counts, "timings_s": timings}
    run_path.write_text(json.dumps(meta, indent=2) + "\n")
    return write_capability_report(out_dir, meta)


def rescore_capability(out_dir: str | Path, command: str | None = None) -> dict[str, Path]:
    """Re-score the saved answers of a capability run (text scorers only; log-likelihoods are kept) and rewrite its report."""
    from .report import write_capability_report

    out_dir = Path(out_dir)
    meta = json.loads((out_dir / "run.json").read_text())
    for name in meta["suites"]:
        suite = get_suite(name)
        if suite.kind != "gen":
            _rescore_mc(out_dir, suite)
            continue
        items = {i.id: i for i in suite.load()}
        records = load_personas(meta["data_dir"])
        for path in sorted((out_dir / "items" / name).glob("*/*.jsonl")):
            rows = read_lines(path)
            record = records.get(path.parent.name)
            for row in rows.values():
                item = items.get(row["id"])
                if item is not None:
                    row.update(suite.score(item, row["answer"], _system(record, item)))
            _rewrite(path, rows.values())
    if command:
        meta["rescore_command"] = command
    return write_capability_report(out_dir, meta)


def _rescore_mc(out_dir: Path, suite: Suite) -> None:
    items = {i.id: i for i in suite.load()}
    for path in sorted((out_dir / "items" / suite.name).glob("*/*.jsonl")):
        rows = read_lines(path)
        for row in rows.values():
            item = items.get(row["id"])
            if item is not None:
                row.update(score_mc(item, row["lls"], row["n_tokens"]))
        _rewrite(path, rows.values())


def _rewrite(path: Path, rows) -> None:
    temp = path.with_suffix(".jsonl.partial")
    with temp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    temp.replace(path)
