"""Judge-free quality measures and the paper's drop/share arithmetic.

* :func:`rouge_l_f1` — LCS-based ROUGE-L F1 on lowercased word tokens (no dependency).
* :func:`token_kl_top1` — per-position KL(dense || masked) and top-1 agreement from two logit tensors.
* :func:`drop` / :func:`share_removed` — how far a method falls from dense, and how much of the
  strongest baseline's drop a persona mask removes: ``(drop_baseline_best - drop_persona) / drop_baseline_best``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

import torch

from ..chat import kl_divergence

_WORD = re.compile(r"[^\W_]+", re.UNICODE)

#: Whether a larger value of each reported measure is better (decides the sign of a drop).
HIGHER_IS_BETTER: dict[str, bool] = {
    "kl": False,
    "top1": True,
    "general_kl": False,
    "general_top1": True,
    "rouge_l": True,
    "judge": True,
}


def word_tokens(text: str) -> list[str]:
    """Lowercased word tokens of ``text`` (runs of letters/digits; punctuation and ``_`` split words)."""
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (O(len(a)·len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            current[j] = previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1])
        previous = current
    return previous[-1]


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of ``candidate`` against one ``reference``: ``2PR/(P+R)`` with ``P = LCS/|cand|``, ``R = LCS/|ref|``.

    Both texts are lowercased and split into word tokens; an empty side gives 0.
    """
    cand, ref = word_tokens(candidate), word_tokens(reference)
    lcs = lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l_max(candidate: str, references: Iterable[str]) -> float:
    """Best ROUGE-L F1 of ``candidate`` over several references (0 if there are none)."""
    return max((rouge_l_f1(candidate, ref) for ref in references), default=0.0)


def token_kl_top1(dense_logits: torch.Tensor, masked_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL(dense || masked) in nats and top-1 agreement, from logits.

    Shapes: ``dense_logits``, ``masked_logits``: ``[..., V]``. Returns ``(kl, agree)``, both ``[...]``
    float32: ``kl = sum_v p_d(v) (log p_d(v) - log p_m(v))``; ``agree = 1`` where the argmaxes match.
    Computed in float32 whatever the input dtype.
    """
    if dense_logits.shape != masked_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(dense_logits.shape)} vs {tuple(masked_logits.shape)}")
    kl = kl_divergence(dense_logits, masked_logits).clamp_min(0.0)
    agree = (dense_logits.argmax(dim=-1) == masked_logits.argmax(dim=-1)).float()
    return kl, agree


def mean(values: Iterable[float | None]) -> float | None:
    """Mean of the non-``None``, finite values; ``None`` if there are none."""
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(kept) / len(kept) if kept else None


def drop(dense: float | None, value: float | None, higher_is_better: bool = True) -> float | None:
    """How much worse ``value`` is than ``dense`` (positive = worse); ``None`` if either is missing."""
    if dense is None or value is None:
        return None
    return dense - value if higher_is_better else value - dense


def share_removed(drop_persona: float | None, baseline_drops: Mapping[str, float | None]) -> tuple[float | None, str | None]:
    """Share of the strongest baseline's drop that the persona mask removes, and that baseline's name.

    The strongest baseline is the one with the smallest drop. Returns
    ``((drop_best - drop_persona) / drop_best, best_name)``: 1 means the persona mask loses nothing,
    0 means it is no better than the best baseline, negative means it is worse. The share is ``None``
    when there is no baseline or the best baseline does not drop at all (``drop_best <= 0``).
    """
    known = {name: d for name, d in baseline_drops.items() if d is not None}
    if not known or drop_persona is None:
        return None, None
    best = min(known, key=lambda name: known[name])
    best_drop = known[best]
    if best_drop <= 0:
        return None, best
    return (best_drop - drop_persona) / best_drop, best
