"""Compile every Triton kernel variant for a GPU architecture on a machine without a GPU.

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute, but it never runs
Triton's compiler: a ``tl.dot`` shape the tensor cores reject, a type error the interpreter lets
through, a config that needs more shared memory than the card has, or register spills only
appear when the kernels are lowered to PTX and assembled. This module does that lowering ahead
of time, with Triton's own compiler and its bundled ``ptxas`` (resources read back from the
cubin with its bundled ``cuobjdump``), for each autotuning config the GPU
would try, with the argument types and alignment the launchers in
:mod:`persona_kernels.backends.triton_backend` pass::

    python -m persona_kernels.triton_kernels.compile_check --arch 90 [--quick] [--json FILE]

It must run without ``TRITON_INTERPRET`` (under it, ``triton.jit`` builds interpreter objects
that cannot be compiled). Exit status 1 when a variant fails to compile, or when every config of
one kernel/dtype/block combination is over the card's shared memory (the autotuner would have
nothing to launch). Spills and single over-limit configs are reported, not fatal: the autotuner
prunes over-limit configs and times the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

SHARED_LIMIT_BYTES = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448, 100: 232_448, 120: 101_376}
"""Largest shared memory one block may opt into, per compute capability (CUDA programming guide)."""

DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compilation: a kernel, its runtime argument types, its constexprs and launch options."""

    kernel: str                 # "decode.decode_gate_up_kernel", ...
    dtype: str                  # activation/weight dtype: bf16, fp16 or fp32
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int
    config_index: int = 0       # position in the kernel's autotuning list (0: the config used without autotuning)
    family: str = ""            # kernel, dtype and the launcher's constexprs: what its configs have in common

    @property
    def label(self) -> str:
        """Short human-readable name with the config."""
        consts = dict(self.constexprs)
        shown = ",".join(f"{k}={v}" for k, v in consts.items() if k.startswith("BLOCK") or k == "T")
        flags = "".join(f"+{flag.lower()}" for flag in ("HAS_SCALES", "HAS_GAINS", "SPLIT") if consts.get(flag))
        flags += "+gelu" if consts.get("ACT") == 1 else ""
        return f"{self.kernel.split('.')[-1]}{flags} {self.dtype} {shown} w{self.num_warps}s{self.num_stages}"


def _require_compiler_mode() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("compile_check needs the real Triton compiler: unset TRITON_INTERPRET and run it again")


def _kernels() -> dict:
    """Every ``*_kernel`` of the decode and prefill modules, keyed ``module.name``."""
    from . import decode, prefill

    return {f"{module.__name__.rsplit('.', 1)[-1]}.{name}": kernel
            for module in (decode, prefill) for name, kernel in vars(module).items() if name.endswith("_kernel")}


def _jit_fn(kernel):
    from triton.runtime.autotuner import Autotuner

    return kernel.fn if isinstance(kernel, Autotuner) else kernel


def _autotune_configs(kernel) -> list[tuple[dict, int, int]]:
    from triton.runtime.autotuner import Autotuner

    if not isinstance(kernel, Autotuner):
        return [({}, 4, 3)]  # Triton's launch defaults
    return [(dict(c.kwargs), c.num_warps, c.num_stages) for c in kernel.configs]


def _signature(kernel, types: dict[str, str], constexprs: dict[str, object]) -> tuple[tuple[str, str], ...]:
    names = _jit_fn(kernel).arg_names
    sig = []
    for name in names:
        if name in constexprs:
            sig.append((name, "constexpr"))
        elif name in types:
            sig.append((name, types[name]))
        elif name.endswith("_ptr"):
            sig.append((name, "*i32"))
        else:
            sig.append((name, "i32"))
    return tuple(sig)


