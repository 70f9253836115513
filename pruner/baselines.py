"""Baseline masks at the same sparsity and group size as the learned persona mask.

Each returns a bool keep mask ``[L, n_groups]`` with exactly ``k`` groups kept per layer.
``generic-learned`` (the same mask learning, with the same loss, on generic data) lives in :mod:`pruner.pipeline`
because it shares the learning loop.
"""

from __future__ import annotations

import torch

from persona_kernels.hf.ffn import ffn_weights

from .importance import ChannelStats, down_norms, group_sum
from .masked_model import topk_keep


def random_mask(n_layers: int, n_groups: int, k: int, seed: int = 0) -> torch.Tensor:
    """``k`` groups per layer chosen uniformly at random (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    return topk_keep(torch.rand(n_layers, n_groups, generator=generator), k)


def magnitude_scores(model, group_size: int) -> torch.Tensor:
    """Group L2 norm of all of a group's weights (its gate and up rows and down columns) ``[L, n_groups]``."""
    rows = []
    for w_gate, w_up, w_down in ffn_weights(model):
        per_channel = w_gate.float().pow(2).sum(1) + w_up.float().pow(2).sum(1) + w_down.float().pow(2).sum(0)
        rows.append(per_channel.cpu())
    return group_sum(torch.stack(rows).double(), group_size).sqrt()


def wanda_scores(stats: ChannelStats, model, group_size: int) -> torch.Tensor:
    """Structured Wanda: ``sum_c ||h_c||_rms * ||W_down[:, c]||`` on generic data ``[L, n_groups]``."""
    return group_sum(stats.sq_mean.sqrt() * down_norms(model), group_size)


def flap_scores(stats: ChannelStats, model, group_size: int) -> torch.Tensor:
    """FLAP fluctuation: ``sum_c Var_t(h_c) * ||W_down[:, c]||^2`` on generic data ``[L, n_groups]`` (no bias compensation)."""
    return group_sum(stats.variance * down_norms(model) ** 2, group_size)


def score_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` highest-scoring groups per layer."""
    return topk_keep(scores, k)
