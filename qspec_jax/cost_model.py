"""QSpec's cost model: measured step costs -> predicted throughput -> the gamma to use.

A QSpec cycle with gamma = g costs ``g * T_draft(B) + T_verify(B, g + 1)`` (both full model
forwards, attention and norms included) and emits ``E(g, a) = 1 + a + ... + a^g`` tokens per
sequence for a per-token acceptance rate a. g = 0 is plain verify-mode decoding, so
``cycle_costs[0] = T_verify(B, 1)`` is the w4a16 AR step and the predicted speedup of g is
``E(g, a) * cycle_costs[0] / cycle_costs[g]``. See METHOD.md, "When can QSpec be faster".
"""

from __future__ import annotations

import logging
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import round_up
from .model import KVCache

CACHE_BUCKET = 64  # api.cache_length rounds cache lengths up to a multiple of this

log = logging.getLogger("qspec_jax")


def expected_tokens(g: int, a: float) -> float:
    """E(g, a) = sum_{i=0..g} a^i."""
    return float(sum(a ** i for i in range(g + 1)))


def per_token_acceptance(fraction: float, gamma: int) -> float:
    """The per-token acceptance rate a of E(g, a)'s model (each draft accepted with probability
    a, up to the first rejection) under which gamma-draft cycles accept ``fraction`` of their
    drafts, the ``acceptance_rate`` that generate reports (accepted / drafted): solves
    (a + a^2 + ... + a^gamma) / gamma = fraction. The two differ: 72% of drafts accepted at
    gamma 3 is a = 0.85 (3.17 tokens per cycle, both ways), so plugging the fraction into E
    under-predicts. gamma="auto" estimates a itself (accepted / tried, a rejection counting as
    a try)."""
    if not 0.0 <= fraction <= 1.0 or gamma < 1:
        raise ValueError(f"need 0 <= fraction <= 1 and gamma >= 1, got {fraction!r}, {gamma!r}")
    lo, hi = 0.0, 1.0
    for _ in range(60):  # the mean is increasing in a
        mid = 0.5 * (lo + hi)
        if sum(mid ** i for i in range(1, gamma + 1)) / gamma < fraction:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def predicted_speedup(cycle_costs, a: float) -> np.ndarray:
    """[max_gamma + 1] predicted speedup over verify-mode AR for each gamma at acceptance a."""
    costs = np.asarray(cycle_costs, np.float64)
    return np.array([expected_tokens(g, a) * costs[0] / costs[g] for g in range(len(costs))])


def best_gamma(cycle_costs, a: float) -> int:
    return int(np.argmax(predicted_speedup(cycle_costs, a)))


@partial(jax.jit, static_argnames=("graphdef", "T", "mode", "kernels", "window", "layers"),
         donate_argnames=("cache",))
def _timed_forwards(graphdef, state, cache, start, steps, *, T, mode, kernels, window, layers):
    model = nnx.merge(graphdef, state)
    B = start.shape[0]

    def body(i, carry):
        cache, acc = carry
        tokens = jnp.full((B, T), 1, jnp.int32) + (i % 7)
        logits, cache = model(tokens, cache, start, mode=mode, kernels=kernels, window=window,
                              layers=layers)
        return cache, acc + logits[:, -1, 0]

    # A traced trip count: one compiled program serves every loop length.
    return jax.lax.fori_loop(0, steps, body, (cache, jnp.zeros((B,), jnp.float32)))


def time_forward(model, batch: int, context: int, T: int, mode: str, *, kernels: str = "auto",
                 steps: int = 8, repeats: int = 3, window=None, layers=None) -> float:
    """Median seconds of one forward of T new tokens per sequence at cache position ``context``.

    Timed inside one jitted loop, as the difference between loops of ``3 * steps`` and
    ``steps`` forwards divided by ``2 * steps``: the per-call dispatch (argument flattening,
    launch, synchronisation; ~0.1-1 ms, as much as a small model's whole forward) cancels."""
    # The cache generate would allocate (api.cache_length's bucket rounding): the attention
    # kernel takes cache lengths in multiples of its key block, and an unrounded length here
    # timed XLA's attention instead of the kernel generate runs.
    max_len = round_up(context + T, CACHE_BUCKET)
    sliding = model.cfg.sliding_window  # (not ``window``: that is the draft's attention window)
    if sliding is not None and context + T <= sliding < max_len:
        max_len = sliding
    cache = KVCache.create(model.cfg, batch, max_len, model.dtype)
    start = jnp.full((batch,), context, jnp.int32)
    run = partial(_timed_forwards, model.graphdef, model.state, T=T, mode=mode, kernels=kernels,
                  window=window, layers=layers)
    cache, acc = run(cache, start, jnp.int32(steps))  # compile + warm up
    jax.block_until_ready(acc)
    per_step = []
    for _ in range(repeats):
        walls = []
        for n in (steps, 3 * steps):
            t0 = time.perf_counter()
            cache, acc = run(cache, start, jnp.int32(n))
            jax.block_until_ready(acc)
            walls.append(time.perf_counter() - t0)
        per_step.append((walls[1] - walls[0]) / (2 * steps))
    t = float(np.median(per_step))
    if t <= 0:  # below the timer's noise (tiny models on a busy host): fall back to the long loop
        t = walls[1] / (3 * steps)
    return t


