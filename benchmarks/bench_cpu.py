"""CPU masked FFN kernel vs torch's dense FFN and vs the pre-sliced per-persona oracle.

For each FFN shape, dtype, group size G, persona density and batch size, three things run side by
side (round-robin, so background load hits all three alike), each timed as the median wall time
after warm-up, with torch and the kernel both using every core:

- ``dense``: the unpruned FFN through ``F.linear`` (gate, up, act, down) in the same dtype;
- ``oracle``: the persona's kept channels sliced into small dense weights, through ``F.linear``
  (what a private pruned copy would cost; matching it shows that not copying costs nothing);
- ``cpu``: ``persona_kernels`` cpu backend over the shared packed weights and the persona mask;
- ``cpu+scales`` (with ``--scales``): the same with the persona's per-channel scales applied in the
  epilogue (issue 8's target: within 2% of ``cpu``);
- ``cpu+scales+gains`` (with ``--input-gains``, implies ``--scales``): scales plus the persona's FFN
  input gains, fused into the kernel's token load; and ``cpu+scales+gains pass``: the same with the
  gains applied to the tokens first by :func:`persona_kernels.reference.apply_input_gains` (what
  the backends that do not fuse them pay);
- ``cpu+scales+gains+bias`` (with ``--output-bias``, implies ``--input-gains``): the same plus the
  persona's FFN output bias, fused into the kernel's store.

Every token of a batch belongs to the same persona (the oracle's best case). Writes a JSON file
and a markdown table under ``benchmarks/out/`` and a plot under ``benchmarks/plots/``.

    python benchmarks/bench_cpu.py                      # the full grid (about 5-10 minutes)
    python benchmarks/bench_cpu.py --shapes smollm2-135m --reps 5    # quick
    python benchmarks/bench_cpu.py --scales --batches 1 16         # + the cost of per-channel scales
    python benchmarks/bench_cpu.py --input-gains --batches 1 16    # + scales and input gains
    python benchmarks/bench_cpu.py --output-bias --batches 1 16    # + scales, input gains and output bias
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from persona_kernels.backends import cpu_backend
from persona_kernels.masks import keep_to_bits
from persona_kernels.reference import activate, apply_input_gains

SHAPES = {"smollm2-135m": (576, 1536), "llama3-8b": (4096, 14336)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OUT_DIR = Path(__file__).resolve().parent / "out"
PLOT_PATH = Path(__file__).resolve().parent / "plots" / "cpu_speedup.png"


def cpu_model_name() -> str:
    """The CPU's model name as lscpu reports it."""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


CACHE_FLUSH_BYTES = 64 << 20  # more than any last-level cache here


def time_side_by_side(fns: dict[str, Callable[[], object]], reps: int, warmup: int) -> dict[str, float]:
    """Median wall seconds of each function, calls interleaved round-robin after ``warmup`` rounds.

    The caches are flushed before every timed call: two methods reading the same weights back to back
    (``cpu`` then ``cpu+scales``) would otherwise hand the second one a warm cache at small shapes,
    and in a model the other layers evict an FFN's weights between its calls anyway.
    """
    flush = torch.empty(CACHE_FLUSH_BYTES // 4, dtype=torch.float32)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            flush.fill_(1.0)
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, activation: str):
    """The stock gated FFN: ``down(act(gate(x)) * up(x))`` with ``F.linear`` in the weights' dtype."""
    return F.linear(activate(F.linear(x, w_gate), activation) * F.linear(x, w_up), w_down)


def check_close(got: torch.Tensor, want: torch.Tensor, what: str) -> float:
    """Max abs error of ``got`` against the oracle's ``want``; AssertionError past 5% of the output's scale."""
    error = (got.float() - want.float()).abs().max().item()
    if not error <= 0.05 * (1 + want.float().abs().max().item()):
        raise AssertionError(f"{what} disagrees with the oracle: {error}")
    return error


