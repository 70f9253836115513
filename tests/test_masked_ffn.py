"""Every backend of ``masked_ffn`` against the fp32 reference, plus the dispatcher's argument checks.

Tolerance follows flash-attn: a backend's max error against the fp32 oracle
(``masked_ffn_reference(upcast=True)``) must stay within twice the error plain PyTorch makes in
the input dtype (``upcast=False``), or a small per-dtype floor, whichever is larger. Shapes are
small and ragged because the Triton interpreter runs the GPU kernels on the CPU.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from conftest import device_for, require_backend
from persona_kernels.masks import keep_to_bits
from persona_kernels.ops import BACKENDS, masked_ffn
from persona_kernels.reference import apply_input_gains, apply_output_bias, masked_ffn_reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
"""Error floor per dtype, relative to the output's magnitude (1 + max |oracle|)."""
CASES = ("one", "per_token", "dense", "empty", "mixed", "mixed_scales")
DENSE_ROW, EMPTY_ROW = 0, 1


def _seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def make_inputs(T: int, d: int, d_ff: int, G: int, case: str, dtype: torch.dtype, device: torch.device, seed: int):
    """Random weights and tokens plus personas for ``case``; row 0 keeps everything, row 1 nothing."""
    gen = torch.Generator().manual_seed(seed)
    n_groups = d_ff // G
    P = max(T, 2) + 2 if case == "per_token" else 5
    keep = torch.rand(P, n_groups, generator=gen) < 0.5
    keep[DENSE_ROW] = True
    keep[EMPTY_ROW] = False
    if case == "one":
        ids = torch.full((T,), 2)
    elif case == "per_token":
        ids = torch.randperm(P - 2, generator=gen)[:T] + 2
    elif case == "dense":
        ids = torch.full((T,), DENSE_ROW)
    elif case == "empty":
        ids = torch.full((T,), EMPTY_ROW)
    else:
        ids = torch.randint(0, P, (T,), generator=gen)
    scales = None
    if case == "mixed_scales":  # personas with scales beside personas without (rows of ones, as in a bank's table)
        scales = torch.rand(P, d_ff, generator=gen) + 0.5
        scales[::2] = 1.0
    x = torch.randn(T, d, generator=gen)
    gate_up = torch.randn(d_ff, 2, d, generator=gen) / d**0.5
    down_t = torch.randn(d_ff, d, generator=gen) / d_ff**0.5
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return dict(
        x=cast(x), gate_up=cast(gate_up), down_t=cast(down_t),
        persona_ids=ids.to(device=device, dtype=torch.int64),
        keep_bits=keep_to_bits(keep).to(device),
        scales=None if scales is None else scales.to(device),
    )


def check_against_reference(backend: str, inputs: dict, G: int, activation: str = "silu") -> None:
    """Run ``backend`` and assert it matches the oracle within the flash-attn style tolerance."""
    out = masked_ffn(**inputs, group_size=G, activation=activation, backend=backend)
    args = (inputs["x"], inputs["gate_up"], inputs["down_t"], inputs["persona_ids"], inputs["keep_bits"],
            inputs["scales"], G, activation)
    extras = dict(input_gains=inputs.get("input_gains"), output_bias=inputs.get("output_bias"))
    oracle = masked_ffn_reference(*args, **extras).float()
    plain = masked_ffn_reference(*args, upcast=False, **extras).float()
    x = inputs["x"]
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    out = out.float()
    assert not torch.isnan(out).any(), "output contains NaN"
    empty_rows = inputs["persona_ids"] == EMPTY_ROW
    empty_out = torch.zeros_like(x)
    if extras["output_bias"] is not None:  # an empty persona's output is its bias alone
        empty_out = apply_output_bias(empty_out, extras["output_bias"], inputs["persona_ids"])
    assert torch.equal(out[empty_rows], empty_out.float()[empty_rows]), "empty persona rows are not exactly their bias"
    error = (out - oracle).abs().max().item() if out.numel() else 0.0
    noise = (plain - oracle).abs().max().item() if out.numel() else 0.0
    floor = FLOOR[x.dtype] * (1.0 + oracle.abs().max().item() if out.numel() else 1.0)
    bound = max(2.0 * noise, floor)
    assert error <= bound, f"{backend}: max error {error:.3g} exceeds {bound:.3g} (torch {x.dtype} noise {noise:.3g})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("T", [1, 3, 16, 37])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_persona_cases(backend, dtype, T, case):
    require_backend(backend)
    d, d_ff, G = 40, 96, 16
    inputs = make_inputs(T, d, d_ff, G, case, dtype, device_for(backend), _seed(dtype, T, case))
    check_against_reference(backend, inputs, G)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [3, 80])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_views_and_strided_tokens(backend, dtype, T):
    """Weights as callers often hold them (gate/up rows of one ``[2, d_ff, d]`` tensor, the down
    projection's transpose) and tokens with a row stride: a backend that copies the weights must keep
    both copies alive until its kernels have read them (the second copy must not land on the first)."""
    require_backend(backend)
    d, d_ff, G = 40, 96, 16
    inputs = make_inputs(T, d, d_ff, G, "mixed_scales", dtype, device_for(backend), _seed("views", dtype, T))
    inputs["gate_up"] = inputs["gate_up"].transpose(0, 1).contiguous().transpose(0, 1)
    inputs["down_t"] = inputs["down_t"].t().contiguous().t()
    wide = torch.full((T, d + 8), float("nan"), dtype=dtype, device=inputs["x"].device)
    wide[:, :d] = inputs["x"]
    inputs["x"] = wide[:, :d]
    assert not inputs["gate_up"].is_contiguous() and not inputs["down_t"].is_contiguous()
    check_against_reference(backend, inputs, G)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("G", [1, 16, 64])
