"""Tool calling: BFCL's ``simple_python`` and ``multiple`` items (package bfcl-eval), scored by a small local matcher.

BFCL's own checker imports API clients, so the matching here is ours, after BFCL's AST rules for
these two categories: the answer must be exactly one call, written as ``[name(arg=value, ...)]``
(Python syntax), to the right function, with every required argument, no unknown argument, and
each value among the possible answers (strings compared case-, space- and punctuation-insensitively,
an int accepted for a float, ``""`` in a possible-answer list marking the argument optional).
"""

from __future__ import annotations

import ast
import json
import re

from .items import GenItem
from .packages import BFCL, read_jsonl

SUITE = "tools"
CATEGORIES = ("simple_python", "multiple")
INSTRUCTION = (
    "You can call functions. When the user's request needs one, reply with only the call, in the form "
    "[func_name(param1=value1, param2=value2)] with Python literal values, and no other text.\n"
    "The functions you can call, in JSON:\n"
)


def load_items() -> list[GenItem]:
    """BFCL v4 ``simple_python`` (400) and ``multiple`` (200) items with their possible answers."""
    items = []
    for category in CATEGORIES:
        answers = {row["id"]: row["ground_truth"] for row in read_jsonl(BFCL.file(f"data/possible_answer/BFCL_v4_{category}.json"))}
        for row in read_jsonl(BFCL.file(f"data/BFCL_v4_{category}.json")):
            turns = row["question"][0]
            user = "\n".join(t["content"] for t in turns if t.get("role") == "user")
            items.append(GenItem(SUITE, row["id"], user, {"functions": row["function"], "ground_truth": answers[row["id"]]},
                                 system_extra=INSTRUCTION + json.dumps(row["function"])))
    return items


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    raise ValueError("not a function name")


def parse_calls(answer: str) -> list[tuple[str, dict]]:
    """The calls in an answer as ``[(name, {arg: value})]``; raise ``ValueError`` when it holds none that parse.

    Accepts ``[f(a=1), g(b=2)]``, a bare ``f(a=1)``, and either inside a code fence. Positional
    arguments are refused (BFCL matches by name).
    """
    text = answer.strip()
    fence = re.search(r"```(?:\w+)?\s*\n?(.*?)```", text, re.DOTALL)
    if fence:
        text = fence.group(1).strip()
    start = text.find("[")
    candidates = []
    if start >= 0 and "]" in text[start:]:
        candidates.append(text[start:text.rfind("]") + 1])
    call = re.search(r"[A-Za-z_][\w.]*\s*\(", text)
    if call:
        depth_end = text.rfind(")")
        if depth_end > call.start():
            candidates.append(text[call.start():depth_end + 1])
    for candidate in candidates:
        try:
            tree = ast.parse(candidate, mode="eval").body
        except SyntaxError:
            continue
        nodes = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
        try:
            calls = []
            for node in nodes:
                if not isinstance(node, ast.Call) or node.args:
                    raise ValueError("not a keyword-argument call")
                calls.append((_dotted(node.func), {k.arg: ast.literal_eval(k.value) for k in node.keywords}))
        except (ValueError, TypeError, SyntaxError):
            continue
        if calls:
            return calls
    raise ValueError("no function call in the answer")


def _norm(text: str) -> str:
    return re.sub(r"[ ,./\-_*^]", "", text).lower().replace("'", '"')


def value_matches(value, expected) -> bool:
    """Whether one argument value equals one possible answer under BFCL's loose rules."""
    if isinstance(expected, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(expected, bool) and value == expected
    if isinstance(expected, (int, float)):
        return isinstance(value, (int, float)) and abs(float(value) - float(expected)) < 1e-9
    if isinstance(expected, str):
        return isinstance(value, str) and _norm(value) == _norm(expected)
    if isinstance(expected, (list, tuple)):
        return isinstance(value, (list, tuple)) and len(value) == len(expected) and all(
            value_matches(v, e) for v, e in zip(value, expected))
    if isinstance(expected, dict):
        if not isinstance(value, dict):
            return False
        return _arguments_match(value, {k: v if isinstance(v, list) else [v] for k, v in expected.items()})
    return value == expected


def _arguments_match(arguments: dict, possible: dict) -> bool:
    if set(arguments) - set(possible):
        return False
    for name, options in possible.items():
        if name not in arguments:
            if "" not in options:
                return False
            continue
        if not any(value_matches(arguments[name], option) for option in options if option != ""):
            return False
    return True


def _same_name(called: str, expected: str) -> bool:
    return called == expected or called.replace(".", "_") == expected.replace(".", "_")


def match(calls: list[tuple[str, dict]], ground_truth: list[dict]) -> tuple[bool, str]:
    """Whether ``calls`` match BFCL's possible answers for a simple/multiple item, and why not."""
    if len(calls) != len(ground_truth):
        return False, f"{len(calls)} calls, expected {len(ground_truth)}"
    (name, arguments), ((expected, possible),) = calls[0], ground_truth[0].items()
    if not _same_name(name, expected):
        return False, f"called {name}, expected {expected}"
    if not _arguments_match(arguments, possible):
        return False, "wrong or missing arguments"
    return True, "ok"


def score(item: GenItem, answer: str) -> dict:
    """``correct`` = 1 when the answer is one call that matches a possible answer; ``parsed`` when it has a call at all."""
    try:
        calls = parse_calls(answer)
    except ValueError:
        return {"correct": 0.0, "parsed": 0.0, "why": "no call"}
    ok, why = match(calls, item.data["ground_truth"])
    return {"correct": float(ok), "parsed": 1.0, "why": why}
