"""Learning a persona's top-k channel-group mask (straight-through) and then its per-channel scales.

Weights stay frozen; only ``scores [L, n_groups]`` (then ``scales [L, d_ff]``, optionally with FFN
input gains and an FFN output bias, each ``[L, d_model]``) are trained, with Adam, on next-token cross-entropy over answer tokens
(optionally + KL to the dense model's logits).
Batches follow a seeded per-epoch permutation that depends only on (seed, step), so a run resumed
from a checkpoint (scores/scales, optimizer, step, loss curve; written atomically every N steps)
gives the same result as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from persona_kernels.hf.ffn import model_ffn_shape

from .chat import Batch, answer_logits, encode_prefix, make_batch, token_loss
from .masked_model import channel_multiplier, expand_groups, freeze, input_gain, output_bias, ste_mask, topk_keep


@dataclass
class TrainingData:
    """One persona's tokenized training sequences: a shared prefix, question suffixes and answers."""

    prefix: list[int]
    questions: list[list[int]]
    answers: list[list[int]]
    pad_id: int

    def __len__(self) -> int:
        return len(self.questions)

    def batch(self, indices: list[int]) -> Batch:
        """The padded batch of the given sequences."""
        return make_batch([self.questions[i] for i in indices], [self.answers[i] for i in indices], self.pad_id)

    def batches(self, size: int) -> list[Batch]:
        """All sequences in order, in batches of ``size``."""
        return [self.batch(list(range(s, min(s + size, len(self))))) for s in range(0, len(self), size)]


@dataclass
class LearnResult:
    """A learned tensor (scores or scales), its loss curve ``[(step, loss)]`` and timing."""

    value: torch.Tensor
    curve: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_at: int = 0


@dataclass
class Recovery:
    """What :func:`learn_scales` learns for a persona: ``scales [L, d_ff]`` (1 on dropped channels) and,
    when asked for, ``input_gains`` and ``output_bias`` (``[L, d_model]`` each, else ``None``)."""

    scales: torch.Tensor
    input_gains: torch.Tensor | None = None
    output_bias: torch.Tensor | None = None


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the batch at ``step``: consecutive slices of seeded per-epoch permutations of ``range(n)``."""
    indices = []
    position = step * batch_size
    while len(indices) < min(batch_size, n):
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        take = min(batch_size - len(indices), n - offset)
        indices += order[offset : offset + take]
        position += take
    return indices


def _save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".partial")
    torch.save(state, temp)
    temp.replace(path)


def _optimize(model, data: TrainingData, parameter: torch.Tensor, apply: Callable[[torch.Tensor], AbstractContextManager],
              steps: int, lr: float, kl_weight: float, batch_size: int, seed: int, checkpoint: Path | None,
              checkpoint_every: int, desc: str, progress: bool, stop_after: int | None) -> LearnResult:
    """Adam on ``parameter`` for ``steps`` steps of the answer loss of the model run inside ``apply(parameter)``
    (shared by masks and scales)."""
    freeze(model)
    parameter = parameter.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([parameter], lr=lr)
    start, curve = 0, []
    state = torch.load(checkpoint) if checkpoint is not None and checkpoint.is_file() else None
    if state is not None and state["step"] <= steps:  # a checkpoint past ``steps`` is not this run's prefix
        with torch.no_grad():
            parameter.copy_(state["value"])
        optimizer.load_state_dict(state["optimizer"])
        start, curve = state["step"], [tuple(x) for x in state["curve"]]
    began = time.perf_counter()
    dense_past = encode_prefix(model, data.prefix) if kl_weight > 0 else None
    bar = tqdm(total=steps, initial=start, desc=desc, disable=not progress, leave=False)
    for step in range(start, steps):
        if stop_after is not None and step >= stop_after:
            break
        batch = data.batch(batch_indices(len(data), batch_size, step, seed))
        teacher = None
        if dense_past is not None:
            with torch.no_grad():
                teacher, _ = answer_logits(model, data.prefix, batch, dense_past)
        with apply(parameter):
            logits, targets = answer_logits(model, data.prefix, batch)
            loss = token_loss(logits, targets, teacher, kl_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append((step, float(loss.detach())))
        bar.update(1)
        bar.set_postfix(loss=f"{curve[-1][1]:.3f}")
        done = step + 1
        if checkpoint is not None and (done % checkpoint_every == 0 or done == steps):
            _save(checkpoint, {"value": parameter.detach().clone(), "optimizer": optimizer.state_dict(), "step": done, "curve": curve})
    bar.close()
    return LearnResult(parameter.detach().clone(), curve, time.perf_counter() - began, start)


def learn_mask(model, data: TrainingData, init_scores: torch.Tensor, k: int, group_size: int, *, steps: int, lr: float,
               batch_size: int, seed: int, ste: str = "identity", kl_weight: float = 0.0, checkpoint: Path | None = None,
               checkpoint_every: int = 10, progress: bool = True, stop_after: int | None = None) -> tuple[torch.Tensor, LearnResult]:
    """Learn scores ``[L, n_groups]`` from ``init_scores``; return the final top-``k`` keep mask and the run's result."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device

    def apply(scores: torch.Tensor) -> AbstractContextManager:
        return channel_multiplier(model, lambda: expand_groups(ste_mask(scores, k, ste), group_size).to(device))

    result = _optimize(model, data, init_scores.float(), apply, steps, lr, kl_weight, batch_size, seed, checkpoint,
                       checkpoint_every, "mask learning", progress, stop_after)
    return topk_keep(result.value, k), result


