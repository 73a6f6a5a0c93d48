"""QSpec decoding: exactness against verify-mode decoding, lossless sampling, statistics."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chisquare

import qspec_jax as qj
from qspec_jax.speculative import decode_speculative

from hf_models import build_hf_model


@pytest.fixture(scope="module")
def quantized(hf_dirs):
    return {arch: qj.load(hf_dirs[arch][0], dtype="float32", quant="w4", method="rtn")
            for arch in ("llama", "qwen2")}


def ragged_prompts(seed, n=3, vocab=128):
    """n prompts of 2 to 11 tokens: one padded length, so that tests with the same decoding
    options share a compiled program (compiling dominates these tests' time on CPU)."""
    r = np.random.RandomState(seed)
    return [r.randint(3, vocab, int(k)).tolist() for k in r.randint(2, 12, n)]


def generate_call(model, prompts, **generate_kwargs):
    """(jitted decode function, args, kwargs): the call ``qj.generate`` makes for these arguments
    (``qj.decode_call``), not run. The same generate arguments give the same program, so a test
    that calls or lowers the captured function shares the compilation with generate calls
    elsewhere in this module (jit keeps the executable, and lowering the same call returns it)."""
    call = qj.decode_call(model, prompts, **generate_kwargs)
    return call.fn, call.args, call.kwargs


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("draft", ["w4a8", "w4a4"])
def test_greedy_qspec_equals_verify_mode_greedy(arch, draft, quantized):
    model = quantized[arch]
    for seed in (0, 1):
        prompts = ragged_prompts(seed)
        ref = qj.generate(model, prompts, max_new_tokens=24, mode="w4a16").tokens
        for gamma in (1, 2, 3, 4, 5):
            out = qj.generate(model, prompts, max_new_tokens=24, mode="qspec", draft=draft,
                              gamma=gamma)
            assert out.tokens == ref, (seed, gamma)


def test_cache_write_per_step_gives_the_same_tokens_and_cache(quantized, monkeypatch):
    """qspec_jax.model.CACHE_WRITE = "step" (read-only forwards, the new K/V written once per step):
    w4a16 decoding and fixed-gamma QSpec (plain and windowed / layer-skipping drafts) give the
    per-layer writes' tokens, and the decode leaves the same cache (f32). (QSpec == AR with
    per-layer writes, the default, for these drafts: test_cheaper_drafts_stay_exact.)"""
    from qspec_jax import model as model_module
    model = quantized["llama"]
    prompts = ragged_prompts(3)
    runs = {}
    for cw in ("layer", "step"):
        monkeypatch.setattr(model_module, "CACHE_WRITE", cw)
        fn, args, kw = generate_call(model, prompts, max_new_tokens=12, mode="w4a16")
        assert kw["cache_write"] == cw
        res = fn(*args, **kw)
        runs[cw] = (np.asarray(res.tokens), np.asarray(res.lengths), np.asarray(res.cache.k),
                    np.asarray(res.cache.v))
        ar = qj.generate(model, prompts, max_new_tokens=12, mode="w4a16").tokens
        for extra in ({}, {"draft_window": (1, 4)}, {"draft_layers": [0]}) if cw == "step" else ():
            qs = qj.generate(model, prompts, max_new_tokens=12, mode="qspec", gamma=3, **extra)
            assert qs.tokens == ar, (cw, extra)
        sampled = [qj.generate(model, prompts, max_new_tokens=8, mode=m, temperature=0.8, seed=5,
                               gamma=3).tokens for m in ("w4a16", "qspec")]
        runs[cw] += (sampled,)
    (t0, l0, k0, v0, s0), (t1, l1, k1, v1, s1) = runs["layer"], runs["step"]
    np.testing.assert_array_equal(t0, t1)
    np.testing.assert_array_equal(l0, l1)
    for a, b in ((k0, k1), (v0, v1)):  # positions below each length hold the same K/V
        for i, n in enumerate(l0):
            np.testing.assert_allclose(a[:, i, :, :n], b[:, i, :, :n], rtol=1e-5, atol=1e-5)
    assert s0 == s1  # sampling draws the same tokens
    with pytest.raises(ValueError, match="cache_write='rows'"):
        qj.decode_autoregressive(*generate_call(model, prompts, max_new_tokens=2, mode="w4a16")[1],
                                 max_new_tokens=2, greedy=True, cache_write="rows")


def test_cache_update_slice_gives_the_same_tokens_and_cache(quantized, monkeypatch):
    """qspec_jax.model.CACHE_UPDATE = "slice" (batch 1: one dynamic_update_slice per cache
    instead of the dropping scatter's read-back and select): every block generate() writes is
    inside the cache, so batch-1 QSpec leaves the same tokens and cache as "scatter", with
    fixed gamma (per-layer writes of the prefill, the draft steps and the verify block) and with
    gamma="auto" (read-only forwards, each cycle's block written once by write_blocks); an
    unknown rule is refused by name."""
    from qspec_jax import model as model_module
    model = quantized["llama"]
    prompts = ragged_prompts(4, n=1)
    runs, texts = {}, {}
    calls = {"fixed": dict(gamma=3, draft="w4a8"),
             "auto": dict(gamma="auto", max_gamma=2, cycle_costs=[1, 1.01, 1.02])}  # (drafts pay)
    monkeypatch.setattr(model_module, "CACHE_WRITE", "layer")
    for cu in ("scatter", "slice"):
        monkeypatch.setattr(model_module, "CACHE_UPDATE", cu)
        jax.clear_caches()  # the rule is read while tracing (set it before the first call)
        for name, kw in calls.items():
            fn, args, kwargs = generate_call(model, prompts, max_new_tokens=10, mode="qspec", **kw)
            texts[cu, name] = fn.lower(*args, **kwargs).as_text()
            r = fn(*args, **kwargs)
            n = int(np.asarray(r.lengths)[0])  # positions below hold verify-mode K/V
            runs[cu, name] = (np.asarray(r.tokens), np.asarray(r.cache.k)[:, :, :, :n],
                              np.asarray(r.cache.v)[:, :, :, :n])
    jax.clear_caches()  # (later tests trace with the default rule again)
    for name in calls:
        assert "dynamic_update_slice" in texts["slice", name]
        assert texts["scatter", name] != texts["slice", name]  # two different programs ran
        for x, y in zip(runs["scatter", name], runs["slice", name]):
            np.testing.assert_array_equal(x, y)
    monkeypatch.setattr(model_module, "CACHE_UPDATE", "clip")
    with pytest.raises(ValueError, match="CACHE_UPDATE='clip'"):
        qj.generate(model, [[5, 6, 7, 8, 9, 10, 11]], max_new_tokens=2, mode="w4a16")
    jax.clear_caches()


def test_qspec_with_prefill_chunks_equals_verify_mode(quantized):
    """Long prompts prefilled in chunks (4 positions per forward; the last chunk overlaps):
    QSpec's tokens = w4a16's with the same chunks = w4a16's from one prefill forward (f32)."""
    model = quantized["llama"]
    prompts = ragged_prompts(7, n=3) + [list(range(3, 21))]
    ref = qj.generate(model, prompts, max_new_tokens=16, mode="w4a16").tokens
    plain = qj.generate(model, prompts, max_new_tokens=16, mode="w4a16", prefill_chunk=4)
    out = qj.generate(model, prompts, max_new_tokens=16, mode="qspec", gamma=3, prefill_chunk=4)
    assert out.stats["prefill_chunk"] == 4
    assert out.tokens == plain.tokens == ref


def test_greedy_qspec_bfloat16_tokens_are_verify_argmax(hf_dirs):
    """bf16 guarantee: each emitted token is the verify-mode argmax of its prefix up to the
    rounding difference between a (gamma+1)-token and a full-sequence pass (tolerance below)."""
    model = qj.load(hf_dirs["llama"][0], dtype="bfloat16", quant="w4", method="rtn")
    prompts = ragged_prompts(3)
    out = qj.generate(model, prompts, max_new_tokens=20, mode="qspec", draft="w4a8", gamma=3)
    # One right-padded causal pass for all sequences (one compilation instead of one per length).
    seqs = [p + gen for p, gen in zip(prompts, out.tokens)]
    padded = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, s in enumerate(seqs):
        padded[i, :len(s)] = s
    all_logits = np.asarray(qj.logits(model, padded, mode="w4a16"))
    for i, (p, gen) in enumerate(zip(prompts, out.tokens)):
        logits = all_logits[i, len(p) - 1:len(p) + len(gen) - 1]
        chosen = logits[np.arange(len(gen)), gen]
        tol = 0.02 * np.abs(logits).max(axis=-1)  # about 3 bf16 ulps of the largest logit
        assert np.all(chosen >= logits.max(axis=-1) - tol)


def test_stats_are_consistent(quantized):
    model = qj.QSpecModel(**{**quantized["llama"].__dict__, "eos_ids": ()})
    max_new = 30
    out = qj.generate(model, ragged_prompts(5, n=4), max_new_tokens=max_new, mode="qspec",
                      draft="w4a4", gamma=4)
    s = out.stats
    acc, drafted, cycles = map(np.asarray, (s["accepted"], s["drafted"], s["seq_cycles"]))
    assert np.all(acc <= drafted) and np.all(drafted == 4 * cycles)
    # First token from prefill, then accepted + 1 per cycle, cut at max_new_tokens.
    np.testing.assert_array_equal(s["new_tokens_per_sequence"], np.minimum(max_new, 1 + acc + cycles))
    assert s["acceptance_rate"] == pytest.approx(acc.sum() / drafted.sum())
    assert s["tokens_per_cycle"] == pytest.approx((acc.sum() + cycles.sum()) / cycles.sum())
    kept = np.asarray(s["new_tokens_per_sequence"]).sum() - len(acc)  # minus the prefill tokens
    assert s["committed_tokens_per_cycle"] == pytest.approx(kept / cycles.sum())
    assert s["committed_tokens_per_cycle"] <= s["tokens_per_cycle"]


def test_stop_token_ids_cut_speculative_output_like_verify_mode(quantized):
    """A stop id accepted mid-cycle ends the sequence there: QSpec's output with stop_token_ids
    equals w4a16 decoding's with the same ids (ids taken from the free-running output)."""
    model = quantized["llama"]
    prompts = ragged_prompts(5, n=4)
    free = qj.generate(model, prompts, max_new_tokens=30, mode="w4a16")
    stops = [free.tokens[0][6], free.tokens[2][11]]
    ref = qj.generate(model, prompts, max_new_tokens=30, mode="w4a16", stop_token_ids=stops)
    assert ref.tokens != free.tokens and ref.tokens[0][-1] in stops
    out = qj.generate(model, prompts, max_new_tokens=30, mode="qspec", draft="w4a4", gamma=4,
                      stop_token_ids=stops)
    assert out.tokens == ref.tokens


@pytest.mark.parametrize("draft", ["w4a8", "w4a4"])
def test_folded_norm_quantization_in_the_draft(quantized, monkeypatch, draft):
    """quant.NORM_QUANT_FOLD (the draft's qkv / gate_up inputs quantized with the RMSNorm folded
    into the scale): draft logits within quantization noise of the default path, and QSpec's
    output still exactly verify mode's."""
    from qspec_jax import quant
    model = quantized["llama"]
    prompts = ragged_prompts(21)
    ids = [p + [1] * (12 - len(p)) for p in prompts]
    ref = qj.generate(model, prompts, max_new_tokens=12, mode="w4a16")
    base = np.asarray(qj.logits(model, ids, mode=draft))
    calls, fold = [], quant.rmsnorm_quantize
    monkeypatch.setattr(quant, "rmsnorm_quantize", lambda *a: calls.append(1) or fold(*a))
    monkeypatch.setattr(quant, "NORM_QUANT_FOLD", True)
    jax.clear_caches()  # the flag is read while tracing
    try:
        folded = np.asarray(qj.logits(model, ids, mode=draft))
        out = qj.generate(model, prompts, max_new_tokens=12, mode="qspec", draft=draft, gamma=3)
    finally:
        monkeypatch.setattr(quant, "NORM_QUANT_FOLD", False)
        jax.clear_caches()  # no folded program outlives the test
    assert calls  # the folded path ran (with a QuaRot-rotated model's unit gains and f32 it
    # may give the same codes and, max|x| scaling exactly, the same scales: no difference)
    scale = np.abs(base).max()
    assert np.abs(folded - base).max() <= (0.02 if draft == "w4a8" else 0.1) * scale
    assert out.tokens == ref.tokens


def test_identical_draft_accepts_everything(quantized):
    out = qj.generate(quantized["llama"], ragged_prompts(6), max_new_tokens=16, mode="qspec",
                      draft="w4a16", gamma=3)
    assert out.stats["acceptance_rate"] == 1.0


def test_one_compilation_per_shape(quantized):
    model = quantized["llama"]
    kw = dict(max_new_tokens=24, mode="qspec", draft="w4a8", gamma=2)  # compiled above already
    qj.generate(model, ragged_prompts(7), **kw)
    size = decode_speculative._cache_size()
    qj.generate(model, ragged_prompts(8), **kw)
    qj.generate(model, ragged_prompts(9), seed=5, **kw)
    assert decode_speculative._cache_size() == size


@pytest.mark.parametrize("kwargs, pattern", [
    ({"gamma": 0}, r"gamma .* must be an integer in \[1, 16\]"),
    ({"gamma": 2.5}, r"gamma .* must be an integer"),
    ({"draft": "w8a8"}, "unknown draft mode 'w8a8'"),
    ({"temperature": -0.1}, "temperature must be"),
    ({"top_p": 2.0}, "top_p must be in"),
])
def test_bad_qspec_arguments(quantized, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        qj.generate(quantized["llama"], [[3, 4]], **{"mode": "qspec", **kwargs})


def test_qspec_needs_quantized_model(hf_dirs):
    model = qj.load(hf_dirs["llama"][0], dtype="float32")
    with pytest.raises(ValueError, match="mode 'qspec' needs a quantized model"):
        qj.generate(model, [[3, 4]], mode="qspec")


def test_logits_rejects_ragged_token_ids(quantized):
    with pytest.raises(ValueError, match="rectangular .batch, length. array.*pad the rows"):
        qj.logits(quantized["llama"], [[5, 17, 3], [8, 9]], mode="w4a16")


# ---- lossless sampling -------------------------------------------------------------------------

VOCAB = 12


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("small_vocab")
    # Large weights: peaked distributions on which the w4a4 draft is often rejected.
    build_hf_model("llama", seed=3, vocab_size=VOCAB, eos_token_id=None, bos_token_id=None,
                   pad_token_id=None, initializer_range=0.5).save_pretrained(path)
    return qj.load(str(path), dtype="float32", quant="w4", method="rtn")


def filtered_probs(logits, temperature, top_k, top_p):
    """Independent float64 NumPy version of the sampling distribution."""
    z = logits.astype(np.float64) / temperature
    if top_k:
        z = np.where(z < np.sort(z)[-top_k], -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]
    keep = np.zeros_like(p, bool)
    keep[order[before < top_p]] = True
    p = np.where(keep, p, 0)
    return p / p.sum()


def exact_joint(model, prompt, n_tokens, **sampling):
    """Exact verify-mode (w4a16) probability of every continuation of length n_tokens."""
    seqs, probs = [list(prompt)], np.ones(1)
    for _ in range(n_tokens):
        logits = np.asarray(qj.logits(model, np.asarray(seqs), mode="w4a16"))[:, -1]
        step = np.stack([filtered_probs(l, **sampling) for l in logits])  # [S, V]
        seqs = [s + [v] for s in seqs for v in range(VOCAB)]
        probs = (probs[:, None] * step).reshape(-1)
    return probs.reshape((VOCAB,) * n_tokens)


@pytest.mark.parametrize("sampling", [dict(temperature=1.0, top_k=0, top_p=1.0),
                                      dict(temperature=0.7, top_k=6, top_p=0.9)])
def test_sampling_is_lossless(small_vocab_model, sampling):
    """The first tokens of QSpec (gamma=3: prefill token + one full cycle) follow the exact
    verify-mode joint distribution. Chi-square tests on each marginal and on the pair (t2, t3),
    each at false-alarm rate 1e-3 (5 tests per case)."""
    model = small_vocab_model
    prompt = [3, 7, 1, 4]
    n = 4000
    out = qj.generate(model, [prompt] * n, max_new_tokens=4, mode="qspec", draft="w4a4", gamma=3,
                      seed=11, **sampling)
    samples = np.asarray(out.tokens)  # [n, 4]
    assert out.stats["acceptance_rate"] < 0.9  # the rejection path is exercised
    joint = exact_joint(model, prompt, 4, **sampling)
    for pos in range(4):
        marginal = joint.sum(axis=tuple(a for a in range(4) if a != pos))
        counts = np.bincount(samples[:, pos], minlength=VOCAB)
        _assert_fits(counts, marginal)
    pair = joint.sum(axis=(0, 3)).reshape(-1)
    _assert_fits(np.bincount(samples[:, 1] * VOCAB + samples[:, 2], minlength=VOCAB ** 2), pair)


def _assert_fits(counts, probs, min_expected=5.0):
    """Chi-square goodness of fit, pooling cells with small expectation."""
    expected = probs * counts.sum()
    assert counts[probs == 0].sum() == 0, "sampled a token outside the distribution's support"
    big = expected >= min_expected
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] < min_expected:
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * obs.sum() / exp.sum()
    assert chisquare(obs, exp).pvalue > 1e-3


def test_jittable_function_composes_with_user_jit(quantized):
    """decode_speculative inside a user's own jax.jit, arrays in and out."""
    import jax
    import jax.numpy as jnp
    from qspec_jax.model import KVCache
    from qspec_jax.sampling import SamplingConfig

    model = quantized["llama"]
    prompts = ragged_prompts(12, n=2)
    tokens = np.zeros((2, 16), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    lens = np.array([len(p) for p in prompts], np.int32)

    @jax.jit
    def user_fn(state, tokens, lens, rng):
        cache = KVCache.create(model.cfg, 2, 64, model.dtype)
        res = decode_speculative(model.graphdef, state, tokens, lens, cache, rng,
                                 SamplingConfig().arrays(), jnp.asarray(model.eos_ids, jnp.int32),
                                 max_new_tokens=10, greedy=True, draft_mode="w4a8", gamma=3)
        return res.tokens, res.num_generated, res.lengths

    toks, counts, lengths = user_fn(model.state, tokens, lens, jax.random.PRNGKey(0))
    ref = qj.generate(model, prompts, max_new_tokens=10, mode="w4a16").tokens
    assert [np.asarray(toks)[i, :c].tolist() for i, c in enumerate(np.asarray(counts))] == ref
    # Cache holds the prompt and every generated token but the last (the next input), as in
    # plain decoding: the arrays can seed another call.
    np.testing.assert_array_equal(np.asarray(lengths), lens + np.asarray(counts) - 1)


# ---- gamma="auto" -------------------------------------------------------------------------------
# The greedy gamma="auto" tests on the llama model make one request shape (3 ragged prompts,
# 40 new tokens, max_gamma 4, draft w4a8 unless the test needs another), so that they share the
# compiled programs (the auto loop, plain w4a16 decoding): compiling dominates their run time.


def _auto_in_loop(model, prompts, max_new_tokens, costs):
    """decode_speculative with gamma="auto" called directly (the jittable path: no host-side
    guard), returning (token lists, stats). Arguments as generate passes them for the same
    request with cheap drafts (so the program is the one generate compiles), then ``costs``."""
    import jax
    import jax.numpy as jnp

    max_gamma = len(costs) - 1
    fn, args, kwargs = generate_call(model, prompts, max_new_tokens=max_new_tokens, mode="qspec",
                                     gamma="auto", max_gamma=max_gamma,
                                     cycle_costs=[1.0 + 0.01 * g for g in range(max_gamma + 1)])
    assert fn is decode_speculative and kwargs["gamma"] == "auto" and kwargs["greedy"]
    res = fn(*args, **{**kwargs, "cycle_costs": jnp.asarray(costs, jnp.float32)})
    toks, counts = np.asarray(res.tokens), np.asarray(res.num_generated)
    return [toks[i, :c].tolist() for i, c in enumerate(counts)], jax.device_get(res.stats)


def test_auto_gamma_follows_costs_and_stays_exact(quantized):
    model = quantized["llama"]
    prompts = ragged_prompts(13)
    ref = qj.generate(model, prompts, max_new_tokens=40, mode="w4a16").tokens
    # Drafting 10x dearer than a verify step: plain decoding (gamma 0) except the probes that
    # keep the acceptance estimate fresh (the first cycle, then one every PROBE_EVERY cycles;
    # they draft 1 token here, the most that could pay at full acceptance, floored at 1).
    from qspec_jax.speculative import PROBE_EVERY
    toks, stats = _auto_in_loop(model, prompts, 40, [1, 10, 20, 30, 40])
    g = np.asarray(stats["gamma_cycles"])
    assert toks == ref
    assert g[0] > 0 and g[2:].sum() == 0 and 1 <= g[1] <= g.sum() // PROBE_EVERY + 1
    # Drafts almost free: long drafts win at any sensible acceptance.
    cheap = qj.generate(model, prompts, max_new_tokens=40, mode="qspec", gamma="auto", max_gamma=4,
                        cycle_costs=[1, 1.01, 1.02, 1.03, 1.04])
    g = np.asarray(cheap.stats["gamma_cycles"])
    assert cheap.tokens == ref
    assert g[4] == g.sum()
    assert 0 < cheap.stats["acceptance_estimate"] <= 1


def test_auto_gamma_estimate_tracks_measured_acceptance(quantized):
    """From the first cycle on, the estimate is decayed counts of measured draft trials with a
    weak prior: with drafts always accepted (w4a16 drafting for w4a16) it rises to ~1."""
    from qspec_jax.speculative import PRIOR_ACCEPTANCE
    model = quantized["llama"]
    prompts = ragged_prompts(15)
    out = qj.generate(model, prompts, max_new_tokens=30, mode="qspec", gamma="auto", max_gamma=3,
                      draft="w4a16", cycle_costs=[1, 1.6, 2.2, 2.8])
    assert out.stats["acceptance_rate"] == 1.0
    assert out.stats["acceptance_estimate"] > 0.99 > PRIOR_ACCEPTANCE  # the prior has decayed
    g = np.asarray(out.stats["gamma_cycles"])
    # At acceptance 1 the table's best is gamma 3 (4 tokens for 2.8); the estimate gets there
    # after the first probe, so nearly every cycle drafts 3.
    assert g[3] >= g.sum() - 2


def test_auto_gamma_decodes_plainly_when_drafting_cannot_pay(quantized, caplog):
    import logging
    model = quantized["llama"]
    prompts = ragged_prompts(16)
    ref = qj.generate(model, prompts, max_new_tokens=40, mode="w4a16")
    with caplog.at_level(logging.INFO, logger="qspec_jax"):
        # Best possible at full acceptance: 1.0 (gamma 0); then 2/2.5, 3/4, 4/5.5, 5/7.
        out = qj.generate(model, prompts, max_new_tokens=40, mode="qspec", gamma="auto",
                          max_gamma=4, cycle_costs=[1, 2.5, 4, 5.5, 7])
    assert out.tokens == ref.tokens
    assert out.stats["plain_decoding"] and out.stats["drafted"] == [0, 0, 0]
    assert out.stats["gamma_cycles"] == [ref.stats["decode_steps"], 0, 0, 0, 0]
    assert "drafting cannot pay here" in caplog.text
    # It is w4a16 decoding's own program: same cache length (no speculation lookahead), same
    # function and arguments, so no compilation of its own (the timing equals w4a16 AR's).
    from qspec_jax.generate import decode_autoregressive
    plain_call = qj.decode_call(model, prompts, max_new_tokens=40, mode="qspec", gamma="auto",
                                max_gamma=4, cycle_costs=[1, 2.5, 4, 5.5, 7])
    ar_call = qj.decode_call(model, prompts, max_new_tokens=40, mode="w4a16")
    assert plain_call.cache_len == ar_call.cache_len == out.stats["cache_len"]
    assert plain_call.kwargs == ar_call.kwargs and plain_call.fn is ar_call.fn
    size = decode_autoregressive._cache_size()
    plain_call.run()
    assert decode_autoregressive._cache_size() == size
    # Just above the guard's margin: the speculative loop runs. At full acceptance gamma 1
    # gives 2 tokens for 1.9: 1.053x; the longer drafts less (3/2.9, 4/3.9, 5/4.9).
    out = qj.generate(model, prompts, max_new_tokens=40, mode="qspec", gamma="auto", max_gamma=4,
                      cycle_costs=[1, 1.9, 2.9, 3.9, 4.9])
    assert "plain_decoding" not in out.stats and out.tokens == ref.tokens


def test_auto_gamma_measures_costs_once(quantized, monkeypatch):
    model = qj.QSpecModel(**{**quantized["llama"].__dict__, "cycle_costs": {}})
    prompts = ragged_prompts(14)
    # The cost table is measured before generate allocates its cache (the timed forwards
    # allocate their own: both at once doubled the peak, 2 x 64 GiB at 8B batch 16 x 32k).
    from qspec_jax import api, cost_model
    events, create, measure = [], api.KVCache.create, cost_model.measure_cycle_costs
    monkeypatch.setattr(api.KVCache, "create", lambda *a, **k: events.append("cache") or create(*a, **k))
    monkeypatch.setattr(cost_model, "measure_cycle_costs",
                        lambda *a, **k: events.append("measure") or measure(*a, **k))
    out = qj.generate(model, prompts, max_new_tokens=40, mode="qspec", gamma="auto", max_gamma=4)
    assert events[0] == "measure" and events[-1] == "cache"
    assert len(model.cycle_costs) == 1
    costs = next(iter(model.cycle_costs.values()))
    assert costs.shape == (5,) and np.all(costs > 0)
    qj.generate(model, prompts, max_new_tokens=40, mode="qspec", gamma="auto", max_gamma=4)
    assert len(model.cycle_costs) == 1
    assert out.tokens == qj.generate(model, prompts, max_new_tokens=40, mode="w4a16").tokens


def test_cost_model_prediction():
    from qspec_jax.cost_model import best_gamma, expected_tokens, predicted_speedup
    assert expected_tokens(3, 0.5) == pytest.approx(1.875)
    costs = [1.0, 1.2, 1.4, 1.6]  # draft 0.1 + verify growing 0.1 per token
    s = predicted_speedup(costs, 0.9)
    assert s[0] == 1.0 and s[3] == pytest.approx((1 + 0.9 + 0.81 + 0.729) / 1.6)
    assert best_gamma(costs, 0.9) == 3 and best_gamma(costs, 0.05) == 0


def test_per_token_acceptance_inverts_the_accepted_fraction():
    """generate's acceptance_rate (accepted / drafted) -> the per-token rate a of E(g, a):
    with a the i.i.d. model's rate, gamma-draft cycles accept (a + ... + a^g) / g of their
    drafts and emit E(g, a) = 1 + g * fraction tokens; checked against a simulation too."""
    from qspec_jax.cost_model import expected_tokens, per_token_acceptance
    for g, a in ((1, 0.3), (3, 0.85), (4, 0.5), (7, 0.97)):
        frac = sum(a ** i for i in range(1, g + 1)) / g
        assert per_token_acceptance(frac, g) == pytest.approx(a, abs=1e-9)
        assert expected_tokens(g, per_token_acceptance(frac, g)) == pytest.approx(1 + g * frac)
    assert per_token_acceptance(0.0, 3) == pytest.approx(0.0, abs=1e-9)
    assert per_token_acceptance(1.0, 3) == pytest.approx(1.0, abs=1e-9)
    rng = np.random.RandomState(0)  # cycles of 3 drafts, each accepted w.p. 0.8 until a rejection
    accepted = np.argmin(np.concatenate([rng.rand(200_000, 3) < 0.8, np.zeros((200_000, 1), bool)], 1), 1)
    assert per_token_acceptance(accepted.mean() / 3, 3) == pytest.approx(0.8, abs=3e-3)
    for bad in ((1.2, 3), (-0.1, 3), (0.5, 0)):
        with pytest.raises(ValueError):
            per_token_acceptance(*bad)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"gamma": "auto", "max_gamma": 0}, r"max_gamma must be an integer in \[1, 16\]"),
    ({"gamma": "auto", "max_gamma": 2, "cycle_costs": [1, 2]}, "cycle_costs must be 3 positive"),
    ({"gamma": "auto", "max_gamma": 2, "cycle_costs": [1, -2, 3]}, "cycle_costs must be 3 positive"),
    ({"gamma": "fast"}, "or 'auto'"),
])
def test_bad_auto_arguments(quantized, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        qj.generate(quantized["llama"], [[3, 4]], mode="qspec", **kwargs)


# ---- cheaper drafts: windowed attention, layer skipping -----------------------------------------

@pytest.mark.parametrize("opts", [dict(draft_window=(2, 4)), dict(draft_layers=[0]),
                                  dict(draft_window=(1, 3), draft_layers=[1])])
def test_cheaper_drafts_stay_exact(quantized, opts):
    model = quantized["llama"]
    prompts = ragged_prompts(15)
    ref = qj.generate(model, prompts, max_new_tokens=24, mode="w4a16").tokens
    out = qj.generate(model, prompts, max_new_tokens=24, mode="qspec", gamma=3, **opts)
    assert out.tokens == ref
    full = qj.generate(model, prompts, max_new_tokens=24, mode="qspec", gamma=3)
    # A weaker draft accepts less (a sanity check that the option does something).
    assert out.stats["acceptance_rate"] < full.stats["acceptance_rate"]


@pytest.mark.parametrize("opts", [dict(draft_layers=[0]), dict(draft_window=(2, 4)),
                                  dict(draft_window=(1, 3), draft_layers=[1])])
def test_auto_gamma_with_cheaper_drafts_drafts_read_only(quantized, opts):
    """gamma="auto" with draft_layers / draft_window runs its drafts as read-only static scans
    (skipped layers skipped, the window applied there too): one loop + one conditional in the
    compiled program, like auto without them; cycles at gamma 3 draft exactly what fixed gamma
    3 drafts (same acceptance), and the output is w4a16's."""
    model = quantized["llama"]
    prompts = ragged_prompts(15)
    ref = qj.generate(model, prompts, max_new_tokens=24, mode="w4a16").tokens
    fixed = qj.generate(model, prompts, max_new_tokens=24, mode="qspec", gamma=3, **opts)
    # Equal cycle costs: gamma 3 is the best choice at any acceptance (weak drafts included).
    kw = dict(max_new_tokens=24, mode="qspec", gamma="auto", max_gamma=3,
              cycle_costs=[1, 1, 1, 1], **opts)
    auto = qj.generate(model, prompts, **kw)
    g = np.asarray(auto.stats["gamma_cycles"])
    assert auto.tokens == ref == fixed.tokens and g[3] == g.sum()
    assert auto.stats["acceptance_rate"] == fixed.stats["acceptance_rate"] < 1.0
    fn, args, kwargs = generate_call(model, prompts, **kw)
    lines = fn.lower(*args, **kwargs).compile().as_text().splitlines()
    loops = [l for l in lines if re.search(r"= .*\bwhile\(", l) and "known_trip_count" not in l]
    conds = [l for l in lines if re.search(r"= .*\bconditional\(", l)]
    assert (len(loops), len(conds)) == (1, 1)


def test_auto_draft_window_turns_the_window_on_only_where_it_pays(quantized, monkeypatch):
    """draft_window="auto" (gamma="auto"): the windowed draft where the cost tables say the
    full-cache draft cannot pay and the windowed one can; the full draft where it can pay;
    plain w4a16 where neither can. Outputs stay w4a16's; stats["draft_window"] says what ran."""
    from qspec_jax import api, cost_model
    model = quantized["llama"]
    prompts = ragged_prompts(15)
    ref = qj.generate(model, prompts, max_new_tokens=24, mode="w4a16").tokens
    monkeypatch.setattr(api, "AUTO_DRAFT_WINDOW", (1, 3))  # span 4: caches of 16+ qualify
    tables = {}

    def fake_costs(model, batch, context, max_gamma, draft, *, draft_window=None, **kw):
        return np.asarray(tables[draft_window], np.float64)[:max_gamma + 1]

    monkeypatch.setattr(cost_model, "measure_cycle_costs", fake_costs)
    cannot, can = [1, 2, 3, 4], [1, 1, 1, 1]  # (g + 1) x / (g + 1): 1.0; equal costs: 4x at a = 1
    kw = dict(max_new_tokens=24, mode="qspec", gamma="auto", max_gamma=3, draft_window="auto")
    saved = dict(model.cycle_costs)  # the shared model's calibrations: the fakes must not stay
    try:
        for full, windowed, want, plain in ((cannot, can, [1, 3], False), (can, cannot, None, False),
                                            (cannot, cannot, None, True)):
            tables.clear()
            model.cycle_costs.clear()
            tables.update({None: full, (1, 3): windowed})
            out = qj.generate(model, prompts, **kw)
            assert out.tokens == ref and out.stats["draft_window"] == want, (full, windowed)
            assert bool(out.stats.get("plain_decoding")) == plain
            assert plain or out.stats["gamma_cycles"][3] > 0
    finally:
        model.cycle_costs.clear()
        model.cycle_costs.update(saved)
    for bad in (dict(gamma=3), dict(cycle_costs=[1, 1, 1, 1]), dict(draft_window="window")):
        with pytest.raises(ValueError, match="draft_window="):
            qj.generate(model, prompts, **{**kw, **bad})


def test_windowed_attention_reference_masks_the_middle():
    from qspec_jax.model import attention_reference
    r = np.random.RandomState(0)
    q = r.randn(1, 1, 2, 8).astype(np.float32)
    k = r.randn(1, 1, 32, 8).astype(np.float32)
    v = r.randn(1, 1, 32, 8).astype(np.float32)
    pos = np.array([[20]])
    out = attention_reference(q, k, v, pos, window=(3, 5))
    keep = np.r_[0:3, 16:21]  # sink 0..2 and the 5 most recent 16..20
    ref = attention_reference(q, k[:, :, keep], v[:, :, keep], np.array([[len(keep) - 1]]))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"draft_window": (4,)}, r"draft_window must be \(sink, window\)"),
    ({"draft_window": (0, 0)}, r"draft_window must be \(sink, window\)"),
    ({"draft_layers": [5]}, r"draft_layers must be a non-empty list of layer indices in \[0, 2\)"),
    ({"draft_layers": []}, "draft_layers must be a non-empty list"),
])
def test_bad_draft_options(quantized, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        qj.generate(quantized["llama"], [[3, 4]], mode="qspec", **kwargs)


def test_sampling_stays_lossless_with_cheaper_drafts(small_vocab_model):
    model = small_vocab_model
    prompt = [3, 7, 1, 4]
    n = 3000
    sampling = dict(temperature=1.0, top_k=0, top_p=1.0)
    out = qj.generate(model, [prompt] * n, max_new_tokens=3, mode="qspec", draft="w4a8", gamma=2,
                      seed=5, draft_window=(1, 2), draft_layers=[1], **sampling)
    samples = np.asarray(out.tokens)
    joint = exact_joint(model, prompt, 3, **sampling)
    for pos in range(3):
        marginal = joint.sum(axis=tuple(a for a in range(3) if a != pos))
        _assert_fits(np.bincount(samples[:, pos], minlength=VOCAB), marginal)


def test_sampling_stays_lossless_with_auto_gamma(small_vocab_model):
    """gamma="auto" (whole cycles picked by switch: read-only drafts in a static scan, then the
    read-only verify) keeps the exact verify-mode distribution; the costs make several gammas win."""
    model = small_vocab_model
    prompt = [3, 7, 1, 4]
    n = 3000
    sampling = dict(temperature=1.0, top_k=0, top_p=1.0)
    out = qj.generate(model, [prompt] * n, max_new_tokens=3, mode="qspec", draft="w4a4",
                      gamma="auto", max_gamma=2, cycle_costs=[1.0, 1.2, 1.4], seed=9, **sampling)
    assert "plain_decoding" not in out.stats and np.asarray(out.stats["gamma_cycles"])[1:].sum() > 0
    samples = np.asarray(out.tokens)
    joint = exact_joint(model, prompt, 3, **sampling)
    for pos in range(3):
        marginal = joint.sum(axis=tuple(a for a in range(3) if a != pos))
        _assert_fits(np.bincount(samples[:, pos], minlength=VOCAB), marginal)
    pair = joint.sum(axis=0).reshape(-1)
    _assert_fits(np.bincount(samples[:, 1] * VOCAB + samples[:, 2], minlength=VOCAB ** 2), pair)


def test_draft_layer_search(quantized):
    from qspec_jax.draft_search import draft_agreement, predicted_speedup, select_draft_layers
    model = quantized["llama"]
    tokens = np.random.RandomState(16).randint(3, 128, (4, 24))
    assert draft_agreement(model, tokens, draft="w4a16") == 1.0
    layers, history = select_draft_layers(model, tokens, draft="w4a8", max_gamma=3)
    assert history[0].layers == (0, 1) and history[-1].layers == layers
    speeds = [h.predicted_speedup for h in history]
    assert speeds == sorted(speeds) and len(set(speeds)) == len(speeds)  # strictly improving
    # The cost model: perfect agreement and a free draft give E(g) = g + 1 tokens per step.
    assert predicted_speedup(1.0, 0, 10**6, max_gamma=3)[0] == pytest.approx(4.0, rel=1e-5)
    assert predicted_speedup(0.0, 2, 2)[1] == 0  # a useless draft: plain decoding
    # (24 new tokens from 3 prompts, as in the tests above: programs already compiled there.)
    out = qj.generate(model, ragged_prompts(17), max_new_tokens=24, mode="qspec", gamma=3,
                      draft_layers=list(layers))
    assert out.tokens == qj.generate(model, ragged_prompts(17), max_new_tokens=24, mode="w4a16").tokens


def test_cycle_costs_time_only_the_requested_verify_widths(monkeypatch):
    """measure_cycle_costs(verify_gammas=...) times the draft once and the verify pass at the
    requested widths (plus gamma 0 and max), interpolating the others linearly in gamma."""
    from qspec_jax import cost_model
    calls = []

    def fake_time_forward(model, batch, context, T, mode, **kw):
        calls.append((T, mode))
        return 0.5 if mode == "w4a8" else 1.0 + 0.1 * T ** 2  # convex in T: interpolation shows

    monkeypatch.setattr(cost_model, "time_forward", fake_time_forward)
    costs = cost_model.measure_cycle_costs(None, 4, 128, 5, "w4a8", verify_gammas=[2])
    assert calls == [(1, "w4a8"), (1, "w4a16"), (3, "w4a16"), (6, "w4a16")]
    timed = {0: 1.1, 2: 1.9, 5: 4.6}
    verify = np.interp(np.arange(6), list(timed), list(timed.values()))
    np.testing.assert_allclose(costs, [g * 0.5 + verify[g] for g in range(6)])
    assert costs[2] == pytest.approx(2 * 0.5 + 1.9)


def test_auto_calibration_stops_when_drafts_cannot_pay(monkeypatch):
    """gamma="auto"'s calibration (early_exit_gain): with a draft step no cheaper than about a
    verify step, no gamma can pay even if wider verify passes cost nothing more, so only the draft
    and the 1-token verify step are timed (two compiled programs instead of one per verify width),
    and the lower-bound costs it returns lead to the same decision (plain decoding)."""
    from qspec_jax import api, cost_model
    calls = []
    t_draft = {"w4a8": 1.1}  # = the 1-token verify step

    def fake_time_forward(model, batch, context, T, mode, **kw):
        calls.append((T, mode))
        return t_draft[mode] if mode != "w4a16" else 1.0 + 0.1 * T

    monkeypatch.setattr(cost_model, "time_forward", fake_time_forward)
    costs = cost_model.measure_cycle_costs(None, 1, 128, 7, "w4a8", verify_gammas=[1, 3],
                                           early_exit_gain=api.AUTO_MIN_GAIN)
    assert calls == [(1, "w4a8"), (1, "w4a16")]
    np.testing.assert_allclose(costs, [g * 1.1 + 1.1 for g in range(8)])
    assert not api._can_pay(costs)
    # Without the early exit, the same draft times every requested width; still no gamma pays.
    calls.clear()
    full = cost_model.measure_cycle_costs(None, 1, 128, 7, "w4a8", verify_gammas=[1, 3])
    assert calls == [(1, "w4a8")] + [(g + 1, "w4a16") for g in (0, 1, 3, 7)]
    assert not api._can_pay(full) and np.all(full >= costs)
    # A draft at half a verify step can pay: every width is timed as before.
    t_draft["w4a8"] = 0.5
    calls.clear()
    cost_model.measure_cycle_costs(None, 1, 128, 7, "w4a8", verify_gammas=[1, 3],
                                   early_exit_gain=api.AUTO_MIN_GAIN)
    assert len(calls) == 5
    # The bound's edge: with max_gamma 7 and a 3% minimum gain, drafts dearer than
    # (8 - 1.03) / (7 * 1.03) = 0.9667 of a verify step cannot pay.
    assert cost_model.no_gamma_can_pay(0.968, 1.0, 7, 1.03)
    assert not cost_model.no_gamma_can_pay(0.966, 1.0, 7, 1.03)
    assert cost_model.no_gamma_can_pay(0.95, 1.0, 1, 1.03)  # gamma <= 1: (2 - 1.03) / 1.03 = 0.94


def test_time_forward_times_the_draft_window_and_layers(monkeypatch, quantized):
    """time_forward hands the draft's attention window and layer subset to the timed program
    (it used to overwrite ``window`` with the model's sliding window, None for Llama, so every
    windowed draft, in the cost table of gamma="auto" too, was timed reading the whole cache)."""
    from qspec_jax import cost_model
    seen = []

    def fake(graphdef, state, cache, start, steps, **kw):
        seen.append((kw["T"], kw["mode"], kw["window"], kw["layers"], cache.k.shape[3]))
        return cache, jnp.zeros((start.shape[0],), jnp.float32)

    monkeypatch.setattr(cost_model, "_timed_forwards", fake)
    model = quantized["llama"]
    cost_model.time_forward(model, 2, 100, 1, "w4a8", window=(4, 28), layers=(0,), steps=1, repeats=1)
    cost_model.measure_cycle_costs(model, 2, 100, 1, "w4a8", draft_window=(2, 8), steps=1, repeats=1)
    # 3 calls per timing (warm-up, then loops of steps and 3 * steps); cache 101 -> 128 (bucket)
    assert seen[:3] == [(1, "w4a8", (4, 28), (0,), 128)] * 3
    assert {s[:4] for s in seen[3:]} == {(1, "w4a8", (2, 8), None), (1, "w4a16", None, None),
                                         (2, "w4a16", None, None)}


def test_no_cache_copies_in_the_compiled_loops(quantized, small_vocab_model):
    """The decode loops update the KV cache in place: XLA's optimized program holds no copy of
    a cache-sized buffer (gamma="auto" used to copy K and V every cycle after its lax.switch,
    which wrote the cache; now the switch only reads it and returns the new K/V blocks), and
    no more data-dependent loops or conditionals than needed (host syncs on the GPU).

    The programs inspected are the ones generate runs in the tests above, captured with the
    same arguments: plain w4a16 and gamma 3 decoding (test_greedy_qspec_equals_verify_mode_greedy),
    greedy gamma="auto" (test_auto_gamma_follows_costs_and_stays_exact) and sampled gamma="auto"
    (test_sampling_stays_lossless_with_auto_gamma), and gamma 3 after a chunked prefill (its
    chunk loop has a static trip count: no host sync). Lowering the same call gives back the
    executable jit compiled for them, so in a full run this test compiles nothing itself."""
    from qspec_jax.generate import decode_autoregressive
    model = quantized["llama"]
    sampled = dict(temperature=1.0, top_k=0, top_p=1.0, seed=9)
    calls = [
        generate_call(model, ragged_prompts(0), max_new_tokens=24, mode="w4a16"),
        generate_call(model, ragged_prompts(0), max_new_tokens=24, mode="qspec", draft="w4a8",
                      gamma=3),
        generate_call(model, ragged_prompts(13), max_new_tokens=40, mode="qspec", gamma="auto",
                      max_gamma=4, cycle_costs=[1, 1.01, 1.02, 1.03, 1.04]),
        generate_call(small_vocab_model, [[3, 7, 1, 4]] * 3000, max_new_tokens=3, mode="qspec",
                      draft="w4a4", gamma="auto", max_gamma=2, cycle_costs=[1.0, 1.2, 1.4],
                      **sampled),
        # Prompts prefilled in chunks (test_qspec_with_prefill_chunks_equals_verify_mode): the
        # chunk loop carries the cache too.
        generate_call(model, ragged_prompts(7, n=3) + [list(range(3, 21))], max_new_tokens=16,
                      mode="qspec", gamma=3, prefill_chunk=4),
    ]
    assert calls[0][0] is decode_autoregressive and calls[1][0] is decode_speculative
    assert [(c[2].get("gamma"), c[2]["greedy"], c[2]["prefill_chunk"]) for c in calls] == [
        (None, True, 16), (3, True, 16), ("auto", True, 16), ("auto", False, 16), (3, True, 4)]
    for fn, args, kwargs in calls:
        cache = args[4]
        shape = f"[{','.join(map(str, cache.kv.shape))}]"
        text = fn.lower(*args, **kwargs).compile().as_text()
        assert shape in text  # the cache buffer is found by this shape
        copies = [l for l in text.splitlines() if " copy(" in l and shape in l]
        assert not copies, (kwargs, copies[:3])
        # ... and K or V is never taken out of it whole ([L, B, KVH, S, hd]: a slice the size of
        # half the cache); the model reads one layer's slab or hands the kernel the whole array.
        half = f"[{','.join(map(str, cache.k.shape))}]"
        assert half not in text, (kwargs, [l for l in text.splitlines() if half in l][:3])
        # Data-dependent control flow (a loop with no known trip count, a conditional) costs a
        # device-to-host sync each time it runs on the GPU: the decode loop's test in every
        # program, plus gamma="auto"'s one switch per cycle (its drafts are static scans
        # inside the switch's branches, not a loop of a traced length: that cost g + 1 more
        # syncs per cycle, measured as 0.9-1.2 ms per 8B cycle).
        lines = text.splitlines()
        dynamic_loops = [l for l in lines if re.search(r"= .*\bwhile\(", l)
                         and "known_trip_count" not in l]
        conditionals = [l for l in lines if re.search(r"= .*\bconditional\(", l)]
        auto = kwargs.get("gamma") == "auto"
        assert (len(dynamic_loops), len(conditionals)) == ((1, 1) if auto else (1, 0)), kwargs
