"""A short fingerprint of a model's FFN weights, so a mask bank refuses a model it was not made for.

The fingerprint hashes the shapes and a fixed strided sample of every FFN weight, rounded to
bfloat16, so the same checkpoint loaded in fp32 or bf16 gives the same fingerprint while a
different checkpoint (or a fine-tuned one) does not.

fp16 is the exception: rounding to fp16 first and then to bf16 differs from rounding straight to
bf16 in a few percent of values (and fp16 keeps fewer bits of tiny weights), so a checkpoint loaded
in fp16 hashes differently. For that case a bank also keeps a small sample of the weights in fp32
(:func:`ffn_weight_sample`) with the dtype they were read in; when either side is fp16 and the
hashes differ, the samples are compared within rounding (:func:`samples_agree`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

SAMPLES_PER_TENSOR = 4096
CHECK_SAMPLES_PER_TENSOR = 8
"""Values per FFN weight in the precision-tolerant sample (about 3 KB for a 30-layer model)."""


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


def ffn_weight_sample(layers: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, str]:
    """``(values, dtype)``: fp32 values at :data:`CHECK_SAMPLES_PER_TENSOR` fixed, spread positions of
    every FFN weight (positions depend on shapes only), and the dtype the weights are held in."""
    values = []
    for w_gate, w_up, w_down in layers:
        for weight in (w_gate, w_up, w_down):
            flat = weight.detach().reshape(-1)
            last = flat.numel() - 1  # integer positions: float ones round past the end above 2^24 elements
            positions = torch.tensor([i * last // (CHECK_SAMPLES_PER_TENSOR - 1) for i in range(CHECK_SAMPLES_PER_TENSOR)])
            values.append(flat[positions.to(flat.device)].to(device="cpu", dtype=torch.float32))
    dtype = str(layers[0][0].dtype).removeprefix("torch.") if layers else "float32"
    return torch.cat(values) if values else torch.zeros(0), dtype


def samples_agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two :func:`ffn_weight_sample` value sets are one checkpoint in different precisions:
    each pair within two bf16 steps (relative 2^-6) plus fp16's smallest subnormal step."""
    if a.shape != b.shape or a.numel() == 0:
        return False
    return bool(((a - b).abs() <= 2.0**-6 * torch.maximum(a.abs(), b.abs()) + 2.0**-23).all())
