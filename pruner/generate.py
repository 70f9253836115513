"""Batched answer generation with a shared prompt prefix (greedy or temperature sampling).

The prefix cache is computed once and expanded to the batch; question prompts are left-padded
after it (masked out, with explicit position ids), so every row continues right after its own
prompt.
"""

from __future__ import annotations

import torch

from .chat import encode_prefix, prefix_cache, returned_cache, with_cache


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    prefix: list[int],
    questions: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    prefix_past=None,
) -> list[str]:
    """Answers (decoded text, end token removed) to tokenized question prompts that follow ``prefix``."""
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.eos_token_id
    batch = len(questions)
    if prefix_past is None:
        prefix_past = encode_prefix(model, prefix)
    n_prefix = prefix_past.get_seq_length()
    length = max(len(q) for q in questions)
    ids = torch.full((batch, length), pad, dtype=torch.long)
    mask = torch.zeros((batch, n_prefix + length), dtype=torch.long)
    mask[:, :n_prefix] = 1
    for b, q in enumerate(questions):
        ids[b, length - len(q):] = torch.tensor(q)
        mask[b, n_prefix + length - len(q):] = 1
    positions = (n_prefix + mask[:, n_prefix:].cumsum(-1) - 1).clamp(min=n_prefix)
    past = prefix_cache(model, prefix, batch, prefix_past)
    generator = torch.Generator().manual_seed(seed)
    done = torch.zeros(batch, dtype=torch.bool)
    produced: list[torch.Tensor] = []
    step_ids, step_pos = ids, positions
    for _ in range(max_new_tokens):
        out = model(
            input_ids=step_ids.to(device), attention_mask=mask.to(device), position_ids=step_pos.to(device),
            use_cache=True, **with_cache(past),
        )
        past = returned_cache(out)
        logits = out.logits[:, -1].float().cpu()
        if temperature > 0:
            token = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator).squeeze(1)
        else:
            token = logits.argmax(-1)
        token = torch.where(done, torch.full_like(token, pad), token)
        produced.append(token)
        done |= token == eos
        if bool(done.all()):
            break
        step_ids = token.unsqueeze(1)
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
    tokens = torch.stack(produced, 1) if produced else torch.zeros(batch, 0, dtype=torch.long)
    answers = []
    for row in tokens.tolist():
        if eos in row:
            row = row[: row.index(eos)]
        answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers
