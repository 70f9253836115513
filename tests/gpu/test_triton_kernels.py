"""The Triton backend at real shapes and under CUDA graphs (skipped without a GPU).

Beyond tests/test_triton.py (small shapes, which CI runs through the interpreter): Llama-3-8B FFN
shapes (4096 x 14336, bf16) on both paths, decode with input gains fused (T <= 16) and through the
separate gains pass (T = 64), and a captured step whose persona ids are rewritten between replays.
Tolerance and poisoning: those of tests/test_triton.py.
"""

from __future__ import annotations

import pytest
import torch

from conftest import require_backend
from test_triton import _backend, assert_matches_reference, make_inputs, run_poisoned

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _triton_available():
    require_backend("triton")


LLAMA3_8B = dict(d=4096, d_ff=14336)


@pytest.mark.parametrize("G", [16, 64])
@pytest.mark.parametrize("T,P", [(1, 1), (16, 4), (100, 8), (1024, 3)])
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_llama3_8b_shapes_bf16(path, T, P, G):
    inputs = make_inputs(T, LLAMA3_8B["d"], LLAMA3_8B["d_ff"], G, P, torch.bfloat16, scales=T % 2 == 0, seed=T)
    out = run_poisoned(*inputs, G, "silu", path=path)
    assert_matches_reference(out, *inputs, G, "silu")


@pytest.mark.parametrize("T", [1, 16, 64])
def test_llama3_8b_shapes_bf16_with_input_gains(T):
    """Decode with gains fused (T <= 16) and with the separate gains pass (T = 64), at real shapes."""
    from persona_kernels.reference import apply_input_gains

    x, gate_up, down_t, ids, bits, scales = make_inputs(T, LLAMA3_8B["d"], LLAMA3_8B["d_ff"], 16, 4, torch.bfloat16,
                                                        scales=True, seed=T)
    gains = (torch.rand(4, LLAMA3_8B["d"], generator=torch.Generator().manual_seed(T)) * 1.5 + 0.25).to(x.device)
    out = run_poisoned(x, gate_up, down_t, ids, bits, scales, 16, "silu", path="decode", input_gains=gains)
    assert_matches_reference(out, apply_input_gains(x, gains, ids), gate_up, down_t, ids, bits, scales, 16, "silu")


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_cuda_graph_replay_follows_rewritten_persona_ids(path):
    """Capture prepare + kernels once; rewriting the captured id buffer switches personas on replay."""
    from persona_kernels.step_meta import StepMeta

    be = _backend()
    T, d, d_ff, G, P = (8, 512, 2048, 16, 6) if path == "decode" else (300, 512, 2048, 16, 6)
    x, gate_up, down_t, ids, bits, scales = make_inputs(T, d, d_ff, G, P, torch.bfloat16, scales=True)
    static_ids = ids.clone()
    out = torch.empty_like(x)
    meta = StepMeta.make(T, d_ff // G, P, x.device)

    def step():
        meta.prepare(static_ids, bits)
        be.masked_ffn_triton(x, gate_up, down_t, static_ids, bits, scales, group_size=G, meta=meta, out=out, path=path)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up: compile and autotune outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    gen = torch.Generator().manual_seed(1)
    for trial in range(4):
        new_ids = torch.randint(0, P, (T,), generator=gen) if trial else torch.full((T,), 1)
        static_ids.copy_(new_ids)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        first = out.clone()
        graph.replay()
        assert torch.equal(first, out), "replays of one graph must be bitwise equal"
        assert_matches_reference(out, x, gate_up, down_t, static_ids, bits, scales, G, "silu")


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_rows_past_two_to_the_31_elements(path):
    """x and out as row slices of tensors whose rows lie 2^26 elements apart (as ``h[:, -1, :]`` of a
    long 70B-size activation): row offsets pass 2^31 from token 32 on and must not wrap in int32."""
    T, d, d_ff, G, P = 40, 256, 1024, 16, 3
    x, gate_up, down_t, ids, bits, scales = make_inputs(T, d, d_ff, G, P, torch.bfloat16, scales=True, seed=31)
    row = 1 << 26
    wide_x = torch.empty(T, row, dtype=x.dtype, device=x.device)  # 5.4 GB: the offsets need real memory
    wide_x[:, :d] = x
    wide_out = torch.full((T, row), float("nan"), dtype=x.dtype, device=x.device)
    strided_x, strided_out = wide_x[:, :d], wide_out[:, :d]
    assert T * strided_x.stride(0) > 2**31
    _backend().masked_ffn_triton(strided_x, gate_up, down_t, ids, bits, scales, group_size=G, out=strided_out, path=path)
    assert_matches_reference(strided_out, x, gate_up, down_t, ids, bits, scales, G, "silu")
    del wide_x, wide_out


def test_autotuning_inside_a_graph_capture_is_refused_by_name():
    """A kernel meeting a new autotuning key during capture would time its configs (a device sync)
    inside the graph; the timer refuses with an error that says what to do instead."""
    from persona_kernels.triton_kernels import common

    if not common.AUTOTUNE:
        pytest.skip("autotuning is off (PERSONA_KERNELS_TRITON_AUTOTUNE=0): nothing is timed")
    T, d, d_ff, G, P = 3, 320, 1280, 16, 2  # a shape no other test tunes
    x, gate_up, down_t, ids, bits, scales = make_inputs(T, d, d_ff, G, P, torch.bfloat16, seed=7)
    out = torch.empty_like(x)
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="inside a CUDA-graph capture"):
        with torch.cuda.stream(stream), torch.cuda.graph(graph):
            _backend().masked_ffn_triton(x, gate_up, down_t, ids, bits, scales, group_size=G, out=out, path="decode")