def bench_shape(shape: str, dtype_name: str, args: argparse.Namespace, records: list[dict]) -> None:
    """Measure every (G, density, batch) of one shape and dtype; append one record per config."""
    d, d_ff = SHAPES[shape]
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(0)
    w_gate = (torch.randn(d_ff, d, generator=gen) * d**-0.5).to(dtype)
    w_up = (torch.randn(d_ff, d, generator=gen) * d**-0.5).to(dtype)
    w_down = (torch.randn(d, d_ff, generator=gen) * d_ff**-0.5).to(dtype)
    gate_up = torch.stack((w_gate, w_up), dim=1).contiguous()
    down_t = w_down.T.contiguous()
    reps = args.reps if args.reps else (7 if d >= 4096 else 30)
    for G in args.groups:
        n_groups = d_ff // G
        for density in args.densities:
            keep = torch.zeros(1, n_groups, dtype=torch.bool)
            keep[0, torch.randperm(n_groups, generator=gen)[: round(density * n_groups)]] = True
            bits = keep_to_bits(keep)
            kept = keep[0].repeat_interleave(G).nonzero().flatten()
            o_gate, o_up, o_down = w_gate[kept].contiguous(), w_up[kept].contiguous(), w_down[:, kept].contiguous()
            scales = (0.5 + torch.rand(1, d_ff, generator=gen)).to(dtype)
            o_down_scaled = (o_down.float() * scales[0, kept].float()).to(dtype)
            gains = 0.5 + torch.rand(1, d, generator=gen)
            bias = 0.1 * torch.randn(1, d, generator=gen)
            for batch in args.batches:
                x = torch.randn(batch, d, generator=gen).to(dtype)
                ids = torch.zeros(batch, dtype=torch.int32)
                fns = {
                    "dense": lambda: ffn(x, w_gate, w_up, w_down, "silu"),
                    "oracle": lambda: ffn(x, o_gate, o_up, o_down, "silu"),
                    "cpu": lambda: cpu_backend.masked_ffn(
                        x, gate_up, down_t, ids, bits, None, G, "silu", num_threads=args.kernel_threads),
                }
                error = check_close(fns["cpu"](), fns["oracle"](), f"cpu kernel ({shape} {dtype_name} G={G})")
                if args.scales:
                    fns["cpu+scales"] = lambda: cpu_backend.masked_ffn(
                        x, gate_up, down_t, ids, bits, scales, G, "silu", num_threads=args.kernel_threads)
                    check_close(fns["cpu+scales"](), ffn(x, o_gate, o_up, o_down_scaled, "silu"),
                                f"cpu kernel with scales ({shape} {dtype_name} G={G})")
                if args.input_gains:
                    fns["cpu+scales+gains"] = lambda: cpu_backend.masked_ffn(
                        x, gate_up, down_t, ids, bits, scales, G, "silu", input_gains=gains,
                        num_threads=args.kernel_threads)
                    fns["cpu+scales+gains pass"] = lambda: cpu_backend.masked_ffn(
                        apply_input_gains(x, gains, ids), gate_up, down_t, ids, bits, scales, G, "silu",
                        num_threads=args.kernel_threads)
                    gained_oracle = ffn((x.float() * gains).to(dtype), o_gate, o_up, o_down_scaled, "silu")
                    for name in ("cpu+scales+gains", "cpu+scales+gains pass"):
                        check_close(fns[name](), gained_oracle, f"{name} ({shape} {dtype_name} G={G})")
                if args.output_bias:
                    fns["cpu+scales+gains+bias"] = lambda: cpu_backend.masked_ffn(
                        x, gate_up, down_t, ids, bits, scales, G, "silu", input_gains=gains, output_bias=bias,
                        num_threads=args.kernel_threads)
                    check_close(fns["cpu+scales+gains+bias"](), (gained_oracle.float() + bias[0]).to(dtype),
                                f"cpu+scales+gains+bias ({shape} {dtype_name} G={G})")
                times = time_side_by_side(fns, reps=reps, warmup=2)
                record = dict(
                    shape=shape, d=d, d_ff=d_ff, dtype=dtype_name, G=G, density=density, batch=batch,
                    kept_channels=int(kept.numel()), reps=reps,
                    dense_ms=times["dense"] * 1e3, oracle_ms=times["oracle"] * 1e3, cpu_ms=times["cpu"] * 1e3,
                    speedup_vs_dense=times["dense"] / times["cpu"], speedup_vs_oracle=times["oracle"] / times["cpu"],
                    max_abs_err_vs_oracle=error,
                )
                if args.scales:
                    record.update(cpu_scales_ms=times["cpu+scales"] * 1e3, scales_overhead=times["cpu+scales"] / times["cpu"] - 1)
                if args.input_gains:
                    record.update(cpu_gains_ms=times["cpu+scales+gains"] * 1e3,
                                  gains_overhead=times["cpu+scales+gains"] / times["cpu"] - 1,
                                  cpu_gains_pass_ms=times["cpu+scales+gains pass"] * 1e3,
                                  gains_pass_overhead=times["cpu+scales+gains pass"] / times["cpu"] - 1)
                if args.output_bias:
                    record.update(cpu_bias_ms=times["cpu+scales+gains+bias"] * 1e3,
                                  bias_overhead=times["cpu+scales+gains+bias"] / times["cpu"] - 1)
                records.append(record)
                print(
                    f"{shape:13s} {dtype_name:4s} G={G:<3d} density={density:.2f} batch={batch:<3d} "
                    f"dense {record['dense_ms']:9.3f} ms  oracle {record['oracle_ms']:9.3f} ms  "
                    f"cpu {record['cpu_ms']:9.3f} ms  x{record['speedup_vs_dense']:.2f} vs dense  "
                    f"x{record['speedup_vs_oracle']:.2f} vs oracle"
                    + (f"  +scales {record['cpu_scales_ms']:9.3f} ms ({100 * record['scales_overhead']:+.1f}%)" if args.scales else "")
                    + (f"  +gains {record['cpu_gains_ms']:9.3f} ms ({100 * record['gains_overhead']:+.1f}%)"
                       f"  +gains pass {record['cpu_gains_pass_ms']:9.3f} ms ({100 * record['gains_pass_overhead']:+.1f}%)"
                       if args.input_gains else "")
                    + (f"  +bias {record['cpu_bias_ms']:9.3f} ms ({100 * record['bias_overhead']:+.1f}%)"
                       if args.output_bias else ""),
                    flush=True,
                )


