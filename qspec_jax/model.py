"""The Llama-family decoder (Llama 2/3/3.x, Qwen2/2.5, Mistral) as a Flax NNX module.

One forward serves every use: it appends T new tokens per sequence to a statically shaped KV
cache at per-sequence start positions and returns logits. T = prompt length for prefill (ragged
prompts right-padded), T = 1 for decoding, T = gamma + 1 for speculative verification. The
execution mode ("w16", "w4a16", "w4a8", ...) is a static argument that reaches every QLinear.

References: Touvron et al. 2023 (Llama), HF transformers' modeling_llama / modeling_qwen2.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from . import quant
from .config import ModelConfig, QuantConfig
from .layers import (Embed, NormedInput, QLinear, QuantizedInput, RMSNorm, apply_rope, finished,
                     rope_inv_freq)


# How a decode step (and a fixed-gamma draft or verify pass) writes its new K/V: "layer" (each
# layer's attention writes its own: two scatters per layer, 64 per 8B step) or "step" (a
# read-only forward, as gamma="auto" cycles run, then KVCache.write_blocks: two per step).
# generate() passes the value at call time (the jitted loops take it as a static argument).
CACHE_WRITES = ("layer", "step")
CACHE_WRITE = "layer"
# How the K/V of a batch-1 block reach the cache: "scatter" (the indexed update every batch
# uses: positions past the cache's end are dropped, which XLA:GPU implements by reading the old
# values back and selecting, two extra small kernels per layer, hlo_summary_b1_w4a16 at 49b8d02)
# or "slice" (batch 1 only: one lax.dynamic_update_slice per cache at the block's first
# position; the same values whenever the block lies inside the cache, as every block that
# generate() / speculative_generate() write does: api.cache_length sizes the cache for the prompt
# + new tokens + lookahead). Read at trace time: set it before the first call.
CACHE_UPDATES = ("scatter", "slice")
CACHE_UPDATE = "slice"


def _write_block(cache: jax.Array, upd: jax.Array, layer, positions: jax.Array) -> jax.Array:
    """cache [L, 2, B, KVH, S, hd] (K and V) with upd [B, T, 2, KVH, hd] (layer an int) or
    [B, T, L, 2, KVH, hd] (layer None: every layer) written at positions [B, T] (consecutive in
    each row): K and V in one update."""
    if CACHE_UPDATE not in CACHE_UPDATES:
        raise ValueError(f"qspec_jax.model.CACHE_UPDATE={CACHE_UPDATE!r}: one of "
                         f"{', '.join(map(repr, CACHE_UPDATES))}")
    upd = upd.astype(cache.dtype)
    B = upd.shape[0]
    if CACHE_UPDATE == "slice" and B == 1:
        zero = jnp.zeros((), jnp.int32)
        start = positions[0, 0].astype(jnp.int32)
        if layer is None:  # [1, T, L, 2, KVH, hd] -> [L, 2, 1, KVH, T, hd]
            return jax.lax.dynamic_update_slice(cache, jnp.transpose(upd, (2, 3, 0, 4, 1, 5)),
                                                (zero, zero, zero, zero, start, zero))
        blk = jnp.transpose(upd, (2, 0, 3, 1, 4))[None]  # [1, 2, 1, KVH, T, hd]
        return jax.lax.dynamic_update_slice(cache, blk,
                                            (jnp.int32(layer), zero, zero, zero, start, zero))
    b = jnp.arange(B)[:, None]
    if layer is None:
        return cache.at[:, :, b, :, positions, :].set(upd, mode="drop")
    return cache.at[layer, :, b, :, positions, :].set(upd, mode="drop")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer in one array: kv [layers, 2, batch, kv_heads, max_len,
    head_dim], K at [:, 0] and V at [:, 1], so that a step writes a layer's new K and V with one
    update (one kernel, not two, per layer) and the attention kernel reads both from it in place.

    Sequence lengths are kept by the caller (the decode loops decide how far each sequence
    advances, e.g. by its number of accepted speculative tokens).
    """

    kv: jax.Array

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, max_len: int, dtype) -> "KVCache":
        cfg.check_cache_len(max_len)
        shape = (cfg.num_hidden_layers, 2, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype))

    @classmethod
    def of(cls, k: jax.Array, v: jax.Array) -> "KVCache":
        """The cache holding keys k and values v, each [L, B, KVH, S, hd]."""
        if k.shape != v.shape or k.ndim != 5:
            raise ValueError(f"KVCache.of: k {k.shape} and v {v.shape} must both be "
                             "[layers, batch, kv_heads, max_len, head_dim]")
        return cls(jnp.stack([k, v], axis=1))

    @staticmethod
    def nbytes(cfg: ModelConfig, batch: int, max_len: int, dtype) -> int:
        """Bytes of K and V for ``batch`` sequences of ``max_len`` positions (what ``create``
        allocates)."""
        return (2 * cfg.num_hidden_layers * batch * cfg.kv_size * max_len
                * jnp.dtype(dtype).itemsize)

    @property
    def k(self) -> jax.Array:
        """Keys [L, B, KVH, S, hd] (a slice: reading it in XLA fuses, it is not kept)."""
        return self.kv[:, 0]

    @property
    def v(self) -> jax.Array:
        """Values [L, B, KVH, S, hd]."""
        return self.kv[:, 1]

    @property
    def dtype(self):
        return self.kv.dtype

    @property
    def max_len(self) -> int:
        return self.kv.shape[4]

    @property
    def batch(self) -> int:
        return self.kv.shape[2]

    def write_blocks(self, k_blk: jax.Array, v_blk: jax.Array, start: jax.Array) -> "KVCache":
        """Every layer's new K/V at once: blocks [L, B, KVH, T, hd] (a read-only forward's) go
        to positions start[b] + t; positions past the end are dropped, but for batch 1 under
        CACHE_UPDATE = "slice" (the default) the block must lie inside the cache. One update
        per step instead of one per layer (the cache-writing forward's)."""
        T = k_blk.shape[3]
        pos = start.astype(jnp.int32)[:, None] + jnp.arange(T, dtype=jnp.int32)[None]  # [B, T]
        # [L, 2, B, KVH, T, hd] -> [B, T, L, 2, KVH, hd], the indexed update's layout
        blk = jnp.transpose(jnp.stack([k_blk, v_blk], axis=1), (2, 4, 0, 1, 3, 5))
        return type(self)(_write_block(self.kv, blk, None, pos))


