"""The online Hadamard transform of rotated models in one kernel (Pallas, Triton backend).

``hadamard(x)`` = ``x @ hadamard_matrix(n) / sqrt(n)`` along the last axis of x [M, n]
(qspec_jax.rotation: hadamard_matrix(n) = B kron S_p, n = m * p, B an m x m +-1 block, S_p the
Sylvester matrix). With X the [m, p] view of a row, the transform is B^T X S_p. XLA's GEMM form
("dense" in rotation.py) runs it as two GEMMs (and S_p read from memory): on the H200 4.4 us of
device time for Llama-3-8B's 14336 = 28 x 512 at M = 1, 7.2 at M = 16 (hadamard_h200.md), per
layer and step. Here one program per (row, block of BN output columns of the p axis):

    acc = X S_p[:, cols]       [m_pad, BN], f32 accumulation; X [m_pad, p] with zero rows past
                               m; the +-1 entries of S_p made in registers as
                               (-1)^popcount(i & j), never read from memory (exact products)
    y   = B^T acc / sqrt(n)    B zero-padded to [m_pad, m_pad] (+-1: exact in bf16); acc is
                               split into three bf16 parts (hi + mid + lo carry its f32 value to
                               ~2^-24) so the tensor-core GEMM loses nothing against f32

so one kernel replaces the GEMMs (M x p / BN programs; each reads its token's row of x, from L2
after the first, and writes its block of y once). Widths with a small block (m = 1:
4096, 8192) move Sylvester factors into it (`_view`: B' = B kron S_2^j, p' = p / 2^j) so that a
row is about 32 x p' rather than 16 mostly-masked rows x p. Shapes: a true Hadamard block
(rotation.has_hadamard), m <= MAX_M_PAD, p >= MIN_P (tl.dot's 16), bf16 / f16 x. With
prologue "swiglu" the input is silu(gate) * up of a fused [gate | up] GEMM output, made in
the kernel (the MLP's separate elementwise kernel goes). ``supported`` says why a shape is not
taken; the caller (rotation.online_hadamard, impl "pallas") then runs the GEMM form and says so
once. ``hadamard_reference`` is the float32 jnp reference.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import _next_pow2, swiglu
from qspec_jax.rotation import _block, _decompose, _sylvester, hadamard_matrix

try:  # Triton-specific Pallas API (deprecated in jax 0.11 but present).
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
    pltriton = None

MIN_P = 16        # tl.dot's smallest K / N
MAX_M_PAD = 64    # rows of the [m_pad, BN] accumulator (the odd block padded to a power of two)
BLOCK_N = 64      # output columns of the p axis per program
BLOCK_K = 64      # p-axis rows of S_p made per step
ROWS = 32         # rows the [m', p'] view aims at: m' = m * 2^j up to this while p' >= BLOCK_N
DTYPES = ("bfloat16", "float16")


def _view(n: int):
    """(m', p', B') with hadamard_matrix(n) = B' kron S_p': the Sylvester part is split
    S_p = S_2^j kron S_p' and S_2^j moved into the block (B' = B kron S_2^j, +-1 where B is), so
    that a row of x becomes [m', p'] with m' = m * 2^j near ROWS: a width with m = 1 (4096 = S_4096)
    runs as 32 x 128 instead of 16 mostly-masked rows x 4096."""
    m, p, kind = _decompose(n)
    j = 0
    while m << (j + 1) <= ROWS and p >> (j + 1) >= BLOCK_N:
        j += 1
    return m << j, p >> j, np.kron(_block(m, kind), _sylvester(1 << j))


def supported(shape, dtype) -> tuple[bool, str]:
    """(True, "ok") or (False, why) for x of ``shape`` [M, n] and ``dtype``."""
    if len(shape) != 2:
        return False, f"x must be [M, n], got shape {tuple(shape)}"
    if jnp.dtype(dtype).name not in DTYPES:
        return False, f"dtype {jnp.dtype(dtype).name} (the kernel takes {', '.join(DTYPES)})"
    n = shape[1]
    m, p, kind = _decompose(n)
    if kind == "dct":
        return False, f"width {n} = {m} x {p} has no Hadamard block (DCT fallback)"
    if p < MIN_P:
        return False, f"width {n} = {m} x {p}: the power-of-two part must be >= {MIN_P}"
    if max(16, _next_pow2(m)) > MAX_M_PAD:
        return False, f"width {n} = {m} x {p}: the block m must be <= {MAX_M_PAD}"
    return True, "ok"


def hadamard_reference(x):
    """float32 jnp reference: x @ hadamard_matrix(n) / sqrt(n) (float32 out)."""
    n = x.shape[-1]
    h = jnp.asarray(hadamard_matrix(n) / math.sqrt(n), jnp.float32)
    return jnp.dot(jnp.asarray(x, jnp.float32), h, precision=lax.Precision.HIGHEST)


def _sylvester_tile(i0, j0, bk: int, bn: int, dtype):
    """S_p[i0:i0+bk, j0:j0+bn] = (-1)^popcount(i & j), made from indices (int32 bit ops)."""
    i = i0 + lax.broadcasted_iota(jnp.int32, (bk, bn), 0)
    j = j0 + lax.broadcasted_iota(jnp.int32, (bk, bn), 1)
    v = i & j
    for s in (16, 8, 4, 2, 1):  # parity of the set bits
        v = v ^ (v >> s)
    return (1 - 2 * (v & 1)).astype(dtype)


def _kernel(x_ref, u_ref, b_ref, o_ref, *, m, p, m_pad, bn, bk, scale):
    # x_ref [m_pad, p] (rows >= m lie past the token's row: masked); u_ref: None, or the up half
    # (x_ref the gate half) of a fused gate_up output: the input is silu(gate) * up;
    # b_ref [m_pad, m_pad] (B^T zero-padded, x's dtype); o_ref [m_pad, bn] (rows >= m masked)
    j = pl.program_id(1)
    dtype = x_ref.dtype
    rows = lax.broadcasted_iota(jnp.int32, (m_pad, bk), 0)

    def step(c, acc):
        k0 = pl.multiple_of(c * bk, bk)
        xt = pltriton.load(x_ref.at[pl.ds(0, m_pad), pl.ds(k0, bk)], mask=rows < m, other=0)
        if u_ref is not None:
            ut = pltriton.load(u_ref.at[pl.ds(0, m_pad), pl.ds(k0, bk)], mask=rows < m, other=0)
            xt = swiglu(xt.astype(jnp.float32), ut.astype(jnp.float32), dtype)
        st = _sylvester_tile(k0, j * bn, bk, bn, dtype)
        return acc + jnp.dot(xt, st, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, p // bk, step, jnp.zeros((m_pad, bn), jnp.float32))
    if m > 1:  # (the [m', p'] view has m' > 1 unless n itself is that small)
        bt = b_ref[...]
        hi = acc.astype(dtype)
        r1 = acc - hi.astype(jnp.float32)
        mid = r1.astype(dtype)
        lo = (r1 - mid.astype(jnp.float32)).astype(dtype)
        acc = (jnp.dot(bt, hi, preferred_element_type=jnp.float32)
               + jnp.dot(bt, mid, preferred_element_type=jnp.float32)
               + jnp.dot(bt, lo, preferred_element_type=jnp.float32))
    out_rows = lax.broadcasted_iota(jnp.int32, (m_pad, bn), 0)
    pltriton.store(o_ref.at[pl.ds(0, m_pad), pl.ds(0, bn)], (acc * scale).astype(o_ref.dtype),
                   mask=out_rows < m)


PROLOGUES = ("none", "swiglu")


@functools.partial(jax.jit, static_argnames=("prologue", "interpret", "num_warps"))
def hadamard(x: jax.Array, prologue: str = "none", *, interpret: bool = False,
             num_warps: int = 4) -> jax.Array:
    """x [M, n] (bf16 / f16) -> x @ hadamard_matrix(n) / sqrt(n) in x's dtype (f32 inside).
    prologue "swiglu": x [M, 2n] = [gate | up] (the fused gate_up GEMM's output) -> the transform
    of silu(gate) * up, computed in x's dtype as the model's MLP does (no separate kernel).
    ValueError (with the reason) for shapes / dtypes ``supported`` rejects."""
    if prologue not in PROLOGUES:
        raise ValueError(f"pallas_kernels.hadamard: prologue must be one of {PROLOGUES}, "
                         f"got {prologue!r}")
    swi = prologue == "swiglu"
    if swi and (x.ndim != 2 or x.shape[1] % 2):
        raise ValueError(f"pallas_kernels.hadamard: prologue swiglu takes [M, 2n] = [gate | up], "
                         f"got shape {x.shape}")
    ok, why = supported((x.shape[0], x.shape[1] // 2) if swi else x.shape, x.dtype)
    if ok and pltriton is None:  # pragma: no cover
        ok, why = False, "this jax has no Pallas Triton backend"
    if not ok:
        raise ValueError(f"pallas_kernels.hadamard: {why}")
    M, n = x.shape[0], x.shape[1] // (2 if swi else 1)
    m, p, block = _view(n)
    m_pad = max(16, _next_pow2(m))
    bn, bk = min(BLOCK_N, p), min(BLOCK_K, p)
    bt = np.zeros((m_pad, m_pad), np.float64)
    bt[:m, :m] = block.T
    kernel = functools.partial(_kernel, m=m, p=p, m_pad=m_pad, bn=bn, bk=bk,
                               scale=1.0 / math.sqrt(n))
    params = pltriton.CompilerParams(num_warps=num_warps, num_stages=1) if pltriton else None
    b_spec = pl.BlockSpec((m_pad, m_pad), lambda r, j: (0, 0))
    out_spec = pl.BlockSpec((None, m_pad, bn), lambda r, j: (r, 0, j))
    bt = jnp.asarray(bt, x.dtype)
    if swi:  # [M, 2n] viewed [M, 2, m, p]: the same buffer read as gate (0) and up (1)
        half = lambda h: pl.BlockSpec((None, None, m_pad, p), lambda r, j: (r, h, 0, 0))
        in_specs, args = [half(0), half(1), b_spec], (x.reshape(M, 2, m, p),) * 2 + (bt,)
        body = kernel
    else:
        in_specs = [pl.BlockSpec((None, m_pad, p), lambda r, j: (r, 0, 0)), b_spec]
        args = (x.reshape(M, m, p), bt)
        body = lambda x_ref, b_ref, o_ref: kernel(x_ref, None, b_ref, o_ref)
    out = pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct((M, m, p), x.dtype),
        grid=(M, p // bn),
        in_specs=in_specs, out_specs=out_spec,
        compiler_params=params, interpret=interpret,
        name=f"hadamard_{'swiglu_' if swi else ''}{m}x{p}",
    )(*args)
    return out.reshape(M, n)
