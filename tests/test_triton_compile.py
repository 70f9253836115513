"""The Triton kernels compile for Hopper (sm_90) without a GPU, and every variant fits the card.

The interpreter tests check what the kernels compute; these run Triton's real compiler and its
bundled ptxas and cuobjdump (``persona_kernels.triton_kernels.compile_check``) in a subprocess without
``TRITON_INTERPRET``, so a kernel that only fails when lowered (a ``tl.dot`` shape, a type the
interpreter accepts, a config no card can hold) fails here instead of on the first GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tools_missing() -> str | None:
    try:
        from triton import knobs

        paths = [knobs.nvidia.ptxas.path, knobs.nvidia.cuobjdump.path]
    except Exception as error:  # triton without its NVIDIA backend
        return f"triton's NVIDIA backend is unavailable: {error}"
    return None if all(p and os.path.exists(p) for p in paths) else "triton ships no ptxas or cuobjdump here"


@pytest.fixture(scope="module")
def sm90_reports(tmp_path_factory) -> list[dict]:
    """One JSON report per kernel variant, from a full ``compile_check --arch 90`` run."""
    reason = _tools_missing()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("compile") / "sm90.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PERSONA_KERNELS_TRITON_AUTOTUNE")}
    result = subprocess.run(
        [sys.executable, "-m", "persona_kernels.triton_kernels.compile_check", "--arch", "90", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, f"compile_check failed:\n{result.stdout}\n{result.stderr[-3000:]}"
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_every_variant_compiles_for_sm90(sm90_reports):
    failed = [(r["kernel"], r["dtype"], r["constexprs"], r["error"]) for r in sm90_reports if not r["ok"]]
    assert not failed
    assert all(r["registers"] > 0 for r in sm90_reports), "cuobjdump reported no registers: its format changed?"


def test_every_kernel_is_checked(sm90_reports):
    """A kernel added to the decode or prefill module must be added to compile_check too."""
    from persona_kernels.triton_kernels import compile_check, decode, prefill

    defined = {f"{m.__name__.rsplit('.', 1)[-1]}.{name}" for m in (decode, prefill) for name in vars(m)
               if name.endswith("_kernel")}
    assert defined == set(compile_check._kernels())
    assert {r["kernel"] for r in sm90_reports} == defined


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_16bit_variants_fit_sm90_without_spills(sm90_reports, dtype):
    """The tensor-core paths (what GPU users run) neither spill nor exceed sm_90's shared memory."""
    from persona_kernels.triton_kernels.compile_check import SHARED_LIMIT_BYTES

    rows = [r for r in sm90_reports if r["dtype"] == dtype]
    assert rows
    spilling = [(r["kernel"], r["constexprs"], r["stack_bytes"]) for r in rows if r["stack_bytes"] or r["local_bytes"]]
    assert not spilling
    too_big = [(r["kernel"], r["constexprs"], r["shared_bytes"]) for r in rows if r["shared_bytes"] > SHARED_LIMIT_BYTES[90]]
    assert not too_big


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_16bit_matmuls_use_tensor_cores_and_16_byte_copies(sm90_reports, dtype):
    """Every tl.dot lowers to tensor-core MMA (Hopper's wgmma at 64-row tiles) and the gate/up
    kernels stream weights with 16-byte asynchronous copies only (no narrow gathers)."""
    rows = [r for r in sm90_reports if r["dtype"] == dtype]
    with_dots = [r for r in rows if not r["kernel"].endswith("reduce_splits_kernel")]
    assert [r["kernel"] for r in with_dots if not r["tensor_core"]] == []
    tiles_of_64 = [r for r in with_dots if r["constexprs"].get("BLOCK_M", r["constexprs"].get("BLOCK_T")) == 64]
    assert tiles_of_64 and all(r["tensor_core"] == "wgmma" for r in tiles_of_64)
    gate_up = [r for r in rows if r["kernel"].endswith("gate_up_kernel") and not r["constexprs"]["HAS_GAINS"]]
    assert gate_up and all(set(r["async_copy_bytes"]) == {"16"} for r in gate_up)


