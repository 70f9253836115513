"""The ``cuda`` backend: the CUDA C++ kernels in ``persona_kernels._cuda`` (csrc/masked_ffn/).

The extension takes raw device pointers and a stream handle, so it is built once, without torch
headers, and works with any torch version. This module turns torch tensors into those
arguments: ``data_ptr()``s, ``torch.cuda.current_stream().cuda_stream``, an output and a
workspace allocated with torch (so the caching allocator and CUDA-graph pools apply).

Two kernel paths (``path``, or the ``PERSONA_KERNELS_CUDA_PATH`` environment variable):
``"decode"`` walks the union of the batch's kept groups once (CUDA cores, fp32 accumulation;
every dtype), ``"prefill"`` sorts tokens by persona and runs tensor-core GEMMs over each
persona's kept channels (fp16/bf16). ``"auto"`` (default) takes decode for at most
``build_info()["decode_max_tokens"]`` tokens or float32, else prefill.
"""

from __future__ import annotations

import os

import torch

from ..contract import output_buffer

try:
    from .. import _cuda  # type: ignore[attr-defined]

    _IMPORT_ERROR = ""
except ImportError as error:  # built without nvcc, or PERSONA_KERNELS_CUDA=0
    _cuda = None
    _IMPORT_ERROR = str(error)

PATHS = ("auto", "decode", "prefill")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def is_available() -> bool:
    """True when the compiled extension imported and torch sees a CUDA device."""
    return _cuda is not None and torch.cuda.is_available()


def unavailable_reason() -> str:
    """Which of the two conditions fails, with the fix."""
    if _cuda is None:
        return (f"the compiled extension persona_kernels._cuda did not import ({_IMPORT_ERROR}); reinstall with "
                "nvcc on PATH or CUDA_HOME set (`pip install --no-build-isolation -e .`; "
                "PERSONA_KERNELS_CUDA=1 makes a missing nvcc an error)")
    if not torch.cuda.is_available():
        return f"torch.cuda.is_available() is False (torch {torch.__version__}, built for CUDA {torch.version.cuda})"
    return ""


def build_info() -> dict:
    """CUDA version, target archs and limits the extension was built with."""
    _require_module()
    return dict(_cuda.build_info())


def resolve_path(num_tokens: int, dtype: torch.dtype, path: str | None = None, n_groups: int = 0) -> str:
    """The kernel path (``"decode"`` or ``"prefill"``) a call with these arguments runs on a layer
    of ``n_groups`` channel groups (``auto`` keeps decode past the prefill path's group limit)."""
    _require_module()
    return _cuda.resolve_path(num_tokens, _dtype_name(dtype), _path_name(path), n_groups)


def workspace_bytes(num_tokens: int, d_model: int, d_ff: int, num_personas: int, group_size: int,
                    dtype: torch.dtype, path: str | None = None) -> int:
    """Bytes of device workspace a call needs (depends on sizes and path only, never on masks)."""
    _require_module()
    return _cuda.workspace_bytes(num_tokens, d_model, d_ff, num_personas, group_size, _dtype_name(dtype),
                                 _path_name(path))


def masked_ffn(x, gate_up, down_t, persona_ids, keep_bits, scales, group_size, activation, *,
               path: str | None = None, out: torch.Tensor | None = None,
               workspace: torch.Tensor | None = None) -> torch.Tensor:
    """Run the CUDA kernel (semantics: :func:`persona_kernels.reference.masked_ffn_reference`).

    Arguments are those of :func:`persona_kernels.ops.masked_ffn` (already validated there),
    plus, for callers that manage buffers themselves (CUDA graphs, tests that poison memory):

    Args:
        path: ``"auto"``, ``"decode"`` or ``"prefill"`` (default: ``PERSONA_KERNELS_CUDA_PATH`` or auto).
        out: ``[T, d]`` output of ``x.dtype`` with unit column stride and rows that do not overlap
            (:func:`persona_kernels.contract.output_buffer`), written in full.
        workspace: uint8 device tensor of at least :func:`workspace_bytes` bytes.

    Returns:
        ``out``, or a new row-major ``[T, d]`` tensor when not given.
    """
    _require_module()
    if x.device.type != "cuda":
        raise ValueError(f"the cuda backend needs CUDA tensors, got {x.device}")
    if x.dtype not in _DTYPE_NAMES:
        raise ValueError(f"the cuda backend supports float16, bfloat16 and float32, got {x.dtype}")
    num_tokens, d_model = x.shape
    d_ff = gate_up.shape[0]
    num_personas = keep_bits.shape[0]
    dtype, path_name = _DTYPE_NAMES[x.dtype], _path_name(path)
    out = output_buffer(x, out)
    if num_tokens == 0 or d_model == 0:
        return out
    if x.stride(1) != 1 or (num_tokens > 1 and x.stride(0) < d_model):
        x = x.contiguous()
    # Copies must be bound to names: a temporary's memory is freed (and may be reused by the next
    # copy on this stream) before the kernels below read it.
    gate_up, down_t = gate_up.contiguous(), down_t.contiguous()
    ids = persona_ids.to(torch.int32).contiguous()
    bits = keep_bits.contiguous()
    scales_f32 = None if scales is None else scales.to(device=x.device, dtype=torch.float32).contiguous()
    needed = _cuda.workspace_bytes(num_tokens, d_model, d_ff, num_personas, group_size, dtype, path_name)
    if workspace is None:
        workspace = torch.empty(max(needed, 1), dtype=torch.uint8, device=x.device)
    elif workspace.device != x.device or workspace.dtype != torch.uint8 or workspace.numel() < needed:
        raise ValueError(f"workspace must be a uint8 tensor of at least {needed} bytes on {x.device}")
    with torch.cuda.device(x.device):
        _cuda.masked_ffn(
            x.data_ptr(), gate_up.data_ptr(), down_t.data_ptr(),
            ids.data_ptr(), bits.data_ptr(), 0 if scales_f32 is None else scales_f32.data_ptr(),
            out.data_ptr(), workspace.data_ptr(), workspace.numel(),
            num_tokens, d_model, d_ff, num_personas, group_size,
            _row_stride(x), _row_stride(out), dtype, activation, path_name,
            torch.cuda.current_stream(x.device).cuda_stream,
        )
    return out


def _row_stride(t: torch.Tensor) -> int:
    """Elements between rows (a single row may report any stride)."""
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"the cuda backend supports float16, bfloat16 and float32, got {dtype}")
    return _DTYPE_NAMES[dtype]


def _path_name(path: str | None) -> str:
    name = path or os.environ.get("PERSONA_KERNELS_CUDA_PATH") or "auto"
    if name not in PATHS:
        raise ValueError(f"unknown cuda path {name!r}; expected one of {PATHS}")
    return name


def _require_module() -> None:
    if _cuda is None:
        raise RuntimeError(f"cuda backend unavailable: {unavailable_reason()}")
