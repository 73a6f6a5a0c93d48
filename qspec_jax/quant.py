"""The one 4-bit weight store and the plain-XLA math of every execution mode.

Weight layout (the contract of docs/DESIGN.md, owned by this module)
--------------------------------------------------------------------
A linear layer's weight is [K, N] = (in, out). It is stored as

- ``qweight``: int8 [K // 2, N]: signed int4 values q[k, n] in [-8, 7], two per byte, split in
  halves along K: byte ``qweight[i, n]`` holds ``q[i, n]`` in its low nibble and
  ``q[i + K // 2, n]`` in its high nibble (two's complement nibbles). A [bk, N] tile of qweight
  thus unpacks to the rows [i0, i0 + bk) and [K/2 + i0, K/2 + i0 + bk) with no interleaving.
- ``scales``: float32 [K // G, N], one scale per group of G input rows and output column
  (per output channel: G = K, shape [1, N]).

Dequantized weight: ``w[k, n] = q[k, n] * scales[k // G, n]``. K must be even and G must divide K.
The scale of an all-zero group is 1.0 (q = 0), never 0, NaN or inf.

Run-time alternative (never written to disk): ``qweight`` as XLA's packed ``int4`` [N, K], the
same values transposed (K contiguous), for the Mosaic GPU kernels (``weight_layout="nk"``,
``to_weight_layout``). The dtype tells the layouts apart; every function here takes both.

Execution modes (a static argument of every model call)
-------------------------------------------------------
- ``w16``: unquantized weights (unquantized models only).
- ``w4a16`` (verify): ``y = sum_g (x_g @ q_g) * s[g]``, x in its compute dtype, f32 accumulation.
- ``w4a8`` (draft): per-token ``sx = max|x| / 127``, ``xq = clip(round(x / sx), -127, 127)``,
  ``acc_g = int32 sum xq_g * q_g``, ``y = sx * sum_g s[g] * acc_g``.
- ``w4a4``: as w4a8 with ``sx = max|x| / 7`` and xq in [-8, 7].
- ``w4a8_fp8``: ``sx = max|x| / 448``, ``xq = float8_e4m3fn(x / sx)``, products in f32.

Everything here is pure jnp and jittable; it is the "xla" reference path the model uses
wherever no faster kernel is plugged in.
"""

import jax.numpy as jnp
from jax import lax

MODES = ("w16", "w4a16", "w4a8", "w4a4", "w4a8_fp8")
QUANT_MODES = MODES[1:]  # the modes that run on quantized weights
ACTIVATION_BITS = {"w4a8": 8, "w4a4": 4}  # the draft modes' per-token activation bits

INT4_MIN, INT4_MAX = -8, 7
FP8_E4M3_MAX = 448.0
_ACT_RANGE = {8: (-127, 127), 4: (INT4_MIN, INT4_MAX)}  # bits -> (qmin, qmax)


def check_mode(mode):
    """Return ``mode`` if it is a known execution mode, else fail listing the valid ones."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    return mode


# ----------------------------------------------------------------------------- packing


def check_even_k(k):
    """Fail clearly unless K can be split into two nibble halves."""
    if k % 2:
        raise ValueError(f"int4 packing needs an even input size K, got K={k}")


def pack_int4(q):
    """int8 [K, N] with values in [-8, 7] -> int8 [K // 2, N] in the half-split layout."""
    q = jnp.asarray(q, jnp.int8)
    check_even_k(q.shape[0])
    half = q.shape[0] // 2
    low = jnp.bitwise_and(q[:half], 0x0F)  # [K/2, N], nibble bits only
    high = jnp.left_shift(q[half:], 4)  # [K/2, N], wraps into the high nibble
    return jnp.bitwise_or(low, high).astype(jnp.int8)


WEIGHT_LAYOUTS = ("half_split", "nk")


def weight_layout(qweight) -> str:
    """"nk" for an int4 [N, K] qweight, "half_split" for the stored int8 [K // 2, N]."""
    return "nk" if qweight.dtype == jnp.int4 else "half_split"


def weight_shape(qweight) -> tuple[int, int]:
    """(K, N) of a qweight in either layout."""
    if weight_layout(qweight) == "nk":
        return qweight.shape[1], qweight.shape[0]
    return 2 * qweight.shape[0], qweight.shape[1]


def to_weight_layout(qweight, layout: str):
    """qweight in either layout -> the same values in ``layout`` (WEIGHT_LAYOUTS)."""
    if layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"unknown weight layout {layout!r}; choose one of {', '.join(WEIGHT_LAYOUTS)}")
    if weight_layout(qweight) == layout:
        return qweight
    if layout == "nk":
        return unpack_int4(qweight).T.astype(jnp.int4)
    return pack_int4(qweight.T.astype(jnp.int8))


