"""Chat prompts split into a shared prefix and per-question suffixes, and forwards that reuse the prefix.

Every sequence the pruner sees is ``prefix + question + answer`` where the prefix (the chat
template up to the user's text, including the persona's system prompt) is the same for all
questions of one persona. The prefix is run once per batch (batch 1) and its key/value cache is
expanded to the batch; gradients flow through it. Prefix and suffix are always tokenized
separately, so training, generation and evaluation see identical token ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from persona_kernels.prompting import persona_system_prompt

def _cache_keyword() -> str:
    import inspect

    from transformers import LlamaModel

    # transformers >= 5.2x renamed ``past_key_values`` to ``cache`` (the old name warns, then goes away)
    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


CACHE_KW = _cache_keyword()


def with_cache(past) -> dict:
    """Keyword arguments passing a key/value cache to a Hugging Face forward, in this transformers' spelling."""
    return {CACHE_KW: past}


def returned_cache(output):
    """The key/value cache a Hugging Face forward returned."""
    if CACHE_KW == "cache":
        return output.cache  # reading ``past_key_values`` there works but logs a deprecation warning
    return output.past_key_values


# One template for learning, evaluation and chat: a mask is only as good as the prompt it was learned under.
system_prompt = persona_system_prompt


def _messages(system: str | None, question: str) -> list[dict]:
    messages = [] if system is None else [{"role": "system", "content": system}]
    return messages + [{"role": "user", "content": question}]


def _render(tokenizer, system: str | None, question: str) -> str:
    return tokenizer.apply_chat_template(_messages(system, question), tokenize=False, add_generation_prompt=True)


@dataclass
class ChatPrompts:
    """Tokenized prompts of one persona: a shared prefix and, per question, the suffix prompt ids."""

    prefix: list[int]
    questions: list[list[int]]


def split_prompts(tokenizer, system: str | None, questions: list[str]) -> ChatPrompts:
    """Render ``questions`` with the chat template and split off the longest common prefix (cut at the user text)."""
    probe_a, probe_b = _render(tokenizer, system, "\x01"), _render(tokenizer, system, "\x02")
    cut = 0
    while cut < min(len(probe_a), len(probe_b)) and probe_a[cut] == probe_b[cut]:
        cut += 1
    prefix_text = probe_a[:cut]
    suffixes = []
    for question in questions:
        text = _render(tokenizer, system, question)
        if not text.startswith(prefix_text):
            raise ValueError("the chat template renders the system prompt differently per question")
        suffixes.append(tokenizer.encode(text[cut:], add_special_tokens=False))
    return ChatPrompts(tokenizer.encode(prefix_text, add_special_tokens=False), suffixes)


def answer_ids(tokenizer, answer: str) -> list[int]:
    """Token ids of an answer followed by the end-of-turn token."""
    return tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]


def decoder_and_head(model):
    """``(decoder, lm_head)`` of a causal LM (the trunk that returns hidden states, and the vocabulary projection)."""
    return model.get_decoder(), model.get_output_embeddings()


def prefix_cache(model, prefix: list[int], batch: int, cache=None) -> DynamicCache:
    """Run ``prefix`` (batch 1) and return its cache expanded to ``batch`` rows (differentiable).

    ``cache``: a previous batch-1 prefix cache to expand instead of recomputing (no-grad uses).
    """
    device = next(model.parameters()).device
    if cache is None:
        decoder, _ = decoder_and_head(model)
        cache = returned_cache(decoder(input_ids=torch.tensor([prefix], device=device), use_cache=True))
    layers = [(layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1)) for layer in cache.layers]
    return DynamicCache(ddp_cache_data=layers)


@dataclass
class Batch:
    """Right-padded suffixes (question + answer) of one persona and where their answer tokens are."""

    ids: torch.Tensor  # [B, T] suffix tokens, right-padded
    targets: torch.Tensor  # [B, T] next-token targets, -100 where not an answer token
    valid: torch.Tensor  # [B, T] bool, real (non-pad) tokens


def make_batch(questions: list[list[int]], answers: list[list[int]], pad_id: int) -> Batch:
    """Pack suffix question ids and answer ids; targets mark answer tokens only."""
    rows = [q + a for q, a in zip(questions, answers)]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), length), -100, dtype=torch.long)
    valid = torch.zeros((len(rows), length), dtype=torch.bool)
    for b, (q, a) in enumerate(zip(questions, answers)):
        row = q + a
        ids[b, : len(row)] = torch.tensor(row)
        valid[b, : len(row)] = True
        # position t predicts token t + 1: answer tokens sit at len(q) .. len(row) - 1
        targets[b, len(q) - 1 : len(row) - 1] = torch.tensor(a)
    return Batch(ids, targets, valid)


def answer_logits(model, prefix: list[int], batch: Batch, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the answer positions ``[N, V]`` (float32) and their targets ``[N]``, prefix run once."""
    device = next(model.parameters()).device
    decoder, head = decoder_and_head(model)
    past = prefix_cache(model, prefix, batch.ids.shape[0], cache)
    hidden = decoder(input_ids=batch.ids.to(device), **with_cache(past), use_cache=True).last_hidden_state
    where = batch.targets.to(device) != -100
    return head(hidden[where]).float(), batch.targets.to(device)[where]


def token_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None, kl_weight: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy on answer tokens, plus ``kl_weight * KL(teacher || model)`` if teacher logits are given."""
    loss = F.cross_entropy(logits, targets)
    if teacher_logits is not None and kl_weight > 0:
        loss = loss + kl_weight * kl_divergence(teacher_logits, logits).mean()
    return loss


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(softmax(reference) || softmax(logits))`` in nats."""
    ref = F.log_softmax(reference_logits.float(), dim=-1)
    out = F.log_softmax(logits.float(), dim=-1)
    return (ref.exp() * (ref - out)).sum(-1)


def last_prompt_hidden(model, prefix_past, questions: list[list[int]], pad_id: int) -> torch.Tensor:
    """Hidden state of each question's last prompt token, averaged over decoder layers: ``[Q, d]`` float32 (no grad)."""
    device = next(model.parameters()).device
    decoder, _ = decoder_and_head(model)
    length = max(len(q) for q in questions)
    ids = torch.full((len(questions), length), pad_id, dtype=torch.long)
    for b, q in enumerate(questions):
        ids[b, : len(q)] = torch.tensor(q)
    last = torch.tensor([len(q) - 1 for q in questions])
    with torch.no_grad():
        past = prefix_cache(model, [], len(questions), prefix_past)
        out = decoder(input_ids=ids.to(device), **with_cache(past), use_cache=True, output_hidden_states=True)
        layers = torch.stack(out.hidden_states[1:]).float()  # [L, B, T, d]
        picked = layers[:, torch.arange(len(questions)), last.to(device)]  # [L, B, d]
    return picked.mean(0).cpu()


def encode_prefix(model, prefix: list[int]):
    """The batch-1 key/value cache of ``prefix`` (no grad), for reuse across batches."""
    device = next(model.parameters()).device
    decoder, _ = decoder_and_head(model)
    with torch.no_grad():
        return returned_cache(decoder(input_ids=torch.tensor([prefix], device=device), use_cache=True))
