"""Hugging Face integration: find gated FFNs, attach a mask bank to a model, export a pruned copy, load the default model."""

from .attach import attach_bank, detach_bank, set_backend
from .attachment import attached_bank, is_attached
from .masked_mlp import MaskedMLP
from .persona_keyword import generate_as
from .persona_state import PersonaState
from .personas import current_persona, persona, resolve_persona_ids, set_persona
from .default_model import DEFAULT_MODEL_NAME, load_default_model, load_model
from .export import export_pruned
from .ffn import (
    ffn_activation,
    ffn_weights,
    find_ffn_layers,
    model_ffn_shape,
    model_fingerprint,
    model_name,
    model_weight_sample,
)

__all__ = [
    "DEFAULT_MODEL_NAME",
    "MaskedMLP",
    "PersonaState",
    "attach_bank",
    "attached_bank",
    "current_persona",
    "detach_bank",
    "export_pruned",
    "ffn_activation",
    "ffn_weights",
    "find_ffn_layers",
    "generate_as",
    "is_attached",
    "load_default_model",
    "load_model",
    "model_ffn_shape",
    "model_fingerprint",
    "model_name",
    "model_weight_sample",
    "persona",
    "resolve_persona_ids",
    "set_backend",
    "set_persona",
]
