"""``masked_ffn``: the one public entry point of the operation, and its backend dispatcher.

Backends live one per module in :mod:`persona_kernels.backends`; each exposes
``is_available() -> bool``, ``unavailable_reason() -> str`` and
``masked_ffn(x, gate_up, down_t, persona_ids, keep_bits, scales, group_size, activation)``
(arguments already validated). A backend that sets ``FUSES_INPUT_GAINS = True`` also takes
``input_gains=`` and applies them itself; for the others the dispatcher multiplies the tokens first
(:func:`~persona_kernels.reference.apply_input_gains`); likewise ``FUSES_OUTPUT_BIAS`` and
``output_bias=``, which the dispatcher otherwise adds after the backend
(:func:`~persona_kernels.reference.apply_output_bias`). The dispatcher picks a backend by device, or
takes ``backend=`` (or the ``PERSONA_KERNELS_BACKEND`` environment variable), and never falls back
silently.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch

from .contract import check_masked_ffn_args, output_buffer
from .reference import apply_input_gains, apply_output_bias, masked_ffn_reference

BACKENDS = ("reference", "cpu", "triton", "cuda")
_MODULES = {
    "reference": "persona_kernels.backends.reference_backend",
    "cpu": "persona_kernels.backends.cpu_backend",
    "triton": "persona_kernels.backends.triton_backend",
    "cuda": "persona_kernels.backends.cuda_backend",
}
_PREFERENCE = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}
_warned: set[str] = set()
_loaded: dict[str, ModuleType] = {}


def backend_module(name: str) -> ModuleType:
    """Import (once) and return the module implementing backend ``name``."""
    if name not in _loaded:
        if name not in _MODULES:
            raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
        _loaded[name] = importlib.import_module(_MODULES[name])
    return _loaded[name]


def _usable(name: str) -> bool:
    try:
        return backend_module(name).is_available()
    except ImportError:
        return False


def available_backends() -> list[str]:
    """Names of the backends usable in this process."""
    return [name for name in BACKENDS if _usable(name)]


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """Choose the backend for tensors on ``device``: ``backend``, else the environment, else the fastest."""
    requested = backend or os.environ.get("PERSONA_KERNELS_BACKEND") or None
    if requested is not None:
        module = backend_module(requested)
        if not module.is_available():
            raise RuntimeError(f"backend {requested!r} is not available: {module.unavailable_reason()}")
        return requested
    preference = _PREFERENCE.get(device.type, ("reference",))
    for name in preference:
        if _usable(name):
            if name != preference[0] and name not in _warned:
                reason = backend_module(preference[0]).unavailable_reason()
                warnings.warn(f"persona_kernels: backend {preference[0]!r} unavailable ({reason}); using {name!r}")
                _warned.add(name)
            return name
    return "reference"


@torch.library.custom_op("persona_kernels::masked_ffn", mutates_args=())
def _masked_ffn_op(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down_t: torch.Tensor,
    persona_ids: torch.Tensor,
    keep_bits: torch.Tensor,
    scales: torch.Tensor | None,
    group_size: int,
    activation: str,
    backend: str,
    input_gains: torch.Tensor | None = None,
    output_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    module = backend_module(backend)
    fused = {}
    if input_gains is not None:
        if getattr(module, "FUSES_INPUT_GAINS", False):
            fused["input_gains"] = input_gains
        else:
            x = apply_input_gains(x, input_gains, persona_ids)
    bias_after = output_bias is not None and not getattr(module, "FUSES_OUTPUT_BIAS", False)
    if output_bias is not None and not bias_after:
        fused["output_bias"] = output_bias
    y = module.masked_ffn(x, gate_up, down_t, persona_ids, keep_bits, scales, group_size, activation, **fused)
    return apply_output_bias(y, output_bias, persona_ids) if bias_after else y


@_masked_ffn_op.register_fake
def _masked_ffn_fake(x, gate_up, down_t, persona_ids, keep_bits, scales, group_size, activation, backend,
                     input_gains=None, output_bias=None):
    return output_buffer(x)


def masked_ffn(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down_t: torch.Tensor,
    persona_ids: torch.Tensor,
    keep_bits: torch.Tensor,
    scales: torch.Tensor | None = None,
    *,
    group_size: int,
    activation: str = "silu",
    backend: str | None = None,
    check_ids: bool = True,
    input_gains: torch.Tensor | None = None,
    output_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked gated FFN over shared packed weights for a batch of mixed personas.

    Semantics: :func:`persona_kernels.reference.masked_ffn_reference`, i.e.
    ``y[t] = sum_c keep[p(t), c // G] * scale[p(t), c] * act(gate_up[c,0].x[t]) * (gate_up[c,1].x[t]) * down_t[c]``.

    Args:
        x: ``[T, d]`` tokens (fp32, fp16 or bf16).
        gate_up: ``[d_ff, 2, d]`` packed gate/up rows, same dtype as ``x``.
        down_t: ``[d_ff, d]`` transposed down projection, same dtype as ``x``.
        persona_ids: ``[T]`` int32/int64, each token's row of ``keep_bits``.
        keep_bits: ``[P, ceil(d_ff / G / 32)]`` int32 group bitmaps (see :mod:`persona_kernels.masks`).
        scales: optional ``[P, d_ff]`` float per-channel scales applied before the down projection
            (only kept channels' scales are read: a dropped channel contributes nothing, even with
            an inf or NaN scale).
        group_size: channels per group ``G`` (divides ``d_ff``).
        activation: ``"silu"`` or ``"gelu_tanh"``.
        backend: ``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"`` or ``None`` to choose.
        check_ids: verify persona ids are in range and ``keep_bits`` sets no padding bit (past
            the last group): one device sync; callers that validated both already, or capture
            CUDA graphs, pass ``False``.
        input_gains: optional ``[P, d]`` float per-persona gains multiplying ``x`` first
            (:func:`~persona_kernels.reference.apply_input_gains`): fused into the token loads of
            the cpu and triton kernels, a separate elementwise pass before the cuda kernels.
        output_bias: optional ``[P, d]`` float per-persona bias added to the output
            (:func:`~persona_kernels.reference.apply_output_bias`): fused into the cpu and triton kernels' stores,
            a separate elementwise pass after the cuda kernels.

    Any layout of ``x`` and of the weights is accepted (strided, transposed, offset or broadcast views).
    Rounding of the intermediates: :mod:`persona_kernels.reference`.

    Returns:
        A new row-major ``[T, d]`` tensor in ``x.dtype``; nothing is modified in place.
    """
    check_masked_ffn_args(x, gate_up, down_t, persona_ids, keep_bits, scales, group_size, activation, check_ids,
                          input_gains, output_bias)
    name = resolve_backend(x.device, backend)
    return _masked_ffn_op(x, gate_up, down_t, persona_ids, keep_bits, scales, group_size, activation, name, input_gains,
                          output_bias)


__all__ = ["masked_ffn", "masked_ffn_reference", "available_backends", "resolve_backend", "BACKENDS"]