@pytest.mark.parametrize("d,d_ff", [(16, 64), (40, 96), (64, 192)])
@pytest.mark.parametrize("T", [1, 16])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shapes(backend, dtype, T, d, d_ff, G):
    require_backend(backend)
    if d_ff % G:
        pytest.skip(f"G={G} does not divide d_ff={d_ff}")
    inputs = make_inputs(T, d, d_ff, G, "mixed_scales", dtype, device_for(backend), _seed(dtype, T, d, d_ff, G))
    check_against_reference(backend, inputs, G)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gelu_tanh(backend, dtype):
    require_backend(backend)
    inputs = make_inputs(5, 40, 96, 16, "mixed_scales", dtype, device_for(backend), _seed("gelu", dtype))
    check_against_reference(backend, inputs, 16, activation="gelu_tanh")


def with_input_gains(inputs: dict, seed: int) -> dict:
    """``inputs`` plus random per-persona input gains, rows 0 and 2 left at one (personas without gains)."""
    P, d = inputs["keep_bits"].shape[0], inputs["x"].shape[1]
    gains = torch.rand(P, d, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.25
    gains[0] = gains[2] = 1.0
    return dict(inputs, input_gains=gains.to(inputs["x"].device))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 7, 37])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_input_gains(backend, dtype, T):
    require_backend(backend)
    inputs = make_inputs(T, 40, 96, 16, "mixed_scales", dtype, device_for(backend), _seed("gains", dtype, T))
    check_against_reference(backend, with_input_gains(inputs, T), 16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_input_gains_equal_prescaled_tokens(dtype):
    inputs = make_inputs(9, 40, 96, 16, "mixed_scales", dtype, torch.device("cpu"), _seed("prescaled", dtype))
    gained = with_input_gains(inputs, 3)
    gains = gained["input_gains"][gained["persona_ids"]]
    prescaled = dict(inputs, x=(inputs["x"].float() * gains).to(dtype))
    out = masked_ffn(**gained, group_size=16, backend="reference")
    assert torch.equal(out, masked_ffn(**prescaled, group_size=16, backend="reference"))
    assert not torch.equal(out, masked_ffn(**inputs, group_size=16, backend="reference"))
    ones = dict(inputs, input_gains=torch.ones_like(gained["input_gains"]))
    assert torch.equal(masked_ffn(**ones, group_size=16, backend="reference"), masked_ffn(**inputs, group_size=16, backend="reference"))


def with_output_bias(inputs: dict, seed: int) -> dict:
    """``inputs`` plus a random per-persona output bias, rows 0 and 3 left at zero (personas without one)."""
    P, d = inputs["keep_bits"].shape[0], inputs["x"].shape[1]
    bias = torch.randn(P, d, generator=torch.Generator().manual_seed(seed)) * 0.5
    bias[0] = bias[3] = 0.0
    return dict(inputs, output_bias=bias.to(inputs["x"].device))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["empty", "mixed_scales"])
