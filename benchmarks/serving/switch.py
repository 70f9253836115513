"""Question 1: what does switching persona cost, against the alternatives, and do graphs stay right?

Compared, at the Llama-3-8B shape (``--smoke``: the tiny CPU model):

- ``switch``: :func:`persona_kernels.hf.set_persona` on a running attached model (persona ids
  written into the model's fixed device buffers), per-row lists too; the raw floor (``fill_`` and a
  pinned non-blocking copy into the id buffer); and, for scale, ``PersonaState.prepare`` (the
  per-token id expansion, plus the shared ``StepMeta`` refill on Triton) that the model's forward
  pre-hook runs once per forward, not per switch. Host time (``perf_counter_ns``),
  weight bytes moved: none, checked (every parameter's version counter and address unchanged,
  allocated memory unchanged).
- ``presliced_load``: loading a persona's pre-sliced pruned FFN copy (one layer's gate, up and
  down kept rows at the bank density) from pinned host memory into preallocated device memory;
  the whole model is that times the layer count. ``reslice_device``: building the same slice on the
  device from resident dense weights (``index_select``; no host copy, still every byte read and written).
- ``lora_swap``: copying a rank-16 LoRA (A and B of gate, up and down of every layer) from pinned
  host memory into preallocated device buffers, one copy per matrix.
- ``graph_switch_check``: one decode step of an attached Hugging Face model captured as a CUDA graph
  at a fixed position; after each of several persona switches the replayed logits are compared
  with the same step run eagerly on the ``reference`` backend (the fp32 oracle of the masked FFN).
  Nothing but ``set_persona`` runs between replays: the captured forward's pre-hook re-expands the
  ids on the device. ``ffn_graph_switch_check``: the same
  for a stack of ``masked_ffn`` layers reading a fixed id buffer (no Hugging Face involved).
  On CPU (``--smoke``) nothing is captured: the eager step after each switch is checked instead.

Output (``--out``, default :func:`benchmarks.common.default_out_dir`): ``switch.jsonl``,
``switch.png``, and a table on stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import common  # noqa: E402
from benchmarks.common import (  # noqa: E402
    JsonlWriter,
    cuda_events_time,
    default_out_dir,
    device_sync,
    format_table,
    host_time,
    human_bytes,
    plot_bars,
    wall_time,
)
from benchmarks.serving.decode_loop import make_static_cache, _cache_keyword  # noqa: E402
from benchmarks.serving.models import (  # noqa: E402
    DEFAULT_DENSITY,
    DEFAULT_GROUP_SIZE,
    SHAPES,
    ModelShape,
    bank_for_model,
    build_model,
    mix_ids,
)

LORA_RANK = 16
SWITCH_SEQUENCE = ("identical", "uniform8", "zipf", "distinct", "dense_id0", "uniform8_indep", "identical@2")
"""Persona mixes applied one after another in the graph checks (``identical@2``: persona 2 given once,
a one-entry list for the whole batch; the graph is captured under such a list, so replays cross list lengths)."""


def _ids_for(mix: str, batch: int, seed: int) -> list[int]:
    """Persona list of a mix of :data:`SWITCH_SEQUENCE`: one id per row, or ``[2]`` for ``identical@2``."""
    return [2] if mix == "identical@2" else mix_ids(mix, batch, seed)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (``inf`` when ``out`` has NaN or infinity)."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def tolerance(dtype: torch.dtype) -> float:
    """Relative-error tolerance of a bf16/fp16 model against the fp32-FFN oracle, or of fp32."""
    return 1e-4 if dtype == torch.float32 else 3e-2


# ------------------------------------------------------------------------------- 1. switch host time


def _param_state(model) -> tuple[int, int]:
    """(sum of parameter version counters, hash of parameter addresses): changes if a weight is written or moved."""
    versions = sum(p._version for p in model.parameters())
    addresses = hash(tuple(p.data_ptr() for p in model.parameters()))
    return versions, addresses


def bench_switch_host(model, batch: int, device: torch.device, n: int, log: JsonlWriter) -> list[dict]:
    """Host time of persona switches on an attached model; proves no weight byte moves."""
    from persona_kernels.hf import set_persona
    from persona_kernels.hf.attachment import attachment

    state = attachment(model).state
    sync = device_sync(device)
    pinned = device.type == "cuda"
    rows = []
    state.prepare(batch, 1)  # the first prepare allocates the shared StepMeta (triton); switches must not allocate
    before_params = _param_state(model)
    before_alloc = torch.cuda.memory_allocated(device) if device.type == "cuda" else None

    per_row = [_ids_for(mix, batch, seed) for seed, mix in enumerate(("uniform8", "zipf", "distinct", "uniform8_indep"))]
    names = [f"persona-{k}" for k in (3, 5)]
    counter = {"i": 0}

    def cycle(specs):
        def fn():
            counter["i"] += 1
            set_persona(model, specs[counter["i"] % len(specs)])
        return fn

    def prepare():
        state.prepare(batch, 1)

    sources = [torch.tensor(ids, dtype=torch.int32).pin_memory() if pinned else torch.tensor(ids, dtype=torch.int32) for ids in per_row]
    target = state.row_ids[:batch]

    def raw_copy():
        counter["i"] += 1
        target.copy_(sources[counter["i"] % len(sources)], non_blocking=True)

    def raw_fill():
        counter["i"] += 1
        state.row_ids.fill_(1 + counter["i"] % 8)

    cases = [
        ("set_persona(name)", cycle(names), 1),
        (f"set_persona(list of {batch})", cycle(per_row), batch),
        (f"per forward, not per switch: PersonaState.prepare({batch}, 1)", prepare, batch),
        ("floor: row_ids.fill_", raw_fill, 1),
        (f"floor: pinned copy of {batch} ids", raw_copy, batch),
    ]
    for name, fn, n_ids in cases:
        timing = host_time(fn, n=n, warmup=max(20, n // 10), sync=sync)
        record = {"bench": "switch", "kind": "switch_host", "case": name, "batch": batch, "id_bytes": 4 * n_ids,
                  "weight_bytes_moved": 0, **timing.as_dict("host")}
        rows.append(log.write(record))
    sync()
    after_params = _param_state(model)
    after_alloc = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    check = {"bench": "switch", "kind": "switch_weights_untouched",
             "param_versions_unchanged": before_params[0] == after_params[0],
             "param_addresses_unchanged": before_params[1] == after_params[1],
             "allocated_bytes_before": before_alloc, "allocated_bytes_after": after_alloc}
    rows.append(log.write(check))
    return rows


# ---------------------------------------------------------------------- 2. pre-sliced copy and LoRA


def _host_buffer(numel: int, dtype: torch.dtype, pinned: bool, generator: torch.Generator) -> torch.Tensor:
    buf = torch.empty(numel, dtype=dtype, pin_memory=pinned)
    buf.copy_(torch.randn(numel, generator=generator).to(dtype))
    return buf


def bench_presliced(shape: ModelShape, density: float, device: torch.device, dtype: torch.dtype, reps: int,
                    log: JsonlWriter) -> list[dict]:
    """Host-to-device load of one layer's pre-sliced pruned FFN, and the on-device re-slice alternative."""
    gen = torch.Generator().manual_seed(1)
    kept = round(density * shape.inter)
    numel = 3 * kept * shape.hidden
    nbytes = numel * torch.finfo(dtype).bits // 8
    cuda = device.type == "cuda"
    host = _host_buffer(numel, dtype, cuda, gen)
    dest = torch.empty(numel, dtype=dtype, device=device)
    sync = device_sync(device)

    def load():
        dest.copy_(host, non_blocking=True)

    rows = []
    if cuda:
        timing = cuda_events_time(load, n_warmup=2, n_rep=reps)
    else:
        timing = wall_time(load, n=reps, warmup=1, sync=sync)
    per_layer_ms = timing.median
    rows.append(log.write({
        "bench": "switch", "kind": "presliced_load", "case": "pinned host -> device, one layer", "density": density,
        "weight_bytes_moved": nbytes, "layers": shape.layers, "model_weight_bytes_moved": nbytes * shape.layers,
        "model_ms_extrapolated": per_layer_ms * shape.layers, "gbps": nbytes / (per_layer_ms * 1e-3) / 1e9,
        **timing.as_dict("device" if cuda else "wall"),
    }))

    # On-device re-slice from resident dense packed weights (no host traffic, every kept byte read and written).
    gate_up = torch.randn(shape.inter, 2, shape.hidden, generator=gen).to(device, dtype)
    down_t = torch.randn(shape.inter, shape.hidden, generator=gen).to(device, dtype)
    index = torch.randperm(shape.inter, generator=gen)[:kept].sort().values.to(device)
    out_gu = torch.empty(kept, 2, shape.hidden, dtype=dtype, device=device)
    out_d = torch.empty(kept, shape.hidden, dtype=dtype, device=device)

    def reslice():
        torch.index_select(gate_up, 0, index, out=out_gu)
        torch.index_select(down_t, 0, index, out=out_d)

    timing = cuda_events_time(reslice, n_warmup=2, n_rep=reps) if cuda else wall_time(reslice, n=reps, warmup=1, sync=sync)
    rows.append(log.write({
        "bench": "switch", "kind": "reslice_device", "case": "index_select from resident dense weights, one layer",
        "density": density, "weight_bytes_moved": 2 * nbytes, "layers": shape.layers,
        "model_weight_bytes_moved": 2 * nbytes * shape.layers, "model_ms_extrapolated": timing.median * shape.layers,
        "gbps": 2 * nbytes / (timing.median * 1e-3) / 1e9, **timing.as_dict("device" if cuda else "wall"),
    }))
    return rows


