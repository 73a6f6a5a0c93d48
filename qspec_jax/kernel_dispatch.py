"""Choose, per quantized GEMM and per attention call, between Pallas kernels and XLA.

``kernels="auto"`` uses the Pallas GEMM kernels on a GPU and the XLA reference elsewhere,
and the Pallas attention kernel on a GPU at every batch (``ATTN_MIN_BATCH = 1``): end to end
it made 8B-shaped decode steps faster at batch 1 and 4 (2.456 vs 2.644 ms, 2.492 vs 2.714 ms at a
256-position cache; experiments/results/b1kern_h200_1d0946d.md), at 8k / 32k contexts
(1.08-2.48x, longctx_h200_smallbatch.md) and in the kernel benchmark from batch 8 (1.2-2.2x,
attention_h200.md), where XLA's attention in the model also copies each layer's cache slice.
``ATTN_MIN_BATCH`` (with ``ATTN_LONG_CACHE``: the cache length from which any batch takes it) stays
as a knob: below it, short caches use XLA's attention (logged once). Windowed drafts always take
the kernel (XLA's masked attention reads the whole cache). ``kernels="pallas"`` insists on the
kernels everywhere (on CPU they run in the Pallas interpreter: slow, for tests). Every
fallback is logged once per reason, never silently.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from . import quant

log = logging.getLogger("qspec_jax")
_ANNOUNCED: set = set()

# Modes with a Pallas kernel; w4a8_fp8 has none (it runs on XLA's bf16 GEMM).
PALLAS_MODES = ("w4a16", "w4a8", "w4a4")
# kernels="auto": smallest batch for the Pallas attention kernel (measured, see the docstring;
# 8 until a2e4e28).
ATTN_MIN_BATCH = 1
# ... and from this many cache positions at any batch (measured, see the docstring).
ATTN_LONG_CACHE = 8192
def log_once(key, message: str, level=logging.INFO) -> None:
    """Log ``message`` the first time ``key`` is seen in this process."""
    if key not in _ANNOUNCED:
        _ANNOUNCED.add(key)
        log.log(level, message)


def _gemm_interpret(M, K, qweight, scales, mode: str, required: bool):
    """Whether the Pallas GEMM runs for this call: None (no: use the XLA reference; the reason
    is logged once), else its interpret flag (True on CPU, where only kernels="pallas" runs it)."""
    import pallas_kernels as pk
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not required:
        log_once("cpu", f"qspec_jax: no GPU ({jax.default_backend()}): quantized GEMMs use the XLA "
                         "reference path")
        return None
    if mode not in PALLAS_MODES:
        log_once(("mode", mode), f"qspec_jax: no Pallas kernel for mode {mode!r}: using the XLA "
                                  "reference path for it", logging.WARNING)
        return None
    N = qweight.shape[1]
    group = K // scales.shape[0]
    ok, reason = pk.supported(M, K, N, group)
    if not ok:
        log_once(("shape", K, N, group), f"qspec_jax: Pallas GEMM cannot take K={K} N={N} "
                  f"G={group} ({reason}): using the XLA reference path for this layer",
                  logging.WARNING)
        return None
    interpret = not on_gpu
    log_once(("pallas", interpret), "qspec_jax: quantized GEMMs use the Pallas kernels"
              + (" (interpret mode: no GPU)" if interpret else ""))
    return interpret


# Draft modes: the int8 GEMM quantizes its float input as it loads it (w4a8_matmul(bits=...))
# instead of an XLA kernel writing the int8 copy first. Off: measured slower on the H200
# (kernels_h200_actquant.md: the kernel 2.4-3.4x slower, every N tile re-quantizing x with an
# f32 division per element; gamma-3 QSpec at batch 4 698 vs 1187 tok/s, actquant_h200.md).
ACT_QUANT_IN_GEMM = False


# weight_layout="nk" (int4 [N, K]): how many rows of x a GEMM may have to run the Mosaic GPU
# swap-AB kernel (w4_mgpu; it takes up to w4_mgpu.MAX_M = 256), per mode and width, from the
# H200's per-layer times with each M's default config:
# - M <= 64, every mode and 8B shape: faster than XLA's GEMM over the int4 weight (w4a16
#   1.0-1.9x, w4a8 1.6-3.0x, mgpu_h200_m64.md) and our Triton kernels; M <= 16 1.27-1.30x Triton
#   per layer (mgpu_h200.md), XLA's GEMM ~2x slower at M = 1.
# - M 128 / 256, draft modes (int8 wgmma): 1.2-2.5x faster than XLA's GEMM at all four 8B shapes
#   (w4a8 per layer 89.5 vs 188.4 us at M = 128, 218.4 vs 310.2 at 256: mgpum256_h200_255f41e.md).
# - M 128 / 256, w4a16: faster for the narrow shapes (qkv, o_proj, down_proj: 77 vs 96 us at
#   M = 128, 130 vs 172 at 256) and slower for gate/up (N = 28672: 81.5 vs 58.7 us at 128,
#   143.7 vs 105.7 at 256), so w4a16 GEMMs wider than MGPU_W4A16_WIDE_N columns stop at
#   MGPU_W4A16_WIDE_MAX_M rows. (All GEMMs up to 256, end to end: batch-256 AR 12.33 vs 12.22 ms,
#   the gate/up loss; a batch-256 gamma-1 cycle 26.4 vs 28.5 ms, the draft's gain.)
# - Llama-70B shapes, w4a16 (defaults70b_h200_74ec0d1.md): gate/up (N = 57344) like the 8B one
#   (Mosaic 149.6 vs 176.3 us at 64 rows, 242.8 vs 210.3 at 128, 423.1 vs 417.4 at 256); qkv (N =
#   10240) faster at 128 (59.1 vs 77.2 us) and slower at 256 (107.3 vs 85.2); o_proj / down_proj
#   (N = 8192) faster at every M. So GEMMs between MGPU_W4A16_MID_N and MGPU_W4A16_WIDE_N columns
#   stop at MGPU_W4A16_MID_MAX_M rows (the boundary at 12288: no shape measured between 10240 and
#   28672; Llama-3.2-1B / 3B gate/up, 16384, keep the 64-row limit).
MGPU_MODE_MAX_M = {"w4a16": 256, "w4a8": 256, "w4a4": 256}
MGPU_W4A16_WIDE_N = 12288
MGPU_W4A16_WIDE_MAX_M = 64
MGPU_W4A16_MID_N = 8192
MGPU_W4A16_MID_MAX_M = 128
# A uniform limit that replaces the table above when set (sweep.py --mgpu-max-m: experiments).
MGPU_MAX_M: int | None = None


def mgpu_max_m(mode: str, N: int) -> int:
    """The most rows of x a GEMM of mode ``mode`` with N output columns runs on the Mosaic
    kernel (MGPU_MAX_M if set, else the measured table above)."""
    if MGPU_MAX_M is not None:
        return MGPU_MAX_M
    if mode == "w4a16" and N > MGPU_W4A16_WIDE_N:
        return MGPU_W4A16_WIDE_MAX_M
    if mode == "w4a16" and N > MGPU_W4A16_MID_N:
        return MGPU_W4A16_MID_MAX_M
    return MGPU_MODE_MAX_M[mode]


def mgpu_unavailable() -> str | None:
    """Why the Mosaic GPU kernel (pallas_kernels.w4_mgpu: wgmma + TMA, sm_90) cannot run on this
    machine, or None if it can."""
    from pallas_kernels import w4_mgpu
    if jax.default_backend() != "gpu":
        return f"it needs a GPU ({jax.default_backend()} here, no interpret mode)"
    if w4_mgpu.plgpu is None:
        return "this jax has no Pallas Mosaic GPU"
    cc = getattr(jax.devices()[0], "compute_capability", None)  # CUDA: "major.minor"
    if cc is None:
        return "it needs a Hopper GPU (sm_90) and this GPU reports no CUDA compute capability"
    if str(cc).split(".")[0] != "9":  # wgmma and this kernel's TMA use are sm_90 only
        return f"it needs a Hopper GPU (sm_90; this one is sm_{str(cc).replace('.', '')})"
    return _mgpu_lowering_error()


@functools.lru_cache(maxsize=None)
def _mgpu_lowering_error() -> str | None:
    """Lower a small instance of the kernel once per process (no compile, ~0.2 s): a jax whose
    Mosaic GPU API differs from the one the kernel was written for fails here, with its message,
    instead of deep inside a model's trace."""
    from pallas_kernels import w4_mgpu

    def error():
        try:
            avals = (jax.ShapeDtypeStruct((8, 512), jnp.bfloat16),
                     jax.ShapeDtypeStruct((64, 512), jnp.int4), jax.ShapeDtypeStruct((64,), jnp.float32))
            jax.jit(w4_mgpu.w4_mgpu_matmul).trace(*avals).lower(lowering_platforms=("cuda",))
        except Exception as e:  # noqa: BLE001 - any failure means: do not use the kernel
            return f"this jax ({jax.__version__}) cannot lower it: {type(e).__name__}: {str(e)[:300]}"
        return None

    why = error()
    if why and w4_mgpu.OUT_MN:  # the transposed store alone may be what this jax rejects
        w4_mgpu.OUT_MN = False
        if error() is None:
            log_once(("out-mn-off",), "qspec_jax: the Mosaic GPU kernel's transposed partial-sum "
                     f"store (w4_mgpu.OUT_MN) cannot lower here ({why}); its GEMMs store "
                     "[split, N, M] and transpose instead", logging.WARNING)
            return None
        w4_mgpu.OUT_MN = True
    return why


