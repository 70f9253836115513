"""Serving benchmarks: one module per question (run each with ``python -m benchmarks.serving.<name>``).

- :mod:`.switch`: cost of switching persona (ids into fixed buffers) against loading a pre-sliced
  pruned copy and swapping a rank-16 LoRA adapter; CUDA-graph replay correctness across switches.
- :mod:`.decode`: end-to-end greedy decode of Hugging Face Llama models (random weights, 1B and 8B
  shapes) with a mask bank attached, under four persona mixes, against the dense model.
- :mod:`.memory`: bytes of mask metadata per persona against pruned copies and LoRA adapters.
- :mod:`.summary`: the short table the GPU suite prints last.

Shared pieces: :mod:`.models` (model shapes, random models, random correlated mask banks, persona
mixes) and :mod:`.decode_loop` (greedy decode with a static KV cache, optionally one CUDA graph per
decode step). ``python -m benchmarks.bench_serving`` runs them together; ``benchmarks/gpu_suite.sh`` runs
everything GPU-side in one time-boxed call.
"""
