"""Autoregressive decoding as one jitted program: prefill, then a ``lax.while_loop``.

``decode_autoregressive`` is the jittable array-level function (tokens, lengths, cache, rng in
and out); ``qspec_jax.api.generate`` wraps it for lists of prompts and strings. Shapes are
static (batch, padded prompt length, cache length, max_new_tokens), so repeated calls with the
same shapes reuse one compilation; sampling parameters are traced values.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from .model import CACHE_WRITES, KVCache
from .sampling import select_tokens


def check_cache_write(cache_write: str) -> None:
    if cache_write not in CACHE_WRITES:
        raise ValueError(f"cache_write={cache_write!r}: one of {', '.join(map(repr, CACHE_WRITES))}")


def forward_step(model, tokens, cache, start, cache_write: str, **kw):
    """model(tokens, cache, start, **kw) -> (logits, cache), writing the new K/V per layer or
    once after a read-only forward (cache_write, see qspec_jax.model.CACHE_WRITE)."""
    if cache_write == "step":
        logits, (k_blk, v_blk) = model(tokens, cache, start, readonly_cache=True, **kw)
        return logits, cache.write_blocks(k_blk, v_blk, start)
    return model(tokens, cache, start, **kw)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeResult:
    tokens: jax.Array          # [B, max_new_tokens] int32, -1 past each sequence's end
    num_generated: jax.Array   # [B] int32, EOS included when hit
    lengths: jax.Array         # [B] int32, tokens whose K/V are in the cache
    cache: KVCache
    rng: jax.Array
    stats: dict                # device-side counters (speculative decoding adds its own)


def is_eos(tokens: jax.Array, eos_ids: jax.Array) -> jax.Array:
    """tokens [...] vs eos_ids [E] (E may be 0) -> bool [...]."""
    return (tokens[..., None] == eos_ids).any(-1)


PREFILL_TOKENS = 16384  # tokens (batch x chunk) per prefill chunk when prefill_chunk is None


def prefill_chunk_size(batch: int, prompt_len: int, chunk: int | None = None) -> int:
    """Prompt tokens per sequence in one prefill forward: ``chunk``, or by default the largest
    multiple of 64 with batch x chunk <= PREFILL_TOKENS (at least 64 per sequence), never more
    than the prompt. Long prompts are prefilled in chunks so that the activations of a forward
    stay a few GB: a whole 16 x 32k prompt in one forward needs > 50 GiB of temporaries (measured
    out of memory on the H200), while the KV cache it fills is what has to fit."""
    if chunk is None:
        chunk = max(64, (PREFILL_TOKENS // max(batch, 1)) // 64 * 64)
    elif not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"prefill_chunk must be a positive integer (tokens per sequence per "
                         f"prefill forward) or None for the default, got {chunk!r}")
    return max(1, min(chunk, prompt_len))


def prefill(model, prompt_tokens, prompt_lens, cache, *, mode, kernels, chunk: int | None = None):
    """Run the (right-padded) prompts; return logits at each prompt's last token [B, V].

    The prompt goes through the model in forwards of ``prefill_chunk_size(B, P, chunk)``
    positions (a ``lax.fori_loop``; the last chunk ends at P and may overlap the one before it,
    recomputing those positions' K/V from the same inputs), each writing its K/V to the cache
    before the next attends to it. One chunk when the prompt fits: the plain forward.
    """
    B, P = prompt_tokens.shape
    last = jnp.maximum(prompt_lens - 1, 0).astype(jnp.int32)  # [B]
    C = prefill_chunk_size(B, P, chunk)
    if C >= P:
        logits, cache = model(prompt_tokens, cache, jnp.zeros((B,), jnp.int32), mode=mode,
                              kernels=kernels, logits_positions=last[:, None])
        return logits[:, 0], cache
    n = -(-P // C)

    def body(c, carry):
        cache, acc = carry
        s = jnp.minimum(c * C, P - C).astype(jnp.int32)
        toks = jax.lax.dynamic_slice_in_dim(prompt_tokens, s, C, axis=1)
        pos = jnp.clip(last - s, 0, C - 1)[:, None]
        logits, cache = model(toks, cache, jnp.full((B,), s, jnp.int32), mode=mode,
                              kernels=kernels, logits_positions=pos)
        mine = (last >= s) & (last < s + C)
        return cache, jnp.where(mine[:, None], logits[:, 0], acc)

    acc = jnp.zeros((B, model.cfg.vocab_size), jnp.float32)
    cache, acc = jax.lax.fori_loop(0, n, body, (cache, acc))
    return acc, cache


def record_tokens(out, count, new, active, max_new_tokens):
    """Write new [B] at out[b, count[b]] for active rows; return (out, count)."""
    B = out.shape[0]
    idx = jnp.minimum(count, max_new_tokens - 1)
    rows = jnp.arange(B)
    out = out.at[rows, idx].set(jnp.where(active, new, out[rows, idx]))
    return out, count + active.astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "mode", "kernels",
                                   "prefill_chunk", "cache_write"),
         donate_argnames=("cache",))
def decode_autoregressive(graphdef, state, prompt_tokens, prompt_lens, cache, rng, sampling,
                          eos_ids, *, max_new_tokens: int, greedy: bool, mode: str = "w16",
                          kernels: str = "xla", prefill_chunk: int | None = None,
                          cache_write: str = "layer") -> DecodeResult:
    """Plain decoding. prompt_tokens [B, P] right-padded, prompt_lens [B], eos_ids [E] int32.

    ``sampling`` is ``SamplingConfig.arrays()``; ``graphdef``/``state`` come from
    ``nnx.split(model)``. Each sequence stops after EOS or ``max_new_tokens`` tokens.
    ``prefill_chunk``: prompt positions per prefill forward (None: see prefill_chunk_size).
    ``cache_write``: how each decode step writes its K/V (see qspec_jax.model.CACHE_WRITE;
    same tokens either way on the reference path, up to near-tied picks on the GPU).
    """
    check_cache_write(cache_write)
    model = nnx.merge(graphdef, state)
    B = prompt_tokens.shape[0]
    select = partial(select_tokens, greedy=greedy, **sampling)
    logits, cache = prefill(model, prompt_tokens, prompt_lens, cache, mode=mode, kernels=kernels,
                            chunk=prefill_chunk)
    rng, key = jax.random.split(rng)
    first = select(logits, key)
    out = jnp.full((B, max_new_tokens), -1, jnp.int32)
    active = jnp.ones((B,), bool)
    out, count = record_tokens(out, jnp.zeros((B,), jnp.int32), first, active, max_new_tokens)
    done = is_eos(first, eos_ids) | (count >= max_new_tokens)

    def cond(carry):
        return ~jnp.all(carry[5])

    def body(carry):
        out, count, last, lengths, cache, done, rng, steps = carry
        logits, cache = forward_step(model, last[:, None], cache, lengths, cache_write, mode=mode,
                                     kernels=kernels)
        rng, key = jax.random.split(rng)
        tok = select(logits[:, 0], key)
        active = ~done
        out, count = record_tokens(out, count, tok, active, max_new_tokens)
        lengths = lengths + active.astype(jnp.int32)
        done = done | is_eos(tok, eos_ids) | (count >= max_new_tokens)
        return out, count, jnp.where(active, tok, last), lengths, cache, done, rng, steps + 1

    carry = (out, count, first, prompt_lens.astype(jnp.int32), cache, done, rng, jnp.int32(0))
    out, count, _, lengths, cache, _, rng, steps = jax.lax.while_loop(cond, body, carry)
    return DecodeResult(out, count, lengths, cache, rng, {"decode_steps": steps})
