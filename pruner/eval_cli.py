"""``persona-eval``: evaluate persona masks and baselines from a mask bank against the dense model.

Examples::

    persona-eval --bank out/bank.safetensors --out docs/eval/run --personas jack_torrance,blair_waldorf \\
        --max-questions 4 --max-new-tokens 48
    persona-eval --rescore docs/eval/run --judge-endpoint http://localhost:8000/v1 --judge-model my-judge
    persona-eval --rescore docs/eval/run --no-fidelity --judge-hf /models/judge
    persona-eval --suite capability --bank out/bank.safetensors --out docs/eval/cap --personas jack_torrance \\
        --methods persona,persona+recovery,generic-learned,wanda --items mmlu=200,gsm8k=50 --seed 0
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

DEFAULT_DATA = "../shared/data"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(prog="persona-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bank", help="mask bank (.safetensors): entries <persona> and baselines <persona>@<method>")
    p.add_argument("--out", help="output directory (answers/, scores/, report.md/json/png)")
    p.add_argument("--rescore", metavar="DIR", help="re-score the saved answers in DIR and rewrite its report (no generation)")
    p.add_argument("--combine", metavar="DIR,DIR", help="print one headline table (means over personas) over finished runs")
    p.add_argument("--suite", choices=("persona", "capability"), default="persona",
                   help="persona: fidelity/ROUGE-L/judge (default); capability: task skills (docs/CAPABILITY.md)")
    p.add_argument("--model", help="registered model name (e.g. qwen2.5-coder-1.5b) or local Hugging Face directory "
                                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=None, help=f"data directory (default: {DEFAULT_DATA} relative to the working directory)")
    p.add_argument("--personas", help="comma-separated persona ids (default: every persona in the bank)")
    p.add_argument("--max-questions", type=int, default=None, help="at most N questions per split per persona")
    p.add_argument("--max-new-tokens", type=int, default=128, help="greedy answer length limit (default 128)")
    p.add_argument("--batch-size", type=int, default=16, help="generation batch rows (personas mixed; default 16)")
    p.add_argument("--fidelity-rows", type=int, default=8, help="rows per teacher-forced scoring batch (default 8)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--backend", default=None, help="masked FFN backend (default: the dispatcher's choice)")
    p.add_argument("--reuse-dense", action="append", default=[], metavar="DIR",
                   help="reuse dense answers saved in DIR when they cover the same questions and prompts (repeatable)")
    p.add_argument("--no-fidelity", action="store_true", help="with --rescore: skip KL/top-1 (needs no model)")
    p.add_argument("--judge-endpoint", help="OpenAI-compatible base URL for the LLM judge (key: $OPENAI_API_KEY)")
    p.add_argument("--judge-model", help="judge model name at --judge-endpoint")
    p.add_argument("--judge-hf", metavar="DIR", help="local Hugging Face judge model directory instead of an endpoint")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--note", action="append", default=[], help="a note to print in the report (repeatable)")
    cap = p.add_argument_group("capability suite (--suite capability)")
    cap.add_argument("--suites", help="comma list of capability suites (default: all): "
                                      "mmlu,arc_challenge,hellaswag,piqa,gsm8k,humaneval,json_schema,tools,injection,leak")
    cap.add_argument("--methods", help="comma list of methods besides dense (default: persona, persona+recovery when "
                                       "the entry has recovery, every baseline), e.g. persona,persona+recovery,generic-learned,wanda")
    cap.add_argument("--items", help="items per suite: N for every suite, or suite=N,... (0 = all; default: 200 for "
                                     "multiple choice, 50 for generative suites)")
    cap.add_argument("--seed", type=int, default=0, help="seed of the item subsets (default 0)")
    cap.add_argument("--mc-batch", type=int, default=8, help="multiple-choice items per forward batch (default 8)")
    cap.add_argument("--no-persona-check", action="store_true",
                     help="skip the in-persona check of the injection and leak answers (two dense passes per answer)")
    return p


def parse_items(text: str | None, suites: list[str]) -> dict[str, int]:
    """``--items``: ``"50"`` gives every suite 50, ``"mmlu=200,gsm8k=20"`` sets some (others keep their default)."""
    if not text:
        return {}
    if "=" not in text:
        return {s: int(text) for s in suites}
    out = {}
    for part in text.split(","):
        name, _, count = part.partition("=")
        if name.strip() not in suites:
            raise SystemExit(f"persona-eval: --items names {name.strip()!r}, which is not among the suites {suites}")
        out[name.strip()] = int(count)
    return out


def run_capability(args: argparse.Namespace, device: str, command: str) -> dict:
    """``--suite capability``: evaluate (or with ``--rescore``, re-score) the capability suites."""
    from pruner.capability import SUITES, CapabilitySettings, evaluate_capability, rescore_capability

    if args.rescore:
        return rescore_capability(args.rescore, command=command)
    if not args.out or not (args.bank or args.personas):
        raise SystemExit("persona-eval: --out and --bank are required (or --personas without --bank: dense only)")
    suites = [s.strip() for s in args.suites.split(",") if s.strip()] if args.suites else list(SUITES)
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise SystemExit(f"persona-eval: unknown suite(s) {unknown}; known: {', '.join(SUITES)}")
    settings = CapabilitySettings(
        out_dir=args.out, bank_path=args.bank, data_dir=args.data or DEFAULT_DATA, model=args.model,
        personas=[p.strip() for p in args.personas.split(",") if p.strip()] if args.personas else None,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None,
        suites=suites, items=parse_items(args.items, suites), seed=args.seed, batch_size=args.batch_size,
        mc_batch=args.mc_batch, persona_check=not args.no_persona_check, device=device, backend=args.backend,
        command=command, notes=args.note,
    )
    return evaluate_capability(settings)


def make_judge(args: argparse.Namespace, device: str):
    """The judge the flags ask for, or ``None``."""
    from pruner.evaluation.judge import HFJudge, OpenAIJudge

    if args.judge_endpoint and args.judge_hf:
        raise SystemExit("persona-eval: give --judge-endpoint or --judge-hf, not both")
    if args.judge_endpoint:
        if not args.judge_model:
            raise SystemExit("persona-eval: --judge-endpoint needs --judge-model")
        return OpenAIJudge(args.judge_endpoint, args.judge_model)
    if args.judge_hf:
        return HFJudge(args.judge_hf, device=device)
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``persona-eval``; returns the exit status."""
    args = build_parser().parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    command = "persona-eval " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.combine:
        import json

        from pruner.evaluation.report import headline_markdown

        dirs = [d for d in args.combine.split(",") if d]
        print(headline_markdown({Path(d).name: json.loads((Path(d) / "report.json").read_text()) for d in dirs}), end="")
        return 0
    if args.suite == "capability":
        for kind, path in run_capability(args, device, command).items():
            print(f"{kind}: {path}")
        return 0
    judge = make_judge(args, device)
    from pruner.evaluation.runner import EvalSettings, evaluate, rescore

    if args.rescore:
        paths = rescore(args.rescore, judge=judge, fidelity=not args.no_fidelity, data_dir=args.data,
                        device=device, backend=args.backend, command=command)
    else:
        if not args.bank or not args.out:
            raise SystemExit("persona-eval: --bank and --out are required (or --rescore DIR)")
        data = args.data or DEFAULT_DATA
        if not (Path(data) / "eval").is_dir():
            raise SystemExit(f"persona-eval: {data} has no eval/ folder; pass --data")
        personas = [p.strip() for p in args.personas.split(",") if p.strip()] if args.personas else None
        settings = EvalSettings(
            data_dir=data, bank_path=args.bank, out_dir=args.out, personas=personas,
            max_questions=args.max_questions, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
            fidelity_rows=args.fidelity_rows, model_dir=args.model, device=device, backend=args.backend,
            command=command, notes=args.note,
        )
        paths = evaluate(settings, judge=judge, reuse_from=args.reuse_dense)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
