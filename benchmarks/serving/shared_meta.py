"""A decode variant for the benchmark: one :class:`StepMeta` per forward, shared by every layer.

Through the public dispatcher (what :class:`persona_kernels.hf.attach.MaskedMLP` calls), the Triton
backend builds and prepares a fresh ``StepMeta`` in every layer of every step: the same sort,
slot and union computation L times per step (about 25 small kernels each). This variant, installed
on an attached model for the benchmark only, prepares one ``StepMeta`` for all layers in the first
layer's forward (``keep_bits [L, P + 1, W]`` digested at once) and calls
:func:`persona_kernels.backends.triton_backend.masked_ffn_triton` with ``meta=`` and ``layer=``:
the design the Triton backend's docs describe for persistent buffers. Comparing it with the plain
attached model measures what per-layer metadata costs end to end. Nothing in the package changes:
:meth:`SharedStepMeta.install` shadows each ``MaskedMLP.forward`` on the instance and
:meth:`SharedStepMeta.remove` takes the shadow away.
"""

from __future__ import annotations

import torch


def available(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton backend can run on ``device`` here, and why not."""
    try:
        from persona_kernels.backends import triton_backend
    except ImportError as error:
        return False, f"triton backend does not import: {error}"
    if not triton_backend.is_available():
        return False, triton_backend.unavailable_reason()
    expected = "cpu" if getattr(triton_backend, "INTERPRET", False) else "cuda"
    if device.type != expected:
        return False, f"the triton backend runs on {expected} here, the model is on {device.type}"
    return True, ""


class SharedStepMeta:
    """Shadow every masked MLP of an attached model so one ``StepMeta`` serves all layers of a forward.

    ``max_tokens``: the most tokens one forward carries (batch x prompt length for the prefill).
    All steps take the Triton decode path (union of the batch's kept groups, streamed once).
    """

    def __init__(self, model, max_tokens: int):
        from persona_kernels.hf.attach import attachment
        from persona_kernels.hf.ffn import find_ffn_layers
        from persona_kernels.step_meta import StepMeta

        info = attachment(model)
        if info is None:
            raise ValueError("SharedStepMeta needs a model with a mask bank attached")
        self.state = info.state
        self.mlps = [layer.mlp for layer in find_ffn_layers(model)]
        first = self.mlps[0]
        self.keep_bits = torch.stack([mlp.keep_bits for mlp in self.mlps]).contiguous()  # [L, P + 1, W]
        d_ff = first.gate_up.shape[0]
        self.meta = StepMeta.make(max_tokens, d_ff // first.group_size, self.keep_bits.shape[1], first.gate_up.device,
                                  n_layers=len(self.mlps), prefill=False)
        self.installed = False

    def _forward(self, layer: int, mlp):
        from persona_kernels.backends.triton_backend import masked_ffn_triton

        def forward(x: torch.Tensor) -> torch.Tensor:
            shape = x.shape
            batch = shape[0] if x.dim() >= 3 else 1
            tokens = x.reshape(-1, shape[-1])
            ids = self.state.token_ids(batch, tokens.shape[0] // batch)
            if layer == 0:
                self.meta.prepare(ids, self.keep_bits)  # once per forward, for every layer
            out = masked_ffn_triton(tokens, mlp.gate_up, mlp.down_t, ids, mlp.keep_bits, mlp.scales,
                                    group_size=mlp.group_size, activation=mlp.activation, meta=self.meta,
                                    layer=layer, path="decode")
            return out.view(shape)

        return forward

    def install(self) -> "SharedStepMeta":
        """Shadow ``forward`` of every masked MLP (instance attribute; the class is untouched)."""
        for layer, mlp in enumerate(self.mlps):
            mlp.forward = self._forward(layer, mlp)
        self.installed = True
        return self

    def remove(self) -> None:
        """Back to the attached model's own ``MaskedMLP.forward``."""
        for mlp in self.mlps:
            if "forward" in mlp.__dict__:
                del mlp.forward
        self.installed = False
