"""The short verdict table of a results folder: each serving target, what was measured, pass or fail.

Reads ``switch.jsonl``, ``decode.jsonl`` and ``memory.jsonl`` anywhere under the folder (and the
GPU suite's ``suite_status.tsv`` when present), prints the table and writes ``summary.md`` there.
Targets (issue 7): a persona switch takes under 10 us of host time and moves no weight byte; a
mixed batch of 8 personas at batch 32 decodes at least 1.3x faster than the dense model at
density 0.5; 1000 personas of the 8B model need under 64 MiB of mask metadata at G = 16.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import format_table, human_bytes, read_jsonl  # noqa: E402
from benchmarks.serving.decode import config_failed  # noqa: E402

SWITCH_TARGET_US = 10.0
SPEEDUP_TARGET = 1.3
METADATA_TARGET_BYTES = 64 * 2**20


def _load(folder: Path, name: str) -> list[dict]:
    rows = []
    for path in sorted(folder.rglob(name)):
        rows += read_jsonl(path)
    return rows


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "FAIL")


def summarize_folder(folder: Path) -> tuple[list[dict], str]:
    """``(rows, label)``: one row per target or informative number found under ``folder``."""
    switch, decode, memory = _load(folder, "switch.jsonl"), _load(folder, "decode.jsonl"), _load(folder, "memory.jsonl")
    first = (switch or decode or memory or [{}])[0]
    smoke = first.get("device_type") == "cpu"
    label = f"{first.get('card', '?')}{' (CPU smoke: not performance claims)' if smoke else ''}, {first.get('date', '')}"
    rows: list[dict] = []

    for row in switch:
        if row.get("kind") == "switch_host":
            target = row["case"].startswith("set_persona(name)") or row["case"].startswith("floor")
            us = row["host_median_us"]
            rows.append({"check": f"switch host time: {row['case']}", "target": "< 10 us" if target else "info",
                         "measured": f"{us:.2f} us (p80 {row['host_p80_us']:.2f})",
                         "verdict": _verdict(us < SWITCH_TARGET_US if target and not smoke else None)})
        elif row.get("kind") == "switch_weights_untouched":
            ok = row["param_versions_unchanged"] and row["param_addresses_unchanged"]
            rows.append({"check": "weight bytes moved by switches", "target": "0",
                         "measured": "0 (no parameter written or moved)" if ok else "parameters changed!", "verdict": _verdict(ok)})
        elif row.get("kind") in ("presliced_load", "lora_swap", "reslice_device"):
            ms = row.get("device_median_ms", row.get("wall_median_ms"))
            whole = row.get("model_ms_extrapolated")
            text = f"{ms * 1e3:.1f} us, {human_bytes(row['weight_bytes_moved'])}"
            if whole is not None:
                whole_text = f"{whole:.2f} ms" if whole >= 1 else f"{whole * 1e3:.1f} us"
                text += f" per layer; whole model {whole_text}, {human_bytes(row['model_weight_bytes_moved'])}"
            rows.append({"check": f"alternative: {row['kind']}", "target": "info", "measured": text, "verdict": "-"})
    for kind in ("graph_switch_check", "ffn_graph_switch_check"):
        checks = [r for r in switch if r.get("kind") == kind and "ok" in r]
        if checks:
            captured = all(r.get("graph_captured") for r in checks)
            passed = sum(bool(r["ok"]) for r in checks)
            text = f"{passed}/{len(checks)} switches within tolerance ({'graph replay' if captured else 'eager, no graph'})"
            rows.append({"check": f"correct after switches: {kind}", "target": "all", "measured": text,
                         "verdict": _verdict(passed == len(checks))})

    dense = {(r["model"], r["batch"]): r.get("tokens_per_s") for r in decode if r.get("mix") == "dense_model" and r.get("tokens_per_s")}
    for row in decode:
        if row.get("mix") in ("uniform8", "identical", "uniform8_indep") and row.get("batch") == 32 and row.get("tokens_per_s"):
            base = dense.get((row["model"], 32))
            if not base:
                continue
            speedup = row["tokens_per_s"] / base
            variant = row.get("variant", "attach")
            is_target = row["mix"] == "uniform8" and variant == "attach"
            rows.append({"check": f"decode {row['model']} B=32 {row['mix']} [{variant}] vs dense ({row.get('mode')})",
                         "target": ">= 1.3x" if is_target else "info",
                         "measured": f"{speedup:.2f}x ({row['tokens_per_s']:.0f} vs {base:.0f} tok/s, union {row['union_density']:.2f})",
                         "verdict": _verdict(speedup >= SPEEDUP_TARGET if is_target and not smoke else None)})
    failed = [r for r in decode if config_failed(r) or r.get("tokens_match_attach") is False]
    if decode:
        rows.append({"check": "decode configs ran (graph == eager tokens)", "target": "all",
                     "measured": f"{sum(1 for r in decode if r.get('tokens_per_s'))} timed, {len(failed)} failed, "
                                 f"{sum(1 for r in decode if r.get('skipped'))} skipped",
                     "verdict": _verdict(not failed)})

    if memory:
        largest = max(r["personas"] for r in memory)
        for row in memory:
            if row["personas"] != largest or row["approach"] not in ("keep_bits", "scales_table", "pruned_copy", "lora_r16", "step_meta_prefill"):
                continue
            is_target = row["approach"] == "keep_bits" and row["personas"] >= 1000 and row["model"] == "llama3-8b"
            rows.append({"check": f"memory, {largest} personas of {row['model']}: {row['approach']}",
                         "target": "< 64 MiB" if is_target else "info", "measured": human_bytes(row["bytes"]),
                         "verdict": _verdict(row["bytes"] < METADATA_TARGET_BYTES if is_target else None)})
    return rows, label


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="results folder (searched recursively)")
    args = parser.parse_args(argv)
    rows, label = summarize_folder(args.folder)
    lines = [f"serving summary: {label}", format_table(rows, ["check", "target", "measured", "verdict"])]
    status = args.folder / "suite_status.tsv"
    if status.is_file():
        lines += ["", "suite steps (name, exit code, seconds, time box):", status.read_text().rstrip()]
    text = "\n".join(lines)
    print(text)
    (args.folder / "summary.md").write_text("```\n" + text + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
