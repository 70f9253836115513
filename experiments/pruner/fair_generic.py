"""Exploratory (not part of the package): the generic-data baseline learned with other KL weights.

The acceptance banks' ``@generic-learned`` masks were learned with cross-entropy only, while the persona
masks they are compared with used cross-entropy + 1.0 * KL to the dense model. This script learns the
generic mask again at the budget recorded in a bank's reports, once per ``--kl-weights`` entry. A weight
equal to the stored mask's (its report's ``kl_weight``; absent means 0) is a check that the stored mask is
reproduced; any other weight adds ``<persona>@generic-learned+kl`` (weight 1; ``+kl<w>`` for others,
``(CE)`` for 0) for every persona of a copy of the bank (the mask does not depend on the persona). Used for docs/PRUNER.md ("A generic baseline with the
persona mask's loss"):

    python experiments/pruner/fair_generic.py --bank docs/eval/pruner/pruner-s0.25.safetensors \
        --bank-out /tmp/fair/pruner-s0.25-fair.safetensors --cache /tmp/fair/cache --kl-weights 0,1
"""
import argparse
from pathlib import Path

import torch

from persona_kernels.bank import MaskBank, PersonaMask
from persona_kernels.hf.default_model import load_default_model
from pruner import Pruner, PrunerConfig

p = argparse.ArgumentParser()
p.add_argument("--bank", required=True)
p.add_argument("--bank-out", required=True)
p.add_argument("--cache", required=True, help="pruner cache folder (generic answers, checkpoints)")
p.add_argument("--kl-weights", default="0,1", help="the stored mask's weight checks it; the others are added")
a = p.parse_args()
torch.set_num_threads(1)
bank = MaskBank.load(a.bank)
learned = [e for e in bank.personas if e.method == "persona-pruner"]
stored = {e.name.split("@")[0]: e for e in bank.personas if e.method == "generic-learned"}
reference = next(iter(stored.values()))
config = PrunerConfig.from_dict(learned[0].report["config"])
config.cache_dir, config.progress = a.cache, True
model, tokenizer = load_default_model()
pruner = Pruner(model, tokenizer, config)
for weight in [float(w) for w in a.kl_weights.split(",")]:
    config.kl_weight = weight
    keep, report = pruner.generic_learned()
    if float(reference.report.get("kl_weight", 0.0)) == weight:
        same = [name for name, e in stored.items() if torch.equal(e.keep, keep)]
        print(f"kl_weight {weight}: equals the stored generic-learned mask of {len(same)} of {len(stored)} personas")
        continue
    label = "generic-learned (CE)" if weight == 0 else "generic-learned+kl" + ("" if weight == 1 else f"{weight:g}")
    for e in learned:
        bank.add(PersonaMask(f"{e.name}@{label}", keep, e.description, "generic-learned",
                             None, {"sparsity": config.sparsity, "group_size": config.group_size, **report}))
    changed = (keep != reference.keep).sum().item()
    print(f"kl_weight {weight}: learned in {report['learn_s']} s; {changed} of {keep.numel()} group decisions differ from the stored one")
Path(a.bank_out).parent.mkdir(parents=True, exist_ok=True)
bank.save(a.bank_out)
print("wrote", a.bank_out)
