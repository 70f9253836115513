"""Shared helpers of the benchmark scripts: timing, rotating inputs, JSON lines, plots, tables.

Every benchmark script of this folder (one script per question, like punica's) uses these so
that all numbers are taken the same way (docs: /work/shared/DESIGN.md "What fast means"):

- Device time: :func:`cuda_time` (``triton.testing.do_bench``, median, warm-up and repetitions in
  milliseconds, L2 flushed between runs; CUDA events where Triton is missing) and
  :func:`cuda_events_time` (explicit event pairs around ``n`` calls, for graph replays and loops).
- Host time: :func:`host_time` (``time.perf_counter_ns`` around each call, median of many;
  the device is synchronised only between batches of calls, outside the timed region).
- CPU wall time (smoke mode): :func:`wall_time`.
- Inputs larger than L2: :class:`Rotating` cycles through enough copies that repeated calls do not
  measure the cache.
- Results: :class:`JsonlWriter` writes one JSON object per configuration, each stamped with the
  card, date, command, git commit and library versions (:func:`environment`).
- Plots (:func:`plot_series`, :func:`plot_bars`; PNG through matplotlib, skipped with a note when
  matplotlib is missing) and a fixed-width text table (:func:`format_table`) for summaries.

Nothing here asserts speed: benchmarks measure, tests check correctness.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------- output


def default_out_dir(subdir: str | None = None) -> Path:
    """Where results go: ``$OUT`` when set (the GPU machine's fetched folder), else
    ``benchmarks/out/<UTC timestamp>/``; ``subdir`` is appended; the folder is created."""
    base = os.environ.get("OUT")
    path = Path(base) if base else REPO_ROOT / "benchmarks" / "out" / _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    if subdir:
        path = path / subdir
    path.mkdir(parents=True, exist_ok=True)
    return path


def git_commit() -> str:
    """The repository's HEAD commit (with ``+dirty`` when the work tree differs), or ``"unknown"``."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - absent or broken optional module
        return None


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """Card, libraries, host, date and command line: the context stamped on every result line."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "git": git_commit(),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "device_type": device.type,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            card=props.name,
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            l2_bytes=l2_bytes(device),
            gpu_memory_bytes=props.total_memory,
            cuda=torch.version.cuda,
        )
    else:
        env.update(card=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    return env


class JsonlWriter:
    """Append one JSON object per configuration to ``path``; each line carries ``shared`` fields
    (by default :func:`environment`) plus the record. Lines are flushed as written, so a run killed
    by a time limit keeps everything it finished."""

    def __init__(self, path: str | Path, shared: dict[str, Any] | None = None, device: torch.device | str | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.shared = dict(shared) if shared is not None else environment(device)
        self.records: list[dict[str, Any]] = []
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write ``record`` (merged over the shared fields) as one line; returns the merged record."""
        merged = {**self.shared, **_jsonable(record)}
        self._file.write(json.dumps(merged, sort_keys=False) + "\n")
        self._file.flush()
        self.records.append(merged)
        return merged

    def close(self) -> None:
        """Close the file (records stay readable in :attr:`records`)."""
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSON-lines file (blank or truncated last lines are skipped)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    return value


# ----------------------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Summary of repeated measurements: median and the 20th/80th percentiles, in ``unit``."""

    median: float
    p20: float
    p80: float
    n: int
    unit: str

    def as_dict(self, prefix: str) -> dict[str, float | int | str]:
        """``{prefix_median_<unit>: ..., prefix_p20_<unit>: ..., prefix_p80_<unit>: ..., prefix_n: ...}``."""
        return {
            f"{prefix}_median_{self.unit}": self.median,
            f"{prefix}_p20_{self.unit}": self.p20,
            f"{prefix}_p80_{self.unit}": self.p80,
            f"{prefix}_n": self.n,
        }


def summarize(samples: Sequence[float], unit: str) -> Timing:
    """:class:`Timing` of ``samples`` (median and 20th/80th percentiles)."""
    if not samples:
        raise ValueError("no samples to summarise")
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    return Timing(statistics.median(ordered), pick(0.2), pick(0.8), len(ordered), unit)


def l2_bytes(device: torch.device | str | None = None) -> int:
    """L2 cache size of a CUDA device in bytes (50 MB assumed where torch does not report it); 0 on CPU."""
    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or getattr(props, "l2_cache_size", 0) or 50 * 2**20)


