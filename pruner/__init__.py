"""Persona-Pruner: learn which FFN channel groups a persona needs, from its description alone.

Pipeline: persona-sensitive instructions (:mod:`pruner.sensitivity`) -> persona-voiced teacher
answers (:mod:`pruner.teacher`) -> top-k straight-through mask learning with frozen weights
(:mod:`pruner.learn`) -> optional per-channel scales -> a mask bank entry. Baselines in
:mod:`pruner.baselines`, judge-free fidelity in :mod:`pruner.fidelity`, CLI in :mod:`pruner.cli`.
"""

from .config import METHODS, PrunerConfig, PrunerInputError
from .fidelity import FidelityEval
from .pipeline import Pruner, prune_persona

__all__ = ["METHODS", "FidelityEval", "PrunerConfig", "PrunerInputError", "Pruner", "prune_persona"]