def _mgpu_runs(M, K, N, scales, mode: str, required: bool) -> bool:
    """Whether the Mosaic GPU kernel takes this GEMM of an int4 [N, K] weight (else XLA, the
    reason logged once)."""
    from pallas_kernels import w4_mgpu
    why_not = mgpu_unavailable()
    if why_not:
        cpu = jax.default_backend() != "gpu"
        level = logging.WARNING if required or not cpu else logging.INFO
        log_once(("nk-unavailable",), "qspec_jax: int4 [N, K] weights (weight_layout='nk'): the "
                  f"Mosaic GPU kernel cannot run: {why_not}; quantized GEMMs use the XLA "
                  "reference path", level)
        return False
    if mode not in PALLAS_MODES:
        log_once(("mode", mode), f"qspec_jax: no Pallas kernel for mode {mode!r}: using the XLA "
                                  "reference path for it", logging.WARNING)
        return False
    if scales.shape[0] != 1:
        log_once(("nk-group", K, N), "qspec_jax: the Mosaic GPU kernel takes per-channel scales "
                  f"only (this layer has groups of {K // scales.shape[0]}): XLA for it", logging.WARNING)
        return False
    max_m = mgpu_max_m(mode, N)
    if M > max_m:
        log_once(("nk-bigm", mode, max_m), f"qspec_jax: int4 [N, K] weights: {mode} GEMMs of "
                  f"more than {max_m} rows (kernel_dispatch.mgpu_max_m; e.g. N = {N}) use XLA's GEMM")
        return False
    err = w4_mgpu.check(M, K, N, w4_mgpu.default_config(M, K, N, mode in quant.ACTIVATION_BITS))
    if err:
        log_once(("nk-shape", K, N), f"qspec_jax: the Mosaic GPU kernel cannot take K={K} N={N} "
                  f"({err}): XLA for this layer", logging.WARNING)
        return False
    if w4_mgpu.PDL and not w4_mgpu.pdl_launch_supported():
        log_once(("pdl-unsupported",), "qspec_jax: w4_mgpu.PDL is set, but this jax "
                  f"({jax.__version__}) launches Mosaic GPU kernels without programmatic dependent "
                  "launch: the pdl GEMMs run as ordinary launches", logging.WARNING)
    log_once(("nk-mgpu",), "qspec_jax: quantized GEMMs of few rows use the Mosaic GPU kernel "
              "(int4 [N, K] weights; the limits per mode and width: kernel_dispatch.mgpu_max_m"
              + (f"; x of <= {w4_mgpu.PDL_MAX_ROWS} rows: pdl={w4_mgpu.PDL!r}" if w4_mgpu.PDL else "")
              + ")")
    return True