def bench_lora(shape: ModelShape, rank: int, device: torch.device, dtype: torch.dtype, reps: int,
               log: JsonlWriter) -> list[dict]:
    """Swap a rank-``rank`` LoRA (A, B of gate/up/down, every layer) from pinned host into preallocated device buffers."""
    gen = torch.Generator().manual_seed(2)
    d, f, r = shape.hidden, shape.inter, rank
    shapes = [(r, d), (f, r), (r, d), (f, r), (r, f), (d, r)]  # gate A, B; up A, B; down A, B
    cuda = device.type == "cuda"
    host, dest = [], []
    for _ in range(shape.layers):
        for s in shapes:
            numel = s[0] * s[1]
            host.append(_host_buffer(numel, dtype, cuda, gen))
            dest.append(torch.empty(numel, dtype=dtype, device=device))
    nbytes = sum(t.numel() for t in host) * torch.finfo(dtype).bits // 8
    sync = device_sync(device)

    def swap():
        for src, dst in zip(host, dest):
            dst.copy_(src, non_blocking=True)

    timing = cuda_events_time(swap, n_warmup=2, n_rep=reps) if cuda else wall_time(swap, n=reps, warmup=1, sync=sync)
    enqueue = host_time(swap, n=max(3, reps), warmup=1, sync=sync, sync_every=1)
    return [log.write({
        "bench": "switch", "kind": "lora_swap", "case": f"rank-{rank} LoRA, {len(host)} matrices, pinned host -> device",
        "rank": rank, "weight_bytes_moved": nbytes, "model_weight_bytes_moved": nbytes, "copies": len(host),
        "gbps": nbytes / (timing.median * 1e-3) / 1e9, **timing.as_dict("device" if cuda else "wall"),
        **enqueue.as_dict("host_enqueue"),
    })]


