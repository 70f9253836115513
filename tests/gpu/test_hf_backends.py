"""A Hugging Face Llama with a mask bank attached: logits through the GPU backends equal the
reference backend's (skipped without a GPU).

The model is built from a config (random weights, SmolLM2-135M's FFN width, 4 layers); the bank
has per-layer masks of varying density, scales, input gains, output biases and a channel
permutation. Rows of one batch carry different personas (and the dense model). A prompt runs the
prefill path, the next step with the KV cache the decode path.

Tolerance, the flash-attn rule at model level: the backend's logit error against the fp32
reference model is at most twice the bf16 reference model's own error (plus a rounding floor);
in fp32 the logits agree to 1e-4 of their scale.
"""

from __future__ import annotations

import pytest
import torch

from conftest import require_backend
from persona_kernels.hf import attach_bank
from pruner.chat import returned_cache, with_cache
from test_hf import random_bank, tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONFIG = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
              num_key_value_heads=3, max_position_embeddings=256)
ROWS = ["p1", None, "p3", "p2"]  # None: the dense model
PROMPT_LEN = 40


def attached(backend: str, dtype: torch.dtype, device: torch.device):
    """The seeded model in ``dtype`` on ``device`` with the seeded bank attached on ``backend``."""
    model = tiny_llama(seed=0, **CONFIG).to(device=device, dtype=dtype)
    return attach_bank(model, random_bank(model, n_personas=3), backend=backend)


@torch.no_grad()
def prefill_and_step(model, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a mixed-persona prompt (prefill path) and of one cached step after it (decode path)."""
    prompt = torch.randint(3, 96, (len(ROWS), PROMPT_LEN), generator=torch.Generator().manual_seed(5)).to(device)
    out = model(input_ids=prompt, persona=ROWS, use_cache=True)
    step = out.logits[:, -1:].argmax(-1)
    after = model(input_ids=step, persona=ROWS, use_cache=True, **with_cache(returned_cache(out)))
    return out.logits.float(), after.logits.float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_logits_equal_reference_backend(backend: str, dtype: torch.dtype) -> None:
    require_backend(backend)
    device = torch.device("cuda")
    oracle = prefill_and_step(attached("reference", torch.float32, device), device)
    got = prefill_and_step(attached(backend, dtype, device), device)
    if dtype == torch.float32:
        for label, g, o in zip(("prefill", "decode"), got, oracle):
            error = (g - o).abs().max().item()
            assert error <= 1e-4 * (1.0 + o.abs().max().item()), f"{label}: fp32 logit error {error:.3g}"
        return
    plain = prefill_and_step(attached("reference", dtype, device), device)
    for label, g, p, o in zip(("prefill", "decode"), got, plain, oracle):
        assert not torch.isnan(g).any(), f"{label}: NaN logits"
        error = (g - o).abs().max().item()
        bound = 2 * (p - o).abs().max().item() + 2 * torch.finfo(dtype).eps * o.abs().max().item()
        assert error <= bound, f"{label}: {backend} {dtype} logit error {error:.3g} > {bound:.3g}"


@pytest.mark.parametrize("backend", ["triton", "cuda", "reference"])
def test_captured_forward_follows_persona_lists_of_any_length(backend: str) -> None:
    """Capture one forward of the attached model under a single persona, then switch between lists
    of other lengths with ``set_persona`` alone and replay: each replay equals an eager forward."""
    from persona_kernels.hf import set_persona

    require_backend(backend)
    device = torch.device("cuda")
    model = attached(backend, torch.float32, device)
    batch = 4
    static_ids = torch.randint(3, 96, (batch, 8), generator=torch.Generator().manual_seed(9)).to(device)
    specs = [["p1", "p2", "p3", None], ["p3", "p2"], "p2", ["p2", None, "p1", "p3"], "p1"]
    with torch.no_grad():
        set_persona(model, "p1")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for spec in specs:  # warm-up at this shape under every list: compile, tune, grow buffers
                set_persona(model, spec)
                model(input_ids=static_ids, use_cache=False)
            set_persona(model, "p1")
            model(input_ids=static_ids, use_cache=False)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = model(input_ids=static_ids, use_cache=False).logits
        for spec in specs:
            set_persona(model, spec)
            graph.replay()
            replayed = static_logits.clone()
            eager = model(input_ids=static_ids, use_cache=False).logits
            error = (replayed - eager).abs().max().item()
            assert error <= 1e-4 * (1.0 + eager.abs().max().item()), f"{spec}: replay differs from eager by {error:.3g}"
