"""Triton-specific tests: both kernel paths against the reference, StepMeta against plain Python,
per-layer metadata reuse. Real Llama-3-8B shapes and CUDA-graph replay (GPU only) are in
``tests/gpu/test_triton_kernels.py``.

On CPU the kernels run through the Triton interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py`` before triton is imported), so shapes stay tiny there.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # also when this file runs without tests/conftest.py
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from persona_kernels.masks import bits_to_keep, keep_to_bits  # noqa: E402
from persona_kernels.reference import masked_ffn_reference  # noqa: E402
from conftest import device_for, require_backend  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _triton_available():
    require_backend("triton")


def _backend():
    from persona_kernels.backends import triton_backend

    return triton_backend


def make_inputs(T, d, d_ff, G, P, dtype, *, scales=False, ids=None, keep=None, seed=0):
    """Fresh random inputs on the triton test device; persona 0 is dense, persona 1 keeps nothing.

    Drawn on that device (a GPU draws real shapes in milliseconds; the CPU would copy ~700 MB)."""
    device = device_for("triton")
    gen = torch.Generator(device=device).manual_seed(seed)
    n_groups = d_ff // G
    x = torch.randn(T, d, generator=gen, device=device)
    gate_up = torch.randn(d_ff, 2, d, generator=gen, device=device) / d**0.5
    down_t = torch.randn(d_ff, d, generator=gen, device=device) / (d_ff / 4) ** 0.5
    if keep is None:
        keep = torch.rand(P, n_groups, generator=gen, device=device) < 0.5
        keep[0] = True
        if P > 1:
            keep[1] = False
    if ids is None:
        ids = torch.randint(0, P, (T,), generator=gen, device=device)
    s = torch.rand(P, d_ff, generator=gen, device=device) + 0.5 if scales else None
    to = lambda t: t.to(device)  # noqa: E731
    return (
        to(x).to(dtype), to(gate_up).to(dtype), to(down_t).to(dtype), to(ids),
        to(keep_to_bits(keep)), None if s is None else to(s),
    )


def assert_matches_reference(out, x, gate_up, down_t, ids, bits, scales, G, activation):
    """Error vs the fp32 oracle within 2x the low-precision reference's own error, plus an output-rounding floor."""
    assert not out.isnan().any(), "some output elements were never written"
    args = (x, gate_up, down_t, ids, bits, scales, G, activation)
    ref = masked_ffn_reference(*args).float()
    noise = (masked_ffn_reference(*args, upcast=False).float() - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    floor = 1e-5 * scale if x.dtype == torch.float32 else 2 * torch.finfo(x.dtype).eps * scale
    err = (out.float() - ref).abs().max().item()
    assert err <= 2 * noise + floor, f"max error {err:.3e} > 2 * {noise:.3e} + {floor:.3e} ({x.dtype})"


def run_poisoned(x, gate_up, down_t, ids, bits, scales, G, activation, **kwargs):
    """Call the launcher into a NaN-filled ``out=`` buffer and return it."""
    out = torch.full_like(x, float("nan"))
    result = _backend().masked_ffn_triton(
        x, gate_up, down_t, ids, bits, scales, group_size=G, activation=activation, out=out, **kwargs
    )
    assert result is out
    return out


# name: (T, d, d_ff, G, P, scales, activation, ids rule)
CASES = {
    "one_token": (1, 64, 256, 16, 4, False, "silu", None),
    "ragged5_g64": (5, 64, 512, 64, 3, True, "gelu_tanh", None),
    "ragged37_d80": (37, 80, 256, 16, 5, True, "silu", None),
    "every_token_own_persona": (9, 64, 256, 16, 9, False, "gelu_tanh", "distinct"),
    "dense_and_empty_d160": (20, 160, 512, 64, 3, True, "silu", "dense_empty"),
    "only_empty_persona": (6, 64, 256, 16, 3, False, "silu", "empty"),
}


def _ids(rule, T, P):
    if rule == "distinct":
        return torch.randperm(P)[:T]
    if rule == "dense_empty":
        return torch.arange(T) % 2
    if rule == "empty":
        return torch.ones(T, dtype=torch.long)
    return None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_kernel_paths_match_reference(path, case, dtype):
    T, d, d_ff, G, P, scales, activation, rule = CASES[case]
    inputs = make_inputs(T, d, d_ff, G, P, dtype, scales=scales, ids=_ids(rule, T, P), seed=list(CASES).index(case))
    out = run_poisoned(*inputs, G, activation, path=path)
    assert_matches_reference(out, *inputs, G, activation)


def test_backend_contract_auto_path_and_strided_x():
    """The ops-level entry picks a path itself; a row-strided ``x`` and int32 ids work."""
    be = _backend()
    for T, expect in ((5, "decode"), (80, "prefill")):
        assert be.choose_path(T, 2) == expect
        x, gate_up, down_t, ids, bits, scales = make_inputs(T, 48, 256, 16, 2, torch.float32, scales=True, seed=T)
        wide = torch.cat([x, x[:, :16]], dim=1)
        x_strided = wide[:, :48]
        out = be.masked_ffn(x_strided, gate_up, down_t, ids.to(torch.int32), bits, scales, 16, "silu")
        assert_matches_reference(out, x, gate_up, down_t, ids, bits, scales, 16, "silu")


def test_choose_path_rule():
    be = _backend()
    assert be.choose_path(1, 1000) == "decode"
    assert be.choose_path(64, 1) == "decode"
    assert be.choose_path(65, 1) == "prefill"
    assert be.choose_path(512, 64) == "decode"  # mixed batch, short segments
    assert be.choose_path(4096, 64) == "prefill"


def _python_meta(ids, keep, block_m):
    """StepMeta's contents computed the obvious way, for comparison."""
    T = len(ids)
    order = sorted(range(T), key=lambda t: (ids[t], t))
    personas = sorted(set(ids))
    starts = [order.index(next(t for t in order if ids[t] == p)) for p in personas]
    bounds = starts + [T]
    tiles = [(s, r) for s in range(len(personas)) for r in range(bounds[s], bounds[s + 1], block_m)]
    per_layer = []
    for layer_keep in keep:
        slot_lists = [[g for g in range(layer_keep.shape[1]) if layer_keep[p, g]] for p in personas]
        union = sorted(set().union(*map(set, slot_lists)))
        per_layer.append((slot_lists, union))
    return order, personas, starts, tiles, per_layer


@pytest.mark.parametrize("T,P,block_m", [(23, 7, 16), (1, 3, 16), (40, 2, 32)])
def test_step_meta_prepare_matches_python(T, P, block_m):
    from persona_kernels.step_meta import StepMeta

    L, n_groups = 2, 40
    device = device_for("triton")
    meta = StepMeta.make(64, n_groups, P, device, n_layers=L, block_m=block_m)
    gen = torch.Generator().manual_seed(T)
    for step in range(2):  # the second prepare must fully overwrite the first
        ids = torch.randint(0, P, (T,), generator=gen)
        keep = torch.rand(L, P, n_groups, generator=gen) < 0.3
        meta.prepare(ids.to(device), keep_to_bits(keep).to(device))
        order, personas, starts, tiles, per_layer = _python_meta(ids.tolist(), keep, block_m)
        n_slots = len(personas)
        assert meta.n_tokens == T
        assert meta.token_order[:T].tolist() == order
        assert meta.token_ids[:T].tolist() == ids.tolist()
        assert meta.n_slots.item() == n_slots
        assert meta.slot_persona[:n_slots].tolist() == personas
        assert meta.slot_start[:n_slots].tolist() == starts
        assert (meta.slot_start[n_slots:] == T).all()
        n_tiles = meta.n_tiles.item()
        assert n_tiles == len(tiles)
        assert list(zip(meta.tile_slot[:n_tiles].tolist(), meta.tile_start[:n_tiles].tolist())) == tiles
        for layer, (slot_lists, union) in enumerate(per_layer):
            count = meta.union_count[layer].item()
            assert meta.union_ids[layer, :count].tolist() == union
            for s, kept in enumerate(slot_lists):
                assert meta.slot_ids[layer, s, : meta.slot_count[layer, s].item()].tolist() == kept


def test_step_meta_max_slots_bounds_lists_not_results():
    """``max_slots`` shrinks the per-slot buffers to the step's persona bound and changes nothing a
    step within the bound reads; a non-positive bound is refused."""
    from persona_kernels.step_meta import StepMeta

    L, n_groups, P, T = 2, 24, 50, 23
    device = device_for("triton")
    gen = torch.Generator().manual_seed(11)
    ids = torch.tensor([[3, 41, 7, 22][i % 4] for i in torch.randperm(T, generator=gen).tolist()]).to(device)
    bits = keep_to_bits(torch.rand(L, P, n_groups, generator=gen) < 0.4).to(device)
    free = StepMeta.make(T, n_groups, P, device, n_layers=L, block_m=16).prepare(ids, bits)
    bounded = StepMeta.make(T, n_groups, P, device, n_layers=L, block_m=16, max_slots=4).prepare(ids, bits)
    assert free.max_slots == T and bounded.max_slots == 4 and bounded.slot_ids.shape == (L, 4, n_groups)
    n = 4
    assert bounded.n_slots.item() == free.n_slots.item() == n
    for name in ("token_ids", "token_order", "union_count"):
        assert torch.equal(getattr(bounded, name), getattr(free, name)), name
    assert torch.equal(bounded.slot_persona, free.slot_persona[:n])
    assert torch.equal(bounded.slot_start[:n], free.slot_start[:n])
    assert torch.equal(bounded.slot_ids, free.slot_ids[:, :n]) and torch.equal(bounded.slot_count, free.slot_count[:, :n])
    tiles = free.n_tiles.item()
    assert bounded.n_tiles.item() == tiles
    assert torch.equal(bounded.tile_slot[:tiles], free.tile_slot[:tiles])
    assert torch.equal(bounded.tile_start[:tiles], free.tile_start[:tiles])
    with pytest.raises(ValueError, match="max_slots"):
        StepMeta.make(T, n_groups, P, device, max_slots=0)


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_one_meta_serves_every_layer(path):
    """A StepMeta prepared with ``[L, P, W]`` bitmaps drives each layer's call by index."""
    from persona_kernels.step_meta import StepMeta

    T, d, d_ff, G, P, L = 21, 64, 256, 16, 4, 2
    device = device_for("triton")
    x, gate_up, down_t, ids, _, scales = make_inputs(T, d, d_ff, G, P, torch.float16, scales=True)
    keep = torch.rand(L, P, d_ff // G, generator=torch.Generator().manual_seed(5)) < 0.4
    bits = keep_to_bits(keep).to(device)
    meta = StepMeta.make(32, d_ff // G, P, device, n_layers=L, block_m=16).prepare(ids, bits)
    for layer in range(L):
        out = run_poisoned(x, gate_up, down_t, ids, bits[layer], scales, G, "silu", meta=meta, layer=layer, path=path)
        assert_matches_reference(out, x, gate_up, down_t, ids, bits[layer], scales, G, "silu")


def test_launcher_rejects_mismatched_meta_and_out():
    from persona_kernels.step_meta import StepMeta

    be = _backend()
    x, gate_up, down_t, ids, bits, _ = make_inputs(4, 32, 128, 16, 2, torch.float32)
    decode_only = StepMeta.make(8, 8, 2, x.device, prefill=False).prepare(ids, bits)
    with pytest.raises(ValueError, match="prefill=True"):
        be.masked_ffn_triton(x, gate_up, down_t, ids, bits, group_size=16, meta=decode_only, path="prefill")
    with pytest.raises(ValueError, match="prepared for 4 tokens"):
        be.masked_ffn_triton(x[:3], gate_up, down_t, ids[:3], bits, group_size=16, meta=decode_only)
    with pytest.raises(ValueError, match="out must be"):
        be.masked_ffn_triton(x, gate_up, down_t, ids, bits, group_size=16, out=torch.empty(4, 31))


def test_autotuner_timer_refuses_inside_a_graph_capture(monkeypatch):
    """Every autotuned kernel times its configs with ``time_configs``, which names the fix instead of
    letting a device sync break a CUDA-graph capture."""
    from persona_kernels.triton_kernels import common, decode, prefill

    tuned = [decode.decode_gate_up_kernel, decode.decode_down_kernel, prefill.prefill_gate_up_kernel,
             prefill.prefill_down_kernel]
    assert all(kernel._do_bench is common.time_configs for kernel in tuned)
    monkeypatch.setattr(common, "_capturing", lambda: True)
    calls = []
    with pytest.raises(RuntimeError, match="inside a CUDA-graph capture.*eager step"):
        common.time_configs(lambda: calls.append(1), quantiles=(0.5, 0.2, 0.8))
    assert not calls, "no config may run inside the capture"
