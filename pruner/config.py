"""Configuration of a Persona-Pruner run and its up-front validation (nothing runs before it passes)."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from persona_kernels.bank import MAX_DESCRIPTION_CHARS

METHODS = ("persona-pruner", "random", "magnitude", "wanda", "flap", "generic-learned")
BASELINES = METHODS[1:]


class PrunerInputError(ValueError):
    """Bad input to the pruner (description, sparsity, group size, model), raised before any work."""


@dataclass
class PrunerConfig:
    """Everything a Persona-Pruner run needs besides the model and the persona.

    The defaults are a demo budget for a 135M model on a 2-core CPU (a few minutes per persona).
    """

    sparsity: float = 0.5  # fraction of FFN channels removed per layer
    group_size: int = 16  # channels per mask group (must divide d_ff)
    # calibration data
    pool: str | None = None  # JSONL of {"instruction": ...}; None: the package's generic pool
    max_pool: int = 200  # instructions of the pool scored for persona sensitivity
    keep_fraction: float = 0.4  # most persona-sensitive fraction kept
    n_train: int = 40  # at most this many kept instructions get teacher answers
    max_new_tokens: int = 48  # teacher answer length
    temperature: float = 0.0  # 0: greedy teacher
    teacher_model: str | None = None  # local HF dir of another teacher model; None: the base model
    teacher_endpoint: str | None = None  # OpenAI-compatible base URL
    teacher_endpoint_model: str | None = None
    # mask learning
    steps: int = 30
    batch_size: int = 4
    lr: float = 0.05
    ste: str = "identity"  # straight-through gradient: "identity" or "sigmoid"
    kl_weight: float = 1.0  # + KL(dense persona || masked) on answer tokens (measured better; docs/PRUNER.md)
    scales: bool = True  # learn one scale per kept channel after the mask
    scale_steps: int = 20
    scale_lr: float = 0.05  # 0.01 barely moved the scales in a few steps (docs/SCALES.md)
    scale_kl_weight: float = 10.0  # scales fit the dense persona's distribution better than its greedy tokens (docs/SCALES.md)
    input_gains: bool = False  # also learn one gain per FFN input dimension, jointly with the scales (docs/SCALES.md)
    gain_lr: float = 0.01
    output_bias: bool = False  # also learn one FFN output bias per hidden dimension, jointly with the scales (docs/SCALES.md)
    bias_lr: float = 0.005  # 0.05 made the bias hurt on the two personas measured (docs/SCALES.md)
    checkpoint_every: int = 10
    seed: int = 0
    cache_dir: str | None = None  # None: $PERSONA_KERNELS_CACHE/pruner or ~/.cache/persona-kernels/pruner
    progress: bool = True
    baselines: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        """JSON-able copy (for reports)."""
        data = asdict(self)
        data["baselines"] = list(self.baselines)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> PrunerConfig:
        """The config a report's ``config`` (:meth:`to_dict`) records; keys this version does not know are ignored."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        if "baselines" in values:
            values["baselines"] = tuple(values["baselines"])
        return cls(**values)

    def cache_path(self) -> Path:
        """The directory for cached data, statistics and checkpoints."""
        if self.cache_dir:
            return Path(self.cache_dir)
        from persona_kernels.hf.gguf_cache import cache_root

        return cache_root() / "pruner"

    def validate(self) -> None:
        """Raise :class:`PrunerInputError` for settings that cannot work."""
        if not isinstance(self.sparsity, (int, float)) or not 0.0 < float(self.sparsity) < 1.0:
            raise PrunerInputError(f"sparsity must be strictly between 0 and 1, got {self.sparsity!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise PrunerInputError(f"group size must be a positive integer, got {self.group_size!r}")
        if not 0.0 < self.keep_fraction <= 1.0:
            raise PrunerInputError(f"keep fraction must be in (0, 1], got {self.keep_fraction}")
        for name in ("max_pool", "n_train", "max_new_tokens", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise PrunerInputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.steps < 0 or self.scale_steps < 0:
            raise PrunerInputError("steps and scale_steps must be non-negative")
        if self.ste not in ("identity", "sigmoid"):
            raise PrunerInputError(f"ste must be 'identity' or 'sigmoid', got {self.ste!r}")
        if self.input_gains and not self.scales:
            raise PrunerInputError("input gains are learned together with the scales; drop --no-scales or --input-gains")
        if self.output_bias and not self.scales:
            raise PrunerInputError("the output bias is learned together with the scales; drop --no-scales or --output-bias")
        for name in ("scale_lr", "gain_lr", "bias_lr"):
            if getattr(self, name) <= 0:
                raise PrunerInputError(f"{name} must be positive, got {getattr(self, name)}")
        if self.kl_weight < 0 or self.scale_kl_weight < 0:
            raise PrunerInputError(f"kl weights must be non-negative, got {self.kl_weight} and {self.scale_kl_weight}")
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise PrunerInputError(f"unknown baselines {unknown}; choose from {list(BASELINES)} or 'all'")
        if bool(self.teacher_endpoint) != bool(self.teacher_endpoint_model):
            raise PrunerInputError("--teacher-endpoint and --teacher-model must be given together")
        if self.pool is not None and not Path(self.pool).is_file():
            raise PrunerInputError(f"instruction pool {self.pool!r} does not exist")


def add_scale_arguments(parser: argparse.ArgumentParser, steps: int | None = None) -> None:
    """``--scale-steps``, ``--scale-lr``, ``--scale-kl-weight``, ``--input-gains``, ``--gain-lr``, ``--output-bias``
    and ``--bias-lr``, defaulting to :class:`PrunerConfig`'s (or ``steps``)."""
    parser.add_argument("--scale-steps", type=int, default=PrunerConfig.scale_steps if steps is None else steps,
                        help="scale learning steps (scales want more data than masks)")
    parser.add_argument("--scale-lr", type=float, default=PrunerConfig.scale_lr)
    parser.add_argument("--scale-kl-weight", type=float, default=PrunerConfig.scale_kl_weight,
                        help="weight of KL to the dense persona in the scales' loss (answer cross-entropy has weight 1)")
    parser.add_argument("--input-gains", action="store_true",
                        help="also learn a per-persona gain on each FFN input dimension, jointly with the scales")
    parser.add_argument("--gain-lr", type=float, default=PrunerConfig.gain_lr, help="learning rate of the input gains")
    parser.add_argument("--output-bias", action="store_true",
                        help="also learn a per-persona bias on each FFN output dimension, jointly with the scales")
    parser.add_argument("--bias-lr", type=float, default=PrunerConfig.bias_lr, help="learning rate of the output bias")


def validate_description(description: str) -> str:
    """The stripped description, or :class:`PrunerInputError` if it is empty or too long."""
    if not isinstance(description, str) or not description.strip():
        raise PrunerInputError("the persona description is empty; describe the persona in a sentence or more")
    text = description.strip()
    if len(text) > MAX_DESCRIPTION_CHARS:
        raise PrunerInputError(f"the persona description has {len(text)} characters; the limit is {MAX_DESCRIPTION_CHARS}")
    return text


def validate_name(name: str) -> str:
    """The persona's bank name, or :class:`PrunerInputError`."""
    if not isinstance(name, str) or not name.strip() or name.strip() == "dense" or "@" in name.strip():
        raise PrunerInputError(f"persona name {name!r} is empty, reserved ('dense') or contains '@' (used for baselines)")
    return name.strip()


def check_model(model, group_size: int) -> tuple[int, int]:
    """``(n_layers, d_ff)`` of a gated-FFN model; :class:`PrunerInputError` if unsupported or G does not divide d_ff."""
    from persona_kernels.hf.ffn import model_ffn_shape

    try:
        n_layers, d_ff, _ = model_ffn_shape(model)
    except ValueError as error:
        raise PrunerInputError(f"the model has no supported gated FFN: {error}") from error
    if d_ff % group_size:
        raise PrunerInputError(f"group size {group_size} does not divide the model's d_ff {d_ff}")
    return n_layers, d_ff
