"""Plain decoding behaviour: EOS, limits, sampling parameters, no recompilation, errors."""

from __future__ import annotations

import numpy as np
import pytest

import qspec_jax as qj
from qspec_jax.generate import decode_autoregressive


@pytest.fixture(scope="module")
def model(hf_dirs):
    return qj.load(hf_dirs["llama"][0], dtype="float32")


PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15]]
# Tests decode 8 new tokens from these prompts where the number does not matter, so that they
# share compiled programs (compiling dominates their run time on CPU).


def test_eos_stops_each_sequence(model):
    free = qj.generate(model, PROMPTS, max_new_tokens=8)
    # Make the 4th token of sequence 0 an EOS: that sequence must stop there, the other not.
    eos = free.tokens[0][3]
    model_eos = qj.QSpecModel(**{**model.__dict__, "eos_ids": (eos,)})
    out = qj.generate(model_eos, PROMPTS, max_new_tokens=8)
    assert out.tokens[0] == free.tokens[0][:free.tokens[0].index(eos) + 1]
    if eos not in free.tokens[1]:
        assert out.tokens[1] == free.tokens[1]
    assert out.stats["new_tokens_per_sequence"][0] == len(out.tokens[0])


def test_stop_token_ids_end_sequences_like_eos(model):
    """stop_token_ids: extra ids that end a sequence (kept in the output); repeats of the model's
    EOS ids are fine; bad values fail before any work."""
    free = qj.generate(model, PROMPTS, max_new_tokens=8)
    stop = free.tokens[1][2]
    out = qj.generate(model, PROMPTS, max_new_tokens=8, stop_token_ids=[stop, stop])
    assert out.tokens[1] == free.tokens[1][:free.tokens[1].index(stop) + 1]
    t0 = free.tokens[0]
    assert out.tokens[0] == (t0[:t0.index(stop) + 1] if stop in t0 else t0)
    from qspec_jax.api import stop_ids
    assert stop_ids(model, [stop, *model.eos_ids, stop]) == tuple(dict.fromkeys([*model.eos_ids, stop]))
    for bad in ([128], [-1], ["7"], "7", [True], 2.0):
        with pytest.raises(ValueError, match=r"stop_token_ids must be token ids in \[0, 128\)"):
            qj.generate(model, PROMPTS, max_new_tokens=8, stop_token_ids=bad)


def test_no_retrace_between_calls_with_same_shapes(model):
    # (max_new_tokens=6: programs no other test compiles, whatever the test order.)
    qj.generate(model, PROMPTS, max_new_tokens=6)
    size = decode_autoregressive._cache_size()
    # Other prompts of the same padded length, other sampling values, other seed: same program.
    qj.generate(model, [[3, 4], [8] * 9], max_new_tokens=6, temperature=0.7, top_k=5, seed=3)
    qj.generate(model, [[3, 4, 5, 6], [8]], max_new_tokens=6, temperature=1.3, top_p=0.5, seed=4)
    # greedy vs sampling and filtering (top-k/top-p) on or off are static: one more program
    assert decode_autoregressive._cache_size() == size + 1


def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
    greedy = qj.generate(model, PROMPTS, max_new_tokens=8).tokens
    a = qj.generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=1).tokens
    b = qj.generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=1).tokens
    c = qj.generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=2).tokens
    assert a == b and a != c
    assert qj.generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, top_k=1).tokens == greedy
    assert qj.generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=1e-6).tokens == greedy


def test_sampled_first_token_distribution(model):
    """The first sampled token follows softmax(logits / T) restricted by top-k (chi-square)."""
    from scipy.stats import chisquare
    prompt = [5, 6, 7]
    logits = np.asarray(qj.logits(model, [prompt]))[0, -1] / 0.5
    keep = np.argsort(-logits)[:4]
    p = np.exp((logits[keep] - logits[keep].max()).astype(np.float64))
    p /= p.sum()
    n = 1200
    out = qj.generate(model, [prompt] * n, max_new_tokens=1, temperature=0.5, top_k=4, seed=7)
    firsts = np.array([t[0] for t in out.tokens])
    assert set(firsts) <= set(keep.tolist())
    counts = np.array([(firsts == k).sum() for k in keep])
    # False-alarm rate 1e-3 for a correct sampler.
    assert chisquare(counts, p * counts.sum()).pvalue > 1e-3