def cuda_time(fn: Callable[[], Any], warmup_ms: float = 25.0, rep_ms: float = 100.0) -> Timing:
    """Device time of ``fn`` in milliseconds: median with 20th/80th percentiles.

    Uses ``triton.testing.do_bench`` (CUDA events, L2 flushed before every run, warm-up and repeat
    given in milliseconds); without Triton, :func:`cuda_events_time` with an explicit L2 flush.
    """
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        estimate = max(median, 1e-3)
        return Timing(float(median), float(p20), float(p80), max(1, int(rep_ms / estimate)), "ms")
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    estimate_ms = max((time.perf_counter() - start) * 1e3, 1e-3)
    n_warmup = max(1, int(warmup_ms / estimate_ms))
    n_rep = max(3, int(rep_ms / estimate_ms))
    return cuda_events_time(fn, n_warmup=n_warmup, n_rep=n_rep, flush_l2=True)


def cuda_events_time(fn: Callable[[], Any], n_warmup: int = 3, n_rep: int = 10, calls_per_rep: int = 1,
                     flush_l2: bool = False) -> Timing:
    """Device time in milliseconds per call of ``fn``, from CUDA event pairs around each repetition
    of ``calls_per_rep`` back-to-back calls (so launch gaps between calls count, as in serving)."""
    flush = torch.empty(2 * l2_bytes() // 4, dtype=torch.int32, device="cuda") if flush_l2 else None
    for _ in range(n_warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(n_rep):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls_per_rep):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / calls_per_rep)
    return summarize(samples, "ms")


def host_time(fn: Callable[[], Any], n: int = 2000, warmup: int = 200, sync: Callable[[], Any] | None = None,
              sync_every: int = 64) -> Timing:
    """Host (CPU) time of one call of ``fn`` in microseconds: ``perf_counter_ns`` around each call.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs every ``sync_every`` calls outside the timed
    region, so queued device work never backs up into a blocking launch.
    """
    for index in range(warmup):
        fn()
        if sync is not None and index % sync_every == sync_every - 1:
            sync()
    if sync is not None:
        sync()
    samples = []
    clock = time.perf_counter_ns
    for index in range(n):
        t0 = clock()
        fn()
        samples.append((clock() - t0) / 1e3)
        if sync is not None and index % sync_every == sync_every - 1:
            sync()
    if sync is not None:
        sync()
    return summarize(samples, "us")


def wall_time(fn: Callable[[], Any], n: int = 5, warmup: int = 1, sync: Callable[[], Any] | None = None) -> Timing:
    """Wall time of one call of ``fn`` in milliseconds (``sync`` after each call, inside the timing)."""
    for _ in range(warmup):
        fn()
        if sync is not None:
            sync()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    return summarize(samples, "ms")


def device_sync(device: torch.device | str) -> Callable[[], None]:
    """A no-argument synchronise for ``device`` (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def capture_graph(fn: Callable[[], Any], warmup: int = 2) -> "torch.cuda.CUDAGraph":
    """Warm ``fn`` up on a side stream (JIT compiles, autotuning and library workspaces happen
    here), then capture one call of it as a CUDA graph; ``graph.replay()`` reruns it with no host work.

    Capture records without executing, so ``fn``'s effects happen only at replays. ``fn`` must not
    synchronise (no ``.item()``, no host copies of device data) and must keep its buffers in place.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


