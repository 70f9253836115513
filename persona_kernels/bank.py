"""The mask bank: many personas' FFN channel-group masks for one base model (docs/FORMAT.md).

In memory a persona is a :class:`PersonaMask` (a bool ``[L, n_groups]`` keep mask, optional
``[L, d_ff]`` channel scales, optional ``[L, d_model]`` FFN input gains and FFN output bias); a
:class:`MaskBank` holds them with the base model's identity.
Persona ids are 1-based positions in the bank; id 0 is reserved for the dense model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .masks import channel_keep, keep_to_bits

FORMAT_NAME = "persona-kernels-mask-bank"
FORMAT_VERSION = 1
DENSE_PERSONA_ID = 0
DENSE_PERSONA_NAME = "dense"
MAX_DESCRIPTION_CHARS = 4000
HIDDEN_VECTORS = {"input_gains": ("input gains", 1.0), "output_bias": ("output bias", 0.0)}
"""Per-persona ``[L, d_model]`` fields: attribute -> (what error messages call it, value meaning "none")."""


class MaskBankError(ValueError):
    """A mask bank is malformed, corrupt, or used with the wrong model."""


class ModelMismatchError(MaskBankError):
    """A mask bank was made for a different base model than the one it is applied to."""


@dataclass
class PersonaMask:
    """One persona: which channel groups each FFN layer keeps, with optional scales, input gains and output bias.

    ``keep``: bool ``[L, n_groups]``. ``scales``: float32 ``[L, d_ff]`` (only kept channels matter)
    or ``None`` for all ones. ``input_gains``: float32 ``[L, d_model]``, multiplying each FFN's input
    (the normalised hidden state) before the gate and up projections, or ``None`` for all ones.
    ``output_bias``: float32 ``[L, d_model]``, added to each FFN's output, or ``None`` for zeros.
    ``report``: free-form JSON-able training report.
    """

    name: str
    keep: torch.Tensor
    description: str = ""
    method: str = "unknown"
    scales: torch.Tensor | None = None
    report: dict = field(default_factory=dict)
    input_gains: torch.Tensor | None = None
    output_bias: torch.Tensor | None = None

    @property
    def sparsity(self) -> float:
        """Fraction of FFN channels removed, over all layers."""
        return 1.0 - float(self.keep.float().mean()) if self.keep.numel() else 0.0

    def layer_sparsity(self) -> list[float]:
        """Fraction of channels removed in each layer."""
        return [1.0 - float(row.float().mean()) for row in self.keep]


@dataclass
class MaskBank:
    """Masks of many personas over one base model, plus the model's identity.

    ``permutation``: optional int ``[L, d_ff]`` channel permutation shared by all personas; masks
    and scales index channels in permuted (packed) order (see :mod:`persona_kernels.layout`).
    """

    base_model: str
    fingerprint: str
    n_layers: int
    d_ff: int
    group_size: int
    personas: list[PersonaMask] = field(default_factory=list)
    permutation: torch.Tensor | None = None
    weight_sample: torch.Tensor | None = None
    weight_dtype: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`MaskBankError` unless the bank is consistent (what loading it back requires).

        Run at construction and by :meth:`save`, so a bank edited in place since (a renamed or
        appended persona) cannot be written as a file that will not load.
        """
        if self.n_layers < 1 or self.d_ff < 1:
            raise MaskBankError(f"n_layers ({self.n_layers}) and d_ff ({self.d_ff}) must be positive")
        if self.group_size < 1 or self.d_ff % self.group_size != 0:
            raise MaskBankError(f"group size {self.group_size} does not divide d_ff {self.d_ff}")
        if self.permutation is not None:
            self.permutation = _checked_permutation(self.permutation, self.n_layers, self.d_ff)
        for persona in self.personas:
            self._check_persona(persona)
        self._check_hidden_widths(self.personas)
        if self.weight_sample is not None and (self.weight_sample.dim() != 1 or not self.weight_sample.is_floating_point()):
            raise MaskBankError(f"weight_sample must be a float vector, got {self.weight_sample.dtype} {list(self.weight_sample.shape)}")
        names = [p.name for p in self.personas]
        if len(set(names)) != len(names):
            raise MaskBankError(f"duplicate persona names in bank: {sorted(n for n in set(names) if names.count(n) > 1)}")

    @property
    def n_groups(self) -> int:
        """Channel groups per layer."""
        return self.d_ff // self.group_size

    @property
    def hidden_width(self) -> int | None:
        """``d_model`` of the personas' FFN input gains and output biases, or ``None`` when no persona has either."""
        widths = {getattr(p, key).shape[1] for p in self.personas for key in HIDDEN_VECTORS if getattr(p, key) is not None}
        return widths.pop() if widths else None

    @property
    def names(self) -> list[str]:
        """Persona names in id order (id = position + 1)."""
        return [p.name for p in self.personas]

    def persona_id(self, persona: str | int | None) -> int:
        """Resolve a persona name, id, ``None`` or ``"dense"`` to its integer id (0 = dense)."""
        if persona is None or persona == DENSE_PERSONA_NAME:
            return DENSE_PERSONA_ID
        if isinstance(persona, int):
            if not 0 <= persona <= len(self.personas):
                raise MaskBankError(f"persona id {persona} out of range: bank has ids 0..{len(self.personas)}")
            return persona
        for index, entry in enumerate(self.personas):
            if entry.name == persona:
                return index + 1
        raise MaskBankError(f"persona {persona!r} is not in the bank; it holds {self.names}")

    def get(self, persona: str | int) -> PersonaMask:
        """The :class:`PersonaMask` for a name or non-zero id."""
        pid = self.persona_id(persona)
        if pid == DENSE_PERSONA_ID:
            raise MaskBankError("the dense persona has no mask")
        return self.personas[pid - 1]

    def add(self, persona: PersonaMask) -> int:
        """Add ``persona``, replacing one of the same name in place; return its id."""
        self._check_persona(persona)
        self._check_hidden_widths([p for p in self.personas if p.name != persona.name] + [persona])
        for index, entry in enumerate(self.personas):
            if entry.name == persona.name:
                self.personas[index] = persona
                return index + 1
        self.personas.append(persona)
        return len(self.personas)

    def _same_weights_in_fp16(self, weight_sample: tuple[torch.Tensor, str] | None) -> bool:
        from .fingerprint import samples_agree

        if weight_sample is None or self.weight_sample is None or "float16" not in (weight_sample[1], self.weight_dtype):
            return False
        return samples_agree(weight_sample[0], self.weight_sample)

    def remove(self, persona: str | int) -> None:
        """Remove a persona; ids of later personas shift down by one."""
        pid = self.persona_id(persona)
        if pid == DENSE_PERSONA_ID:
            raise MaskBankError("the dense persona cannot be removed")
        self.personas.pop(pid - 1)

    def check_model(self, fingerprint: str, n_layers: int, d_ff: int, name: str = "", d_model: int | None = None,
                    weight_sample: tuple[torch.Tensor, str] | None = None) -> None:
        """Raise :class:`ModelMismatchError` naming the difference if the bank is not for this model.

        ``weight_sample``: the model's :func:`~persona_kernels.fingerprint.ffn_weight_sample`; when the
        fingerprints differ and the model or the bank's source was held in float16, the samples
        decide (the fingerprint cannot be stable under fp16 rounding).
        """
        if n_layers != self.n_layers or d_ff != self.d_ff:
            raise ModelMismatchError(
                f"mask bank for {self.base_model!r} has {self.n_layers} layers x d_ff {self.d_ff}, "
                f"but the model {name!r} has {n_layers} layers x d_ff {d_ff}"
            )
        if d_model is not None and self.hidden_width not in (None, d_model):
            raise ModelMismatchError(
                f"mask bank for {self.base_model!r} has FFN input gains or output biases of width {self.hidden_width}, "
                f"but the model {name!r} has hidden size {d_model}"
            )
        if fingerprint != self.fingerprint and not self._same_weights_in_fp16(weight_sample):
            raise ModelMismatchError(
                f"mask bank was made for {self.base_model!r} (FFN fingerprint {self.fingerprint}), "
                f"but the model {name!r} has FFN fingerprint {fingerprint}: different weights"
            )

    def keep_bits(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Kernel bitmaps ``[L, P + 1, words]`` int32; row 0 is the dense persona."""
        keep = torch.ones(len(self.personas) + 1, self.n_layers, self.n_groups, dtype=torch.bool)
        for index, persona in enumerate(self.personas):
            keep[index + 1] = persona.keep
        return keep_to_bits(keep.transpose(0, 1)).contiguous().to(device)

    def scales_table(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Kernel scales ``[L, P + 1, d_ff]`` float32 (ones where a persona has none), or ``None`` if no persona has scales."""
        if not any(p.scales is not None for p in self.personas):
            return None
        table = torch.ones(self.n_layers, len(self.personas) + 1, self.d_ff, dtype=torch.float32)
        for index, persona in enumerate(self.personas):
            if persona.scales is not None:
                table[:, index + 1] = persona.scales
        return table.to(device)

    def input_gains_table(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """FFN input gains ``[L, P + 1, d_model]`` float32 (ones where a persona has none), or ``None`` if no persona has gains."""
        return self._hidden_table("input_gains", device)

    def output_bias_table(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """FFN output biases ``[L, P + 1, d_model]`` float32 (zeros where a persona has none), or ``None`` if no persona has one."""
        return self._hidden_table("output_bias", device)

    def _hidden_table(self, key: str, device: torch.device | str) -> torch.Tensor | None:
        if not any(getattr(p, key) is not None for p in self.personas):
            return None
        table = torch.full((self.n_layers, len(self.personas) + 1, self.hidden_width), HIDDEN_VECTORS[key][1])
        for index, persona in enumerate(self.personas):
            if getattr(persona, key) is not None:
                table[:, index + 1] = getattr(persona, key)
        return table.to(device)

    def save(self, path: str | Path) -> None:
        """Write the bank as safetensors atomically (a failed save leaves the old file intact)."""
        from .bank_io import save_bank

        save_bank(self, path)

    @staticmethod
    def load(path: str | Path) -> "MaskBank":
        """Read and validate a bank written by :meth:`save`."""
        from .bank_io import load_bank

        return load_bank(path)

    def summary(self) -> str:
        """Human-readable description of the bank (what ``persona-kernels inspect`` prints)."""
        lines = [
            f"mask bank format v{FORMAT_VERSION}: base model {self.base_model!r}, fingerprint {self.fingerprint}",
            f"{self.n_layers} layers, d_ff {self.d_ff}, group size {self.group_size} ({self.n_groups} groups/layer)"
            + (", channel permutation present" if self.permutation is not None else ""),
            f"{len(self.personas)} persona(s) (id 0 = dense):",
        ]
        for index, p in enumerate(self.personas):
            per_layer = p.layer_sparsity()
            scale_note = "none"
            if p.scales is not None:
                kept = p.scales[channel_keep(p.keep, self.group_size)]
                scale_note = f"mean {float(kept.mean()):.3f}, range [{float(kept.min()):.3f}, {float(kept.max()):.3f}]" if kept.numel() else "none kept"
            vector_notes = ""
            for key, (label, _) in HIDDEN_VECTORS.items():
                vector = getattr(p, key)
                if vector is not None:
                    vector_notes += f", {label}: mean {float(vector.mean()):.3f}, range [{float(vector.min()):.3f}, {float(vector.max()):.3f}]"
            lines.append(
                f"  [{index + 1}] {p.name}: method {p.method}, sparsity {p.sparsity:.3f} "
                f"(layers {min(per_layer):.2f}..{max(per_layer):.2f}), scales: {scale_note}{vector_notes}"
            )
            if p.description:
                text = p.description if len(p.description) <= 100 else p.description[:97] + "..."
                lines.append(f"      {text}")
        return "\n".join(lines)

    def _check_persona(self, persona: PersonaMask) -> None:
        if not isinstance(persona.name, str) or not persona.name.strip():
            raise MaskBankError("persona name must be a non-empty string")
        if persona.name == DENSE_PERSONA_NAME:
            raise MaskBankError(f"persona name {DENSE_PERSONA_NAME!r} is reserved for the dense model")
        if len(persona.description) > MAX_DESCRIPTION_CHARS:
            raise MaskBankError(f"persona {persona.name!r}: description longer than {MAX_DESCRIPTION_CHARS} characters")
        expected = (self.n_layers, self.n_groups)
        if persona.keep.dtype != torch.bool or tuple(persona.keep.shape) != expected:
            raise MaskBankError(
                f"persona {persona.name!r}: keep mask must be bool {list(expected)} "
                f"(layers x groups of {self.group_size}), got {persona.keep.dtype} {list(persona.keep.shape)}"
            )
        if persona.scales is not None:
            if tuple(persona.scales.shape) != (self.n_layers, self.d_ff):
                raise MaskBankError(
                    f"persona {persona.name!r}: scales must be [{self.n_layers}, {self.d_ff}], got {list(persona.scales.shape)}"
                )
            if not torch.isfinite(persona.scales).all():
                raise MaskBankError(f"persona {persona.name!r}: scales contain NaN or infinity")
        for key, (label, _) in HIDDEN_VECTORS.items():
            vector = getattr(persona, key)
            if vector is None:
                continue
            if vector.dim() != 2 or vector.shape[0] != self.n_layers or vector.shape[1] < 1 or not vector.is_floating_point():
                raise MaskBankError(
                    f"persona {persona.name!r}: {label} must be float [{self.n_layers}, d_model], "
                    f"got {vector.dtype} {list(vector.shape)}"
                )
            if not torch.isfinite(vector).all():
                raise MaskBankError(f"persona {persona.name!r}: {label} contain NaN or infinity")
        try:
            json.dumps(persona.report)
        except TypeError as error:
            raise MaskBankError(f"persona {persona.name!r}: report is not JSON-serialisable ({error})") from error


    @staticmethod
    def _check_hidden_widths(personas: list[PersonaMask]) -> None:
        widths = {f"{p.name} {HIDDEN_VECTORS[key][0]}": getattr(p, key).shape[1]
                  for p in personas for key in HIDDEN_VECTORS if getattr(p, key) is not None}
        if len(set(widths.values())) > 1:
            raise MaskBankError(f"personas' input gains and output biases disagree on d_model: {widths}")


def _checked_permutation(permutation: torch.Tensor, n_layers: int, d_ff: int) -> torch.Tensor:
    if tuple(permutation.shape) != (n_layers, d_ff):
        raise MaskBankError(f"permutation must be [{n_layers}, {d_ff}], got {list(permutation.shape)}")
    permutation = permutation.to(torch.int64)
    expected = torch.arange(d_ff)
    for layer, row in enumerate(permutation):
        if not torch.equal(torch.sort(row).values, expected):
            raise MaskBankError(f"permutation of layer {layer} is not a permutation of 0..{d_ff - 1}")
    return permutation