@pytest.mark.parametrize("T", [1, 7, 37])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_output_bias(backend, dtype, T, case):
    """Mixed personas with and without a bias (and with input gains) in one batch, against the reference."""
    require_backend(backend)
    inputs = make_inputs(T, 40, 96, 16, case, dtype, device_for(backend), _seed("bias", dtype, T, case))
    check_against_reference(backend, with_output_bias(with_input_gains(inputs, T), T), 16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_output_bias_is_added_last(dtype):
    inputs = make_inputs(9, 40, 96, 16, "mixed_scales", dtype, torch.device("cpu"), _seed("bias last", dtype))
    biased = with_output_bias(inputs, 5)
    plain = masked_ffn(**inputs, group_size=16, backend="reference")
    out = masked_ffn(**biased, group_size=16, backend="reference")
    expected = (plain.float() + biased["output_bias"][inputs["persona_ids"]]).to(dtype)
    assert torch.equal(out, expected)
    assert not torch.equal(out, plain)
    zeros = dict(inputs, output_bias=torch.zeros_like(biased["output_bias"]))
    assert torch.equal(masked_ffn(**zeros, group_size=16, backend="reference"), plain)


def _fused_runs(backend: str):
    """``(label, run)`` for each way ``backend`` can apply input gains itself; ``run(inputs, gains)``."""
    if backend == "cpu":
        from persona_kernels.backends import cpu_backend

        return [("cpu", lambda inputs, gains: cpu_backend.masked_ffn(
            **inputs, group_size=16, activation="silu", input_gains=gains, num_threads=1))]
    from persona_kernels.backends.triton_backend import masked_ffn_triton

    return [(path, lambda inputs, gains, path=path: masked_ffn_triton(
        **inputs, group_size=16, input_gains=gains, path=path)) for path in ("decode", "prefill")]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("T", [3, 11, 37])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_gains_equal_prescaled_tokens(backend, dtype, T):
    """A kernel that fuses the gains rounds each gained token to its dtype exactly as the reference does
    (the triton decode path fuses them at T=3 and takes its separate gains pass at T=11 and 37)."""
    require_backend(backend)
    inputs = with_input_gains(make_inputs(T, 40, 96, 16, "mixed_scales", dtype, device_for(backend),
                                          _seed("fused", dtype, T)), 5)
    inputs["persona_ids"][0] = 3  # a persona with gains and kept groups, so the check below sees them at few tokens
    gains = inputs.pop("input_gains")
    prescaled = dict(inputs, x=apply_input_gains(inputs["x"], gains, inputs["persona_ids"]))
    for label, run in _fused_runs(backend):
        fused = run(inputs, gains)
        assert torch.equal(fused, run(prescaled, None)), label
        assert not torch.equal(fused, run(inputs, None)), label


def _bias_runs(backend: str):
    """``(label, run(inputs, output_bias))`` for each way ``backend`` fuses the output bias into its store."""
    if backend == "cpu":
        from persona_kernels.backends import cpu_backend

        # one thread: with more, the order in which workers' partial sums meet varies between calls
        return [("cpu", lambda inputs, bias: cpu_backend.masked_ffn(
            **inputs, group_size=16, activation="silu", output_bias=bias, num_threads=1))]
    from persona_kernels.backends.triton_backend import masked_ffn_triton

    return [(path, lambda inputs, bias, path=path: masked_ffn_triton(
        **inputs, group_size=16, output_bias=bias, path=path)) for path in ("decode", "prefill")]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("d_ff", [96, 512])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_bias_equals_bias_added_after(backend, dtype, d_ff):
    """A kernel that adds the bias as it stores rounds exactly as the reference's separate pass does
    (triton decode at d_ff=512 adds it in the split-K reduction, at 96 in the down kernel's store)."""
    require_backend(backend)
    inputs = with_output_bias(make_inputs(13, 40, d_ff, 16, "mixed_scales", dtype, device_for(backend),
                                          _seed("fused bias", dtype, d_ff)), 7)
    bias = inputs.pop("output_bias")
    for label, run in _bias_runs(backend):
        fused, plain = run(inputs, bias), run(inputs, None)
        assert torch.equal(fused, apply_output_bias(plain, bias, inputs["persona_ids"])), label
        assert not torch.equal(fused, plain), label


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    require_backend(backend)
    inputs = make_inputs(0, 40, 96, 16, "mixed", torch.float32, device_for(backend), 0)
    out = masked_ffn(**inputs, group_size=16, backend=backend)
    assert out.shape == (0, 40) and out.dtype == torch.float32


# --- the compiled CPU extension, called directly ---------------------------------------------

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _cpu_ext():
    require_backend("cpu")
    from persona_kernels import _cpu

    return _cpu


def _raw_call(_cpu, inputs: dict, out_tensor: torch.Tensor, G: int, **overrides):
    x, ids = inputs["x"], inputs["persona_ids"].to(torch.int32).contiguous()
    scales, gains, bias = inputs["scales"], inputs.get("input_gains"), inputs.get("output_bias")
    args = dict(
        x=x.data_ptr(), gate_up=inputs["gate_up"].data_ptr(), down_t=inputs["down_t"].data_ptr(),
        persona_ids=ids.data_ptr(), keep_bits=inputs["keep_bits"].data_ptr(),
        scales=0 if scales is None else scales.data_ptr(), input_gains=0 if gains is None else gains.data_ptr(),
        output_bias=0 if bias is None else bias.data_ptr(), out=out_tensor.data_ptr(),
        num_tokens=x.shape[0], d_model=x.shape[1], d_ff=inputs["gate_up"].shape[0],
        num_personas=inputs["keep_bits"].shape[0], group_size=G, activation="silu",
        dtype=_DTYPE_NAMES[x.dtype],
    )
    args.update(overrides)
    _cpu.masked_ffn(**args)
    return ids  # keep the int32 copy alive until the caller is done


@pytest.mark.parametrize("extras", ["plain", "input_gains", "gains_bias"])
@pytest.mark.parametrize("isa", ["generic", "avx2"])
@pytest.mark.parametrize("T", [1, 7, 37])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_writes_every_output_element(dtype, T, isa, extras):
    _cpu = _cpu_ext()
    if not _cpu.isa_supported(isa):
        pytest.skip(f"isa {isa} not supported on this CPU or build")
    inputs = make_inputs(T, 33, 96, 16, "mixed_scales", dtype, torch.device("cpu"), _seed("nan", dtype, T))
    if extras != "plain":
        inputs = with_input_gains(inputs, T)
    if extras == "gains_bias":
        inputs = with_output_bias(inputs, T)
    out = torch.full_like(inputs["x"], float("nan"))
    _raw_call(_cpu, inputs, out, 16, isa=isa, num_threads=2)
    assert not torch.isnan(out).any(), f"{torch.isnan(out).sum().item()} output elements never written"
    oracle = masked_ffn_reference(**inputs, group_size=16, activation="silu").float()
    plain = masked_ffn_reference(**inputs, group_size=16, activation="silu", upcast=False).float()
    error = (out.float() - oracle).abs().max().item()
    bound = max(2 * (plain - oracle).abs().max().item(), FLOOR[dtype] * (1 + oracle.abs().max().item()))
    assert error <= bound


def test_cpu_thread_counts_agree():
    _cpu = _cpu_ext()
    inputs = make_inputs(16, 64, 192, 16, "mixed_scales", torch.float32, torch.device("cpu"), 7)
    outs = []
    for threads in (1, 2, 3):
        out = torch.full_like(inputs["x"], float("nan"))
        _raw_call(_cpu, inputs, out, 16, num_threads=threads)
        outs.append(out)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(group_size=7), "group_size 7 does not divide d_ff 96"),
        (dict(group_size=0), "group_size 0"),
        (dict(num_personas=2), "persona id out of range"),
        (dict(activation="relu"), "unknown activation"),
        (dict(dtype="float64"), "unsupported dtype"),
        (dict(out=0), "out is a null pointer"),
        (dict(d_model=0), "d_model must be >= 1"),
        (dict(isa="sse9"), "unknown isa"),
    ],
)
def test_cpu_extension_rejects_bad_arguments(overrides, message):
    _cpu = _cpu_ext()
    inputs = make_inputs(4, 16, 96, 16, "one", torch.float32, torch.device("cpu"), 3)
    inputs["persona_ids"][:] = 4
    out = torch.empty_like(inputs["x"])
    with pytest.raises(ValueError, match=message):
        _raw_call(_cpu, inputs, out, 16, **overrides)


