"""Evaluation items of the capability suites, and seeded subsets of them."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar


@dataclass
class MCItem:
    """A multiple-choice item scored by log-likelihood: ``context`` followed by each continuation in ``choices``.

    Continuations carry their leading space (``" Paris"``); ``gold`` indexes the right one.
    """

    suite: str
    id: str
    context: str
    choices: list[str]
    gold: int


@dataclass
class GenItem:
    """A generative item: a user turn (after the persona system prompt when ``persona_prompt``).

    ``system_extra`` is appended to the system prompt (e.g. the tool list); ``data`` holds what
    the suite's scorer needs (reference answer, tests, schema, attack strings).
    """

    suite: str
    id: str
    user: str
    data: dict = field(default_factory=dict)
    system_extra: str | None = None
    persona_prompt: bool = True


Item = TypeVar("Item", MCItem, GenItem)


def subset(items: Sequence[Item], n: int | None, seed: int = 0) -> list[Item]:
    """``n`` items drawn without replacement with ``random.Random(seed)``, kept in their original order (all if ``n`` is None).

    Indices are drawn one after another (a repeat is drawn again), so with the same seed a smaller
    subset is part of a larger one: a run can grow and keep its caches.
    """
    if n is None or n >= len(items):
        return list(items)
    rng = random.Random(seed)
    chosen: dict[int, None] = {}
    while len(chosen) < n:
        chosen.setdefault(rng.randrange(len(items)), None)
    return [items[i] for i in sorted(chosen)]