def no_gamma_can_pay(t_draft: float, t_verify1: float, max_gamma: int, min_gain: float) -> bool:
    """Whether no gamma in 1..max_gamma can reach ``min_gain`` over plain decoding even at full
    acceptance and even if a verify pass of g + 1 tokens cost no more than one of 1 token
    (T_verify(g + 1) >= T_verify(1)): (g + 1) T_v(1) / (g T_draft + T_v(1)) < min_gain for all g."""
    return all((g + 1) * t_verify1 < min_gain * (g * t_draft + t_verify1)
               for g in range(1, max_gamma + 1))


def measure_cycle_costs(model, batch: int, context: int, max_gamma: int, draft: str, *,
                        kernels: str = "auto", steps: int = 8, repeats: int = 3,
                        draft_window=None, draft_layers=None, verify_gammas=None,
                        early_exit_gain: float | None = None,
                        parts: dict | None = None) -> np.ndarray:
    """cycle_costs[g] = g * T_draft(B) + T_verify(B, g + 1), seconds, for g = 0..max_gamma.

    ``parts`` (a dict, filled in): "draft_s" = T_draft and "verify_s" = [T_verify(g + 1) for g
    = 0..max_gamma] (interpolated where not timed), "verify_timed" = the gammas whose verify
    width was timed.

    The draft is timed with its own options (windowed attention, layer subset). Every verify
    width is timed (one compiled program each) unless ``verify_gammas`` names a subset: then
    T_verify is timed at those gammas (0 and max_gamma are always added) and linearly
    interpolated in between (verify cost is close to linear in its width), which saves
    compilations on large models.

    ``early_exit_gain`` (gamma="auto"'s AUTO_MIN_GAIN): after the draft step and the 1-token
    verify step, when no_gamma_can_pay, the wider verify passes are not timed (one compiled
    program each) and T_verify(g + 1) is taken as T_verify(1): lower bounds of the costs, under
    which, as under the measured ones, no gamma pays (drafts no cheaper than a verify step: the
    H200 at short context)."""
    t_draft = time_forward(model, batch, context, 1, draft, kernels=kernels, steps=steps,
                           repeats=repeats, window=draft_window, layers=draft_layers)
    timed = sorted({0, max_gamma} | {int(g) for g in (verify_gammas or range(max_gamma + 1))
                                     if 0 <= int(g) <= max_gamma})
    measured = [time_forward(model, batch, context, 1, "w4a16", kernels=kernels, steps=steps,
                             repeats=repeats)]
    if early_exit_gain is not None and no_gamma_can_pay(t_draft, measured[0], max_gamma,
                                                        early_exit_gain):
        log.info("qspec_jax: cycle costs (batch %d, context %d, draft %s): T_draft=%.3g s >= "
                 "T_verify(1)=%.3g s x %.3f: no gamma can pay even with free verify widths, "
                 "which are not timed", batch, context, draft, t_draft, measured[0],
                 (max_gamma + 1 - early_exit_gain) / (early_exit_gain * max_gamma))
        timed = [0]  # every wider verify pass taken as T_verify(1) (interp of one point)
    else:
        measured += [time_forward(model, batch, context, g + 1, "w4a16", kernels=kernels,
                                  steps=steps, repeats=repeats) for g in timed[1:]]
    t_verify = np.interp(np.arange(max_gamma + 1), timed, measured)
    costs = np.array([g * t_draft + t_verify[g] for g in range(max_gamma + 1)])
    if parts is not None:
        parts.update(draft_s=t_draft, verify_s=t_verify.tolist(), verify_timed=timed)
    log.info("qspec_jax: measured cycle costs (batch %d, context %d, draft %s): T_draft=%.3g s, "
             "T_verify(g + 1)=%s s", batch, context, draft, t_draft,
             ", ".join(f"{t:.3g}" for t in t_verify))
    return costs
