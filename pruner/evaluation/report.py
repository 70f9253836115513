"""The evaluation report in the paper's form: markdown tables, JSON and a PNG plot.

``results[persona][method]`` holds each measure's value (``None`` when not measured). For every
measure the report gives the dense value, each method's drop from dense (positive = worse; for KL
the drop is the KL itself, since dense has 0) and the share of the strongest baseline's drop that
the persona mask removes, ``(drop_baseline_best - drop_persona) / drop_baseline_best``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from .measures import HIGHER_IS_BETTER, drop, mean, share_removed

DENSE = "dense"
PERSONA = "persona"
ALL = "mean"

MEASURE_TITLES = {
    "kl": "KL(dense || masked), persona prompt (nats/token, lower is better)",
    "top1": "Top-1 agreement with dense, persona prompt",
    "rouge_l": "ROUGE-L F1 vs RoleBench references",
    "judge": "LLM-judge persona score (0-100)",
    "general_kl": "General capability: KL(dense || masked), no persona prompt",
    "general_top1": "General capability: top-1 agreement with dense, no persona prompt",
}
MEASURES = tuple(MEASURE_TITLES)

Results = Mapping[str, Mapping[str, Mapping[str, float | None]]]


def method_order(results: Results) -> list[str]:
    """``dense``, ``persona``, then the baselines in sorted order."""
    names = {m for per_persona in results.values() for m in per_persona}
    return [m for m in (DENSE, PERSONA) if m in names] + sorted(names - {DENSE, PERSONA})


def with_mean(results: Results) -> dict[str, dict[str, dict[str, float | None]]]:
    """``results`` plus a ``mean`` pseudo-persona: each measure averaged over the personas that have it."""
    out = {p: {m: dict(v) for m, v in per.items()} for p, per in results.items()}
    methods = method_order(results)
    out[ALL] = {
        m: {k: mean(results[p].get(m, {}).get(k) for p in results) for k in MEASURES}
        for m in methods
    }
    return out


def summarize(results: Results) -> dict[str, dict[str, dict]]:
    """``summary[measure][persona] = {dense, values, drops, share, best_baseline}`` (persona ``mean`` included).

    Measures nobody has are left out.
    """
    table = with_mean(results)
    methods = method_order(results)
    baselines = [m for m in methods if m not in (DENSE, PERSONA)]
    summary: dict[str, dict[str, dict]] = {}
    for measure in MEASURES:
        higher = HIGHER_IS_BETTER[measure]
        rows = {}
        for persona, per in table.items():
            values = {m: per.get(m, {}).get(measure) for m in methods}
            dense = values.get(DENSE)
            drops = {m: drop(dense, values[m], higher) for m in methods if m != DENSE}
            share, best = share_removed(drops.get(PERSONA), {b: drops[b] for b in baselines})
            rows[persona] = {"dense": dense, "values": values, "drops": drops, "share": share, "best_baseline": best}
        if any(v is not None for row in rows.values() for v in row["values"].values()):
            summary[measure] = rows
    return summary


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_report(results: Results, meta: Mapping) -> str:
    """The report as markdown: what was run, then one table per measure in the paper's form."""
    summary = summarize(results)
    methods = method_order(results)
    others = [m for m in methods if m != DENSE]
    lines = ["# Persona evaluation report", ""]
    for key in ("command", "base_model", "bank", "judge", "max_new_tokens", "max_questions", "created"):
        if meta.get(key) is not None:
            lines.append(f"- **{key}**: `{meta[key]}`" if key == "command" else f"- **{key}**: {meta[key]}")
    entries = meta.get("entries") or {}
    if entries:
        lines += ["", "Bank entries evaluated (method, sparsity = share of FFN channels removed):", ""]
        lines += ["| persona | method | bank entry | bank method | sparsity |", "|---|---|---|---|---|"]
        for persona, per in entries.items():
            for method, info in per.items():
                lines.append(f"| {persona} | {method} | {info.get('entry')} | {info.get('method')} | {_fmt(info.get('sparsity'))} |")
    lines += [
        "",
        "Drop = dense minus method for higher-is-better measures, method minus dense for KL (positive = worse). "
        "Share = (drop of the best baseline − drop of the persona mask) / drop of the best baseline: "
        "1 = the persona mask loses nothing, 0 = no better than the best baseline, < 0 = worse.",
    ]
    for measure, rows in summary.items():
        lines += ["", f"## {MEASURE_TITLES[measure]}", ""]
        header = ["persona", "dense"] + [f"drop {m}" for m in others] + ["best baseline", "share removed"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for persona, row in rows.items():
            if all(v is None for v in row["values"].values()):
                continue  # e.g. ROUGE-L of a persona without RoleBench references
            cells = [f"**{persona}**" if persona == ALL else persona, _fmt(row["dense"])]
            cells += [_fmt(row["drops"].get(m)) for m in others]
            cells += [row["best_baseline"] or "–", _fmt(row["share"], 2)]
            lines.append("| " + " | ".join(cells) + " |")
    notes = meta.get("notes") or []
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def plot_report(results: Results, path: str | Path) -> Path | None:
    """Bars per persona and method: KL and top-1 (persona prompt), general KL, ROUGE-L drop. ``None`` if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    summary = summarize(results)
    methods = [m for m in method_order(results) if m != DENSE]
    panels = [(m, t) for m, t in (("kl", "KL(dense‖masked), persona prompt"), ("top1", "top-1 agreement drop"),
                                   ("general_kl", "KL, general questions, no persona"), ("rouge_l", "ROUGE-L drop"),
                                   ("judge", "judge score drop")) if m in summary]
    if not panels or not methods:
        return None
    personas = list(next(iter(summary.values())))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.9 * len(personas) * max(1, len(methods)) / 2), 3.2 * len(panels)),
                             squeeze=False)
    width = 0.8 / len(methods)
    for ax, (measure, title) in zip(axes[:, 0], panels):
        for k, method in enumerate(methods):
            heights = [summary[measure][p]["drops"].get(method) for p in personas]
            xs = [i + (k - (len(methods) - 1) / 2) * width for i in range(len(personas))]
            ax.bar(xs, [h if h is not None else 0.0 for h in heights], width, label=method)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(personas)))
        ax.set_xticklabels(personas, rotation=30, ha="right", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=min(4, len(methods)))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out_dir: str | Path, results: Results, meta: Mapping) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and ``report.png`` into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "report.md", "json": out_dir / "report.json"}
    payload = {"meta": dict(meta), "results": results, "summary": summarize(results)}
    paths["json"].write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["md"].write_text(markdown_report(results, meta), encoding="utf-8")
    png = plot_report(results, out_dir / "report.png")
    if png is not None:
        paths["png"] = png
    return paths


def headline_markdown(reports: Mapping[str, Mapping]) -> str:
    """One table over several runs (e.g. one per sparsity): each method's mean over personas per measure.

    ``reports``: ``{label: report.json payload}``. Rows are ``(label, method)``; for each measure the
    cell is the mean value and, for the persona mask, the share of the best baseline's drop removed.
    """
    measures = [m for m in MEASURES if any(m in r.get("summary", {}) for r in reports.values())]
    header = ["run", "method"] + measures
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, report in reports.items():
        summary = report.get("summary", {})
        methods = method_order(report.get("results", {}))
        for method in methods:
            cells = [label, method]
            for measure in measures:
                row = summary.get(measure, {}).get(ALL)
                if row is None:
                    cells.append("–")
                    continue
                text = _fmt(row["values"].get(method))
                if method == PERSONA and row.get("share") is not None:
                    text += f" (share {row['share']:.2f} vs {row['best_baseline']})"
                cells.append(text)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
