"""Exploratory (not part of the package): at one sparsity, does a bigger mask budget, or learning the mask
and the scales together, change what scales recover? Used for docs/SCALES.md:

    python experiments/scales/joint.py --persona twilight_sparkle --sparsity 0.25 --cache-dir /tmp/scache \
        --eval-cache /tmp/ss_combo/cache/eval_answers.jsonl

Prints and appends to ``--out``: eval KL of the importance-initialised mask, of the mask learned for
``--steps`` (KL weight 10, the whole 160-instruction pool), of that mask with scales learned after it,
and of a mask and scales learned together (one Adam over scores and scales).
"""
import argparse
import json
import time

import torch

from pruner.importance import activation_importance, collect_stats, scores_from_importance
from pruner.learn import _optimize, learn_mask, learn_scales
from pruner.masked_model import channel_multiplier, expand_groups, ste_mask, topk_keep

from common import add_run_arguments, persona_run

p = argparse.ArgumentParser()
p.add_argument("--persona", default="twilight_sparkle")
p.add_argument("--sparsity", type=float, default=0.25)
p.add_argument("--steps", type=int, default=60)
add_run_arguments(p)
p.add_argument("--out", default="/tmp/joint.jsonl")
a = p.parse_args()
G = 16
model, pruner, data, fidelity = persona_run(a.persona, G, a.cache_dir, a.eval_cache, a.sparsity, n_eval=a.n_eval, data_dir=a.data_dir)
init = scores_from_importance(activation_importance(collect_stats(model, data.prefix, data.batches(8), False), model, G))
k, n_groups, out = pruner.k, init.shape[1], {}


def log(key: str, value: float) -> None:
    out[key] = value
    print(key, value, flush=True)


log("init_mask", fidelity.measure(topk_keep(init, k), G)["kl"])
began = time.time()
keep, _ = learn_mask(model, data, init, k, G, steps=a.steps, lr=0.05, batch_size=4, seed=0, kl_weight=10.0, progress=False)
log("mask", fidelity.measure(keep, G)["kl"])
log("mask_s", time.time() - began)
began = time.time()
scales = learn_scales(model, data, keep, G, steps=a.steps, lr=0.05, batch_size=4, seed=0, kl_weight=10.0, progress=False)[0].scales
log("mask_then_scales", fidelity.measure(keep, G, scales)["kl"])
log("scales_s", time.time() - began)


def joint(parameter: torch.Tensor):
    """Columns [:n_groups] are mask scores (straight-through top-k), the rest per-channel scales."""
    return channel_multiplier(model, lambda: expand_groups(ste_mask(parameter[:, :n_groups], k), G) * parameter[:, n_groups:])


began = time.time()
start = torch.cat([init.float(), torch.ones(init.shape[0], n_groups * G)], 1)
result = _optimize(model, data, start, joint, a.steps, 0.05, 10.0, 4, 0, None, 10, "joint", False, None)
joint_keep, joint_scales = topk_keep(result.value[:, :n_groups], k), result.value[:, n_groups:]
log("joint_mask_alone", fidelity.measure(joint_keep, G)["kl"])
log("joint_mask_scales", fidelity.measure(joint_keep, G, joint_scales)["kl"])
log("joint_s", time.time() - began)
with open(a.out, "a") as stream:
    stream.write(json.dumps(dict(persona=a.persona, sparsity=a.sparsity, steps=a.steps, **out)) + "\n")
