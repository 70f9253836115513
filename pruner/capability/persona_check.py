"""Did an answer stay in persona? A judge-free check with the dense model as a fixed scorer.

``persona_pmi`` is the mean, over the answer's tokens, of
``log p_dense(token | persona system prompt, user) - log p_dense(token | no system prompt, user)``:
how much more the dense model expects this answer from the persona than from its plain assistant.
An answer counts as in persona when it is positive. The same scorer (dense, id 0) judges every
method's answers, so methods are compared on one scale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch

from pruner.evaluation.generate import chat_prompt_ids, left_pad

Selector = Callable[[torch.Tensor], AbstractContextManager]


@torch.no_grad()
def answer_logprobs(model, select: Selector, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                    pad_id: int, batch_rows: int = 8) -> list[list[float]]:
    """Per-token log-probabilities of each answer after its prompt, run as the dense model (id 0)."""
    device = next(model.parameters()).device
    out: list[list[float]] = [[] for _ in prompts]
    order = [i for i in range(len(prompts)) if len(answers[i])]
    for start in range(0, len(order), batch_rows):
        batch = order[start:start + batch_rows]
        seqs = [list(prompts[i]) + list(answers[i]) for i in batch]
        ids, mask = left_pad(seqs, pad_id)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        keep = max(len(answers[i]) for i in batch) + 1
        with select(torch.zeros(len(batch), dtype=torch.long)):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                           use_cache=False, logits_to_keep=keep).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for row, i in enumerate(batch):
            n = len(answers[i])
            targets = torch.tensor(list(answers[i]), dtype=torch.long, device=logprobs.device)
            span = logprobs[row, keep - n - 1:keep - 1]
            out[i] = span.gather(-1, targets[:, None]).squeeze(-1).tolist()
    return out


def persona_pmi(model, tokenizer, select: Selector, systems: Sequence[str], users: Sequence[str],
                answers: Sequence[Sequence[int]], pad_id: int, batch_rows: int = 8, max_tokens: int = 64) -> list[float | None]:
    """Mean per-token log-probability gain of each answer (first ``max_tokens`` tokens) from the persona system prompt.

    ``systems[i]``: the persona system prompt the answer was generated under; ``None`` for empty answers.
    """
    clipped = [list(a)[:max_tokens] for a in answers]
    with_persona = [chat_prompt_ids(tokenizer, s, u) for s, u in zip(systems, users)]
    without = [chat_prompt_ids(tokenizer, None, u) for u in users]
    lp_with = answer_logprobs(model, select, with_persona, clipped, pad_id, batch_rows)
    lp_without = answer_logprobs(model, select, without, clipped, pad_id, batch_rows)
    return [None if not a else (sum(x) - sum(y)) / len(a) for a, x, y in zip(clipped, lp_with, lp_without)]
