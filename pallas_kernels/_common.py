"""Shape checks and tile configurations shared by the int4 GEMM kernels.

Weight layout (docs/DESIGN.md): qweight int8 [K//2, N], "half-split" along K: byte
qweight[i, n] holds q[i, n] in its low nibble and q[i + K//2, n] in its high nibble
(two's complement). scales float32 [K//G, N]; G == K means one scale per output channel.

A kernel program walks packed rows [i0, i0 + bk) of qweight: the low nibbles multiply
x[:, i0:i0+bk] and the high nibbles x[:, K/2+i0:K/2+i0+bk]. With group scales each
such step must lie inside one group on both halves, hence bk | G and G | K/2.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

try:  # Triton-specific Pallas API (deprecated in jax 0.11 but present).
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
    pltriton = None

# Smallest tiles the kernels use. tl.dot needs K >= 16 (bf16) / 32 (int8) and the
# block shapes must be powers of two.
MIN_BN = 32
MIN_BK = 32


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One kernel configuration (all static).

    bm: rows of x per program (M is padded up to it by masking; >= 16).
    bn: output columns per program.
    bk: packed weight rows per K step (each step covers 2*bk of K: bk low, bk high).
    split_k: programs along K; partial sums are reduced by one small XLA fusion.
    transpose: compute (W^T x^T)^T so the weight tile fills the MMA's M dimension.
    """
    bm: int = 16
    bn: int = 64
    bk: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    transpose: bool = False
    # How int4 nibbles become MMA operands:
    #  "magic": (bf16/f16 MMA) qweight read as int16 pairs of bytes; each nibble is turned into
    #           the float 136+v (bf16) / 1032+v (f16) by integer and/xor on its bits, then the
    #           offset is subtracted: exact, no int->float conversion instructions.
    #  "cvt":   int8 shifts then int->float conversion (bf16/f16/f32 MMA).
    #  "int8":  int8 shifts, int8 MMA with int32 accumulation (w4a8 only).
    #  "int8s": (w4a8 only) like "int8" with one shift or one mask per nibble plane: the int8
    #           operands hold 16 * v, the int32 sums are divided by 16 at the end (exact).
    #           1.1-1.45x faster than "int8" at M <= 256 on the H200 (kernels_h200_int8s.md).
    #  "cvts":  (w4a16) like "cvt" on the 16x nibbles, the f32 sums scaled by 1/16 (exact).
    #  "gemv":  (M <= bm) no MMA: int8 shifts, int->f32 conversion, FMAs into one
    #           [bk, bn] f32 accumulator per token row, reduced over K at the end.
    #  "gemv_magic": as "gemv", but each nibble becomes an f32 by bit operations (the float
    #           2**23 + u, then the offset subtracted): no int->float conversion instructions,
    #           which run at 1/8 of the FMA rate on Hopper.
    #  "asm":  (w4a16, bf16/f16 x) the "magic" bit trick on packed registers in inline PTX
    #           (asm_nibbles): 14 instructions per 4 bytes (8 nibbles) instead of several per
    #           nibble; interpret mode runs the same bit arithmetic in jnp.
    #  For w4a8 "magic" converts xq to bf16 and runs bf16 MMA with f32 accumulation, which is
    #  exact while |acc| < 2**24 (127 * 8 * K < 2**24, i.e. K <= 16384).
    dequant: str = "magic"

    def short(self) -> str:
        return (f"bm{self.bm}_bn{self.bn}_bk{self.bk}_s{self.split_k}_w{self.num_warps}"
                f"_st{self.num_stages}{'_T' if self.transpose else ''}_{self.dequant}")


_MAGIC = {  # dtype name -> (bit pattern OR-ed with the unsigned nibble u = v + 8, offset 128+8)
    "bfloat16": (0x4300, 136.0),   # bf16(0x4300 | u) = 128 + u
    "float16": (0x6400, 1032.0),   # f16(0x6400 | u) = 1024 + u
}


