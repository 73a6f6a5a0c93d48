"""W4A16 GEMM (QSpec verify mode): y = sum_g (x_g @ q_g) * s[g], fp32 accumulation.

x [M, K] in bf16/f16/f32, qweight int8 [K//2, N] (half-split int4, docs/DESIGN.md),
scales f32 [K//G, N]. The nibbles are unpacked in registers, converted exactly to x's
dtype and fed to the tensor cores; per-group scales are applied once per K step (a step
lies inside one group), per-channel scales once in the epilogue.

Backends (chosen by measurement, experiments/results/kernels_h200.md):
- M < XLA_MIN_M (decode, draft and verify batches): this Pallas Triton kernel. A Mosaic GPU
  version is not written; JAX's own Mosaic GPU mixed int8 x bf16 matmul reached 634 TFLOP/s
  at M = 4096 (kernels_probe.json), about 2x this kernel there, so it is the next step for
  prefill shapes.
- M >= XLA_MIN_M with per-channel scales: exact dequantization + XLA GEMM (backend="xla").
- dequant="asm" (the default at M <= 16 and 65-255): nibbles to bf16 pairs by inline PTX (prmt,
  lop3, packed fma; 1.75 instructions per nibble), 1.1-1.6x the "cvt"/"gemv_magic" defaults it
  replaced at M <= 16 (kernels_h200_asm.md).
- dequant="gemv_magic" (TileConfig, see gemv_config): an FMA path without MMA (the M <= 2
  default before "asm"); "gemv" is the same path with int->float conversions (slower: they run
  at 1/8 of the FMA rate on Hopper).
Runs in CPU interpret mode for tests.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (GEMV_MAX_M, TileConfig, as_int16_pairs,  # noqa: F401
                                    asm_nibbles, check_operands, fit_config, gemm_call, gemv_config, gemv_rows,
                                    is_gemv, magic_dequant, shifted_nibbles,
                                    split_nibbles, unpack_int4)

try:  # Triton-specific Pallas API (deprecated in jax 0.11 but present).
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
    pltriton = None

_BACKENDS = ("triton", "xla")
# From M = XLA_MIN_M on (per-channel scales), the default backend dequantizes the weight to the
# compute dtype in one XLA fusion and runs XLA's GEMM: at large M the Triton kernel's in-loop
# dequantization reaches only 340-450 TFLOP/s (experiments/results/kernels_h200.md: 452 us for
# the kernel vs 405 us for this XLA path at M = 256, four Llama shapes). At M = 128 the tuned
# kernel wins (255 vs 338 us, kernels_h200_tuning.md).
XLA_MIN_M = 256


# ----------------------------------------------------------------------------- reference
def w4a16_matmul_reference(x: jax.Array, qweight: jax.Array, scales: jax.Array) -> jax.Array:
    """Plain-jnp reference: sum_g (x_g @ q_g) * s[g] in f32 (g in order), cast to x.dtype."""
    M, K = x.shape
    q = unpack_int4(qweight).astype(x.dtype)  # exact in bf16/f16/f32
    ng = scales.shape[0]
    G = K // ng
    hp = lax.Precision.HIGHEST
    if ng == 1:
        acc = jnp.dot(x, q, preferred_element_type=jnp.float32, precision=hp)
        return (acc * scales[0][None, :]).astype(x.dtype)

    def body(g, acc):
        xg = lax.dynamic_slice_in_dim(x, g * G, G, axis=1)
        qg = lax.dynamic_slice_in_dim(q, g * G, G, axis=0)
        part = jnp.dot(xg, qg, preferred_element_type=jnp.float32, precision=hp)
        return acc + part * lax.dynamic_index_in_dim(scales, g, axis=0, keepdims=True)

    acc = lax.fori_loop(0, ng, body, jnp.zeros((M, qweight.shape[1]), jnp.float32))
    return acc.astype(x.dtype)


def _xla_dequant_matmul(x, qweight, scales):
    """Large-M path: exact int4 -> x.dtype in one XLA fusion, XLA GEMM, f32 scale epilogue.

    Per-channel scales only (the scale multiplies the f32 accumulator: the verify-mode math)."""
    if scales.shape[0] != 1:
        raise ValueError("w4a16_matmul: backend='xla' needs per-channel scales (G == K)")
    q = unpack_int4(qweight).astype(x.dtype)
    acc = jnp.dot(x, q, preferred_element_type=jnp.float32)
    return (acc * scales).astype(x.dtype)


# ----------------------------------------------------------------------------- kernel
def _w4a16_kernel(x_ref, q_ref, s_ref, o_ref, *, M, K, G, bk, kh_split, transpose, masked,
                  partial_out, dequant, interpret=False):
    # x_ref: [bm, K]        rows m*bm .. of x (rows >= M are masked to 0)
    # q_ref: [kh_split, bn] int8 packed rows of this K split
    #        (dequant == "magic": int16 [kh_split, bn//2], two packed bytes per element)
    # s_ref: [K//G, bn]     f32 scales of this N tile
    # o_ref: [bm, bn]       x.dtype (partial_out: f32 partial sum of this K split)
    bm = x_ref.shape[0]
    bn = s_ref.shape[1]
    kh = K // 2
    m_idx = pl.program_id(1)
    s_idx = pl.program_id(2)
    base = s_idx * kh_split
    cdt = x_ref.dtype
    per_channel = G == K
    if masked:
        rows = m_idx * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
        row_mask = rows < M  # [bm, 1]

    def load_x(col):
        ref = x_ref.at[:, pl.ds(col, bk)]  # [bm, bk]
        if masked:
            return pltriton.load(ref, mask=row_mask, other=0) if pltriton else ref[...]
        return ref[...]

    def mma(xt, wt):
        # xt: [bm, bk] cdt, wt: [bk, bn] cdt -> f32 [bm, bn] (or [bn, bm] when transposed)
        if transpose:
            return lax.dot_general(wt, xt, (((0,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)
        return jnp.dot(xt, wt, preferred_element_type=jnp.float32)

    def scale_row(g):
        s = s_ref[pl.ds(g, 1), :]  # [1, bn] f32
        return s.T if transpose else s

    def body(i, acc):
        k0 = pl.multiple_of(i * bk, bk)
        if dequant == "magic":
            lo, hi = magic_dequant(q_ref[pl.ds(k0, bk), :], cdt)  # cdt [bk, bn] each
        elif dequant == "asm":  # the magic trick on packed registers, inline PTX
            lo, hi = asm_nibbles(q_ref[pl.ds(k0, bk), :], cdt, interpret)
        elif dequant == "cvts":  # 16 * v (exact in bf16/f16): one shift or mask per plane
            lo, hi = shifted_nibbles(q_ref[pl.ds(k0, bk), :])
            lo, hi = lo.astype(cdt), hi.astype(cdt)
        else:
            lo, hi = split_nibbles(q_ref[pl.ds(k0, bk), :])  # int8 [bk, bn] each
            lo, hi = lo.astype(cdt), hi.astype(cdt)
        d_lo = mma(load_x(base + k0), lo)
        d_hi = mma(load_x(kh + base + k0), hi)
        if per_channel:
            return acc + d_lo + d_hi
        g_lo = (base + k0) // G
        g_hi = (kh + base + k0) // G
        return acc + d_lo * scale_row(g_lo) + d_hi * scale_row(g_hi)

    shape = (bn, bm) if transpose else (bm, bn)
    acc = lax.fori_loop(0, kh_split // bk, body, jnp.zeros(shape, jnp.float32))
    if dequant == "cvts":
        acc = acc * 0.0625  # the operands were 16x: exact (a power of two)
    if per_channel:
        acc = acc * scale_row(0)
    if transpose:
        acc = acc.T  # [bm, bn]
    out = acc.astype(o_ref.dtype)
    if masked and pltriton is not None:
        pltriton.store(o_ref, out, mask=row_mask)
    else:
        o_ref[...] = out


def _w4a16_gemv_kernel(x_ref, q_ref, s_ref, o_ref, *, M, K, G, bk, kh_split, magic):
    """dequant == "gemv" (M <= GEMV_MAX_M): no MMA. The few token rows are multiplied into
    the converted weight tile with FMAs on [bk, bn] f32 accumulators (one per row), reduced
    over K once at the end: at M = 1-4 an MMA tile is at most 1/4 used, and the weight stream,
    not arithmetic, is the cost.

    x_ref [bm, K] (only rows < M are read), q_ref [kh_split, bn] int8, s_ref [K//G, bn] f32,
    o_ref [bm, bn] (rows < M written; f32 partial sums when split-K)."""
    rows = gemv_rows(x_ref, q_ref, s_ref, M=M, K=K, G=G, bk=bk, kh_split=kh_split,
                     split_idx=pl.program_id(2), magic=magic)
    for m, row in enumerate(rows):
        if G == K:
            row = row * s_ref[0, :]
        o_ref[m, :] = row.astype(o_ref.dtype)


def _build(M, K, N, G, dtype, cfg: TileConfig, interpret: bool):
    bm, bk, split = cfg.bm, cfg.bk, cfg.split_k
    kh_split = K // 2 // split
    if is_gemv(cfg.dequant):
        if M > bm:
            raise ValueError(f"w4a16_matmul: dequant='{cfg.dequant}' takes M <= bm ({bm}), got M={M}")
        kernel = functools.partial(_w4a16_gemv_kernel, M=M, K=K, G=G, bk=bk, kh_split=kh_split,
                                   magic=cfg.dequant == "gemv_magic")
    else:
        kernel = functools.partial(
            _w4a16_kernel, M=M, K=K, G=G, bk=bk, kh_split=kh_split, transpose=cfg.transpose,
            masked=(M % bm != 0), partial_out=split > 1, dequant=cfg.dequant, interpret=interpret)
    return gemm_call(kernel, [pl.BlockSpec((bm, K), lambda n, m, s: (m, 0))], M=M, K=K, N=N, G=G,
                     cfg=cfg, out_dtype=dtype, partial_dtype=jnp.float32, interpret=interpret,
                     name=f"w4a16_{cfg.short()}")


def default_config(M: int, K: int, N: int, G: int) -> TileConfig:
    """Tile configuration by M, from the H200 sweeps (experiments/results/kernels_h200_tuning.md
    and kernels_h200_asm.md; sums over the four Llama-3-8B layer shapes, per-channel scales):

    - M <= 16: MMA, inline-PTX nibbles ("asm": prmt + lop3 + packed fma), 64-row K steps,
      split-K 8: 70.0 / 73.1 us at M = 4 / 16 against 112.5 / 116.5 us with int->bf16
      conversions ("cvt") and 81.9 / 107.1 us for the FMA path ("gemv_magic") at M = 1 / 2.
    - M <= 64: one transposed M tile, "magic" dequantization, 64-row K steps, split-K 4:
      113.0 / 149.8 us at M = 32 / 64 ("asm" here: 115.9 / 157.0 us).
    - M < XLA_MIN_M: 64 x 64 tiles, 64-row K steps, split-K 2, "asm": 235.5 us at M = 128
      ("magic": 254.1 us; XLA's dequantize + GEMM: 337.7 us).
    """
    if M <= 16:
        cfg = TileConfig(bm=16, bn=128, bk=64, split_k=8, num_warps=4, num_stages=4, dequant="asm")
    elif M <= 32:
        cfg = TileConfig(bm=32, bn=64, bk=64, split_k=4, num_warps=4, num_stages=4, transpose=True,
                         dequant="magic")
    elif M <= 64:
        cfg = TileConfig(bm=64, bn=64, bk=64, split_k=4, num_warps=4, num_stages=4, transpose=True,
                         dequant="magic")
    elif M < XLA_MIN_M:
        cfg = TileConfig(bm=64, bn=64, bk=64, split_k=2, num_warps=4, num_stages=4, dequant="asm")
    else:
        cfg = TileConfig(bm=128, bn=256, bk=64, num_warps=8, num_stages=3, transpose=True)
    return fit_config(cfg, M, K, N, G, int8=False)


@functools.partial(jax.jit, static_argnames=("backend", "interpret", "config"))
def w4a16_matmul(x: jax.Array, qweight: jax.Array, scales: jax.Array, *, backend: str | None = None,
                 interpret: bool = False, config: TileConfig | None = None) -> jax.Array:
    """x [M, K] (bf16/f16/f32) @ int4 weights -> [M, N] in x.dtype, fp32 accumulation.

    backend: None (auto: Triton kernel; for M >= XLA_MIN_M with per-channel scales, XLA
    dequantize + GEMM), "triton" (always the kernel) or "xla" (always dequantize + GEMM).
    (XLA's own int4 dot over an s4 bitcast view of the packed weights was tried: 21.3 us at
    M = 4, 4096 x 4096, 1.8x slower than this kernel, and XLA crashed compiling it at another
    shape: experiments/results/kernels_h200_s4ours_probe.md.)
    interpret: run the Pallas interpreter (CPU tests).
    config: optional TileConfig (tuning); shrunk to fit the shape.
    Raises ValueError for shapes the kernel does not support (see pallas_kernels.supported).
    """
    if backend not in (None,) + _BACKENDS:
        raise ValueError(f"w4a16_matmul: unknown backend {backend!r}; choose one of {_BACKENDS}")
    if x.ndim != 2:
        raise ValueError(f"w4a16_matmul: x must be [M, K], got shape {x.shape}")
    if x.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise ValueError(f"w4a16_matmul: x dtype {x.dtype} must be bfloat16, float16 or float32")
    if qweight.dtype != jnp.int8:
        raise ValueError(f"w4a16_matmul: qweight dtype {qweight.dtype} must be int8")
    M, K = x.shape
    N, G = check_operands("w4a16_matmul", M, K, qweight.shape, scales.shape)
    scales = scales.astype(jnp.float32)
    if backend == "xla" or (backend is None and config is None and G == K and M >= XLA_MIN_M):
        return _xla_dequant_matmul(x, qweight, scales)
    if config is None:
        cfg = default_config(M, K, N, G)
    else:
        cfg = fit_config(config, M, K, N, G, int8=False)
    if cfg.dequant in ("magic", "asm") and x.dtype == jnp.float32:
        cfg = dataclasses.replace(cfg, dequant="cvt")  # no magic constant for f32 (not a fast path)
    q = as_int16_pairs(qweight) if cfg.dequant == "magic" else qweight
    out = _build(M, K, N, G, x.dtype, cfg, interpret)(x, q, scales)
    if cfg.split_k > 1:
        out = out.sum(axis=0).astype(x.dtype)
    return out
