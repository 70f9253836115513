"""Exploratory (not part of the package): the persona mask alone against every baseline, question by question.

Reads the rows of ``rescore.py`` (``--results``, one per persona, sparsity and method, each with every
question's KL). For each persona it compares the mask **without** its recovery tables (``persona (no
scales)``) with each baseline on the same questions. Baselines are stored without recovery, so this
is like against like. The difference is ``mean over questions of (baseline KL - mask KL)``, with a
95% paired bootstrap interval over the questions (:func:`pruner.capability.stats.paired_drop`).
Verdicts:
- **win**: the whole interval is above 0 (the mask's KL is lower);
- **loss**: the whole interval is below 0;
- **tie**: the interval contains 0.

The mask with its recovery tables (``persona``) gets its own column, compared with the mask alone.

Writes ``fair.md``, ``fair.json`` and ``fair.png`` beside the results (or to ``--out``). Used for docs/PRUNER.md
("The persona mask alone against every baseline"):

    python experiments/pruner/rescore.py --banks docs/eval/pruner/pruner-s0.25.safetensors,docs/eval/pruner/pruner-s0.50.safetensors \
        --personas <all 14> --n-eval 40 --out /tmp/fair40/results.jsonl
    python experiments/pruner/fair_report.py --results /tmp/fair40/results.jsonl
"""
import argparse
import json
from pathlib import Path

from pruner.capability.stats import paired_drop
from pruner.data import read_jsonl

MASK, RECOVERED = "persona (no scales)", "persona"


def verdict(interval: dict) -> str:
    """``win`` / ``loss`` / ``tie`` of a paired difference (baseline - mask) by its interval."""
    return "win" if interval["lo"] > 0 else "loss" if interval["hi"] < 0 else "tie"


def compare(rows: list[dict], n_boot: int, seed: int) -> list[dict]:
    """One record per (sparsity, persona, other method): both KLs and the paired difference with its interval."""
    by_key = {(r["sparsity"], r["persona"], r["method"]): r for r in rows}
    records = []
    for (sparsity, persona, method), row in sorted(by_key.items()):
        mask = by_key.get((sparsity, persona, MASK))
        if method == MASK or mask is None:
            continue
        if len(row["question_kl"]) != len(mask["question_kl"]):
            raise SystemExit(f"{persona} s={sparsity}: {method} and the mask were scored on different questions")
        diff = paired_drop(row["question_kl"], mask["question_kl"], n_boot=n_boot, seed=seed)
        records.append({"sparsity": sparsity, "persona": persona, "method": method, "mask_kl": mask["kl"],
                        "kl": row["kl"], "diff": diff, "verdict": verdict(diff), "n_questions": len(mask["question_kl"])})
    return records


