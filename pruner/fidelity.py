"""Judge-free fidelity: how closely a masked persona follows the dense model playing the same persona.

On held-out questions, the dense model (persona as system prompt) answers once (greedy, cached);
then, teacher-forced on those answers, we compare next-token distributions at every answer
position: ``KL(dense || masked)`` (nats per token, mean) and top-1 agreement.
"""

from __future__ import annotations

import contextlib

import torch

from .chat import answer_ids, answer_logits, encode_prefix, kl_divergence, split_prompts, system_prompt
from .data import JsonlCache
from .learn import TrainingData
from .masked_model import fixed_mask
from .teacher import LocalTeacher, cached_answers


class FidelityEval:
    """Dense reference answers and logits for one persona, ready to score any mask of it."""

    def __init__(self, model, tokenizer, description: str, questions: list[str], *, max_new_tokens: int = 48,
                 cache: JsonlCache | None = None, identity: str = "model", batch_size: int = 8, progress: bool = False):
        self.model, self.batch_size = model, batch_size
        system = system_prompt(description)
        cache = cache if cache is not None else JsonlCache("/dev/null")
        answers = cached_answers(LocalTeacher(model, tokenizer, identity), cache, system, questions, max_new_tokens,
                                 progress=progress)
        prompts = split_prompts(tokenizer, system, questions)
        self.data = TrainingData(prompts.prefix, prompts.questions, [answer_ids(tokenizer, a) for a in answers],
                                 tokenizer.eos_token_id)
        self.answers = answers
        self.dense = self._logits(None)

    @torch.no_grad()
    def _logits(self, context) -> list[torch.Tensor]:
        out = []
        with context if context is not None else contextlib.nullcontext():
            past = encode_prefix(self.model, self.data.prefix)
            for batch in self.data.batches(self.batch_size):
                logits, _ = answer_logits(self.model, self.data.prefix, batch, past)
                out.append(logits.cpu())
        return out

    def compare(self, logits: list[torch.Tensor]) -> dict[str, float]:
        """``{"kl": mean KL(dense || other), "top1": agreement, "tokens": n}`` for per-batch logits of the same answers."""
        kl = torch.cat([kl_divergence(d, o) for d, o in zip(self.dense, logits)])
        top1 = torch.cat([(d.argmax(-1) == o.argmax(-1)).float() for d, o in zip(self.dense, logits)])
        return {"kl": float(kl.mean()), "top1": float(top1.mean()), "tokens": int(kl.numel())}

    def per_question(self, logits: list[torch.Tensor]) -> dict[str, list[float]]:
        """``{"kl": [...], "top1": [...]}``: each question's mean over its answer tokens (question order), for
        paired comparisons of two masks over the same questions."""
        kl = torch.cat([kl_divergence(d, o) for d, o in zip(self.dense, logits)])
        top1 = torch.cat([(d.argmax(-1) == o.argmax(-1)).float() for d, o in zip(self.dense, logits)])
        lengths = [int(n) for batch in self.data.batches(self.batch_size) for n in (batch.targets != -100).sum(1)]
        if sum(lengths) != kl.numel():
            raise RuntimeError(f"answer tokens per question sum to {sum(lengths)}, the logits hold {kl.numel()}")
        return {"kl": [float(v.mean()) for v in kl.split(lengths)], "top1": [float(v.mean()) for v in top1.split(lengths)]}

    def measure_questions(self, keep: torch.Tensor, group_size: int, scales: torch.Tensor | None = None,
                          input_gains: torch.Tensor | None = None, output_bias: torch.Tensor | None = None) -> dict:
        """:meth:`measure` plus each question's KL and top-1 (``question_kl``, ``question_top1``)."""
        logits = self._logits(fixed_mask(self.model, keep, group_size, scales, input_gains, output_bias))
        questions = self.per_question(logits)
        return {**self.compare(logits), "question_kl": questions["kl"], "question_top1": questions["top1"]}

    def measure(self, keep: torch.Tensor, group_size: int, scales: torch.Tensor | None = None,
                input_gains: torch.Tensor | None = None, output_bias: torch.Tensor | None = None) -> dict[str, float]:
        """Fidelity of a mask (with optional scales, FFN input gains and output bias) applied through the pruner's hooks."""
        return self.compare(self._logits(fixed_mask(self.model, keep, group_size, scales, input_gains, output_bias)))

    def measure_attached(self, bank, persona: str) -> dict[str, float]:
        """Fidelity of ``persona`` from ``bank`` run through :func:`persona_kernels.hf.attach_bank` (the users' path)."""
        from persona_kernels.hf import attach_bank, detach_bank, persona as use_persona

        attach_bank(self.model, bank)
        try:
            return self.compare(self._logits(use_persona(self.model, persona)))
        finally:
            detach_bank(self.model)
