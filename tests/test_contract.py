"""The ``masked_ffn`` contract beyond random values, on every backend.

- Layouts: any ``x`` and weight layout the dispatcher accepts gives the reference's answer, and the
  output is always a fresh row-major tensor (kernels that take a caller's ``out`` write all of it:
  those tests poison it with NaN first).
- Dropped channels contribute exactly nothing, whatever their scale (inf and NaN included).
- Rounding (``reference`` module docstring): checked bit for bit on inputs whose float32 arithmetic
  is exact, so the only rounding left is the one the contract prescribes.
- Tables: scales, gains and bias are float; ``keep_bits`` sets no bit past the last group.

Tolerances follow flash-attn, as in ``test_masked_ffn.check_against_reference``.
"""

from __future__ import annotations

import pytest
import torch

from conftest import device_for, require_backend
from persona_kernels.bank import MaskBank, MaskBankError, PersonaMask
from persona_kernels.bank_io import bank_to_tensors
from persona_kernels.masks import bits_to_keep, channel_keep, keep_to_bits
from persona_kernels.ops import BACKENDS, _masked_ffn_op, masked_ffn
from persona_kernels.reference import masked_ffn_reference
from test_bank import write_raw
from test_masked_ffn import DTYPES, EMPTY_ROW, _seed, check_against_reference, make_inputs, with_output_bias

X_LAYOUTS = ("contiguous", "column_major", "strided_rows", "strided_cols", "offset", "broadcast_rows")
WEIGHT_LAYOUTS = ("contiguous", "stacked_views", "column_major", "offset", "broadcast_rows")
D, D_FF, G = 40, 96, 16


def _nan_buffer(shape, like: torch.Tensor) -> torch.Tensor:
    """NaN-filled (integers: their largest value, an out-of-range id and a bitmap of set bits)."""
    fill = float("nan") if like.is_floating_point() else torch.iinfo(like.dtype).max
    return torch.full(shape, fill, dtype=like.dtype, device=like.device)


