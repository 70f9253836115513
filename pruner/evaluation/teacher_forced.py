"""Teacher-forced fidelity of masked personas against the dense model on the dense model's answers.

Stand-in until ``pruner/fidelity.py`` offers the same measure: for each question the sequence
``prompt + dense answer`` is run once per persona id (id 0 = dense, then the masks to compare) in
one batch that mixes personas; at every answer position the masked next-token distribution is
compared with the dense one: KL(dense || masked) and top-1 agreement (:func:`measures.token_kl_top1`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from .generate import left_pad
from .measures import token_kl_top1

Selector = Callable[[torch.Tensor], AbstractContextManager]


@dataclass
class TokenStats:
    """Sums over one question's answer tokens: ``kl`` (nats), ``agree`` (matching argmaxes), ``n`` tokens."""

    kl: float = 0.0
    agree: float = 0.0
    n: int = 0

    @property
    def mean_kl(self) -> float | None:
        """Mean KL per answer token."""
        return self.kl / self.n if self.n else None

    @property
    def top1(self) -> float | None:
        """Share of answer tokens whose argmax agrees with dense."""
        return self.agree / self.n if self.n else None


@torch.no_grad()
def teacher_forced_fidelity(
    model,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    persona_ids: Sequence[int],
    select: Selector,
    pad_id: int,
    max_rows: int = 8,
) -> list[dict[int, TokenStats]]:
    """Per question, ``{persona_id: TokenStats}`` of each masked persona against dense (id 0).

    ``prompts[q]``, ``answers[q]``: token ids (the answer is the dense model's, scored token by token).
    ``persona_ids``: the non-zero ids to compare; each question runs as ``[0] + persona_ids`` rows of
    one batch (several questions per batch while ``max_rows`` allows). Empty answers give ``n = 0``.
    """
    ids_per_q = [0] + [int(p) for p in persona_ids]
    per_batch = max(1, max_rows // len(ids_per_q))
    device = next(model.parameters()).device
    results: list[dict[int, TokenStats]] = [{p: TokenStats() for p in persona_ids} for _ in prompts]
    order = [q for q in range(len(prompts)) if len(answers[q])]
    for start in range(0, len(order), per_batch):
        questions = order[start:start + per_batch]
        seqs = [list(prompts[q]) + list(answers[q]) for q in questions for _ in ids_per_q]
        rows = torch.tensor([p for _ in questions for p in ids_per_q], dtype=torch.long, device=device)
        ids, mask = left_pad(seqs, pad_id)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        with select(rows):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), use_cache=False).logits
        width = ids.shape[1]
        for qi, q in enumerate(questions):
            n = len(answers[q])
            span = slice(width - n - 1, width - 1)  # logits at these positions predict the answer tokens
            base = qi * len(ids_per_q)
            dense = logits[base, span]
            for offset, pid in enumerate(ids_per_q[1:], start=1):
                kl, agree = token_kl_top1(dense, logits[base + offset, span])
                results[q][pid] = TokenStats(float(kl.sum()), float(agree.sum()), n)
        del logits
    return results
