"""Mosaic GPU (Hopper: TMA + wgmma) int4-weight GEMMs for small M, swap-AB (issue 6, experimental).

y[M, N] = x[M, K] @ W[K, N] computed as (W^T x^T)^T: the int4 weight tile [tile_n, block_k]
is the wgmma's A operand *in registers* (TMA'd to shared memory, loaded in the upcast layout,
converted to bf16 / int8 in registers), the activation tile x^T [block_k, Mp] the B operand in
shared memory (Mp = 8, 16, ..., 256 rows of x, the wgmma's N; where the model uses it:
kernel_dispatch.mgpu_max_m). The weight therefore fills the MMA's
64-row M dimension and never returns to shared memory after unpacking, which is what the
Triton kernels cannot do (experiments/results/stream_h200_6341a42.md).

Weight layout: int4 [N, K] ("nk": K contiguous, XLA's packed int4, two values per byte), not
the model's half-split int8 [K//2, N]; `nk_from_half_split` converts once. Per-channel scales
only: f32 [N], applied to the f32 / int32 accumulator in a small XLA epilogue together with the
split-K sum (and the transpose back to [M, N], unless MgpuConfig.out_mn stores it transposed).

Modes: "w4a16" (bf16 x, bf16 MMA, f32 accumulator) and "w4a8" (int8 x with per-token f32 scales
sx [M], int8 MMA, int32 accumulator; also serves w4a4). GPU only (sm_90); no interpret mode
(jax 0.10.2's Mosaic GPU interpreter has no register-operand wgmma), so it is tested on the
device (tests/gpu) and only lowered on CPU.
"""
from __future__ import annotations

import dataclasses
import functools
import operator

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
    plgpu = None


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
    tile_n: int = 128      # weight rows (output columns) per CTA: the wgmma M (multiple of 64)
    block_k: int = 256     # K per pipeline step
    split_k: int = 1       # CTAs along K; partial sums added in the epilogue
    stages: int = 4        # TMA pipeline depth
    load_layout: str = "upcast"  # register layout of the int4 tile load ("upcast" or "wgmma")
    # Warp-specialized: one TMA warpgroup feeds two compute warpgroups, each taking half of the
    # tile_n rows (so both share one x tile). Correct on the H200 but slower than the plain
    # kernel (73-74 vs 54-57 us per 8B layer, w4a16 M 1-16: mgpu_h200_ws_3ea8b7e.json): kept off.
    warp_specialized: bool = False
    # The unpacked weight tile goes to a double-buffered shared-memory buffer and the wgmma reads
    # both operands from shared memory, so one MMA stays in flight while the next tile unpacks
    # (the register-operand kernel must wait for each MMA: see _kernel). This CTA's whole x slice
    # is TMA'd into shared memory once, outside the weight pipeline, so no pipeline slot is
    # released under an MMA still reading it. Correct on the H200 but slower than the default
    # (93.9 vs 52.9 us per 8B layer, w4a16 M = 1; 57.2 vs 45.0 w4a8: mgpu_h200_smema.md): kept off.
    smem_a: bool = False
    # Persistent CTAs: each CTA runs this many (column tile, K split) units back to back through
    # one continuous TMA pipeline (the ring does not drain between units; each unit's partial
    # sums are stored when its last K step is done and the accumulator restarts from zero), so
    # the grid is n_tiles * split_k / units_per_cta CTAs instead of one per unit. Aimed at the
    # narrow 8B shapes, whose CTAs run only 4 K steps each (qkv, o_proj). Correct on the H200
    # but 1.03-1.22x the default's time at every 8B shape (mgpu_h200_persist.md): off.
    units_per_cta: int = 1
    # Store each CTA's partial sums transposed, [split_k, Mp, N] instead of [split_k, N, Mp], so
    # the epilogue (split-K sum as adds of slices, scales, the M rows) is elementwise on the
    # output's own layout and XLA can fuse it into the consumer (residual add + RMSNorm, SwiGLU)
    # instead of running a transpose kernel after every GEMM (~2-2.5 us each, 4 per layer:
    # profile_h200_8b_b16_nk_b7044e9.md). The accumulator goes through the WGMMA_TRANSPOSED
    # register layout into a transposed shared-memory view. Model-wide switch: OUT_MN below.
    out_mn: bool = False
    # Diagnostic only (probe_mgpu.py --sweep diag): "read" runs the same grid and TMA pipeline
    # but skips the unpack and the MMA (the output is zeros), which times what the structure
    # alone (grid, tile sizes, ring depth, partials store) can stream.
    probe: str = ""
    # Rows of x per CTA (plain kernel): 0 = all of x's padded rows Mp (one CTA column per
    # weight tile); 64 / 128 = x's rows split over Mp / tile_m CTAs, each re-reading its weight
    # tile. At Mp = 256 every 64-column tile otherwise reads all of x (gate/up: ~0.9 GB from L2
    # per call) and the [tile_n, 256] accumulator caps tile_n at 64 (registers).
    tile_m: int = 0
    # Programmatic dependent launch (Hopper PDL), so that the kernel's launch and set-up overlap
    # the tail of the kernel before it (a decode GEMM reading a few MB pays them per call:
    # probe_mgpu_diag_h200.md). "wait": the plain kernel, plgpu.griddepcontrol_wait() before its
    # pipeline. "prefetch": the weight pipeline starts (its first `stages` TMA loads in flight)
    # before the wait, which holds back only what reads the previous kernel's output: x, TMA'd
    # whole into shared memory (this CTA's K slice) at the first K step (more shared memory per
    # CTA: pdl_smem_bytes). Both call griddepcontrol_launch_dependents() after the K loop. jax
    # marks the launch from the wait in the kernel body (jax >= 0.11; on an older jax the wait
    # is a no-op and the kernel runs as an ordinary launch: pdl_launch_supported()). "" = off.
    # "prefetch" reads the weight before the wait: the weight must not be the output of the
    # kernel launched just before this one (the model's weights are program arguments).
    # Model-wide switch: PDL below. Measured on the H200 at 74ec0d1 (mgpu_h200_pdl.md): "wait" a
    # tie end to end, "prefetch" 1.15-1.19x slower per 8B step.
    pdl: str = ""

    @property
    def plain(self) -> bool:
        """The plain kernel (not warp-specialized, smem_a or persistent): the one that takes
        unpadded x."""
        return not (self.warp_specialized or self.smem_a or self.units_per_cta > 1)

    def short(self) -> str:
        return (f"n{self.tile_n}k{self.block_k}s{self.split_k}p{self.stages}"
                f"w0{self.load_layout[0]}" + ("ws" if self.warp_specialized else "")
                + ("sa" if self.smem_a else "")
                + (f"u{self.units_per_cta}" if self.units_per_cta > 1 else "")
                + ("mn" if self.out_mn else "") + (f"m{self.tile_m}" if self.tile_m else "")
                + (f"pdl{self.pdl[0]}" if self.pdl else "")
                + (f"-{self.probe}" if self.probe else ""))

    def rows_per_cta(self, Mp: int) -> int:
        """x's rows one CTA computes (the wgmma's N): tile_m, or all Mp rows."""
        return min(self.tile_m, Mp) if self.tile_m else Mp