def markdown(records: list[dict]) -> str:
    """Per sparsity: a row per persona, the mask alone, each baseline's KL with its difference and verdict,
    then the recovered mask; then the win/tie/loss count per baseline."""
    lines = []
    for sparsity in sorted({r["sparsity"] for r in records}):
        rows = [r for r in records if r["sparsity"] == sparsity]
        baselines = sorted({r["method"] for r in rows if r["method"] != RECOVERED})
        n_q = rows[0]["n_questions"]
        lines += [f"\n### Sparsity {sparsity}: KL(dense || masked), nats per token, {n_q} questions per persona\n",
                  "Each baseline cell: its KL, then its KL minus the mask's (mean over questions, 95% paired bootstrap "
                  "interval) and the verdict for the mask alone. The last column is the mask with its recovery tables, "
                  "against the mask alone (negative = recovery helps).\n",
                  "| persona | mask alone | " + " | ".join(baselines) + " | mask + recovery |",
                  "|---" * (len(baselines) + 3) + "|"]
        for persona in sorted({r["persona"] for r in rows}):
            got = {r["method"]: r for r in rows if r["persona"] == persona}
            cells = [f"{next(iter(got.values()))['mask_kl']:.3f}"]
            for method in baselines:
                r = got.get(method)
                cells.append("–" if r is None else
                             f"{r['kl']:.3f}, {r['diff']['mean']:+.3f} [{r['diff']['lo']:+.3f}, {r['diff']['hi']:+.3f}] "
                             f"{'**' + r['verdict'] + '**' if r['verdict'] != 'win' else r['verdict']}")
            r = got.get(RECOVERED)
            cells.append("–" if r is None else f"{r['kl']:.3f} ({r['diff']['mean']:+.3f} "
                                               f"[{r['diff']['lo']:+.3f}, {r['diff']['hi']:+.3f}])")
            lines.append(f"| {persona} | " + " | ".join(cells) + " |")
        personas = sorted({r["persona"] for r in rows})
        mask_mean = sum(next(r["mask_kl"] for r in rows if r["persona"] == p) for p in personas) / len(personas)
        means = [f"{mask_mean:.3f}"]
        for method in baselines + [RECOVERED]:
            kls = [r["kl"] for r in rows if r["method"] == method]
            means.append(f"{sum(kls) / len(kls):.3f} ({len(kls)})" if kls else "–")
        lines.append("| **mean** (personas) | " + " | ".join(means) + " |")
        counts = []
        for method in baselines:
            verdicts = [r["verdict"] for r in rows if r["method"] == method]
            counts.append(f"{method}: {verdicts.count('win')} wins, {verdicts.count('tie')} ties, "
                          f"{verdicts.count('loss')} losses")
        lines.append("\nThe mask alone against each baseline, over personas: " + "; ".join(counts) + ".")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> Path | None:
    """One panel per sparsity: each persona's paired difference (baseline KL - mask KL) with its
    interval, grouped by baseline; above the zero line the mask alone wins. ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sparsities = sorted({r["sparsity"] for r in records})
    fig, axes = plt.subplots(1, len(sparsities), figsize=(6.5 * len(sparsities), 4.2), squeeze=False)
    colors = {"win": "tab:green", "tie": "tab:orange", "loss": "tab:red"}
    for ax, sparsity in zip(axes[0], sparsities):
        rows = [r for r in records if r["sparsity"] == sparsity and r["method"] != RECOVERED]
        baselines = sorted({r["method"] for r in rows})
        personas = sorted({r["persona"] for r in rows})
        width = 0.8 / max(len(personas), 1)
        for b, method in enumerate(baselines):
            for k, persona in enumerate(personas):
                r = next((r for r in rows if r["method"] == method and r["persona"] == persona), None)
                if r is None:
                    continue
                x = b - 0.4 + (k + 0.5) * width
                d = r["diff"]
                ax.errorbar([x], [d["mean"]], yerr=[[d["mean"] - d["lo"]], [d["hi"] - d["mean"]]], fmt="o", ms=3,
                            color=colors[r["verdict"]], capsize=1.5, lw=1)
        ax.axhline(0, color="black", lw=0.8)
        his = [r["diff"]["hi"] for r in rows] + [0.2]
        los = [r["diff"]["lo"] for r in rows] + [-0.2]
        ax.set_ylim(min(los) * 1.5, max(his) * 1.5)
        ax.set_xticks(range(len(baselines)), baselines)
        ax.set_yscale("symlog", linthresh=0.2)
        ax.set_title(f"sparsity {sparsity}: {len(personas)} personas, {rows[0]['n_questions']} questions each")
        ax.set_ylabel("baseline KL - mask-alone KL (nats/token)")
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=v) for v, c in colors.items()]
    axes[0][0].legend(handles=handles, loc="lower right", fontsize=8)
    fig.suptitle("Persona mask alone vs each baseline, per persona (95% paired bootstrap over questions)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    """Read the rescore rows, compare, write fair.md and fair.json."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", required=True, type=Path, help="rescore.py's results.jsonl (rows with question_kl)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: beside --results)")
    p.add_argument("--n-boot", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if not a.results.is_file():
        raise SystemExit(f"--results: no such file {a.results}")
    rows = [r for r in read_jsonl(a.results) if "question_kl" in r]
    if not rows:
        raise SystemExit(f"{a.results} has no rows with per-question KL (made by an older rescore.py?)")
    records = compare(rows, a.n_boot, a.seed)
    out = a.out or a.results.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "fair.json").write_text(json.dumps(records, indent=1) + "\n")
    text = markdown(records)
    (out / "fair.md").write_text(text)
    plot(records, out / "fair.png")
    print(text)


if __name__ == "__main__":
    main()
