"""Evaluation of persona masks against the dense model (``persona-eval``).

* :mod:`.measures` — ROUGE-L, KL / top-1 from logits, drop and share arithmetic.
* :mod:`.judge` — the optional LLM judge (OpenAI-compatible endpoint or local Hugging Face model).
* :mod:`.generate` — evaluation items, persona prompts, batched greedy generation per batch row.
* :mod:`.teacher_forced` — KL / top-1 against dense on the dense model's answers.
* :mod:`.selection` — attaching the bank and choosing a persona per batch row.
* :mod:`.report` — markdown, JSON and PNG report in the paper's form.
* :mod:`.runner` — the pipeline: :func:`evaluate` and :func:`rescore`.
"""

from .judge import HFJudge, JudgeScore, OpenAIJudge, parse_score_text, score_from_top_logprobs
from .measures import drop, rouge_l_f1, rouge_l_max, share_removed, token_kl_top1
from .report import summarize, write_report
from .runner import EvalSettings, evaluate, rescore

__all__ = [
    "EvalSettings",
    "HFJudge",
    "JudgeScore",
    "OpenAIJudge",
    "drop",
    "evaluate",
    "parse_score_text",
    "rescore",
    "rouge_l_f1",
    "rouge_l_max",
    "score_from_top_logprobs",
    "share_removed",
    "summarize",
    "token_kl_top1",
    "write_report",
]