def learn_scales(model, data: TrainingData, keep: torch.Tensor, group_size: int, *, steps: int, lr: float, batch_size: int,
                 seed: int, kl_weight: float = 0.0, input_gains: bool = False, gain_lr: float = 0.01,
                 bias: bool = False, bias_lr: float = 0.005, checkpoint: Path | None = None, checkpoint_every: int = 10,
                 progress: bool = True, stop_after: int | None = None) -> tuple[Recovery, LearnResult]:
    """Learn one scale per channel (init 1) with ``keep`` fixed and, jointly, with ``input_gains`` one gain per
    FFN input dimension (init 1, step ``gain_lr``) and with ``bias`` one FFN output bias per hidden dimension
    (init 0, step ``bias_lr``), per layer; return the :class:`Recovery` and the loss curve."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    channel = expand_groups(keep.float(), group_size)
    d_ff = channel.shape[1]
    d_model = model_ffn_shape(model)[2]
    # Gains and bias ride in the same tensor as the scales (init 1): value = base + (p - 1) * extra_lr / lr
    # makes Adam's step on them extra_lr (Adam is invariant to the gradient's scale), with one optimizer
    # and checkpoint.
    extras = [(name, hook, base, extra_lr) for name, wanted, hook, base, extra_lr in
              (("input_gains", input_gains, input_gain, 1.0, gain_lr), ("output_bias", bias, output_bias, 0.0, bias_lr))
              if wanted]

    def extra(parameter: torch.Tensor, index: int) -> torch.Tensor:
        _, _, base, extra_lr = extras[index]
        return base + (parameter[:, d_ff + index * d_model : d_ff + (index + 1) * d_model] - 1) * (extra_lr / lr)

    @contextlib.contextmanager
    def apply(parameter: torch.Tensor) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(channel_multiplier(model, lambda: (channel * parameter[:, :d_ff]).to(device)))
            for index, (_, hook, _, _) in enumerate(extras):
                stack.enter_context(hook(model, lambda index=index: extra(parameter, index).to(device)))
            yield

    start = torch.ones(channel.shape[0], d_ff + len(extras) * d_model)
    result = _optimize(model, data, start, apply, steps, lr, kl_weight, batch_size, seed + 1,
                       checkpoint, checkpoint_every, "scale learning", progress, stop_after)
    value = result.value.detach()
    scales = torch.where(channel.bool(), value[:, :d_ff], torch.ones_like(channel))
    return Recovery(scales, **{name: extra(value, index) for index, (name, _, _, _) in enumerate(extras)}), result


@torch.no_grad()
def mean_loss(model, data: TrainingData, keep: torch.Tensor | None, group_size: int, scales: torch.Tensor | None = None,
              batch_size: int = 8) -> float:
    """Mean answer-token cross-entropy of the model masked by ``keep`` (``None``: dense) over all of ``data``."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    past = encode_prefix(model, data.prefix) if keep is None else None
    for batch in data.batches(batch_size):
        if keep is None:
            logits, targets = answer_logits(model, data.prefix, batch, past)
        else:
            factor = expand_groups(keep.float(), group_size) * (1 if scales is None else scales)
            with channel_multiplier(model, factor.to(device)):
                logits, targets = answer_logits(model, data.prefix, batch)
        total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        count += targets.numel()
    return total / max(count, 1)
