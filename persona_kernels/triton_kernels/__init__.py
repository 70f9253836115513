"""Triton kernels of the masked FFN: :mod:`.decode` (few tokens) and :mod:`.prefill` (many tokens).

Each module holds ``@triton.jit`` kernels and nothing else; launch logic (validation, grids,
workspaces, path choice) lives in :mod:`persona_kernels.backends.triton_backend`.
"""
