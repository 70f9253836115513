"""Build the stand-in mask banks the committed report evaluates (used while no pruner bank exists).

For each persona and sparsity, at group size 16 (the pruner's default):

* ``<persona>``           persona mask: :mod:`persona_kernels.heuristic` (mean |FFN activation| x
                          down-projection norm on chat prompts with the persona's system prompt);
* ``<persona>@wanda``     the same statistic on the same questions with no persona prompt (a
                          structured Wanda-style mask from generic text, one per persona for naming);
* ``<persona>@magnitude`` group weight norm (:func:`pruner.baselines.magnitude_scores`);
* ``<persona>@random``    random groups (:func:`pruner.baselines.random_mask`, seed 0).

Every layer keeps the same number of groups. Usage::

    python experiments/eval/make_fallback_banks.py --personas jack_torrance,blair_waldorf --out out/eval-banks
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from persona_kernels.bank import MaskBank, PersonaMask
from persona_kernels.heuristic import GENERIC_PROMPTS, channel_activation_stats, keep_top_groups, persona_texts
from persona_kernels.hf.default_model import load_default_model
from persona_kernels.hf.ffn import ffn_weights, model_ffn_shape, model_fingerprint, model_name
from pruner.baselines import magnitude_scores, random_mask
from pruner.chat import system_prompt


def main() -> None:
    """Write ``bank-s<sparsity>.safetensors`` for each sparsity."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--personas", required=True)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--sparsities", default="0.25,0.5")
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_default_model()
    n_layers, d_ff, _ = model_ffn_shape(model)
    G = args.group_size
    records = {json.loads(l)["id"]: json.loads(l) for l in open(Path(args.data) / "personas" / "personas.jsonl")}
    down = torch.stack([w.float().norm(dim=0) for _, _, w in ffn_weights(model)])
    generic_texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
                     for q in GENERIC_PROMPTS]
    generic = channel_activation_stats(model, tokenizer, generic_texts) * down
    magnitude = magnitude_scores(model, G)  # [L, n_groups]
    persona_stats = {}
    for pid in args.personas.split(","):
        texts = persona_texts(tokenizer, system_prompt(records[pid]["description"]))
        persona_stats[pid] = channel_activation_stats(model, tokenizer, texts) * down
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for s in (float(x) for x in args.sparsities.split(",")):
        n_groups = d_ff // G
        k = max(1, round((1 - s) * n_groups))
        bank = MaskBank(model_name(model), model_fingerprint(model), n_layers, d_ff, G)
        mag_keep = torch.zeros(n_layers, n_groups, dtype=torch.bool).scatter_(1, torch.topk(magnitude, k, dim=1).indices, True)
        for pid, stats in persona_stats.items():
            desc = records[pid]["description"]
            report = {"target_sparsity": s, "builder": "experiments/eval/make_fallback_banks.py"}
            bank.add(PersonaMask(pid, keep_top_groups(stats, G, s), desc, "heuristic-activation", None, report))
            bank.add(PersonaMask(f"{pid}@wanda", keep_top_groups(generic, G, s), desc, "wanda-generic", None, report))
            bank.add(PersonaMask(f"{pid}@magnitude", mag_keep.clone(), desc, "magnitude", None, report))
            bank.add(PersonaMask(f"{pid}@random", random_mask(n_layers, n_groups, k, 0), desc, "random", None, report))
        path = out / f"bank-s{s:.2f}.safetensors"
        bank.save(path)
        print(path)
        print(bank.summary())


if __name__ == "__main__":
    main()