def _mgpu_gemm(x2, qweight, scales, sx, out_dtype, partials: bool):
    """The Mosaic GEMM's [M, N] output, or (partials, where the model-wide out_mn layout gives
    them) its GemmPartials for the caller to finish."""
    from pallas_kernels import w4_mgpu
    sx = None if sx is None else sx.reshape(-1)
    if partials and w4_mgpu.OUT_MN:
        from .layers import GemmPartials
        part = w4_mgpu.w4_mgpu_matmul(x2, qweight, scales[0], sx, partials=True)
        return GemmPartials(part, scales[0], sx, (x2.shape[0],), out_dtype)
    return w4_mgpu.w4_mgpu_matmul(x2, qweight, scales[0], sx).astype(out_dtype)


def quantized_matmul(x2, qweight, scales, mode: str, *, required: bool, partials: bool = False):
    """x2 [M, K] -> [M, N] via a Pallas kernel, or None to use the XLA reference path.
    partials=True: where the Mosaic kernel runs, its GemmPartials (layers.QLinear, defer)."""
    import pallas_kernels as pk
    if quant.weight_layout(qweight) == "nk":
        M, K = x2.shape
        if not _mgpu_runs(M, K, qweight.shape[0], scales, mode, required):
            return None
        if mode == "w4a16":
            return _mgpu_gemm(x2, qweight, scales, None, x2.dtype, partials)
        xq, sx = quant.quantize_activations(x2, quant.ACTIVATION_BITS[mode])
        return _mgpu_gemm(xq, qweight, scales, sx, x2.dtype, partials)
    interpret = _gemm_interpret(*x2.shape, qweight, scales, mode, required)
    if interpret is None:
        return None
    if mode == "w4a16":
        return pk.w4a16_matmul(x2, qweight, scales, interpret=interpret)
    bits = quant.ACTIVATION_BITS[mode]
    if ACT_QUANT_IN_GEMM:
        # The kernel quantizes x as it loads it (same per-token scales as the XLA path's).
        sx = quant.activation_scales(x2, bits)
        return pk.w4a8_matmul(x2, sx, qweight, scales, out_dtype=x2.dtype, interpret=interpret,
                              bits=bits)
    xq, sx = quant.quantize_activations(x2, bits)
    return pk.w4a8_matmul(xq, sx, qweight, scales, out_dtype=x2.dtype, interpret=interpret)


