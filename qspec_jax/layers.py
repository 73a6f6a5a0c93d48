"""Building blocks: the one quantizable linear layer, RMSNorm, embedding, rotary embedding.

Every dense layer of the model is a ``QLinear``. Its parameters are either a 16-bit
``kernel`` [in, out] or the 4-bit store ``qweight`` [in/2, out] + ``scales`` [in/G, out]
(docs/DESIGN.md); the execution ``mode`` is a static argument of each call, so draft and verify
passes are two traces over the same parameter bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from . import quant
from .config import QuantConfig, RopeConfig

log = logging.getLogger("qspec_jax")

KERNEL_BACKENDS = ("auto", "pallas", "xla")

# Active calibration captures: each maps id(QLinear) -> its input, for GPTQ's Hessians.
_CAPTURES: list[dict] = []


@contextlib.contextmanager
def capture_linear_inputs():
    """Record the input of every QLinear called inside the block (works under tracing too)."""
    captured: dict = {}
    _CAPTURES.append(captured)
    try:
        yield captured
    finally:
        _CAPTURES.pop()


@dataclasses.dataclass(frozen=True)
class QuantizedInput:
    """A linear layer input already quantized per token (draft modes w4a8 / w4a4, e.g. by the
    fused RMSNorm + quantization kernel): xq int8 [..., K], sx f32 [..., 1]; ``dtype`` is the
    activation dtype the layer's output takes."""

    xq: jax.Array
    sx: jax.Array
    dtype: Any

    @property
    def shape(self):
        return self.xq.shape


@dataclasses.dataclass(frozen=True)
class NormedInput:
    """RMSNorm(x) * gain kept factored, for the quantized layers that read it in verify mode
    (quant.NORM_SCALE_FOLD): ``x`` [..., K] is the residual stream times the gain (or itself where
    a rotation folded the gains into the weights), ``r`` f32 [..., 1] the norm's per-row factor
    rsqrt(mean(x^2) + eps). A w4a16 layer multiplies its output rows by r; any other use takes
    ``materialize()``."""

    x: jax.Array
    r: jax.Array

    @property
    def shape(self):
        return self.x.shape

    @property
    def dtype(self):
        return self.x.dtype

    def materialize(self) -> jax.Array:
        return (self.x.astype(jnp.float32) * self.r).astype(self.x.dtype)


