"""The CUDA backend against the fp32 reference on a GPU (skipped without one).

Beyond tests/test_masked_ffn.py (which runs ``backend="cuda"`` through the dispatcher on small
shapes, auto path): both kernel paths forced on ragged shapes, the scalar fallback (d % 8 != 0,
strided rows), NaN-poisoned outputs and workspaces (every element written, no workspace read
before written), out-of-range persona ids, real Llama-3-8B FFN shapes, and CUDA-graph replay.
Tolerance: the flash-attn rule of tests/test_masked_ffn.py (2x plain-PyTorch rounding noise).
"""

from __future__ import annotations

import pytest
import torch

from conftest import require_backend
from persona_kernels.backends import cuda_backend
from persona_kernels.masks import keep_to_bits
from persona_kernels.reference import masked_ffn_reference
from test_masked_ffn import CASES, EMPTY_ROW, FLOOR, _seed, make_inputs

pytestmark = pytest.mark.skipif(not cuda_backend.is_available(), reason="needs the cuda backend and a GPU")
CUDA = torch.device("cuda")
LOWP = (torch.float16, torch.bfloat16)


def run(inputs: dict, G: int, path: str, activation: str = "silu", **buffers) -> torch.Tensor:
    """Call the backend directly (no dispatcher) on ``path``."""
    return cuda_backend.masked_ffn(inputs["x"], inputs["gate_up"], inputs["down_t"], inputs["persona_ids"],
                                   inputs["keep_bits"], inputs["scales"], G, activation, path=path, **buffers)


def assert_matches_reference(out: torch.Tensor, inputs: dict, G: int, activation: str = "silu", label: str = "") -> None:
    args = (inputs["x"], inputs["gate_up"], inputs["down_t"], inputs["persona_ids"], inputs["keep_bits"],
            inputs["scales"], G, activation)
    oracle = masked_ffn_reference(*args).float()
    plain = masked_ffn_reference(*args, upcast=False).float()
    out = out.float()
    assert not torch.isnan(out).any(), f"{label}: {torch.isnan(out).sum().item()} NaN outputs (unwritten elements?)"
    error = (out - oracle).abs().max().item()
    bound = max(2.0 * (plain - oracle).abs().max().item(), FLOOR[inputs["x"].dtype] * (1.0 + oracle.abs().max().item()))
    assert error <= bound, f"{label}: max error {error:.3g} exceeds {bound:.3g}"


def poisoned_buffers(inputs: dict, G: int, path: str) -> dict:
    """NaN output and an all-ones-bits workspace (NaN as fp32, fp16 and bf16), so stray reads show."""
    x = inputs["x"]
    nbytes = cuda_backend.workspace_bytes(x.shape[0], x.shape[1], inputs["gate_up"].shape[0],
                                          inputs["keep_bits"].shape[0], G, x.dtype, path)
    return dict(out=torch.full_like(x, float("nan")),
                workspace=torch.full((max(nbytes, 1),), 255, dtype=torch.uint8, device=CUDA))


SMALL_SHAPES = [  # (d, d_ff, G): vector path, G = 1, scalar path (d % 8 != 0), wide groups
    (40, 96, 16), (64, 256, 1), (36, 96, 8), (128, 512, 64),
]


