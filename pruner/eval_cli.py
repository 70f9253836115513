"""``persona-eval``: evaluate persona masks and baselines from a mask bank against the dense model.

Examples::

    persona-eval --bank out/bank.safetensors --out docs/eval/run --personas jack_torrance,blair_waldorf \\
        --max-questions 4 --max-new-tokens 48
    persona-eval --rescore docs/eval/run --judge-endpoint http://localhost:8000/v1 --judge-model my-judge
    persona-eval --rescore docs/eval/run --no-fidelity --judge-hf /models/judge
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
    p.add_argument("--model", help="local Hugging Face model directory (default: the embedded SmolLM2-135M-Instruct)")
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
    return p


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
