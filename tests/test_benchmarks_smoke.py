"""The serving benchmarks' ``--smoke`` mode runs on the CPU and its correctness checks pass.

Runs ``python -m benchmarks.bench_serving all --smoke`` in-process once (tiny 2-layer Llama, CPU;
about half a minute), then checks what it wrote: the persona switch moved no weight and every
output after a switch matched the reference; every decode configuration ran and this loop's
tokens equal ``model.generate``'s; the memory lines add up. Plus the shared helpers of
``benchmarks/common.py``. Nothing here asserts speed: the benchmarks report it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

pytest.importorskip("transformers")

from benchmarks import common  # noqa: E402


class FakeGraph:
    """Stands in for a captured CUDA graph on the CPU: ``replay()`` reruns the captured callable."""

    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        self.fn()


def fake_capture_graph(fn, warmup: int = 2) -> FakeGraph:
    """Like :func:`benchmarks.common.capture_graph`: warm-up calls run, the capture itself does not."""
    for _ in range(warmup):
        fn()
    return FakeGraph(fn)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Run the whole serving smoke once, graph branches exercised through :class:`FakeGraph`;
    yield ``(exit code, folder)``."""
    from benchmarks import bench_serving

    threads = torch.get_num_threads()
    folder = tmp_path_factory.mktemp("serving_smoke")
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(common, "capture_graph", fake_capture_graph)
            code = bench_serving.main(["all", "--smoke", "--graph", "on", "--out", str(folder)])
    finally:
        torch.set_num_threads(threads)
    return code, folder


def test_smoke_exit_code_and_summary(smoke_run):
    code, folder = smoke_run
    assert code == 0
    text = (folder / "summary.md").read_text()
    assert "FAIL" not in text
    assert "weight bytes moved by switches" in text


def test_switch_moves_no_weights_and_outputs_match_reference(smoke_run):
    _, folder = smoke_run
    rows = common.read_jsonl(folder / "switch.jsonl")
    kinds = {r["kind"] for r in rows}
    assert {"switch_host", "switch_weights_untouched", "graph_switch_check", "ffn_graph_switch_check",
            "presliced_load", "reslice_device", "lora_swap"} <= kinds
    untouched = [r for r in rows if r["kind"] == "switch_weights_untouched"]
    assert untouched and all(r["param_versions_unchanged"] and r["param_addresses_unchanged"] for r in untouched)
    assert all(r["weight_bytes_moved"] == 0 for r in rows if r["kind"] == "switch_host")
    checks = [r for r in rows if r["kind"] in ("graph_switch_check", "ffn_graph_switch_check")]
    assert len(checks) >= 14 and all(r["ok"] for r in checks)
    assert all(r["graph_captured"] for r in checks)
    assert all(r["err_replay"] <= r["tolerance"] for r in checks if r["kind"] == "graph_switch_check")
    # the check can tell personas apart: switching changes the reference output far beyond the tolerance
    effects = [r["persona_effect_vs_previous"] for r in checks if r.get("persona_effect_vs_previous") is not None]
    assert effects and min(effects) > 10 * checks[0]["tolerance"]


def test_decode_all_configs_ran_and_loop_matches_generate(smoke_run):
    _, folder = smoke_run
    rows = common.read_jsonl(folder / "decode.jsonl")
    timed = [r for r in rows if "mix" in r and "kind" not in r]
    assert timed and all(r.get("tokens_per_s", 0) > 0 and not r.get("error") for r in timed)
    mixes = {r["mix"] for r in timed}
    assert {"dense_model", "identical", "uniform8", "zipf", "distinct", "dense_id0"} <= mixes
    assert all(0 < r["union_density"] <= 1 for r in timed)
    assert all(r["union_density"] == 1 for r in timed if r["mix"] in ("dense_model", "dense_id0"))
    assert all(r["mode"] == "cuda_graph" and r["graph_matches_eager_tokens"] for r in timed)
    check = next(r for r in rows if r.get("kind") == "loop_vs_generate")
    assert check["loop_matches_generate_dense_id0"] and check["loop_matches_generate_uniform8"]


