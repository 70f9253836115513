"""Mask bank format: round trips, every malformed-file check by name, atomic saves, model identity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from persona_kernels import bank_io
from persona_kernels.bank import FORMAT_VERSION, MaskBank, MaskBankError, ModelMismatchError, PersonaMask
from persona_kernels.bank_io import _checksum, bank_to_tensors
from persona_kernels.masks import bits_to_keep

N_LAYERS, D_FF, G = 3, 256, 4  # 64 groups per layer -> 2 bitmap words


D_MODEL = 24


def make_bank(n_personas: int = 2, scales: bool = True, permutation: bool = False, seed: int = 0,
              gains: bool = False, bias: bool = False) -> MaskBank:
    gen = torch.Generator().manual_seed(seed)
    personas = []
    for index in range(n_personas):
        keep = torch.rand(N_LAYERS, D_FF // G, generator=gen) < 0.4 + 0.1 * index
        keep[:, 0] = True
        personas.append(
            PersonaMask(
                name=f"persona-{index}",
                keep=keep,
                description=f"Persona number {index}. Speaks tersely.",
                method="test",
                scales=torch.rand(N_LAYERS, D_FF, generator=gen) + 0.5 if scales and index % 2 == 0 else None,
                report={"seed": seed, "index": index},
                input_gains=torch.rand(N_LAYERS, D_MODEL, generator=gen) + 0.5 if gains and index % 2 == 1 else None,
                output_bias=torch.randn(N_LAYERS, D_MODEL, generator=gen) if bias and index != 1 else None,
            )
        )
    perm = torch.stack([torch.randperm(D_FF, generator=gen) for _ in range(N_LAYERS)]) if permutation else None
    return MaskBank("tiny-model", "f" * 32, N_LAYERS, D_FF, G, personas, permutation=perm)


def assert_banks_equal(a: MaskBank, b: MaskBank) -> None:
    assert (a.base_model, a.fingerprint, a.n_layers, a.d_ff, a.group_size) == (b.base_model, b.fingerprint, b.n_layers, b.d_ff, b.group_size)
    assert a.names == b.names
    for pa, pb in zip(a.personas, b.personas):
        assert torch.equal(pa.keep, pb.keep), pa.name
        assert (pa.description, pa.method, pa.report) == (pb.description, pb.method, pb.report)
        assert (pa.scales is None) == (pb.scales is None), pa.name
        if pa.scales is not None:
            kept = pa.keep.repeat_interleave(G, dim=1)
            assert torch.equal(pa.scales[kept], pb.scales[kept]), pa.name  # only kept channels are stored
        for key in ("input_gains", "output_bias"):
            va, vb = getattr(pa, key), getattr(pb, key)
            assert (va is None) == (vb is None), (pa.name, key)
            if va is not None:
                assert torch.equal(va, vb), (pa.name, key)
    assert (a.permutation is None) == (b.permutation is None)
    if a.permutation is not None:
        assert torch.equal(a.permutation, b.permutation)


@pytest.mark.parametrize(
    "n_personas, scales, permutation, gains, bias",
    [(3, True, False, False, False), (2, False, False, False, False), (3, True, True, False, False),
     (0, False, False, False, False), (0, False, True, False, False), (3, True, True, True, False),
     (2, False, False, True, False), (3, True, False, True, True), (2, False, False, False, True)],
    ids=["scales", "no-scales", "permutation", "zero-personas", "zero-personas-permutation", "gains", "gains-only",
         "gains-bias", "bias-only"],
)
def test_round_trip(tmp_path: Path, n_personas: int, scales: bool, permutation: bool, gains: bool, bias: bool) -> None:
    bank = make_bank(n_personas, scales, permutation, gains=gains, bias=bias)
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    loaded = MaskBank.load(path)
    assert_banks_equal(bank, loaded)
    assert torch.equal(bank.keep_bits(), loaded.keep_bits())
    table, loaded_table = bank.scales_table(), loaded.scales_table()
    assert (table is None) == (loaded_table is None)
    if table is not None:
        kept = bits_to_keep(bank.keep_bits(), D_FF // G).repeat_interleave(G, dim=-1)  # [L, P + 1, d_ff]
        assert torch.equal(table[kept], loaded_table[kept])  # scales of dropped channels are not stored
    assert loaded.keep_bits().shape == (N_LAYERS, n_personas + 1, 2)
    assert "persona(s)" in loaded.summary()
    for key, label, present, table, fill in (
        ("input_gains", "input gains", gains, loaded.input_gains_table(), 1.0),
        ("output_bias", "output bias", bias, loaded.output_bias_table(), 0.0),
    ):
        assert (label in loaded.summary()) == present
        assert (table is None) == (not present)
        if present:
            assert table.shape == (N_LAYERS, n_personas + 1, D_MODEL)
            none = torch.full((N_LAYERS, D_MODEL), fill)
            assert torch.equal(table[:, 0], none)  # the dense row
            for index, persona in enumerate(bank.personas):  # a persona without one reads as none
                vector = getattr(persona, key)
                assert torch.equal(table[:, index + 1], none if vector is None else vector), (key, persona.name)


def test_scales_table_dense_row_is_ones() -> None:
    bank = make_bank(2, scales=True)
    table = bank.scales_table()
    assert table is not None and torch.equal(table[:, 0], torch.ones(N_LAYERS, D_FF))
    assert torch.equal(table[:, 2], torch.ones(N_LAYERS, D_FF))  # persona 2 has no scales


# ---- malformed files: each check fires by name (checksums recomputed so they do not mask it) ----


def write_raw(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], recompute: bool = True) -> Path:
    metadata = dict(metadata)
    if recompute:
        metadata["checksum"] = _checksum(tensors, metadata)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def tampered(tmp_path: Path, edit) -> Path:
    tensors, metadata = bank_to_tensors(make_bank(2, scales=True, gains=True, bias=True))
    tensors = {k: v.clone() for k, v in tensors.items()}
    edit(tensors, metadata)
    return write_raw(tmp_path / "bad.safetensors", tensors, metadata)


def _set_first_segment(tensors, fn):
    ids = tensors["kept_groups"]
    stop = int(tensors["kept_offsets"][1])
    assert stop >= 3
    fn(ids[:stop])


def _edit_table(field, value, index=1):
    def edit(tensors, metadata):
        table = json.loads(metadata["personas"])
        table[index][field] = value
        metadata["personas"] = json.dumps(table)

    return edit


BAD_FILES = {
    "duplicate-ids": (lambda t, m: _set_first_segment(t, lambda s: s.__setitem__(1, s[0])), "duplicate or unsorted"),
    "unsorted-ids": (lambda t, m: _set_first_segment(t, lambda s: s.__setitem__(slice(0, 2), s[:2].flip(0).clone())), "duplicate or unsorted"),
    "out-of-range-ids": (lambda t, m: _set_first_segment(t, lambda s: s.__setitem__(-1, D_FF // G)), "out of range"),
    "wrong-group-size": (lambda t, m: m.__setitem__("group_size", str(2 * G)), "wrong group size"),
    "group-size-not-dividing": (lambda t, m: m.__setitem__("group_size", "3"), "does not divide"),
    "bitmap-disagrees": (lambda t, m: t["bitmaps"].__setitem__((0, 0, 1), t["bitmaps"][0, 0, 1] ^ 4), "bitmaps disagree"),
    "format-version": (lambda t, m: m.__setitem__("format_version", str(FORMAT_VERSION + 1)), "format version"),
    "not-a-bank": (lambda t, m: m.__setitem__("format", "something-else"), "not a persona mask bank"),
    "offsets": (lambda t, m: t.__setitem__("kept_offsets", t["kept_offsets"][:-1]), "kept_offsets"),
    "scales-count": (lambda t, m: t.__setitem__("scales", t["scales"][:-1]), "scale"),
    "gains-count": (lambda t, m: t.__setitem__("input_gains", torch.cat([t["input_gains"]] * 2)), "input_gains must be"),
    "gains-dtype": (lambda t, m: t.__setitem__("input_gains", t["input_gains"].double()), "input_gains must be"),
    "gains-nan": (lambda t, m: t["input_gains"].__setitem__((0, 0, 0), float("nan")), "input_gains contain NaN"),
    "gains-missing": (lambda t, m: t.pop("input_gains"), "input_gains tensor is missing"),
    "gains-unflagged": (_edit_table("has_input_gains", False), "no persona is marked has_input_gains"),
    "bias-count": (lambda t, m: t.__setitem__("output_bias", t["output_bias"][:0]), "output_bias must be"),
    "bias-width-missing": (lambda t, m: t.__setitem__("output_bias", t["output_bias"][:, :, 0]), "output_bias must be"),
    "bias-inf": (lambda t, m: t["output_bias"].__setitem__((0, 1, 2), float("inf")), "output_bias contain NaN"),
    "bias-missing": (lambda t, m: t.pop("output_bias"), "output_bias tensor is missing"),
    "bias-unflagged": (_edit_table("has_output_bias", False, index=0), "no persona is marked has_output_bias"),
    "unknown-tensor": (lambda t, m: t.__setitem__("output_gate", torch.zeros(2)), "unknown tensors"),
    "table-ids": (_edit_table("id", 5), "persona table ids"),
    "duplicate-names": (_edit_table("name", "persona-0"), "duplicate persona names"),
    "reserved-name": (_edit_table("name", "dense"), "reserved"),
    "table-entry-no-name": (lambda t, m: m.__setitem__("personas", json.dumps([{"id": 1}, {"id": 2}])), "string name"),
    "table-entry-not-object": (lambda t, m: m.__setitem__("personas", json.dumps(["a", "b"])), "string name"),
    "table-not-list": (lambda t, m: m.__setitem__("personas", json.dumps({"a": 1})), "must be a JSON list"),
    "description-null": (_edit_table("description", None), "description must be a string"),
    "weight-sample-not-base64": (lambda t, m: m.__setitem__("weight_sample", "not base64!"), "weight_sample"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_bank_refused(tmp_path: Path, case: str) -> None:
    edit, message = BAD_FILES[case]
    path = tampered(tmp_path, edit)
    with pytest.raises(MaskBankError, match=message):
        MaskBank.load(path)


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "bank.safetensors"
    make_bank().save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MaskBankError, match="truncated"):
        MaskBank.load(path)


def test_edited_header_fails_checksum(tmp_path: Path) -> None:
    tensors, metadata = bank_to_tensors(make_bank())
    metadata["base_model"] = "another-model"  # checksum not recomputed
    path = write_raw(tmp_path / "bank.safetensors", tensors, metadata, recompute=False)
    with pytest.raises(MaskBankError, match="checksum"):
        MaskBank.load(path)


def test_edited_tensor_bytes_fail_checksum(tmp_path: Path) -> None:
    path = tmp_path / "bank.safetensors"
    make_bank().save(path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # last byte of the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(MaskBankError, match="checksum"):
        MaskBank.load(path)


def test_not_safetensors_and_missing(tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_text("this is not a safetensors file at all, just some text\n")
    with pytest.raises(MaskBankError, match="not a safetensors"):
        MaskBank.load(junk)
    with pytest.raises(MaskBankError, match="does not exist"):
        MaskBank.load(tmp_path / "missing.safetensors")


def test_in_memory_checks() -> None:
    bank = make_bank(1)
    with pytest.raises(MaskBankError, match="reserved"):
        bank.add(PersonaMask("dense", bank.personas[0].keep))
    with pytest.raises(MaskBankError, match="duplicate persona names"):
        MaskBank("m", "f", N_LAYERS, D_FF, G, [bank.personas[0], bank.personas[0]])
    with pytest.raises(MaskBankError, match="keep mask"):
        bank.add(PersonaMask("x", torch.ones(N_LAYERS, 5, dtype=torch.bool)))
    with pytest.raises(MaskBankError, match="does not divide"):
        MaskBank("m", "f", N_LAYERS, D_FF, 3)
    with pytest.raises(MaskBankError, match="not a permutation"):
        MaskBank("m", "f", N_LAYERS, D_FF, G, permutation=torch.zeros(N_LAYERS, D_FF, dtype=torch.long))
    with pytest.raises(MaskBankError, match="not in the bank"):
        bank.persona_id("nobody")
    with pytest.raises(MaskBankError, match="out of range"):
        bank.persona_id(2)
    assert bank.persona_id(None) == bank.persona_id("dense") == 0 and bank.persona_id("persona-0") == 1
    keep = bank.personas[0].keep
    with pytest.raises(MaskBankError, match="input gains must be"):
        bank.add(PersonaMask("x", keep, input_gains=torch.ones(N_LAYERS + 1, D_MODEL)))
    with pytest.raises(MaskBankError, match="input gains contain NaN"):
        bank.add(PersonaMask("x", keep, input_gains=torch.full((N_LAYERS, D_MODEL), float("nan"))))
    bank.add(PersonaMask("x", keep, input_gains=torch.ones(N_LAYERS, D_MODEL)))
    with pytest.raises(MaskBankError, match="disagree on d_model"):
        bank.add(PersonaMask("y", keep, input_gains=torch.ones(N_LAYERS, D_MODEL + 1)))
    bank.add(PersonaMask("x", keep, input_gains=torch.ones(N_LAYERS, D_MODEL + 1)))  # replacing the only one is fine
    assert bank.hidden_width == D_MODEL + 1
    with pytest.raises(MaskBankError, match="disagree on d_model"):
        bank.add(PersonaMask("y", keep, output_bias=torch.zeros(N_LAYERS, D_MODEL)))
    with pytest.raises(MaskBankError, match="output bias contain NaN"):
        bank.add(PersonaMask("y", keep, output_bias=torch.full((N_LAYERS, D_MODEL + 1), float("nan"))))
    with pytest.raises(MaskBankError, match="output bias must be"):
        bank.add(PersonaMask("y", keep, output_bias=torch.zeros(N_LAYERS, D_MODEL + 1, dtype=torch.int64)))
    bank.add(PersonaMask("y", keep, output_bias=torch.zeros(N_LAYERS, D_MODEL + 1)))


# ---- atomic saves ----


@pytest.mark.parametrize("where", ["replace", "write"])
def test_failed_save_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    path = tmp_path / "bank.safetensors"
    make_bank(1, seed=1).save(path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    if where == "replace":
        monkeypatch.setattr(bank_io.os, "replace", boom)
    else:
        monkeypatch.setattr(bank_io.os, "fsync", boom)
    with pytest.raises(OSError, match="simulated"):
        make_bank(3, seed=2).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["bank.safetensors"]  # no temp file left behind
    assert MaskBank.load(path).names == ["persona-0"]


@pytest.mark.parametrize("edit", ["duplicate_name", "reserved_name", "nan_scales", "long_description"])
def test_save_refuses_a_bank_edited_into_an_unloadable_state(tmp_path: Path, edit: str) -> None:
    """Personas edited in place after construction are checked again by ``save``: a bank that
    loading would refuse is never written over a good file."""
    path = tmp_path / "bank.safetensors"
    bank = make_bank(2, seed=3)
    bank.save(path)
    before = path.read_bytes()
    if edit == "duplicate_name":
        bank.personas[1].name = bank.personas[0].name
    elif edit == "reserved_name":
        bank.personas[0].name = "dense"
    elif edit == "nan_scales":
        bank.personas[0].scales[0, 0] = float("nan")
    else:
        bank.personas[0].description = "x" * 5000
    with pytest.raises(MaskBankError):
        bank.save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["bank.safetensors"]


# ---- model identity ----


def test_bank_refuses_other_model() -> None:
    bank = make_bank(1)
    bank.check_model("f" * 32, N_LAYERS, D_FF, "same")
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        bank.check_model("0" * 32, N_LAYERS, D_FF, "other-weights")
    with pytest.raises(ModelMismatchError, match="layers"):
        bank.check_model("f" * 32, N_LAYERS + 1, D_FF, "deeper")
    with pytest.raises(ModelMismatchError, match="d_ff"):
        bank.check_model("f" * 32, N_LAYERS, 2 * D_FF, "wider")
    gained = make_bank(2, gains=True)
    gained.check_model("f" * 32, N_LAYERS, D_FF, "same", D_MODEL)
    with pytest.raises(ModelMismatchError, match="hidden size"):
        gained.check_model("f" * 32, N_LAYERS, D_FF, "other-width", 2 * D_MODEL)
    assert issubclass(ModelMismatchError, MaskBankError)


def test_weight_sample_positions_stay_inside_large_weights() -> None:
    """Sample positions are integers: float ones round past the end of a weight above 2^24
    elements (every FFN matrix of a 3B-or-larger model)."""
    from persona_kernels.fingerprint import CHECK_SAMPLES_PER_TENSOR, ffn_weight_sample

    weight = (torch.arange(2**25) % 1000).float().view(2048, 16384)  # small values: exact in float32
    values, dtype = ffn_weight_sample([(weight, weight, weight.t())])
    assert dtype == "float32" and values.shape == (3 * CHECK_SAMPLES_PER_TENSOR,)
    assert values[0] == 0 and values[CHECK_SAMPLES_PER_TENSOR - 1] == (2**25 - 1) % 1000  # first and last element
