"""Persona-sensitivity filter: keep the instructions whose prompt representation the persona moves most.

For an instruction, the signature under a system prompt is the hidden state of the last prompt
token averaged over decoder layers. Its sensitivity to the target persona is the mean cosine
distance between the target's signature and each reference persona's. Reference signatures do
not depend on the target, so they are computed once per (model, pool) and cached on disk.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .chat import encode_prefix, last_prompt_hidden, split_prompts, system_prompt
from .data import text_hash


def signatures(model, tokenizer, description: str | None, instructions: list[str], batch_size: int = 32,
               progress: bool = True) -> torch.Tensor:
    """``[N, d]`` last-prompt-token hidden states (layer mean) of ``instructions`` under a persona's system prompt."""
    prompts = split_prompts(tokenizer, system_prompt(description), instructions)
    past = encode_prefix(model, prompts.prefix)
    pad = tokenizer.eos_token_id
    parts = []
    for start in tqdm(range(0, len(instructions), batch_size), desc="persona signatures", disable=not progress, leave=False):
        parts.append(last_prompt_hidden(model, past, prompts.questions[start : start + batch_size], pad))
    return torch.cat(parts)


def reference_signatures(model, tokenizer, references: list[str], instructions: list[str], cache_dir: Path | None,
                         fingerprint: str, progress: bool = True) -> torch.Tensor:
    """``[R, N, d]`` signatures under each reference persona, loaded from / saved to ``cache_dir`` when given."""
    key = text_hash("\n".join([fingerprint, *references, "\x00", *instructions]))
    path = None if cache_dir is None else Path(cache_dir) / f"reference_signatures_{key}.pt"
    if path is not None and path.is_file():
        return torch.load(path)
    result = torch.stack([signatures(model, tokenizer, r, instructions, progress=progress) for r in references])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_suffix(".partial")
        torch.save(result, temp)
        temp.replace(path)
    return result


def sensitivity(target: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """``[N]`` mean cosine distance between target signatures ``[N, d]`` and reference ones ``[R, N, d]``."""
    cosine = torch.nn.functional.cosine_similarity(target.unsqueeze(0), references, dim=-1)  # [R, N]
    return (1.0 - cosine).mean(0)


def select_sensitive(scores: torch.Tensor, keep_fraction: float) -> list[int]:
    """Indices of the ``keep_fraction`` most sensitive instructions, most sensitive first (ties by index)."""
    count = max(1, round(keep_fraction * scores.numel()))
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return order[:count]
