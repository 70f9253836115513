"""The CUDA extension builds, links and imports wherever nvcc exists; its host side behaves.

Runs without a GPU: importing a cudart-linked module needs no device, argument errors are
detected on the host (ValueError), and a call on a machine without a device raises a clear
RuntimeError instead of crashing. The extension comes from the installed package when it was
built there, else it is built into a temporary directory with csrc/build_cuda.py (a few
minutes on 2 cores). What needs a GPU lives in tests/gpu/ (see tests/gpu/README.md).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "csrc"))
import build_cuda  # noqa: E402

NVCC = build_cuda.find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA extension cannot be built here")

VALID = dict(  # plausible non-null device addresses: the host checks pass, the device check decides
    x=1 << 20, gate_up=2 << 20, down_t=3 << 20, persona_ids=4 << 20, keep_bits=5 << 20, scales=0,
    out=6 << 20, workspace=7 << 20, workspace_bytes=1 << 30, num_tokens=4, d_model=64, d_ff=128,
    num_personas=3, group_size=16, x_row_stride=64, out_row_stride=64, dtype="bfloat16",
    activation="silu", path="auto", stream=0,
)


@pytest.fixture(scope="module")
def cuda_ext(tmp_path_factory):
    """persona_kernels._cuda: the installed one, else one built into a temporary directory."""
    try:
        from persona_kernels import _cuda

        return _cuda
    except ImportError:
        pass
    so_path = build_cuda.build_standalone(tmp_path_factory.mktemp("cuda_build"))
    loader = importlib.machinery.ExtensionFileLoader("persona_kernels._cuda", str(so_path))
    spec = importlib.util.spec_from_file_location("persona_kernels._cuda", so_path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_build_info_records_toolkit_and_archs(cuda_ext):
    info = cuda_ext.build_info()
    release = re.search(r"release (\d+\.\d+)", subprocess.run([str(NVCC), "--version"], capture_output=True,
                                                               text=True).stdout).group(1)
    assert info["cuda_version"] == release == info["nvcc_version"]
    assert info["archs"] and all(re.fullmatch(r"\d+[af]?", a) for a in info["archs"].split(";"))
    assert info["decode_max_tokens"] >= 1 and set(info["dtypes"]) == {"float32", "float16", "bfloat16"}


def test_extension_links_cudart(cuda_ext):
    if not sys.platform.startswith("linux"):
        pytest.skip("ldd is Linux-only")
    libs = subprocess.run(["ldd", cuda_ext.__file__], capture_output=True, text=True).stdout
    assert re.search(r"libcudart\.so\.\d+ => /", libs), libs


def test_workspace_is_a_function_of_sizes_only(cuda_ext):
    decode = cuda_ext.workspace_bytes(16, 4096, 14336, 8, 16, "bfloat16", "decode")
    # union ids + count + fp32 hidden [d_ff, T] + fp32 accumulator [T, d], each 256-byte aligned
    assert decode == 3584 + 256 + 4 * 14336 * 16 + 4 * 16 * 4096
    prefill = cuda_ext.workspace_bytes(512, 4096, 14336, 8, 16, "bfloat16", "prefill")
    assert prefill >= 2 * 512 * 14336
    assert cuda_ext.workspace_bytes(0, 4096, 14336, 8, 16, "bfloat16") == 0
    assert cuda_ext.resolve_path(1, "bfloat16") == "decode"
    assert cuda_ext.resolve_path(4096, "bfloat16") == "prefill"
    assert cuda_ext.resolve_path(4096, "float32") == "decode"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(x=0), "null pointer"),
        (dict(out=0), "out is a null pointer"),
        (dict(group_size=7), "group_size 7 does not divide d_ff 128"),
        (dict(group_size=0), "group_size 0"),
        (dict(dtype="float64"), "dtype must be"),
        (dict(activation="relu"), "activation must be"),
        (dict(path="fast"), "path must be"),
        (dict(x_row_stride=8), "x_row_stride"),
        (dict(workspace_bytes=16), "needs \\d+ bytes"),
        (dict(workspace=0), "workspace is null"),
        (dict(workspace=(7 << 20) + 64), "256-byte aligned"),
        (dict(num_tokens=-1), ">= 0"),
        (dict(path="prefill", dtype="float32"), "prefill path supports float16/bfloat16"),
    ],
)
def test_bad_arguments_raise_value_error(cuda_ext, overrides, message):
    with pytest.raises(ValueError, match=message):
        cuda_ext.masked_ffn(**{**VALID, **overrides})


def test_call_without_device_raises_runtime_error(cuda_ext):
    if cuda_ext.device_count() > 0:
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cuda_ext.masked_ffn(**VALID)


def test_backend_reports_why_unavailable():
    from persona_kernels.backends import cuda_backend

    if cuda_backend.is_available():
        pytest.skip("the cuda backend runs here")
    reason = cuda_backend.unavailable_reason()
    assert "persona_kernels._cuda" in reason or "torch.cuda.is_available()" in reason
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        from persona_kernels.ops import resolve_backend

        resolve_backend(torch.device("cpu"), "cuda")


def test_arch_override_parsing(monkeypatch):
    monkeypatch.setenv("PERSONA_KERNELS_CUDA_ARCHS", "80; sm_90a,90")
    assert build_cuda.target_archs() == ["80", "90a"]
    assert build_cuda.gencode_flags(["90a"]) == ["-gencode=arch=compute_90a,code=sm_90a"]
    monkeypatch.setenv("PERSONA_KERNELS_CUDA_ARCHS", "75")
    with pytest.raises(RuntimeError, match="sm_80 or newer"):
        build_cuda.target_archs()


def test_toolkit_located():
    toolkit = build_cuda.locate_toolkit(NVCC)
    assert any((Path(d) / "cuda_runtime_api.h").is_file() for d in toolkit.include_dirs)
    assert list(Path(toolkit.library_dir).glob("libcudart.so*"))