def test_decode_falls_back_to_eager_when_capture_fails(tmp_path):
    """On the CPU a real CUDA-graph capture fails: the configs still run, eagerly, and say why."""
    from benchmarks.serving import decode

    threads = torch.get_num_threads()
    try:
        code = decode.main(["--smoke", "--graph", "on", "--batches", "1", "--mixes", "identical",
                            "--new-tokens", "4", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    rows = common.read_jsonl(tmp_path / "decode.jsonl")
    timed = [r for r in rows if "mix" in r and "kind" not in r]
    assert [(r["mix"], r["variant"]) for r in timed][:2] == [("dense_model", "dense"), ("identical", "attach")]
    assert timed[0]["capture_error"] and all(r["mode"] == "eager" and r["tokens_per_s"] > 0 for r in timed)


def test_memory_lines_add_up(smoke_run):
    from benchmarks.serving.models import SHAPES

    _, folder = smoke_run
    rows = common.read_jsonl(folder / "memory.jsonl")
    shape = SHAPES["tiny"]
    words = -(-(shape.inter // 16) // 32)
    for row in rows:
        if row["approach"] == "keep_bits":
            assert row["bytes"] == shape.layers * (row["personas"] + 1) * words * 4
        if row["approach"] == "scales_table":
            assert row["bytes"] == shape.layers * (row["personas"] + 1) * shape.inter * 4
        if row["approach"] == "lora_r16":
            assert row["bytes"] == row["personas"] * shape.layers * 3 * 16 * (shape.hidden + shape.inter) * 2


def test_thousand_personas_of_8b_fit_metadata_target():
    """The memory target, computed for real: 1000 personas of Llama-3-8B at G=16 in < 64 MiB of bitmaps."""
    from benchmarks.serving.models import SHAPES, make_bank

    bank = make_bank(SHAPES["8b"], 1000, density=0.5, group_size=16, overlap=0.9, seed=0)
    bits = bank.keep_bits("cpu")
    assert tuple(bits.shape) == (32, 1001, 28)
    assert bits.numel() * bits.element_size() < 64 * 2**20


def test_correlated_masks_have_exact_density_and_overlap_ordering():
    from benchmarks.serving.models import correlated_keep

    gen = torch.Generator().manual_seed(0)
    unions = []
    for overlap in (0.0, 0.9, 1.0):
        keep = correlated_keep(8, 2, 128, 0.5, overlap, gen)
        assert (keep.sum(-1) == 64).all()
        unions.append(float(keep.any(0).float().mean()))
    assert unions[0] > unions[1] > unions[2] == 0.5


def test_overlap_union_curve_and_pair_overlap_on_known_masks():
    """Identical masks stream their own density at any batch; disjoint ones add up."""
    from benchmarks.serving.overlap import pair_overlap, union_curve

    gen = torch.Generator().manual_seed(0)
    same = torch.zeros(4, 2, 16, dtype=torch.bool)
    same[:, :, :4] = True
    disjoint = torch.zeros(4, 2, 16, dtype=torch.bool)
    for p in range(4):
        disjoint[p, :, 4 * p : 4 * p + 4] = True
    assert [r["union_density"] for r in union_curve(same, [1, 2, 4, 8], 5, gen)] == [0.25, 0.25, 0.25]
    assert [r["union_density"] for r in union_curve(disjoint, [1, 2, 4], 5, gen)] == [0.25, 0.5, 1.0]
    assert pair_overlap(same) == 1.0 and pair_overlap(disjoint) == 0.0


def test_overlap_script_on_a_bank_file(tmp_path, capsys):
    from benchmarks.serving.models import SHAPES, make_bank
    from benchmarks.serving.overlap import main

    bank_path = tmp_path / "bank.safetensors"
    make_bank(SHAPES["tiny"], 6, density=0.5, group_size=16, overlap=0.9, seed=0).save(bank_path)
    assert main([str(bank_path), "--sizes", "1", "2", "4", "--draws", "20", "--out", str(tmp_path)]) == 0
    rows = common.read_jsonl(tmp_path / "overlap.jsonl")
    assert len(rows) == 6 and {r["masks"].split(":")[0].split(",")[0] for r in rows} == {"bank", "synthetic"}
    for row in rows:
        assert row["union_min"] <= row["union_density"] <= row["union_max"] <= 1.0
        assert row["ffn_speedup_bound"] == pytest.approx(1 / row["union_density"])
    assert "union density" in capsys.readouterr().out
    with pytest.raises(ValueError, match="at least 2 personas"):
        main([str(bank_path), "--method", "no-such-method", "--out", str(tmp_path)])


def test_common_helpers(tmp_path):
    timing = common.summarize([5.0, 1.0, 3.0, 2.0, 4.0], "us")
    assert (timing.median, timing.p20, timing.p80, timing.n) == (3.0, 2.0, 4.0, 5)
    assert timing.as_dict("host")["host_median_us"] == 3.0
    with common.JsonlWriter(tmp_path / "x.jsonl", shared={"card": "test"}) as log:
        log.write({"a": 1, "t": torch.tensor([1, 2]), "nan": float("nan")})
    (tmp_path / "x.jsonl").open("a").write('{"truncated": ')
    assert common.read_jsonl(tmp_path / "x.jsonl") == [{"card": "test", "a": 1, "t": [1, 2], "nan": None}]
    rotating = common.Rotating(lambda: torch.zeros(4), bytes_per_set=16, device="cpu", min_bytes=100)
    assert len(rotating) == 7 and rotating.next() is rotating.sets[0] and rotating.next() is rotating.sets[1]
    assert not common.Deadline(None).expired(1e9) and common.Deadline(-1).expired()
    assert "a" in common.format_table([{"a": 1.5}], ["a"])
    assert common.host_time(lambda: None, n=10, warmup=1).n == 10


def test_gpu_suite_script_parses():
    result = subprocess.run(["bash", "-n", str(REPO_ROOT / "benchmarks" / "gpu_suite.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_kernel_benchmark_smoke_runs_and_checks_every_config(tmp_path):
    """``bench_gpu_kernels.py --smoke`` (Triton interpreter, tiny shapes): every config measured, none failed."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_gpu_kernels.py"), "--smoke",
                             "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["tokens"], r["personas"]) for r in rows] == [(1, 1), (40, 1), (40, 3)]  # priority order
    assert all("error" not in r and r["errors"] == [] and {"dense", "oracle", "ours", "ours_loop", "ours_gains"} <= set(r["ms"])
               for r in rows)
    assert "dense/ours" in result.stdout  # the markdown table


def test_kernel_benchmark_config_order_puts_targets_first():
    from benchmarks.bench_gpu_kernels import config_order

    order = config_order([0.25, 0.5, 0.75], [1, 4, 32], [1, 16, 64, 4096])
    assert order[:4] == [(0.5, 1, 1), (0.5, 1, 4096), (0.5, 32, 64), (0.5, 4, 16)]
    assert all(t >= p for _, p, t in order) and len(order) == len(set(order)) == 3 * (4 + 3 + 2)
    assert {d for d, _, _ in order[:9]} == {0.5}