@pytest.mark.parametrize("path", ["decode", "prefill"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("T", [1, 5, 64, 65, 200], ids=lambda T: f"T{T}")
@pytest.mark.parametrize("d,d_ff,G", SMALL_SHAPES, ids=[f"d{d}-ff{f}-G{g}" for d, f, g in SMALL_SHAPES])
@pytest.mark.parametrize("dtype", (torch.float32, *LOWP), ids=str)
def test_paths_match_reference(dtype, d, d_ff, G, T, case, path):
    require_backend("cuda")
    inputs = make_inputs(T, d, d_ff, G, case, dtype, CUDA, _seed("cuda", dtype, d, d_ff, G, T, case))
    if path == "prefill" and dtype == torch.float32:
        with pytest.raises(ValueError, match="prefill path supports float16/bfloat16"):
            run(inputs, G, path)
        return
    out = run(inputs, G, path, **poisoned_buffers(inputs, G, path))
    assert_matches_reference(out, inputs, G, label=f"{path} {dtype} T={T} d={d} d_ff={d_ff} G={G} {case}")
    empty = inputs["persona_ids"] == EMPTY_ROW
    assert torch.equal(out[empty].float(), torch.zeros_like(out[empty].float()))


@pytest.mark.parametrize("path", ["decode", "prefill"])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_activation_and_scales(path, activation):
    inputs = make_inputs(70, 64, 192, 16, "mixed_scales", torch.bfloat16, CUDA, _seed("act", activation))
    out = run(inputs, 16, path, activation=activation)
    assert_matches_reference(out, inputs, 16, activation=activation, label=f"{path} {activation}")


@pytest.mark.parametrize("path", ["decode", "prefill"])
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_strided_rows_and_unaligned_pointer(path, dtype):
    inputs = make_inputs(80, 64, 128, 16, "mixed", dtype, CUDA, _seed("strided", dtype))
    wide = torch.zeros(80, 72, dtype=dtype, device=CUDA)
    wide[:, :64] = inputs["x"]
    inputs["x"] = wide[:, :64]  # row stride 72
    out = run(inputs, 16, path)
    assert_matches_reference(out, inputs, 16, label=f"{path} strided")
    flat = torch.zeros(80 * 64 + 1, dtype=dtype, device=CUDA)
    inputs["x"] = flat[1:].view(80, 64).copy_(wide[:, :64])  # 2-byte offset: scalar fallback
    out = run(inputs, 16, path)
    assert_matches_reference(out, inputs, 16, label=f"{path} unaligned")


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_out_of_range_ids_give_zero_rows(path):
    inputs = make_inputs(100, 64, 128, 16, "mixed", torch.float16, CUDA, _seed("oob"))
    ids = inputs["persona_ids"].clone()
    ids[::7] = 1000
    ids[3::11] = -1
    inputs["persona_ids"] = ids
    out = run(inputs, 16, path, **poisoned_buffers(inputs, 16, path))
    bad = (ids < 0) | (ids >= inputs["keep_bits"].shape[0])
    assert torch.equal(out[bad].float(), torch.zeros_like(out[bad].float()))
    good = ~bad
    sub = dict(inputs, x=inputs["x"][good], persona_ids=ids[good])
    assert_matches_reference(out[good], sub, 16, label="in-range rows")


def real_inputs(T: int, seed: int, n_personas: int = 8, density: float = 0.5):
    """Llama-3-8B FFN (d 4096, d_ff 14336) in bf16, G = 16, mixed personas plus the dense row 0."""
    gen = torch.Generator(device=CUDA).manual_seed(seed)
    d, d_ff, G = 4096, 14336, 16
    keep = torch.rand(n_personas, d_ff // G, generator=gen, device=CUDA) < density
    keep[0] = True
    return dict(
        x=torch.randn(T, d, generator=gen, device=CUDA, dtype=torch.bfloat16),
        gate_up=(torch.randn(d_ff, 2, d, generator=gen, device=CUDA) / d**0.5).to(torch.bfloat16),
        down_t=(torch.randn(d_ff, d, generator=gen, device=CUDA) / d_ff**0.5).to(torch.bfloat16),
        persona_ids=torch.randint(0, n_personas, (T,), generator=gen, device=CUDA),
        keep_bits=keep_to_bits(keep),
        scales=None,
    ), G


@pytest.mark.parametrize("path", ["auto", "decode", "prefill"])
@pytest.mark.parametrize("T", [1, 16, 64, 512], ids=lambda T: f"T{T}")
def test_real_shapes(T, path):
    inputs, G = real_inputs(T, seed=T)
    out = run(inputs, G, path, **poisoned_buffers(inputs, G, cuda_backend.resolve_path(T, torch.bfloat16, path)))
    assert_matches_reference(out, inputs, G, label=f"llama3-8b {path} T={T}")


@pytest.mark.parametrize("path,T", [("decode", 4), ("decode", 33), ("prefill", 256)])
def test_cuda_graph_replay_follows_persona_ids(path, T):
    inputs = make_inputs(T, 128, 512, 16, "mixed_scales", torch.bfloat16, CUDA, _seed("graph", path, T))
    inputs["persona_ids"] = inputs["persona_ids"].to(torch.int32)
    buffers = poisoned_buffers(inputs, 16, path)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run(inputs, 16, path, **buffers)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(inputs, 16, path, **buffers)
    for step in range(3):
        new_ids = torch.randint(0, inputs["keep_bits"].shape[0], (T,), device=CUDA, dtype=torch.int32,
                                generator=torch.Generator(device=CUDA).manual_seed(step))
        inputs["persona_ids"].copy_(new_ids)
        buffers["out"].fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_matches_reference(buffers["out"], inputs, 16, label=f"graph replay {step}")
        eager = run(inputs, 16, path)
        if path == "prefill":  # no atomics: bitwise reproducible
            assert torch.equal(buffers["out"], eager)


def test_dispatcher_runs_cuda_backend():
    inputs = make_inputs(3, 40, 96, 16, "mixed", torch.bfloat16, CUDA, 1)
    from persona_kernels.ops import masked_ffn

    out = masked_ffn(**inputs, group_size=16, backend="cuda")
    assert_matches_reference(out, inputs, 16, label="dispatcher")


def test_build_targets_this_device():
    major, minor = torch.cuda.get_device_capability()
    archs = cuda_backend.build_info()["archs"].split(";")
    assert any(a.rstrip("af") == f"{major}{minor}" for a in archs), f"built for {archs}, device is sm_{major}{minor}"
