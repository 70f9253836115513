"""The masked gated FFN in plain PyTorch: the specification every backend is tested against.

Semantics (one transformer layer, tokens ``t`` with persona ``p(t)``)::

    h[t, c] = act(gate_up[c, 0] . x[t]) * (gate_up[c, 1] . x[t]) * scale[p(t), c]   # c kept by p(t)
    h[t, c] = 0                                                                        # c dropped
    y[t]    = sum_c h[t, c] * down_t[c]

where channel ``c`` is kept when bit ``c // G`` of the persona's row of ``keep_bits`` is set, and
``scale`` is 1 where no scales are given. The dense persona is simply a row whose bits are all set.
A dropped channel contributes exactly nothing, whatever its scale: an inf or NaN scale there (or an
overflowing ``h``) never reaches the output, because dropping selects zero rather than multiplying
by a zero bit (the kernels never read dropped channels' scales, or select the same way).

Optional per-persona FFN input gains first replace ``x[t]`` by ``x[t] * gain[p(t)]``
(:func:`apply_input_gains`): the cpu and triton kernels fuse this into their token loads; for the
cuda backend the dispatcher applies it first. An optional per-persona FFN output bias is added
last (:func:`apply_output_bias`): the cpu and triton kernels fuse it into their output stores; for
the cuda backend the dispatcher applies it after. Scales, gains and bias are float tables (any float
dtype), read in float32.

Rounding, which every backend follows (``dtype`` is x's dtype; with float32 nothing rounds):

1. gained input: ``x * gain`` in float32, rounded to nearest even in ``dtype``, exactly as
   :func:`apply_input_gains` (the fused kernels give the same bits);
2. gate and up projections: products of ``dtype`` values accumulated in float32, never rounded;
3. activation product: ``act(gate) * up * scale`` in float32 (the scale before any rounding). The
   reference, the cpu kernel and the cuda decode path feed it to the down projection in float32;
   the paths whose down projection runs on 16-bit tensor cores (triton, cuda prefill) round it
   once, to nearest even in ``dtype``. The oracle does not round it: that rounding is part of the
   error the tests allow (twice plain PyTorch's own, which rounds every intermediate);
4. down projection: accumulated in float32 and rounded once, to nearest even in ``dtype``;
5. output bias: added in float32 to that rounded output, and the sum rounded again to ``dtype``.

``masked_ffn_reference(..., upcast=False)`` is not the contract but its yardstick: the same formula
computed in ``dtype`` with every intermediate rounded, as a stock Hugging Face MLP does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import bits_to_keep, channel_keep

ACTIVATIONS = ("silu", "gelu_tanh")


def activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    """Apply the FFN gate activation by name: ``silu`` (Llama family) or ``gelu_tanh`` (Gemma)."""
    if activation == "silu":
        return F.silu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def apply_input_gains(x: torch.Tensor, input_gains: torch.Tensor, persona_ids: torch.Tensor) -> torch.Tensor:
    """``x[t] * input_gains[persona_ids[t]]`` computed in float32 and rounded to ``x.dtype`` (``x [T, d]``, gains ``[P, d]``)."""
    gains = input_gains.index_select(0, persona_ids.long())
    return (x.float() * gains.float()).to(x.dtype)


def apply_output_bias(y: torch.Tensor, output_bias: torch.Tensor, persona_ids: torch.Tensor) -> torch.Tensor:
    """``y[t] + output_bias[persona_ids[t]]`` computed in float32 and rounded to ``y.dtype`` (``y [T, d]``, bias ``[P, d]``)."""
    bias = output_bias.index_select(0, persona_ids.long())
    return (y.float() + bias.float()).to(y.dtype)


def masked_ffn_reference(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down_t: torch.Tensor,
    persona_ids: torch.Tensor,
    keep_bits: torch.Tensor,
    scales: torch.Tensor | None,
    group_size: int,
    activation: str,
    upcast: bool = True,
    input_gains: torch.Tensor | None = None,
    output_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked gated FFN for a batch of tokens of mixed personas.

    Args:
        x: ``[T, d]`` tokens.
        gate_up: ``[d_ff, 2, d]`` packed gate (``[:, 0]``) and up (``[:, 1]``) rows.
        down_t: ``[d_ff, d]`` transposed down projection (row ``c`` is ``W_down[:, c]``).
        persona_ids: ``[T]`` integer row of ``keep_bits`` for each token.
        keep_bits: ``[P, ceil(d_ff / G / 32)]`` int32 bitmap of kept channel groups per persona.
        scales: ``[P, d_ff]`` float per-channel scales, or ``None`` for all ones (dropped channels'
            scales are ignored, whatever their value).
        group_size: channels per group ``G``.
        activation: ``"silu"`` or ``"gelu_tanh"``.
        upcast: compute in float32 (the oracle); ``False`` computes in the input dtype with
            the intermediate rounded like a stock Hugging Face MLP, to measure rounding noise.
        input_gains: ``[P, d]`` float per-persona gains on the input, or ``None`` for all ones.
        output_bias: ``[P, d]`` float per-persona bias added to the rounded output, or ``None``.

    Returns:
        A new row-major ``[T, d]`` tensor in ``x.dtype``.
    """
    if input_gains is not None:
        x = apply_input_gains(x, input_gains, persona_ids)
    d_ff = gate_up.shape[0]
    compute = torch.float32 if upcast else x.dtype
    xc, wgu, wd = x.to(compute), gate_up.to(compute), down_t.to(compute)
    gate = xc @ wgu[:, 0].T
    up = xc @ wgu[:, 1].T
    hidden = activate(gate, activation) * up  # [T, d_ff]
    ids = persona_ids.long()
    if scales is not None:
        hidden = hidden * scales.to(compute)[ids]
    kept = channel_keep(bits_to_keep(keep_bits, d_ff // group_size), group_size)[ids]  # [T, d_ff] bool
    hidden = torch.where(kept, hidden, 0.0)
    out = (hidden @ wd).to(x.dtype)
    return out if output_bias is None else apply_output_bias(out, output_bias, persona_ids)