def einsum_f32(eq: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum with f32 accumulation. XLA:CPU has no batched bf16 x bf16 -> f32 dot, so on CPU
    the operands are upcast (exact); GPUs keep 16-bit operands on the tensor cores."""
    if jax.default_backend() == "cpu" and a.dtype != jnp.float32:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(eq, a, b, preferred_element_type=jnp.float32)


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
                        window: tuple[int, int] | None = None) -> jax.Array:
    """Causal attention of new queries over the whole cache.

    q [B, T, H, hd]; k, v [B, KVH, S, hd] (the new tokens already written); q_pos [B, T].
    Key s is visible to query t iff s <= q_pos[b, t]; with ``window = (sink, recent)`` also
    only if s < sink or q_pos[b, t] - s < recent (windowed draft attention). Softmax
    statistics in f32. Returns [B, T, H, hd].
    """
    B, T, H, hd = q.shape
    kvh = k.shape[1]
    qg = q.reshape(B, T, kvh, H // kvh, hd)
    scores = einsum_f32("btkgd,bksd->bkgts", qg, k)
    scores = scores / jnp.sqrt(jnp.float32(hd))
    key_pos = jnp.arange(k.shape[2])
    visible = key_pos[None, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if window is not None:
        sink, recent = window
        visible &= (key_pos[None, None, :] < sink) | (q_pos[:, :, None] - key_pos[None, None, :] < recent)
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = einsum_f32("bkgts,bksd->btkgd", probs.astype(v.dtype), v)
    return out.reshape(B, T, H, hd).astype(q.dtype)


def window_mask(q_pos: jax.Array, key_pos: jax.Array, window: tuple[int, int]) -> jax.Array:
    """bool [B, T, U]: key_pos [B, U] is inside the window (sink, recent) of q_pos [B, T]."""
    sink, recent = window
    return (key_pos[:, None, :] < sink) | (q_pos[:, :, None] - key_pos[:, None, :] < recent)


def block_mask(T: int, prefix: int = 0, n_prefix=None) -> jax.Array:
    """Which keys of a new-token block each of T queries sees: bool [B or 1, T, prefix + T].

    The block is ``prefix`` slots of earlier tokens (the first ``n_prefix`` [B] valid, the
    rest unused) followed by the T new tokens, causal among themselves."""
    u = jnp.arange(prefix + T)[None, None, :]
    t = jnp.arange(T)[None, :, None]
    new_ok = (u >= prefix) & (u - prefix <= t)
    if not prefix:
        return new_ok
    n = jnp.reshape(jnp.asarray(n_prefix, jnp.int32), (-1, 1, 1))
    return new_ok | (u < n)


def cache_visible(start: jax.Array, S: int, window: tuple[int, int] | None = None,
                  q_pos: jax.Array | None = None) -> jax.Array:
    """bool [B, 1 or T, S]: the cache keys a read-only pass sees, s < start[b]; with
    ``window=(sink, recent)`` also only those inside each query's window (q_pos [B, T])."""
    key = jnp.arange(S)
    ok = (key[None, :] < start[:, None])[:, None, :]                 # [B, 1, S]
    if window is not None:
        if q_pos is None:
            raise ValueError("attention_with_block: a window needs the queries' positions q_pos")
        ok = ok & window_mask(q_pos, jnp.broadcast_to(key, (start.shape[0], S)), window)
    return ok


def attention_with_block(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, k_new: jax.Array,
                         v_new: jax.Array, start: jax.Array, blk_ok: jax.Array | None = None,
                         window: tuple[int, int] | None = None, q_pos: jax.Array | None = None
                         ) -> jax.Array:
    """Causal attention of T new queries over a cache that is only read, plus a block of keys:
    one softmax over both, the plain reference the tests hold attention_with_block_parts (the
    model's XLA path) and the Pallas path to.

    q [B, T, H, hd]; k_cache, v_cache [B, KVH, S, hd] of which keys s < start[b] are visible
    (positions from start on hold stale entries); k_new, v_new [B, KVH, U, hd] the block's keys
    and values, visible per ``blk_ok`` bool [B or 1, T, U] (default: U = T new tokens, causal
    among themselves; see block_mask). With the default, the same set of keys as
    attention_reference after writing the new ones into the cache; f32 softmax.
    ``window=(sink, recent)`` with the queries' positions ``q_pos`` [B, T]: cache key s is
    visible only if also s < sink or q_pos - s < recent (the block's keys: apply the window
    to ``blk_ok``, see window_mask).
    """
    B, T, H, hd = q.shape
    kvh, S = k_cache.shape[1], k_cache.shape[2]
    blk_ok = block_mask(T) if blk_ok is None else blk_ok
    qg = q.reshape(B, T, kvh, H // kvh, hd)
    scale = 1 / jnp.sqrt(jnp.float32(hd))
    s_old = einsum_f32("btkgd,bksd->bkgts", qg, k_cache) * scale
    s_new = einsum_f32("btkgd,bkud->bkgtu", qg, k_new) * scale
    old_ok = cache_visible(start, S, window, q_pos)
    s_old = jnp.where(old_ok[:, None, None], s_old, -jnp.inf)
    s_new = jnp.where(blk_ok[:, None, None], s_new, -jnp.inf)
    probs = jax.nn.softmax(jnp.concatenate([s_old, s_new], axis=-1), axis=-1)
    p_old, p_new = probs[..., :S], probs[..., S:]
    out = (einsum_f32("bkgts,bksd->btkgd", p_old.astype(v_cache.dtype), v_cache)
           + einsum_f32("bkgtu,bkud->btkgd", p_new.astype(v_new.dtype), v_new))
    return out.reshape(B, T, H, hd).astype(q.dtype)


def cache_part(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, ok: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """Attention of q [B, T, H, hd] over the cache keys ``ok`` [B, T or 1, S] lets it see alone:
    (out [B, T, H, hd] f32, log-sum-exp [B, T, H]); rows that see no key get out 0, lse -inf."""
    B, T, H, hd = q.shape
    kvh = k_cache.shape[1]
    qg = q.reshape(B, T, kvh, H // kvh, hd)
    s = einsum_f32("btkgd,bksd->btkgs", qg, k_cache) / jnp.sqrt(jnp.float32(hd))
    s = jnp.where(ok[:, :, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)                                   # masked keys: exactly 0
    den = jnp.sum(p, axis=-1)                            # [B, T, KVH, G]
    out = einsum_f32("btkgs,bksd->btkgd", p.astype(v_cache.dtype), v_cache)
    out = out / jnp.where(den > 0, den, 1.0)[..., None]
    lse = jnp.where(den > 0, jnp.log(den) + m[..., 0], -jnp.inf)
    return out.reshape(B, T, H, hd), lse.reshape(B, T, H)


def merge_block(q: jax.Array, out_c: jax.Array, lse_c: jax.Array, k_blk: jax.Array,
                v_blk: jax.Array, blk_ok: jax.Array | None = None) -> jax.Array:
    """Causal attention of q [B, T, H, hd] over a cache part already computed (out_c
    [B, T, H, hd] f32 and its log-sum-exp lse_c [B, T, H], -inf where a row saw no cache key)
    and a block of keys k_blk, v_blk [B, KVH, U, hd] visible per ``blk_ok`` [B or 1, T, U]
    (default: U = T, causal, see block_mask; every row must see at least one block key): the
    block's T x U attention in f32, the two softmax parts merged exactly by their
    log-sum-exps. Returns q's dtype."""
    B, T, H, hd = q.shape
    KVH = k_blk.shape[1]
    qg = q.reshape(B, T, KVH, H // KVH, hd).astype(jnp.float32)
    s = jnp.einsum("btkgd,bkud->btkgu", qg, k_blk.astype(jnp.float32)) / jnp.sqrt(jnp.float32(hd))
    blk_ok = block_mask(T) if blk_ok is None else blk_ok
    s = jnp.where(blk_ok[:, :, None, None, :], s, -jnp.inf)
    lse_b = jax.nn.logsumexp(s, axis=-1)                       # [B, T, KVH, G]
    out_b = jnp.einsum("btkgu,bkud->btkgd", jnp.exp(s - lse_b[..., None]), v_blk.astype(jnp.float32))
    lse_b, out_b = lse_b.reshape(B, T, H), out_b.reshape(B, T, H, hd)
    m = jnp.maximum(lse_c, lse_b)
    w_c, w_b = jnp.exp(lse_c - m), jnp.exp(lse_b - m)
    out = (w_c[..., None] * out_c + w_b[..., None] * out_b) / (w_c + w_b)[..., None]
    return out.astype(q.dtype)


def attention_with_block_parts(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                               k_new: jax.Array, v_new: jax.Array, start: jax.Array,
                               blk_ok: jax.Array | None = None,
                               window: tuple[int, int] | None = None,
                               q_pos: jax.Array | None = None) -> jax.Array:
    """attention_with_block (same arguments, same keys) as two softmax parts merged by their
    log-sum-exps: the read-only forwards' XLA path. One softmax over the concatenated scores
    let XLA build a concatenate fusion that cost an 8B batch-1 step 32 x 10.5 us on the H200
    (experiments/results/cachewrite_h200.md); the parts are what the Pallas path computes too."""
    ok = cache_visible(start, k_cache.shape[2], window, q_pos)
    out_c, lse_c = cache_part(q, k_cache, v_cache, ok)
    return merge_block(q, out_c, lse_c, k_new, v_new, blk_ok)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, qcfg: QuantConfig, dtype, rngs: nnx.Rngs,
                 fused: bool = False):
        lin = dict(qcfg=qcfg, dtype=dtype, rngs=rngs)
        self.fused = fused
        if fused:  # one GEMM for q, k and v (columns [q | k | v]); see fuse_projections
            self.qkv_proj = QLinear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size,
                                    bias=cfg.qkv_bias, **lin)
        else:
            self.q_proj = QLinear(cfg.hidden_size, cfg.q_size, bias=cfg.qkv_bias, **lin)
            self.k_proj = QLinear(cfg.hidden_size, cfg.kv_size, bias=cfg.qkv_bias, **lin)
            self.v_proj = QLinear(cfg.hidden_size, cfg.kv_size, bias=cfg.qkv_bias, **lin)
        self.o_proj = QLinear(cfg.q_size, cfg.hidden_size, bias=False, **lin)
        self.heads, self.kv_heads, self.head_dim = (cfg.num_attention_heads, cfg.num_key_value_heads,
                                                    cfg.head_dim)
        self.rotate = qcfg.rotate
        # v_proj holds the per-head part of the online Hadamard (rotation.rotate_params): mix
        # heads only before o_proj.
        from .rotation import v_head_fold_ok
        self.rotate_heads_only = bool(qcfg.rotate and qcfg.rotate_v_heads
                                      and v_head_fold_ok(cfg.q_size, cfg.head_dim))

    def __call__(self, x, cache: KVCache, layer: int, positions, inv_freq, mode, kernels,
                 window=None, readonly=False, prefix=None, defer=False):
        """defer: o_proj may return GemmPartials (QLinear's defer)."""
        B, T, _ = x.shape
        if self.fused:
            qkv = self.qkv_proj(x, mode, kernels)
            nq, nkv = self.heads * self.head_dim, self.kv_heads * self.head_dim
            q, k, v = qkv[..., :nq], qkv[..., nq:nq + nkv], qkv[..., nq + nkv:]
        else:
            q, k, v = (p(x, mode, kernels) for p in (self.q_proj, self.k_proj, self.v_proj))
        q = q.reshape(B, T, self.heads, self.head_dim)
        k = k.reshape(B, T, self.kv_heads, self.head_dim)
        v = v.reshape(B, T, self.kv_heads, self.head_dim)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        if readonly:  # leave the cache alone; return this layer's new K/V block
            k_blk = jnp.swapaxes(k.astype(cache.dtype), 1, 2)  # [B, KVH, T, hd]
            v_blk = jnp.swapaxes(v.astype(cache.dtype), 1, 2)
            k_att, v_att, cache_len, blk_ok = k_blk, v_blk, positions[:, 0], None
            blk_pos = positions  # [B, U] positions of the block's keys
            if prefix is not None:  # earlier tokens of this cycle, kept outside the cache
                k_pre, v_pre, n_pre = prefix
                P = k_pre.shape[3]
                k_att = jnp.concatenate([k_pre[layer].astype(k_blk.dtype), k_blk], axis=2)
                v_att = jnp.concatenate([v_pre[layer].astype(v_blk.dtype), v_blk], axis=2)
                cache_len = positions[:, 0] - n_pre
                blk_ok = block_mask(T, P, n_pre)
                blk_pos = jnp.concatenate([cache_len[:, None] + jnp.arange(P)[None], positions], 1)
            if window is not None:  # windowed (draft) attention: the block's keys too
                blk_ok = (block_mask(T) if blk_ok is None else blk_ok) & window_mask(
                    positions, blk_pos, window)
            out = None
            if kernels != "xla":
                from .kernel_dispatch import attention_with_block as pallas_attention_with_block
                out = pallas_attention_with_block(q, cache.kv, None, k_att, v_att, cache_len,
                                                  layer, kernels, blk_ok, window, positions)
            if out is None:
                out = attention_with_block_parts(q, cache.kv[layer, 0].astype(q.dtype),
                                                 cache.kv[layer, 1].astype(q.dtype),
                                                 k_att.astype(q.dtype), v_att.astype(q.dtype),
                                                 cache_len, blk_ok, window, positions)
            return self._out(out, mode, kernels, defer), (k_blk, v_blk)
        kv = _write_block(cache.kv, jnp.stack([k, v], axis=2), layer, positions)  # one update
        out = None
        if kernels != "xla":
            from .kernel_dispatch import attention
            out = attention(q, kv, None, positions, layer, kernels, window)
        if out is None:
            out = attention_reference(q, kv[layer, 0].astype(q.dtype),
                                      kv[layer, 1].astype(q.dtype), positions, window)
        return self._out(out, mode, kernels, defer), KVCache(kv)

    def _out(self, out, mode, kernels, defer=False):
        B, T = out.shape[:2]
        out = out.reshape(B, T, self.heads * self.head_dim)
        if self.rotate_heads_only:
            from .rotation import online_hadamard_heads
            out = online_hadamard_heads(out, self.head_dim)
        elif self.rotate:
            from .rotation import online_hadamard
            out = online_hadamard(out)
        return self.o_proj(draft_quantized(out, self.o_proj, mode, kernels), mode, kernels, defer)


def draft_quantized(x, layer: QLinear, mode, kernels, prologue="none"):
    """A quantized layer's input in the draft modes as a QuantizedInput from the fused Pallas
    kernel (kernel_dispatch.row_quant: per-token quantization in one kernel, after the SwiGLU
    for prologue "swiglu"), where the dispatch picks it; otherwise x unchanged (the layer
    quantizes it through XLA)."""
    if mode not in ("w4a8", "w4a4") or not layer.is_quantized:
        return x
    from .kernel_dispatch import row_quant
    r = row_quant(x, quant.ACTIVATION_BITS[mode], kernels, prologue)
    return x if r is None else QuantizedInput(*r, x.dtype)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, qcfg: QuantConfig, dtype, rngs: nnx.Rngs,
                 fused: bool = False):
        lin = dict(bias=False, qcfg=qcfg, dtype=dtype, rngs=rngs)
        self.fused = fused
        if fused:  # one GEMM for gate and up (columns [gate | up])
            self.gate_up_proj = QLinear(cfg.hidden_size, 2 * cfg.intermediate_size, **lin)
        else:
            self.gate_proj = QLinear(cfg.hidden_size, cfg.intermediate_size, **lin)
            self.up_proj = QLinear(cfg.hidden_size, cfg.intermediate_size, **lin)
        self.down_proj = QLinear(cfg.intermediate_size, cfg.hidden_size, **lin)
        self.rotate = qcfg.rotate

    def __call__(self, x, mode, kernels, defer=False):
        """defer: down_proj may return GemmPartials (QLinear's defer)."""
        if self.fused:
            gate_up = self.gate_up_proj(x, mode, kernels)
            if not self.rotate:  # down_proj's input straight from [gate | up] in one kernel
                hq = draft_quantized(gate_up, self.down_proj, mode, kernels, "swiglu")
                if isinstance(hq, QuantizedInput):
                    return self.down_proj(hq, mode, kernels, defer)
            else:  # SwiGLU + online Hadamard (one kernel with rotation's impl "pallas")
                from .rotation import swiglu_hadamard
                h = swiglu_hadamard(gate_up)
                return self.down_proj(draft_quantized(h, self.down_proj, mode, kernels), mode,
                                      kernels, defer)
            gate, up = jnp.split(gate_up, 2, axis=-1)
        else:
            gate, up = self.gate_proj(x, mode, kernels), self.up_proj(x, mode, kernels)
        h = jax.nn.silu(gate) * up
        if self.rotate:
            from .rotation import online_hadamard
            h = online_hadamard(h)
        return self.down_proj(draft_quantized(h, self.down_proj, mode, kernels), mode, kernels,
                              defer)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, qcfg: QuantConfig, dtype, rngs: nnx.Rngs,
                 fused: bool = False):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = Attention(cfg, qcfg, dtype, rngs, fused)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, qcfg, dtype, rngs, fused)
        self.quantized = qcfg.quantized
        # A QuaRot rotation folds the norms' gains into the next linears (they are ones then).
        self.gains_folded = qcfg.rotate

    def _norm(self, norm: RMSNorm, x, mode, kernels):
        """norm(x) for the quantized layers that read it. In the draft modes (w4a8 / w4a4) those
        only need it quantized per token: the fused RMSNorm + quantization kernel, where the
        dispatch picks it, returns (xq, sx) as a QuantizedInput in one kernel. In verify mode
        where quant.norm_scale_fold takes it (batch-1 decoding): a NormedInput (the GEMMs
        scale their output rows)."""
        if (self.quantized and mode == "w4a16"
                and quant.norm_scale_fold(math.prod(x.shape[:-1]))):
            g = None if self.gains_folded else norm.scale[...].astype(x.dtype)
            return NormedInput(x if g is None else g * x, quant.rms_factor(x, norm.eps))
        if self.quantized and mode in ("w4a8", "w4a4"):
            from .kernel_dispatch import rmsnorm_quant
            r = rmsnorm_quant(x, norm.scale[...], norm.eps, quant.ACTIVATION_BITS[mode], kernels)
            if r is None and quant.NORM_QUANT_FOLD:
                r = quant.rmsnorm_quantize(x, norm.scale[...], norm.eps, quant.ACTIVATION_BITS[mode])
            if r is not None:
                return QuantizedInput(*r, x.dtype)
        return norm(x)

    def _add_norm(self, x, h, norm: RMSNorm, mode, kernels, fuse):
        """(x + h, the norm of it for the layers that read it); h None: (x, its norm). With
        ``fuse`` (residual_norm_runs' interpret flag) one Pallas kernel does the GEMM epilogue
        of a GemmPartials h, the add and the norm (in the draft modes quantized per token: a
        QuantizedInput for the next GEMMs)."""
        if h is None:
            return x, self._norm(norm, x, mode, kernels)
        if fuse is not None:
            from .kernel_dispatch import residual_norm
            bits = quant.ACTIVATION_BITS.get(mode)  # draft: the next GEMMs take it quantized
            out = residual_norm(x, h, norm.scale[...], norm.eps, fuse, bits)
            return (out[0], QuantizedInput(out[1], out[2], x.dtype)) if bits else out
        x = x + finished(h)
        return x, self._norm(norm, x, mode, kernels)

    def fuse_junctions(self, x, mode, kernels):
        """Whether this layer's junctions (o_proj / down_proj output + residual + RMSNorm) run
        as one kernel each: residual_norm_runs' verdict (None: XLA) for x [..., D]."""
        if not self.quantized:
            return None
        from .kernel_dispatch import residual_norm_runs
        return residual_norm_runs(kernels, mode, math.prod(x.shape[:-1]), x.shape[-1])

    def __call__(self, x, cache, layer, positions, inv_freq, mode, kernels, window=None,
                 readonly=False, prefix=None, pending=None):
        """-> (x, cache, pending): the residual stream up to this layer's attention block, the
        cache (or read-only K/V blocks) and the MLP's output not yet added (an array or
        GemmPartials), which the next running layer (or the caller: ``finished``) adds. The
        ``pending`` argument is the previous layer's."""
        fuse = self.fuse_junctions(x, mode, kernels)
        x, normed = self._add_norm(x, pending, self.attn_norm, mode, kernels, fuse)
        h, cache = self.attn(normed, cache, layer, positions, inv_freq, mode, kernels, window,
                             readonly, prefix, defer=fuse is not None)
        x, normed = self._add_norm(x, h, self.mlp_norm, mode, kernels, fuse)
        return x, cache, self.mlp(normed, mode, kernels, defer=fuse is not None)


def pure_dict(module_or_state) -> dict:
    """The parameter tree of a module (or NNX state) as a plain nested dict (docs/DESIGN.md)."""
    state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state)
    if hasattr(nnx, "to_pure_dict"):
        return nnx.to_pure_dict(state)
    return state.to_pure_dict()