def _init(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


@dataclasses.dataclass(frozen=True)
class GemmPartials:
    """A quantized layer's output before its GEMM's epilogue: the Mosaic kernel's split-K
    partial sums part [S, Mp, N] (f32; int32 with the per-token scales sx [M] of an int8 GEMM)
    and the per-channel scales [N], for a consumer that applies the epilogue itself (the fused
    residual + RMSNorm kernel, kernel_dispatch.residual_norm). ``lead`` is the output's leading
    shape, ``dtype`` its dtype; ``finish()`` is the output exactly as the layer returns it."""

    part: jax.Array
    scales: jax.Array
    sx: jax.Array | None
    lead: tuple
    dtype: Any

    def finish(self) -> jax.Array:
        from pallas_kernels.w4_mgpu import out_mn_epilogue
        y = out_mn_epilogue(self.part, self.scales, self.sx, math.prod(self.lead), self.dtype)
        return y.reshape(*self.lead, y.shape[-1])


def finished(y) -> jax.Array:
    """A layer output as an array (GemmPartials finished)."""
    return y.finish() if isinstance(y, GemmPartials) else y


class QLinear(nnx.Module):
    """y = x @ W (+ b) with W stored 16-bit or as 4-bit weights; see ``quant`` for the modes."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, qcfg: QuantConfig | None,
                 dtype, rngs: nnx.Rngs):
        self.in_features, self.out_features = in_features, out_features
        if qcfg is not None and qcfg.quantized:
            group = qcfg.group_size or in_features
            if in_features % 2 or in_features % group:
                raise ValueError(
                    f"cannot quantize a linear layer with {in_features} inputs in groups of {group}: "
                    f"the input size must be even and divisible by the group size")
            self.qweight = nnx.Param(jnp.zeros((in_features // 2, out_features), jnp.int8))
            self.scales = nnx.Param(jnp.ones((in_features // group, out_features), jnp.float32))
        else:
            self.kernel = nnx.Param(_init(rngs, (in_features, out_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

    @property
    def is_quantized(self) -> bool:
        return hasattr(self, "qweight")

    def __call__(self, x, mode: str, kernels: str = "xla", defer: bool = False):
        """x [..., K] in the compute dtype, a QuantizedInput (draft modes) or a NormedInput
        (RMSNorm kept factored: w4a16 scales its output rows, other modes materialize it) ->
        [..., N].

        defer=True: where the GEMM runs the Mosaic kernel (and the layer has no bias), its
        GemmPartials instead (the caller applies the epilogue, e.g. fused with the residual add
        and the next RMSNorm); anywhere else the output as usual."""
        defer = defer and self.bias is None
        for captured in _CAPTURES:
            captured[id(self)] = x.materialize() if isinstance(x, NormedInput) else x
        row_scale = None
        if isinstance(x, NormedInput):  # verify mode: the norm's factor scales the output rows
            if mode == "w4a16" and self.is_quantized:
                x, row_scale, defer = x.x, x.r, False
            else:
                x = x.materialize()
        if isinstance(x, QuantizedInput):
            if mode not in ("w4a8", "w4a4") or not self.is_quantized:
                raise ValueError(f"a pre-quantized input needs a quantized layer in mode w4a8 or "
                                 f"w4a4, got mode {mode!r}"
                                 + ("" if self.is_quantized else " on 16-bit weights"))
            y = prequantized_matmul(x, self.qweight[...], self.scales[...], kernels, defer)
        elif mode == "w16":
            if self.is_quantized:
                raise ValueError("mode 'w16' needs 16-bit weights but this model is quantized; "
                                 f"use one of {', '.join(quant.QUANT_MODES)}")
            y = jnp.dot(x, self.kernel[...].astype(x.dtype), preferred_element_type=jnp.float32)
            y = y.astype(x.dtype)
        else:
            quant.check_mode(mode)
            if not self.is_quantized:
                raise ValueError(f"mode {mode!r} needs a quantized model; load it with quant='w4' "
                                 "(or convert with --quant w4), or use mode='w16'")
            y = quantized_matmul(x, self.qweight[...], self.scales[...], mode, kernels, defer)
            if row_scale is not None:
                y = (y.astype(jnp.float32) * row_scale).astype(y.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


def _with_lead(y, lead):
    if isinstance(y, GemmPartials):
        return dataclasses.replace(y, lead=tuple(lead))
    return y.reshape(*lead, y.shape[-1])


def prequantized_matmul(x: QuantizedInput, qweight, scales, kernels: str, defer: bool = False):
    """A draft-mode GEMM on already quantized activations: the Pallas int8 kernel or the XLA
    reference (same dispatch rules as quantized_matmul; ``defer`` as in QLinear)."""
    if kernels not in KERNEL_BACKENDS:
        raise ValueError(f"unknown kernels={kernels!r}; choose one of {', '.join(KERNEL_BACKENDS)}")
    lead = x.xq.shape[:-1]
    xq2, sx2 = x.xq.reshape(-1, x.xq.shape[-1]), x.sx.reshape(-1, 1)
    y = None
    if kernels != "xla":
        from . import kernel_dispatch
        y = kernel_dispatch.prequantized_matmul(xq2, sx2, qweight, scales, x.dtype,
                                                required=kernels == "pallas", partials=defer)
    if y is None:
        y = quant.prequantized_matmul_reference(xq2, sx2, qweight, scales, x.dtype)
    return _with_lead(y, lead)


def quantized_matmul(x, qweight, scales, mode: str, kernels: str, defer: bool = False):
    """Route one quantized GEMM to the Pallas kernels or the XLA reference path (``defer`` as
    in QLinear)."""
    if kernels not in KERNEL_BACKENDS:
        raise ValueError(f"unknown kernels={kernels!r}; choose one of {', '.join(KERNEL_BACKENDS)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    y = None
    if kernels != "xla":
        from . import kernel_dispatch
        y = kernel_dispatch.quantized_matmul(x2, qweight, scales, mode, required=kernels == "pallas",
                                             partials=defer)
    if y is None:
        y = quant.quantized_matmul_reference(x2, qweight, scales, mode, out_dtype=x.dtype)
    return _with_lead(y, lead)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        # As HF: normalize in f32, cast back, then multiply by the gain in the input dtype.
        xf = x.astype(jnp.float32) * quant.rms_factor(x, self.eps)
        return self.scale[...].astype(x.dtype) * xf.astype(x.dtype)


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(_init(rngs, (vocab, dim), dtype))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied lm_head: logits = x @ E^T, f32 accumulation."""
        return jnp.einsum("...d,vd->...v", x, self.embedding[...].astype(x.dtype),
                          preferred_element_type=jnp.float32)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> jax.Array:
    """Inverse frequencies [head_dim/2], with HF's 'linear' and 'llama3' scaling rules."""
    inv = 1.0 / (rope.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if rope.rope_type == "linear":
        return inv / rope.factor
    if rope.rope_type == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * jnp.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x [B, T, heads, hd], positions [B, T] -> rotated x (HF 'rotate_half' convention)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, hd/2]
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
