"""W4A8 / W4A4 GEMM (QSpec draft mode): int8 MMA, int32 accumulation, scales in the epilogue.

xq int8 [M, K] (per-token quantized activations, values in [-127, 127] for w4a8 or
[-8, 7] for w4a4: the same kernel serves both), sx f32 [M, 1] per-token scales,
qweight int8 [K//2, N] (half-split int4, docs/DESIGN.md), scales f32 [K//G, N].

  acc_g = int32 sum_{k in g} xq[:, k] * q[k, :]        (exact)
  y     = sx * sum_g s[g] * acc_g                        (f32), cast to out_dtype

Per-channel scales (G == K): the kernel keeps one int32 accumulator and its epilogue is
exactly the reference's float arithmetic (sx * (float(acc) * s)), so results are
bit-identical to the reference before the final cast. Per-group scales: s[g] * acc is
summed per K step (a step holds one low and one high group), a different float summation
order from the reference (agreement to f32 rounding, ~1e-6 relative).

Backend: Pallas Triton at every M (measurements in experiments/results/kernels_h200.md).
dequant="int8" (default) runs int8 MMA; dequant="magic" runs bf16 MMA on exactly converted
operands (exact for K <= 16384) and measured 1.5-2x slower at M <= 64, so it is not used by
default.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (QRANGE, TileConfig, as_int16_pairs,  # noqa: F401
                                    check_operands, fit_config, gemm_call, gemv_rows, is_gemv,
                                    magic_dequant, quantize_per_token_reference, quantize_rows,
                                    round_half_even, shifted_nibbles, split_nibbles, token_scales,
                                    unpack_int4)

try:
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
    pltriton = None

_BACKENDS = ("triton",)


# ----------------------------------------------------------------------------- references
def w4a8_matmul_reference(xq: jax.Array, sx: jax.Array, qweight: jax.Array, scales: jax.Array,
                          out_dtype=jnp.bfloat16) -> jax.Array:
    """Plain-jnp reference: y = sx * sum_g s[g] * int32(xq_g @ q_g), g in order."""
    M, K = xq.shape
    q = unpack_int4(qweight)
    ng = scales.shape[0]
    G = K // ng
    sx = sx.astype(jnp.float32).reshape(M, 1)
    if ng == 1:
        acc = jnp.dot(xq, q, preferred_element_type=jnp.int32)
        return (sx * (acc.astype(jnp.float32) * scales[0][None, :])).astype(out_dtype)

    def body(g, y):
        xg = lax.dynamic_slice_in_dim(xq, g * G, G, axis=1)
        qg = lax.dynamic_slice_in_dim(q, g * G, G, axis=0)
        acc = jnp.dot(xg, qg, preferred_element_type=jnp.int32)
        return y + lax.dynamic_index_in_dim(scales, g, axis=0, keepdims=True) * acc.astype(jnp.float32)

    y = lax.fori_loop(0, ng, body, jnp.zeros((M, qweight.shape[1]), jnp.float32))
    return (sx * y).astype(out_dtype)


# ----------------------------------------------------------------------------- kernel
def _w4a8_kernel(x_ref, sx_ref, q_ref, s_ref, o_ref, *, M, K, G, bk, kh_split, transpose, masked,
                 partial_out, dequant, qrange=None):
    # x_ref:  [bm, K]        int8 rows m*bm .. of xq (rows >= M masked to 0); with qrange
    #                        (qmin, qmax): float activations, quantized here per K step
    # sx_ref: [bm, 1]        f32 per-token scales
    # q_ref:  [kh_split, bn] int8 packed rows of this K split
    #         (dequant == "magic": int16 [kh_split, bn//2], bf16 MMA with exact f32 accumulation)
    # s_ref:  [K//G, bn]     f32 weight scales of this N tile
    # o_ref:  [bm, bn]       out dtype; partial_out: int32 (per-channel) / f32 (groups) partials
    bm = x_ref.shape[0]
    bn = s_ref.shape[1]
    kh = K // 2
    magic = dequant == "magic"
    acc_t = jnp.float32 if magic else jnp.int32
    m_idx = pl.program_id(1)
    s_idx = pl.program_id(2)
    base = s_idx * kh_split
    per_channel = G == K
    if masked:
        rows = m_idx * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
        row_mask = rows < M  # [bm, 1]

    def load(ref, other=0):
        if masked and pltriton is not None:
            return pltriton.load(ref, mask=row_mask, other=other)
        return ref[...]

    if qrange is not None:
        qmin, qmax = qrange
        sx_rows = load(sx_ref, 1.0)  # [bm, 1] f32 (1 in masked rows: no 0 / 0)

    def load_x(ref):
        """int8 [bm, bk] activations: loaded, or quantized from float ones (the reference's
        clip(round(x / sx)), with ties to even)."""
        if qrange is None:
            return load(ref)
        v = load(ref).astype(jnp.float32) / sx_rows
        return jnp.clip(round_half_even(v), qmin, qmax).astype(jnp.int8)

    def mma(xt, wt):
        # xt: int8 [bm, bk], wt: int8 [bk, bn] -> int32 [bm, bn] (or [bn, bm] transposed)
        # magic: xt -> bf16 (exact), wt bf16; f32 accumulation of integers (exact below 2**24)
        if magic:
            xt = xt.astype(jnp.bfloat16)
        if transpose:
            return lax.dot_general(wt, xt, (((0,), (1,)), ((), ())), preferred_element_type=acc_t)
        return jnp.dot(xt, wt, preferred_element_type=acc_t)

    def scale_row(g):
        s = s_ref[pl.ds(g, 1), :]  # [1, bn] f32
        return s.T if transpose else s

    def body(i, acc):
        k0 = pl.multiple_of(i * bk, bk)
        if magic:
            lo, hi = magic_dequant(q_ref[pl.ds(k0, bk), :], jnp.bfloat16)  # bf16 [bk, bn] each
        elif dequant == "int8s":
            lo, hi = shifted_nibbles(q_ref[pl.ds(k0, bk), :])  # int8 16 * v [bk, bn] each
        else:
            lo, hi = split_nibbles(q_ref[pl.ds(k0, bk), :])  # int8 [bk, bn] each
        d_lo = mma(load_x(x_ref.at[:, pl.ds(base + k0, bk)]), lo)
        d_hi = mma(load_x(x_ref.at[:, pl.ds(kh + base + k0, bk)]), hi)
        if per_channel:
            return acc + d_lo + d_hi
        g_lo = (base + k0) // G
        g_hi = (kh + base + k0) // G
        unit = 1.0 / 16 if dequant == "int8s" else 1.0  # exact: a power of two
        return (acc + d_lo.astype(jnp.float32) * (unit * scale_row(g_lo))
                + d_hi.astype(jnp.float32) * (unit * scale_row(g_hi)))

    shape = (bn, bm) if transpose else (bm, bn)
    acc_dt = acc_t if per_channel else jnp.float32
    acc = lax.fori_loop(0, kh_split // bk, body, jnp.zeros(shape, acc_dt))
    if magic and per_channel:
        acc = acc.astype(jnp.int32)  # exact integers
    if dequant == "int8s" and per_channel:
        acc = lax.shift_right_arithmetic(acc, jnp.int32(4))  # every product was 16x: exact
    if transpose:
        acc = acc.T  # [bm, bn]
    if partial_out:
        out = acc  # epilogue after the split-K reduction (XLA)
    else:
        if per_channel:
            acc = acc.astype(jnp.float32) * s_ref[pl.ds(0, 1), :]
        out = (load(sx_ref) * acc).astype(o_ref.dtype)
    if masked and pltriton is not None:
        pltriton.store(o_ref, out, mask=row_mask)
    else:
        o_ref[...] = out


def _w4a8_gemv_kernel(x_ref, sx_ref, q_ref, s_ref, o_ref, *, M, K, G, bk, kh_split, partial_out,
                      magic):
    """dequant == "gemv" (M <= bm): no MMA. int8 activations and int4 weights become f32 and
    are multiplied with FMAs into one [bk, bn] accumulator per token row, reduced over K at the
    end. Per-channel: the accumulators hold exact integers (|sum| < 127 * 8 * K < 2**24 for
    K <= 16384), so the result equals the int32 MMA's and the epilogue is the MMA kernel's.
    Group scales multiply the weights of each step (its group), as floats."""
    rows = gemv_rows(x_ref, q_ref, s_ref, M=M, K=K, G=G, bk=bk, kh_split=kh_split,
                     split_idx=pl.program_id(2), magic=magic)
    for m, row in enumerate(rows):
        if partial_out:  # epilogue after the split-K reduction (XLA)
            o_ref[m, :] = row.astype(o_ref.dtype)  # int32 (exact integers) / f32 partials
            continue
        if G == K:
            row = row * s_ref[0, :]
        o_ref[m, :] = (sx_ref[m, 0] * row).astype(o_ref.dtype)


def _build(M, K, N, G, out_dtype, cfg: TileConfig, interpret: bool, qrange=None):
    bm, bk, split = cfg.bm, cfg.bk, cfg.split_k
    kh_split = K // 2 // split
    partial_out = split > 1
    if is_gemv(cfg.dequant):
        kernel = functools.partial(_w4a8_gemv_kernel, M=M, K=K, G=G, bk=bk, kh_split=kh_split,
                                   partial_out=partial_out, magic=cfg.dequant == "gemv_magic")
    else:
        kernel = functools.partial(
            _w4a8_kernel, M=M, K=K, G=G, bk=bk, kh_split=kh_split, transpose=cfg.transpose,
            masked=(M % bm != 0), partial_out=partial_out, dequant=cfg.dequant, qrange=qrange)
    lead = [pl.BlockSpec((bm, K), lambda n, m, s: (m, 0)),   # xq (or x, quantized in the kernel)
            pl.BlockSpec((bm, 1), lambda n, m, s: (m, 0))]   # sx
    # Split-K partials: exact int32 sums per channel, f32 (already group-scaled) with groups.
    return gemm_call(kernel, lead, M=M, K=K, N=N, G=G, cfg=cfg, out_dtype=out_dtype,
                     partial_dtype=jnp.int32 if G == K else jnp.float32, interpret=interpret,
                     name=f"w4a8_{cfg.short()}" + ("_q" if qrange else ""))


def default_config(M: int, K: int, N: int, G: int) -> TileConfig:
    """Tile configuration by M, from the H200 sweeps (experiments/results/kernels_h200_tuning.md;
    sums over the four Llama-3-8B layer shapes): int8 MMA, 64-row K steps throughout M <= 128,
    split-K 8 / 4 / 4 / 2 at M <= 16 / 32 / 64 / 128 (82.4 / 91.0 / 90.1 / 133.0 / 230.1 us at
    M = 4 / 16 / 32 / 64 / 128 with "int8" nibbles; the earlier tiles: 87.2 / 93.5 / 94.7 /
    146.7 / 336 us). Nibbles: "int8s" (16x operands from one shift or mask per plane), measured
    (kernels_h200_int8s.md, same tiles) 56.4 / 56.2 / 69.4 / 127.4 / 216.5 / 376.7 us at
    M = 1 / 4 / 16 / 64 / 128 / 256 against 81.6 / 81.8 / 90.8 / 132.3 / 228.2 / 472 us for
    "int8": the per-byte integer instructions, not the bytes, were the cost at small M.
    K > 131072 (int32 range of the 16x sums) falls back to "int8"."""
    d = "int8s" if K <= 131072 else "int8"
    if M <= 16:
        cfg = TileConfig(bm=16, bn=128, bk=64, split_k=8, num_warps=4, num_stages=4, dequant=d)
    elif M <= 32:
        cfg = TileConfig(bm=32, bn=128, bk=64, split_k=4, num_warps=4, num_stages=4, dequant=d)
    elif M <= 64:
        cfg = TileConfig(bm=64, bn=64, bk=64, split_k=4, num_warps=4, num_stages=4, transpose=True,
                         dequant=d)
    elif M <= 128:
        cfg = TileConfig(bm=64, bn=64, bk=64, split_k=2, num_warps=4, num_stages=4, transpose=True,
                         dequant=d)
    elif M <= 512 or N < 8192:
        cfg = TileConfig(bm=128, bn=128, bk=64, num_warps=8, num_stages=3, transpose=True, dequant=d)
    else:
        cfg = TileConfig(bm=128, bn=256, bk=64, num_warps=8, num_stages=3, transpose=True, dequant=d)
    return fit_config(cfg, M, K, N, G, int8=True)


@functools.partial(jax.jit, static_argnames=("out_dtype", "backend", "interpret", "config", "bits"))
def w4a8_matmul(xq: jax.Array, sx: jax.Array | None, qweight: jax.Array, scales: jax.Array, *,
                out_dtype=jnp.bfloat16, backend: str | None = None, interpret: bool = False,
                config: TileConfig | None = None, bits: int | None = None) -> jax.Array:
    """xq int8 [M, K], sx f32 [M, 1] @ int4 weights -> [M, N] out_dtype (int8 MMA, int32 acc).

    Serves w4a8 and w4a4 (xq in [-8, 7]). backend: None or "triton". Raises ValueError for
    unsupported shapes (see pallas_kernels.supported).

    bits (8 or 4): xq holds the float activations x [M, K] instead, and the kernel quantizes
    them per token as it loads them (quantize_per_token_reference's clip(round(x / sx)) with
    sx = max|x| / qmax, computed here when sx is None): the int8 copy of x is never written to
    memory, one XLA kernel less per GEMM. On a GPU the kernel's f32 division may round a
    quotient within 2 ulp of a .5 tie the other way (an activation one quantization step off,
    a few in a million; exact in interpret mode). The FMA ("gemv") configurations take
    pre-quantized activations: with them x is quantized by XLA first. Measured 2.4-3.4x slower
    than XLA's quantization + this kernel on the H200 (every N tile re-quantizes x;
    experiments/results/kernels_h200_actquant.md), so the model does not use it by default.
    """
    if backend not in (None,) + _BACKENDS:
        raise ValueError(f"w4a8_matmul: unknown backend {backend!r}; choose one of {_BACKENDS}")
    if bits is not None:
        if bits not in (8, 4):
            raise ValueError(f"w4a8_matmul: bits must be 8 or 4, got {bits!r}")
        if xq.ndim != 2 or xq.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
            raise ValueError(f"w4a8_matmul: with bits={bits}, x must be float [M, K] "
                             f"(bfloat16/float16/float32), got {xq.dtype} {xq.shape}")
        if sx is None:
            sx = token_scales(xq, bits)
    elif xq.ndim != 2 or xq.dtype != jnp.int8:
        raise ValueError(f"w4a8_matmul: xq must be int8 [M, K], got {xq.dtype} {xq.shape}")
    elif sx is None:
        raise ValueError("w4a8_matmul: sx (per-token scales [M, 1]) is required for int8 xq; "
                         "sx=None only with bits=8/4 and float activations")
    if qweight.dtype != jnp.int8:
        raise ValueError(f"w4a8_matmul: qweight dtype {qweight.dtype} must be int8")
    M, K = xq.shape
    if sx.size != M:
        raise ValueError(f"w4a8_matmul: sx shape {sx.shape} must be [M, 1] with M={M}")
    N, G = check_operands("w4a8_matmul", M, K, qweight.shape, scales.shape)
    out_dtype = jnp.dtype(out_dtype)
    if config is None:
        cfg = default_config(M, K, N, G)
    else:
        cfg = fit_config(config, M, K, N, G, int8=True)
    if is_gemv(cfg.dequant) and M > cfg.bm:
        raise ValueError(f"w4a8_matmul: dequant='{cfg.dequant}' takes M <= bm ({cfg.bm}), got M={M}")
    if is_gemv(cfg.dequant) and G == K and K > 16384:
        raise ValueError(f"w4a8_matmul: dequant='{cfg.dequant}' with per-channel scales needs K <= 16384 "
                         f"(exact f32 integer sums), got K={K}; use dequant='int8'")
    if cfg.dequant == "int8s" and K > 131072:
        raise ValueError(f"w4a8_matmul: dequant='int8s' sums 16x products in int32: K={K} must be "
                         "<= 131072; use dequant='int8'")
    if cfg.dequant in ("cvt", "cvts") or (cfg.dequant == "magic" and K > 16384):
        cfg = dataclasses.replace(cfg, dequant="int8")  # bf16 MMA is exact only for K <= 16384
    sx = sx.astype(jnp.float32).reshape(M, 1)
    scales = scales.astype(jnp.float32)
    qrange = None
    if bits is not None:
        if is_gemv(cfg.dequant):
            xq = quantize_rows(xq, sx, bits)
        else:
            qrange = QRANGE[bits]
    q = as_int16_pairs(qweight) if cfg.dequant == "magic" else qweight
    out = _build(M, K, N, G, out_dtype, cfg, interpret, qrange)(xq, sx, q, scales)
    if cfg.split_k > 1:
        acc = out.sum(axis=0)
        if G == K:
            acc = acc.astype(jnp.float32) * scales
        out = (sx * acc).astype(out_dtype)
    return out
