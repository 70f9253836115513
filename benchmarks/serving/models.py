"""Model shapes, random Hugging Face Llama models, random correlated mask banks and persona mixes.

Nothing is downloaded: models are ``LlamaForCausalLM(LlamaConfig(...))`` with random weights, built
directly on the target device in the target dtype. Banks are random but *structured* like real
persona masks: each persona keeps the top ``density`` fraction of channel groups by a score that
mixes a shared per-group importance (weight ``overlap``) with private noise, so personas of one
model overlap the way pruned personas of one base model do (``overlap=0``: independent masks;
``overlap=1``: identical masks). The union density of a batch's personas is what a mixed-batch
decode kernel must stream, so every result records it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from persona_kernels.bank import MaskBank, PersonaMask

DEFAULT_DENSITY = 0.5
DEFAULT_GROUP_SIZE = 16
DEFAULT_OVERLAP = 0.9
"""Score correlation between personas; 0.9 gives a union density of about 0.68 over 8 personas at density 0.5."""
N_CORRELATED = 64
"""Correlated personas in the decode bank (ids 1..64)."""
N_INDEPENDENT = 8
"""Independent-mask personas appended after them (ids 65..72), for the worst-case mixed batch."""


@dataclass(frozen=True)
class ModelShape:
    """A Llama decoder's shape (no weights)."""

    name: str
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        """Per-head width ``hidden / heads``."""
        return self.hidden // self.heads

    def llama_config(self, max_positions: int = 4096):
        """The ``transformers.LlamaConfig`` of this shape (SDPA attention, Llama-3 rope base)."""
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.inter,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            vocab_size=self.vocab,
            max_position_embeddings=max_positions,
            rope_theta=500000.0,
            tie_word_embeddings=self.tie_embeddings,
            attn_implementation="sdpa",
        )

    def ffn_params_per_layer(self, density: float = 1.0) -> int:
        """Gate, up and down parameters of one layer keeping ``density`` of the channels."""
        return 3 * self.hidden * round(density * self.inter)

    def attn_params_per_layer(self) -> int:
        """q, k, v, o projection parameters of one layer."""
        kv = self.kv_heads * self.head_dim
        return 2 * self.hidden * self.hidden + 2 * self.hidden * kv

    def lora_params(self, rank: int = 16) -> int:
        """Parameters of a rank-``rank`` LoRA on gate, up and down of every layer (A and B)."""
        return self.layers * 3 * rank * (self.hidden + self.inter)

    def decode_step_bytes(self, batch: int, cache_len: int, ffn_density: float, dtype_bytes: int = 2) -> int:
        """Fewest bytes one decode step must read: attention and kept FFN weights of every layer, the
        LM head, and the whole static KV cache (SDPA reads all ``cache_len`` slots under the mask)."""
        weights = self.layers * (self.attn_params_per_layer() + ffn_density * self.ffn_params_per_layer()) + self.vocab * self.hidden
        kv = 2 * self.layers * batch * self.kv_heads * self.head_dim * cache_len
        return int((weights + kv) * dtype_bytes)


SHAPES: dict[str, ModelShape] = {
    "1b": ModelShape("llama-1b", hidden=2048, inter=8192, layers=16, heads=32, kv_heads=8, vocab=128256, tie_embeddings=True),
    "8b": ModelShape("llama3-8b", hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8, vocab=128256),
    "tiny": ModelShape("tiny-llama", hidden=64, inter=256, layers=2, heads=4, kv_heads=2, vocab=512),
}
"""Shapes by short name: Llama-3.2-1B-like, Llama-3-8B, and the CPU smoke model."""


def build_model(shape: ModelShape, device: torch.device | str, dtype: torch.dtype, seed: int = 0, max_positions: int = 4096):
    """A random-weight ``LlamaForCausalLM`` of ``shape``, created directly on ``device`` in ``dtype``, in eval mode."""
    from transformers import LlamaForCausalLM

    config = shape.llama_config(max_positions)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    model.config.name_or_path = f"random-{shape.name}"
    return model


