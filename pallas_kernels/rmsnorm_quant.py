"""RMSNorm fused with per-token activation quantization (the draft mode's layer inputs), and
the same kernel for the other two quantized inputs of a layer (row_quant: o_proj's input as it
is, down_proj's as silu(gate) * up of the fused gate_up output).

In draft mode (w4a8 / w4a4) every consumer of an RMSNorm output is a quantized linear layer,
so what the layer needs is (xq int8 [M, D], sx f32 [M, 1]) of the normalized activations. XLA
computes it as RMSNorm (a reduction), the gain multiply, then a second reduction (max|y|) and
the rounding: typically two or three kernels. This kernel does it in one program per token row:

    y  = gain * bf16(x * rsqrt(mean(x^2) + eps))     (the model's RMSNorm, HF order)
    sx = max|y| / qmax (1.0 for an all-zero row),    xq = clip(round(y / sx), qmin, qmax)

The row is walked three times (sum of squares, max, quantize) in pieces of the largest power of
two dividing D, at most MAX_PIECE columns (Triton blocks are powers of two): one piece for
4096 / 8192, 7 for Qwen2.5-7B's 3584. Any hidden size that is a multiple of CHUNK works (Llama /
Qwen / Mistral sizes are); the re-reads hit L1/L2. (The first version walked 128-column
pieces: 96 dependent steps per row at D = 4096, 23 us against XLA's 3-4 us on the H200,
fused_h200.md.) Pallas Triton backend; interpret mode on CPU for tests.
Whether it beats XLA's fusion is measured by experiments/bench_fused.py before any use in the
model (issue 6: "measure against the XLA-fused version and keep whichever is faster").
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import QRANGE as _RANGE
from pallas_kernels._common import quantize_per_token_reference, round_half_even, swiglu

try:  # Triton-specific Pallas API (deprecated in jax 0.11 but present).
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
    pltriton = None

CHUNK = 128  # D must be a multiple of this
MAX_PIECE = 8192  # the largest row piece held at once (f32 values across the program's threads)


def piece(D: int) -> int:
    """Columns walked at once: the largest power of two dividing D, at most MAX_PIECE."""
    return min(D & -D, MAX_PIECE)


def rmsnorm_quant_reference(x: jax.Array, gain: jax.Array, eps: float, bits: int = 8):
    """Plain-jnp reference: the model's RMSNorm, then per-token quantization (quant.py)."""
    xf = x.astype(jnp.float32)
    xf = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return quantize_per_token_reference(gain.astype(x.dtype) * xf.astype(x.dtype), bits)


def row_scale(y_chunk, n: int, qmax: float):
    """Inside a kernel: the per-token scale of a row walked as n pieces y_chunk(c) (f32),
    max|y| / qmax, 1.0 for an all-zero row (quant.quantize_activations' rule)."""
    amax = lax.fori_loop(0, n, lambda c, m: jnp.maximum(m, jnp.max(jnp.abs(y_chunk(c)))),
                         jnp.float32(0.0))
    return jnp.where(amax > 0, amax / qmax, jnp.float32(1.0))


def quantize_piece(y, sx, qmin: float, qmax: float):
    """Inside a kernel: int8 values of f32 y at scale sx (round half to even, clipped)."""
    return jnp.clip(round_half_even(y / sx), qmin, qmax).astype(jnp.int8)


def _kernel(x_ref, g_ref, q_ref, s_ref, *, D, eps, qmin, qmax, prologue):
    # x_ref [1, D] one token row ([1, 2D]: gate | up for "swiglu"); g_ref [D] gain ("rmsnorm";
    # unused otherwise); q_ref [1, D] int8; s_ref [1, 1] f32
    P = piece(D)
    n = D // P
    dtype = x_ref.dtype

    def x_chunk(c, off=0):
        return x_ref[0, pl.ds(pl.multiple_of(off + c * P, P), P)].astype(jnp.float32)

    if prologue == "rmsnorm":
        ss = lax.fori_loop(0, n, lambda c, acc: acc + jnp.sum(x_chunk(c) * x_chunk(c)),
                           jnp.float32(0.0))
        rstd = lax.rsqrt(ss / D + eps)

    def y_chunk(c):
        """The quantizer's input, in the model's dtype and order of operations."""
        if prologue == "rmsnorm":
            g = g_ref[pl.ds(pl.multiple_of(c * P, P), P)].astype(dtype)
            return (g * (x_chunk(c) * rstd).astype(dtype)).astype(jnp.float32)
        if prologue == "swiglu":  # the MLP's jax.nn.silu(gate) * up (_common.swiglu)
            return swiglu(x_chunk(c), x_chunk(c, D), dtype).astype(jnp.float32)
        return x_chunk(c)

    sx = row_scale(y_chunk, n, qmax)

    def store(c, carry):
        q_ref[0, pl.ds(pl.multiple_of(c * P, P), P)] = quantize_piece(y_chunk(c), sx, qmin, qmax)
        return carry

    lax.fori_loop(0, n, store, 0)
    s_ref[...] = jnp.full((1, 1), sx, jnp.float32)


