"""Shared test setup: run Triton kernels through its interpreter on machines without CUDA.

``TRITON_INTERPRET`` must be set before anything imports triton (``triton.jit`` reads it when a
kernel is decorated), hence at the top of this file, which pytest imports before any test module.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from persona_kernels.ops import backend_module  # noqa: E402

GPU_BACKENDS = ("triton", "cuda")


def device_for(backend: str) -> torch.device:
    """The device a backend's tests run on: CUDA for the GPU backends when a GPU exists, else CPU."""
    if backend in GPU_BACKENDS and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def backend_unavailable_reason(backend: str) -> str | None:
    """``None`` when ``backend`` runs here, else why not (a missing module counts as unavailable)."""
    try:
        module = backend_module(backend)
    except ImportError as error:
        return f"backend module not importable: {error}"
    if not module.is_available():
        return module.unavailable_reason()
    return None


def require_backend(backend: str) -> None:
    """Skip the calling test, with the backend's own reason, when ``backend`` cannot run here."""
    reason = backend_unavailable_reason(backend)
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")
