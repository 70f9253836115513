"""Evaluation items, persona prompts, and batched greedy generation with a persona per batch row.

Generation runs the model with a :class:`~persona_kernels.bank.MaskBank` attached (MLPs through the
masked kernels); ``select(persona_ids)`` — a context manager taking one persona id per batch row,
id 0 = dense — decides which persona each row runs as, so one batch mixes personas. Prompts are
chat-templated (persona as system prompt, or no system prompt for the ``general`` split), left padded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

SPLITS = ("specific", "rolebench", "general")
#: Splits answered with the persona system prompt; ``general`` is answered with no persona prompt.
PERSONA_SPLITS = ("specific", "rolebench")

Selector = Callable[[torch.Tensor], AbstractContextManager]


@dataclass
class EvalItem:
    """One evaluation question. ``split``: ``specific``/``general`` (eval/) or ``rolebench`` (with ``references``)."""

    persona: str
    split: str
    index: int
    question: str
    references: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        """Stable id of the question within its persona, e.g. ``specific/3``."""
        return f"{self.split}/{self.index}"


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_personas(data_dir: str | Path) -> dict[str, dict]:
    """``personas/personas.jsonl`` as ``{id: record}`` (``id``, ``name``, ``kind``, ``description``)."""
    return {row["id"]: row for row in _read_jsonl(Path(data_dir) / "personas" / "personas.jsonl")}


def load_items(data_dir: str | Path, persona: str, max_questions: int | None = None) -> list[EvalItem]:
    """A persona's evaluation questions: eval/ ``specific`` and ``general``, plus RoleBench questions if any.

    ``max_questions`` caps each split separately (first N in file order).
    """
    data_dir = Path(data_dir)
    items: list[EvalItem] = []
    eval_rows = _read_jsonl(data_dir / "eval" / f"{persona}.jsonl")
    for split in ("specific", "general"):
        rows = [r for r in eval_rows if r.get("split") == split][:max_questions]
        items += [EvalItem(persona, split, i, r["question"]) for i, r in enumerate(rows)]
    rolebench = data_dir / "rolebench" / f"{persona}.jsonl"
    if rolebench.is_file():
        rows = _read_jsonl(rolebench)[:max_questions]
        items += [EvalItem(persona, "rolebench", i, r["question"], list(r.get("references") or [])) for i, r in enumerate(rows)]
    return items


def persona_system_prompt(record: dict) -> str:
    """System prompt that makes the dense model play a persona record from personas.jsonl.

    The pruner's own prompt (:func:`pruner.chat.system_prompt`), so evaluation prompts personas
    exactly as the masks were learned.
    """
    from pruner.chat import system_prompt

    return system_prompt(record.get("description") or record.get("name") or record["id"])


def chat_prompt_ids(tokenizer, system: str | None, question: str) -> list[int]:
    """Token ids of the chat-templated prompt ending with the assistant turn's header.

    Without a chat template the prompt is ``system\\n\\nquestion\\n`` tokenized plainly.
    """
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if hasattr(ids, "keys") and "input_ids" in ids:  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    text = (system + "\n\n" if system else "") + question + "\n"
    return list(tokenizer(text).input_ids)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``[B, max_len]`` int64, sequences right-aligned (left padding)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


def _stop_ids(model, tokenizer) -> set[int]:
    stops: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        stops.update(value if isinstance(value, (list, tuple)) else [value])
    return {int(s) for s in stops}


def trim_answer(ids: Sequence[int], stop_ids: set[int], pad_id: int | None = None) -> list[int]:
    """Generated ids up to and including the first stop token (padding after it dropped)."""
    out: list[int] = []
    for token in ids:
        token = int(token)
        out.append(token)
        if token in stop_ids:
            break
    return out


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def generate_batched(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    persona_ids: Sequence[int],
    select: Selector,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Greedy answers for many prompts, each row run as its own persona (``persona_ids[i]``, 0 = dense).

    ``prompts``: token ids per row (already chat-templated). Rows are sorted by length and batched
    with left padding; each batch runs inside ``select(ids[B])``. Returns answer ids per row, trimmed
    after the first stop token (the stop token kept).
    """
    if len(prompts) != len(persona_ids):
        raise ValueError(f"{len(prompts)} prompts but {len(persona_ids)} persona ids")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = _stop_ids(model, tokenizer)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    done = 0
    for batch in _batches(order, batch_size):
        ids, mask = left_pad([prompts[i] for i in batch], pad_id)
        rows = torch.tensor([persona_ids[i] for i in batch], dtype=torch.long, device=device)
        with select(rows):
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad_id, eos_token_id=sorted(stops) or None,
            )
        for row, i in enumerate(batch):
            answers[i] = trim_answer(out[row, ids.shape[1]:].tolist(), stops)
        done += len(batch)
        if progress is not None:
            progress(done, len(prompts))
    return answers


@dataclass
class Answer:
    """One saved answer (a JSONL row of ``answers/<persona>/<method>.jsonl``)."""

    persona: str
    method: str
    entry: str
    split: str
    index: int
    question: str
    system: str | None
    answer: str
    answer_ids: list[int]
    references: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        """Question id within the persona, e.g. ``rolebench/4``."""
        return f"{self.split}/{self.index}"


def save_answers(path: str | Path, answers: Sequence[Answer]) -> None:
    """Write answers as JSONL (atomically: a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(path.suffix + ".partial")
    with temp.open("w", encoding="utf-8") as handle:
        for answer in answers:
            handle.write(json.dumps(asdict(answer), ensure_ascii=False) + "\n")
    temp.replace(path)


def load_answers(path: str | Path) -> list[Answer]:
    """Read a JSONL file written by :func:`save_answers`."""
    return [Answer(**row) for row in _read_jsonl(Path(path))]
