"""Channel statistics on calibration data and the importance scores built from them.

Statistics are per layer and channel, over real tokens of the calibration sequences (question
and answer tokens; the shared prefix is counted once per batch): mean ``|h|``, mean ``h``, mean
``h^2``, where ``h = act(gate x) * (up x)`` is the down projection's input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from persona_kernels.hf.ffn import ffn_weights

from .chat import Batch, decoder_and_head, prefix_cache, returned_cache, with_cache
from .masked_model import ffn_activation_hook


@dataclass
class ChannelStats:
    """Per-layer, per-channel activation moments ``[L, d_ff]`` (float64) and the token count."""

    abs_mean: torch.Tensor
    mean: torch.Tensor
    sq_mean: torch.Tensor
    tokens: int

    @property
    def variance(self) -> torch.Tensor:
        """Per-channel variance across tokens."""
        return (self.sq_mean - self.mean**2).clamp(min=0)

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Tensors for saving."""
        return {"abs_mean": self.abs_mean, "mean": self.mean, "sq_mean": self.sq_mean, "tokens": torch.tensor(self.tokens)}

    @staticmethod
    def from_dict(data: dict[str, torch.Tensor]) -> "ChannelStats":
        """Inverse of :meth:`to_dict`."""
        return ChannelStats(data["abs_mean"], data["mean"], data["sq_mean"], int(data["tokens"]))


@torch.no_grad()
def collect_stats(model, prefix: list[int], batches: list[Batch], progress: bool = True) -> ChannelStats:
    """Activation moments of every FFN channel over the real tokens of ``batches`` (all with prompt ``prefix``)."""
    n_layers = len(ffn_weights(model))
    d_ff = ffn_weights(model)[0][0].shape[0]
    sums = torch.zeros(3, n_layers, d_ff, dtype=torch.float64)
    count = {"tokens": 0}
    current: dict[str, torch.Tensor] = {}

    def observe(layer: int, h: torch.Tensor) -> None:
        flat = h.reshape(-1, h.shape[-1]).double()
        if "valid" in current:
            flat = flat[current["valid"].reshape(-1)]
        sums[0, layer] += flat.abs().sum(0).cpu()
        sums[1, layer] += flat.sum(0).cpu()
        sums[2, layer] += (flat * flat).sum(0).cpu()
        if layer == 0:
            count["tokens"] += flat.shape[0]

    decoder, _ = decoder_and_head(model)
    device = next(model.parameters()).device
    with ffn_activation_hook(model, observe):
        current.pop("valid", None)
        past = returned_cache(decoder(input_ids=torch.tensor([prefix], device=device), use_cache=True))
        for batch in tqdm(batches, desc="channel statistics", disable=not progress, leave=False):
            current["valid"] = batch.valid.to(device)
            decoder(input_ids=batch.ids.to(device), use_cache=True, **with_cache(prefix_cache(model, prefix, batch.ids.shape[0], past)))
    total = max(count["tokens"], 1)
    return ChannelStats(sums[0] / total, sums[1] / total, sums[2] / total, count["tokens"])


def group_sum(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[L, d_ff]`` -> ``[L, n_groups]`` sums over each group's channels."""
    return values.reshape(values.shape[0], -1, group_size).sum(-1)


def down_norms(model) -> torch.Tensor:
    """``[L, d_ff]`` L2 norms of the down projection's columns ``||W_down[:, c]||``."""
    return torch.stack([w_down.float().norm(dim=0).cpu() for _, _, w_down in ffn_weights(model)]).double()


def activation_importance(stats: ChannelStats, model, group_size: int) -> torch.Tensor:
    """Wanda-style group importance ``sum_c mean|h_c| * ||W_down[:, c]||`` ``[L, n_groups]``."""
    return group_sum(stats.abs_mean * down_norms(model), group_size)


def scores_from_importance(importance: torch.Tensor) -> torch.Tensor:
    """Initial learnable scores: per-layer z-scored log importance (only the order within a layer matters to top-k)."""
    log = importance.double().clamp(min=1e-30).log()
    z = (log - log.mean(-1, keepdim=True)) / log.std(-1, keepdim=True).clamp(min=1e-12)
    return z.float()