def _call(x, gain, D, eps, bits, prologue, interpret, num_warps, name):
    M = x.shape[0]
    qmin, qmax = _RANGE[bits]
    kernel = functools.partial(_kernel, D=D, eps=float(eps), qmin=qmin, qmax=qmax,
                               prologue=prologue)
    params = None
    if pltriton is not None:
        params = pltriton.CompilerParams(num_warps=num_warps, num_stages=1)
    xw = x.shape[1]
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((M, D), jnp.int8), jax.ShapeDtypeStruct((M, 1), jnp.float32)),
        grid=(M,),
        in_specs=[pl.BlockSpec((1, xw), lambda m: (m, 0)), pl.BlockSpec((D,), lambda m: (0,))],
        out_specs=(pl.BlockSpec((1, D), lambda m: (m, 0)), pl.BlockSpec((1, 1), lambda m: (m, 0))),
        compiler_params=params, interpret=interpret, name=name,
    )(x, gain)


@functools.partial(jax.jit, static_argnames=("eps", "bits", "interpret", "num_warps"))
def rmsnorm_quant(x: jax.Array, gain: jax.Array, eps: float, bits: int = 8, *,
                  interpret: bool = False, num_warps: int = 4):
    """x [M, D] (bf16/f16/f32), gain [D] -> (xq int8 [M, D], sx f32 [M, 1]).

    Raises ValueError for shapes the kernel cannot take (D not a multiple of CHUNK)."""
    if bits not in _RANGE:
        raise ValueError(f"rmsnorm_quant: bits must be 8 or 4, got {bits}")
    if x.ndim != 2 or gain.shape != (x.shape[1],):
        raise ValueError(f"rmsnorm_quant: x must be [M, D] and gain [D], got {x.shape} and "
                         f"{gain.shape}")
    M, D = x.shape
    if D % CHUNK:
        raise ValueError(f"rmsnorm_quant: hidden size D={D} must be a multiple of {CHUNK}")
    return _call(x, gain.astype(x.dtype), D, eps, bits, "rmsnorm", interpret, num_warps,
                 f"rmsnorm_quant_a{bits}")


def row_quant_reference(x: jax.Array, bits: int = 8, prologue: str = "none"):
    """Plain-jnp reference of row_quant: the model's SwiGLU (for "swiglu") or x itself,
    quantized per token as qspec_jax.quant.quantize_activations does."""
    if prologue == "swiglu":
        gate, up = jnp.split(x, 2, axis=-1)
        x = jax.nn.silu(gate) * up
    return quantize_per_token_reference(x, bits)


PROLOGUES = ("none", "swiglu")


@functools.partial(jax.jit, static_argnames=("bits", "prologue", "interpret", "num_warps"))
def row_quant(x: jax.Array, bits: int = 8, prologue: str = "none", *, interpret: bool = False,
              num_warps: int = 4):
    """Per-token quantization in one kernel (XLA: a max reduction, then the rounding).

    prologue "none": x [M, D] -> (xq int8 [M, D], sx f32 [M, 1]) of x (o_proj's input in the
    draft modes). "swiglu": x [M, 2D] = [gate | up] (the fused gate_up GEMM's output) -> those of
    silu(gate) * up, computed in x's dtype as the model's MLP does (down_proj's input).
    Raises ValueError for shapes the kernel cannot take (D not a multiple of CHUNK)."""
    if bits not in _RANGE:
        raise ValueError(f"row_quant: bits must be 8 or 4, got {bits}")
    if prologue not in PROLOGUES:
        raise ValueError(f"row_quant: prologue must be one of {PROLOGUES}, got {prologue!r}")
    if x.ndim != 2:
        raise ValueError(f"row_quant: x must be [M, D], got {x.shape}")
    M, W = x.shape
    D = W // 2 if prologue == "swiglu" else W
    if D % CHUNK or (prologue == "swiglu" and W % 2):
        raise ValueError(f"row_quant: width {W} must be a multiple of {CHUNK}"
                         + (" times 2 (gate | up)" if prologue == "swiglu" else ""))
    return _call(x, jnp.zeros((D,), x.dtype), D, 0.0, bits, prologue, interpret, num_warps,
                 f"row_quant_{prologue}_a{bits}")