@pytest.mark.parametrize("kwargs, pattern", [
    ({"temperature": -1.0}, "temperature must be a number >= 0"),
    ({"top_k": -2}, "top_k must be an integer >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ({"mode": "w4a16"}, "mode 'w4a16' is not available for this unquantized"),
    ({"mode": "int3"}, "unknown mode 'int3'; valid modes: w16, w4a16"),
    ({"max_len": 8}, r"KV cache \(max_len=8\) cannot hold the longest prompt \(7 tokens\)"),
])
def test_bad_arguments_fail_clearly(model, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        qj.generate(model, PROMPTS, **{"max_new_tokens": 4, **kwargs})


def test_bad_prompts_fail_clearly(model):
    with pytest.raises(ValueError, match="empty prompt"):
        qj.generate(model, [[]])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 128\)"):
        qj.generate(model, [[1, 500]])
    with pytest.raises(ValueError, match="no tokenizer files"):
        qj.generate(model, ["hello"])


def test_warns_past_max_position_embeddings(model, caplog):
    import logging
    with caplog.at_level(logging.WARNING, logger="qspec_jax"):
        qj.generate(model, [[5] * 500], max_new_tokens=20)  # tiny config: 512 positions
    assert "exceeds the model's max_position_embeddings (512)" in caplog.text


def test_chunked_prefill_matches_one_forward(model, monkeypatch):
    """Prefill in chunks (the last one overlapping the one before when the chunk does not divide
    the prompt) = one forward over the whole prompt: logits at each ragged prompt's last token
    and the cache at every prompt position (f32 model; only summation order differs)."""
    import jax.numpy as jnp
    from qspec_jax.generate import prefill
    from qspec_jax.model import KVCache
    rng = np.random.RandomState(0)
    lens = np.array([37, 12, 1, 16])
    toks = rng.randint(3, model.cfg.vocab_size, (len(lens), 37))
    toks[np.arange(37)[None] >= lens[:, None]] = 0
    net = model.module

    def run(chunk, kernels="xla"):
        cache = KVCache.create(model.cfg, len(lens), 64, model.dtype)
        logits, cache = prefill(net, jnp.asarray(toks), jnp.asarray(lens), cache, mode="w16",
                                kernels=kernels, chunk=chunk)
        return np.asarray(logits), np.asarray(cache.k), np.asarray(cache.v)

    from pallas_kernels import attention as pk_attention
    calls = []
    kernel = pk_attention.cached_attention
    monkeypatch.setattr(pk_attention, "cached_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    whole = run(None)  # 4 x 37 tokens: one forward
    # 5 chunks (last overlaps 3), 3 (overlap 11), 2 (overlap 35); the Pallas attention kernel
    # (interpret mode: what long caches take on a GPU) with queries starting past position 0.
    for chunk, kernels in ((8, "xla"), (16, "xla"), (36, "xla"), (16, "pallas")):
        got = run(chunk, kernels)
        np.testing.assert_allclose(got[0], whole[0], rtol=1e-5, atol=1e-5)
        for b, n in enumerate(lens):
            for g, w in zip(got[1:], whole[1:]):
                np.testing.assert_allclose(g[:, b, :, :n], w[:, b, :, :n], rtol=1e-5, atol=1e-5)
    assert calls  # the Pallas run took the kernel


def test_generate_with_prefill_chunks(model):
    prompts = [list(range(3, 40)), [9, 10, 11]]
    whole = qj.generate(model, prompts, max_new_tokens=8)
    chunked = qj.generate(model, prompts, max_new_tokens=8, prefill_chunk=16)
    assert whole.stats["prefill_chunk"] >= 37 and chunked.stats["prefill_chunk"] == 16
    assert chunked.tokens == whole.tokens


def test_prefill_chunk_size():
    from qspec_jax.generate import PREFILL_TOKENS, prefill_chunk_size
    assert prefill_chunk_size(1, 100_000) == PREFILL_TOKENS
    assert prefill_chunk_size(16, 32640) == PREFILL_TOKENS // 16
    assert prefill_chunk_size(24, 8192) == (PREFILL_TOKENS // 24) // 64 * 64  # a multiple of 64
    assert prefill_chunk_size(1024, 8192) == 64  # at least 64 positions per forward
    assert prefill_chunk_size(4, 300) == 300  # short prompts: one forward
    assert prefill_chunk_size(4, 300, 128) == 128
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="prefill_chunk must be a positive integer"):
            prefill_chunk_size(4, 300, bad)


def test_cache_that_cannot_fit_fails_clearly(model, monkeypatch):
    """A KV cache larger than the memory left (the device's, or on the CPU backend the host's)
    is refused before compiling, with the sizes and the fixes."""
    from qspec_jax import api
    limit, used = api._device_memory()  # CPU: the host's physical memory
    assert 0 <= used <= limit and limit > 2**28
    # A request far beyond any host: refused up front, not an out-of-memory error from XLA.
    with pytest.raises(ValueError, match=r"KV cache for batch 2 x 2147479552 positions needs "
                                         r".* GiB, but the host \(CPU backend\) has"):
        qj.generate(model, PROMPTS, max_new_tokens=8, max_len=2**31 - 4096)
    with pytest.raises(ValueError, match="positions are int32"):
        qj.generate(model, PROMPTS, max_new_tokens=8, max_len=2**31)
    c = model.cfg  # K and V, every layer, batch 2, a cache of 64 positions, float32
    cache_bytes = 2 * c.num_hidden_layers * 2 * c.num_key_value_heads * 64 * c.head_dim * 4
    monkeypatch.setattr(api, "_device_memory", lambda: (10 * 2**30, 10 * 2**30 - cache_bytes + 1))
    with pytest.raises(ValueError, match=r"KV cache for batch 2 x 64 positions needs .* GiB free"
                                         r".*smaller batch, fewer new tokens or a shorter max_len"):
        qj.generate(model, PROMPTS, max_new_tokens=8)
    monkeypatch.setattr(api, "_device_memory", lambda: (10 * 2**30, 10 * 2**30 - cache_bytes))
    assert len(qj.generate(model, PROMPTS, max_new_tokens=8).tokens) == 2


def test_decode_call_is_the_program_generate_runs(model):
    """qj.decode_call prepares what generate runs (same function, same arguments): running it
    gives generate's tokens; its memory plan holds the donated cache in place."""
    from qspec_jax.generate import decode_autoregressive
    call = qj.decode_call(model, PROMPTS, max_new_tokens=8)
    assert call.fn is decode_autoregressive and call.kwargs["max_new_tokens"] == 8
    cache_bytes = 2 * call.args[4].k.nbytes
    ma = call.memory_analysis()
    assert ma.alias_size_in_bytes >= cache_bytes and ma.argument_size_in_bytes > cache_bytes
    res = call.run()
    expect = qj.generate(model, PROMPTS, max_new_tokens=8).tokens
    assert [t[:n] for t, n in zip(np.asarray(res.tokens).tolist(), np.asarray(res.num_generated))] == expect