def test_first_config_of_every_kernel_fits_sm90(sm90_reports):
    """Without autotuning (PERSONA_KERNELS_TRITON_AUTOTUNE=0) each kernel runs its first config: it must fit."""
    from persona_kernels.triton_kernels.compile_check import SHARED_LIMIT_BYTES

    first = [r for r in sm90_reports if r["config_index"] == 0]
    assert {r["kernel"] for r in first} == {r["kernel"] for r in sm90_reports}
    assert [(r["kernel"], r["dtype"], r["shared_bytes"]) for r in first if r["shared_bytes"] > SHARED_LIMIT_BYTES[90]] == []


def test_configs_without_autotuning_keep_the_first(monkeypatch):
    from persona_kernels.triton_kernels import common

    monkeypatch.setattr(common, "INTERPRET", False)
    monkeypatch.setattr(common, "AUTOTUNE", False)
    assert common.configs(["first", "second"], "interpreted") == ["first"]
    monkeypatch.setattr(common, "AUTOTUNE", True)
    assert common.configs(["first", "second"], "interpreted") == ["first", "second"]
    monkeypatch.setattr(common, "INTERPRET", True)
    assert common.configs(["first", "second"], "interpreted") == ["interpreted"]


def _report(kernel: str, shared: int, ok: bool = True, block: int = 16):
    from persona_kernels.triton_kernels.compile_check import Report, Variant

    variant = Variant(kernel, "bf16", (("x_ptr", "*bf16"),), (("BLOCK_T", 16), ("BLOCK_C", block)), 4, 3,
                      family=f"{kernel} bf16 {{'BLOCK_T': 16}}")
    return Report(variant, ok=ok, error="" if ok else "CompilationError: boom", shared_bytes=shared, registers=32)


def test_problems_flag_failures_and_families_without_a_fitting_config():
    from persona_kernels.triton_kernels.compile_check import problems, warnings

    limit = 232_448
    fits = [_report("decode.a", 1000, block=16), _report("decode.a", limit + 1, block=32)]
    assert problems(fits, 90) == []
    assert len(warnings(fits, 90)) == 1  # the over-limit config is pruned by the autotuner, so only warned

    none_fit = [_report("decode.a", limit + 1, block=16), _report("decode.a", limit + 2, block=32)]
    assert any("no config fits" in line for line in problems(none_fit, 90))

    broken = [_report("decode.a", 1000, ok=False)]
    found = problems(broken, 90)
    assert any("CompilationError" in line for line in found)


def test_ptx_instructions_reads_tensor_core_family_and_copy_widths():
    from persona_kernels.triton_kernels.compile_check import ptx_instructions

    ptx = """
    cp.async.cg.shared.global [ %r40 + 0 ], [ %rd23 + 0 ], 0x10, %r41;
    cp.async.cg.shared.global [ %r42 + 0 ], [ %rd24 + 0 ], 0x10, %r43;
    cp.async.ca.shared.global [ %r44 + 0 ], [ %rd25 + 0 ], 0x4, %r45;
    wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd1, %rd2, 1, 1, 1, 0, 1;
    """
    assert ptx_instructions(ptx) == {"tensor_core": "wgmma", "async_copy_bytes": {4: 1, 16: 2}}
    assert ptx_instructions("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};")["tensor_core"] == "mma"
    assert ptx_instructions("fma.rn.f32 %f1, %f2, %f3, %f4;") == {"tensor_core": "", "async_copy_bytes": {}}


def test_compile_check_refuses_the_interpreter(monkeypatch):
    from persona_kernels.triton_kernels import compile_check

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit, match="unset TRITON_INTERPRET"):
        compile_check.main(["--quick"])
