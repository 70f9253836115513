"""The acceptance experiment: persona masks vs baselines, judge-free fidelity on held-out questions.

    python -m pruner.experiment --personas jack_torrance,alpaca_user_0 --sparsities 0.25,0.5 --out out/pruner_exp

For each persona (outer loop) and sparsity: learn the persona mask (+ scales) and every baseline,
then measure KL(dense || masked) and top-1 agreement on ``eval/<persona>.jsonl`` questions (never
used in training), teacher-forced on the dense persona's greedy answers. Results are appended to
``results.jsonl`` as they come; ``table.md`` is rewritten after each persona.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .config import BASELINES, PrunerConfig, add_scale_arguments
from .data import JsonlCache, load_personas, read_jsonl
from .fidelity import FidelityEval
from .pipeline import Pruner

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def eval_questions(persona_id: str, n: int, data_dir: Path) -> list[str]:
    """``n`` held-out questions, half persona-specific and half general (first rows of each split)."""
    rows = read_jsonl(data_dir / "eval" / f"{persona_id}.jsonl")
    specific = [r["question"] for r in rows if r["split"] == "specific"]
    general = [r["question"] for r in rows if r["split"] == "general"]
    return specific[: n - n // 2] + general[: n // 2]


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The held-out evaluation flags (``--data-dir``, ``--n-eval``, ``--eval-tokens``), shared by the studies so
    their numbers are measured on the same questions and answers."""
    parser.add_argument("--data-dir", default=str(SHARED))
    parser.add_argument("--n-eval", type=int, default=8)
    parser.add_argument("--eval-tokens", type=int, default=32)


def persona_fidelity(model, tokenizer, persona_id: str, description: str, args: argparse.Namespace, cache: JsonlCache,
                     fingerprint: str) -> FidelityEval:
    """The held-out fidelity measure of one persona, as set by :func:`add_eval_arguments`."""
    return FidelityEval(model, tokenizer, description, eval_questions(persona_id, args.n_eval, Path(args.data_dir)),
                        max_new_tokens=args.eval_tokens, cache=cache, identity=f"dense:{fingerprint}")


def write_table(results: list[dict], path: Path) -> None:
    """Markdown table: KL / top-1 per persona, sparsity and method, with means."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    lines = []
    for sparsity in sorted({r["sparsity"] for r in results}):
        rows = [r for r in results if r["sparsity"] == sparsity]
        personas = list(dict.fromkeys(r["persona"] for r in rows))
        lines += [f"\n### sparsity {sparsity} — KL(dense ‖ masked) nats/token (top-1 agreement)\n",
                  "| persona | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for persona in personas + ["mean"]:
            cells = []
            for method in methods:
                got = [r for r in rows if r["method"] == method and (persona == "mean" or r["persona"] == persona)]
                if not got:
                    cells.append("–")
                    continue
                kl = sum(r["kl"] for r in got) / len(got)
                top1 = sum(r["top1"] for r in got) / len(got)
                cells.append(f"{kl:.3f} ({top1:.3f})")
            lines.append(f"| {persona} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Run the experiment (see module docstring)."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--personas", required=True, help="comma-separated persona ids")
    add_eval_arguments(p)
    p.add_argument("--sparsities", default="0.25,0.5")
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--out", default="out/pruner_exp")
    p.add_argument("--steps", type=int, default=16)
    add_scale_arguments(p, steps=8)
    p.add_argument("--n-train", type=int, default=16)
    p.add_argument("--max-pool", type=int, default=60)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--pool", default=None)
    p.add_argument("--kl-weight", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--baselines", default="all", help="comma list, 'all' or 'none'")
    p.add_argument("--tag", default="", help="suffix of the persona-pruner method labels (ablations)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from persona_kernels.hf.default_model import load_default_model

    began = time.perf_counter()
    model, tokenizer = load_default_model()
    load_s = time.perf_counter() - began
    config = PrunerConfig(group_size=args.group_size, steps=args.steps, scale_steps=args.scale_steps, n_train=args.n_train,
                          max_pool=args.max_pool, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                          pool=args.pool, kl_weight=args.kl_weight, lr=args.lr, scale_lr=args.scale_lr,
                          scale_kl_weight=args.scale_kl_weight, input_gains=args.input_gains, gain_lr=args.gain_lr,
                          output_bias=args.output_bias, bias_lr=args.bias_lr,
                          baselines=tuple(BASELINES) if args.baselines == "all" else tuple(b for b in args.baselines.split(",") if b and b != "none"),
                          progress=False, cache_dir=str(out / "cache"))
    pruner = Pruner(model, tokenizer, config)
    personas = load_personas(Path(args.data_dir) / "personas" / "personas.jsonl", args.personas.split(","))
    eval_cache = JsonlCache(out / "cache" / "eval_answers.jsonl")
    results_path = out / "results.jsonl"
    results = read_jsonl(results_path) if results_path.is_file() else []
    done = {(r["persona"], r["sparsity"], r["method"]) for r in results}
    log = open(out / "timings.jsonl", "a")
    for row in personas:
        pid, description = row["id"], row["description"]
        t0 = time.perf_counter()
        fidelity = persona_fidelity(model, tokenizer, pid, description, args, eval_cache, pruner.fingerprint)
        eval_setup_s = time.perf_counter() - t0
        for sparsity in [float(s) for s in args.sparsities.split(",")]:
            if all((pid, sparsity, m) in done for m in (f"persona-pruner{args.tag}", *config.baselines)):
                continue
            config.sparsity = sparsity
            t1 = time.perf_counter()
            masks = pruner.prune(pid, description)
            prune_s = time.perf_counter() - t1
            learned = masks[0]
            measured = [(f"persona-pruner{args.tag}", learned.keep, learned.scales, learned.input_gains, learned.output_bias),
                        (f"persona-pruner{args.tag} (no scales)", learned.keep, None, None, None)]
            measured += [(m.method, m.keep, None, None, None) for m in masks[1:]]
            for method, keep, scales, gains, bias in measured:
                score = fidelity.measure(keep, config.group_size, scales, gains, bias)
                result = {"persona": pid, "sparsity": sparsity, "method": method, **score}
                results.append(result)
                with open(results_path, "a") as stream:
                    stream.write(json.dumps(result) + "\n")
            pruner.add_to_bank(out / f"bank_s{sparsity}{args.tag}.safetensors", masks)
            r = masks[0].report
            log.write(json.dumps({"persona": pid, "sparsity": sparsity, "tag": args.tag, "model_load_s": round(load_s, 1),
                                  "eval_setup_s": round(eval_setup_s, 1), "prune_with_baselines_s": round(prune_s, 1),
                                  **{k: r.get(k) for k in ("sensitivity_s", "teacher_s", "init_stats_s", "learn_s", "scales_s",
                                                           "total_s", "train_sequences", "answer_tokens")},
                                  **{k: round(v, 1) for k, v in pruner.timings.items()}}) + "\n")
            log.flush()
            write_table(results, out / "table.md")
            print(f"{pid} s={sparsity}: done in {prune_s:.0f}s", flush=True)


if __name__ == "__main__":
    main()
