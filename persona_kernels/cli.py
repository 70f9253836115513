"""``persona-kernels``: inspect mask banks, build heuristic ones, chat as a persona, export a pruned copy.

    persona-kernels inspect BANK
    persona-kernels build --description "You are ..." --name pirate --out bank.safetensors
    persona-kernels chat --description "You are ..." --sparsity 0.25 --prompt "Who are you?"
    persona-kernels chat --bank bank.safetensors --persona pirate          # interactive
    persona-kernels export --bank bank.safetensors --persona pirate --out pirate-model/

Models: the embedded default (SmolLM2-135M-Instruct) unless ``--model DIR`` names a local Hugging
Face checkpoint. Errors a user can fix (bad bank, unknown persona, wrong model) print one line
and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_SPARSITY = 0.25
DEFAULT_GROUP_SIZE = 32


class CLIError(Exception):
    """An error reported as one line with exit status 2."""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_personas(args) -> list[tuple[str, str]]:
    """``(name, description)`` pairs from ``--persona-file`` (JSON object/list, or plain text) or ``--description``."""
    if getattr(args, "persona_file", None):
        path = Path(args.persona_file)
        if not path.is_file():
            raise CLIError(f"persona file {str(path)!r} does not exist")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as error:
                raise CLIError(f"persona file {str(path)!r} is not valid JSON ({error})") from error
            entries = data if isinstance(data, list) else [data]
            try:
                personas = [(str(e.get("name") or path.stem), str(e["description"])) for e in entries]
            except (AttributeError, KeyError) as error:
                raise CLIError(f"persona file {str(path)!r}: each entry needs a \"description\" (and a \"name\")") from error
        else:
            personas = [(args.name or path.stem, text.strip())]
        if args.name and len(personas) == 1:
            personas = [(args.name, personas[0][1])]
        return personas
    if getattr(args, "description", None):
        return [(args.name or "persona", args.description)]
    return []


def _load_model(args):
    import torch

    from .hf.default_model import load_default_model, load_model

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    start = time.perf_counter()
    if args.model:
        model, tokenizer = load_model(args.model, dtype=dtype)
        if tokenizer is None:
            raise CLIError(f"model directory {args.model!r} has no tokenizer")
    else:
        model, tokenizer = load_default_model(dtype=dtype)
    if args.device != "cpu":
        model.to(args.device)
    _log(f"[loaded {model.config.name_or_path} ({args.dtype}, {args.device}) in {time.perf_counter() - start:.1f}s]")
    return model, tokenizer


def _build_bank(args, model, tokenizer, personas):
    from .heuristic import build_heuristic_bank

    start = time.perf_counter()
    bank = build_heuristic_bank(model, tokenizer, personas, args.sparsity, args.group_size)
    _log(f"[heuristic masks for {len(personas)} persona(s) at sparsity {args.sparsity} in {time.perf_counter() - start:.1f}s]")
    return bank


def cmd_inspect(args) -> int:
    """Print a bank's summary."""
    from .bank import MaskBank

    print(MaskBank.load(args.bank).summary())
    return 0


def cmd_build(args) -> int:
    """Build heuristic masks for personas and save (or extend) a bank."""
    from .bank import MaskBank

    personas = read_personas(args)
    if not personas:
        raise CLIError("give --persona-file or --description")
    model, tokenizer = _load_model(args)
    from .heuristic import build_heuristic_bank

    existing = MaskBank.load(args.out) if args.append and Path(args.out).exists() else None
    start = time.perf_counter()
    bank = build_heuristic_bank(model, tokenizer, personas, args.sparsity, args.group_size, bank=existing)
    bank.save(args.out)
    _log(f"[built {len(personas)} persona(s) in {time.perf_counter() - start:.1f}s]")
    print(bank.summary())
    return 0


def cmd_export(args) -> int:
    """Export one persona of a bank as a pruned dense checkpoint."""
    from .bank import MaskBank
    from .hf.export import export_pruned

    bank = MaskBank.load(args.bank)
    model, tokenizer = _load_model(args)
    out = export_pruned(model, bank, args.persona, args.out, tokenizer=tokenizer)
    info = json.loads((out / "persona_export.json").read_text())
    print(f"wrote {out}: intermediate_size {info['intermediate_size']} (was {info['original_intermediate_size']})")
    return 0


def _answer(model, tokenizer, messages, args, persona_id) -> tuple[str, int, float]:
    import torch

    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    kwargs = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                  repetition_penalty=args.repetition_penalty)
    if args.sample:
        kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(**inputs, persona=persona_id, **kwargs)
    elapsed = time.perf_counter() - start
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip(), int(new_tokens.numel()), elapsed


