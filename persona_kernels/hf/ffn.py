"""Finding the gated FFN (MLP) of every decoder layer in a Hugging Face causal LM.

Supported: any model whose decoder layers hold an ``mlp`` with ``gate_proj``, ``up_proj`` and
``down_proj`` ``nn.Linear`` modules without bias and an ``act_fn`` that is SiLU or tanh-GELU:
Llama (and SmolLM), Qwen2, Mistral, Gemma3 (text-only, and the language model of the multimodal
one), and their relatives. Everything else raises ``ValueError`` saying what is missing. Works on
plain models and on models with a bank attached (:func:`~persona_kernels.hf.attach_bank`), in which case
weights are unpacked to the original order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..fingerprint import ffn_fingerprint, ffn_weight_sample
from .attachment import attachment
from .masked_mlp import MaskedMLP

# Activation names as Hugging Face configs spell them -> the op's names.
_CONFIG_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}
# Activation module class names (transformers.activations and torch.nn) -> the op's names.
_MODULE_ACTIVATIONS = {
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
}


@dataclass
class FFNLayer:
    """One decoder layer's gated MLP: where it lives and its activation (op name)."""

    index: int
    parent: nn.Module  # the decoder layer; ``parent.mlp`` is the MLP (or a MaskedMLP)
    mlp: nn.Module
    activation: str


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder layers: the first whose entries all hold a gated ``mlp``
    (``gate_proj``, or a :class:`~persona_kernels.hf.masked_mlp.MaskedMLP`), else the first whose
    entries all hold an ``mlp`` (so a multimodal model's vision encoder, whose MLPs are not gated,
    is passed over for its language model)."""
    lists = [m for _, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)
             and all(hasattr(layer, "mlp") for layer in m)]
    for module in lists:
        if all(hasattr(layer.mlp, "gate_proj") or hasattr(layer.mlp, "gate_up") for layer in module):
            return module
    if lists:
        return lists[0]
    raise ValueError(
        f"{type(model).__name__}: no decoder layers with an `mlp` found; persona-kernels supports "
        "gated-FFN causal LMs (Llama, SmolLM, Qwen2, Mistral, Gemma3)"
    )


def activation_name(mlp: nn.Module, config=None) -> str:
    """Map an MLP's ``act_fn`` (or the config's ``hidden_act``/``hidden_activation``) to ``"silu"`` or ``"gelu_tanh"``."""
    act = getattr(mlp, "act_fn", None)
    if act is not None:
        if isinstance(act, nn.GELU):
            if act.approximate == "tanh":
                return "gelu_tanh"
            raise ValueError("unsupported FFN activation: exact (erf) GELU; persona-kernels supports SiLU and tanh-GELU")
        name = type(act).__name__
        if name in _MODULE_ACTIVATIONS:
            return _MODULE_ACTIVATIONS[name]
    for key in ("hidden_activation", "hidden_act"):
        value = getattr(config, key, None) if config is not None else None
        if isinstance(value, str):
            if value in _CONFIG_ACTIVATIONS:
                return _CONFIG_ACTIVATIONS[value]
            raise ValueError(
                f"unsupported FFN activation {value!r} (config.{key}); persona-kernels supports "
                f"{sorted(_CONFIG_ACTIVATIONS)}"
            )
    raise ValueError(
        f"unsupported FFN activation {type(act).__name__ if act is not None else None!r}; "
        "persona-kernels supports SiLU and tanh-GELU"
    )


def _check_gated(mlp: nn.Module, index: int) -> None:
    missing = [n for n in ("gate_proj", "up_proj", "down_proj") if not isinstance(getattr(mlp, n, None), nn.Linear)]
    if missing:
        raise ValueError(
            f"layer {index}: {type(mlp).__name__} is not a gated FFN with separate gate_proj/up_proj/down_proj "
            f"Linear layers (missing {missing}); persona-kernels supports Llama, SmolLM, Qwen2, Mistral and Gemma3 MLPs"
        )
    biased = [n for n in ("gate_proj", "up_proj", "down_proj") if getattr(mlp, n).bias is not None]
    if biased:
        raise ValueError(f"layer {index}: FFN projections with bias ({biased}) are not supported by the masked FFN op")


def find_ffn_layers(model: nn.Module) -> list[FFNLayer]:
    """Every decoder layer's gated MLP, in order; ``ValueError`` if the model has none or an unsupported one."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    result = []
    for index, layer in enumerate(decoder_layers(model)):
        mlp = layer.mlp
        if isinstance(mlp, MaskedMLP):
            result.append(FFNLayer(index, layer, mlp, mlp.activation))
            continue
        _check_gated(mlp, index)
        result.append(FFNLayer(index, layer, mlp, activation_name(mlp, config)))
    return result


def ffn_activation(model: nn.Module) -> str:
    """The model's FFN activation as the op names it (``"silu"`` or ``"gelu_tanh"``)."""
    names = {layer.activation for layer in find_ffn_layers(model)}
    if len(names) != 1:
        raise ValueError(f"layers use different FFN activations {sorted(names)}")
    return names.pop()


def ffn_weights(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer ``(W_gate [d_ff, d], W_up [d_ff, d], W_down [d, d_ff])`` in the original channel order.

    Plain models return the Linear weights themselves (no copy); attached models return unpacked copies.
    """
    weights = []
    for layer in find_ffn_layers(model):
        mlp = layer.mlp
        if isinstance(mlp, MaskedMLP):
            weights.append(mlp.unpacked_weights())
        else:
            weights.append((mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach()))
    return weights


def model_ffn_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(n_layers, d_ff, d_model)``; ``ValueError`` if layers disagree on ``d_ff``."""
    shapes = set()
    layers = find_ffn_layers(model)
    for layer in layers:
        mlp = layer.mlp
        if isinstance(mlp, MaskedMLP):
            shapes.add((mlp.packed.d_ff, mlp.packed.d_model))
        else:
            shapes.add(tuple(mlp.gate_proj.weight.shape))
    if len(shapes) != 1:
        raise ValueError(f"FFN layers have different shapes {sorted(shapes)}; a mask bank needs one d_ff")
    d_ff, d_model = shapes.pop()
    return len(layers), d_ff, d_model


def model_weight_sample(model: nn.Module) -> tuple[torch.Tensor, str]:
    """The precision-tolerant weight sample (:func:`persona_kernels.fingerprint.ffn_weight_sample`)."""
    info = attachment(model)
    if info is not None:
        return info.weight_sample
    return ffn_weight_sample(ffn_weights(model))


def model_fingerprint(model: nn.Module) -> str:
    """The FFN fingerprint of the model's weights (:func:`persona_kernels.fingerprint.ffn_fingerprint`)."""
    info = attachment(model)
    if info is not None:
        return info.fingerprint
    return ffn_fingerprint(ffn_weights(model))


def model_name(model: nn.Module) -> str:
    """The model's name as recorded in its config (``name_or_path``), or its class name."""
    config = getattr(model, "config", None)
    return str(getattr(config, "name_or_path", "") or getattr(model, "name_or_path", "") or type(model).__name__)
