"""Exploratory (not part of the package): plot held-out KL against step for the recovery runs of lever.py.

One panel per (persona, sparsity) found in ``--runs`` (lever.py's JSON rows), one line per variant, a
dashed line at 60% of the mask's KL (the 40% target). Used for docs/SCALES.md:

    python experiments/scales/plot_recovery.py --runs docs/scales/recovery_runs.jsonl --out docs/scales/recovery.png
"""
import argparse
import json
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {"scales": "scales (copy-free)", "scales+gain+learnbias": "scales + input gains + output bias (copy-free)",
          "lora": "rank-{lora_rank} LoRA on gate/up/down", "finetune": "fine-tuned FFN (a copy), lr {ft_lr:g}",
          "finetuneall": "fine-tuned model (a copy), lr {ft_lr:g}"}
COLOURS = {"scales": "tab:purple", "scales+gain+learnbias": "tab:pink", "lora": "tab:green", "finetune": "tab:orange",
           "finetuneall": "tab:red"}


def label(row: dict) -> str:
    """Legend text of one run: its variant, with the rank or step size that tells runs of one variant apart."""
    return LABELS.get(row["variant"], row["variant"]).format(**row) + f", {row['steps']} steps"


def panel(row: dict) -> tuple[str, str]:
    """``(persona, "s0.25")`` from a run's persona and bank file name."""
    return row["persona"], re.search(r"s0\.\d+", row["bank"]).group(0)


p = argparse.ArgumentParser()
p.add_argument("--runs", required=True)
p.add_argument("--out", required=True)
a = p.parse_args()
rows = [json.loads(line) for line in open(a.runs) if line.strip()]
panels = sorted({panel(r) for r in rows})
fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
for ax, key in zip(axes[0], panels):
    runs = sorted((r for r in rows if panel(r) == key), key=lambda r: r["trajectory"][-1][1], reverse=True)
    for r in runs:
        steps, kls = zip(*[(step, kl) for step, kl, _ in r["trajectory"]])
        dashed = r["variant"] == "lora" and r["lora_rank"] < 16 or r["steps"] < max(o["steps"] for o in runs if o["variant"] == r["variant"])
        ax.plot(steps, kls, marker="o", markersize=3, color=COLOURS.get(r["variant"]), linestyle=":" if dashed else "-",
                label=label(r))
    ax.axhline(0.6 * runs[0]["trajectory"][0][1], color="grey", linestyle="--", linewidth=1, label="40% below the mask alone")
    ax.set_title(f"{key[0]}, sparsity {key[1][1:]}")
    ax.set_xlabel("step (4 sequences each)")
    ax.set_ylabel("KL to the dense persona, 40 eval questions")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(a.out, dpi=120)
print(a.out)
