"""Serving benchmarks of issue 7, one question per sub-command (modules in :mod:`benchmarks.serving`).

Usage, from the repository root::

    python -m benchmarks.bench_serving all --smoke [--graph auto|on|off]   # CPU, tiny shapes, about a minute
    python -m benchmarks.bench_serving switch  [--out DIR] [options of benchmarks.serving.switch]
    python -m benchmarks.bench_serving decode  [--out DIR] [--time-budget S] [options of benchmarks.serving.decode]
    python -m benchmarks.bench_serving memory  [--out DIR] [options of benchmarks.serving.memory]
    python -m benchmarks.bench_serving summary DIR

``all`` runs memory, switch and decode into one folder (``--out``, else ``$OUT``, else
``benchmarks/out/<timestamp>/``) and prints the verdict table last. The exit code is non-zero when
a correctness check failed (never because of speed: speed is reported, not asserted).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import default_out_dir  # noqa: E402
from benchmarks.serving import decode, memory, summary, switch  # noqa: E402

COMMANDS = {"switch": switch.main, "decode": decode.main, "memory": memory.main, "summary": summary.main}


def run_all(argv: list[str]) -> int:
    """memory, switch, decode into one folder, then the summary; the worst exit code."""
    smoke = "--smoke" in argv
    out = None
    if "--out" in argv:
        out = Path(argv[argv.index("--out") + 1])
    folder = out or default_out_dir("serving")
    base = ["--out", str(folder)] + (["--smoke"] if smoke else [])
    graph = ["--graph", argv[argv.index("--graph") + 1]] if "--graph" in argv else []
    codes = {}
    for name in ("memory", "switch", "decode"):
        print(f"\n######## serving/{name}", flush=True)
        try:
            codes[name] = COMMANDS[name](base + (graph if name != "memory" else []))
        except Exception as error:  # noqa: BLE001 - report and go on with the next question
            print(f"serving/{name} failed: {type(error).__name__}: {error}", file=sys.stderr)
            codes[name] = 2
    print("\n######## summary", flush=True)
    summary.main([str(folder)])
    print("exit codes:", codes)
    return max(codes.values())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "all":
        return run_all(rest)
    if command not in COMMANDS:
        print(f"unknown command {command!r}; expected all, {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return COMMANDS[command](rest)


if __name__ == "__main__":
    sys.exit(main())