def markdown_table(records: list[dict]) -> str:
    """One row per config: times in ms and the two ratios (above 1 means the kernel is faster)."""
    scaled = any("cpu_scales_ms" in r for r in records)
    gained = any("cpu_gains_ms" in r for r in records)
    biased = any("cpu_bias_ms" in r for r in records)
    extra_head, extra_rule = (" cpu + scales ms | scales cost |", "---|---|") if scaled else ("", "")
    if gained:
        extra_head += " + input gains ms | scales + gains cost | gains as a separate pass ms | cost |"
        extra_rule += "---|---|---|---|"
    if biased:
        extra_head += " + output bias ms | scales + gains + bias cost |"
        extra_rule += "---|---|"
    lines = [
        "| shape | dtype | G | density | batch | dense ms | oracle ms | cpu kernel ms | vs dense | vs oracle |" + extra_head,
        "|---|---|---|---|---|---|---|---|---|---|" + extra_rule,
    ]
    for r in records:
        extra = f" {r['cpu_scales_ms']:.3f} | {100 * r['scales_overhead']:+.1f}% |" if scaled else ""
        extra += (f" {r['cpu_gains_ms']:.3f} | {100 * r['gains_overhead']:+.1f}% |"
                  f" {r['cpu_gains_pass_ms']:.3f} | {100 * r['gains_pass_overhead']:+.1f}% |") if gained else ""
        extra += f" {r['cpu_bias_ms']:.3f} | {100 * r['bias_overhead']:+.1f}% |" if biased else ""
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['G']} | {r['density']:.2f} | {r['batch']} | {r['dense_ms']:.3f} | "
            f"{r['oracle_ms']:.3f} | {r['cpu_ms']:.3f} | {r['speedup_vs_dense']:.2f}x | {r['speedup_vs_oracle']:.2f}x |" + extra
        )
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    """Speed-up over dense (solid) and over the oracle (dashed) against density, per shape/dtype panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["shape"], r["dtype"]) for r in records})
    G = max(r["G"] for r in records)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (shape, dtype_name) in zip(axes[0], panels):
        for batch in sorted({r["batch"] for r in records}):
            rows = sorted((r for r in records if (r["shape"], r["dtype"], r["G"], r["batch"]) == (shape, dtype_name, G, batch)),
                          key=lambda r: r["density"])
            densities = [r["density"] for r in rows]
            line, = ax.plot(densities, [r["speedup_vs_dense"] for r in rows], marker="o", label=f"batch {batch} vs dense")
            ax.plot(densities, [r["speedup_vs_oracle"] for r in rows], marker="x", linestyle="--", color=line.get_color(),
                    label=f"batch {batch} vs oracle")
        xs = [0.2, 0.8]
        ax.plot(xs, [1 / x for x in xs], color="grey", linewidth=0.8, label="1/density (cap vs dense)")
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_title(f"{shape} {dtype_name}, G={G}")
        ax.set_xlabel("persona density")
        ax.set_ylabel("speed-up (time ratio)")
        ax.set_ylim(0, max(4.5, ax.get_ylim()[1]))
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    """Run the grid, print a table, write JSON + markdown to benchmarks/out/ and the plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--groups", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--densities", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--reps", type=int, default=0, help="timed rounds per config (default 7 for 8B, 30 otherwise)")
    parser.add_argument("--threads", type=int, default=0, help="threads for torch and the kernel (default: all cores)")
    parser.add_argument("--scales", action="store_true", help="also time the kernel with per-channel persona scales")
    parser.add_argument("--input-gains", action="store_true",
                        help="also time the kernel with scales and per-persona FFN input gains (implies --scales)")
    parser.add_argument("--output-bias", action="store_true",
                        help="also time the kernel with scales, input gains and a per-persona FFN output bias "
                             "(implies --input-gains)")
    parser.add_argument("--plot", type=Path, default=PLOT_PATH)
    args = parser.parse_args(argv)
    args.input_gains = args.input_gains or args.output_bias
    args.scales = args.scales or args.input_gains
    if not cpu_backend.is_available():
        sys.exit(f"cpu backend unavailable: {cpu_backend.unavailable_reason()}")
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    args.kernel_threads = threads
    from persona_kernels import _cpu

    started = dt.datetime.now(dt.timezone.utc)
    meta = dict(
        date=started.isoformat(timespec="seconds"), command=" ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        cpu=cpu_model_name(), cores=threads, torch=torch.__version__, torch_threads=torch.get_num_threads(),
        kernel_isa=_cpu.isa(), kernel_openmp=_cpu.openmp(), load_average_start=os.getloadavg(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "(unset)"),
    )
    print(json.dumps(meta))
    records: list[dict] = []
    for shape in args.shapes:
        for dtype_name in args.dtypes:
            bench_shape(shape, dtype_name, args, records)
    meta["load_average_end"] = os.getloadavg()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    (OUT_DIR / f"bench_cpu-{stamp}.json").write_text(json.dumps(dict(meta=meta, records=records), indent=1))
    table = markdown_table(records)
    (OUT_DIR / f"bench_cpu-{stamp}.md").write_text(table + "\n")
    print(table)
    plot(records, args.plot)
    print(f"wrote {OUT_DIR / f'bench_cpu-{stamp}.json'}, {OUT_DIR / f'bench_cpu-{stamp}.md'}, {args.plot}")


if __name__ == "__main__":
    main()