def prequantized_matmul(xq2, sx2, qweight, scales, out_dtype, *, required: bool,
                        partials: bool = False):
    """xq2 int8 [M, K] with per-token scales sx2 [M, 1] -> [M, N] in out_dtype via the Pallas
    int8 GEMM (w4a8 and w4a4 share it), or None to use the XLA reference path (partials as in
    quantized_matmul)."""
    import pallas_kernels as pk
    if quant.weight_layout(qweight) == "nk":
        M, K = xq2.shape
        if not _mgpu_runs(M, K, qweight.shape[0], scales, "w4a8", required):
            return None
        return _mgpu_gemm(xq2, qweight, scales, sx2, out_dtype, partials)
    interpret = _gemm_interpret(*xq2.shape, qweight, scales, "w4a8", required)
    if interpret is None:
        return None
    return pk.w4a8_matmul(xq2, sx2, qweight, scales, out_dtype=out_dtype, interpret=interpret)


# kernels="auto": the fused RMSNorm + quantization kernel (and row_quant for the o_proj and
# down_proj inputs) replace XLA's fusions of the same math only once the H200 has measured them
# faster (experiments/bench_fused.py, device stage normquant). Its first version
# lost (fused_h200.md at 440d085: 23 us against 3-4 us; gamma-3 QSpec 0.71x / 0.60x at batch
# 4 / 16, normquant_h200_kernel.md). The row-at-once version (fused_h200_0413cf4.md): 2.2-2.5
# us of device time against XLA's 2.8-4.2 us for "rmsnorm" and "none" at M <= 64, but 17.7 us
# against 4-6 us for "swiglu" (one program per row walks 14336 columns); gamma 3 at batch 4
# with all three kinds 0.95x of the XLA path (normquant_h200_0413cf4_kernel.md). "rmsnorm" and
# "none" alone are not yet timed end to end (sweep.py --norm-quant-kernel rmsnorm,none).
# The kinds in use under "auto": "rmsnorm" (qkv / gate_up inputs), "none" (o_proj's input),
# "swiglu" (down_proj's input from [gate | up]); each joins once it measures faster.
FUSED_QUANT_KINDS = ("rmsnorm", "none", "swiglu")
NORM_QUANT_AUTO: frozenset = frozenset()


