"""How much do a bank's persona masks overlap: the union density a mixed batch must stream.

A decode step over a batch of mixed personas reads the union of their kept channel groups, so
its FFN speed-up over dense is bounded by 1 / (union density). For a bank file this prints, for
batches of k distinct personas, the mean union density over random draws, next to the synthetic
masks the serving benchmark uses (:func:`benchmarks.serving.models.correlated_keep` at the same
density and ``--overlap``). That checks the benchmark's mask model against learned masks, and
tells a user what their own personas will cost in a mixed batch. Card-independent (CPU only).

    python -m benchmarks.serving.overlap docs/eval/pruner/pruner-s0.50-full.safetensors

Personas: by default those whose name has no ``@`` (a bank keeps baselines as ``name@method``);
``--method`` picks by the ``method`` recorded in the bank instead. Output: ``overlap.jsonl``,
``overlap.png`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import JsonlWriter, default_out_dir, format_table, plot_series  # noqa: E402
from benchmarks.serving.models import DEFAULT_OVERLAP, correlated_keep  # noqa: E402
from persona_kernels.bank import MaskBank  # noqa: E402


def select_keep(bank: MaskBank, method: str | None = None) -> tuple[list[str], torch.Tensor]:
    """Names and stacked bool masks ``[P, L, n_groups]`` of the bank's personas to study."""
    chosen = [p for p in bank.personas if (p.method == method if method else "@" not in p.name)]
    if len(chosen) < 2:
        what = f"method {method!r}" if method else "names without '@'"
        raise ValueError(f"need at least 2 personas ({what}); the bank has {[p.name for p in bank.personas]}")
    return [p.name for p in chosen], torch.stack([p.keep.bool() for p in chosen])


def union_curve(keep: torch.Tensor, sizes: list[int], draws: int, generator: torch.Generator) -> list[dict]:
    """For each batch size k in ``sizes`` (k <= P): mean, min and max over ``draws`` random sets of
    k distinct personas of the union density (kept groups of the union over all groups, all layers)."""
    n = keep.shape[0]
    rows = []
    for k in sizes:
        if not 1 <= k <= n:
            continue
        values = []
        for _ in range(draws):
            chosen = torch.randperm(n, generator=generator)[:k]
            values.append(float(keep[chosen].any(0).float().mean()))
        rows.append({"personas_in_batch": k, "union_density": sum(values) / len(values),
                     "union_min": min(values), "union_max": max(values)})
    return rows


def pair_overlap(keep: torch.Tensor) -> float:
    """Mean over ordered pairs of distinct personas of |A and B| / |A| (1.0: identical masks)."""
    flat = keep.flatten(1).float()
    shared = flat @ flat.T
    kept = flat.sum(1, keepdim=True).clamp(min=1)
    n = keep.shape[0]
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    return float((shared / kept)[off_diagonal].mean())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bank", type=Path, help="mask bank file (.safetensors)")
    parser.add_argument("--method", help="study the personas with this method (default: names without '@')")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--draws", type=int, default=200, help="random persona sets per size")
    parser.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP,
                        help=f"overlap of the synthetic comparison masks (default {DEFAULT_OVERLAP}, the serving benchmark's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Print and record the union-density curve of the bank's personas and of synthetic masks like them."""
    args = parse_args(argv)
    bank = MaskBank.load(args.bank)
    names, keep = select_keep(bank, args.method)
    n, n_layers, n_groups = keep.shape
    density = float(keep.float().mean())
    generator = torch.Generator().manual_seed(args.seed)
    synthetic = correlated_keep(n, n_layers, n_groups, density, args.overlap, generator)
    out_dir = args.out or default_out_dir("serving")
    rows = []
    with JsonlWriter(out_dir / "overlap.jsonl") as log:
        for label, masks in ((f"bank: {args.bank.name}", keep), (f"synthetic, overlap {args.overlap}", synthetic)):
            common = {"bench": "overlap", "masks": label, "personas": n, "layers": n_layers, "groups": n_groups,
                      "group_size": bank.group_size, "density": round(float(masks.float().mean()), 4),
                      "pair_overlap": round(pair_overlap(masks), 4)}
            for row in union_curve(masks, args.sizes, args.draws, generator):
                rows.append(log.write({**common, **row, "ffn_speedup_bound": 1.0 / row["union_density"]}))
    print(f"\n== union density of mixed batches: {n} personas of {args.bank} ({', '.join(names[:6])}"
          f"{', ...' if n > 6 else ''}), {n_layers} layers x {n_groups} groups of {bank.group_size}, {args.draws} draws")
    table = [{**r, "union": f"{r['union_density']:.3f} [{r['union_min']:.3f}, {r['union_max']:.3f}]",
              "bound": f"{r['ffn_speedup_bound']:.2f}x"} for r in rows]
    print(format_table(table, ["masks", "density", "pair_overlap", "personas_in_batch", "union", "bound"],
                       ["masks", "density", "pair overlap", "k personas", "union density [min, max]", "FFN speed-up bound"]))
    plot_series(rows, "personas_in_batch", "union_density", "masks", out_dir / "overlap.png",
                title="Union density of k distinct personas", xlabel="distinct personas in the batch",
                ylabel="fraction of channel groups streamed", logx=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