class Rotating:
    """Cycle through copies of an input set so that their total size exceeds the L2 cache.

    ``make()`` returns one fresh input set (any object; its size is ``bytes_per_set``). Enough sets
    are made that ``copies * bytes_per_set >= min_bytes`` (default: twice the device's L2; one set
    on CPU), capped at ``max_copies``. ``next()`` returns the next set.
    """

    def __init__(self, make: Callable[[], Any], bytes_per_set: int, device: torch.device | str,
                 min_bytes: int | None = None, max_copies: int = 64):
        device = torch.device(device)
        target = min_bytes if min_bytes is not None else 2 * l2_bytes(device)
        copies = 1 if target <= 0 else min(max_copies, max(1, -(-target // max(1, bytes_per_set))))
        self.sets = [make() for _ in range(copies)]
        self._index = 0

    def __len__(self) -> int:
        return len(self.sets)

    def next(self) -> Any:
        """The next input set, round robin."""
        item = self.sets[self._index]
        self._index = (self._index + 1) % len(self.sets)
        return item


class Deadline:
    """A wall-clock budget: ``left()`` seconds remain, ``expired(need)`` says whether ``need`` more
    seconds no longer fit. ``None`` seconds means unlimited."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left (infinity when unlimited)."""
        return float("inf") if self.end is None else self.end - time.monotonic()

    def expired(self, need: float = 0.0) -> bool:
        """Whether fewer than ``need`` seconds are left."""
        return self.left() < need


# ----------------------------------------------------------------------------------------- tables


def format_table(rows: Iterable[dict[str, Any]], columns: Sequence[str], headers: Sequence[str] | None = None,
                 floatfmt: str = "{:.3g}") -> str:
    """A fixed-width text table of ``rows`` (dicts) over ``columns``; floats through ``floatfmt``."""
    headers = list(headers) if headers is not None else list(columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            if isinstance(value, float):
                value = floatfmt.format(value)
            elif value is None:
                value = "-"
            cells.append(str(value))
        body.append(cells)
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- plots


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except Exception as error:  # noqa: BLE001 - plotting is optional
        print(f"[common] matplotlib unavailable ({error}); plots skipped", file=sys.stderr)
        return None


def plot_series(rows: Sequence[dict[str, Any]], x: str, y: str, series: str | Sequence[str], path: str | Path,
                title: str = "", xlabel: str | None = None, ylabel: str | None = None,
                logx: bool = False, logy: bool = False, subtitle: str | None = None) -> Path | None:
    """Line plot of ``y`` against ``x``, one line per distinct value of ``series`` (a key or keys).
    Writes a PNG at ``path`` and returns it; ``None`` when matplotlib is missing or no row fits."""
    keys = [series] if isinstance(series, str) else list(series)
    groups: dict[str, list[tuple[Any, Any]]] = {}
    for row in rows:
        if row.get(x) is None or row.get(y) is None:
            continue
        label = " / ".join(str(row.get(k)) for k in keys)
        groups.setdefault(label, []).append((row[x], row[y]))
    if not groups:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in groups.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bars(labels: Sequence[str], values: Sequence[float], path: str | Path, title: str = "",
              ylabel: str = "", logy: bool = False, subtitle: str | None = None,
              annotations: Sequence[str] | None = None) -> Path | None:
    """Bar chart of ``values`` by ``labels`` (optional text over each bar). PNG at ``path``, or ``None``."""
    if not labels:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(max(7.0, 0.8 * len(labels)), 5))
    bars = ax.bar(range(len(labels)), values, color="tab:blue")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    if logy:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    for index, bar in enumerate(bars):
        text = annotations[index] if annotations is not None else f"{values[index]:.3g}"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def human_bytes(n: float) -> str:
    """``n`` bytes as a short decimal string (B, KB, MB, GB, TB)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.3g} TB"


def record_timing(record: dict[str, Any], prefix: str, timing: Timing) -> dict[str, Any]:
    """Merge ``timing`` into ``record`` under ``prefix`` and return the record."""
    record.update(timing.as_dict(prefix))
    return record


__all__ = [
    "Deadline",
    "capture_graph",
    "JsonlWriter",
    "REPO_ROOT",
    "Rotating",
    "Timing",
    "cuda_events_time",
    "cuda_time",
    "default_out_dir",
    "device_sync",
    "environment",
    "format_table",
    "git_commit",
    "host_time",
    "human_bytes",
    "l2_bytes",
    "plot_bars",
    "plot_series",
    "read_jsonl",
    "record_timing",
    "summarize",
    "wall_time",
]