_FUSED_QUANT_WHAT = {"rmsnorm": "RMSNorm", "none": "o_proj input", "swiglu": "SwiGLU"}


def _fused_quant_interpret(kernels: str, D: int, kind: str):
    """Whether a fused quantization kernel (rmsnorm_quant / row_quant, ``kind`` one of
    FUSED_QUANT_KINDS) runs: None (no: XLA computes it, the reason logged once) or its
    interpret flag."""
    what = _FUSED_QUANT_WHAT[kind]
    if kernels == "xla":
        return None
    on_gpu = jax.default_backend() == "gpu"
    if kernels == "auto" and not (on_gpu and kind in NORM_QUANT_AUTO):
        if on_gpu:
            log_once(("norm-quant-xla",), "qspec_jax: draft-mode activation quantization runs in "
                      "XLA (the fused kernels are used under kernels='auto' once measured faster)")
        return None
    from pallas_kernels import rmsnorm_quant as rq
    if D % rq.CHUNK:
        log_once(("norm-quant-shape", what, D), f"qspec_jax: the fused {what} + quantization kernel "
                  f"cannot take width {D} (not a multiple of {rq.CHUNK}): using XLA",
                  logging.WARNING)
        return None
    interpret = not on_gpu
    log_once(("norm-quant", what, interpret), f"qspec_jax: draft-mode {what} + quantization use "
              "the fused Pallas kernel" + (" (interpret mode: no GPU)" if interpret else ""))
    return interpret


def rmsnorm_quant(x, gain, eps: float, bits: int, kernels: str):
    """(xq int8 [..., D], sx f32 [..., 1]) of the model's RMSNorm(x) quantized per token (a
    draft mode's next layers), via the fused Pallas kernel, or None: XLA computes the norm and
    each layer quantizes it."""
    D = x.shape[-1]
    interpret = _fused_quant_interpret(kernels, D, "rmsnorm")
    if interpret is None:
        return None
    from pallas_kernels import rmsnorm_quant as rq
    xq, sx = rq.rmsnorm_quant(x.reshape(-1, D), gain, eps, bits, interpret=interpret)
    return xq.reshape(x.shape), sx.reshape(*x.shape[:-1], 1)


def row_quant(x, bits: int, kernels: str, prologue: str = "none"):
    """(xq, sx) of x quantized per token ("none": o_proj's input), or of silu(gate) * up for
    x = [gate | up] ("swiglu": down_proj's input from the fused gate_up output), via one Pallas
    kernel, or None: XLA computes it (same gating as rmsnorm_quant)."""
    W = x.shape[-1]
    D = W // 2 if prologue == "swiglu" else W
    interpret = _fused_quant_interpret(kernels, D, prologue)
    if interpret is None:
        return None
    from pallas_kernels import rmsnorm_quant as rq
    xq, sx = rq.row_quant(x.reshape(-1, W), bits, prologue, interpret=interpret)
    return xq.reshape(*x.shape[:-1], D), sx.reshape(*x.shape[:-1], 1)