def variants(quick: bool = False) -> Iterator[Variant]:
    """Every kernel variant the launchers can request on a GPU (``quick``: bf16 and fp32 only, fewer blocks).

    Types mirror ``triton_backend._run_decode``/``_run_prefill``: activations, weights and the
    ``h`` workspace in the model dtype, scales and gains fp32 (int32 placeholders when absent),
    split-K partials fp32, every metadata buffer int32. Decode fuses the gains only for token
    blocks up to ``DECODE_FUSED_GAINS_MAX_BLOCK_T`` (larger ones get pre-multiplied tokens).
    """
    from ..backends import triton_backend as launcher
    from . import decode

    kernels = _kernels()
    dtypes = ("bf16", "fp32") if quick else tuple(DTYPES)
    block_ts = (16, 64) if quick else (16, 32, 64)
    extras_options = ((True, True), (True, False), (False, False))  # (scales, gains)
    for dtype in dtypes:
        ptr = DTYPES[dtype]
        fp32_dot = dtype == "fp32"
        activations = {"x_ptr": ptr, "gate_up_ptr": ptr, "h_ptr": ptr}
        for has_scales, has_gains in extras_options:
            extras = {"scales_ptr": "*fp32"} if has_scales else {}
            extras.update({"gains_ptr": "*fp32"} if has_gains else {})
            launch = dict(ACT=0, HAS_SCALES=has_scales, HAS_GAINS=has_gains, BF16_RNE_BY_HAND=False, FP32_DOT=fp32_dot)
            for block_t in block_ts:
                if has_gains and block_t > launcher.DECODE_FUSED_GAINS_MAX_BLOCK_T:
                    continue
                yield from _expand("decode.decode_gate_up_kernel", kernels, dtype, {**activations, **extras},
                                   {**launch, "BLOCK_T": block_t})
            if has_scales != has_gains:
                continue  # prefill fuses both or neither in these checks: scales alone adds only an epilogue load
            yield from _expand("prefill.prefill_gate_up_kernel", kernels, dtype, {**activations, **extras},
                               {**launch, "BLOCK_M": launcher.PREFILL_BLOCK_M})
            if not quick:  # GELU, and one token (Triton turns an int argument equal to 1 into a constant)
                yield from _expand("decode.decode_gate_up_kernel", kernels, dtype, {**activations, **extras},
                                   {**launch, "ACT": 1, "BLOCK_T": 16, "T": 1})
        for block_t in block_ts:  # the bias is added by the unsplit down kernel or by the split reduction
            for split, has_bias in ((True, False), (False, False), (False, True)):
                yield from _expand("decode.decode_down_kernel", kernels, dtype,
                                   {"h_ptr": ptr, "down_ptr": ptr, "part_ptr": "*fp32" if split else ptr,
                                    **({"bias_ptr": "*fp32"} if has_bias else {})},
                                   {"SPLIT": split, "HAS_BIAS": has_bias, "FP32_DOT": fp32_dot, "BF16_RNE_BY_HAND": False,
                                    "BLOCK_T": block_t, "BLOCK_D": decode.DOWN_BLOCK_D})
        for has_bias in (False, True):
            bias_type = {"bias_ptr": "*fp32"} if has_bias else {}
            yield from _expand("prefill.prefill_down_kernel", kernels, dtype,
                               {"h_ptr": ptr, "down_ptr": ptr, "out_ptr": ptr, **bias_type},
                               {"HAS_BIAS": has_bias, "FP32_DOT": fp32_dot, "BF16_RNE_BY_HAND": False,
                                "BLOCK_M": launcher.PREFILL_BLOCK_M})
            yield from _expand("decode.reduce_splits_kernel", kernels, dtype,
                               {"part_ptr": "*fp32", "out_ptr": ptr, **bias_type},
                               {"HAS_BIAS": has_bias, "BF16_RNE_BY_HAND": False, "BLOCK": launcher.REDUCE_SPLITS_BLOCK})


def _expand(name: str, kernels: dict, dtype: str, types: dict[str, str], constexprs: dict) -> Iterator[Variant]:
    kernel = kernels[name]
    family = f"{name} {dtype} {constexprs}"
    for index, (config, num_warps, num_stages) in enumerate(_autotune_configs(kernel)):
        consts = {**constexprs, **config}
        yield Variant(name, dtype, _signature(kernel, types, consts), tuple(consts.items()), num_warps, num_stages, index,
                      family)


@dataclasses.dataclass
class Report:
    """What compiling one variant gave: shared memory, registers, stack and local memory, MMA, copy widths."""

    variant: Variant
    ok: bool
    error: str = ""
    shared_bytes: int = 0
    registers: int = 0
    stack_bytes: int = 0        # spills land here
    local_bytes: int = 0
    tensor_core: str = ""       # "wgmma" (Hopper warpgroup MMA), "mma" (mma.sync) or "" (none)
    async_copy_bytes: dict[int, int] = dataclasses.field(default_factory=dict)  # cp.async width -> count
    seconds: float = 0.0

    def to_json(self) -> dict:
        """A flat dict for JSON lines."""
        v = self.variant
        return {"kernel": v.kernel, "dtype": v.dtype, "constexprs": dict(v.constexprs), "num_warps": v.num_warps,
                "num_stages": v.num_stages, "config_index": v.config_index, "ok": self.ok, "error": self.error, "shared_bytes": self.shared_bytes,
                "registers": self.registers, "stack_bytes": self.stack_bytes, "local_bytes": self.local_bytes,
                "tensor_core": self.tensor_core, "async_copy_bytes": self.async_copy_bytes,
                "seconds": round(self.seconds, 2)}


_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)")