def correlated_keep(n_personas: int, n_layers: int, n_groups: int, density: float, overlap: float,
                    generator: torch.Generator, shared: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``[n_personas, n_layers, n_groups]`` masks keeping ``round(density * n_groups)`` groups per layer.

    Each persona ranks groups by ``sqrt(overlap) * shared + sqrt(1 - overlap) * noise`` (``shared``:
    ``[n_layers, n_groups]`` importance common to all personas, drawn when ``None``).
    """
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must be in [0, 1], got {overlap}")
    k = max(1, min(n_groups, round(density * n_groups)))
    if shared is None:
        shared = torch.randn(n_layers, n_groups, generator=generator)
    keep = torch.zeros(n_personas, n_layers, n_groups, dtype=torch.bool)
    chunk = 64
    for start in range(0, n_personas, chunk):
        count = min(chunk, n_personas - start)
        noise = torch.randn(count, n_layers, n_groups, generator=generator)
        score = overlap**0.5 * shared + (1.0 - overlap) ** 0.5 * noise
        keep[start : start + count].scatter_(2, score.topk(k, dim=2).indices, True)
    return keep


def make_bank(shape: ModelShape, n_personas: int, *, density: float = DEFAULT_DENSITY, group_size: int = DEFAULT_GROUP_SIZE,
              overlap: float = DEFAULT_OVERLAP, n_independent: int = 0, with_scales: bool = False, seed: int = 0,
              fingerprint: str = "random", base_model: str | None = None) -> MaskBank:
    """A bank of ``n_personas`` correlated personas (ids ``1..n_personas``) then ``n_independent``
    personas with independent masks (``overlap=0``), all at ``density`` with group size ``group_size``.
    ``with_scales`` gives every persona random per-channel scales (``[L, d_ff]`` float32)."""
    generator = torch.Generator().manual_seed(seed)
    n_groups = shape.inter // group_size
    keep = correlated_keep(n_personas, shape.layers, n_groups, density, overlap, generator)
    if n_independent:
        keep = torch.cat([keep, correlated_keep(n_independent, shape.layers, n_groups, density, 0.0, generator)])
    personas = []
    base_scales = 1.0 + 0.1 * torch.randn(shape.layers, shape.inter, generator=generator) if with_scales else None
    for index in range(keep.shape[0]):
        scales = None
        if base_scales is not None:  # cheap to make for 1000 personas; only the bytes matter to the benchmarks
            scales = base_scales * (1.0 + 0.001 * index)
        independent = index >= n_personas
        personas.append(PersonaMask(
            name=f"{'indep' if independent else 'persona'}-{index + 1}",
            keep=keep[index].clone(),
            description=f"random {'independent' if independent else 'correlated'} mask, density {density}",
            method="random-structured",
            scales=scales,
        ))
    return MaskBank(
        base_model=base_model or f"random-{shape.name}",
        fingerprint=fingerprint,
        n_layers=shape.layers,
        d_ff=shape.inter,
        group_size=group_size,
        personas=personas,
    )


def bank_for_model(model, shape: ModelShape, n_personas: int = N_CORRELATED, n_independent: int = N_INDEPENDENT,
                   **kwargs) -> MaskBank:
    """:func:`make_bank` carrying ``model``'s FFN fingerprint and name, so ``attach_bank`` accepts it."""
    from persona_kernels.hf.ffn import model_fingerprint, model_name

    return make_bank(shape, n_personas, n_independent=n_independent, fingerprint=model_fingerprint(model),
                     base_model=model_name(model), **kwargs)


# ------------------------------------------------------------------------------------ persona mixes

MIXES = ("identical", "uniform8", "zipf", "distinct", "uniform8_indep", "dense_id0")
"""Persona mixes of a batch: all rows one persona; uniform over 8 correlated personas; Zipf(1.1) over
64; one persona per row (up to 64); uniform over 8 independent-mask personas; all rows the dense
persona (id 0, the kernel at density 1)."""
ZIPF_EXPONENT = 1.1


def mix_ids(mix: str, batch: int, seed: int = 0, n_correlated: int = N_CORRELATED) -> list[int]:
    """Persona id of every batch row for ``mix`` (see :data:`MIXES`)."""
    generator = torch.Generator().manual_seed(1000 + seed)
    if mix == "identical":
        return [1] * batch
    if mix == "uniform8":
        return (torch.randint(1, 9, (batch,), generator=generator)).tolist()
    if mix == "zipf":
        weights = torch.arange(1, n_correlated + 1, dtype=torch.float64) ** -ZIPF_EXPONENT
        return (torch.multinomial(weights, batch, replacement=True, generator=generator) + 1).tolist()
    if mix == "distinct":
        if batch > n_correlated:
            raise ValueError(f"'distinct' needs batch <= {n_correlated}, got {batch}")
        return list(range(1, batch + 1))
    if mix == "uniform8_indep":
        start = n_correlated + 1
        return (torch.randint(start, start + 8, (batch,), generator=generator)).tolist()
    if mix == "dense_id0":
        return [0] * batch
    raise ValueError(f"unknown mix {mix!r}; expected one of {MIXES}")


def union_density(bank: MaskBank, ids: list[int]) -> float:
    """Mean over layers of the fraction of channel groups kept by at least one persona in ``ids``
    (1.0 when the dense persona 0 is among them): what a mixed-batch decode step must stream."""
    if any(i == 0 for i in ids):
        return 1.0
    keep = torch.stack([bank.personas[i - 1].keep for i in sorted(set(ids))])  # [k, L, n_groups]
    return float(keep.any(0).float().mean())