# The junction after o_proj / down_proj (GEMM epilogue + residual add + the next RMSNorm, and in
# the draft modes the per-token quantization of that norm for the next GEMMs) as one Pallas
# kernel (pallas_kernels.residual_norm) instead of XLA's three (draft: five) kernels (batch-1 8B
# step: 64 junctions, hlo_summary_b1_xpad_7e1796b.md). kernels="pallas" runs it (interpret mode on
# CPU); under "auto" on the GPU only with RESIDUAL_NORM on, until the H200 measures it faster
# (sweep.py --residual-norm on, device stage resnorm). Decode shapes only (M <= MAX_M rows;
# prefill keeps XLA's fusions). Read at trace time. Measured on the H200 (255f41e): 2-3% slower
# per 8B step at batch 1 / 16 (resnorm_h200_255f41e.md; its one-program-per-row grid at 4 warps
# is latency-bound: 3.8-5.4 us per call). Warps per program (RESIDUAL_NORM_WARPS, sweep.py
# --residual-norm-warps) at c477f3c: 8 warps ties XLA at batch 1 (2.345 vs 2.343 ms, two runs
# each) and is 0.3-1.0% slower at batch 16; 4 warps is the slowest (resnorm2_h200_c477f3c.md).
# Off; 8 warps when on.
RESIDUAL_NORM = False
RESIDUAL_NORM_MAX_M = 64
RESIDUAL_NORM_WARPS = 8


def residual_norm_runs(kernels: str, mode: str, M: int, D: int):
    """Whether the fused residual + RMSNorm kernel takes a junction of M rows of width D: None
    (no: the model adds and normalizes through XLA) or its interpret flag."""
    if kernels == "xla" or M > RESIDUAL_NORM_MAX_M:
        return None
    on_gpu = jax.default_backend() == "gpu"
    if kernels == "auto" and not (on_gpu and RESIDUAL_NORM):
        return None
    from pallas_kernels import rmsnorm_quant as rq
    if D % rq.CHUNK:
        log_once(("resnorm-shape", D), "qspec_jax: the fused residual + RMSNorm kernel cannot "
                 f"take hidden size {D} (not a multiple of {rq.CHUNK}): using XLA", logging.WARNING)
        return None
    interpret = not on_gpu
    log_once(("resnorm", interpret), "qspec_jax: residual add + RMSNorm after o_proj / down_proj "
             "use the fused Pallas kernel" + (" (interpret mode: no GPU)" if interpret else ""))
    return interpret


def residual_norm(x, h, gain, eps: float, interpret: bool, bits: int | None = None):
    """(x + h, RMSNorm(x + h)) for x [..., D] and a layer output h (an array or GemmPartials)
    in one Pallas kernel (residual_norm_runs said it runs); with ``bits`` (a draft mode) the
    norm per-token quantized instead: (x + h, xq int8 [..., D], sx f32 [..., 1])."""
    from pallas_kernels.residual_norm import residual_norm as kernel

    from .layers import GemmPartials
    D = x.shape[-1]
    x2 = x.reshape(-1, D)
    kw = dict(bits=bits, interpret=interpret, num_warps=RESIDUAL_NORM_WARPS)
    if isinstance(h, GemmPartials):
        out = kernel(x2, h.part, h.scales, gain, eps, h.sx, **kw)
    else:
        out = kernel(x2, h.reshape(1, -1, D), None, gain, eps, **kw)
    return tuple(o.reshape(*x.shape[:-1], o.shape[-1]) for o in out)