# --------------------------------------------------------------------- 3. graph replay across switches


def _rewind(cache, position: int) -> bool:
    """Set every static cache layer's device-side length to ``position`` (in place); False if unsupported."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(isinstance(getattr(layer, "cumulative_length", None), torch.Tensor) for layer in layers):
        return False
    for layer in layers:
        layer.cumulative_length.fill_(position)
    return True


def graph_switch_check(model, batch: int, prompt_len: int, device: torch.device, dtype: torch.dtype,
                       log: JsonlWriter, seed: int = 0, use_graph: bool | None = None) -> list[dict]:
    """Capture one decode step of the attached model at a fixed position; replay it after persona switches
    and compare with the eager ``reference``-backend step (the oracle). CPU: eager steps only."""
    from persona_kernels.hf import set_backend, set_persona
    from persona_kernels.hf.attachment import attachment

    info = attachment(model)
    default_backend = info.backend
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=gen).to(device)
    token = torch.randint(0, vocab, (batch, 1), generator=gen).to(device)
    cache = make_static_cache(model, batch, prompt_len + 2)
    cache_kw = _cache_keyword(model)
    logits_out = torch.empty(batch, vocab, dtype=torch.float32, device=device)
    tol = tolerance(dtype)

    with torch.no_grad():
        set_persona(model, _ids_for("uniform8", batch, seed))
        model(input_ids=prompt, use_cache=True, **{cache_kw: cache})  # fill the KV prefix once
        if not _rewind(cache, prompt_len):
            return [log.write({"bench": "switch", "kind": "graph_switch_check", "skipped": "static cache has no tensor cumulative_length"})]

        def fixed_step():
            _rewind(cache, prompt_len)
            logits_out.copy_(model(input_ids=token, use_cache=True, **{cache_kw: cache}).logits[:, -1].float())

        graph = None
        capture_error = None
        sync = device_sync(device)
        if use_graph if use_graph is not None else device.type == "cuda":
            try:
                set_persona(model, [1])  # captured under a one-entry list; the sequence switches to per-row lists
                graph = common.capture_graph(fixed_step, warmup=2)
            except Exception as error:  # noqa: BLE001 - recorded, then the eager checks still run
                graph, capture_error = None, f"{type(error).__name__}: {error}"[:500]
                sync()

        rows = []
        previous_ref = None
        for seed_offset, mix in enumerate(SWITCH_SEQUENCE):
            ids = _ids_for(mix, batch, seed + seed_offset)
            record = {"bench": "switch", "kind": "graph_switch_check", "switch": seed_offset, "mix": mix, "batch": batch,
                      "distinct_personas": len(set(ids)), "tolerance": tol, "graph_captured": graph is not None,
                      "capture_error": capture_error}
            set_persona(model, ids)  # the switch: integers into the fixed id buffer, nothing else
            if graph is not None:
                logits_out.fill_(float("nan"))
                graph.replay()  # nothing else since the switch: the captured pre-hook re-expands the ids
                sync()
                replay = logits_out.clone()
            logits_out.fill_(float("nan"))
            fixed_step()  # eager, default backend
            eager = logits_out.clone()
            set_backend(model, "reference")
            fixed_step()  # eager, fp32 oracle of the masked FFN
            reference = logits_out.clone()
            set_backend(model, default_backend)
            record["err_eager"] = rel_error(eager, reference)
            if graph is not None:
                record["err_replay"] = rel_error(replay, reference)
                record["replay_equals_eager_bitwise"] = bool(torch.equal(replay, eager))
            record["persona_effect_vs_previous"] = rel_error(reference, previous_ref) if previous_ref is not None else None
            record["ok"] = record["err_eager"] <= tol and (graph is None or record["err_replay"] <= tol)
            effect = record["persona_effect_vs_previous"]
            record["check_discriminates"] = None if effect is None else effect > 3 * tol
            previous_ref = reference
            rows.append(log.write(record))
        del graph
    return rows


def ffn_graph_switch_check(shape: ModelShape, batch: int, device: torch.device, dtype: torch.dtype,
                           log: JsonlWriter, layers: int = 2, seed: int = 0, use_graph: bool | None = None) -> list[dict]:
    """A stack of ``masked_ffn`` layers reading a fixed id buffer, captured as a CUDA graph (CUDA) or run
    eagerly (CPU); after each switch compared with :func:`masked_ffn_reference` layer by layer."""
    from persona_kernels import masked_ffn, resolve_backend
    from persona_kernels.reference import masked_ffn_reference

    from benchmarks.serving.models import make_bank

    bank = make_bank(ModelShape("ffn-stack", shape.hidden, shape.inter, layers, 1, 1, 1), 64, n_independent=8, seed=seed)
    bits = bank.keep_bits(device)  # [L, P + 1, W]
    gen = torch.Generator().manual_seed(seed + 7)
    scale = shape.hidden ** -0.5
    weights = [((torch.randn(shape.inter, 2, shape.hidden, generator=gen) * scale).to(device, dtype),
                (torch.randn(shape.inter, shape.hidden, generator=gen) * (shape.inter ** -0.5)).to(device, dtype))
               for _ in range(layers)]
    x_in = torch.empty(batch, shape.hidden, dtype=dtype, device=device)
    ids_buf = torch.zeros(batch, dtype=torch.int32, device=device)
    y_out = torch.empty(batch, shape.hidden, dtype=dtype, device=device)
    backend = resolve_backend(device)

    def step():
        y = x_in
        for layer, (gate_up, down_t) in enumerate(weights):
            y = y + masked_ffn(y, gate_up, down_t, ids_buf, bits[layer], group_size=bank.group_size, check_ids=False)
        y_out.copy_(y)

    def reference(ids: torch.Tensor) -> torch.Tensor:
        y = x_in
        for layer, (gate_up, down_t) in enumerate(weights):
            y = y + masked_ffn_reference(y, gate_up, down_t, ids, bits[layer], None, bank.group_size, "silu")
        return y

    graph, capture_error = None, None
    ids_buf.copy_(torch.tensor(_ids_for("identical", batch, seed), dtype=torch.int32))
    x_in.copy_(torch.randn(batch, shape.hidden, generator=gen))
    if use_graph if use_graph is not None else device.type == "cuda":
        try:
            graph = common.capture_graph(step, warmup=2)
        except Exception as error:  # noqa: BLE001 - recorded, then the eager checks still run
            graph, capture_error = None, f"{type(error).__name__}: {error}"[:500]
            device_sync(device)()
    tol = tolerance(dtype)
    rows = []
    for offset, mix in enumerate(SWITCH_SEQUENCE):
        ids = torch.tensor(_ids_for(mix, batch, seed + offset), dtype=torch.int32).expand(batch)  # one per token
        ids_buf.copy_(ids)  # the switch
        x_in.copy_(torch.randn(batch, shape.hidden, generator=gen))  # fresh input every time
        y_out.fill_(float("nan"))
        if graph is not None:
            graph.replay()
        else:
            step()
        device_sync(device)()
        err = rel_error(y_out, reference(ids.to(device)))
        rows.append(log.write({
            "bench": "switch", "kind": "ffn_graph_switch_check", "switch": offset, "mix": mix, "batch": batch,
            "layers": layers, "backend": backend, "graph_captured": graph is not None, "capture_error": capture_error,
            "err": err, "tolerance": tol, "ok": err <= tol,
        }))
    return rows


# ------------------------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU (timings are not performance claims)")
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES), help="model shape for copies (default 8b; tiny with --smoke)")
    parser.add_argument("--batch", type=int, default=32, help="batch rows for switches and graph checks")
    parser.add_argument("--host-iters", type=int, default=None, help="timed calls per host-time case")
    parser.add_argument("--reps", type=int, default=None, help="repetitions of device copies")
    parser.add_argument("--check-layers", type=int, default=2, help="decoder layers of the graph-check model")
    parser.add_argument("--graph", choices=("auto", "on", "off"), default="auto",
                        help="capture the checked steps as CUDA graphs (auto: on a GPU)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    args.device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    args.use_graph = args.graph == "on" or (args.graph == "auto" and args.device.type == "cuda")
    args.shape = args.shape or ("tiny" if args.smoke else "8b")
    args.host_iters = args.host_iters or (200 if args.smoke else 5000)
    args.reps = args.reps or (3 if args.smoke else 10)
    if args.smoke:
        args.batch = min(args.batch, 8)
    return args


def check_model_shape(shape: ModelShape, layers: int) -> ModelShape:
    """The graph-check model: ``shape``'s FFN and attention widths, ``layers`` layers, a small vocabulary."""
    return ModelShape(f"{shape.name}-{layers}l", shape.hidden, shape.inter, layers, shape.heads, shape.kv_heads,
                      vocab=min(shape.vocab, 1024))


