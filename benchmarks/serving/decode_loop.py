"""Greedy decode of a Hugging Face causal LM with a static KV cache, optionally one CUDA graph per step.

Why not ``model.generate``: the benchmark needs one decode step captured as a CUDA graph and
replayed back to back (host overhead out of the way, as a serving engine runs it), without
``torch.compile`` (minutes of compilation per batch size would not fit the GPU lease). The loop is
the same computation as ``generate(do_sample=False)`` with ``cache_implementation="static"``; the
smoke test checks that both give the same tokens.

One decode step, captured whole: the forward of the last token (the static cache advances its own
device-side length), the arg-max, and the writes of the new token into the input buffer and the
output table. Replaying the graph ``n`` times decodes ``n`` tokens with no host work in between.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from benchmarks import common


def make_static_cache(model, batch: int, max_len: int):
    """A ``transformers.StaticCache`` for ``batch`` rows and ``max_len`` positions (old and new signatures)."""
    from transformers import StaticCache

    try:
        return StaticCache(config=model.config, max_cache_len=max_len)
    except TypeError:  # transformers < 4.56: batch, device and dtype up front
        param = next(model.parameters())
        return StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_len, device=param.device, dtype=param.dtype)


def _cache_keyword(model) -> str:
    """The forward's name for the cache argument (``cache`` from transformers 5.2x on, else ``past_key_values``)."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _logits_keyword(model) -> str | None:
    params = inspect.signature(type(model).forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return name
    return None


class StaticGreedyDecoder:
    """Greedy decoding of ``batch`` rows: ``prompt_len`` prompt tokens then ``new_tokens`` new ones.

    ``before_decode``: optional host callback run after every prefill and before decode steps are
    captured or replayed (an attached model needs none: its forward pre-hook re-expands persona ids
    inside every step, captured too). Token 0 of the output comes from the prefill, tokens ``1..``
    from decode steps.
    """

    def __init__(self, model, batch: int, prompt_len: int, new_tokens: int,
                 before_decode: Callable[[], object] | None = None):
        if new_tokens < 1:
            raise ValueError("new_tokens must be at least 1")
        self.model = model
        self.batch = batch
        self.prompt_len = prompt_len
        self.new_tokens = new_tokens
        self.before_decode = before_decode
        self.device = next(model.parameters()).device
        self.cache = make_static_cache(model, batch, prompt_len + new_tokens)
        self._cache_kw = _cache_keyword(model)
        self._logits_kw = _logits_keyword(model)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.output = torch.zeros(batch, new_tokens, dtype=torch.long, device=self.device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.steps_since_prefill = 0

    def _forward(self, input_ids: torch.Tensor, last_only: bool) -> torch.Tensor:
        kwargs = {self._cache_kw: self.cache, "use_cache": True}
        if last_only and self._logits_kw is not None:
            kwargs[self._logits_kw] = 1
        return self.model(input_ids=input_ids, **kwargs).logits[:, -1]

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> None:
        """Reset the cache and run the prompt ``[batch, prompt_len]`` (eager); writes output token 0."""
        if tuple(prompt.shape) != (self.batch, self.prompt_len):
            raise ValueError(f"prompt must be [{self.batch}, {self.prompt_len}], got {tuple(prompt.shape)}")
        self.cache.reset()
        first = self._forward(prompt, last_only=True).argmax(-1)
        self.output.zero_()
        self.output[:, 0] = first
        self.token.copy_(first[:, None])
        self.step_index.fill_(1)
        self.steps_since_prefill = 0
        if self.before_decode is not None:
            self.before_decode()

    @torch.no_grad()
    def step(self) -> None:
        """One decode step, eager: forward the current token, write the next one (graph-capturable)."""
        nxt = self._forward(self.token, last_only=False).argmax(-1)
        self.token.copy_(nxt[:, None])
        self.output.index_copy_(1, self.step_index, nxt[:, None])
        self.step_index.add_(1)

    def capture(self, prompt: torch.Tensor, warmup_steps: int = 2) -> None:
        """Warm up (eager, side stream: JIT compiles and autotunes run here) and capture :meth:`step`
        as a CUDA graph (:func:`benchmarks.common.capture_graph`).

        Leaves the decoder freshly prefilled, ready for :meth:`decode`.
        """
        warmup_steps = max(0, min(warmup_steps, self.new_tokens - 2))
        self.prefill(prompt)
        self.graph = common.capture_graph(self.step, warmup=warmup_steps)
        self.prefill(prompt)  # capture recorded but did not run; warm-up steps advanced the cache

    def decode(self, n_steps: int, use_graph: bool | None = None) -> None:
        """Run ``n_steps`` decode steps (graph replays when captured, unless ``use_graph`` is False)."""
        if self.steps_since_prefill + n_steps > self.new_tokens - 1:
            raise ValueError(f"{n_steps} more steps would overrun the {self.new_tokens - 1} decode steps of one prefill")
        graph = self.graph if use_graph in (None, True) else None
        if use_graph and graph is None:
            raise RuntimeError("no CUDA graph captured; call capture() first")
        for _ in range(n_steps):
            if graph is not None:
                graph.replay()
            else:
                self.step()
        self.steps_since_prefill += n_steps

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, use_graph: bool | None = None) -> torch.Tensor:
        """Prefill and decode every new token; returns a copy of the ``[batch, new_tokens]`` tokens."""
        self.prefill(prompt)
        self.decode(self.new_tokens - 1, use_graph)
        return self.output.clone()

    def release(self) -> None:
        """Drop the CUDA graph (its memory pool returns to the caching allocator)."""
        self.graph = None
