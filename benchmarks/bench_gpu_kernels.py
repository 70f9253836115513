"""Triton masked FFN vs dense cuBLAS vs the pre-sliced oracle, side by side in one run.

Question: at the Llama-3-8B FFN shape (d 4096, d_ff 14336, bf16), how close do our kernels get
to the physical limits, and to the per-persona pre-sliced dense copy run through cuBLAS?

Methods, timed per (tokens, personas in the batch, density) with ``triton.testing.do_bench``
(median, warm-up, L2 flushed between runs). Each timing runs a stack of ``--layers`` FFN layers
whose weights (and pre-sliced copies, and tokens) are separate copies, as consecutive layers of a
model are, so no layer finds the previous one's weights in L2; the time reported is per layer. With
``--timing graph`` (the default on a GPU) each stack is captured once as a CUDA graph and the
replays are timed, as a serving engine runs a decode step: launch and Python overhead drop out for
every method alike, and what is left is device time. ``--timing eager`` times the same stack as
Python calls (host overhead included, as an engine without graphs would pay it).

- ``dense``: ``F.linear`` x3 + activation on the unpruned weights (the 1/density yardstick).
- ``oracle``: each persona's kept channels pre-sliced into small dense weights, ``F.linear`` per
  persona over its (contiguous) tokens: the best a private pruned copy could do.
- ``ours``: one :func:`masked_ffn_triton` launch for the mixed batch (path by ``choose_path``),
  plus the ``decode`` / ``prefill`` paths forced, and ``ours_loop``: one launch per persona.
- ``ours_scales``: ``ours`` with per-channel persona scales in the epilogue (issue 8: within 2%).
- ``ours_gains`` (decode sizes only): ``ours_scales`` with per-persona FFN input gains, which the
  kernels multiply into each token as they load it (checked against the oracle on tokens
  pre-multiplied by :func:`persona_kernels.reference.apply_input_gains`).
- ``ours_bias`` (decode sizes only): ``ours_gains`` plus the per-persona FFN output bias, which the
  dispatcher adds after the Triton kernels in a separate pass (:func:`persona_kernels.reference.apply_output_bias`).
- ``cuda``: the CUDA C++ backend (``persona_kernels.backends.cuda_backend``, auto path, caller-owned
  output and workspace) on the same batch, when the extension is built and a GPU is present.
- ``prepare``: :meth:`StepMeta.prepare` alone (once per step, shared by all layers).

Configs run in priority order (:func:`config_order`): density 0.5 first, and within it the
issue's target points (one token and 4,096 tokens at one persona, mixed batches of 4 and 32),
so a time budget (``--budget-s``) that cuts the grid short keeps the numbers that matter. A
config that fails (a check against the oracle, a CUDA error) is logged with its error and the
run goes on; a cuda backend that disagrees with the oracle loses only its column (the row's
``errors``); the exit status is 1 after either.

Each config is also checked against the oracle. Output (folder: ``--out``, else
``benchmarks.common.default_out_dir``, i.e. ``$OUT`` on the GPU machine): ``results.jsonl`` (one
line per config, flushed as written, stamped by ``benchmarks.common.environment``),
``speedup.png``, and a markdown table on stdout. Achieved bandwidth counts the union of kept
weight bytes (the minimum a mixed batch must read) over ``ours``' time; the limit is the
device's nominal bandwidth and a measured device-to-device copy.

``--smoke`` runs tiny shapes on the CPU through the Triton interpreter (timings meaningless) so
the script is exercised by CI without a GPU.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

NOMINAL_TBPS = {"H100": 3.35, "H200": 4.8, "A100": 2.0}


@dataclass
class Row:
    tokens: int
    personas: int
    density: float
    union_density: float
    path: str
    timing: str
    ms: dict[str, float]
    kept_gb: float
    ours_tbps: float
    ours_tflops: float
    errors: list[str] = field(default_factory=list)  # methods left out of the row, and why


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU via the Triton interpreter")
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--d-ff", type=int, default=14336)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024, 4096, 8192])
    parser.add_argument("--personas", type=int, nargs="+", default=[1, 4, 32])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--forced-decode-max", type=int, default=1024, help="largest T timed with the decode path forced")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time per method")
    parser.add_argument("--layers", type=int, default=4, help="FFN layers per timed stack, each with its own weight copies")
    parser.add_argument("--timing", choices=("graph", "eager"), default=None,
                        help="graph: time CUDA-graph replays of each stack (default on a GPU); eager: Python calls")
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting new configs after this many seconds")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: benchmarks.common.default_out_dir)")
    parser.add_argument("--replot", type=Path, default=None, metavar="RESULTS_JSONL",
                        help="redraw the plots and the table of an earlier run's results.jsonl into --out (or beside it), then exit")
    args = parser.parse_args()
    if args.smoke:
        args.d, args.d_ff, args.group_size = 64, 256, 16
        args.tokens, args.personas, args.densities, args.layers = [1, 40], [1, 3], [0.5], 2
    args.timing = args.timing or ("eager" if args.smoke else "graph")
    if args.smoke and args.timing == "graph":
        parser.error("--timing graph needs a GPU")
    if args.layers < 1:
        parser.error("--layers must be at least 1")
    return args


def main() -> int:
    """Run the grid; returns 1 when some config failed, else 0."""
    args = parse_args()
    if args.replot is not None:
        return replot(args.replot, args.out or args.replot.parent)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import torch

    sys.path.insert(0, str(REPO_ROOT))
    from benchmarks.common import Deadline, JsonlWriter, cuda_time, default_out_dir, environment, wall_time

    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --smoke to exercise the script on CPU")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if device.type == "cuda":
        bench = lambda fn: cuda_time(fn, rep_ms=args.rep_ms).median  # noqa: E731
    else:
        bench = lambda fn: wall_time(fn, n=3).median  # noqa: E731
    out_dir = args.out or default_out_dir("bench_gpu_kernels")
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = Deadline(args.budget_s)
    layers = _make_layers(args.d, args.d_ff, dtype, device, args.layers)
    limits = _bandwidth_limits(device, bench)
    meta = {"dtype": str(dtype), "d": args.d, "d_ff": args.d_ff, "group_size": args.group_size, "limits_tbps": limits,
            "card": environment(device)["card"], "layers": args.layers, "timing": args.timing}
    # `timeout` ends a step with SIGTERM: turn it into SystemExit so the table and plot still get written
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    rows, failures, last_s = [], 0, 0.0
    with JsonlWriter(out_dir / "results.jsonl", device=device) as log:
        try:
            for density, personas, tokens in config_order(args.densities, args.personas, args.tokens):
                if deadline.expired(need=last_s):
                    print(f"budget spent: skipping T={tokens} P={personas} density={density}")
                    continue
                started = time.monotonic()
                try:
                    rows.append(_bench_config(args, layers, tokens, personas, density, bench))
                    log.write({**meta, **asdict(rows[-1])})
                    failures += bool(rows[-1].errors)
                except Exception as error:  # one bad config must not cost the others
                    failures += 1
                    print(f"FAILED T={tokens} P={personas} density={density}: {error!r}", flush=True)
                    log.write({**meta, "tokens": tokens, "personas": personas, "density": density, "error": repr(error)})
                    if device.type == "cuda" and "CUDA error" in repr(error):
                        break  # a sticky CUDA error poisons every later launch in this process
                last_s = time.monotonic() - started
        finally:
            if rows:
                _plot(rows, out_dir / "speedup.png")
                _plot_bound(rows, out_dir / "bound.png", limits)
                print(_markdown(rows, meta))
    print(f"\nwrote {out_dir}/results.jsonl and speedup.png; {len(rows)} configs measured, {failures} failed")
    return 1 if failures else 0


def config_order(densities: list[float], personas: list[int], tokens: list[int]) -> list[tuple[float, int, int]]:
    """Every ``(density, personas, tokens)`` with ``tokens >= personas``, most important first.

    Density 0.5 (the issue's targets) before the others; within a density, the target points
    (one persona at 1 and 4,096 tokens, then mixed batches) before the rest, fewer tokens first.
    """
    targets = [(1, 1), (1, 4096), (32, 64), (4, 16), (32, 256), (1, 64)]
    grid = [(d, p, t) for d in densities for p in personas for t in tokens if t >= p]

    def priority(config):
        density, p, t = config
        rank = targets.index((p, t)) if (p, t) in targets else len(targets)
        return abs(density - 0.5), rank, p, t

    return sorted(grid, key=priority)


def _make_layers(d: int, d_ff: int, dtype, device, n_layers: int) -> list[dict]:
    """``n_layers`` weight sets in separate memory (the same random values: the L2 sees addresses)."""
    import torch

    from persona_kernels.layout import pack_ffn

    gen = torch.Generator(device="cpu").manual_seed(0)
    w_gate = (torch.randn(d_ff, d, generator=gen) / d**0.5).to(device, dtype)
    w_up = (torch.randn(d_ff, d, generator=gen) / d**0.5).to(device, dtype)
    w_down = (torch.randn(d, d_ff, generator=gen) / d_ff**0.5).to(device, dtype)
    layers = []
    for index in range(n_layers):
        gate, up, down = (w if index == 0 else w.clone() for w in (w_gate, w_up, w_down))
        layers.append({"gate": gate, "up": up, "down": down, "packed": pack_ffn(gate, up, down, "silu")})
    return layers


def _stack_timer(bench, n_layers: int, graphs: bool, errors: list[str]):
    """``timed(fn, *extra)``: per-layer ms of ``fn(layer, *extra)`` over every layer of a stack,
    replayed as one CUDA graph when ``graphs`` (after one eager run: JIT, autotuning), else eager.
    A stack that cannot be captured is timed eagerly and noted in ``errors``."""
    import torch

    def timed(fn, *extra, name: str = "?"):
        def stack():
            for layer in range(n_layers):
                fn(layer, *extra)

        if not graphs:
            return bench(stack) / n_layers
        stack()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                stack()
        except Exception as error:  # noqa: BLE001 - time it eagerly, say why
            errors.append(f"{name}: graph capture failed ({type(error).__name__}: {str(error)[:200]}); timed eagerly")
            torch.cuda.synchronize()
            return bench(stack) / n_layers
        ms = bench(graph.replay) / n_layers
        del graph
        return ms

    return timed


def _bench_config(args, layers: list[dict], tokens: int, personas: int, density: float, bench) -> Row:
    import torch
    import torch.nn.functional as F

    from persona_kernels.backends.triton_backend import choose_path, masked_ffn_triton
    from persona_kernels.masks import keep_to_bits
    from persona_kernels.reference import apply_input_gains, apply_output_bias
    from persona_kernels.step_meta import StepMeta

    w_gate = layers[0]["gate"]
    device, dtype, d, d_ff, G = w_gate.device, w_gate.dtype, args.d, args.d_ff, args.group_size
    n_groups = d_ff // G
    gen = torch.Generator().manual_seed(tokens * 1000 + personas)
    keep = torch.zeros(personas, n_groups, dtype=torch.bool)
    for p in range(personas):
        keep[p, torch.randperm(n_groups, generator=gen)[: round(density * n_groups)]] = True
    bits = keep_to_bits(keep).to(device)
    # Tokens sorted by persona (contiguous segments, the oracle's best case), near-equal segments.
    ids = (torch.arange(tokens) * personas // tokens).to(device)
    bounds = [int(b) for b in torch.searchsorted(ids.cpu(), torch.arange(personas + 1))]
    xs = [torch.randn(tokens, d, generator=gen).to(device, dtype) for _ in layers]
    out = torch.empty(tokens, d, dtype=dtype, device=device)

    channel_keep = keep.repeat_interleave(G, dim=1)
    scales = (0.5 + torch.rand(personas, d_ff, generator=gen)).to(device)
    gains = (0.5 + torch.rand(personas, d, generator=gen)).to(device)
    bias = (0.1 * torch.randn(personas, d, generator=gen)).to(device)
    sliced, sliced_scaled = [[] for _ in layers], [[] for _ in layers]  # [layer][persona] pre-sliced copies
    for p in range(personas):
        chans = channel_keep[p].nonzero().flatten().to(device)
        for layer, w in enumerate(layers):
            wg, wu, wd = w["gate"][chans].contiguous(), w["up"][chans].contiguous(), w["down"][:, chans].contiguous()
            sliced[layer].append((wg, wu, wd))
            sliced_scaled[layer].append((wg, wu, (wd.float() * scales[p, chans]).to(dtype)))

    def dense(layer, x=None):
        w = layers[layer]
        x = xs[layer] if x is None else x
        return F.linear(F.silu(F.linear(x, w["gate"])) * F.linear(x, w["up"]), w["down"])

    def oracle(layer, x=None, copies=sliced):
        x = xs[layer] if x is None else x
        for (wg, wu, wd), lo, hi in zip(copies[layer], bounds[:-1], bounds[1:]):
            xp = x[lo:hi]
            out[lo:hi] = F.linear(F.silu(F.linear(xp, wg)) * F.linear(xp, wu), wd)
        return out

    meta = StepMeta.make(tokens, n_groups, personas, device).prepare(ids, bits)
    loop_metas = [
        StepMeta.make(hi - lo, n_groups, personas, device).prepare(ids[lo:hi], bits)
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]

    def ours(layer, path=None, scaled=False, input_gains=None, x=None):
        packed = layers[layer]["packed"]
        return masked_ffn_triton(xs[layer] if x is None else x, packed.gate_up, packed.down_t, ids, bits,
                                 scales if scaled else None, group_size=G, meta=meta, out=out, path=path,
                                 input_gains=input_gains)

    def ours_gains(layer, x=None):
        return ours(layer, None, True, gains, x)

    def ours_bias(layer, x=None):
        return apply_output_bias(ours_gains(layer, x), bias, ids)

    def ours_loop(layer):
        packed = layers[layer]["packed"]
        for m, lo, hi in zip(loop_metas, bounds[:-1], bounds[1:]):
            masked_ffn_triton(xs[layer][lo:hi], packed.gate_up, packed.down_t, ids[lo:hi], bits, group_size=G, meta=m,
                              out=out[lo:hi], path=choose_path(hi - lo, 1))  # one persona per launch
        return out

    cuda_fn = _cuda_backend_fn(layers, xs, ids, bits, G, out, personas)

    x0 = xs[0]
    plain, scaled = oracle(0).float().clone(), oracle(0, copies=sliced_scaled).float().clone()
    checks = [("decode path", plain, ("decode",)), ("prefill path", plain, ("prefill",)), ("scaled kernel", scaled, (None, True))]
    for what, want, extra in checks:
        err = (ours(0, *extra).float() - want).abs().max().item()
        assert err <= 0.02 * max(1.0, want.abs().max().item()), f"{what} disagrees with the oracle: {err:.3e}"
    errors = []
    if cuda_fn is not None:  # a wrong cuda backend costs its own column, not the Triton numbers
        err = (cuda_fn(0).float() - plain).abs().max().item()
        if err > 0.02 * max(1.0, plain.abs().max().item()):
            errors.append(f"cuda backend disagrees with the oracle: {err:.3e}")
            print(f"T={tokens} P={personas} density={density}: {errors[-1]}", flush=True)
            cuda_fn = None
    gained = oracle(0, apply_input_gains(x0, gains, ids), sliced_scaled).float()
    err = (ours_gains(0).float() - gained).abs().max().item()
    assert err <= 0.02 * max(1.0, gained.abs().max().item()), f"kernel with input gains disagrees with the oracle: {err:.3e}"
    biased = apply_output_bias(gained.to(dtype), bias, ids).float()
    err = (ours_bias(0).float() - biased).abs().max().item()
    assert err <= 0.02 * max(1.0, biased.abs().max().item()), f"kernel with output bias disagrees with the oracle: {err:.3e}"

    timed = _stack_timer(bench, len(layers), args.timing == "graph", errors)
    ms = {"dense": timed(dense, name="dense"), "oracle": timed(oracle, name="oracle"), "ours": timed(ours, name="ours"),
          "ours_scales": timed(ours, None, True, name="ours_scales"), "ours_loop": timed(ours_loop, name="ours_loop"),
          "prepare": bench(lambda: meta.prepare(ids, bits))}
    if cuda_fn is not None:
        ms["cuda"] = timed(cuda_fn, name="cuda")
    if tokens <= args.forced_decode_max:
        ms["ours_decode"] = timed(ours, "decode", name="ours_decode")
        ms["ours_gains"] = timed(ours_gains, name="ours_gains")
        ms["ours_bias"] = timed(ours_bias, name="ours_bias")
    ms["ours_prefill"] = timed(ours, "prefill", name="ours_prefill")
    for error in errors:
        print(f"T={tokens} P={personas} density={density}: {error}", flush=True)

    union = keep.any(0).sum().item() / n_groups
    kept_bytes = union * d_ff * 3 * d * w_gate.element_size()
    flops = 2 * 3 * d * G * keep.sum(1)[ids.cpu()].sum().item()
    row = Row(tokens, personas, density, union, choose_path(tokens, personas), args.timing, ms, kept_bytes / 1e9,
              kept_bytes / (ms["ours"] * 1e-3) / 1e12, flops / (ms["ours"] * 1e-3) / 1e12, errors)
    print(f"T={tokens:5d} P={personas:2d} density={density:.2f}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items()),
          flush=True)
    return row


def _cuda_backend_fn(layers: list[dict], xs: list, ids, bits, group_size: int, out, personas: int):
    """``layer -> out`` through the CUDA C++ backend with a preallocated workspace, or None where it cannot run."""
    import torch

    from persona_kernels.backends import cuda_backend

    if out.device.type != "cuda" or not cuda_backend.is_available():
        return None
    T, d = out.shape
    d_ff = layers[0]["packed"].gate_up.shape[0]
    nbytes = cuda_backend.workspace_bytes(T, d, d_ff, personas, group_size, out.dtype, "auto")
    workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=out.device)

    def run(layer):
        packed = layers[layer]["packed"]
        return cuda_backend.masked_ffn(xs[layer], packed.gate_up, packed.down_t, ids, bits, None, group_size, "silu",
                                       out=out, workspace=workspace)

    return run


def _bandwidth_limits(device, bench) -> dict[str, float | None]:
    """Nominal bandwidth of the device (by name) and a measured copy of 1 GiB (read + write)."""
    import torch

    if device.type != "cuda":
        return {"nominal": None, "measured_copy": None}
    name = torch.cuda.get_device_name()
    nominal = next((v for k, v in NOMINAL_TBPS.items() if k in name), None)
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return {"nominal": nominal, "measured_copy": 2 * src.numel() / (ms * 1e-3) / 1e12}


def _markdown(rows: list[Row], meta: dict) -> str:
    methods = ["dense", "oracle", "ours", "ours_scales", "ours_gains", "ours_bias", "ours_decode", "ours_prefill", "ours_loop", "cuda",
               "prepare"]
    lines = [
        f"{meta['card']}, {meta['dtype']}, d={meta['d']}, d_ff={meta['d_ff']}, G={meta['group_size']}, "
        f"ms per layer of a {meta['layers']}-layer stack, timing {meta['timing']}; "
        f"bandwidth limits (TB/s): {meta['limits_tbps']}",
        "",
        "| T | P | density | union | path | " + " | ".join(f"{m} ms" for m in methods)
        + " | dense/ours | oracle/ours | ours TB/s | ours TFLOP/s |",
        "|" + "---|" * (5 + len(methods) + 4),
    ]
    for r in rows:
        cells = [f"{r.ms[m]:.3f}" if m in r.ms else "-" for m in methods]
        lines.append(
            f"| {r.tokens} | {r.personas} | {r.density:.2f} | {r.union_density:.2f} | {r.path} | " + " | ".join(cells)
            + f" | {r.ms['dense'] / r.ms['ours']:.2f} | {r.ms['oracle'] / r.ms['ours']:.2f}"
            + f" | {r.ours_tbps:.2f} | {r.ours_tflops:.1f} |"
        )
    return "\n".join(lines)


def replot(results: Path, out_dir: Path) -> int:
    """Plots and table of an earlier run from its ``results.jsonl`` (lines with an error are left out)."""
    import json
    from dataclasses import fields

    if not results.is_file():
        raise SystemExit(f"--replot: no such file {results}")
    lines = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    names = {f.name for f in fields(Row)}
    rows = [Row(**{k: v for k, v in line.items() if k in names}) for line in lines if "ms" in line]
    if not rows:
        raise SystemExit(f"--replot: {results} holds no measured configs")
    first = next(line for line in lines if "ms" in line)
    meta = {k: first.get(k) for k in ("card", "dtype", "d", "d_ff", "group_size", "limits_tbps", "layers", "timing")}
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot(rows, out_dir / "speedup.png")
    _plot_bound(rows, out_dir / "bound.png", meta["limits_tbps"] or {})
    print(_markdown(rows, meta))
    print(f"\nwrote {out_dir}/speedup.png and bound.png from {len(rows)} configs")
    return 0


def _plot_bound(rows: list[Row], path: Path, limits: dict) -> None:
    """Decode sizes: ``ours``' achieved bandwidth over the measured copy bandwidth (the union bound), one line per
    (personas, density); a mixed batch must read its union's kept weights once, so 1.0 is the physical limit."""
    limit = limits.get("measured_copy") or limits.get("nominal")
    if not limit:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot written")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for personas in sorted({r.personas for r in rows}):
        for density in sorted({r.density for r in rows}):
            sel = sorted((r for r in rows if r.personas == personas and r.density == density and r.path == "decode"),
                         key=lambda r: r.tokens)
            if sel:
                ax.plot([r.tokens for r in sel], [r.ours_tbps / limit for r in sel], marker="o",
                        label=f"{personas} persona(s), density {density}")
    dense = sorted({r.tokens: r for r in rows if r.path == "decode"}.values(), key=lambda r: r.tokens)
    if dense:  # dense cuBLAS reads every weight byte: what a tuned library reaches at these sizes
        ax.plot([r.tokens for r in dense], [r.kept_gb / r.union_density / (r.ms["dense"] * 1e-3) / 1e3 / limit for r in dense],
                "k:", marker="x", label="dense cuBLAS (all weights)")
    ax.axhline(0.9, color="gray", lw=0.8, ls="--")
    ax.set(xscale="log", xlabel="tokens", ylabel="kept-union bytes / time, over the measured copy bandwidth",
           title=f"Decode: fraction of the bandwidth bound ({limit:.2f} TB/s copy)", ylim=(0, 1.05))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _plot(rows: list[Row], path: Path) -> None:
    """Speed-up over dense vs tokens, one panel per density, a line per (method, personas)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot written")
        return
    densities = sorted({r.density for r in rows})
    fig, axes = plt.subplots(1, len(densities), figsize=(6 * len(densities), 4.5), squeeze=False)
    for ax, density in zip(axes[0], densities):
        for method, style in (("oracle", ":"), ("ours", "-"), ("ours_loop", "--"), ("cuda", "-.")):
            for personas in sorted({r.personas for r in rows}):
                sel = sorted((r for r in rows if r.density == density and r.personas == personas and method in r.ms),
                             key=lambda r: r.tokens)
                if not sel:
                    continue
                ax.plot([r.tokens for r in sel], [r.ms["dense"] / r.ms[method] for r in sel], style, marker="o",
                        label=f"{method}, {personas} persona(s)")
        ax.axhline(1 / density, color="gray", lw=0.8)
        ax.set(xscale="log", xlabel="tokens", ylabel="speed-up over dense", title=f"density {density}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
