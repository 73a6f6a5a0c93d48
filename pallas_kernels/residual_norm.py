"""The junction after a layer's output GEMM (o_proj, down_proj) in one kernel: the GEMM's
epilogue, the residual add and the next RMSNorm.

At batch 1 an 8B decode step runs 64 such junctions, each as three XLA kernels of a
microsecond or two (hlo_summary_b1_xpad_7e1796b.md): the epilogue of the Mosaic GEMM's split-K
partial sums fused with the residual add (``loop_add_fusion``: sum the splits, times the
per-channel scales, round, add), RMSNorm's reduction to a scalar (``input_reduce_fusion``) and
its normalization (``loop_multiply_fusion``). This kernel does all three in one program per
token row:

    h      = dtype(sum_s part[s] * scales [* sx])   (w4_mgpu.out_mn_epilogue, same order)
    x_new  = x + h                                       (the residual stream, in dtype)
    normed = gain * dtype(x_new * rsqrt(mean(x_new^2) + eps))   (the model's RMSNorm, HF order)
    [xq, sq = normed quantized per token, as rmsnorm_quant does: a draft mode's next GEMMs]

``part`` is w4_mgpu's out_mn output [S, Mp, N] (f32 partial sums of the bf16 GEMM, int32 of the
int8 one, whose per-token scales ``sx`` [M] then apply), or any finished GEMM output h as
[1, M, N] with ``scales`` None (another GEMM path: the kernel then fuses the add and the
norm). Every step but the mean rounds as the unfused path does; the mean's sum runs in another
order than XLA's reduction, so ``normed`` may differ from XLA's in the last bit of a few
elements (the reference below reduces as XLA).

The row is walked in pieces of the largest power of two dividing N (rmsnorm_quant.piece; at
most MAX_PIECE columns): sum of squares, (with bits) the norm's max, then the outputs,
recomputing x_new from the inputs each time (L1/L2 hits) rather than reading back what the
program stored. Pallas Triton backend; interpret
mode on CPU for tests. Used by the model only where kernel_dispatch.residual_norm_runs says so.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import QRANGE, quantize_per_token_reference
from pallas_kernels.rmsnorm_quant import CHUNK, piece, quantize_piece, row_scale

try:  # Triton-specific Pallas API (deprecated in jax 0.11 but present).
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
    pltriton = None


def residual_norm_reference(x, part, scales, gain, eps: float, sx=None, bits=None):
    """Plain-jnp reference: (x + h, the model's RMSNorm of that sum), h the GEMM's output from
    its partial sums (w4_mgpu.out_mn_epilogue), or part[0] itself when scales is None; with
    ``bits``, (x + h, *quantize_per_token_reference(norm, bits))."""
    from pallas_kernels.w4_mgpu import out_mn_epilogue
    M = x.shape[0]
    h = part[0, :M].astype(x.dtype) if scales is None else out_mn_epilogue(part, scales, sx, M,
                                                                           x.dtype)
    x_new = x + h
    xf = x_new.astype(jnp.float32)
    xf = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    normed = gain.astype(x.dtype) * xf.astype(x.dtype)
    if bits:
        return (x_new, *quantize_per_token_reference(normed, bits))
    return x_new, normed


def _kernel(*refs, S, N, eps, kind, bits):
    # part_ref [S, 1, N] this row's partial sums (kind "h": [1, 1, N], the finished output);
    # s_ref [N] f32 channel scales and sx_ref [1] f32 (kind "int8" only) where the kind has
    # them; x_ref [1, N] residual; g_ref [N] gain; xo_ref [1, N] output; then no_ref [1, N]
    # the norm, or (bits) q_ref [1, N] int8 and qs_ref [1, 1] f32, the norm quantized
    refs = list(refs)
    part_ref = refs.pop(0)
    s_ref = refs.pop(0) if kind != "h" else None
    sx_ref = refs.pop(0) if kind == "int8" else None
    if bits:
        x_ref, g_ref, xo_ref, q_ref, qs_ref = refs
    else:
        x_ref, g_ref, xo_ref, no_ref = refs
    P = piece(N)
    n = N // P
    dtype = x_ref.dtype

    def x_new(c):
        cols = pl.ds(pl.multiple_of(c * P, P), P)
        acc = part_ref[0, 0, cols]
        if kind == "h":
            h = acc.astype(dtype)
        else:
            for s in range(1, S):  # in order, as the epilogue adds the splits
                acc = acc + part_ref[s, 0, cols]
            y = acc.astype(jnp.float32) * s_ref[cols]
            h = (y * sx_ref[0]).astype(jnp.bfloat16).astype(dtype) if kind == "int8" else y.astype(dtype)
        return (x_ref[0, cols].astype(jnp.float32) + h.astype(jnp.float32)).astype(dtype)

    def sumsq(c, acc):
        v = x_new(c).astype(jnp.float32)
        return acc + jnp.sum(v * v)

    ss = lax.fori_loop(0, n, sumsq, jnp.float32(0.0))
    rstd = lax.rsqrt(ss / N + eps)

    def normed(c, v):
        """The model's RMSNorm output for columns piece c of x_new values v (HF order)."""
        g = g_ref[pl.ds(pl.multiple_of(c * P, P), P)].astype(dtype)
        return (g.astype(jnp.float32)
                * (v.astype(jnp.float32) * rstd).astype(dtype).astype(jnp.float32)).astype(dtype)

    if bits:  # per-token quantization of the norm as quant.quantize_activations does
        qmin, qmax = QRANGE[bits]
        sq = row_scale(lambda c: normed(c, x_new(c)).astype(jnp.float32), n, qmax)

    def store(c, carry):
        cols = pl.ds(pl.multiple_of(c * P, P), P)
        v = x_new(c)
        xo_ref[0, cols] = v
        y = normed(c, v)
        if bits:
            q_ref[0, cols] = quantize_piece(y.astype(jnp.float32), sq, qmin, qmax)
        else:
            no_ref[0, cols] = y
        return carry

    lax.fori_loop(0, n, store, 0)
    if bits:
        qs_ref[...] = jnp.full((1, 1), sq, jnp.float32)


@functools.partial(jax.jit, static_argnames=("eps", "bits", "interpret", "num_warps"))
def residual_norm(x: jax.Array, part: jax.Array, scales: jax.Array | None, gain: jax.Array,
                  eps: float, sx: jax.Array | None = None, *, bits: int | None = None,
                  interpret: bool = False, num_warps: int = 4):
    """x [M, N] (bf16/f16/f32) residual stream and a GEMM's output h -> (x + h, RMSNorm(x + h)
    with gain [N]), both [M, N] in x's dtype; with ``bits`` (8 / 4: a draft mode's next GEMMs)
    the norm quantized per token instead: (x + h, xq int8 [M, N], its scales f32 [M, 1]).

    h comes as the Mosaic GEMM's partial sums part [S, Mp >= M, N] f32 with scales [N] f32, or
    int32 with scales and the per-token scales sx [M] (an int8 GEMM), or finished as part
    [1, Mp >= M, N] with scales None. Raises ValueError for inputs the kernel cannot take
    (naming the shape and what it needs)."""
    if x.ndim != 2 or part.ndim != 3:
        raise ValueError(f"residual_norm: x must be [M, N] and part [S, Mp, N], got {x.shape} "
                         f"and {part.shape}")
    M, N = x.shape
    S, Mp, Np = part.shape
    if Np != N or Mp < M or gain.shape != (N,) or (scales is not None and scales.shape != (N,)):
        raise ValueError(f"residual_norm: x {x.shape}, part {part.shape} (want [S, >= {M}, {N}]), "
                         f"scales {None if scales is None else scales.shape}, gain {gain.shape} "
                         f"(want [{N}]) do not fit")
    if N % CHUNK:
        raise ValueError(f"residual_norm: hidden size N={N} must be a multiple of {CHUNK}")
    if bits is not None and bits not in QRANGE:
        raise ValueError(f"residual_norm: bits must be 8 or 4 (or None: no quantization), got {bits}")
    if scales is None:
        kind = "h"
        if S != 1 or sx is not None:
            raise ValueError("residual_norm: a finished GEMM output (scales None) comes as "
                             f"[1, M, N] without sx, got part {part.shape}"
                             + (" and sx" if sx is not None else ""))
    else:
        kind = "int8" if part.dtype == jnp.int32 else "f32"
        if (kind == "int8") != (sx is not None):
            raise ValueError("residual_norm: int32 partial sums (an int8 GEMM) need the "
                             f"per-token scales sx, and only they do (part {part.dtype}, sx "
                             f"{'given' if sx is not None else 'missing'})")
        if sx is not None and sx.shape != (M,):
            raise ValueError(f"residual_norm: sx must be [{M}], got {sx.shape}")
    kernel = functools.partial(_kernel, S=S, N=N, eps=float(eps), kind=kind, bits=bits)
    params = pltriton.CompilerParams(num_warps=num_warps, num_stages=1) if pltriton else None
    row = pl.BlockSpec((1, N), lambda m: (m, 0))
    vec = pl.BlockSpec((N,), lambda m: (0,))
    in_specs, args = [pl.BlockSpec((S, 1, N), lambda m: (0, m, 0))], [part]
    if kind != "h":
        in_specs.append(vec)
        args.append(scales.astype(jnp.float32))
    if kind == "int8":
        in_specs.append(pl.BlockSpec((1,), lambda m: (m,)))
        args.append(sx.astype(jnp.float32))
    in_specs += [row, vec]
    args += [x, gain.astype(x.dtype)]
    out = jax.ShapeDtypeStruct((M, N), x.dtype)
    if bits:
        out_shape = (out, jax.ShapeDtypeStruct((M, N), jnp.int8),
                     jax.ShapeDtypeStruct((M, 1), jnp.float32))
        out_specs = (row, row, pl.BlockSpec((1, 1), lambda m: (m, 0)))
    else:
        out_shape, out_specs = (out, out), (row, row)
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(M,), in_specs=in_specs, out_specs=out_specs,
        compiler_params=params, interpret=interpret,
        name=f"residual_norm_{kind}_s{S}" + (f"_a{bits}" if bits else ""),
    )(*args)
