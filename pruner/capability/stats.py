"""Bootstrap confidence intervals for suite scores and for paired drops from the dense model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_mean(values: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """``{mean, lo, hi, n}``: the mean and its percentile-bootstrap interval (items resampled with replacement).

    With fewer than two values the interval is the mean itself.
    """
    x = np.asarray([v for v in values if v is not None], dtype=float)
    if x.size == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    mean = float(x.mean())
    if x.size < 2:
        return {"mean": mean, "lo": mean, "hi": mean, "n": int(x.size)}
    rng = np.random.default_rng(seed)
    draws = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(draws, [alpha, 1 - alpha])
    return {"mean": mean, "lo": float(lo), "hi": float(hi), "n": int(x.size)}


def paired_drop(dense: Sequence[float], method: Sequence[float], n_boot: int = 2000, seed: int = 0,
                level: float = 0.95) -> dict:
    """Drop from dense, ``mean(dense - method)`` over the same items, with a paired bootstrap interval.

    Pairs where either side is ``None`` are left out. Positive = the method scores lower than dense.
    """
    if len(dense) != len(method):
        raise ValueError(f"paired drop needs equal lengths, got {len(dense)} and {len(method)}")
    diffs = [d - m for d, m in zip(dense, method) if d is not None and m is not None]
    return bootstrap_mean(diffs, n_boot, seed, level)