# The model's GEMMs take MgpuConfig(out_mn=OUT_MN) (default_config). On: 8B w4a16 AR step
# 2.630 vs 2.668 ms at batch 1, 2.621 vs 2.751 at batch 16 (outmn_h200.md, ed53aaf).
OUT_MN = True

# How x reaches the kernel's padded_rows(M) rows when M is smaller: "xla" pads it (a pad op,
# which for o_proj's input is a kernel of its own at batch < 8: 32 per 8B step,
# hlo_summary_b1_w4a16_a2e4e28.md) or "tma" hands the kernel x as it is and lets the TMA loads
# of its [Mp, block_k] tiles fill the rows past M with zeros (plain kernel, M < 8 only: a TMA
# box may run past an array only when the array is smaller than one tile). "tma" by default:
# bit-equal on the H200, 8B batch-4 step 2.466 -> 2.383 ms (results/xpad_h200_7e1796b.md).
# Read at trace time.
X_PADS = ("xla", "tma")
X_PAD = "tma"


# int8 x padded to 256 rows and at least this many columns: 128-column weight tiles (default_config)
WIDE_N_INT8_256 = 16384

# default_config's GEMMs with x of at most PDL_MAX_ROWS padded rows take MgpuConfig(pdl=PDL)
# ("wait" or "prefetch": programmatic dependent launch; "prefetch" only where x's K slice fits
# in shared memory, else "wait"). Off (""): on the H200 at 74ec0d1 "wait" was a tie end to end
# (8B w4a16 AR 2.360 vs 2.346 ms at batch 1, 2.583 vs 2.614 at 16) and "prefetch" slower
# (experiments/results/mgpu_h200_pdl.md). Read at trace time.
PDL_MODES = ("", "wait", "prefetch")
PDL = ""
PDL_MAX_ROWS = 16


def pdl_launch_supported() -> bool:
    """Whether this jax launches a Mosaic GPU kernel whose body waits on griddepcontrol with
    programmatic dependent launch (jax >= 0.11 marks it from the wait's effect; jax 0.10 has the
    primitives but launches every kernel plainly)."""
    try:
        from jax._src.pallas.mosaic_gpu import core as mgpu_core
    except ImportError:  # pragma: no cover
        return False
    return hasattr(mgpu_core, "_pdl_effect")