def lay_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` (2-D or 3-D, values kept except for ``broadcast_rows``) in ``layout``; gaps hold NaN, which
    a kernel that reads past its view would pick up."""
    if layout == "contiguous":
        return t.contiguous()
    if layout in ("column_major", "stacked_views"):  # every dimension order reversed / the first two swapped
        order = tuple(reversed(range(t.dim()))) if layout == "column_major" else (1, 0, *range(2, t.dim()))
        return t.permute(order).contiguous().permute(order)
    if layout == "strided_rows":  # every other row of a wider buffer
        wide = _nan_buffer((2 * t.shape[0], *t.shape[1:-1], t.shape[-1] + 3), t)
        wide[::2, ..., : t.shape[-1]] = t
        return wide[::2, ..., : t.shape[-1]]
    if layout == "strided_cols":
        wide = _nan_buffer((*t.shape[:-1], 2 * t.shape[-1]), t)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "offset":  # one element into its storage: not 16-byte aligned
        flat = _nan_buffer((t.numel() + 1,), t)
        flat[1:] = t.flatten()
        return flat[1:].view(t.shape)
    if layout == "broadcast_rows":  # stride 0: every row is row 0
        return t[:1].expand(t.shape)
    raise ValueError(f"unknown layout {layout!r}")


def check_fresh_row_major(out: torch.Tensor, inputs: dict) -> None:
    """``out`` is a new row-major ``[T, d]`` tensor sharing no memory with any input."""
    T, d = inputs["x"].shape
    assert out.shape == (T, d) and out.is_contiguous()
    if T > 1:
        assert out.stride() == (d, 1), f"output strides {out.stride()}, expected row-major {(d, 1)}"
    storage = out.untyped_storage().data_ptr()
    for name in ("x", "gate_up", "down_t"):
        assert inputs[name].untyped_storage().data_ptr() != storage, f"output shares memory with {name}"
    assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum().item()} output elements not finite"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", X_LAYOUTS)
@pytest.mark.parametrize("T", [5, 80])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_layouts(backend, dtype, T, layout):
    """Every ``x`` layout, through the dispatcher (T=80 takes the triton and cuda prefill paths)."""
    require_backend(backend)
    inputs = make_inputs(T, D, D_FF, G, "mixed_scales", dtype, device_for(backend), _seed("x layout", dtype, T, layout))
    inputs["x"] = lay_out(inputs["x"], layout)
    out = masked_ffn(**inputs, group_size=G, backend=backend)
    check_fresh_row_major(out, inputs)
    check_against_reference(backend, inputs, G)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", WEIGHT_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_layouts(backend, dtype, layout):
    """Every layout of ``gate_up`` and ``down_t`` (with a column-major ``x`` beside them)."""
    require_backend(backend)
    inputs = make_inputs(7, D, D_FF, G, "mixed_scales", dtype, device_for(backend), _seed("w layout", dtype, layout))
    inputs.update(gate_up=lay_out(inputs["gate_up"], layout), down_t=lay_out(inputs["down_t"], layout),
                  x=lay_out(inputs["x"], "column_major"))
    out = masked_ffn(**inputs, group_size=G, backend=backend)
    check_fresh_row_major(out, inputs)
    check_against_reference(backend, inputs, G)


@pytest.mark.parametrize("backend", BACKENDS)
def test_table_and_id_layouts(backend):
    """Persona ids, bitmaps and the per-persona tables as views (broadcast, strided, transposed)."""
    require_backend(backend)
    inputs = with_output_bias(make_inputs(9, D, D_FF, G, "mixed_scales", torch.float16, device_for(backend),
                                          _seed("tables")), 9)
    P, device = inputs["keep_bits"].shape[0], inputs["x"].device
    inputs.update(
        persona_ids=lay_out(inputs["persona_ids"][:, None], "strided_rows")[:, 0],
        keep_bits=lay_out(inputs["keep_bits"], "strided_rows"),
        scales=lay_out(inputs["scales"], "column_major"),
        input_gains=(torch.rand(1, D, generator=torch.Generator().manual_seed(3)) + 0.5).to(device).expand(P, D),
        output_bias=lay_out(inputs["output_bias"], "strided_cols"),
    )
    out = masked_ffn(**inputs, group_size=G, backend=backend)
    check_fresh_row_major(out, inputs)
    check_against_reference(backend, inputs, G)


def _out_runs(backend: str, dtype: torch.dtype):
    """``(path, run)`` for each kernel path of ``backend`` that takes a caller's ``out``."""
    if backend == "triton":
        from persona_kernels.backends.triton_backend import masked_ffn_triton as run

        paths = ("decode", "prefill")
    else:
        from persona_kernels.backends.cuda_backend import masked_ffn as run

        paths = ("decode", "prefill") if dtype != torch.float32 else ("decode",)
    return [(path, lambda inputs, out, path=path: run(**inputs, group_size=G, activation="silu", path=path, out=out))
            for path in paths]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("layout", X_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_out_buffer_written_in_full(backend, dtype, layout):
    """Each kernel path writes every element of a NaN-poisoned ``out``, whatever ``x``'s layout."""
    require_backend(backend)
    inputs = make_inputs(21, D, D_FF, G, "mixed_scales", dtype, device_for(backend), _seed("out", dtype, layout))
    inputs["x"] = lay_out(inputs["x"], layout)
    args = (inputs["x"], inputs["gate_up"], inputs["down_t"], inputs["persona_ids"], inputs["keep_bits"],
            inputs["scales"], G, "silu")
    oracle = masked_ffn_reference(*args).float()
    noise = (masked_ffn_reference(*args, upcast=False).float() - oracle).abs().max().item()
    bound = 2.0 * noise + 1e-5 * (1.0 + oracle.abs().max().item())
    for path, run in _out_runs(backend, dtype):
        out = _nan_buffer(inputs["x"].shape, inputs["x"])
        assert run(inputs, out) is out
        assert not out.isnan().any(), f"{path}: {out.isnan().sum().item()} output elements never written"
        error = (out.float() - oracle).abs().max().item()
        assert error <= bound, f"{path}: max error {error:.3g} exceeds {bound:.3g}"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("make_out", ["column_major", "broadcast_rows", "wrong_dtype"])
def test_out_buffer_layout_refused(backend, make_out):
    """An ``out`` the kernels cannot write row by row is refused by name, not half written."""
    require_backend(backend)
    inputs = make_inputs(6, D, D_FF, G, "mixed", torch.float32, device_for(backend), 1)
    x = inputs["x"]
    out = torch.empty_like(x, dtype=torch.float16) if make_out == "wrong_dtype" else lay_out(torch.empty_like(x), make_out)
    for path, run in _out_runs(backend, torch.float32):
        with pytest.raises(ValueError, match="out must be"):
            run(inputs, out)


def test_fake_output_is_row_major():
    """Under ``torch.compile`` the op's fake output has the strides of the real one (opcheck)."""
    inputs = make_inputs(6, D, D_FF, G, "mixed_scales", torch.float32, torch.device("cpu"), 2)
    x = lay_out(inputs["x"], "column_major")
    args = (x, inputs["gate_up"], inputs["down_t"], inputs["persona_ids"], inputs["keep_bits"], inputs["scales"],
            G, "silu", "reference")
    torch.library.opcheck(_masked_ffn_op, args, test_utils=("test_faketensor",))


# --- dropped channels contribute nothing, whatever their scale ---------------------------------

def poison_dropped_scales(inputs: dict, value: float) -> dict:
    """``inputs`` with ``value`` as every dropped channel's scale (every channel of the empty persona)."""
    keep = channel_keep(bits_to_keep(inputs["keep_bits"], D_FF // G), G)
    scales = inputs["scales"].clone()
    scales[~keep] = value
    return dict(inputs, scales=scales)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("T", [5, 80])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropped_channel_scales_ignored(backend, dtype, T, value):
    require_backend(backend)
    clean = make_inputs(T, D, D_FF, G, "mixed_scales", dtype, device_for(backend), _seed("dropped", dtype, T))
    clean["persona_ids"][0] = EMPTY_ROW
    poisoned = poison_dropped_scales(clean, value)
    out = masked_ffn(**poisoned, group_size=G, backend=backend)
    assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum().item()} elements not finite"
    check_against_reference(backend, poisoned, G)
    if backend == "reference":  # the spec itself: bit for bit the answer with finite dropped scales
        assert torch.equal(out, masked_ffn(**clean, group_size=G, backend=backend))


# --- rounding, bit for bit ----------------------------------------------------------------------

def exact_inputs(T: int, dtype: torch.dtype, device: torch.device, seed: int) -> tuple[dict, torch.Tensor]:
    """Inputs on which every float32 sum and product is exact, and the output each dtype must give.

    Each gate is 32 (so ``act(gate) = 32`` exactly: sigmoid and tanh round to 1), each ``h`` a small
    integer times a power-of-two scale (exact in bf16), ``down_t`` entries multiples of 2^-8: the
    float32 result is the exact sum, and the contract leaves one rounding, to nearest even in
    ``dtype``, then the bias added in float32 to that rounded output and rounded again. Dropped
    channels carry inf/NaN scales. Persona 0 is dense, 1 empty, 2 and 3 keep half the groups.
    """
    gen = torch.Generator().manual_seed(seed)
    d, d_ff, n_groups = 24, 64, 64 // G
    x = torch.zeros(T, d)
    x[:, 0] = 1.0
    x[:, 1] = torch.randint(0, 3, (T,), generator=gen).float()
    gate_up = torch.zeros(d_ff, 2, d)
    gate_up[:, 0, 0] = 32.0
    gate_up[:, 1, :2] = torch.randint(-4, 5, (d_ff, 2), generator=gen) / 32.0
    down_t = torch.randint(-127, 128, (d_ff, d), generator=gen) / 256.0
    keep = torch.tensor([[True] * n_groups, [False] * n_groups,
                         [True, False] * (n_groups // 2), [False, True] * (n_groups // 2)])
    scales = 2.0 ** torch.randint(-1, 2, (4, d_ff), generator=gen).float()
    dropped = ~keep.repeat_interleave(G, dim=1)
    scales = torch.where(dropped & (torch.arange(d_ff) % 2 == 0), float("inf"), scales)
    scales = torch.where(dropped & (torch.arange(d_ff) % 2 == 1), float("nan"), scales)
    bias = torch.randint(-63, 64, (4, d), generator=gen) / 64.0
    ids = torch.randint(0, 4, (T,), generator=gen)

    h = torch.where(dropped[ids], 0.0, 32.0 * (x.double() @ gate_up[:, 1].double().T) * scales[ids].double())
    y = (h @ down_t.double()).float()  # exact: no term or partial sum needs more than 24 bits
    expected = (y.to(dtype).float() + bias[ids]).to(dtype)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    inputs = dict(x=cast(x), gate_up=cast(gate_up), down_t=cast(down_t), persona_ids=ids.to(device),
                  keep_bits=keep_to_bits(keep).to(device), scales=scales.to(device), output_bias=bias.to(device))
    return inputs, expected.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("T", [5, 80])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rounding_contract_bit_for_bit(backend, dtype, T, activation):
    require_backend(backend)
    inputs, expected = exact_inputs(T, dtype, device_for(backend), _seed("exact", T))
    out = masked_ffn(**inputs, group_size=G, activation=activation, backend=backend)
    mismatches = (out != expected).sum().item()
    assert mismatches == 0, f"{mismatches} of {out.numel()} elements differ from the once-rounded exact result"


# --- table dtypes and bitmap padding -------------------------------------------------------------

@pytest.mark.parametrize("table", ["scales", "input_gains", "output_bias"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool], ids=str)
def test_tables_must_be_float(table, dtype):
    """One rule for the three per-persona tables: a float dtype (any; the kernels read them in fp32)."""
    inputs = make_inputs(3, 16, 64, 16, "mixed_scales", torch.float32, torch.device("cpu"), 11)
    width = 64 if table == "scales" else 16
    inputs[table] = torch.ones(inputs["keep_bits"].shape[0], width, dtype=dtype)
    with pytest.raises(ValueError, match=f"{table} must be float"):
        masked_ffn(**inputs, group_size=16, backend="reference")
    inputs[table] = inputs[table].to(torch.float64)  # any float dtype passes
    masked_ffn(**inputs, group_size=16, backend="reference")


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_bits_refused(backend):
    """A bit set past the last group (96 / 16 = 6 groups, bits 6..31 of the word) is refused by name."""
    require_backend(backend)
    inputs = make_inputs(3, D, D_FF, G, "mixed", torch.float32, device_for(backend), 4)
    inputs["keep_bits"][2, 0] |= 1 << 6
    with pytest.raises(ValueError, match=r"keep_bits sets bits past the last group \(group 5\) in rows \[2\]"):
        masked_ffn(**inputs, group_size=G, backend=backend)
    inputs["keep_bits"][2, 0] &= ~(1 << 6)
    inputs["keep_bits"][0, 0] |= -(1 << 31)  # the sign bit is a padding bit too
    with pytest.raises(ValueError, match=r"in rows \[0\]"):
        masked_ffn(**inputs, group_size=G, backend=backend)


def test_bank_with_padding_bits_refused(tmp_path):
    """Where bitmaps are loaded: a bank file whose bitmaps set a padding bit is refused by name."""
    keep = torch.rand(2, D_FF // G, generator=torch.Generator().manual_seed(5)) < 0.5
    bank = MaskBank("tiny", "f" * 32, 2, D_FF, G, [PersonaMask("a", keep), PersonaMask("b", ~keep)])
    tensors, metadata = bank_to_tensors(bank)
    tensors["bitmaps"][1, 1, 0] |= 1 << (D_FF // G)
    with pytest.raises(MaskBankError, match=r"persona 2 layer 1 set bits past the last group \(group 5\)"):
        MaskBank.load(write_raw(tmp_path / "padded.safetensors", tensors, metadata))
