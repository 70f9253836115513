"""The masked MLP module: a decoder layer's gated FFN run by :func:`persona_kernels.masked_ffn` over the
layer's packed shared weights, for the persona each token's batch row has in the shared
:class:`~persona_kernels.hf.persona_state.PersonaState`."""

from __future__ import annotations

import torch
from torch import nn

from ..layout import PackedFFN, unpack_ffn
from ..ops import masked_ffn
from .persona_state import PersonaState


class MaskedMLP(nn.Module):
    """A gated MLP computed by :func:`persona_kernels.masked_ffn` over packed shared weights.

    Parameters ``gate_up [d_ff, 2, d]`` and ``down_t [d_ff, d]`` are the layer's packed weights (in the
    bank's permuted channel order when it has a permutation); buffers ``keep_bits [P + 1, words]``,
    ``scales [P + 1, d_ff]``, ``input_gains [P + 1, d]`` and ``output_bias [P + 1, d]`` (the last three
    may be ``None``) are this layer's slice of the bank; ``persona_state`` is the model-wide
    :class:`PersonaState`.
    """

    def __init__(
        self,
        packed: PackedFFN,
        keep_bits: torch.Tensor,
        scales: torch.Tensor | None,
        state: PersonaState,
        group_size: int,
        permutation: torch.Tensor | None = None,
        backend: str | None = None,
        original: nn.Module | None = None,
        layer_index: int = 0,
        input_gains: torch.Tensor | None = None,
        output_bias: torch.Tensor | None = None,
    ):
        super().__init__()
        self.gate_up = nn.Parameter(packed.gate_up, requires_grad=False)
        self.down_t = nn.Parameter(packed.down_t, requires_grad=False)
        self.register_buffer("keep_bits", keep_bits, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("input_gains", input_gains, persistent=False)
        self.register_buffer("output_bias", output_bias, persistent=False)
        self.register_buffer("permutation", permutation, persistent=False)
        self.persona_state = state
        self.activation = packed.activation
        self.group_size = group_size
        self.backend = backend
        self.layer_index = layer_index
        # The emptied original MLP, kept (unregistered) so detach_bank can restore it.
        object.__setattr__(self, "_original", original)

    FLOAT32_TABLES = ("scales", "input_gains", "output_bias")
    """Per-persona tables the kernels read in float32, whatever the weights' dtype."""

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module._apply``, except that a dtype cast (``model.half()``, ``.to(torch.bfloat16)``)
        leaves the float32 per-persona tables in float32: they follow the device only, as when a bank
        is attached to a model cast beforehand."""
        tables = {name: self._buffers[name] for name in self.FLOAT32_TABLES if self._buffers.get(name) is not None}
        result = super()._apply(fn, recurse)
        for name, before in tables.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return result

    @property
    def packed(self) -> PackedFFN:
        """The layer's weights as a :class:`PackedFFN` (views, no copy)."""
        return PackedFFN(self.gate_up, self.down_t, self.activation)

    def unpacked_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copies of ``(W_gate, W_up, W_down)`` in the original channel order."""
        return unpack_ffn(PackedFFN(self.gate_up.detach(), self.down_t.detach(), self.activation), self.permutation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, S, d]`` (or ``[T, d]``, one row) -> same shape; row ``b`` uses the state's persona of row ``b``.

        Reads the per-token ids (and on the Triton path the shared ``StepMeta``, at ``layer_index``)
        that the model's forward pre-hook prepared. Only when none were prepared for this call (the
        MLP run outside the attached model's forward, or after a switch with no forward since) does
        it call :meth:`PersonaState.prepare` itself.
        """
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        n_tokens = tokens.shape[0]
        state = self.persona_state
        ids = state.token_view
        if state.prepared_tokens != n_tokens:
            batch = shape[0] if x.dim() >= 3 else 1
            ids = state.prepare(batch, n_tokens // batch if batch else 0)
        if state.use_meta:
            out = _masked_ffn_triton(
                tokens, self.gate_up, self.down_t, ids, self.keep_bits, self.scales,
                group_size=self.group_size, activation=self.activation, meta=state.meta, layer=self.layer_index,
                input_gains=self.input_gains, output_bias=self.output_bias,
            )
        else:
            out = masked_ffn(
                tokens, self.gate_up, self.down_t, ids, self.keep_bits, self.scales,
                group_size=self.group_size, activation=self.activation, backend=self.backend, check_ids=False,
                input_gains=self.input_gains, output_bias=self.output_bias,
            )
        return out.view(shape)

    def extra_repr(self) -> str:
        d_ff, _, d = self.gate_up.shape
        return (
            f"d_model={d}, d_ff={d_ff}, group_size={self.group_size}, activation={self.activation}, "
            f"personas={self.keep_bits.shape[0]}, scales={self.scales is not None}, "
            f"input_gains={self.input_gains is not None}, output_bias={self.output_bias is not None}, backend={self.backend}, "
            f"layer_index={self.layer_index}"
        )


def _masked_ffn_triton(*args, **kwargs) -> torch.Tensor:
    """:func:`persona_kernels.backends.triton_backend.masked_ffn_triton`, imported on first use."""
    from ..backends.triton_backend import masked_ffn_triton

    return masked_ffn_triton(*args, **kwargs)

