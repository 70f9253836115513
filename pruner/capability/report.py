"""The capability report: per suite and method, the score and the drop from dense, with bootstrap intervals.

Scores are means over items of the suite's metric (higher is better). The drop is paired:
``mean(dense - method)`` over the same items (and personas), its 95% interval from resampling those
pairs, so a small subset shows how little it can tell. The ``all personas`` rows pool every
persona's (item, persona) pairs; the per-persona tables give each persona alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from .store import DENSE, PERSONA, RECOVERY, SHARED, read_lines
from .stats import bootstrap_mean, paired_drop
from .suites import get_suite

ALL = "all personas"


def method_order(methods) -> list[str]:
    """``dense``, ``persona``, ``persona+recovery``, then the baselines sorted."""
    names = set(methods)
    return [m for m in (DENSE, PERSONA, RECOVERY) if m in names] + sorted(names - {DENSE, PERSONA, RECOVERY})


def _values(out_dir: Path, suite: str, persona: str, method: str) -> dict[str, dict]:
    return read_lines(out_dir / "items" / suite / persona / f"{method}.jsonl")


def collect(out_dir: str | Path, meta: Mapping) -> dict:
    """``summary[suite][persona][method]`` = ``{score, drop, extra, n}`` from the saved item lines (``persona`` incl. ``all personas``)."""
    out_dir = Path(out_dir)
    summary: dict = {}
    for name in meta["suites"]:
        suite = get_suite(name)
        per_suite: dict = {}
        pooled: dict[str, tuple[list, list, dict]] = {}
        for persona in meta["personas"]:
            dense_owner = SHARED if suite.kind == "mc" else persona
            dense = _values(out_dir, name, dense_owner, DENSE)
            methods = [DENSE] + list(meta["entries"].get(persona, {}))
            rows = {}
            for method in method_order(methods):
                lines = dense if method == DENSE else _values(out_dir, name, persona, method)
                ids = [i for i in lines if i in dense]
                if not ids:
                    continue
                d = [dense[i].get(suite.metric) for i in ids]
                m = [lines[i].get(suite.metric) for i in ids]
                extra = {k: bootstrap_mean([lines[i].get(k) for i in ids])["mean"] for k in suite.extra}
                rows[method] = {"score": bootstrap_mean(m), "drop": None if method == DENSE else paired_drop(d, m),
                                "extra": extra, "n": len(ids)}
                acc = pooled.setdefault(method, ([], [], {k: [] for k in suite.extra}))
                acc[0].extend(d)
                acc[1].extend(m)
                for k in suite.extra:
                    acc[2][k].extend(lines[i].get(k) for i in ids)
            per_suite[persona] = rows
        per_suite[ALL] = {
            method: {"score": bootstrap_mean(m), "drop": None if method == DENSE else paired_drop(d, m),
                     "extra": {k: bootstrap_mean(v)["mean"] for k, v in extra.items()}, "n": len(m)}
            for method, (d, m, extra) in ((k, pooled[k]) for k in method_order(pooled))
        }
        summary[name] = per_suite
    return summary


def _ci(stat: Mapping | None, digits: int = 3, signed: bool = False) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    return f"{f.format(stat['mean'])} [{f.format(stat['lo'])}, {f.format(stat['hi'])}]"


def markdown(summary: Mapping, meta: Mapping) -> str:
    """The report as markdown: settings, one pooled table per suite, then per-persona scores."""
    lines = ["# Capability report", ""]
    for key in ("command", "base_model", "model", "bank", "seed", "items", "max_new_tokens", "timings_s"):
        if meta.get(key) is not None:
            value = meta[key]
            lines.append(f"- **{key}**: `{value}`" if key == "command" else f"- **{key}**: {value}")
    lines += ["", "Score: mean of the suite's per-item metric (higher is better) with a 95% bootstrap interval. "
              "Drop: dense minus method on the same items, paired bootstrap interval (positive = worse than dense). "
              "`persona` is the mask alone; `persona+recovery` adds the entry's scales, input gains and output bias.", ""]
    missing = [name for name, per_suite in summary.items() if not per_suite.get(ALL)]
    if missing:
        lines += [f"Not run (no saved items): {', '.join(missing)}.", ""]
    for name, per_suite in summary.items():
        suite = get_suite(name)
        rows = per_suite.get(ALL, {})
        if not rows:
            continue
        lines += [f"## {suite.title}", "", f"Source: {suite.source}. Pooled over {len(meta['personas'])} persona(s).", ""]
        header = ["method", "n", "score [95% CI]", "drop from dense [95% CI]"] + list(suite.extra)
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for method, row in rows.items():
            cells = [method, str(row["n"]), _ci(row["score"]), _ci(row["drop"], signed=True) if row["drop"] else "–"]
            cells += ["–" if row["extra"].get(k) is None else f"{row['extra'][k]:.3f}" for k in suite.extra]
            lines.append("| " + " | ".join(cells) + " |")
        personas = [p for p in per_suite if p != ALL]
        methods = method_order({m for p in personas for m in per_suite[p]})
        lines += ["", "Per persona (score, drop in brackets):", "",
                  "| persona | " + " | ".join(methods) + " |", "|" + "---|" * (len(methods) + 1)]
        for persona in personas:
            cells = [persona]
            for method in methods:
                row = per_suite[persona].get(method)
                if row is None or row["score"]["mean"] is None:
                    cells.append("–")
                elif row["drop"] is None:
                    cells.append(f"{row['score']['mean']:.3f}")
                else:
                    cells.append(f"{row['score']['mean']:.3f} ({row['drop']['mean']:+.3f})")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    notes = meta.get("notes") or []
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def plot(summary: Mapping, path: str | Path) -> Path | None:
    """One panel per suite: pooled score per method with its interval, dense as a dashed line. ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    suites = [s for s in summary if summary[s].get(ALL)]
    if not suites:
        return None
    cols = min(3, len(suites))
    nrows = (len(suites) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, suites):
        rows = summary[name][ALL]
        methods = list(rows)
        means = [rows[m]["score"]["mean"] or 0.0 for m in methods]
        lo = [max(0.0, means[i] - (rows[m]["score"]["lo"] or 0.0)) for i, m in enumerate(methods)]
        hi = [max(0.0, (rows[m]["score"]["hi"] or 0.0) - means[i]) for i, m in enumerate(methods)]
        ax.bar(range(len(methods)), means, yerr=[lo, hi], capsize=3, color=["#555555"] + ["C%d" % i for i in range(len(methods) - 1)])
        if DENSE in rows:
            ax.axhline(rows[DENSE]["score"]["mean"], color="black", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=30, ha="right", fontsize=8)
        ax.set_title(get_suite(name).title.split(" (")[0], fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(suites):]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_capability_report(out_dir: str | Path, meta: Mapping) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and ``report.png`` from the saved item lines; return their paths."""
    out_dir = Path(out_dir)
    summary = collect(out_dir, meta)
    paths = {"md": out_dir / "report.md", "json": out_dir / "report.json"}
    paths["json"].write_text(json.dumps({"meta": dict(meta), "summary": summary}, indent=2) + "\n", encoding="utf-8")
    paths["md"].write_text(markdown(summary, meta), encoding="utf-8")
    png = plot(summary, out_dir / "report.png")
    if png is not None:
        paths["png"] = png
    return paths
