"""Issue 8's measurement: how much do learned per-channel scales lower a fixed persona mask's KL?

    python -m pruner.scale_study --bank out/bank_s0.5.safetensors --personas twilight_sparkle,jack_torrance \
        --out out/scale_study --bank-out out/bank_s0.5_scaled.safetensors

For each persona of the bank (its ``persona-pruner`` entry, mask kept as learned), scales are
learned with :func:`pruner.learn.learn_scales` on that persona's calibration data (CE + KL to the
dense persona; by default 160 sequences, 60 steps, KL weight 10; ``--input-gains`` learns FFN input
gains and ``--output-bias`` an FFN output bias with them), then the judge-free fidelity of the mask alone and of the mask with scales is measured on the held-out ``eval/<persona>.jsonl``
questions (as in :mod:`pruner.experiment`).
Rows go to ``scales.jsonl`` and ``scales.md``, both rewritten after each persona.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from persona_kernels.bank import MaskBank

from .config import PrunerConfig, PrunerInputError, add_scale_arguments
from .data import JsonlCache, load_personas, read_jsonl
from .experiment import add_eval_arguments, persona_fidelity
from .learn import learn_scales
from .masked_model import expand_groups
from .pipeline import Pruner


def write_table(rows: list[dict], path: Path) -> None:
    """Markdown: KL of the mask alone and with scales, the relative reduction, per persona and sparsity, with means."""
    lines = ["| sparsity | persona | mask KL (top-1) | mask + scales KL (top-1) | KL reduction | train seqs | steps | learn s |",
             "|---|---|---|---|---|---|---|---|"]
    for sparsity in sorted({r["sparsity"] for r in rows}):
        group = [r for r in rows if r["sparsity"] == sparsity]
        for r in group:
            lines.append(f"| {sparsity} | {r['persona']} | {r['kl_mask']:.3f} ({r['top1_mask']:.3f}) | "
                         f"{r['kl_scaled']:.3f} ({r['top1_scaled']:.3f}) | {100 * r['reduction']:.1f}% | "
                         f"{r['train_sequences']} | {r['scale_steps']} | {r['scales_s']:.0f} |")
        mean = lambda key: sum(r[key] for r in group) / len(group)  # noqa: E731
        lines.append(f"| {sparsity} | **mean** | {mean('kl_mask'):.3f} ({mean('top1_mask'):.3f}) | "
                     f"{mean('kl_scaled'):.3f} ({mean('top1_scaled'):.3f}) | "
                     f"{100 * (1 - mean('kl_scaled') / mean('kl_mask')):.1f}% (of the mean) | | | |")
    path.write_text("\n".join(lines) + "\n")


def _recipe(args: argparse.Namespace) -> dict:
    """This run's scale recipe, keyed as in ``scales.jsonl`` rows (and, via :func:`_report_keys`, bank reports)."""
    recipe = {"scale_steps": args.scale_steps, "scale_lr": args.scale_lr, "scale_kl_weight": args.scale_kl_weight,
              "n_train": args.n_train, "input_gains": args.input_gains, "output_bias": args.output_bias}
    if args.input_gains:
        recipe["gain_lr"] = args.gain_lr
    if args.output_bias:
        recipe["bias_lr"] = args.bias_lr
    return recipe


_UNRECORDED = {"input_gains": False, "output_bias": False, "scale_n_train": None}
"""What rows and reports written before a key was recorded meant by its absence (``None``: whatever is asked)."""


def _matches(record: dict, wanted: dict) -> bool:
    """Whether ``record`` holds every ``wanted`` value, reading absent keys as :data:`_UNRECORDED` says."""
    def value(key):
        if key in record or key not in _UNRECORDED:
            return record.get(key)
        return wanted[key] if _UNRECORDED[key] is None else _UNRECORDED[key]

    return all(value(k) == v for k, v in wanted.items())


def _report_keys(recipe: dict) -> dict:
    """The recipe as stored in a ``--bank-out`` entry's report (``n_train`` is the mask's there, so it is prefixed)."""
    return {("scale_n_train" if key == "n_train" else key): value for key, value in recipe.items()}


def _same_run(row: dict, persona: str, sparsity: float, recipe: dict) -> bool:
    """Whether a ``scales.jsonl`` row measured ``persona`` at ``sparsity`` with ``recipe``."""
    return row["persona"] == persona and row["sparsity"] == sparsity and _matches(row, recipe)


def _carries_scales(report: dict, recipe: dict) -> bool:
    """Whether a ``--bank-out`` entry's report says its scales (and gains) were learned here with ``recipe``."""
    return _matches(report, _report_keys(recipe))


