"""Export one persona as a smaller dense checkpoint that stock ``transformers`` loads.

This is the paper's deployment path, kept for comparison and for tools that cannot run the
masked kernel: the persona's kept channels are sliced out of the shared weights into a private
dense copy. It is also the test oracle of the attached model (same persona, same logits).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..bank import DENSE_PERSONA_ID, MaskBank
from ..fingerprint import ffn_fingerprint, ffn_weight_sample
from ..masks import channel_keep
from .attachment import attachment
from .ffn import ffn_weights, find_ffn_layers, model_ffn_shape, model_name
from .masked_mlp import MaskedMLP
from .personas import resolve_persona_ids

EXPORT_INFO_FILE = "persona_export.json"


def persona_channels(bank: MaskBank, persona_id: int, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Original-order channel indices kept by ``persona_id`` in ``layer`` (sorted), and their scales (or ``None``).

    Masks and scales index the bank's permuted (packed) channel order; packed position ``i`` is
    original channel ``permutation[layer, i]``.
    """
    if persona_id == DENSE_PERSONA_ID:
        return torch.arange(bank.d_ff), None
    entry = bank.personas[persona_id - 1]
    positions = torch.nonzero(channel_keep(entry.keep[layer], bank.group_size)).flatten()
    original = positions if bank.permutation is None else bank.permutation[layer][positions].to(torch.int64)
    scales = None if entry.scales is None else entry.scales[layer][positions].float()
    order = torch.argsort(original)
    return original[order], None if scales is None else scales[order]