def cubin_resources(cubin: bytes) -> dict[str, int]:
    """Registers, stack-frame and local-memory bytes of a compiled kernel (``cuobjdump -res-usage``;
    spilled registers live in the stack frame)."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(cubin)
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", path], capture_output=True, text=True,
                               check=True).stdout
    registers, stack, local = (int(n) for n in _RESOURCES.search(usage).groups())
    return {"registers": registers, "stack_bytes": stack, "local_bytes": local}


_CP_ASYNC = re.compile(r"cp\.async\.\w+\.shared\.global \[[^\]]+\], \[[^\]]+\], (0x[0-9a-fA-F]+|\d+)")


def ptx_instructions(ptx: str) -> dict:
    """The tensor-core instruction family ``ptx`` uses and the widths of its global-to-shared async copies."""
    tensor_core = "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else ""
    widths: dict[int, int] = {}
    for width in _CP_ASYNC.findall(ptx):
        size = int(width, 0)
        widths[size] = widths.get(size, 0) + 1
    return {"tensor_core": tensor_core, "async_copy_bytes": dict(sorted(widths.items()))}


def compile_variant(variant: Variant, arch: int) -> Report:
    """Compile ``variant`` for compute capability ``arch`` (pointers and sizes 16-aligned, as at real shapes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _require_compiler_mode()
    kernel = _kernels()[variant.kernel]
    fn = _jit_fn(kernel)
    signature = dict(variant.signature)
    constexprs = dict(variant.constexprs)
    # Alignment hints the runtime gives real shapes: 16-byte aligned pointers, sizes/strides % 16 == 0.
    aligned = {"stride_xt", "stride_ht", "stride_pt", "stride_ot", "d", "d_ff", "G"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name].startswith("*") or (name in aligned and signature[name] == "i32")}
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": variant.num_warps, "num_stages": variant.num_stages})
        resources = cubin_resources(compiled.asm["cubin"])
    except Exception as error:  # a compile failure is the finding: keep its first lines
        message = " | ".join(str(error).strip().splitlines()[:6])
        return Report(variant, ok=False, error=f"{type(error).__name__}: {message}", seconds=time.perf_counter() - start)
    return Report(variant, ok=True, shared_bytes=int(compiled.metadata.shared), seconds=time.perf_counter() - start,
                  **resources, **ptx_instructions(compiled.asm["ptx"]))


def _compile_star(args: tuple[Variant, int]) -> Report:
    return compile_variant(*args)


def check(arch: int = 90, quick: bool = False, jobs: int | None = None, progress: bool = True) -> list[Report]:
    """Compile every variant (in ``jobs`` processes) and return one report per variant, in order."""
    _require_compiler_mode()
    todo = list(variants(quick))
    jobs = jobs or min(len(todo), os.cpu_count() or 1)
    reports = []
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for i, report in enumerate(pool.map(_compile_star, [(v, arch) for v in todo]), 1):
            reports.append(report)
            if progress:
                status = "ok" if report.ok else "FAILED"
                print(f"[{i}/{len(todo)}] {status:6s} {report.variant.label} shared={report.shared_bytes} "
                      f"regs={report.registers} stack={report.stack_bytes} tc={report.tensor_core or '-'}",
                      file=sys.stderr, flush=True)
    return reports


def problems(reports: list[Report], arch: int) -> list[str]:
    """The findings that make the check fail: compile errors, and families with no config that fits."""
    limit = SHARED_LIMIT_BYTES.get(arch)
    found = [f"{r.variant.label}: {r.error}" for r in reports if not r.ok]
    families: dict[str, list[Report]] = {}
    for report in reports:
        families.setdefault(report.variant.family, []).append(report)
    for family, members in families.items():
        if limit is not None and all(not r.ok or r.shared_bytes > limit for r in members):
            found.append(f"{family}: no config fits {limit} bytes of shared memory "
                         f"({[r.shared_bytes for r in members]})")
    return found


def warnings(reports: list[Report], arch: int) -> list[str]:
    """Non-fatal findings: configs over the shared-memory limit (pruned by the autotuner), stack frames (spills)."""
    limit = SHARED_LIMIT_BYTES.get(arch)
    found = []
    for r in reports:
        if not r.ok:
            continue
        if limit is not None and r.shared_bytes > limit:
            found.append(f"{r.variant.label}: {r.shared_bytes} bytes of shared memory > {limit} (autotuner skips it)")
        if r.stack_bytes or r.local_bytes:
            found.append(f"{r.variant.label}: {r.stack_bytes} stack bytes, {r.local_bytes} local bytes (spills)")
    return found


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90 (default 90: H100/H200)")
    parser.add_argument("--quick", action="store_true", help="bf16 and fp32 only, two token blocks (what the tests run)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiler processes (default: CPU count)")
    parser.add_argument("--json", default=None, help="write one JSON line per variant to this file")
    args = parser.parse_args(argv)
    reports = check(args.arch, args.quick, args.jobs)
    if args.json:
        with open(args.json, "w") as handle:
            for report in reports:
                handle.write(json.dumps(report.to_json()) + "\n")
    ok = sum(r.ok for r in reports)
    print(f"sm_{args.arch}: {ok}/{len(reports)} variants compiled; "
          f"max registers {max((r.registers for r in reports), default=0)}, "
          f"max shared {max((r.shared_bytes for r in reports), default=0)} bytes")
    for line in warnings(reports, args.arch):
        print(f"warning: {line}")
    found = problems(reports, args.arch)
    for line in found:
        print(f"error: {line}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