def _write_rows(rows: list[dict], path: Path) -> None:
    """Rewrite ``scales.jsonl`` atomically (a crash keeps the previous file)."""
    temp = path.with_name(path.name + ".partial")
    temp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    temp.replace(path)


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (see module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bank", required=True, help="a bank written by pruner.experiment (its persona-pruner entries are used)")
    p.add_argument("--personas", required=True, help="comma-separated persona ids")
    add_eval_arguments(p)
    p.add_argument("--out", default="out/scale_study")
    p.add_argument("--n-train", type=int, default=160)
    p.add_argument("--max-pool", type=int, default=160)
    p.add_argument("--keep-fraction", type=float, default=1.0, help="most persona-sensitive fraction of the pool kept")
    p.add_argument("--max-new-tokens", type=int, default=32)
    add_scale_arguments(p, steps=60)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--cache-dir", default=None, help="pruner cache (default: <out>/cache)")
    p.add_argument("--bank-out", default=None,
                   help="also write a copy of the bank whose studied personas carry the new scales (saved after each)")
    return p


def main(argv: list[str] | None = None) -> None:
    """Run the study on the embedded default model (see module docstring)."""
    args = build_parser().parse_args(argv)
    from persona_kernels.hf.default_model import load_default_model

    model, tokenizer = load_default_model()
    study(model, tokenizer, args)


def study(model, tokenizer, args: argparse.Namespace) -> list[dict]:
    """Learn and measure scales for ``args.personas`` of ``args.bank`` on ``model``; return all rows of ``scales.jsonl``."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bank = MaskBank.load(args.bank)
    if args.bank_out and Path(args.bank_out).is_file():  # resume: personas studied earlier keep their new scales
        written = MaskBank.load(args.bank_out)
        if written.names != bank.names or written.fingerprint != bank.fingerprint:
            raise PrunerInputError(f"--bank-out {args.bank_out} exists but is not a copy of {args.bank}; "
                                   "remove it or choose another path")
        bank = written
    config = PrunerConfig(group_size=bank.group_size, n_train=args.n_train, max_pool=args.max_pool,
                          keep_fraction=args.keep_fraction, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                          scale_kl_weight=args.scale_kl_weight, scale_steps=args.scale_steps, scale_lr=args.scale_lr,
                          progress=False, cache_dir=args.cache_dir or str(out / "cache"))
    config.validate()
    pruner = Pruner(model, tokenizer, config)
    bank.check_model(pruner.fingerprint, pruner.n_layers, pruner.d_ff, pruner.model_name)
    eval_cache = JsonlCache(out / "cache" / "eval_answers.jsonl")
    results_path = out / "scales.jsonl"
    rows = read_jsonl(results_path) if results_path.is_file() else []
    recipe = _recipe(args)
    for row in load_personas(Path(args.data_dir) / "personas" / "personas.jsonl", args.personas.split(",")):
        pid, description = row["id"], row["description"]
        mask = bank.get(pid)
        sparsity = float(mask.report.get("sparsity", mask.sparsity))
        measured = [r for r in rows if _same_run(r, pid, sparsity, recipe)]
        if measured and (not args.bank_out or _carries_scales(mask.report, recipe)):
            continue
        rows = [r for r in rows if r not in measured]  # relearned: its bank entry was missing, its row is replaced
        data, data_report = pruner.persona_data(description)
        began = time.perf_counter()
        recovery, result = learn_scales(model, data, mask.keep, bank.group_size, steps=args.scale_steps,
                                        lr=args.scale_lr, batch_size=args.batch_size, seed=config.seed,
                                        kl_weight=args.scale_kl_weight, input_gains=args.input_gains,
                                        gain_lr=args.gain_lr, bias=args.output_bias, bias_lr=args.bias_lr, progress=False)
        learn_s = time.perf_counter() - began
        scales, gains, bias = recovery.scales, recovery.input_gains, recovery.output_bias
        kept_scales = scales[expand_groups(mask.keep, bank.group_size)]
        fidelity = persona_fidelity(model, tokenizer, pid, description, args, eval_cache, pruner.fingerprint)
        alone = fidelity.measure(mask.keep, bank.group_size)
        scaled = fidelity.measure(mask.keep, bank.group_size, scales, gains, bias)
        result_row = {"persona": pid, "sparsity": sparsity, "kl_mask": alone["kl"], "top1_mask": alone["top1"],
                      "kl_scaled": scaled["kl"], "top1_scaled": scaled["top1"], "reduction": 1 - scaled["kl"] / alone["kl"],
                      "eval_tokens": alone["tokens"], "train_sequences": data_report["train_sequences"],
                      "answer_tokens": data_report["answer_tokens"], **recipe, "scales_s": round(learn_s, 1),
                      "scale_range": [round(float(kept_scales.min()), 3), round(float(kept_scales.max()), 3)],
                      **({} if gains is None else {"gain_range": [round(float(gains.min()), 3), round(float(gains.max()), 3)]}),
                      **({} if bias is None else {"bias_range": [round(float(bias.min()), 3), round(float(bias.max()), 3)]}),
                      "loss_first_last": [round(result.curve[0][1], 3), round(result.curve[-1][1], 3)] if result.curve else []}
        rows.append(result_row)
        _write_rows(rows, results_path)
        write_table(rows, out / "scales.md")
        if args.bank_out:
            report = dict(mask.report, scales_s=result_row["scales_s"], scale_train_sequences=result_row["train_sequences"],
                          **_report_keys(recipe))
            bank.add(replace(mask, scales=scales, input_gains=gains, output_bias=bias, report=report))
            bank.save(args.bank_out)
        print(f"{pid} s={sparsity}: KL {alone['kl']:.3f} -> {scaled['kl']:.3f} ({100 * result_row['reduction']:.1f}%)", flush=True)
    return rows


if __name__ == "__main__":
    main()