def _scaled_columns(weight: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``weight[:, j] * factors[j]`` computed in float32, in ``weight``'s dtype."""
    return (weight.float() * factors.to(device=weight.device, dtype=torch.float32)).to(weight.dtype)


def _text_config(config):
    return config if hasattr(config, "intermediate_size") else getattr(config, "text_config", config)


def export_pruned(model: nn.Module, bank: MaskBank, persona, out_dir: str | Path, tokenizer=None) -> Path:
    """Write ``persona``'s pruned dense copy of ``model`` to ``out_dir`` and return the path.

    The checkpoint (``model.safetensors``, ``config.json``, ``generation_config.json``, the tokenizer
    when given, and ``persona_export.json`` recording the provenance) loads with stock
    ``AutoModelForCausalLM.from_pretrained(out_dir)``. Per layer it keeps exactly the channels the
    persona keeps, with the bank's channel permutation undone (channels in original order), folds
    the persona's channel scales into the matching columns of ``down_proj`` and its FFN input gains
    into the columns of ``gate_proj`` and ``up_proj`` (``W[:, j] * gain_j``, in fp32). A persona's FFN
    output bias becomes ``down_proj.bias`` (the config's ``mlp_bias`` is set, so ``gate_proj`` and
    ``up_proj`` get zero biases); architectures whose config has no ``mlp_bias`` (Gemma 3) cannot
    hold it, and such an export is refused.

    Stock configs have one ``intermediate_size`` for all layers, so it is set to the largest per-layer
    kept count and layers that keep fewer channels are padded with all-zero ``gate_proj``/``up_proj``
    rows and all-zero ``down_proj`` columns: a padded channel contributes ``act(0) * 0 * 0 = 0``, so
    the function is unchanged (the file is only as small as its densest layer allows).

    Works on a plain model or one with a bank attached (attached models are not modified).
    Written atomically: into a temporary directory beside ``out_dir``, then renamed over it. An
    existing ``out_dir`` is replaced only when it is an earlier export (it holds
    ``persona_export.json``) or empty; any other file or folder there raises ``FileExistsError``
    before anything is written.
    ``persona``: a name, an id, or ``None``/``"dense"`` (a plain copy).
    """
    from safetensors.torch import save_file


    _check_replaceable(Path(out_dir))

    ids = resolve_persona_ids(bank, persona)
    if len(ids) != 1:
        raise ValueError("export_pruned exports one persona; got a list")
    persona_id = ids[0]
    layers = find_ffn_layers(model)
    n_layers, d_ff, d_model = model_ffn_shape(model)
    weights = ffn_weights(model)
    info = attachment(model)
    fingerprint = info.fingerprint if info is not None else ffn_fingerprint(weights)
    weight_sample = info.weight_sample if info is not None else ffn_weight_sample(weights)
    bank.check_model(fingerprint, n_layers, d_ff, model_name(model), d_model, weight_sample)

    bank_entry = None if persona_id == DENSE_PERSONA_ID else bank.personas[persona_id - 1]
    gains = None if bank_entry is None else bank_entry.input_gains
    biases = None if bank_entry is None else bank_entry.output_bias
    if biases is not None and not hasattr(_text_config(model.config), "mlp_bias"):
        raise ValueError(
            f"persona {bank_entry.name!r} has an FFN output bias, but {model_name(model)!r} "
            f"({type(model.config).__name__}) has no mlp_bias option, so a stock checkpoint cannot hold it"
        )
    sliced = []
    for layer, (w_gate, w_up, w_down) in enumerate(weights):
        channels, scales = persona_channels(bank, persona_id, layer)
        channels = channels.to(w_gate.device)
        gate, up, down = w_gate[channels], w_up[channels], w_down[:, channels]
        if scales is not None:
            down = _scaled_columns(down, scales)
        if gains is not None:
            gate, up = _scaled_columns(gate, gains[layer]), _scaled_columns(up, gains[layer])
        sliced.append((gate, up, down))
    width = max(1, max(g.shape[0] for g, _, _ in sliced))

    module_names = {id(module): name for name, module in model.named_modules()}
    state = {}
    for key, tensor in model.state_dict().items():
        state[key] = tensor
    for layer, (w_gate, w_up, w_down) in zip(layers, sliced):
        prefix = module_names[id(layer.mlp)]
        if isinstance(layer.mlp, MaskedMLP):
            state.pop(f"{prefix}.gate_up", None)
            state.pop(f"{prefix}.down_t", None)
        kept = w_gate.shape[0]
        pad = width - kept
        state[f"{prefix}.gate_proj.weight"] = torch.cat((w_gate, w_gate.new_zeros(pad, w_gate.shape[1])))
        state[f"{prefix}.up_proj.weight"] = torch.cat((w_up, w_up.new_zeros(pad, w_up.shape[1])))
        state[f"{prefix}.down_proj.weight"] = torch.cat((w_down, w_down.new_zeros(w_down.shape[0], pad)), dim=1)
        if biases is not None:
            state[f"{prefix}.gate_proj.bias"] = w_gate.new_zeros(width)
            state[f"{prefix}.up_proj.bias"] = w_up.new_zeros(width)
            state[f"{prefix}.down_proj.bias"] = biases[layer.index].to(device=w_down.device, dtype=w_down.dtype)

    config = copy.deepcopy(model.config)
    text_config = _text_config(config)
    tied = bool(getattr(text_config, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))
    text_config.intermediate_size = width
    if biases is not None:
        text_config.mlp_bias = True
    if not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]

    tensors, seen = {}, {}
    for key, tensor in state.items():
        tensor = tensor.detach()
        if tensor.device.type == "meta":
            continue
        ptr = (tensor.data_ptr(), tensor.numel(), tensor.dtype) if tensor.numel() else None
        if ptr is not None and ptr in seen:
            if tied:
                continue  # a tied weight (lm_head = embed_tokens): the loader re-ties it
            tensor = tensor.clone()
        elif ptr is not None:
            seen[ptr] = key
        tensors[key] = tensor.to("cpu").contiguous()

    kept_counts = [int(g.shape[0]) for g, _, _ in sliced]
    export_info = {
        "persona_id": persona_id,
        "persona": "dense" if bank_entry is None else bank_entry.name,
        "description": "" if bank_entry is None else bank_entry.description,
        "base_model": bank.base_model,
        "fingerprint": bank.fingerprint,
        "group_size": bank.group_size,
        "original_intermediate_size": d_ff,
        "intermediate_size": width,
        "kept_channels_per_layer": kept_counts,
        "zero_padded_channels_per_layer": [width - k for k in kept_counts],
        "scales_folded": bank_entry is not None and bank_entry.scales is not None,
        "input_gains_folded": gains is not None,
        "output_bias_folded": biases is not None,
    }

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        save_file(tensors, str(temp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(temp))
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(str(temp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(temp))
        (temp / EXPORT_INFO_FILE).write_text(json.dumps(export_info, indent=2) + "\n")
        os.chmod(temp, 0o755)
        _replace_dir(temp, out_dir)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    return out_dir


def _check_replaceable(target: Path) -> None:
    """Refuse an ``out_dir`` that holds something other than an earlier export (nothing is lost)."""
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; export_pruned writes a directory")
    if any(target.iterdir()) and not (target / EXPORT_INFO_FILE).is_file():
        raise FileExistsError(
            f"{target} is a non-empty directory that is not an earlier export (no {EXPORT_INFO_FILE}); "
            "export_pruned replaces its out_dir, so give a new or empty directory"
        )


def _replace_dir(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``; an existing ``target`` is moved aside first and deleted after."""
    if not target.exists():
        os.replace(source, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    aside.rmdir()
    os.replace(target, aside)
    try:
        os.replace(source, target)
    except BaseException:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)