def main(argv: list[str] | None = None) -> int:
    """Run every part; returns 0 when every correctness check passed, 1 otherwise."""
    args = parse_args(argv)
    if args.smoke:
        torch.set_num_threads(1)
    from persona_kernels.hf import attach_bank

    device = args.device
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    shape = SHAPES[args.shape]
    out_dir = args.out or default_out_dir("serving")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with JsonlWriter(out_dir / "switch.jsonl", device=device) as log:
        check_shape = check_model_shape(shape, args.check_layers)
        model = build_model(check_shape, device, dtype, seed=0, max_positions=256)
        bank = bank_for_model(model, check_shape, density=DEFAULT_DENSITY, group_size=DEFAULT_GROUP_SIZE)
        attach_bank(model, bank)
        rows += bench_switch_host(model, args.batch, device, args.host_iters, log)
        # the copy timings before the graph checks: those may JIT and autotune Triton kernels at new
        # shapes, and if the step's time box runs out there, the cheap rows are already written
        copy_dtype = torch.bfloat16 if device.type == "cuda" else dtype
        rows += bench_presliced(shape, DEFAULT_DENSITY, device, copy_dtype, args.reps, log)
        rows += bench_lora(shape, LORA_RANK, device, copy_dtype, args.reps, log)
        rows += graph_switch_check(model, args.batch, prompt_len=8, device=device, dtype=dtype, log=log, use_graph=args.use_graph)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows += ffn_graph_switch_check(shape, args.batch, device, dtype, log, use_graph=args.use_graph)
    ok = report(rows, out_dir, shape, args.smoke)
    return 0 if ok else 1


