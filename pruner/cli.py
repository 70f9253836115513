"""``persona-prune``: learn persona FFN masks from descriptions and add them to a mask bank."""

from __future__ import annotations

import argparse
import sys
import time

from .config import BASELINES, PrunerConfig, PrunerInputError, add_scale_arguments, validate_description, validate_name
from .data import load_personas


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(prog="persona-prune", description=__doc__)
    who = p.add_argument_group("persona (one of)")
    who.add_argument("--description", help="the persona's description (quoted)")
    who.add_argument("--name", help="the persona's name in the bank (with --description)")
    who.add_argument("--personas-file", help="JSONL of personas (id, description)")
    who.add_argument("--persona-ids", help="comma-separated ids from --personas-file (default: all)")
    p.add_argument("--bank", required=True, help="mask bank file to create or add to (.safetensors)")
    p.add_argument("--model", help="local Hugging Face model dir (default: SmolLM2-135M-Instruct)")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of FFN channels removed per layer")
    p.add_argument("--group-size", type=int, default=16, help="channels per mask group (divides d_ff)")
    p.add_argument("--baselines", default="", help=f"comma list of {','.join(BASELINES)} or 'all'")
    p.add_argument("--steps", type=int, default=30, help="mask learning steps")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--kl-weight", type=float, default=1.0, help="weight of KL to the dense persona's logits (0: CE only)")
    p.add_argument("--no-scales", action="store_true", help="do not learn per-channel scales")
    add_scale_arguments(p)
    p.add_argument("--pool", help="JSONL of generic instructions (default: the package's pool)")
    p.add_argument("--max-pool", type=int, default=200)
    p.add_argument("--keep-fraction", type=float, default=0.4)
    p.add_argument("--n-train", type=int, default=40, help="training sequences (teacher answers)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--teacher-dir", help="local HF model dir used as teacher instead of the base model")
    p.add_argument("--teacher-endpoint", help="OpenAI-compatible base URL (key: $OPENAI_API_KEY)")
    p.add_argument("--teacher-model", help="model name at --teacher-endpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", help="cache for data, statistics and checkpoints")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _personas(args) -> list[tuple[str, str]]:
    if args.personas_file:
        if args.description:
            raise PrunerInputError("give either --description/--name or --personas-file, not both")
        ids = [i.strip() for i in args.persona_ids.split(",") if i.strip()] if args.persona_ids else None
        rows = load_personas(args.personas_file, ids)
        return [(validate_name(r["id"]), validate_description(r.get("description", ""))) for r in rows]
    if args.description is None or not args.name:
        raise PrunerInputError("give --description and --name (or --personas-file)")
    return [(validate_name(args.name), validate_description(args.description))]


def config_from_args(args) -> PrunerConfig:
    """A validated :class:`PrunerConfig` from parsed arguments."""
    names = [b.strip() for b in args.baselines.split(",") if b.strip()]
    baselines = tuple(BASELINES) if names == ["all"] else tuple(names)
    config = PrunerConfig(
        sparsity=args.sparsity, group_size=args.group_size, pool=args.pool, max_pool=args.max_pool,
        keep_fraction=args.keep_fraction, n_train=args.n_train, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, teacher_model=args.teacher_dir, teacher_endpoint=args.teacher_endpoint,
        teacher_endpoint_model=args.teacher_model, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        kl_weight=args.kl_weight, scales=not args.no_scales, scale_steps=args.scale_steps, scale_lr=args.scale_lr,
        scale_kl_weight=args.scale_kl_weight, input_gains=args.input_gains, gain_lr=args.gain_lr,
        output_bias=args.output_bias, bias_lr=args.bias_lr, seed=args.seed,
        cache_dir=args.cache_dir, progress=not args.quiet, baselines=baselines,
    )
    config.validate()
    return config


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``persona-prune``."""
    args = build_parser().parse_args(argv)
    try:
        personas = _personas(args)
        config = config_from_args(args)
    except PrunerInputError as error:
        print(f"persona-prune: error: {error}", file=sys.stderr)
        return 2
    from persona_kernels.hf.default_model import load_default_model, load_model

    from .pipeline import Pruner

    began = time.perf_counter()
    model, tokenizer = load_model(args.model) if args.model else load_default_model()
    load_s = time.perf_counter() - began
    try:
        pruner = Pruner(model, tokenizer, config)
    except PrunerInputError as error:
        print(f"persona-prune: error: {error}", file=sys.stderr)
        return 2
    for name, description in personas:
        masks = pruner.prune(name, description)
        masks[0].report["model_load_s"] = round(load_s, 2)
        masks[0].report.update({k: round(v, 2) for k, v in pruner.timings.items()})
        pruner.add_to_bank(args.bank, masks)
        r = masks[0].report
        print(f"{name}: sparsity {masks[0].sparsity:.3f}, {r['train_sequences']} sequences, "
              f"data {r['sensitivity_s'] + r['teacher_s']:.0f}s, learn {r['learn_s']:.0f}s, "
              f"scales {r.get('scales_s', 0):.0f}s, total {r['total_s']:.0f}s -> {args.bank} "
              f"(+{len(masks) - 1} baselines)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
