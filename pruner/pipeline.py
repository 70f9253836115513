"""The Persona-Pruner pipeline: calibration data -> mask learning -> scales -> baselines -> mask bank.

:class:`Pruner` holds everything that does not depend on the persona (the model and its
fingerprint, reference-persona signatures, generic data, its statistics and the generic-learned
masks), so many personas in one run share it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from persona_kernels.bank import MaskBank, PersonaMask
from persona_kernels.hf.ffn import model_fingerprint, model_name, model_weight_sample

from . import baselines as bl
from .chat import answer_ids, split_prompts, system_prompt
from .config import PrunerConfig, check_model, validate_description, validate_name
from .data import JsonlCache, load_pool, reference_personas, text_hash
from .importance import ChannelStats, activation_importance, collect_stats, scores_from_importance
from .learn import Recovery, TrainingData, learn_mask, learn_scales
from .masked_model import freeze, keep_count
from .sensitivity import reference_signatures, select_sensitive, sensitivity, signatures
from .teacher import EndpointTeacher, LocalTeacher, cached_answers


def _subsample_curve(curve: list[tuple[int, float]], points: int = 25) -> list[list[float]]:
    if len(curve) <= points:
        return [[s, round(v, 4)] for s, v in curve]
    step = (len(curve) - 1) / (points - 1)
    return [[curve[round(i * step)][0], round(curve[round(i * step)][1], 4)] for i in range(points)]


class Pruner:
    """Learns persona masks for one model; shares persona-independent work across personas."""

    def __init__(self, model, tokenizer, config: PrunerConfig | None = None):
        self.config = config or PrunerConfig()
        self.config.validate()
        self.n_layers, self.d_ff = check_model(model, self.config.group_size)
        self.model, self.tokenizer = model, tokenizer
        model.eval()
        freeze(model)
        self.fingerprint = model_fingerprint(model)
        self.weight_sample = model_weight_sample(model)
        self.model_name = model_name(model)
        self.n_groups = self.d_ff // self.config.group_size
        self.cache_dir = self.config.cache_path() / self.fingerprint[:16]
        self.answers = JsonlCache(self.cache_dir / "answers.jsonl")
        self.teacher = self._make_teacher()
        self.pool = load_pool(self.config.pool, self.config.max_pool)
        self._reference: torch.Tensor | None = None
        self._generic: TrainingData | None = None
        self._generic_stats: ChannelStats | None = None
        self._generic_learned: dict[tuple, tuple[torch.Tensor, dict]] = {}
        self._persona_data: dict[str, tuple[TrainingData, dict]] = {}
        self.timings: dict[str, float] = {}

    @property
    def k(self) -> int:
        """Groups kept per layer at the configured sparsity (the sparsity may be changed between personas)."""
        return keep_count(self.n_groups, self.config.sparsity)

    def _make_teacher(self):
        c = self.config
        if c.teacher_endpoint:
            return EndpointTeacher(c.teacher_endpoint, c.teacher_endpoint_model)
        if c.teacher_model:
            from persona_kernels.hf.default_model import load_model

            teacher, tokenizer = load_model(c.teacher_model)
            if tokenizer is None:
                raise ValueError(f"teacher model {c.teacher_model} has no tokenizer")
            return LocalTeacher(teacher, tokenizer, f"hf:{Path(c.teacher_model).resolve()}")
        return LocalTeacher(self.model, self.tokenizer, f"self:{self.fingerprint}")

    # ---- persona-independent work -------------------------------------------------------------
    def reference_signatures(self) -> torch.Tensor:
        """``[R, N, d]`` pool signatures under the reference personas (computed once, cached on disk)."""
        if self._reference is None:
            began = time.perf_counter()
            self._reference = reference_signatures(self.model, self.tokenizer, reference_personas(), self.pool, self.cache_dir,
                                                   self.fingerprint, self.config.progress)
            self.timings["reference_signatures_s"] = time.perf_counter() - began
        return self._reference

    def generic_data(self) -> TrainingData:
        """Generic calibration data: pool instructions with the base model's no-persona answers."""
        if self._generic is None:
            c = self.config
            step = max(1, len(self.pool) // c.n_train)
            questions = self.pool[::step][: c.n_train]
            teacher = LocalTeacher(self.model, self.tokenizer, f"self:{self.fingerprint}")
            answers = cached_answers(teacher, self.answers, None, questions, c.max_new_tokens, 0.0, c.seed, c.progress)
            prompts = split_prompts(self.tokenizer, None, questions)
            self._generic = TrainingData(prompts.prefix, prompts.questions, [answer_ids(self.tokenizer, a) for a in answers],
                                         self.tokenizer.eos_token_id)
        return self._generic

    def generic_stats(self) -> ChannelStats:
        """FFN channel statistics on the generic data (for Wanda, FLAP and the generic-learned init)."""
        if self._generic_stats is None:
            data = self.generic_data()
            self._generic_stats = collect_stats(self.model, data.prefix, data.batches(8), self.config.progress)
        return self._generic_stats

    def generic_learned(self) -> tuple[torch.Tensor, dict]:
        """The mask learned on generic data at the configured sparsity (once per sparsity, group size, steps and
        KL weight), with the persona mask's loss: the KL term's teacher is the dense model without a persona."""
        c = self.config
        key = (c.sparsity, c.group_size, c.steps, c.kl_weight)
        if key not in self._generic_learned:
            data = self.generic_data()
            init = scores_from_importance(activation_importance(self.generic_stats(), self.model, c.group_size))
            keep, result = learn_mask(self.model, data, init, self.k, c.group_size, steps=c.steps, lr=c.lr,
                                      batch_size=c.batch_size, seed=c.seed, ste=c.ste, kl_weight=c.kl_weight,
                                      checkpoint=self._checkpoint("generic", "generic-learned"),
                                      checkpoint_every=c.checkpoint_every, progress=c.progress)
            self._generic_learned[key] = (keep, {"learn_s": round(result.seconds, 2), "kl_weight": c.kl_weight,
                                                 "loss_curve": _subsample_curve(result.curve)})
        return self._generic_learned[key]

    def _checkpoint(self, persona_key: str, method: str) -> Path:
        c = self.config
        # the step count is not part of the key: a rerun with more (or fewer) steps continues from the checkpoint
        recovery = method.startswith("scales")
        kl_weight = c.scale_kl_weight if recovery else c.kl_weight
        lr = c.scale_lr if recovery else c.lr  # a new scale lr must not discard the mask's checkpoint
        if "+gains" in method:
            lr = f"{lr}|{c.gain_lr}"
        if "+bias" in method:
            lr = f"{lr}|bias {c.bias_lr}"
        settings = f"{method}|{c.sparsity}|{c.group_size}|{lr}|{c.batch_size}|{c.ste}|{kl_weight}|{c.seed}|{c.n_train}|{c.max_new_tokens}|{self.teacher.identity}"
        return self.cache_dir / "checkpoints" / f"{persona_key}_{text_hash(settings)}.pt"

    # ---- one persona ----------------------------------------------------------------------------
    def persona_data(self, description: str) -> tuple[TrainingData, dict]:
        """Persona-sensitive instructions of the pool with the teacher's persona-voiced answers, and a data report."""
        if description in self._persona_data:
            return self._persona_data[description]
        c = self.config
        system = system_prompt(description)
        began = time.perf_counter()
        references = self.reference_signatures()
        target = signatures(self.model, self.tokenizer, description, self.pool, progress=c.progress)
        ranked = select_sensitive(sensitivity(target, references), c.keep_fraction)
        questions = [self.pool[i] for i in ranked[: c.n_train]]
        filtered = time.perf_counter()
        answers = cached_answers(self.teacher, self.answers, system, questions, c.max_new_tokens, c.temperature, c.seed, c.progress)
        generated = time.perf_counter()
        prompts = split_prompts(self.tokenizer, system, questions)
        data = TrainingData(prompts.prefix, prompts.questions, [answer_ids(self.tokenizer, a) for a in answers],
                            self.tokenizer.eos_token_id)
        report = {
            "pool": len(self.pool), "kept_sensitive": len(ranked), "train_sequences": len(data),
            "answer_tokens": sum(len(a) for a in data.answers), "prefix_tokens": len(data.prefix),
            "sensitivity_s": round(filtered - began, 2), "teacher_s": round(generated - filtered, 2),
            "teacher": self.teacher.identity,
        }
        self._persona_data[description] = (data, report)
        return data, report

    def prune(self, name: str, description: str) -> list[PersonaMask]:
        """Learn ``name``'s mask (and scales), plus the configured baselines; return the bank entries."""
        c = self.config
        name, description = validate_name(name), validate_description(description)
        began = time.perf_counter()
        data, report = self.persona_data(description)
        persona_key = text_hash(description)
        stats_began = time.perf_counter()
        stats = collect_stats(self.model, data.prefix, data.batches(8), c.progress)
        init = scores_from_importance(activation_importance(stats, self.model, c.group_size))
        report["init_stats_s"] = round(time.perf_counter() - stats_began, 2)
        keep, result = learn_mask(self.model, data, init, self.k, c.group_size, steps=c.steps, lr=c.lr, batch_size=c.batch_size,
                                  seed=c.seed, ste=c.ste, kl_weight=c.kl_weight,
                                  checkpoint=self._checkpoint(persona_key, "mask"), checkpoint_every=c.checkpoint_every,
                                  progress=c.progress)
        report = dict(report)
        report.update(learn_s=round(result.seconds, 2), resumed_at_step=result.resumed_at, loss_curve=_subsample_curve(result.curve))
        recovery = Recovery(scales=None)
        if c.scales and c.scale_steps > 0:
            method = "scales" + ("+gains" if c.input_gains else "") + ("+bias" if c.output_bias else "")
            recovery, scale_result = learn_scales(
                self.model, data, keep, c.group_size, steps=c.scale_steps, lr=c.scale_lr, batch_size=c.batch_size,
                seed=c.seed, kl_weight=c.scale_kl_weight, input_gains=c.input_gains, gain_lr=c.gain_lr,
                bias=c.output_bias, bias_lr=c.bias_lr, checkpoint=self._checkpoint(persona_key, method),
                checkpoint_every=c.checkpoint_every, progress=c.progress)
            report.update(scales_s=round(scale_result.seconds, 2), scale_loss_curve=_subsample_curve(scale_result.curve))
        report.update(total_s=round(time.perf_counter() - began, 2), sparsity=c.sparsity, group_size=c.group_size,
                      config=c.to_dict())
        masks = [PersonaMask(name, keep, description, "persona-pruner", recovery.scales, report,
                             input_gains=recovery.input_gains, output_bias=recovery.output_bias)]
        masks += [self.baseline(name, description, method, data) for method in c.baselines]
        return masks

    def baseline(self, name: str, description: str, method: str, data: TrainingData | None = None) -> PersonaMask:
        """One baseline entry ``name@method`` at the same sparsity and group size."""
        c = self.config
        began = time.perf_counter()
        extra: dict = {}
        if method == "random":
            keep = bl.random_mask(self.n_layers, self.n_groups, self.k, c.seed)
        elif method == "magnitude":
            keep = bl.score_mask(bl.magnitude_scores(self.model, c.group_size), self.k)
        elif method == "wanda":
            keep = bl.score_mask(bl.wanda_scores(self.generic_stats(), self.model, c.group_size), self.k)
        elif method == "flap":
            keep = bl.score_mask(bl.flap_scores(self.generic_stats(), self.model, c.group_size), self.k)
        elif method == "generic-learned":
            keep, extra = self.generic_learned()
        else:
            raise ValueError(f"unknown baseline {method!r}")
        report = {"baseline_s": round(time.perf_counter() - began, 2), "sparsity": c.sparsity, "group_size": c.group_size, **extra}
        return PersonaMask(f"{name}@{method}", keep, description, method, None, report)

    # ---- the bank -------------------------------------------------------------------------------
    def add_to_bank(self, path: str | Path, masks: list[PersonaMask]) -> MaskBank:
        """Add (or replace) ``masks`` in the bank at ``path`` (created if absent) and save it atomically."""
        path = Path(path)
        if path.is_file():
            bank = MaskBank.load(path)
            bank.check_model(self.fingerprint, self.n_layers, self.d_ff, self.model_name, weight_sample=self.weight_sample)
            if bank.group_size != self.config.group_size:
                raise ValueError(f"bank {path} uses group size {bank.group_size}, this run {self.config.group_size}")
        else:
            bank = MaskBank(self.model_name, self.fingerprint, self.n_layers, self.d_ff, self.config.group_size,
                            weight_sample=self.weight_sample[0], weight_dtype=self.weight_sample[1])
        for mask in masks:
            bank.add(mask)
        bank.save(path)
        return bank


def prune_persona(model, tokenizer, name: str, description: str, config: PrunerConfig | None = None) -> PersonaMask:
    """Learn one persona's mask (and scales) from its description; see :class:`Pruner` for baselines and banks."""
    validate_name(name)
    validate_description(description)
    return Pruner(model, tokenizer, config).prune(name, description)[0]