def magic_dequant(w16, dtype):
    """int16 [bk, bn//2] (bytes of columns 2c, 2c+1) -> (lo, hi) [bk, bn] in dtype, exact.

    lo holds the low nibbles (K rows i), hi the high nibbles (K rows K/2 + i); the int4 value v
    (two's complement nibble n) is v = (n ^ 8) - 8.
    """
    base, off = _MAGIC[jnp.dtype(dtype).name]
    pat = jnp.int16(base | 8)
    m = jnp.int16(0xF)

    def plane(shift_a, shift_b):
        a = lax.shift_right_logical(w16, jnp.int16(shift_a)) if shift_a else w16
        b = lax.shift_right_logical(w16, jnp.int16(shift_b))
        a = (a & m) ^ pat
        b = (b & m) ^ pat
        ab = jnp.stack([a, b], axis=-1)  # [bk, bn//2, 2]: columns 2c, 2c+1
        ab = ab.reshape(w16.shape[0], 2 * w16.shape[1])
        return lax.bitcast_convert_type(ab, dtype) - jnp.asarray(off, dtype)

    return plane(0, 8), plane(4, 12)


_FMA_ONE = {"bfloat16": (0x3F80, "bf16x2"), "float16": (0x3C00, "f16x2")}  # 1.0, PTX type


def _asm_ptx(dtype_name: str, high: bool) -> str:
    """PTX for asm_nibbles: four packed int8 bytes in ($2) -> their four low (high: high)
    nibbles as two 16-bit float pairs ($0, $1), element order kept (byte i of $2 is element
    i; element 0 is the low half of $0). Per pair: prmt spreads two bytes to the two 16-bit
    halves, one lop3 computes (t & 0x000F000F) ^ (pattern | 8) in both halves (the float
    pattern | u with u = n ^ 8 = v + 8), one packed fma subtracts pattern's value + 8.
    (One result per call: Pallas's Triton lowering of elementwise_inline_asm takes one.)"""
    base, off = _MAGIC[dtype_name]
    one, ftype = _FMA_ONE[dtype_name]
    pat = (base | 8) * 0x10001
    neg = int(np.asarray(-off, jnp.dtype(dtype_name)).view(np.uint16)) * 0x10001
    lut = 0x6A  # (a & b) ^ c
    lines = [".reg .b32 t0, t1, one, off, z;",
             f"mov.b32 one, {one * 0x10001:#010x};",
             f"mov.b32 off, {neg:#010x};",
             "mov.b32 z, 0;",
             "prmt.b32 t0, $2, z, 0x4140;",   # bytes 0, 1 -> the low byte of halves 0, 1
             "prmt.b32 t1, $2, z, 0x4342;"]   # bytes 2, 3
    if high:
        lines += ["shr.u32 t0, t0, 4;", "shr.u32 t1, t1, 4;"]
    lines += [f"lop3.b32 $0, t0, 0x000F000F, {pat:#010x}, {lut:#04x};",
              f"lop3.b32 $1, t1, 0x000F000F, {pat:#010x}, {lut:#04x};",
              f"fma.rn.{ftype} $0, $0, one, off;",
              f"fma.rn.{ftype} $1, $1, one, off;"]
    return "{\n" + "\n".join(lines) + "\n}"


def asm_nibbles(q, dtype, interpret: bool):
    """int8 [r, c] packed pairs -> (low, high) nibble values [r, c] in dtype (bf16 or f16),
    exact. On the GPU one inline-PTX instance handles four bytes (see _asm_ptx: 6-8
    instructions for four nibbles); in interpret mode (CPU tests) the same bit arithmetic runs
    in jnp, so the constants are tested there."""
    name = jnp.dtype(dtype).name
    base, off = _MAGIC[name]
    if interpret or pltriton is None:
        w = q.astype(jnp.int16)
        pat = jnp.int16(base | 8)

        def plane(bits):
            return lax.bitcast_convert_type((bits & jnp.int16(0xF)) ^ pat, dtype) - jnp.asarray(off, dtype)
        return plane(w), plane(lax.shift_right_arithmetic(w, jnp.int16(4)))
    out = [jax.ShapeDtypeStruct(q.shape, dtype)]
    return tuple(pltriton.elementwise_inline_asm(_asm_ptx(name, high), args=[q], constraints="=r,=r,r",
                                                 pack=4, result_shape_dtypes=out)[0]
                 for high in (False, True))


