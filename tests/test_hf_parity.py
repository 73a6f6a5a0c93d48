"""Our Flax model against the HF PyTorch forward (float32), for Llama, Qwen2 and Mistral."""

from __future__ import annotations

from functools import partial

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import qspec_jax as qj
from qspec_jax.model import KVCache

from hf_models import ARCHS

RTOL = 1e-4


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@partial(jax.jit, static_argnames=("graphdef",))
def forward_w16(graphdef, state, tokens, cache, start):
    """The model's call (mode w16) under jit: one compilation per shape, instead of one per
    operation and shape when run eagerly (most of these tests' time on CPU)."""
    return nnx.merge(graphdef, state)(tokens, cache, start, mode="w16")


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module")
def loaded(hf_dirs):
    return {arch: qj.load(path, dtype="float32") for arch, (path, _) in hf_dirs.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_ragged_prefill_logits_match_hf(arch, hf_dirs, loaded):
    _, hf = hf_dirs[arch]
    model = loaded[arch]
    r = np.random.RandomState(1)
    lengths = [11, 4, 7]
    prompts = [r.randint(3, 128, n).tolist() for n in lengths]
    tokens = np.zeros((3, 16), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    cache = KVCache.create(model.cfg, 3, 32, model.dtype)
    logits, _ = forward_w16(model.graphdef, model.state, tokens, cache, np.zeros(3, np.int32))
    for i, p in enumerate(prompts):
        assert rel_err(logits[i, :len(p)], hf_logits(hf, p)) < RTOL


@pytest.mark.parametrize("arch", ARCHS)
def test_stepwise_decoding_through_cache_matches_hf(arch, hf_dirs, loaded):
    """Prefill ragged prompts, then feed one token per step at per-sequence positions."""
    _, hf = hf_dirs[arch]
    model = loaded[arch]
    module = partial(forward_w16, model.graphdef, model.state)
    r = np.random.RandomState(2)
    prompts = [r.randint(3, 128, 5).tolist(), r.randint(3, 128, 9).tolist()]
    continuation = r.randint(3, 128, (2, 6))
    tokens = np.zeros((2, 16), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    cache = KVCache.create(model.cfg, 2, 32, model.dtype)
    _, cache = module(tokens, cache, np.zeros(2, np.int32))
    lengths = np.array([len(p) for p in prompts], np.int32)
    ours = []
    for t in range(continuation.shape[1]):
        logits, cache = module(continuation[:, t:t + 1], cache, lengths)
        ours.append(np.asarray(logits[:, 0]))
        lengths = lengths + 1
    for i, p in enumerate(prompts):
        full = hf_logits(hf, p + continuation[i].tolist())
        ref = full[len(p):len(p) + continuation.shape[1]]
        assert rel_err(np.stack([o[i] for o in ours]), ref) < RTOL


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_api_matches_hf(arch, hf_dirs, loaded):
    _, hf = hf_dirs[arch]
    ids = np.random.RandomState(3).randint(3, 128, (2, 10))
    ours = np.asarray(qj.logits(loaded[arch], ids))
    assert ours.shape == (2, 10, 128) and ours.dtype == np.float32
    for i in range(2):
        assert rel_err(ours[i], hf_logits(hf, ids[i].tolist())) < RTOL


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_equals_hf_generate(arch, hf_dirs, loaded):
    _, hf = hf_dirs[arch]
    r = np.random.RandomState(4)
    prompts = [r.randint(3, 128, n).tolist() for n in (3, 8, 5)]
    out = qj.generate(loaded[arch], prompts, max_new_tokens=12)
    for p, got in zip(prompts, out.tokens):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False,
                              eos_token_id=2, pad_token_id=0)[0, len(p):].tolist()
        assert got == ref


def test_bfloat16_model_is_close_to_hf(hf_dirs):
    path, hf = hf_dirs["llama"]
    model = qj.load(path)  # bfloat16 by default
    ids = np.random.RandomState(5).randint(3, 128, (1, 12))
    ours = np.asarray(qj.logits(model, ids))
    # bf16 weights and activations: about 3 significant digits.
    assert rel_err(ours[0], hf_logits(hf, ids[0].tolist())) < 3e-2
