"""Exploratory (not part of the package): which copy-free recovery lever transfers to held-out questions?

Learns, on one persona's calibration data with one mask of a bank fixed, any of: per-channel scales
(``scales``), one scale per group (``group``), an FFN output bias (``learnbias``, ``flap`` starts it at the
closed-form compensation), an FFN input gain (``gain``), a per-channel bias on the gate or up projection's
output (``gatebias``, ``upbias``: before the activation and the product), with KL on every suffix
position (``allpos``). Two references that are not copy-free bound what any such lever could reach: a
rank-r LoRA on the gate, up and down projections (``lora``) and the paper's recovery fine-tuning of the
FFN weights themselves (``finetune``: a private copy of the FFN per persona; ``finetuneall``: of every
weight; the teacher is then a frozen copy of the dense model). Every 10 steps it records KL on the persona's ``--n-eval`` eval questions and on the last ``--holdout`` calibration
sequences (not trained on). Appends one JSON row to ``--out``. Used for docs/SCALES.md, e.g.:

    python experiments/scales/lever.py --persona twilight_sparkle --bank bank_s0.25+kl.safetensors --variant scales+gain \
        --holdout 32 --cache-dir /tmp/scache --eval-cache /tmp/ss_combo/cache/eval_answers.jsonl
"""
import argparse
import contextlib
import copy
import json
import time

import torch
import torch.nn.functional as F

from persona_kernels.bank import MaskBank
from persona_kernels.hf.ffn import find_ffn_layers
from pruner.chat import (answer_logits, decoder_and_head, encode_prefix, kl_divergence, prefix_cache, token_loss,
                         with_cache)
from pruner.learn import batch_indices
from pruner.masked_model import channel_multiplier, expand_groups, ffn_activation_hook, freeze

from common import add_run_arguments, persona_run

p = argparse.ArgumentParser()
p.add_argument("--persona", required=True)
p.add_argument("--bank", required=True)
p.add_argument("--variant", default="scales")
p.add_argument("--wd", type=float, default=0.0, help="weight of the mean squared deviation of the scales from 1")
p.add_argument("--steps", type=int, default=60)
p.add_argument("--lr", type=float, default=0.05)
p.add_argument("--kl", type=float, default=10.0)
p.add_argument("--bias-lr", type=float, default=None, help="step size of the learned output bias (default: --lr)")
p.add_argument("--proj-bias-lr", type=float, default=0.01, help="step size of the gate / up projection biases")
p.add_argument("--ft-lr", type=float, default=1e-4, help="step size of the fine-tuned FFN weights")
p.add_argument("--lora-rank", type=int, default=16)
p.add_argument("--lora-lr", type=float, default=1e-3)
p.add_argument("--holdout", type=int, default=0)
add_run_arguments(p)
p.add_argument("--out", default="/tmp/lever_runs.jsonl")
a = p.parse_args()
bank = MaskBank.load(a.bank)
mask, G = bank.get(a.persona), bank.group_size
model, _, data, fidelity = persona_run(a.persona, G, a.cache_dir, a.eval_cache, n_eval=a.n_eval, data_dir=a.data_dir)
layers = find_ffn_layers(model)
channel = expand_groups(mask.keep.float(), G)
L, d_ff = channel.shape
d_model = model.config.hidden_size


def flap_bias() -> torch.Tensor:
    """Closed-form compensation: W_down[:, dropped] @ mean dense activation of the dropped channels."""
    sums, count = torch.zeros(L, d_ff), [0]

    def observe(i, h):
        sums[i] += h.detach().float().reshape(-1, d_ff).sum(0)
        count[0] += h.reshape(-1, d_ff).shape[0] if i == 0 else 0

    with torch.no_grad(), ffn_activation_hook(model, observe):
        past = encode_prefix(model, data.prefix)
        for b in data.batches(8):
            answer_logits(model, data.prefix, b, past)
    mean = sums / count[0]
    return torch.stack([l.mlp.down_proj.weight.float() @ (mean[l.index] * (1 - channel[l.index])) for l in layers])


