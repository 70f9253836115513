"""Question 3: how many bytes does a persona cost, against a pruned copy or a LoRA adapter?

For 1, 100 and 1000 personas of the Llama-3-8B shape at G = 16, density 0.5 (``--smoke``: the tiny
shape, 1/10/100 personas):

- ``keep_bits``: the kernel bitmaps ``bank.keep_bits(device)`` ``[L, P + 1, W]`` int32 (row 0 dense).
- ``scales_table``: ``bank.scales_table(device)`` ``[L, P + 1, d_ff]`` float32, when every persona
  has per-channel scales: a separate line, because it is three orders of magnitude larger.
- ``step_meta_decode`` / ``step_meta_prefill``: the Triton backend's per-step metadata
  (:class:`persona_kernels.step_meta.StepMeta`) as an attached model sizes it, with decode capacity
  (64 tokens, no per-slot lists) and prefill capacity (4096 tokens: per-slot kept lists
  ``[L, min(P + 1, T, rows), n_groups]``, rows = 64 batch rows, the attached model's initial
  capacity, since a step holds one persona per row); per model, not per persona.
- ``bank_file``: the safetensors bank (docs/FORMAT.md) serialised, with and without scales.
- ``pruned_copy``: a persona's pre-sliced FFN (gate, up, down kept rows, every layer, bf16).
- ``lora_r16``: a rank-16 LoRA on gate, up and down of every layer (A and B, bf16).
- ``scales_*_alternative``: compact layouts of the same scales, computed: kept channels only in
  bf16; kept channels in fp8 with one bf16 scale per persona and layer; one bf16 scale per group.

"measured" means ``torch.cuda.memory_allocated`` before and after building the device tensors (on a
GPU) or the tensors' ``nbytes`` (on the CPU); "computed" means from shapes, for sizes nobody should
allocate (a thousand pruned copies of an 8B model). These are allocation sizes, not timings: they
do not depend on the card. Output: ``memory.jsonl``, ``memory.png``, a table on stdout.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import JsonlWriter, default_out_dir, format_table, human_bytes, plot_bars  # noqa: E402
from benchmarks.serving.models import DEFAULT_DENSITY, DEFAULT_GROUP_SIZE, SHAPES, ModelShape, make_bank  # noqa: E402

LORA_RANK = 16
METADATA_TARGET_BYTES = 64 * 2**20
"""Target: the mask metadata of 1000 personas of the 8B model at G = 16 fits in 64 MiB."""


def _nbytes(obj) -> int:
    if obj is None:
        return 0
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    if hasattr(obj, "__dict__"):
        return sum(_nbytes(v) for v in vars(obj).values() if isinstance(v, (torch.Tensor, list, tuple)))
    return 0


def measure(build: Callable[[], object], device: torch.device) -> tuple[int, int, str]:
    """``(bytes, nbytes, method)`` of what ``build()`` allocates on ``device``: the allocator's
    ``memory_allocated`` delta on CUDA, the tensors' ``nbytes`` on the CPU (object freed after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        obj = build()
        torch.cuda.synchronize(device)
        delta = torch.cuda.memory_allocated(device) - before
        nbytes = _nbytes(obj)
        del obj
        torch.cuda.empty_cache()
        return delta, nbytes, "measured: cuda memory_allocated delta"
    obj = build()
    nbytes = _nbytes(obj)
    del obj
    return nbytes, nbytes, "measured: tensor nbytes (cpu)"


def pruned_copy_bytes(shape: ModelShape, density: float, dtype_bytes: int = 2) -> int:
    """Bytes of one persona's pre-sliced FFN (every layer) at ``density``."""
    return shape.layers * shape.ffn_params_per_layer(density) * dtype_bytes