# --- dispatcher argument checks -------------------------------------------------------------

def _good_inputs():
    return make_inputs(3, 16, 64, 16, "mixed_scales", torch.float32, torch.device("cpu"), 11)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(x=a["x"][None]), "x must be"),
        (lambda a: a.update(gate_up=a["gate_up"][:, :1]), "gate_up must be"),
        (lambda a: a.update(down_t=a["down_t"][:, :-1]), "down_t must be"),
        (lambda a: a.update(x=a["x"].double()), "dtype"),
        (lambda a: a.update(down_t=a["down_t"].half()), "share a dtype"),
        (lambda a: a.update(persona_ids=a["persona_ids"][:-1]), "persona_ids must be"),
        (lambda a: a.update(persona_ids=a["persona_ids"].float()), "persona_ids must be int32 or int64"),
        (lambda a: a["persona_ids"].__setitem__(0, 5), "persona id out of range"),
        (lambda a: a["persona_ids"].__setitem__(0, -1), "persona id out of range"),
        (lambda a: a.update(keep_bits=a["keep_bits"].long()), "keep_bits must be"),
        (lambda a: a.update(scales=a["scales"][:, :-1]), "scales must be"),
        (lambda a: a.update(input_gains=torch.ones(a["keep_bits"].shape[0], 15)), "input_gains must be"),
        (lambda a: a.update(input_gains=torch.ones(2, 16)), "input_gains must be"),
        (lambda a: a.update(input_gains=torch.ones(a["keep_bits"].shape[0], 16, dtype=torch.int32)), "input_gains must be"),
        (lambda a: a.update(output_bias=torch.zeros(a["keep_bits"].shape[0], 15)), "output_bias must be"),
        (lambda a: a.update(output_bias=torch.zeros(2, 16)), "output_bias must be"),
        (lambda a: a.update(output_bias=torch.zeros(a["keep_bits"].shape[0], 16, dtype=torch.int32)), "output_bias must be"),
    ],
)
def test_dispatcher_rejects_bad_arguments(mutate, message):
    inputs = _good_inputs()
    mutate(inputs)
    with pytest.raises(ValueError, match=message):
        masked_ffn(**inputs, group_size=16, backend="reference")


