"""The ``cpu`` backend: the compiled C++/OpenMP kernel in ``persona_kernels._cpu`` (csrc/)."""

from __future__ import annotations

import torch

try:
    from .. import _cpu  # type: ignore[attr-defined]

    _IMPORT_ERROR = ""
except ImportError as error:  # the extension was not built (no compiler at install time)
    _cpu = None
    _IMPORT_ERROR = str(error)


def is_available() -> bool:
    """True when the compiled CPU extension imported."""
    return _cpu is not None


def unavailable_reason() -> str:
    """Why the extension is missing, with the fix."""
    return f"the compiled extension persona_kernels._cpu did not import ({_IMPORT_ERROR}); reinstall with `pip install .` and a C++ compiler"


def masked_ffn(x, gate_up, down_t, persona_ids, keep_bits, scales, group_size, activation) -> torch.Tensor:
    """Run the C++ kernel on CPU tensors (made contiguous; ids as int32)."""
    if x.device.type != "cpu":
        raise ValueError(f"the cpu backend needs CPU tensors, got {x.device}")
    out = torch.empty_like(x)
    _cpu.masked_ffn(
        x.contiguous(), gate_up.contiguous(), down_t.contiguous(),
        persona_ids.to(torch.int32).contiguous(), keep_bits.contiguous(),
        None if scales is None else scales.to(torch.float32).contiguous(),
        out, group_size, activation,
    )
    return out