def bench_memory(shape: ModelShape, personas: list[int], device: torch.device, density: float, group_size: int,
                 log: JsonlWriter, disk: bool = True, step_meta_tokens: tuple[int, int] = (64, 4096)) -> list[dict]:
    """Every line of the module docstring, for each persona count."""
    from persona_kernels.hf import PersonaState
    from persona_kernels.step_meta import StepMeta

    rows = []
    kept = round(density * shape.inter)
    n_groups = shape.inter // group_size
    common = {"bench": "memory", "model": shape.name, "layers": shape.layers, "d_ff": shape.inter, "hidden": shape.hidden,
              "group_size": group_size, "density": density}

    def line(approach: str, n: int, total: int, method: str, nbytes: int | None = None, note: str = "") -> None:
        rows.append(log.write({**common, "approach": approach, "personas": n, "bytes": int(total),
                               "bytes_per_persona": total / n, "nbytes": nbytes, "method": method, "note": note}))

    for n in personas:
        bank = make_bank(shape, n, density=density, group_size=group_size, with_scales=True, seed=n)
        bits_bytes, bits_nbytes, method = measure(lambda: bank.keep_bits(device), device)
        line("keep_bits", n, bits_bytes, method, bits_nbytes, "[L, P+1, W] int32, row 0 dense")
        scale_bytes, scale_nbytes, method = measure(lambda: bank.scales_table(device), device)
        line("scales_table", n, scale_bytes, method, scale_nbytes, "[L, P+1, d_ff] float32")
        for tokens, prefill in ((step_meta_tokens[0], False), (step_meta_tokens[1], True)):
            meta_bytes, meta_nbytes, method = measure(
                lambda: StepMeta.make(tokens, n_groups, n + 1, device, n_layers=shape.layers, prefill=prefill,
                                      max_slots=PersonaState.DEFAULT_CAPACITY_ROWS), device)
            line(f"step_meta_{'prefill' if prefill else 'decode'}", n, meta_bytes, method, meta_nbytes,
                 f"StepMeta capacity {tokens} tokens, prefill lists {prefill}; per model, slots min(P+1, T, "
                 f"{PersonaState.DEFAULT_CAPACITY_ROWS} rows)")
        if disk:
            from safetensors.torch import save as safetensors_save

            from persona_kernels.bank_io import bank_to_tensors

            size = len(safetensors_save(*bank_to_tensors(bank)))
            line("bank_file_with_scales", n, size, "measured: serialised safetensors bytes", None, "kept scales only, fp32")
            for persona in bank.personas:
                persona.scales = None
            size = len(safetensors_save(*bank_to_tensors(bank)))
            line("bank_file_masks_only", n, size, "measured: serialised safetensors bytes", None, "kept group ids + bitmaps")
        bank = None  # free the scales before the next count
        gc.collect()

        per_copy = pruned_copy_bytes(shape, density)
        per_lora = shape.lora_params(LORA_RANK) * 2
        if n == 1:
            dtype = torch.bfloat16

            def copy():
                return [t for _ in range(shape.layers)
                        for t in (torch.empty(kept, 2, shape.hidden, dtype=dtype, device=device),
                                  torch.empty(kept, shape.hidden, dtype=dtype, device=device))]

            def lora():
                d, f, r = shape.hidden, shape.inter, LORA_RANK
                return [torch.empty(s, dtype=dtype, device=device) for _ in range(shape.layers)
                        for s in ((r, d), (f, r), (r, d), (f, r), (r, f), (d, r))]

            if device.type == "cuda":
                total, nbytes, method = measure(copy, device)
                line("pruned_copy", 1, total, method, nbytes, f"bf16 kept rows of gate/up/down, all layers, density {density}")
            else:
                line("pruned_copy", 1, per_copy, "computed from shapes", per_copy, f"bf16, density {density}")
            total, nbytes, method = measure(lora, device)
            line("lora_r16", 1, total, method, nbytes, "bf16 A and B of gate/up/down, all layers")
        else:
            line("pruned_copy", n, per_copy * n, "computed from shapes", None, f"bf16, density {density}")
            line("lora_r16", n, per_lora * n, "computed from shapes", None, "bf16")
        per_layer = shape.layers
        line("scales_kept_bf16_alternative", n, n * per_layer * kept * 2, "computed from shapes", None,
             "kept channels only, bf16, in kept-list order")
        line("scales_kept_fp8_alternative", n, n * per_layer * (kept + 2), "computed from shapes", None,
             "kept channels only, fp8 e4m3 + one bf16 scale per persona-layer")
        line("scales_per_group_bf16_alternative", n, n * per_layer * n_groups * 2, "computed from shapes", None,
             "one bf16 scale per channel group (coarser than the pruner's scales)")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape, 1/10/100 personas")
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default 8b (smoke: tiny)")
    parser.add_argument("--personas", type=int, nargs="+", default=None, help="default 1 100 1000 (smoke: 1 10 100)")
    parser.add_argument("--density", type=float, default=DEFAULT_DENSITY)
    parser.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE)
    parser.add_argument("--no-disk", action="store_true", help="skip serialising the bank")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    args.shape = args.shape or ("tiny" if args.smoke else "8b")
    args.personas = args.personas or ([1, 10, 100] if args.smoke else [1, 100, 1000])
    return args


def main(argv: list[str] | None = None) -> int:
    """Measure and report; returns 1 when the metadata target is missed at the largest persona count."""
    args = parse_args(argv)
    if args.smoke:
        torch.set_num_threads(1)
    shape = SHAPES[args.shape]
    out_dir = args.out or default_out_dir("serving")
    out_dir.mkdir(parents=True, exist_ok=True)
    with JsonlWriter(out_dir / "memory.jsonl", device=args.device) as log:
        rows = bench_memory(shape, args.personas, args.device, args.density, args.group_size, log, disk=not args.no_disk)
    return report(rows, out_dir, shape)


def report(rows: list[dict], out_dir: Path, shape: ModelShape) -> int:
    """Print the table and ``memory.png``; 0 when the largest bank's keep_bits meet the 64 MiB target."""
    table = [{**r, "total": human_bytes(r["bytes"]), "per persona": human_bytes(r["bytes_per_persona"])} for r in rows]
    print(f"\n== memory per persona ({shape.name}, G={rows[0]['group_size']}, density {rows[0]['density']}; allocation sizes)")
    print(format_table(table, ["approach", "personas", "total", "per persona", "method"]))
    largest = max(r["personas"] for r in rows)
    bits = next(r for r in rows if r["approach"] == "keep_bits" and r["personas"] == largest)
    ok = bits["bytes"] < METADATA_TARGET_BYTES
    print(f"\nkeep_bits for {largest} personas: {human_bytes(bits['bytes'])} "
          f"({'meets' if ok else 'MISSES'} the < 64 MiB target)")
    at_largest = [r for r in rows if r["personas"] == largest]
    plot_bars([r["approach"] for r in at_largest], [max(r["bytes"], 1) for r in at_largest], out_dir / "memory.png",
              title=f"Bytes for {largest} personas ({shape.name}, G={rows[0]['group_size']})", ylabel="bytes (log)", logy=True,
              annotations=[human_bytes(r["bytes"]) for r in at_largest])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