def default_config(M: int, K: int, N: int, int8: bool = False) -> MgpuConfig:
    """Measured on the H200. x of <= 64 padded rows: 64-row tiles, 256-wide K steps, a 2-stage
    ring, and split-K up to about 900 CTAs while each split keeps >= 4 K steps (gate/up 4096 x
    28672: 2 splits, down 14336 x 4096: 8, qkv 4096 x 6144 and o 4096 x 4096: 4; mgpu_h200.md);
    with x padded to 64 rows (M > 32) about 450 CTAs (gate/up 1 split, down 4: w4a16 per 8B
    layer 85.1 instead of 93.2 us at M = 64, w4a8 65 instead of 67.9; mgpu_h200_m64.md). 128 /
    64-wide K steps and deeper rings were slower at M <= 16 (mgpu_h200_regs_9afe3cf.json).

    x of 128 / 256 padded rows (bigm_h200_c477f3c.md, the tile sweep of `probe_mgpu.py --sweep
    bigm`): K steps 128 wide for bf16 x (w4a16), 256 for int8 x (int8: the draft modes), about
    300 CTAs, and at 256 rows x's rows split over two CTAs (tile_m = 128) so that a 64-column
    weight tile no longer meets all 256 rows (registers) nor re-reads all of x. Per 8B layer:
    w4a16 qkv + o + down 77.1 -> 63.0 us at M = 128 and 129.1 -> 105.6 at 256; w4a8 (all four)
    89.5 -> 85.9 at 128 and 216.0 -> 141.9 at 256 (old and new timed in the same sweep). The one
    wider weight tile that won in that sweep: int8 x at 256 rows on a wide GEMM (gate/up, 4096 x
    28672) takes 128-column tiles with 128-wide K steps, 74.2 vs 75.4 us (w4a8 per layer 140.7 us,
    1.50x w4a16's best path, 211.3). Timed as the default at 1f8d2a6 (defaults256_h200_1f8d2a6.md):
    74.8 us, w4a8 per layer 141.6 vs 213.6 us = 1.51x; at 70B (N = 57344) 250.1 us at M = 256,
    correct against the reference (kernels_h200_70b_1f8d2a6.md)."""
    tile_n = 64
    Mp = padded_rows(M)
    tile_m = 128 if Mp >= 256 else 0
    block_k = 128 if Mp >= 128 and not int8 else 256
    if int8 and Mp >= 256 and N >= WIDE_N_INT8_256 and N % 128 == 0:
        tile_n, block_k = 128, 128
    max_ctas = 300 if Mp >= 128 else 450 if Mp > 32 else 900
    split = 1
    while (N // tile_n * split * 2 * (Mp // (tile_m or Mp)) <= max_ctas and K % (block_k * split * 2) == 0
           and K // (block_k * split * 2) >= 4):
        split *= 2
    cfg = MgpuConfig(tile_n=tile_n, block_k=block_k, split_k=split, stages=2, out_mn=OUT_MN,
                     tile_m=tile_m)
    if PDL not in PDL_MODES:
        raise ValueError(f"w4_mgpu.PDL={PDL!r}: one of {PDL_MODES}")
    if PDL and Mp <= PDL_MAX_ROWS and not tile_m:
        pdl = PDL  # "prefetch" keeps x's K slice in shared memory: "wait" where it cannot
        if pdl == "prefetch" and pdl_smem_bytes(M, K, cfg) > SMEM_BYTES:
            pdl = "wait"
        cfg = dataclasses.replace(cfg, pdl=pdl)
    return cfg


def nk_from_half_split(qweight: jax.Array) -> jax.Array:
    """Model layout int8 [K//2, N] (docs/DESIGN.md) -> int4 [N, K] for this kernel (one copy)."""
    from pallas_kernels._common import unpack_int4
    return unpack_int4(qweight).T.astype(jnp.int4)


def reference(x, w_nk, scales, sx=None):
    """f32 reference: w4a16 (sx None): (x @ W^T) * s; w4a8: (int32 x @ W^T) * sx[:, None] * s."""
    w = w_nk.astype(jnp.int32 if sx is not None else jnp.float32)
    if sx is None:
        acc = jnp.dot(x.astype(jnp.float32), w.T, precision=lax.Precision.HIGHEST)
        return (acc * scales[None, :]).astype(x.dtype)
    acc = jnp.dot(x.astype(jnp.int32), w.T)
    return (acc.astype(jnp.float32) * sx[:, None] * scales[None, :]).astype(jnp.bfloat16)


# The wgmma's N (x's padded rows) goes up to 256. kernel_dispatch.mgpu_max_m decides how far the
# model uses the kernel (per mode and width, from the H200's per-layer times).
MAX_M = 256


def padded_rows(M: int) -> int:
    """Rows of x the kernel computes: the next power of two >= max(M, 8) (the wgmma's N)."""
    return max(8, 1 << (int(M) - 1).bit_length())


def _transforms(last, dtype, what):
    bits = jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else jnp.finfo(dtype).bits
    sw = plgpu.find_swizzle(last * bits, what)
    return (plgpu.TilingTransform((8, 8 * sw // bits)), plgpu.SwizzleTransform(sw))


def check(M: int, K: int, N: int, cfg: MgpuConfig) -> str | None:
    if not 1 <= M <= MAX_M:
        return (f"M={M}: this kernel takes 1 <= M <= {MAX_M} rows of x (the wgmma's N; wider "
                "GEMMs are not small-M work: use XLA or the Triton kernels)")
    if cfg.tile_n % (128 if cfg.warp_specialized else 64):
        return (f"tile_n={cfg.tile_n} must be a multiple of 64"
                + (" per compute warpgroup (128 with warp_specialized)" if cfg.warp_specialized else ""))
    if cfg.smem_a and cfg.warp_specialized:
        return "smem_a and warp_specialized do not combine"
    if N % cfg.tile_n:
        return f"N={N} must be a multiple of tile_n={cfg.tile_n}"
    if K % (cfg.block_k * cfg.split_k):
        return f"K={K} must be a multiple of block_k*split_k={cfg.block_k * cfg.split_k}"
    if cfg.pdl not in PDL_MODES:
        return f"pdl={cfg.pdl!r}: one of {PDL_MODES}"
    if cfg.pdl and (cfg.smem_a or cfg.warp_specialized or cfg.units_per_cta > 1 or cfg.tile_m
                    or cfg.probe):
        return ("pdl (programmatic dependent launch) runs with the plain kernel's options only: "
                "not smem_a, warp_specialized, units_per_cta > 1, tile_m or probe")
    if cfg.pdl == "prefetch" and pdl_smem_bytes(M, K, cfg) > SMEM_BYTES:
        return (f"pdl='prefetch' keeps x's whole K slice in shared memory: "
                f"{pdl_smem_bytes(M, K, cfg)} bytes at M={M}, K={K}, split_k={cfg.split_k} (limit "
                f"{SMEM_BYTES}); use a larger split_k, fewer stages or pdl='wait'")
    variant = cfg.smem_a or cfg.warp_specialized  # kernels other than the plain / persistent one
    if cfg.out_mn and (variant or cfg.units_per_cta > 1):
        return "out_mn (transposed partial sums) runs the plain kernel only"
    if cfg.probe not in ("", "read"):
        return f"probe={cfg.probe!r}: '' (the GEMM) or 'read' (the TMA pipeline alone)"
    if cfg.probe and (variant or cfg.units_per_cta > 1):
        return "probe runs the plain kernel only"
    if cfg.tile_m:
        if variant or cfg.units_per_cta > 1:
            return "tile_m (x's rows split over CTAs) runs the plain kernel only"
        if cfg.tile_m not in (64, 128):
            return f"tile_m={cfg.tile_m}: 64 or 128 rows of x per CTA (or 0: all of them)"
    if cfg.units_per_cta < 1:
        return f"units_per_cta={cfg.units_per_cta} must be >= 1"
    if cfg.units_per_cta > 1:
        units = N // cfg.tile_n * cfg.split_k
        if variant:
            return "units_per_cta > 1 (persistent CTAs) runs the plain kernel only"
        if units % cfg.units_per_cta:
            return (f"units_per_cta={cfg.units_per_cta} must divide the {units} (column tile, "
                    f"K split) units of N={N}, tile_n={cfg.tile_n}, split_k={cfg.split_k}")
    if (not variant and cfg.pdl != "prefetch" and cfg.units_per_cta == 1
            and plain_smem_bytes(M, cfg) > SMEM_BYTES):
        return (f"the kernel needs {plain_smem_bytes(M, cfg)} bytes of shared memory at M={M} "
                f"(x padded to {padded_rows(M)} rows), block_k={cfg.block_k}, stages={cfg.stages} "
                f"(limit {SMEM_BYTES}); use a smaller block_k or fewer stages")
    if cfg.smem_a and smem_a_bytes(M, K, cfg) > SMEM_BYTES:
        return (f"smem_a keeps x's whole K slice in shared memory: {smem_a_bytes(M, K, cfg)} bytes "
                f"at M={M}, K={K}, split_k={cfg.split_k} (limit {SMEM_BYTES}); use a larger "
                "split_k or the default kernel")
    return None


SMEM_BYTES = 227 * 1024  # shared memory per CTA on Hopper (sm_90)


def plain_smem_bytes(M: int, cfg: MgpuConfig) -> int:
    """Shared memory of the plain kernel (the w4a16 bound: 2-byte x): the TMA ring of x
    [block_k, Mp] and int4 weight [tile_n, block_k] tiles, and the f32 output tile (Mosaic
    adds a few barriers: 344,080 bytes measured for 344,064 here at Mp 256, block_k 256)."""
    Mp = cfg.rows_per_cta(padded_rows(M))
    return (cfg.stages * (cfg.block_k * Mp * 2 + cfg.tile_n * cfg.block_k // 2)
            + cfg.tile_n * Mp * 4)


def smem_a_bytes(M: int, K: int, cfg: MgpuConfig) -> int:
    """Shared memory of the smem_a kernel (the w4a16 bound: 2-byte x and unpacked tiles): x's
    K slice, two unpacked weight tiles, the int4 weight ring and the f32 output tile."""
    Mp = padded_rows(M)
    return (Mp * (K // cfg.split_k) * 2 + 2 * cfg.tile_n * cfg.block_k * 2
            + cfg.stages * cfg.tile_n * cfg.block_k // 2 + cfg.tile_n * Mp * 4)


def pdl_smem_bytes(M: int, K: int, cfg: MgpuConfig) -> int:
    """Shared memory of the pdl="prefetch" kernel (the w4a16 bound: 2-byte x): x's K slice, the
    int4 weight ring and the f32 output tile."""
    Mp = padded_rows(M)
    return (Mp * (K // cfg.split_k) * 2 + cfg.stages * cfg.tile_n * cfg.block_k // 2
            + cfg.tile_n * Mp * 4)


def out_mn_epilogue(part, scales, sx, M: int, dtype):
    """The out_mn layout's epilogue: split-K partial sums [split_k, Mp, N] (f32; int32 of the
    int8 GEMM, exact) added in split order, times the per-channel scales [N] (and the int8
    GEMM's per-token scales sx [M], its result rounded to bf16 first), -> [M, N] in dtype.
    Adds of slices, not a reduce, so XLA fuses it into the consumer as elementwise work; the
    fused residual + RMSNorm kernel (pallas_kernels.residual_norm) computes it the same way."""
    acc = functools.reduce(operator.add, [part[i] for i in range(part.shape[0])])
    y = acc[:M].astype(jnp.float32) * scales[None, :]
    if sx is not None:
        return (y * sx[:, None]).astype(jnp.bfloat16).astype(dtype)
    return y.astype(dtype)


def w4_mgpu_matmul(x, w_nk, scales, sx=None, *, config: MgpuConfig | None = None,
                   partials: bool = False):
    """x [M, K] (bf16; int8 with sx [M] f32 for w4a8; 1 <= M <= MAX_M), w_nk int4 [N, K], scales
    f32 [N] -> [M, N] (x's dtype; bf16 for w4a8).

    partials=True (an out_mn config only, else ValueError): the kernel's split-K partial sums
    [split_k, Mp, N] before the epilogue (out_mn_epilogue turns them into the result), for a
    consumer that applies the epilogue itself (pallas_kernels.residual_norm)."""
    if plgpu is None:
        raise RuntimeError("jax.experimental.pallas.mosaic_gpu is not available in this jax")
    M, K = x.shape
    N = w_nk.shape[0]
    if w_nk.dtype != jnp.int4:
        raise ValueError(f"w4_mgpu_matmul: the weight must be int4 [N, K] (got {w_nk.dtype}); "
                         "convert the model's int8 [K/2, N] with nk_from_half_split")
    if w_nk.shape[1] != K or scales.shape != (N,):
        raise ValueError(f"w4_mgpu_matmul: x {x.shape}, w_nk {w_nk.shape} (want [N, {K}]), "
                         f"scales {scales.shape} (want [{N}]) do not fit")
    int8 = sx is not None
    cfg = config or default_config(M, K, N, int8)
    if int8 and cfg.load_layout == "upcast":  # int4 -> int8 needs the 8-bit wgmma layout
        cfg = dataclasses.replace(cfg, load_layout="wgmma")
    err = check(M, K, N, cfg)
    if err:
        raise ValueError(f"w4_mgpu_matmul: {err}")
    Mp = padded_rows(M)
    xp = x.astype(jnp.int8 if int8 else jnp.bfloat16)
    if X_PAD not in X_PADS:
        raise ValueError(f"w4_mgpu.X_PAD={X_PAD!r}: one of {X_PADS}")
    # TMA zero-fills a box past the array only when the array is smaller than one tile (M < 8);
    # M = 11 (tile 8, padded to 16) still needs the pad.
    if Mp != M and not (X_PAD == "tma" and cfg.plain and M < 8):
        xp = jnp.pad(xp, ((0, Mp - M), (0, 0)))
    if partials and not cfg.out_mn:
        raise ValueError("w4_mgpu_matmul: partials=True needs an out_mn config (partial sums "
                         "stored [split_k, Mp, N])")
    part = _kernel(cfg, Mp, K, N, int8)(xp, w_nk)
    if partials:
        return part
    if cfg.out_mn:  # [split_k, Mp, N]: adds of slices, not a reduce, so the epilogue stays elementwise
        return out_mn_epilogue(part, scales, sx, M, jnp.bfloat16 if int8 else x.dtype)
    y = part.sum(0).astype(jnp.float32) * scales[:, None]
    y = y.T[:M]
    if int8:
        return (y * sx[:, None]).astype(jnp.bfloat16)
    return y.astype(x.dtype)


@functools.lru_cache(maxsize=None)
def _kernel(cfg: MgpuConfig, Mp: int, K: int, N: int, int8: bool):
    """The jitted Mosaic GPU kernel [Mp, K] x int4 [N, K] -> split-K partials [split_k, N, Mp].

    One jitted function per shape and config, so every call site of a program with the same
    shapes lowers to one shared function (the 8B decode step has 128 GEMM call sites but four
    shapes: lowering each separately took 35 s on the H200, experiments/results/mgpu_compile_h200.md).
    """
    cdt = jnp.int8 if int8 else jnp.bfloat16
    acc_dt = jnp.int32 if int8 else jnp.float32
    k_iters = K // cfg.block_k // cfg.split_k
    n_tiles = N // cfg.tile_n
    Mt = cfg.rows_per_cta(Mp)  # x's rows per CTA (plain kernel); Mp // Mt CTAs along M
    if cfg.load_layout == "upcast":
        load_layout = plgpu.Layout.WGMMA_UPCAST_2X if int8 else plgpu.Layout.WGMMA_UPCAST_4X
    else:
        load_layout = plgpu.Layout.WGMMA_8BIT if int8 else plgpu.Layout.WGMMA
    mma_layout = plgpu.Layout.WGMMA_8BIT if int8 else plgpu.Layout.WGMMA

    def unpacked(w_ref):  # the int4 tile in registers, in the MMA's layout and operand dtype
        w = plgpu.load(w_ref, (), layout=load_layout)
        if load_layout != mma_layout:
            w = plgpu.layout_cast(w, mma_layout)
        return w.astype(cdt)

    def x_spec(index_map, rows=Mp):  # [rows, block_k] tiles of x; index_map: step -> block index
        return plgpu.BlockSpec((rows, cfg.block_k), index_map,
                               transforms=_transforms(cfg.block_k, cdt, "rhs"))

    def w_spec_at(index_map):  # [tile_n, block_k] int4 weight tiles
        return plgpu.BlockSpec((cfg.tile_n, cfg.block_k), index_map,
                               transforms=_transforms(cfg.block_k, jnp.int4, "lhs"))

    def w_spec(ni, si):  # the weight tiles of this CTA's column tile and K split
        return w_spec_at(lambda k: (ni, si * k_iters + k))

    def write_partials(acc_scope, o_gmem, o_smem, ni, si, mi=None, rows=Mp):
        """Run the K loop (acc_scope) into a [tile_n, rows] accumulator and store it as this
        CTA's tile of the partial sums (rows of x from mi * rows when mi is given)."""
        acc = pl.run_scoped(acc_scope, plgpu.ACC((cfg.tile_n, rows), acc_dt))
        cols = pl.ds(ni * cfg.tile_n, cfg.tile_n)
        xrows = slice(None) if mi is None else pl.ds(mi * rows, rows)
        if cfg.out_mn:  # o_smem [rows, tile_n]: store the [tile_n, rows] accumulator transposed
            # (the ref's own transpose: jax 0.11's plgpu.transpose_ref rejects a scratch ref)
            o_smem.transpose((1, 0))[...] = plgpu.layout_cast(
                acc, plgpu.Layout.WGMMA_TRANSPOSED)
            dst = o_gmem.at[si, xrows, cols]
        else:
            o_smem[...] = acc
            dst = o_gmem.at[si, cols, xrows]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, dst)
        plgpu.wait_smem_to_gmem(0)

    def kernel(x_gmem, w_gmem, o_gmem, o_smem):
        ni = lax.axis_index("n")
        si = lax.axis_index("s")
        mi = lax.axis_index("m") if Mt != Mp else None

        def acc_scope(acc_ref):
            def body(_, x_smem, w_smem):
                if cfg.probe == "read":  # the pipeline alone: tiles land, nothing reads them
                    return
                plgpu.wgmma(acc_ref, unpacked(w_smem), plgpu.transpose_ref(x_smem, (1, 0)))
                # Synchronous: leaving one wgmma in flight (wgmma_wait(1), the x slot released a
                # step later) gave wrong results on the H200 (probe_mgpu_h200.md): the register
                # operand is not kept live across the asynchronous MMA.
                plgpu.wgmma_wait(0)

            if cfg.pdl == "wait":  # everything below may read the previous kernel's output
                plgpu.griddepcontrol_wait()
            plgpu.emit_pipeline(body, grid=(k_iters,), in_specs=in_specs(ni, si, mi),
                                max_concurrent_steps=cfg.stages)(x_gmem, w_gmem)
            if cfg.pdl:
                plgpu.griddepcontrol_launch_dependents()
            return acc_ref[...]

        write_partials(acc_scope, o_gmem, o_smem, ni, si, mi, Mt)

    def in_specs(ni, si, mi=None):  # x^T and weight tiles of this CTA's column tile, K split
        # and (mi: split over CTAs, Mt rows each) rows of x
        rows, mb = (Mp, 0) if mi is None else (Mt, mi)
        return [x_spec(lambda k: (mb, si * k_iters + k), rows), w_spec(ni, si)]
    half = cfg.tile_n // 2

    def kernel_ws(x_gmem, w_gmem, o_gmem, o_smem):
        ni = lax.axis_index("n")
        si = lax.axis_index("s")

        def compute_context(eval_pipeline):
            def acc_scope(acc_ref):
                eval_pipeline(acc_ref)
                wg = lax.axis_index("wg")
                o_smem.at[wg][...] = acc_ref[...]
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(
                    o_smem.at[wg], o_gmem.at[si, pl.ds(ni * cfg.tile_n + wg * half, half)])
                plgpu.wait_smem_to_gmem(0)
            pl.run_scoped(acc_scope, plgpu.ACC((half, Mp), acc_dt))

        def body(_, x_smem, w_smem, acc_ref):
            wg = lax.axis_index("wg")
            plgpu.wgmma(acc_ref, unpacked(w_smem.at[pl.ds(wg * half, half)]),
                        plgpu.transpose_ref(x_smem, (1, 0)))
            plgpu.wgmma_wait(0)
            return acc_ref

        plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_iters,), memory_registers=40, in_specs=in_specs(ni, si),
            wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=cfg.stages,
            compute_context=compute_context)(x_gmem, w_gmem)

    k_split = K // cfg.split_k

    def load_x_slice(x_gmem, x_smem, x_bar, si):
        """This CTA's x slice [Mp, K / split_k], once, as k_iters [Mp, block_k] tiles (rows of
        an unpadded x past M: zeros from the TMA)."""
        for k in range(k_iters):
            plgpu.copy_gmem_to_smem(
                x_gmem.at[pl.ds(0, Mp), pl.ds(si * k_split + k * cfg.block_k, cfg.block_k)],
                x_smem.at[k], x_bar)
        plgpu.barrier_wait(x_bar)

    def kernel_smem_a(x_gmem, w_gmem, o_gmem, x_smem, a_smem, x_bar, o_smem):
        ni = lax.axis_index("n")
        si = lax.axis_index("s")
        load_x_slice(x_gmem, x_smem, x_bar, si)

        def acc_scope(acc_ref):
            def body(idx, w_smem):
                k = idx[0]
                slot = a_smem.at[k % 2]
                # the MMA two steps back read this slot; wgmma_wait(1) below has retired it
                slot[...] = unpacked(w_smem)
                plgpu.commit_smem()
                plgpu.wgmma(acc_ref, slot, plgpu.transpose_ref(x_smem.at[k], (1, 0)))
                plgpu.wgmma_wait(1)  # keep this MMA in flight; the previous one is done

            plgpu.emit_pipeline(body, grid=(k_iters,), max_concurrent_steps=cfg.stages,
                                in_specs=[w_spec(ni, si)])(w_gmem)
            plgpu.wgmma_wait(0)
            return acc_ref[...]

        write_partials(acc_scope, o_gmem, o_smem, ni, si)

    def kernel_pdl(x_gmem, w_gmem, o_gmem, x_smem, x_bar, o_smem):
        ni = lax.axis_index("n")
        si = lax.axis_index("s")

        def acc_scope(acc_ref):
            def body(idx, w_smem):
                k = idx[0]

                @pl.when(k == 0)
                def _():  # the weight ring's first loads are in flight; x is the last kernel's
                    plgpu.griddepcontrol_wait()
                    load_x_slice(x_gmem, x_smem, x_bar, si)

                plgpu.wgmma(acc_ref, unpacked(w_smem), plgpu.transpose_ref(x_smem.at[k], (1, 0)))
                plgpu.wgmma_wait(0)

            plgpu.emit_pipeline(body, grid=(k_iters,), max_concurrent_steps=cfg.stages,
                                in_specs=[w_spec(ni, si)])(w_gmem)
            plgpu.griddepcontrol_launch_dependents()
            return acc_ref[...]

        write_partials(acc_scope, o_gmem, o_smem, ni, si)

    upc = cfg.units_per_cta

    def kernel_persistent(x_gmem, w_gmem, o_gmem, o_smem):
        c = lax.axis_index("c")

        def unit(t):  # (column tile, K split) of this CTA's flat step t; K step t % k_iters
            u = c * upc + t // k_iters
            return u % n_tiles, u // n_tiles

        def w_map(t):
            ni, si = unit(t)
            return ni, si * k_iters + t % k_iters

        specs = [x_spec(lambda t: (0, w_map(t)[1])), w_spec_at(w_map)]

        def acc_scope(acc_ref):
            def body(idx, x_smem, w_smem):
                t = idx[0]
                plgpu.wgmma(acc_ref, unpacked(w_smem), plgpu.transpose_ref(x_smem, (1, 0)))
                plgpu.wgmma_wait(0)
                acc = acc_ref[...]
                last = t % k_iters == k_iters - 1

                @pl.when(last)
                def _store():  # this unit's partial sums; the previous unit's store is long done
                    ni, si = unit(t)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    o_smem[...] = acc
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[si, pl.ds(ni * cfg.tile_n, cfg.tile_n)])

                # the next unit starts from zero (a multiply keeps the accumulator out of the branch)
                acc_ref[...] = acc * (1 - last.astype(acc_dt))

            plgpu.emit_pipeline(body, grid=(upc * k_iters,), in_specs=specs,
                                max_concurrent_steps=cfg.stages)(x_gmem, w_gmem)
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(acc_scope, plgpu.ACC((cfg.tile_n, Mp), acc_dt))

    params = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)
    if upc > 1:
        f = plgpu.kernel(
            kernel_persistent, out_type=jax.ShapeDtypeStruct((cfg.split_k, N, Mp), acc_dt),
            grid=(n_tiles * cfg.split_k // upc,), grid_names=("c",),
            scratch_types=dict(o_smem=plgpu.SMEM((cfg.tile_n, Mp), acc_dt)),
            compiler_params=params)
    elif cfg.smem_a:
        f = plgpu.kernel(
            kernel_smem_a, out_type=jax.ShapeDtypeStruct((cfg.split_k, N, Mp), acc_dt),
            grid=(n_tiles, cfg.split_k), grid_names=("n", "s"),
            scratch_types=dict(
                x_smem=plgpu.SMEM((k_iters, Mp, cfg.block_k), cdt,
                                  transforms=_transforms(cfg.block_k, cdt, "rhs")),
                a_smem=plgpu.SMEM((2, cfg.tile_n, cfg.block_k), cdt,
                                  transforms=_transforms(cfg.block_k, cdt, "lhs")),
                x_bar=plgpu.Barrier(num_arrivals=k_iters),
                o_smem=plgpu.SMEM((cfg.tile_n, Mp), acc_dt)),
            compiler_params=params)
    elif cfg.pdl == "prefetch":
        tile, out = ((Mp, cfg.tile_n), (Mp, N)) if cfg.out_mn else ((cfg.tile_n, Mp), (N, Mp))
        f = plgpu.kernel(
            kernel_pdl, out_type=jax.ShapeDtypeStruct((cfg.split_k, *out), acc_dt),
            grid=(n_tiles, cfg.split_k), grid_names=("n", "s"),
            scratch_types=dict(
                x_smem=plgpu.SMEM((k_iters, Mp, cfg.block_k), cdt,
                                  transforms=_transforms(cfg.block_k, cdt, "rhs")),
                x_bar=plgpu.Barrier(num_arrivals=k_iters),
                o_smem=plgpu.SMEM(tile, acc_dt)),
            compiler_params=params)
    elif cfg.warp_specialized:
        f = plgpu.kernel(
            kernel_ws, out_type=jax.ShapeDtypeStruct((cfg.split_k, N, Mp), acc_dt),
            grid=(n_tiles, cfg.split_k), grid_names=("n", "s"), num_threads=3, thread_name="wg",
            scratch_types=dict(o_smem=plgpu.SMEM((2, half, Mp), acc_dt)), compiler_params=params)
    else:  # partials [split_k, Mp, N] with out_mn, else [split_k, N, Mp]; o_smem: one tile
        tile, out = ((Mt, cfg.tile_n), (Mp, N)) if cfg.out_mn else ((cfg.tile_n, Mt), (N, Mp))
        grid, names = (n_tiles, cfg.split_k), ("n", "s")
        if Mt != Mp:
            grid, names = grid + (Mp // Mt,), names + ("m",)
        f = plgpu.kernel(
            kernel, out_type=jax.ShapeDtypeStruct((cfg.split_k, *out), acc_dt),
            grid=grid, grid_names=names,
            scratch_types=dict(o_smem=plgpu.SMEM(tile, acc_dt)), compiler_params=params)
    return jax.jit(f)