def as_int16_pairs(qweight):
    """int8 [K//2, N] -> int16 [K//2, N//2] view (little endian: low byte = even column)."""
    kh, n = qweight.shape
    return lax.bitcast_convert_type(qweight.reshape(kh, n // 2, 2), jnp.int16)


def swiglu(gate, up, dtype):
    """Inside a kernel: the model's jax.nn.silu(gate) * up in ``dtype``, rounded after each op
    as XLA does (the sigmoid in f32: Triton divides only f32); gate, up f32 -> ``dtype``."""
    sig = (1.0 / (1.0 + jnp.exp(-gate))).astype(dtype)
    return gate.astype(dtype) * sig * up.astype(dtype)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def check_group(K: int, G: int) -> str | None:
    if K % G:
        return f"group size G={G} must divide K={K}"
    if G != K and (G % MIN_BK or (K // 2) % G):
        return (f"group size G={G} (K={K}) unsupported: need G == K (per-channel) or "
                f"G a multiple of {MIN_BK} dividing K/2={K // 2}")
    return None


def supported(M: int | None, K: int, N: int, group_size: int | None = None) -> tuple[bool, str]:
    """Whether the int4 GEMM kernels accept this shape. Returns (ok, reason).

    group_size None or == K means per-output-channel scales.
    """
    G = K if group_size is None else int(group_size)
    if M is not None and M < 1:
        return False, f"M={M} must be >= 1"
    if K % (2 * MIN_BK):
        return False, f"K={K} must be a multiple of {2 * MIN_BK} (K/2 a multiple of the smallest K tile {MIN_BK})"
    if N % MIN_BN:
        return False, f"N={N} must be a multiple of the smallest N tile {MIN_BN}"
    msg = check_group(K, G)
    if msg:
        return False, msg
    return True, "ok"


def check_operands(name: str, M: int, K: int, qweight_shape, scales_shape) -> tuple[int, int]:
    """Validates shapes; returns (N, G). Raises ValueError naming shape and constraint."""
    if len(qweight_shape) != 2:
        raise ValueError(f"{name}: qweight must be [K//2, N], got shape {tuple(qweight_shape)}")
    kh, N = qweight_shape
    if 2 * kh != K:
        raise ValueError(f"{name}: x has K={K} but qweight {tuple(qweight_shape)} implies K={2 * kh} "
                         "(qweight must be [K//2, N])")
    if len(scales_shape) != 2 or scales_shape[1] != N or scales_shape[0] < 1 or K % scales_shape[0]:
        raise ValueError(f"{name}: scales shape {tuple(scales_shape)} must be [K//G, N] with N={N} "
                         f"and K//G dividing K={K}")
    G = K // scales_shape[0]
    ok, why = supported(M, K, N, G)
    if not ok:
        raise ValueError(f"{name}: unsupported shape M={M} K={K} N={N} G={G}: {why}")
    return N, G


def fit_config(cfg: TileConfig, M: int, K: int, N: int, G: int, *, int8: bool) -> TileConfig:
    """Shrinks a requested config so that its tiles divide the problem."""
    kh = K // 2
    bm = max(16, min(cfg.bm, _next_pow2(M)))
    bn = cfg.bn
    while bn > MIN_BN and N % bn:
        bn //= 2
    min_bk = MIN_BK if int8 else 16
    bk = max(min_bk, cfg.bk)
    while bk > MIN_BK and (kh % bk or (G != K and G % bk)):
        bk //= 2
    split = max(1, cfg.split_k)
    while split > 1 and kh % (bk * split):
        split //= 2
    return dataclasses.replace(cfg, bm=bm, bn=bn, bk=bk, split_k=split)


def sm_count() -> int:
    try:
        d = jax.devices()[0]
        if d.platform == "gpu":
            return int(getattr(d, "core_count", 132) or 132)
    except Exception:  # pragma: no cover
        pass
    return 132


GEMV_MAX_M = 8
GEMV_DEQUANTS = ("gemv", "gemv_magic")


def is_gemv(dequant: str) -> bool:
    return dequant in GEMV_DEQUANTS


def gemv_config(M: int, K: int, N: int, G: int, dequant: str = "gemv_magic") -> TileConfig:
    """The FMA ("gemv") path's configuration for M <= GEMV_MAX_M: 128-column tiles, 16-row K
    steps, split-K 16 (shrunk to fit). On the H200 its time fell with every doubling of the
    program count up to split-K 16 (latency-bound loads, kernels_h200_tuning.md): at M = 1,
    9.5-36.9 us on the 8B shapes, 81.9 us per layer vs 115 us for the best MMA configuration;
    it loses from M = 4 on (one accumulator per row)."""
    if M > GEMV_MAX_M:
        raise ValueError(f"gemv_config: the gemv path is for M <= {GEMV_MAX_M}, got M={M}")
    if not is_gemv(dequant):
        raise ValueError(f"gemv_config: dequant must be one of {GEMV_DEQUANTS}, got {dequant!r}")
    return fit_config(TileConfig(bm=16, bn=128, bk=16, split_k=16, num_warps=4, num_stages=3,
                                 dequant=dequant), M, K, N, G, int8=False)


def gemm_call(kernel, lead_specs, *, M, K, N, G, cfg: TileConfig, out_dtype, partial_dtype,
              interpret: bool, name: str):
    """The pallas_call of both int4 GEMM kernels: grid (N tiles, M tiles, K splits); inputs
    are the activation blocks ``lead_specs`` (x, then e.g. per-token scales), the packed
    weights of this K split and N tile (int16 pairs for dequant="magic") and this N tile's
    scales; the output is [M, N] in out_dtype, or [split, M, N] partial sums in partial_dtype
    when split-K (reduced by the caller)."""
    bm, bn, split = cfg.bm, cfg.bn, cfg.split_k
    kh_split = K // 2 // split
    qbn = bn // 2 if cfg.dequant == "magic" else bn
    in_specs = list(lead_specs) + [
        pl.BlockSpec((kh_split, qbn), lambda n, m, s: (s, n)),
        pl.BlockSpec((K // G, bn), lambda n, m, s: (0, n)),
    ]
    if split > 1:
        out_shape = jax.ShapeDtypeStruct((split, M, N), partial_dtype)
        out_specs = pl.BlockSpec((None, bm, bn), lambda n, m, s: (s, m, n))
    else:
        out_shape = jax.ShapeDtypeStruct((M, N), out_dtype)
        out_specs = pl.BlockSpec((bm, bn), lambda n, m, s: (m, n))
    params = None
    if pltriton is not None:
        params = pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(N // bn, pl.cdiv(M, bm), split), in_specs=in_specs,
        out_specs=out_specs, compiler_params=params, interpret=interpret, name=name)


_F32_MAGIC = 0x4B000008  # f32 bits of 2**23, OR-ed with the offset-binary nibble u = v ^ 8
_F32_OFFSET = float(2 ** 23 + 8)


def magic_nibbles_f32(q):
    """int8 [r, c] of packed pairs -> (low, high) nibble values as exact f32 [r, c], without
    int->float conversions: the nibble n (two's complement v) gives u = n ^ 8 = v + 8 in 0..15,
    the f32 with bits 0x4B000000 | u is 2**23 + u, and subtracting 2**23 + 8 leaves v."""
    w = q.astype(jnp.int32)

    def plane(bits):
        return lax.bitcast_convert_type((bits & 0xF) ^ _F32_MAGIC, jnp.float32) - _F32_OFFSET

    return plane(w), plane(lax.shift_right_arithmetic(w, 4))


def gemv_rows(x_ref, q_ref, s_ref, *, M, K, G, bk, kh_split, split_idx, magic=False):
    """The K loop of the FMA ("gemv") kernel path, shared by the w4a16 and w4a8 kernels.

    Rows m < M of x_ref (any numeric dtype) times this program's packed weight rows
    [split_idx * kh_split, +kh_split) of q_ref, as f32 FMAs into one [bk, bn] accumulator per
    row, reduced over K once at the end. Group scales (G < K) multiply each step's weights (a
    step lies inside one group on each half); per-channel scales are left to the caller.
    Returns M f32 rows of [bn]."""
    bn = s_ref.shape[1]
    kh = K // 2
    base = split_idx * kh_split
    per_channel = G == K

    def body(i, accs):
        k0 = pl.multiple_of(i * bk, bk)
        if magic:
            lo, hi = magic_nibbles_f32(q_ref[pl.ds(k0, bk), :])
        else:
            lo, hi = split_nibbles(q_ref[pl.ds(k0, bk), :])
            lo, hi = lo.astype(jnp.float32), hi.astype(jnp.float32)
        if not per_channel:
            lo = lo * s_ref[pl.ds((base + k0) // G, 1), :]
            hi = hi * s_ref[pl.ds((kh + base + k0) // G, 1), :]
        out = []
        for m in range(M):
            x_lo = x_ref[m, pl.ds(base + k0, bk)].astype(jnp.float32)
            x_hi = x_ref[m, pl.ds(kh + base + k0, bk)].astype(jnp.float32)
            out.append(accs[m] + lo * x_lo[:, None] + hi * x_hi[:, None])
        return tuple(out)

    zeros = tuple(jnp.zeros((bk, bn), jnp.float32) for _ in range(M))
    accs = lax.fori_loop(0, kh_split // bk, body, zeros)
    return [jnp.sum(a, axis=0) for a in accs]


QRANGE = {8: (-127.0, 127.0), 4: (-8.0, 7.0)}  # bits -> (qmin, qmax), as quant.quantize_activations


def token_scales(x: jax.Array, bits: int) -> jax.Array:
    """Per-token scales max|x| / qmax (1.0 for an all-zero row), f32 [..., 1]."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return jnp.where(amax > 0, amax / QRANGE[bits][1], 1.0).astype(jnp.float32)


def quantize_rows(x: jax.Array, sx: jax.Array, bits: int) -> jax.Array:
    """clip(round(x / sx)) to int8 (ties to even), x's rows scaled by sx [..., 1]."""
    qmin, qmax = QRANGE[bits]
    return jnp.clip(jnp.round(x.astype(jnp.float32) / sx), qmin, qmax).astype(jnp.int8)


def quantize_per_token_reference(x: jax.Array, bits: int = 8) -> tuple[jax.Array, jax.Array]:
    """DESIGN.md per-token symmetric quantization: bits=8 -> [-127, 127], bits=4 -> [-8, 7]."""
    sx = token_scales(x, bits)
    return quantize_rows(x, sx, bits), sx


def round_half_even(v):
    """jnp.round (ties to even) for |v| < 2**22 from floor, which Pallas Triton lowers (it has
    no round primitive): floor(v + 0.5), minus one at exact ties that land on an odd number.
    v + 0.5 and f - v are exact in f32 at these magnitudes (|x / sx| <= 127 in the quantizers)."""
    f = jnp.floor(v + 0.5)
    odd = f - 2.0 * jnp.floor(f * 0.5)
    return jnp.where((f - v == 0.5) & (odd != 0), f - 1.0, f)


def shifted_nibbles(q):
    """int8 [r, c] packed pairs -> (16 * low nibble values, 16 * high nibble values), int8,
    with one shift and one mask (the nibble lands in the top four bits: two's complement gives
    16 * v exactly). The MMA then sums 16x products; the kernels scale back once at the end."""
    return lax.shift_left(q, jnp.int8(4)), q & jnp.int8(-16)


def split_nibbles(q):
    """int8 [r, c] of packed pairs -> (low nibbles, high nibbles), both int8 [r, c] in [-8, 7].

    Sign-extends each nibble with shifts (works on refs' values inside kernels and in jnp)."""
    lo = lax.shift_right_arithmetic(lax.shift_left(q, jnp.int8(4)), jnp.int8(4))
    hi = lax.shift_right_arithmetic(q, jnp.int8(4))
    return lo, hi


def unpack_int4(qweight):
    """int8 [K//2, N] half-split (docs/DESIGN.md) -> int8 [K, N] values in [-8, 7]."""
    return jnp.concatenate(split_nibbles(qweight), axis=0)
