"""A short fingerprint of a model's FFN weights, so a mask bank refuses a model it was not made for.

The fingerprint hashes the shapes and a fixed strided sample of every FFN weight, rounded to
bfloat16, so the same checkpoint loaded in fp32, fp16 or bf16 gives the same fingerprint while
a different checkpoint (or a fine-tuned one) does not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

SAMPLES_PER_TENSOR = 4096


def _sample(weight: torch.Tensor) -> bytes:
    flat = weight.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
    picked = flat[::step][:SAMPLES_PER_TENSOR].to(device="cpu", dtype=torch.float32).to(torch.bfloat16)
    return picked.view(torch.int16).numpy().tobytes()


def ffn_fingerprint(layers: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> str:
    """Fingerprint of per-layer ``(W_gate [d_ff, d], W_up [d_ff, d], W_down [d, d_ff])`` in original channel order."""
    digest = hashlib.sha256()
    digest.update(f"layers={len(layers)}".encode())
    for w_gate, w_up, w_down in layers:
        for weight in (w_gate, w_up, w_down):
            digest.update(str(tuple(weight.shape)).encode())
            digest.update(_sample(weight))
    return digest.hexdigest()[:32]