def attention_with_block(q, cache_k, cache_v, k_blk, v_blk, start, layer: int, kernels: str,
                         blk_ok=None, window=None, q_pos=None):
    """The read-only forwards' attention (gamma="auto") with the Pallas kernel, or None for
    the XLA path (qspec_jax.model.attention_with_block_parts: the same two parts, merged by
    the same model.merge_block).

    The kernel attends over the cache keys s < start[b] (cache_k/v as in ``attention``: the
    whole cache, layer ``layer`` read in place, nothing written) and returns its rows' log-sum-exp;
    the block keys (k_blk, v_blk [B, KVH, U, hd], visible per ``blk_ok`` [B or 1, T, U],
    default U = T causal) are a T x U attention in XLA; the two softmax parts are merged
    exactly by their log-sum-exps. ``window=(sink, recent)`` with the queries' positions
    ``q_pos`` [B, T]: windowed over the cache too (the kernel reads only the sink and recent
    blocks below start, anchored at each query's own position; ``blk_ok`` must already carry
    the window for the block's keys, as the model's read-only forward builds it)."""
    B, T = q.shape[:2]
    kv_len = None
    if window is None:
        q_pos = jnp.broadcast_to((start.astype(jnp.int32) - 1)[:, None], (B, T))
    elif q_pos is None:
        raise ValueError("attention_with_block: a window needs the queries' positions q_pos")
    else:  # keys below start, windowed around each query's position
        kv_len = start.astype(jnp.int32)
    # The same dispatch decisions (and log lines) as the cache-writing forward.
    res = attention(q, cache_k, cache_v, q_pos, layer, kernels, window, return_lse=True,
                    kv_len=kv_len)
    if res is None:
        return None
    out_c, lse_c = res                                        # [B, T, H, hd] f32, [B, T, H]
    from .model import merge_block
    return merge_block(q, out_c, lse_c, k_blk, v_blk, blk_ok)


def attention(q, cache_k, cache_v, positions, layer: int, kernels: str, window=None,
              return_lse: bool = False, kv_len=None):
    """Causal attention over the cache via the Pallas kernel, or None for the XLA reference.

    q [B, T, H, hd]; cache_k/v the whole [L, B, KVH, S, hd] cache, or cache_k the model's
    stacked [L, 2, B, KVH, S, hd] cache and cache_v None (the kernel reads layer ``layer`` in
    place, so XLA copies nothing); positions [B, T]; ``window=(sink, recent)``
    (static): windowed draft attention, the kernel loads only the sink and recent key blocks;
    kv_len [B] (optional): keys at and past it are masked too (the window stays anchored at
    the positions).
    """
    if kernels == "xla":
        return None
    if kernels == "auto":
        if jax.default_backend() != "gpu":
            return None  # the GEMM dispatch already said that there is no GPU
        if q.shape[0] < ATTN_MIN_BATCH and window is None and cache_k.shape[-2] < ATTN_LONG_CACHE:
            # (Windowed drafts always take the kernel: XLA's masked attention reads the whole
            # cache, which defeats the window; bench_longctx measured the draft at batch 4 x 32k
            # costing as much as a full-cache one through XLA.)
            log_once(("attn-small-batch",), f"qspec_jax: batch < {ATTN_MIN_BATCH} and cache < "
                      f"{ATTN_LONG_CACHE} positions: attention uses XLA (faster than the Pallas "
                      "kernel there on the H200; kernels='pallas' forces the kernel)")
            return None
    from pallas_kernels import attention as pk_attention
    kshape = pk_attention.keys_shape(cache_k, cache_v)[1:]  # [B, KVH, S, hd]
    if window is not None:
        window = (int(window[0]), int(window[1]))  # hashable and static for the kernel's jit
    ok, reason = pk_attention.supported(q.shape, kshape, q.dtype, window)
    if not ok:
        log_once(("attn", q.shape[1:], kshape, window), f"qspec_jax: Pallas attention "
                  f"cannot take q {q.shape} / cache {kshape} / window {window} "
                  f"({reason}): using XLA attention", logging.WARNING)
        return None
    interpret = jax.default_backend() != "gpu"
    log_once(("attn-pallas", interpret), "qspec_jax: attention uses the Pallas kernel"
              + (" (interpret mode: no GPU)" if interpret else ""))
    return pk_attention.cached_attention(q, cache_k, cache_v, positions, kv_len, layer=layer,
                                         interpret=interpret, window=window,
                                         return_lse=return_lse)
