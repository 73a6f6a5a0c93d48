"""QSpec: self-speculative decoding with a quantized draft mode and a weight-only verify mode.

One jitted program: prefill in verify mode, then a ``lax.while_loop`` whose body

1. drafts ``gamma`` tokens one at a time in the draft mode (``w4a8``/``w4a4``), writing their
   K/V into the shared cache at positions ``lengths .. lengths + gamma - 1``;
2. verifies the last committed token plus the drafts in ONE verify-mode pass of gamma + 1
   tokens, which overwrites those cache positions with verify-mode K/V;
3. accepts per sequence (exact greedy prefix match at temperature 0; lossless speculative
   sampling otherwise: accept d with prob min(1, p(d)/q(d)), on rejection resample from
   norm(max(p - q, 0)), bonus token from p when all drafts pass);
4. advances each sequence by its own count. Positions past a sequence's new length hold stale
   draft/verify K/V that is never read (attention stops at the query position) and is
   overwritten by the next cycle, so nothing is copied or rolled back.

Committed K/V is therefore always the verifier's, and the emitted tokens are distributed exactly
as verify-mode decoding (greedy: identical, up to float differences between a 1-token and a
(gamma+1)-token verify pass).

Also here: ``gamma="auto"`` (gamma chosen per cycle in {0..max_gamma} by ``lax.switch`` over
precompiled cycle bodies, from measured cycle costs and a running acceptance estimate) and the
cheaper-draft options (windowed draft attention, draft layer subsets), which change only the
acceptance rate, never the output.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from . import quant
from .generate import DecodeResult, check_cache_write, is_eos, prefill, record_tokens
from .sampling import filtered_logits, sampling_probs, select_tokens

DRAFT_MODES = ("w4a8", "w4a4", "w4a8_fp8", "w4a16")
VERIFY_MODE = "w4a16"
MAX_GAMMA = 16
DEFAULT_MAX_GAMMA = 7
PROBE_EVERY = 16         # gamma="auto": draft at least once every this many cycles
ACC_DECAY = 0.9          # per drafting cycle: weight kept by older acceptance trials
PRIOR_ACCEPTANCE = 0.8   # the estimate's prior mean ...
PRIOR_TRIALS = 2.0       # ... worth this many draft trials


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def normalize_draft_options(model, draft_window, draft_layers):
    """Validate the cheaper-draft options; return them as hashable static values (or None)."""
    if draft_window is not None:
        if (not isinstance(draft_window, (tuple, list)) or len(draft_window) != 2
                or not all(_is_int(v) for v in draft_window)
                or draft_window[0] < 0 or draft_window[1] < 1):
            raise ValueError(f"draft_window must be (sink, window) with integers sink >= 0 and "
                             f"window >= 1, got {draft_window!r}")
        draft_window = (int(draft_window[0]), int(draft_window[1]))
    if draft_layers is not None:
        n = model.cfg.num_hidden_layers
        layers = tuple(sorted(set(draft_layers))) if isinstance(draft_layers, (tuple, list, range)) else None
        if not layers or not all(_is_int(i) and 0 <= i < n for i in layers):
            raise ValueError(f"draft_layers must be a non-empty list of layer indices in [0, {n}), "
                             f"got {draft_layers!r}")
        draft_layers = None if len(layers) == n else layers
    return draft_window, draft_layers


def check_speculation(model, draft: str, gamma, max_gamma: int = DEFAULT_MAX_GAMMA) -> None:
    """Validate QSpec arguments against the model (clear errors, before any tracing)."""
    if draft not in DRAFT_MODES:
        raise ValueError(f"unknown draft mode {draft!r}; choose one of {', '.join(DRAFT_MODES)} "
                         "(w4a16 as draft only makes sense for testing: acceptance 1.0)")
    if gamma == "auto":
        if not _is_int(max_gamma) or not 1 <= max_gamma <= MAX_GAMMA:
            raise ValueError(f"max_gamma must be an integer in [1, {MAX_GAMMA}], got {max_gamma!r}")
    elif not _is_int(gamma) or not 1 <= gamma <= MAX_GAMMA:
        raise ValueError(f"gamma (draft tokens per cycle) must be an integer in [1, {MAX_GAMMA}] "
                         f"or 'auto', got {gamma!r}")
    if not model.qcfg.quantized:
        raise ValueError("mode 'qspec' needs a quantized model (its draft and verify modes run on "
                         "4-bit weights); load it with quant='w4' or convert with --quant w4")


def accept_greedy(drafts, verify_logits):
    """drafts [B, g], verify_logits [B, g+1, V] -> (n_accepted [B], emitted [B, g+1]).

    emitted[:, :n] are the accepted drafts, emitted[:, n] the verifier's own token.
    """
    target = jnp.argmax(verify_logits, axis=-1).astype(jnp.int32)  # [B, g+1]
    return _splice(drafts, target[:, :-1] == drafts, target)


def _splice(drafts, ok, fallback):
    """n = length of the all-ok prefix of ok [B, g]; emitted = drafts[:n] + fallback[n]."""
    g = drafts.shape[1]
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # [B]
    idx = jnp.arange(g + 1)[None]
    padded = jnp.concatenate([drafts, jnp.zeros((drafts.shape[0], 1), drafts.dtype)], axis=1)
    chosen = jnp.take_along_axis(fallback, n[:, None], axis=1)  # [B, 1]
    emitted = jnp.where(idx < n[:, None], padded, jnp.where(idx == n[:, None], chosen, -1))
    return n, emitted


def accept_sampling(drafts, draft_probs, verify_logits, rng, temperature, top_k, top_p):
    """Lossless speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    drafts [B, g], draft_probs q [B, g, V] (the filtered draft distributions the drafts were
    sampled from), verify_logits [B, g+1, V]. Returns (n_accepted [B], emitted [B, g+1]).
    """
    B, g = drafts.shape
    p = sampling_probs(verify_logits, temperature, top_k, top_p)  # [B, g+1, V]
    p_d = jnp.take_along_axis(p[:, :g], drafts[..., None], axis=-1)[..., 0]  # [B, g]
    q_d = jnp.take_along_axis(draft_probs, drafts[..., None], axis=-1)[..., 0]
    k_accept, k_fix = jax.random.split(rng)
    u = jax.random.uniform(k_accept, (B, g))
    ok = u * q_d < p_d  # u < p/q without dividing (q_d > 0: d was sampled from q)
    # Token after the accepted prefix: from norm(max(p - q, 0)) at a rejection, from p after
    # all gamma drafts (q padded with zeros there).
    q_pad = jnp.concatenate([draft_probs, jnp.zeros_like(draft_probs[:, :1])], axis=1)
    residual = jnp.maximum(p - q_pad, 0.0)
    residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p)  # p == q: use p
    fix = jax.random.categorical(k_fix, jnp.log(residual), axis=-1).astype(jnp.int32)  # [B, g+1]
    return _splice(drafts, ok, fix)


def _first_true(mask):
    """Index of the first True along axis 1, or mask.shape[1] when none."""
    n = mask.shape[1]
    return jnp.min(jnp.where(mask, jnp.arange(n)[None], n), axis=1)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "draft_mode",
                                   "verify_mode", "gamma", "max_gamma", "kernels", "draft_window",
                                   "draft_layers", "prefill_chunk", "cache_write"),
         donate_argnames=("cache",))
def decode_speculative(graphdef, state, prompt_tokens, prompt_lens, cache, rng, sampling, eos_ids,
                       *, max_new_tokens: int, greedy: bool, draft_mode: str = "w4a8",
                       verify_mode: str = VERIFY_MODE, gamma: int | str = 3,
                       max_gamma: int = DEFAULT_MAX_GAMMA, cycle_costs=None,
                       kernels: str = "xla", draft_window: tuple[int, int] | None = None,
                       draft_layers: tuple[int, ...] | None = None,
                       prefill_chunk: int | None = None, cache_write: str = "layer") -> DecodeResult:
    """QSpec decoding over one shared cache. Same arrays in/out as ``decode_autoregressive``.

    ``gamma``: drafts per cycle, or "auto": each cycle picks gamma in {0, ..., max_gamma}
    (0 = one plain verify-mode step) minimizing ``cycle_costs[g] / E(g, a)``, where
    ``cycle_costs`` [max_gamma + 1] are measured seconds per cycle (see cost_model) and a is a
    running estimate of the per-token acceptance rate: decayed counts of accepted and tried
    drafts, starting from a weak prior (PRIOR_ACCEPTANCE worth PRIOR_TRIALS trials, decaying
    with them, so a steady acceptance of 1 drives the estimate to 1). The first cycle,
    and one cycle in PROBE_EVERY while gamma = 0 wins, is a probe that drafts the gamma that
    would pay most at full acceptance, so the estimate starts from and stays near measurement.
    The cache needs ``gamma + 1`` (auto: ``max_gamma + 1``) positions of room past each
    sequence's last token. ``stats`` holds device-side counters.

    Cheaper drafts over the same cache (outputs stay exact; only acceptance changes):
    ``draft_window=(sink, window)``: draft attention sees only the first ``sink`` and the last
    ``window`` positions; ``draft_layers``: the draft runs only these decoder layers (the
    skipped layers' K/V for drafted positions are filled by the verify pass).
    ``prefill_chunk``: prompt positions per prefill forward (None: see
    ``qspec_jax.generate.prefill_chunk_size``). ``cache_write``: how fixed-gamma draft and
    verify passes write their K/V (``qspec_jax.model.CACHE_WRITE``: "step" runs them read-only,
    the drafts' K/V beside the cache, and writes the verify pass's once per cycle, as
    gamma="auto" cycles always do).
    """
    check_cache_write(cache_write)
    quant.check_mode(draft_mode)
    quant.check_mode(verify_mode)
    auto = gamma == "auto"
    top_gamma = max_gamma if auto else gamma
    model = nnx.merge(graphdef, state)
    B = prompt_tokens.shape[0]
    temperature, top_k, top_p = sampling["temperature"], sampling["top_k"], sampling["top_p"]
    select = partial(select_tokens, greedy=greedy, **sampling)
    forward = partial(model, kernels=kernels)

    logits, cache = prefill(model, prompt_tokens, prompt_lens, cache, mode=verify_mode, kernels=kernels,
                            chunk=prefill_chunk)
    rng, key = jax.random.split(rng)
    first = select(logits, key)
    width = max_new_tokens + top_gamma + 1  # room for a whole cycle past the limit
    out = jnp.full((B, width), -1, jnp.int32)
    out, count = record_tokens(out, jnp.zeros((B,), jnp.int32), first, jnp.ones((B,), bool), width)
    done = is_eos(first, eos_ids) | (count >= max_new_tokens)
    zeros = jnp.zeros((B,), jnp.int32)

    def draft_pick(logits, rng):
        """The draft token from one step's logits [B, V]: (token, rng, q [B, V] or None)."""
        rng, key = jax.random.split(rng)
        if greedy:
            return select(logits, key), rng, None
        # Filter once: the draft token is sampled from q, and q is kept for acceptance.
        filtered = filtered_logits(logits, temperature, top_k, top_p)
        nxt = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
        return nxt, rng, jax.nn.softmax(filtered, axis=-1)

    def draft_step(carry, i):
        tok, cache, lengths, rng = carry
        logits, cache = forward(tok[:, None], cache, lengths + i, mode=draft_mode,
                                window=draft_window, layers=draft_layers)
        nxt, rng, q = draft_pick(logits[:, 0], rng)
        return (nxt, cache, lengths, rng), (nxt, q)

    def draft_fixed(c, g: int):
        """g draft steps (static g): (cache, rng, drafts [B, g], q [g, B, V] or None)."""
        if not g:
            return c["cache"], c["rng"], jnp.zeros((B, 0), jnp.int32), None
        (_, cache, _, rng), (drafts, q) = jax.lax.scan(
            draft_step, (c["last"], c["cache"], c["lengths"], c["rng"]), jnp.arange(g))
        return cache, rng, drafts.T, q

    def draft_readonly(c, cache, g: int):
        """g draft steps (static g) that leave the cache alone (gamma="auto"): each step's K/V
        go to a [L, B, KVH, top_gamma, hd] block that the later steps attend to beside the
        cache (the model's ``prefix``). The same tokens, q and random keys as draft_fixed(c, g)
        (up to float rounding of the attention split): (rng, drafts [B, g], q [g, B, V] or None)."""
        if not g:
            return c["rng"], jnp.zeros((B, 0), jnp.int32), None
        cfg = model.cfg
        shape = (cfg.num_hidden_layers, B, cfg.num_key_value_heads, top_gamma, cfg.head_dim)

        def step(carry, i):
            tok, bk, bv, rng = carry
            logits, (k_new, v_new) = forward(tok[:, None], cache, c["lengths"] + i,
                                             mode=draft_mode, readonly_cache=True,
                                             prefix=(bk, bv, i), window=draft_window,
                                             layers=draft_layers)
            bk = jax.lax.dynamic_update_slice_in_dim(bk, k_new, i, axis=3)
            bv = jax.lax.dynamic_update_slice_in_dim(bv, v_new, i, axis=3)
            nxt, rng, q = draft_pick(logits[:, 0], rng)
            return (nxt, bk, bv, rng), (nxt, q)

        init = (c["last"], jnp.zeros(shape, cache.dtype), jnp.zeros(shape, cache.dtype), c["rng"])
        (_, _, _, rng), (drafts, q) = jax.lax.scan(step, init, jnp.arange(g))
        return rng, drafts.T, q

    def cycle(c, g: int):
        """One draft(g) + verify(g + 1) cycle; g = 0 is a plain verify-mode decoding step."""
        if cache_write == "step":  # read-only drafts and verify (as gamma="auto"), one write
            cache = c["cache"]
            new, (k_blk, v_blk) = verify_and_accept(c, cache, *draft_readonly(c, cache, g), g,
                                                    readonly=True)
            return {**new, "cache": cache.write_blocks(k_blk, v_blk, c["lengths"])}
        return verify_and_accept(c, *draft_fixed(c, g), g)

    def verify_and_accept(c, cache, rng, drafts, q, g: int, readonly: bool = False):
        """Verify the last token + g drafts ([B, g]; q [g, B, V] when sampling) in one pass,
        accept, and advance the carry. readonly: the verify pass leaves the cache alone and
        the result is (carry without "cache", its K/V blocks [L, B, KVH, g + 1, hd])."""
        active = ~c["done"]
        verify_in = jnp.concatenate([c["last"][:, None], drafts], axis=1)  # [B, g + 1]
        if readonly:
            v_logits, blocks = forward(verify_in, cache, c["lengths"], mode=verify_mode,
                                       readonly_cache=True)
        else:
            v_logits, cache = forward(verify_in, cache, c["lengths"], mode=verify_mode)
        rng, key = jax.random.split(rng)
        if greedy:
            n_acc, emitted = accept_greedy(drafts, v_logits)
        else:
            q = jnp.zeros((B, 0, v_logits.shape[-1])) if q is None else jnp.swapaxes(q, 0, 1)
            n_acc, emitted = accept_sampling(drafts, q, v_logits, key, temperature, top_k, top_p)
        # Keep emitted[:k]: up to the first EOS and within max_new_tokens.
        valid = jnp.arange(g + 1)[None] <= n_acc[:, None]
        eos_at = _first_true(is_eos(emitted, eos_ids) & valid)
        k = jnp.minimum(jnp.minimum(n_acc + 1, eos_at + 1), max_new_tokens - c["count"])
        k = jnp.where(active, k, 0)
        rows = jnp.arange(B)[:, None]
        cols = c["count"][:, None] + jnp.arange(g + 1)[None]
        keep = jnp.arange(g + 1)[None] < k[:, None]
        out = c["out"].at[rows, cols].set(jnp.where(keep, emitted, c["out"][rows, cols]), mode="drop")
        count = c["count"] + k
        # The last emitted token is the next input; the k - 1 before it and the previous input
        # are now committed in the cache (k = n_acc + 1 unless cut by EOS or the limit).
        last = jnp.take_along_axis(emitted, jnp.maximum(k - 1, 0)[:, None], axis=1)[:, 0]
        a = active.astype(jnp.int32)
        # Acceptance trials: accepted drafts plus the rejection that ended the run, if any.
        trials = jnp.sum(a * jnp.minimum(n_acc + 1, g))
        new = {
            **c, "out": out, "count": count, "cache": cache, "rng": rng,
            "last": jnp.where(active, last, c["last"]),
            "lengths": c["lengths"] + k,
            "done": c["done"] | (eos_at <= n_acc) | (count >= max_new_tokens),
            "cycles": c["cycles"] + 1,
            "seq_cycles": c["seq_cycles"] + a,
            "drafted": c["drafted"] + a * g,
            "accepted": c["accepted"] + a * n_acc,
            "trials": trials, "trial_accepts": jnp.sum(a * n_acc),
        }
        if readonly:
            del new["cache"]
            return new, blocks
        return new

    def cond(c):
        return ~jnp.all(c["done"])

    if auto:
        # One lax.switch per cycle picks a whole cycle compiled for its gamma: g read-only draft
        # steps (a static scan) and the read-only verify pass. The cache only enters the switch
        # to be read: a conditional whose branches write a large operand makes XLA copy it
        # every cycle, so each branch returns its verify K/V blocks (padded to max_gamma + 1
        # positions) and they are written after the switch. The padding lands past every
        # sequence's new length: stale positions nobody reads. Each data-dependent loop or
        # conditional costs a device-to-host sync on the GPU (the queue drains, the host
        # relaunches), so the cycle has two (the loop's test and the switch), like a fixed
        # gamma's one plus one (draft_layers and draft_window included: the read-only draft
        # steps skip the same layers and attend through the same window).

        def verify_branch(g, c, cache, rng, drafts, qs):
            new, blocks = verify_and_accept(c, cache, rng, drafts[:, :g],
                                            None if qs is None else qs[:g], g, readonly=True)
            pad = ((0, 0), (0, 0), (0, 0), (0, max_gamma - g), (0, 0))
            return new, tuple(jnp.pad(b, pad) for b in blocks)

        def cycle_branch(g, c, cache):
            return verify_branch(g, c, cache, *draft_readonly(c, cache, g))

        branches = [partial(cycle_branch, g) for g in range(max_gamma + 1)]
        costs = jnp.asarray(cycle_costs, jnp.float32)
        # Probes draft the gamma that would pay most at full acceptance (at least 1): several
        # trials per probe, so one probe can lift a pessimistic estimate over the break-even.
        probe_gamma = jnp.maximum(choose_gamma(costs, jnp.float32(1.0)), 1)

        def body(c):
            g = choose_gamma(costs, c["acc_hits"] / c["acc_trials"])
            g = jnp.where((g == 0) & (c["since_draft"] >= PROBE_EVERY), probe_gamma, g)
            cache = c["cache"]
            rest = {k: v for k, v in c.items() if k != "cache"}
            new, (k_blk, v_blk) = jax.lax.switch(g, branches, rest, cache)
            c = {**new, "cache": cache.write_blocks(k_blk, v_blk, c["lengths"])}
            # Decayed counts of accepted / tried drafts (a drafting cycle ages older ones).
            drafted = c["trials"] > 0
            decay = jnp.where(drafted, ACC_DECAY, 1.0)
            hits = decay * c["acc_hits"] + c["trial_accepts"]
            trials = decay * c["acc_trials"] + c["trials"]
            return {**c, "acc_hits": hits, "acc_trials": trials,
                    "since_draft": jnp.where(g > 0, 0, c["since_draft"] + 1),
                    "gamma_cycles": c["gamma_cycles"].at[g].add(1)}
    else:
        def body(c):
            return {**cycle(c, gamma), "gamma_cycles": c["gamma_cycles"].at[gamma].add(1)}

    carry = {"out": out, "count": count, "cache": cache, "rng": rng, "last": first,
             "lengths": prompt_lens.astype(jnp.int32), "done": done, "cycles": jnp.int32(0),
             "seq_cycles": zeros, "drafted": zeros, "accepted": zeros,
             "trials": jnp.int32(0), "trial_accepts": jnp.int32(0),
             # The prior enters as pseudo-counts and decays with the measured trials.
             "acc_hits": jnp.float32(PRIOR_ACCEPTANCE * PRIOR_TRIALS),
             "acc_trials": jnp.float32(PRIOR_TRIALS),
             # The first cycle is a probe: the estimate starts from measured trials.
             "since_draft": jnp.int32(PROBE_EVERY),
             "gamma_cycles": jnp.zeros((top_gamma + 1,), jnp.int32)}
    c = jax.lax.while_loop(cond, body, carry)
    drafted, accepted = c["drafted"].sum(), c["accepted"].sum()
    seq_cycles = jnp.maximum(c["seq_cycles"].sum(), 1)
    # accepted counts what verification accepted, including drafts past an EOS or the token
    # limit in a sequence's last cycle; committed_tokens_per_cycle counts only kept tokens.
    stats = {
        "cycles": c["cycles"], "seq_cycles": c["seq_cycles"], "drafted": c["drafted"],
        "accepted": c["accepted"],
        "acceptance_rate": accepted / jnp.maximum(drafted, 1),
        "tokens_per_cycle": (accepted + c["seq_cycles"].sum()) / seq_cycles,
        "committed_tokens_per_cycle": (c["count"].sum() - B) / seq_cycles,
        "gamma_cycles": c["gamma_cycles"],
    }
    if auto:
        stats["acceptance_estimate"] = c["acc_hits"] / c["acc_trials"]
    return DecodeResult(c["out"][:, :max_new_tokens], c["count"], c["lengths"], c["cache"], c["rng"],
                        stats)


def choose_gamma(cycle_costs: jax.Array, a: jax.Array) -> jax.Array:
    """argmin over g of seconds per token: cycle_costs[g] / E(g, a)."""
    g = jnp.arange(cycle_costs.shape[0])
    powers = jnp.where(g[None, :] <= g[:, None], a ** g[None, :].astype(jnp.float32), 0.0)
    return jnp.argmin(cycle_costs / powers.sum(axis=1)).astype(jnp.int32)
