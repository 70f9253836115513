"""Exploratory (not part of the package): re-measure the acceptance banks on more held-out questions.

docs/PRUNER.md's acceptance tables score every mask on 8 eval questions per persona (4 persona-specific,
4 general) with 32-token dense answers. This script scores the same bank entries, unchanged, on the
first ``--n-eval`` questions of ``eval/<persona>.jsonl`` (half of each split; 40 = all of them), with
the same teacher-forced KL(dense || masked) and top-1 agreement. The persona mask is measured with
the scales (and input gains and output bias) its bank entry carries and without any; baselines as stored (no scales), as in PRUNER.md.
Appends one JSON row per (persona, sparsity, method) to ``--out`` (skipping rows already there; each row
also holds every question's KL and top-1, for the paired comparisons of ``fair_report.py``) and
writes and prints ``table.md`` beside it (``--methods`` limits the methods). Used for docs/PRUNER.md ("All 40 eval questions"):

    python experiments/pruner/rescore.py --banks docs/eval/pruner/pruner-s0.25.safetensors \
        --personas <all 14> --n-eval 40 --methods "persona,persona (no scales),generic-learned" \
        --out /tmp/rescore/results.jsonl
"""
import argparse
import json
from pathlib import Path

import torch

from persona_kernels.bank import MaskBank
from persona_kernels.hf.default_model import load_default_model
from persona_kernels.hf.ffn import model_fingerprint
from pruner.data import JsonlCache, load_personas, read_jsonl
from pruner.experiment import SHARED, persona_fidelity, write_table

p = argparse.ArgumentParser()
p.add_argument("--banks", required=True, help="comma-separated bank paths (one sparsity each)")
p.add_argument("--personas", required=True, help="comma-separated persona ids")
p.add_argument("--n-eval", type=int, default=40)
p.add_argument("--eval-tokens", type=int, default=32)
p.add_argument("--methods", default="", help="comma-separated methods to measure (default: all in the bank)")
p.add_argument("--out", default="/tmp/rescore/results.jsonl")
p.add_argument("--data-dir", default=str(SHARED), help=f"persona descriptions and eval questions (default {SHARED})")
a = p.parse_args()
torch.set_num_threads(1)
out = Path(a.out)
out.parent.mkdir(parents=True, exist_ok=True)
rows = read_jsonl(out) if out.is_file() else []
done = {(r["persona"], r["sparsity"], r["method"]) for r in rows}
banks = [MaskBank.load(path) for path in a.banks.split(",")]
model, tokenizer = load_default_model()
fingerprint = model_fingerprint(model)
cache = JsonlCache(out.parent / "eval_answers.jsonl")
wanted = set(a.methods.split(",")) if a.methods else None
settings = argparse.Namespace(data_dir=a.data_dir, n_eval=a.n_eval, eval_tokens=a.eval_tokens)
for row in load_personas(Path(a.data_dir) / "personas" / "personas.jsonl", a.personas.split(",")):
    pid = row["id"]
    fidelity = None
    for bank in banks:
        entries = [e for e in bank.personas if e.name == pid or e.name.startswith(pid + "@")]
        sparsity = round(entries[0].sparsity, 2)
        measured = []
        for e in entries:
            method = "persona" if e.name == pid else e.name.split("@", 1)[1]
            measured.append((method, e.keep, (e.scales, e.input_gains, e.output_bias)))
            if e.name == pid:
                measured.append(("persona (no scales)", e.keep, ()))
        for method, keep, recovery in measured:
            if (pid, sparsity, method) in done or (wanted is not None and method not in wanted):
                continue
            if fidelity is None:
                fidelity = persona_fidelity(model, tokenizer, pid, row["description"], settings, cache, fingerprint)
            score = fidelity.measure_questions(keep, bank.group_size, *recovery)
            result = {"persona": pid, "sparsity": sparsity, "method": method, "n_eval": a.n_eval, **score}
            rows.append(result)
            with open(out, "a") as stream:
                stream.write(json.dumps(result) + "\n")
            print(f"{pid} s={sparsity} {method}: KL {score['kl']:.3f} top-1 {score['top1']:.3f}", flush=True)

table = out.with_name("table.md")
write_table(rows, table)
print(table.read_text())
