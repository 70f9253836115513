"""The ``cpu`` backend: the compiled C++/OpenMP kernel in ``persona_kernels._cpu`` (csrc/).

The extension takes raw host pointers (``data_ptr()``) and sizes, so it is independent of the
torch version; this module makes the tensors contiguous, allocates the output and passes them on.
"""

from __future__ import annotations

import torch

from ..contract import output_buffer

try:
    from .. import _cpu  # type: ignore[attr-defined]

    _IMPORT_ERROR = ""
except ImportError as error:  # the extension was not built (no compiler at install time)
    _cpu = None
    _IMPORT_ERROR = str(error)

FUSES_INPUT_GAINS = True  # the kernel multiplies each token by its persona's gains as it loads it
FUSES_OUTPUT_BIAS = True  # and adds its persona's output bias as it stores the result

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def is_available() -> bool:
    """True when the compiled CPU extension imported."""
    return _cpu is not None


def unavailable_reason() -> str:
    """Why the extension is missing, with the fix."""
    return (
        f"the compiled extension persona_kernels._cpu did not import ({_IMPORT_ERROR}); "
        "reinstall with `pip install .` on a machine with a C++17 compiler"
    )


def masked_ffn(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down_t: torch.Tensor,
    persona_ids: torch.Tensor,
    keep_bits: torch.Tensor,
    scales: torch.Tensor | None,
    group_size: int,
    activation: str,
    *,
    input_gains: torch.Tensor | None = None,
    output_bias: torch.Tensor | None = None,
    num_threads: int = 0,
    isa: str = "auto",
) -> torch.Tensor:
    """Run the C++ kernel on CPU tensors (arguments already validated by the dispatcher).

    Semantics: :func:`persona_kernels.reference.masked_ffn_reference` (``input_gains [P, d]``
    included, applied as the kernel loads each token, and ``output_bias [P, d]``, added as it stores). Returns a new row-major ``[T, d]`` tensor in
    ``x.dtype``. ``num_threads=0`` uses OpenMP's default (all cores); ``isa`` picks the inner loops
    (``"auto"``, ``"avx2"`` or ``"generic"``), for tests and benchmarks.
    """
    if _cpu is None:
        raise RuntimeError(unavailable_reason())
    tensors = {"x": x, "gate_up": gate_up, "down_t": down_t, "persona_ids": persona_ids, "keep_bits": keep_bits}
    if scales is not None:
        tensors["scales"] = scales
    if input_gains is not None:
        tensors["input_gains"] = input_gains
    if output_bias is not None:
        tensors["output_bias"] = output_bias
    for name, tensor in tensors.items():
        if tensor.device.type != "cpu":
            raise ValueError(f"the cpu backend needs CPU tensors, got {name} on {tensor.device}")
    if x.dtype not in _DTYPE_NAMES:
        raise ValueError(f"the cpu backend supports float32, float16 and bfloat16, got {x.dtype}")
    x, gate_up, down_t = x.contiguous(), gate_up.contiguous(), down_t.contiguous()
    ids = persona_ids.to(torch.int32).contiguous()
    bits = keep_bits.to(torch.int32).contiguous()
    scales_f32 = None if scales is None else scales.to(torch.float32).contiguous()
    gains_f32 = None if input_gains is None else input_gains.to(torch.float32).contiguous()
    bias_f32 = None if output_bias is None else output_bias.to(torch.float32).contiguous()
    out = output_buffer(x)
    T, d = x.shape
    _cpu.masked_ffn(
        x.data_ptr(), gate_up.data_ptr(), down_t.data_ptr(), ids.data_ptr(), bits.data_ptr(),
        0 if scales_f32 is None else scales_f32.data_ptr(), 0 if gains_f32 is None else gains_f32.data_ptr(),
        0 if bias_f32 is None else bias_f32.data_ptr(),
        out.data_ptr(),
        T, d, gate_up.shape[0], bits.shape[0], group_size, activation, _DTYPE_NAMES[x.dtype],
        num_threads, isa,
    )
    return out