@pytest.mark.parametrize("G, message", [(0, "group_size 0 does not divide"), (24, "group_size 24 does not divide")])
def test_dispatcher_rejects_bad_group_size(G, message):
    with pytest.raises(ValueError, match=message):
        masked_ffn(**_good_inputs(), group_size=G, backend="reference")


def test_dispatcher_rejects_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation"):
        masked_ffn(**_good_inputs(), group_size=16, activation="relu", backend="reference")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_torch_compile_fullgraph(backend):
    require_backend(backend)
    inputs = _good_inputs()

    def step(x, gate_up, down_t, persona_ids, keep_bits, scales):
        return masked_ffn(x, gate_up, down_t, persona_ids, keep_bits, scales, group_size=16,
                          backend=backend, check_ids=False) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(**inputs), step(**inputs))


@pytest.mark.parametrize("threads", [2, 3])
def test_cpu_correct_when_openmp_gives_fewer_threads(threads):
    """Under ``OMP_THREAD_LIMIT=1`` OpenMP runs a team of one whatever the kernel asks; the partial sums
    of threads that never ran must not be added (they hold an earlier tile's or call's leftovers)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    require_backend("cpu")
    script = f"""
import torch
from test_masked_ffn import make_inputs, _seed
from persona_kernels.backends import cpu_backend
from persona_kernels.reference import masked_ffn_reference
for T in (21, 5, 21):  # a short call between two long ones: stale slices would come back into range
    inputs = make_inputs(T, 64, 256, 16, "mixed_scales", torch.float32, torch.device("cpu"), _seed("team", T))
    args = [inputs[k] for k in ("x", "gate_up", "down_t", "persona_ids", "keep_bits", "scales")]
    out = cpu_backend.masked_ffn(*args, 16, "silu", num_threads={threads})
    error = (out - masked_ffn_reference(*args, 16, "silu")).abs().max().item()
    assert error < 1e-4, f"T={{T}}: max error {{error}}"
print("ok")
"""
    tests_dir = Path(__file__).resolve().parent
    env = {**os.environ, "OMP_THREAD_LIMIT": "1",
           "PYTHONPATH": os.pathsep.join([str(tests_dir.parent), str(tests_dir), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tests_dir, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
