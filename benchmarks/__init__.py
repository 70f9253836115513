"""Benchmarks of persona-kernels: one script per question, shared helpers in :mod:`benchmarks.common`.

Run from the repository root, e.g. ``python -m benchmarks.bench_serving all --smoke``.
"""