def unpack_int4(packed):
    """int8 [K // 2, N] in the half-split layout (or int4 [N, K]) -> int8 [K, N] with values in
    [-8, 7]."""
    if packed.dtype == jnp.int4:
        return packed.T.astype(jnp.int8)
    packed = jnp.asarray(packed, jnp.int8)
    # Arithmetic right shifts of int8 sign-extend each nibble.
    low = jnp.right_shift(jnp.left_shift(packed, 4), 4)
    high = jnp.right_shift(packed, 4)
    return jnp.concatenate([low, high], axis=0)


# ----------------------------------------------------------------------------- weights


def resolve_group_size(k, group_size):
    """Resolve ``group_size`` (None = per output channel) and check that it divides K."""
    if group_size is None:
        return k
    g = int(group_size)
    if g <= 0 or k % g:
        raise ValueError(
            f"group_size G={group_size} does not divide the input size K={k}; "
            f"use a G that divides K (e.g. 128 when 128 divides K) or group_size=None "
            f"for one scale per output channel")
    return g


def weight_scales(w, group_size=None, clip_ratio=1.0):
    """Symmetric int4 scales of w [K, N]: max|w| / 7 per group of rows and column, times
    ``clip_ratio`` (a scalar or an array broadcastable to [K // G, N]); 1.0 for zero groups.
    Returns float32 [K // G, N]."""
    w = jnp.asarray(w, jnp.float32)
    k, n = w.shape
    g = resolve_group_size(k, group_size)
    amax = jnp.max(jnp.abs(w.reshape(k // g, g, n)), axis=1)  # [K/G, N]
    scales = amax * jnp.asarray(clip_ratio, jnp.float32) / INT4_MAX
    return jnp.where(scales > 0, scales, 1.0)


def quantize_with_scales(w, scales):
    """int4 values (int8 [K, N]) of w [K, N] for given scales [K // G, N]: round to nearest
    and clip to [-8, 7] (values beyond a clipped scale saturate)."""
    w = jnp.asarray(w, jnp.float32)
    k, n = w.shape
    ng = scales.shape[0]
    wg = w.reshape(ng, k // ng, n)  # [K/G, G, N]
    q = jnp.clip(jnp.round(wg / scales[:, None, :]), INT4_MIN, INT4_MAX)
    return q.reshape(k, n).astype(jnp.int8)


def quantize_weight_rtn(w, group_size=None, clip_ratio=1.0):
    """Round-to-nearest int4 quantization of w [K, N] -> (qweight int8 [K//2, N], scales f32
    [K//G, N])."""
    check_even_k(w.shape[0])
    scales = weight_scales(w, group_size, clip_ratio)
    return pack_int4(quantize_with_scales(w, scales)), scales


def dequantize_weight(qweight, scales, dtype=jnp.float32):
    """qweight int8 [K//2, N], scales [K//G, N] -> w [K, N] in ``dtype`` (math in f32)."""
    q = unpack_int4(qweight).astype(jnp.float32)
    k, n = q.shape
    ng = scales.shape[0]
    w = q.reshape(ng, k // ng, n) * jnp.asarray(scales, jnp.float32)[:, None, :]  # [K/G, G, N]
    return w.reshape(k, n).astype(dtype)


# ----------------------------------------------------------------------------- activations


def _token_scale(x, qmax):
    """Per-token scale max|x| / qmax over the last axis, 1.0 for an all-zero row: f32 [..., 1]."""
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    return jnp.where(amax > 0, amax / qmax, 1.0)


def activation_scales(x, bits):
    """The per-token scales quantize_activations uses: f32 [..., 1]."""
    if bits not in _ACT_RANGE:
        raise ValueError(f"activation bits must be one of {sorted(_ACT_RANGE)}, got {bits}")
    return _token_scale(jnp.asarray(x, jnp.float32), _ACT_RANGE[bits][1])


def quantize_activations(x, bits):
    """Per-token symmetric quantization of x [..., K] to ``bits`` in {8, 4}.

    Returns (xq int8 [..., K], sx f32 [..., 1]): 8 bits use sx = max|x| / 127 and clip to
    [-127, 127]; 4 bits use sx = max|x| / 7 and clip to the int4 range [-8, 7]."""
    sx = activation_scales(x, bits)
    qmin, qmax = _ACT_RANGE[bits]
    xq = jnp.clip(jnp.round(jnp.asarray(x, jnp.float32) / sx), qmin, qmax).astype(jnp.int8)
    return xq, sx


# Draft modes, XLA path: quantize RMSNorm(x) without materializing it (rmsnorm_quantize).
# Off until measured faster on the GPU (sweep.py --norm-quant-fold, device stage "normfold").
NORM_QUANT_FOLD = False


# Verify mode (w4a16), every path: the GEMMs that read an RMSNorm (qkv, gate/up) take the
# residual stream itself (times the gains where a rotation has not folded them into the weights)
# and scale their output rows by the norm's factor rsqrt(mean(x^2) + eps) in the epilogue
# (layers.NormedInput): the norm's separate normalize kernel goes (2 per layer). Output rows
# scale exactly like input rows; only the bf16 rounding of the normalized input differs (it is
# not made). True / False: always / never; "auto" (the default): for inputs of at most
# NORM_SCALE_FOLD_MAX_ROWS rows. H200, fffd870 (normscale_h200_fffd870.md): Llama-3-8B batch 1
# w4a16 2.305 -> 2.257 ms per step (rotated: 2.623 -> 2.544), Llama-3.2-1B 0.757 -> 0.739; batch 16
# slower, 2.472 -> 2.527 ms (1B: 0.786 -> 0.800).
NORM_SCALE_FOLD = "auto"
NORM_SCALE_FOLD_MAX_ROWS = 1


def norm_scale_fold(rows: int) -> bool:
    """Whether verify mode folds the RMSNorm into the next GEMMs for an input of `rows` token rows
    (NORM_SCALE_FOLD: True, False or "auto")."""
    if NORM_SCALE_FOLD == "auto":
        return rows <= NORM_SCALE_FOLD_MAX_ROWS
    return bool(NORM_SCALE_FOLD)


def rms_factor(x, eps: float):
    """rsqrt(mean(x^2) + eps) over the last axis, f32 [..., 1]: RMSNorm's per-row factor."""
    xf = jnp.asarray(x, jnp.float32)
    return lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


def rmsnorm_quantize(x, gain, eps: float, bits: int):
    """Per-token quantization of RMSNorm(x) * gain (the draft modes' qkv / gate_up input) with
    the norm folded into the scale: its rsqrt(mean(x^2) + eps) is a positive factor per row, so
    xq = round(x g qmax / max|x g|) and sx = max|x g| rsqrt(mean(x^2) + eps) / qmax. The two
    row reductions both read x (siblings XLA can fuse into one kernel) and nothing but xq is
    written. Equal to quantize_activations(RMSNorm(x) * gain) up to the rounding of the
    normalized values (a code differs by at most 1 where that path rounds to bf16 first).
    Returns (xq int8 [..., K], sx f32 [..., 1])."""
    if bits not in _ACT_RANGE:
        raise ValueError(f"activation bits must be one of {sorted(_ACT_RANGE)}, got {bits}")
    qmin, qmax = _ACT_RANGE[bits]
    xf = jnp.asarray(x, jnp.float32)
    xg = xf * jnp.asarray(gain, jnp.float32)
    amax = jnp.max(jnp.abs(xg), axis=-1, keepdims=True)
    nonzero = amax > 0
    safe = jnp.where(nonzero, amax, 1.0)
    xq = jnp.clip(jnp.round(xg * (qmax / safe)), qmin, qmax).astype(jnp.int8)
    sx = jnp.where(nonzero, safe * rms_factor(xf, eps) / qmax, 1.0)
    return xq, sx


def quantize_activations_fp8(x):
    """Per-token e4m3 quantization of x [..., K]: (xq float8_e4m3fn [..., K], sx f32 [..., 1]).
    The clip keeps a division that rounds above 448 from turning into NaN (e4m3fn has no inf)."""
    x = jnp.asarray(x, jnp.float32)
    sx = _token_scale(x, FP8_E4M3_MAX)
    xq = jnp.clip(x / sx, -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(jnp.float8_e4m3fn)
    return xq, sx


# ----------------------------------------------------------------------------- matmul


def _grouped_dot(xg, q, acc_dtype, precision=None):
    """Per-group products: xg [M, ng, G] with q [K, N] -> [ng, M, N] in ``acc_dtype``."""
    ng, g = xg.shape[1], xg.shape[2]
    qg = q.reshape(ng, g, q.shape[1])  # [ng, G, N]
    # Contract G; batch over the group axis.
    return lax.dot_general(xg, qg, (((2,), (1,)), ((1,), (0,))),
                           precision=precision, preferred_element_type=acc_dtype)


def _scaled_sum(x2, q, scales, acc_dtype, precision=None):
    """sum_g s[g] * (x_g @ q_g) in f32 for x2 [M, K] (already in the product dtype): [M, N].

    Per output channel it is a single dot scaled afterwards, so XLA sees one plain GEMM."""
    m, k = x2.shape
    ng = scales.shape[0]
    if ng == 1:
        acc = lax.dot_general(x2, q, (((1,), (0,)), ((), ())),
                              precision=precision, preferred_element_type=acc_dtype)
        return acc.astype(jnp.float32) * scales[0]
    acc = _grouped_dot(x2.reshape(m, ng, k // ng), q, acc_dtype, precision)  # [ng, M, N]
    return jnp.sum(acc.astype(jnp.float32) * scales[:, None, :], axis=0)


def _int_matmul(xq, sx, q, scales):
    """w4a8 / w4a4 from quantized activations and unpacked int4 weights q [K, N]: f32 [M, N]."""
    return sx * _scaled_sum(xq, q, scales, jnp.int32)


def quantized_matmul_reference(x, qweight, scales, mode, out_dtype=None):
    """x [..., K] @ the quantized weight in execution ``mode`` (one of QUANT_MODES) -> [..., N].

    Plain jnp/XLA implementation of the mode math in the module docstring; the output dtype
    defaults to x.dtype."""
    check_mode(mode)
    if mode == "w16":
        raise ValueError(f"mode 'w16' needs unquantized weights; quantized weights run in "
                         f"one of {', '.join(QUANT_MODES)}")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    q = unpack_int4(qweight)  # [K, N]
    k, n = q.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight has K={k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)  # [M, K]
    scales = jnp.asarray(scales, jnp.float32)
    if mode == "w4a16":
        # f32 inputs must not be rounded to TF32 on GPU; bf16 products are exact in f32 anyway.
        precision = lax.Precision.HIGHEST if x2.dtype == jnp.float32 else None
        y = _scaled_sum(x2, q.astype(x2.dtype), scales, jnp.float32, precision)
    elif mode == "w4a8_fp8":
        xq, sx = quantize_activations_fp8(x2)
        # e4m3 and int4 values are exact in bf16, so bf16 products with f32 accumulation are
        # the exact f32 products while using bf16 tensor cores.
        y = sx * _scaled_sum(xq.astype(jnp.bfloat16), q.astype(jnp.bfloat16), scales,
                             jnp.float32)
    else:
        xq, sx = quantize_activations(x2, ACTIVATION_BITS[mode])
        y = _int_matmul(xq, sx, q, scales)
    return y.reshape(*lead, n).astype(out_dtype)


def prequantized_matmul_reference(xq, sx, qweight, scales, out_dtype):
    """The w4a8 / w4a4 math from already quantized activations: xq int8 [M, K], sx f32
    [M, 1] -> sx * sum_g s[g] * (int32 xq_g @ q_g), [M, N] in out_dtype."""
    q = unpack_int4(qweight)
    if xq.shape[-1] != q.shape[0]:
        raise ValueError(f"xq has {xq.shape[-1]} input features, the weight has K={q.shape[0]}")
    return _int_matmul(xq, sx, q, jnp.asarray(scales, jnp.float32)).astype(out_dtype)


# ----------------------------------------------------------------------------- param trees


def _is_linear(node):
    return isinstance(node, dict) and "kernel" in node


def _quantize_linear(lin, group_size):
    """{'kernel', 'bias'?} -> {'qweight', 'scales', 'bias'?}."""
    qweight, scales = quantize_weight_rtn(lin["kernel"], group_size)
    out = {"qweight": qweight, "scales": scales}
    if "bias" in lin:
        out["bias"] = lin["bias"]
    return out


def quantize_params(params, group_size=None, quantize_lm_head=False):
    """Round-to-nearest int4 quantization of every linear of a pure-dict parameter tree.

    Each ``{'kernel': [K, N], 'bias'?}`` becomes ``{'qweight', 'scales', 'bias'?}``; the
    embedding and norms are kept, and ``lm_head`` only becomes int4 if ``quantize_lm_head``.
    Returns a new tree (the input is not modified)."""
    def walk(node, key):
        if _is_linear(node):
            if key == "lm_head" and not quantize_lm_head:
                return node
            return _quantize_linear(node, group_size)
        if isinstance(node, dict):
            return {k: walk(v, k) for k, v in node.items()}
        return node

    return walk(params, None)


def is_quantized(params):
    """Whether any linear of a pure-dict parameter tree holds int4 weights."""
    if isinstance(params, dict):
        return "qweight" in params or any(is_quantized(v) for v in params.values())
    return False
