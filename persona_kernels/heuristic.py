"""A simple structured heuristic that builds a mask bank from persona descriptions.

Stop-gap until the pruner (``pruner/``) lands; the pruner supersedes it. For each persona the dense
model reads a few chat prompts whose system message is the persona description; each FFN layer's
intermediate activation ``h = act(W_gate x) * (W_up x)`` is averaged in absolute value per channel
over all tokens and multiplied by the norm of the channel's down-projection column (the typical size
of the channel's contribution to the layer output, as in Wanda's |W| * ||x||); scores are averaged
per group of ``G`` channels, and the top ``(1 - sparsity)`` fraction of groups is kept in every layer. No training, no scales: it shows the machinery end to end and gives
a baseline ("activation magnitude on persona text"), not the paper's quality.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from .bank import MaskBank, PersonaMask
from .reference import activate

GENERIC_PROMPTS = (
    "Introduce yourself.",
    "What do you do on a typical day?",
    "What matters most to you, and why?",
    "Tell me about something that happened to you recently.",
)
METHOD = "heuristic-activation"


def persona_texts(tokenizer, description: str, prompts: Sequence[str] = GENERIC_PROMPTS) -> list[str]:
    """Chat-formatted texts: system message ``description``, then each prompt as the user turn."""
    texts = []
    for prompt in prompts:
        messages = [{"role": "system", "content": description}, {"role": "user", "content": prompt}]
        if getattr(tokenizer, "chat_template", None):
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        else:
            texts.append(f"{description}\n\n{prompt}\n")
    return texts


@torch.no_grad()
def channel_activation_stats(model: nn.Module, tokenizer, texts: Sequence[str], answer_tokens: int = 0, max_length: int = 512) -> torch.Tensor:
    """Mean ``|act(W_gate x) * (W_up x)|`` per FFN channel, float32 ``[L, d_ff]`` in original channel order.

    Runs the dense model (the dense persona if a bank is attached) on each text separately (no
    padding). With ``answer_tokens > 0`` the model first answers each text greedily and the
    statistics cover the text plus its answer.
    """
    from .hf import MaskedMLP, is_attached, persona
    from .hf.ffn import find_ffn_layers, model_ffn_shape

    layers = find_ffn_layers(model)
    n_layers, d_ff, _ = model_ffn_shape(model)
    sums = torch.zeros(n_layers, d_ff, dtype=torch.float64)
    count = [0]

    def make_hook(index: int, mlp: nn.Module, activation: str):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            if isinstance(mlp, MaskedMLP):
                gate, up = mlp.gate_up[:, 0].float(), mlp.gate_up[:, 1].float()
            else:
                gate, up = mlp.gate_proj.weight.float(), mlp.up_proj.weight.float()
            h = (activate(x @ gate.T, activation) * (x @ up.T)).abs().sum(0).double().cpu()
            if isinstance(mlp, MaskedMLP) and mlp.permutation is not None:
                unpermuted = torch.empty_like(h)
                unpermuted[mlp.permutation.cpu()] = h
                h = unpermuted
            sums[index] += h
            if index == 0:
                count[0] += x.shape[0]

        return hook

    handles = [layer.mlp.register_forward_pre_hook(make_hook(layer.index, layer.mlp, layer.activation)) for layer in layers]
    device = next(model.parameters()).device
    try:
        with persona(model, None) if is_attached(model) else contextlib.nullcontext():
            for text in texts:
                ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"].to(device)
                if answer_tokens > 0:
                    ids = type(model).generate(
                        model, input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=answer_tokens,
                        do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                    )
                model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return (sums / max(count[0], 1)).float()


def keep_top_groups(stats: torch.Tensor, group_size: int, sparsity: float) -> torch.Tensor:
    """Bool ``[L, n_groups]``: per layer, the ``round((1 - sparsity) * n_groups)`` (at least 1) groups of largest mean score."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    n_layers, d_ff = stats.shape
    if d_ff % group_size:
        raise ValueError(f"group size {group_size} does not divide d_ff {d_ff}")
    group_scores = stats.view(n_layers, d_ff // group_size, group_size).mean(-1)
    n_groups = group_scores.shape[1]
    k = max(1, min(n_groups, round((1.0 - sparsity) * n_groups)))
    keep = torch.zeros(n_layers, n_groups, dtype=torch.bool)
    keep.scatter_(1, torch.topk(group_scores, k, dim=1).indices, True)
    return keep


def build_heuristic_bank(
    model: nn.Module,
    tokenizer,
    personas: Sequence[tuple[str, str]],
    sparsity: float,
    group_size: int,
    *,
    prompts: Sequence[str] = GENERIC_PROMPTS,
    answer_tokens: int = 0,
    bank: MaskBank | None = None,
) -> MaskBank:
    """Build (or extend ``bank`` with) one heuristic mask per ``(name, description)``; return the bank.

    Every layer keeps the same fraction ``1 - sparsity`` of its ``d_ff / group_size`` groups, chosen by
    mean absolute FFN intermediate activation on the persona's prompts times the down-projection
    column norm (see module docstring). A
    new bank is made for ``model`` (its name and FFN fingerprint); masks follow ``bank``'s channel
    permutation when it has one.
    """
    from .hf.ffn import ffn_weights, model_ffn_shape, model_fingerprint, model_name, model_weight_sample

    n_layers, d_ff, _ = model_ffn_shape(model)
    sample, sample_dtype = model_weight_sample(model)
    if bank is None:
        bank = MaskBank(model_name(model), model_fingerprint(model), n_layers, d_ff, group_size,
                        weight_sample=sample, weight_dtype=sample_dtype)
    else:
        bank.check_model(model_fingerprint(model), n_layers, d_ff, model_name(model), weight_sample=(sample, sample_dtype))
        if bank.group_size != group_size:
            raise ValueError(f"the bank uses group size {bank.group_size}, not {group_size}")
    down_norms = torch.stack([w_down.float().norm(dim=0).cpu() for _, _, w_down in ffn_weights(model)])  # [L, d_ff]
    for name, description in personas:
        stats = channel_activation_stats(model, tokenizer, persona_texts(tokenizer, description, prompts), answer_tokens)
        stats = stats * down_norms
        if bank.permutation is not None:
            stats = torch.stack([stats[layer, bank.permutation[layer]] for layer in range(n_layers)])
        keep = keep_top_groups(stats, group_size, sparsity)
        report = {"prompts": list(prompts), "answer_tokens": answer_tokens, "target_sparsity": sparsity}
        bank.add(PersonaMask(name=name, keep=keep, description=description, method=METHOD, report=report))
    return bank