# Projections that read the same input, stored apart (the checkpoint format, HF's names) and
# run as one GEMM in a fused model: (module, fused name, parts in column order).
FUSED_PROJECTIONS = (("attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                     ("mlp", "gate_up_proj", ("gate_proj", "up_proj")))


def fuse_projections(params: dict) -> dict:
    """The parameter pure dict of an unfused model -> that of ``Transformer(fused=True)``.

    Each group of projections that reads the same input (q/k/v, gate/up) becomes one linear
    layer whose output columns are the parts side by side. Every stored array (``kernel``
    [K, N], ``qweight`` [K/2, N], ``scales`` [K/G, N], ``bias`` [N]) has its output channels
    on the last axis and each column is computed from its own column alone, so the fused
    layer's outputs are the parts' outputs concatenated: one kernel launch (and, in the draft
    modes, one activation quantization) instead of two or three, on a wider N that fills the
    GPU better. Input arrays are not modified.
    """
    out = dict(params)
    out["layers"] = {}
    for i, layer in params["layers"].items():
        layer = dict(layer)
        for module, fused, parts in FUSED_PROJECTIONS:
            sub = dict(layer[module])
            if fused in sub:
                continue  # already fused
            missing = [p for p in parts if p not in sub]
            if missing:
                raise ValueError(f"layer {i} {module}: cannot fuse, missing {', '.join(missing)}")
            pieces = [sub.pop(p) for p in parts]
            keys = set(pieces[0])
            if any(set(p) != keys for p in pieces):
                raise ValueError(f"layer {i} {module}: {', '.join(parts)} store different arrays "
                                 f"({[sorted(p) for p in pieces]}); cannot fuse")
            sub[fused] = {k: jnp.concatenate([p[k] for p in pieces], axis=-1) for k in keys}
            layer[module] = sub
        out["layers"][i] = layer
    return out


def _module_list(items):
    # flax >= 0.12 wants nnx.List for lists of modules; older versions take plain lists.
    return nnx.List(items) if hasattr(nnx, "List") else list(items)


class Transformer(nnx.Module):
    """Decoder-only transformer; see the module docstring for the call contract."""

    def __init__(self, cfg: ModelConfig, qcfg: QuantConfig | None = None, *, dtype=jnp.bfloat16,
                 rngs: nnx.Rngs, fused: bool = False):
        """``fused=True``: q/k/v and gate/up run as one GEMM each (``fuse_projections`` maps an
        unfused parameter tree, the checkpoint format, to this one; ``api.assemble`` does)."""
        qcfg = qcfg or QuantConfig()
        self.cfg, self.qcfg, self.dtype = cfg, qcfg, dtype
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, dtype, rngs)
        self.layers = _module_list(DecoderLayer(cfg, qcfg, dtype, rngs, fused)
                                   for _ in range(cfg.num_hidden_layers))
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if not cfg.tie_word_embeddings:
            lm_qcfg = qcfg if qcfg.quantize_lm_head else None
            self.lm_head = QLinear(cfg.hidden_size, cfg.vocab_size, bias=False, qcfg=lm_qcfg,
                                   dtype=dtype, rngs=rngs)

    def __call__(self, tokens: jax.Array, cache: KVCache, start: jax.Array, *, mode: str,
                 kernels: str = "xla", logits_positions: jax.Array | None = None,
                 window: tuple[int, int] | None = None, layers: tuple[int, ...] | None = None,
                 readonly_cache: bool = False, prefix=None):
        """tokens [B, T] int, start [B] int (cache position of tokens[:, 0]).

        Returns (logits f32 [B, T, V] or [B, P, V] at ``logits_positions`` [B, P] (indices into
        T), updated cache). Positions past the cache end are not written. Draft-only options
        (static): ``window=(sink, recent)`` limits attention to the first ``sink`` and the last
        ``recent`` positions; ``layers`` runs only those decoder layers (the others pass the
        residual stream through and write no K/V).
        ``readonly_cache=True`` (static; ``layers`` and ``window`` apply) reads the cache
        without writing it (skipped layers give zero blocks): keys from each
        sequence's start on are ignored and the new tokens attend to their own K/V; the second
        result is then the new K/V blocks (k, v), each [L, B, KVH, T, hd], for the caller to
        write (e.g. after a lax.switch, which would otherwise copy the whole cache).
        ``prefix=(k, v, n)`` (read-only only): k, v [L, B, KVH, P, hd] hold K/V of up to P
        tokens just before ``start`` that are not in the cache, the first n ([B] or scalar,
        traced) valid; the cache is then read below start - n (a read-only draft step sees the
        tokens drafted before it in this cycle).
        """
        B, T = tokens.shape
        positions = start[:, None].astype(jnp.int32) + jnp.arange(T, dtype=jnp.int32)[None]  # [B, T]
        inv_freq = rope_inv_freq(self.cfg.rope, self.cfg.head_dim)
        x = self.embed(tokens).astype(self.dtype)
        if prefix is not None and not readonly_cache:
            raise ValueError("prefix blocks are for read-only forwards (readonly_cache=True)")
        blocks, pending = [], None
        for i, layer in enumerate(self.layers):
            if layers is None or i in layers:
                x, out, pending = layer(x, cache, i, positions, inv_freq, mode, kernels, window,
                                        readonly_cache, prefix, pending)
                if readonly_cache:
                    blocks.append(out)
                else:
                    cache = out
            elif readonly_cache:  # a skipped layer has no K/V; its block is never read
                kv_shape = (B, self.cfg.num_key_value_heads, T, self.cfg.head_dim)
                blocks.append((jnp.zeros(kv_shape, cache.dtype), jnp.zeros(kv_shape, cache.dtype)))
        if readonly_cache:
            cache = tuple(jnp.stack(t) for t in zip(*blocks))  # (k, v) [L, B, KVH, T, hd]
        if pending is not None:
            x = x + finished(pending)
        if logits_positions is not None:
            x = jnp.take_along_axis(x, logits_positions[:, :, None].astype(jnp.int32), axis=1)
        x = self.final_norm(x)
        return self.head(x, mode, kernels), cache

    def head(self, x: jax.Array, mode: str, kernels: str = "xla") -> jax.Array:
        if self.cfg.tie_word_embeddings:
            return self.embed.attend(x)
        # A 16-bit lm_head runs the same in every mode.
        head_mode = mode if self.lm_head.is_quantized else "w16"
        return self.lm_head(x, head_mode, kernels).astype(jnp.float32)