scales = torch.ones(L, d_ff, requires_grad=True)
group_scales = torch.ones(L, d_ff // G, requires_grad=True)
bias = (flap_bias() if "flap" in a.variant else torch.zeros(L, d_model)).requires_grad_(True)
gain = torch.ones(L, d_model, requires_grad=True)
gate_bias = torch.zeros(L, d_ff, requires_grad=True)
up_bias = torch.zeros(L, d_ff, requires_grad=True)
groups = [{"params": [t for key, t in (("scales", scales), ("group", group_scales)) if key in a.variant], "lr": a.lr}]
if "learnbias" in a.variant:
    groups.append({"params": [bias], "lr": a.lr if a.bias_lr is None else a.bias_lr})
if "gain" in a.variant:
    groups.append({"params": [gain], "lr": 0.01})
groups.append({"params": [t for key, t in (("gatebias", gate_bias), ("upbias", up_bias)) if key in a.variant], "lr": a.proj_bias_lr})
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
lora = {(l.index, proj): ((torch.randn(a.lora_rank, getattr(l.mlp, proj).in_features)
                           / getattr(l.mlp, proj).in_features ** 0.5).requires_grad_(),
                          torch.zeros(getattr(l.mlp, proj).out_features, a.lora_rank, requires_grad=True))
        for l in layers for proj in PROJECTIONS} if "lora" in a.variant else {}
if lora:
    groups.append({"params": [t for pair in lora.values() for t in pair], "lr": a.lora_lr})
if "finetuneall" in a.variant:
    tuned_weights = list(model.parameters())
elif "finetune" in a.variant:
    tuned_weights = [getattr(l.mlp, proj).weight for l in layers for proj in PROJECTIONS]
else:
    tuned_weights = []
teacher_model = copy.deepcopy(model) if tuned_weights else model


@contextlib.contextmanager
def extras():
    """The output bias and input gain hooks (identity unless learned) and the learned projection biases."""
    hooks = [getattr(l.mlp, proj).register_forward_hook(lambda m, i, o, k=l.index, b=b: o + b[k].to(o.dtype))
             for key, proj, b in (("gatebias", "gate_proj", gate_bias), ("upbias", "up_proj", up_bias)) if key in a.variant
             for l in layers]
    hooks += [getattr(l.mlp, proj).register_forward_hook(
                  lambda m, i, o, A=lora[l.index, proj][0], B=lora[l.index, proj][1]: o + ((i[0] @ A.T.to(o.dtype)) @ B.T.to(o.dtype)))
              for l in layers for proj in PROJECTIONS if lora]
    hooks += [l.mlp.down_proj.register_forward_hook(lambda m, i, o, k=l.index: o + bias[k].to(o.dtype)) for l in layers]
    hooks += [l.mlp.register_forward_pre_hook(lambda m, args, k=l.index: (args[0] * gain[k].to(args[0].dtype),) + tuple(args[1:]))
              for l in layers]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def multiplier():
    return channel * scales * expand_groups(group_scales, G)


n = len(data)
train_idx, hold_idx = list(range(n - a.holdout)), list(range(n - a.holdout, n))


@torch.no_grad()
def eval_kl() -> float:
    with extras():
        return fidelity.compare(fidelity._logits(channel_multiplier(model, multiplier().detach())))["kl"]


@torch.no_grad()
def holdout_kl() -> float | None:
    if not hold_idx:
        return None
    total = count = 0
    for s in range(0, len(hold_idx), 8):
        b = data.batch(hold_idx[s : s + 8])
        dense, _ = answer_logits(teacher_model, data.prefix, b, dense_past)
        with extras(), channel_multiplier(model, multiplier().detach()):
            masked, _ = answer_logits(model, data.prefix, b)
        kl = kl_divergence(dense, masked)
        total, count = total + float(kl.sum()), count + kl.numel()
    return total / count


def suffix_logits(b, past=None, net=model):
    """Logits at every real suffix position (question and answer tokens)."""
    decoder, head = decoder_and_head(net)
    hidden = decoder(input_ids=b.ids, **with_cache(prefix_cache(net, data.prefix, b.ids.shape[0], past)), use_cache=True).last_hidden_state
    return head(hidden[b.valid]).float()


freeze(model)
freeze(teacher_model)
for weight in tuned_weights:
    weight.requires_grad_(True)
if tuned_weights:
    groups.append({"params": tuned_weights, "lr": a.ft_lr})
trained = sum(int(t.numel()) for g in groups for t in g["params"])
print(f"{a.variant}: {trained:,} trained numbers", flush=True)
dense_past = encode_prefix(teacher_model, data.prefix)
trajectory = [(0, eval_kl(), holdout_kl())]
print(trajectory[-1], flush=True)
groups = [g for g in groups if g["params"]]
optimizer = torch.optim.Adam(groups) if groups else None
began = time.time()
for step in range(a.steps if optimizer else 0):
    b = data.batch([train_idx[i] for i in batch_indices(len(train_idx), 4, step, 1)])
    if "allpos" in a.variant:
        with torch.no_grad():
            teacher = suffix_logits(b, dense_past, teacher_model)
        with extras(), channel_multiplier(model, multiplier):
            logits = suffix_logits(b)
        answer = (b.targets != -100)[b.valid]
        loss = F.cross_entropy(logits[answer], b.targets[b.valid][answer]) + a.kl * kl_divergence(teacher, logits).mean()
    else:
        with torch.no_grad():
            teacher, _ = answer_logits(teacher_model, data.prefix, b, dense_past)
        with extras(), channel_multiplier(model, multiplier):
            logits, targets = answer_logits(model, data.prefix, b)
        loss = token_loss(logits, targets, teacher, a.kl)
    if a.wd:
        loss = loss + a.wd * (((scales - 1) * channel) ** 2).sum() / channel.sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if (step + 1) % 10 == 0:
        trajectory.append((step + 1, eval_kl(), holdout_kl()))
        print(trajectory[-1], loss.item(), flush=True)
row = dict(persona=a.persona, bank=a.bank, variant=a.variant, wd=a.wd, lr=a.lr, bias_lr=a.bias_lr, kl=a.kl, holdout=a.holdout, steps=a.steps,
           n_eval=a.n_eval, proj_bias_lr=a.proj_bias_lr, ft_lr=a.ft_lr, lora_rank=a.lora_rank, lora_lr=a.lora_lr, trained=trained,
           trajectory=trajectory, seconds=round(time.time() - began))
with open(a.out, "a") as stream:
    stream.write(json.dumps(row) + "\n")
print(row)
