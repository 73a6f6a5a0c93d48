"""Token selection: greedy, and sampling with temperature, top-k and top-p.

``filtered_logits`` is the one definition of the sampling distribution; plain decoding samples
from it and speculative decoding applies it identically to the draft (q) and verify (p) logits.
Temperature, top-k and top-p are traced values, so changing them does not recompile; only
greedy vs. sampling and filtering on/off (top-k or top-p set at all) are static. No
``lax.cond`` decides at run time whether to filter: on a GPU each data-dependent conditional
costs a device-to-host sync (the launch queue drains), once per decode or draft step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    top_k: int = 0          # 0: off
    top_p: float = 1.0      # 1.0: off

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if not isinstance(t, (int, float)) or t != t or t < 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {t!r}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        if not isinstance(p, (int, float)) or not (0.0 < p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0

    def arrays(self) -> dict:
        """Traced values for the jitted loops (temperature 0 is replaced by 1: greedy is static).
        Without top-k and top-p, both are None: the filter is compiled out."""
        if not self.filters:
            return {"temperature": jnp.float32(self.temperature or 1.0), "top_k": None, "top_p": None}
        return {"temperature": jnp.float32(self.temperature or 1.0), "top_k": jnp.int32(self.top_k),
                "top_p": jnp.float32(self.top_p)}


def _top_k_top_p_mask(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits [..., V] (already temperature-scaled) -> same with excluded tokens at -inf."""
    vocab = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)
    k_index = jnp.clip(top_k - 1, 0, vocab - 1)
    kth = jnp.take(sorted_desc, k_index, axis=-1)[..., None]
    logits = jnp.where((top_k > 0) & (logits < kth), -jnp.inf, logits)
    # top-p over what top-k kept: keep the smallest prefix of the sorted tokens whose mass
    # reaches top_p (the first token is always kept).
    sorted_desc = jnp.where((top_k > 0) & (sorted_desc < kth), -jnp.inf, sorted_desc)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = (mass_before < top_p) | (top_p >= 1.0)  # top_p = 1: off (no rounding cut-off)
    cutoff = jnp.min(jnp.where(kept, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def filtered_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Temperature, then top-k, then top-p (HF's order). logits [..., V] f32.
    top_k = top_p = None: no filtering (static); otherwise top_k 0 / top_p 1 turn one off."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k is None and top_p is None:
        return logits
    top_k = jnp.int32(0) if top_k is None else top_k
    top_p = jnp.float32(1.0) if top_p is None else top_p
    return _top_k_top_p_mask(logits, top_k, top_p)


def sampling_probs(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    return jax.nn.softmax(filtered_logits(logits, temperature, top_k, top_p), axis=-1)


def select_tokens(logits: jax.Array, rng: jax.Array, *, greedy: bool, temperature, top_k, top_p):
    """logits [B, V] -> tokens [B] int32."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, filtered_logits(logits, temperature, top_k, top_p),
                                  axis=-1).astype(jnp.int32)
