"""Device helpers shared by the decode and prefill kernels, and the interpreter switch."""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
AUTOTUNE = os.environ.get("PERSONA_KERNELS_TRITON_AUTOTUNE", "1") != "0"
"""False with ``PERSONA_KERNELS_TRITON_AUTOTUNE=0``: each kernel runs its first GPU config, untimed
(a quick first call at every new shape: the GPU test run uses it to compile a third as much)."""

ACT_SILU = 0
ACT_GELU_TANH = 1
ACTIVATION_CODES = {"silu": ACT_SILU, "gelu_tanh": ACT_GELU_TANH}


def configs(gpu: list[triton.Config], interpreted: triton.Config) -> list[triton.Config]:
    """The autotuning list: ``gpu`` on a device (only its first entry when :data:`AUTOTUNE` is off),
    the single ``interpreted`` config under the interpreter.

    One config makes the autotuner skip benchmarking, so interpreted tests stay quick, and the
    small interpreter blocks exercise the loops and the ragged-edge masks. The first GPU config of
    each kernel fits sm_90's shared memory in every dtype and token block (compile_check).
    """
    if INTERPRET:
        return [interpreted]
    return gpu if AUTOTUNE else gpu[:1]


def time_configs(kernel_call, quantiles):
    """The autotuner's timer (``triton.autotune(do_bench=...)``): Triton's own benchmarker, except
    inside a CUDA-graph capture, where timing (it synchronises the device) would break the capture.

    Raises ``RuntimeError`` there, naming the fix: a kernel meets an untuned shape class while a
    graph is captured only when no eager step ran at that shape first.
    """
    if _capturing():
        raise RuntimeError(
            "persona_kernels: a Triton kernel met a new shape class inside a CUDA-graph capture, where its "
            "configs cannot be timed (timing synchronises the device). Run one eager step at each batch "
            "shape before capturing it, or set PERSONA_KERNELS_TRITON_AUTOTUNE=0 (one fixed config per kernel)."
        )
    from triton.runtime import driver

    return driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


def _capturing() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@triton.jit
def activate(z, ACT: tl.constexpr):
    """``silu(z)`` (ACT 0) or tanh-GELU (ACT 1), in fp32; ``0.5 (1 + tanh(u)) = sigmoid(2u)``."""
    if ACT == 0:
        out = z * tl.sigmoid(z)
    else:
        out = z * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
    return out


@triton.jit
def round_to(v, dtype: tl.constexpr, BF16_RNE_BY_HAND: tl.constexpr):
    """fp32 ``v`` rounded to nearest even in ``dtype`` (as torch and compiled Triton casts round).

    ``BF16_RNE_BY_HAND`` rounds a bf16 result with integer ops first (other dtypes are left to the
    cast): the interpreter truncates fp32 to bf16 casts (Triton 3.7.1), which would break the
    rounding contract only under the tests.
    """
    if BF16_RNE_BY_HAND and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)  # exact in bf16 now, so the cast below is too
    return v.to(dtype)


@triton.jit
def output_value(acc, bias, dtype: tl.constexpr, HAS_BIAS: tl.constexpr, BF16_RNE_BY_HAND: tl.constexpr):
    """The output in ``dtype`` from the fp32 down-projection sum ``acc``: rounded once; with
    ``HAS_BIAS``, plus the fp32 ``bias`` and rounded again (as ``reference.apply_output_bias``)."""
    y = round_to(acc, dtype, BF16_RNE_BY_HAND)
    if HAS_BIAS:
        y = round_to(y.to(tl.float32) + bias, dtype, BF16_RNE_BY_HAND)
    return y


@triton.jit
def gain_tokens(xa, gain, BF16_RNE_BY_HAND: tl.constexpr):
    """``xa * gain`` in fp32, rounded to nearest even in ``xa``'s dtype (as ``apply_input_gains``)."""
    return round_to(xa.to(tl.float32) * gain, xa.dtype, BF16_RNE_BY_HAND)


@triton.jit
def mma(a, b, acc, FP32_DOT: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation.

    ``FP32_DOT`` upcasts both operands and multiplies in exact fp32 (``input_precision="ieee"``):
    used for fp32 inputs, so results track the fp32 reference, and for bf16 under the
    interpreter, whose bf16 ``tl.dot`` returns garbage (Triton 3.7.1). Otherwise 16-bit operands
    go straight to the tensor cores.
    """
    if FP32_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out