def cmd_chat(args) -> int:
    """Chat as a persona: heuristic masks from a description, or a persona of a saved bank."""
    import torch

    from .bank import MaskBank
    from .hf import attach_bank
    from .prompting import persona_system_prompt

    if args.repetition_penalty <= 0:
        raise CLIError(f"--repetition-penalty must be positive (1 = off), got {args.repetition_penalty}")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    personas = read_personas(args)
    bank = MaskBank.load(args.bank) if args.bank else None
    if bank is None and not personas:
        raise CLIError("give --persona-file or --description (or --bank with --persona)")
    if bank is not None and not personas and args.persona is None:
        raise CLIError("with --bank, name the persona with --persona")
    if bank is not None and args.persona is not None and args.persona not in [name for name, _ in personas]:
        bank.persona_id(args.persona)  # an unknown persona fails now, before the model loads
    model, tokenizer = _load_model(args)
    if bank is None:
        bank = _build_bank(args, model, tokenizer, personas)
    elif personas:
        from .heuristic import build_heuristic_bank

        build_heuristic_bank(model, tokenizer, personas, args.sparsity, bank.group_size, bank=bank)
    attach_bank(model, bank, backend=args.backend)
    name = args.persona if args.persona is not None else personas[0][0]
    persona_id = 0 if args.dense else bank.persona_id(name)
    entry = bank.get(bank.persona_id(name))
    system = persona_system_prompt(entry.description) if entry.description else None
    mode = "dense model" if args.dense else f"persona {entry.name!r} (id {persona_id}, sparsity {entry.sparsity:.2f})"
    _log(f"[chatting as {mode}; system prompt: {(system or '')[:80]}{'...' if system and len(system) > 80 else ''}]")
    messages = [{"role": "system", "content": system}] if system else []

    def turn(prompt: str) -> None:
        messages.append({"role": "user", "content": prompt})
        text, n_tokens, elapsed = _answer(model, tokenizer, messages, args, persona_id)
        messages.append({"role": "assistant", "content": text})
        print(text, flush=True)
        rate = n_tokens / elapsed if elapsed > 0 else float("inf")
        _log(f"[{n_tokens} tokens in {elapsed:.2f}s, {rate:.1f} tokens/s]")

    if args.prompt is not None:
        turn(args.prompt)
        return 0
    _log("[type a message; empty line or Ctrl-D quits]")
    while True:
        try:
            prompt = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not prompt.strip():
            return 0
        turn(prompt)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="local Hugging Face model directory (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


def _add_persona_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--persona-file", help="persona description: .json {name, description} (or a list), or plain text")
    parser.add_argument("--description", help="persona description text")
    parser.add_argument("--name", help="persona name (default: file stem or 'persona')")
    parser.add_argument("--sparsity", type=float, default=DEFAULT_SPARSITY, help=f"fraction of FFN channels removed (default {DEFAULT_SPARSITY})")
    parser.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, help=f"channels per mask group (default {DEFAULT_GROUP_SIZE})")


def build_parser() -> argparse.ArgumentParser:
    """The ``persona-kernels`` argument parser (subcommands inspect, build, chat, export)."""
    parser = argparse.ArgumentParser(prog="persona-kernels", description="Many personas over one shared dense model.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="print a mask bank's summary")
    p.add_argument("bank")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("build", help="build heuristic persona masks into a bank file")
    _add_persona_args(p)
    _add_model_args(p)
    p.add_argument("--out", required=True, help="bank file to write")
    p.add_argument("--append", action="store_true", help="add to the bank at --out if it exists")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("chat", help="chat as a persona")
    _add_persona_args(p)
    _add_model_args(p)
    p.add_argument("--bank", help="mask bank file (default: build heuristic masks from the description)")
    p.add_argument("--persona", help="persona name in --bank")
    p.add_argument("--dense", action="store_true", help="answer with the dense model (same system prompt), for comparison")
    p.add_argument("--prompt", help="one message; print the answer and exit (default: interactive)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.2,
                   help="divide the logits of tokens already in the text by this (1 = off); small models loop without it")
    p.add_argument("--seed", type=int)
    p.add_argument("--backend", help="masked FFN backend (default: the dispatcher's choice)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("export", help="export one persona as a smaller dense checkpoint")
    _add_model_args(p)
    p.add_argument("--bank", required=True)
    p.add_argument("--persona", required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``persona-kernels`` console script; returns the exit status."""
    from .bank import MaskBankError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, MaskBankError, FileNotFoundError, FileExistsError) as error:
        print(f"persona-kernels {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