def report(rows: list[dict], out_dir: Path, shape: ModelShape, smoke: bool) -> bool:
    """Print the tables, draw ``switch.png``; return whether every correctness check passed."""
    label = "CPU smoke, not a performance claim" if smoke else rows[0].get("card", "")
    timing_rows = []
    for row in rows:
        kind = row.get("kind")
        if kind == "switch_host":
            timing_rows.append({"what": row["case"], "time": row["host_median_us"], "unit": "us host",
                                "bytes": human_bytes(row["id_bytes"]) + " ids, 0 weights"})
        elif kind in ("presliced_load", "reslice_device", "lora_swap"):
            ms = row.get("device_median_ms", row.get("wall_median_ms"))
            short = {"presliced_load": "pre-sliced copy H2D", "reslice_device": "re-slice on device",
                     "lora_swap": f"LoRA r{row.get('rank', LORA_RANK)} swap H2D, whole model"}[kind]
            timing_rows.append({"what": short + (", 1 layer" if "model_ms_extrapolated" in row else ""), "time": ms * 1e3,
                                "unit": "us", "bytes": human_bytes(row["weight_bytes_moved"]) + " weights"})
            if "model_ms_extrapolated" in row:
                timing_rows.append({"what": f"{short}, whole model (x{row['layers']} layers)",
                                    "time": row["model_ms_extrapolated"] * 1e3, "unit": "us",
                                    "bytes": human_bytes(row["model_weight_bytes_moved"]) + " weights"})
    print(f"\n== persona switch vs alternatives ({shape.name}; {label})")
    print(format_table(timing_rows, ["what", "time", "unit", "bytes"]))
    checks = [r for r in rows if r.get("kind") in ("graph_switch_check", "ffn_graph_switch_check")]
    print("\n== correctness after switches (relative error vs the fp32-FFN reference)")
    print(format_table(checks, ["kind", "mix", "graph_captured", "err_replay", "err_eager",
                                "err", "persona_effect_vs_previous", "ok"], floatfmt="{:.2e}"))
    untouched = [r for r in rows if r.get("kind") == "switch_weights_untouched"]
    ok = all(r.get("ok") for r in checks if "ok" in r) and all(
        r["param_versions_unchanged"] and r["param_addresses_unchanged"] for r in untouched)
    bars = [r for r in timing_rows]
    plot_bars([b["what"][:48] for b in bars], [max(b["time"], 1e-3) for b in bars], out_dir / "switch.png",
              title="Persona switch vs loading a pruned copy vs swapping a LoRA (time, log scale)",
              ylabel="microseconds", logy=True, subtitle=f"{shape.name}; {label}", annotations=[b["bytes"] for b in bars])
    print(f"\nswitch: {'all checks passed' if ok else 'SOME CHECKS FAILED'}; wrote {out_dir}/switch.jsonl")
    return ok


if __name__ == "__main__":
    sys.exit(main())
