"""Log-likelihood scoring of multiple-choice items, each batch row as its own persona.

Every (item, method) pair runs its context once; the context's key/value cache is then gathered
to one row per choice and the continuations run on top of it, so a 4-choice item costs one
context plus four continuations rather than four full sequences. Only the positions that predict
continuation tokens reach the LM head.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from pruner.chat import returned_cache, with_cache
from pruner.evaluation.generate import left_pad

from .items import MCItem

Selector = Callable[[torch.Tensor], AbstractContextManager]


@dataclass
class MCRequest:
    """Token ids of one item's context and of each continuation, and the persona id to run them as."""

    context: list[int]
    continuations: list[list[int]]
    persona_id: int = 0


def encode_item(tokenizer, item: MCItem, persona_id: int = 0) -> MCRequest:
    """Tokenize an item: the context alone, and each continuation as the tokens that ``context + choice`` adds."""
    context = list(tokenizer(item.context, add_special_tokens=False).input_ids)
    continuations = []
    for choice in item.choices:
        whole = list(tokenizer(item.context + choice, add_special_tokens=False).input_ids)
        if whole[:len(context)] == context and len(whole) > len(context):
            continuations.append(whole[len(context):])
        else:  # the boundary merged into one token: fall back to the choice on its own
            continuations.append(list(tokenizer(choice, add_special_tokens=False).input_ids))
    if not context:
        raise ValueError(f"{item.id}: empty context")
    return MCRequest(context, continuations, persona_id)


@torch.no_grad()
def loglikelihoods(model, requests: Sequence[MCRequest], select: Selector, pad_id: int) -> list[list[float]]:
    """Sum of log-probabilities of each continuation given its context: ``out[r][c]``, nats.

    ``requests`` run in one batch: contexts left-padded (``[R, Lc]``), their cache gathered to one
    row per continuation, continuations right-padded (``[sum C_r, Lt]``).
    """
    device = next(model.parameters()).device
    ctx_ids, ctx_mask = left_pad([r.context for r in requests], pad_id)
    ctx_pos = (ctx_mask.cumsum(-1) - 1).clamp_min(0)
    rows = torch.tensor([r.persona_id for r in requests], dtype=torch.long)
    with select(rows):
        out = model(input_ids=ctx_ids.to(device), attention_mask=ctx_mask.to(device), position_ids=ctx_pos.to(device),
                    use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [R, V]: predicts each continuation's first token
    cache = returned_cache(out)
    owner = [r_i for r_i, r in enumerate(requests) for _ in r.continuations]
    conts = [c for r in requests for c in r.continuations]
    width = max(len(c) for c in conts)
    cont_ids = torch.full((len(conts), width), pad_id, dtype=torch.long)
    cont_mask = torch.zeros((len(conts), width), dtype=torch.long)
    for row, c in enumerate(conts):
        cont_ids[row, :len(c)] = torch.tensor(c, dtype=torch.long)
        cont_mask[row, :len(c)] = 1
    index = torch.tensor(owner, dtype=torch.long)
    cache.batch_select_indices(index.to(device))
    mask = torch.cat([ctx_mask[index], cont_mask], dim=1)
    start = ctx_mask.sum(-1)[index]
    positions = start[:, None] + torch.arange(width)[None, :]
    cont_rows = torch.tensor([requests[o].persona_id for o in owner], dtype=torch.long)
    with select(cont_rows):
        logits = model(input_ids=cont_ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       use_cache=True, **with_cache(cache)).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [N, Lt, V]; position j predicts token j + 1
    results: list[list[float]] = [[] for _ in requests]
    for row, (o, c) in enumerate(zip(owner, conts)):
        total = float(first[o, c[0]])
        if len(c) > 1:
            targets = torch.tensor(c[1:], dtype=torch.long, device=logprobs.device)
            total += float(logprobs[row, :len(c) - 1].gather(-1, targets[:, None]).sum())
        results[o].append(total)
    return results


def score_mc(item: MCItem, lls: Sequence[float], n_tokens: Sequence[int]) -> dict:
    """Accuracy of an item three ways: raw log-likelihood, per token and per character (OLMES' ``acc_per_char``).

    ``acc`` (the suite's primary score) is the per-character one. Ties go to the first choice.
    ``gold_lpc`` is the right answer's log-likelihood per character: a continuous score that still
    moves when a near-chance model's accuracy cannot.
    """
    if len(lls) != len(item.choices) or len(n_tokens) != len(item.choices):
        raise ValueError(f"{item.id}: {len(item.choices)} choices but {len(lls)} log-likelihoods")
    per_token = [ll / max(1, n) for ll, n in zip(lls, n_tokens)]
    per_char = [ll / max(1, len(choice)) for ll, choice in zip(lls, item.choices)]

    def argmax(values: Sequence[float]) -> int:
        return max(range(len(values)), key=lambda i: (values[i], -i)) if all(math.isfinite(v) for v in values) else 0

    preds = {"raw": argmax(lls), "token": argmax(per_token), "char": argmax(per_char)}
    return {
        "acc": float(preds["char"] == item.gold),
        "acc_raw": float(preds["raw"] == item.gold),
        "acc_token": float(preds["token"] == item.gold),
        "pred": preds["char"],
        "pred_raw": preds["raw"],
        "pred_token": preds["token"],
        "gold_lpc": per_char[item.gold],
    }
