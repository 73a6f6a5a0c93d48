"""CPU checks of the cached-attention kernel (pallas_kernels/attention.py) in interpret mode.

Tolerances: float32 inputs: relative Frobenius error <= 1e-5 and max abs error <= 1e-5 against
cached_attention_reference (same f32 math, other summation order). bfloat16 inputs: relative
Frobenius error <= 1e-2 against the float32 reference on the same bf16 values (bf16 output
rounding ~2e-3 and bf16 probabilities in the PV product ~2e-3; typical 3e-3).
The kernel is also lowered for CUDA (Triton IR) on this CPU machine, which catches constructs the
Triton backend rejects without needing a GPU.
"""
import dataclasses
import itertools
import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.attention import (MIN_BLOCKS_PER_SPLIT, cached_attention, default_config, supported,
                                      window_blocks)
from pallas_kernels.attention import cached_attention_reference as _reference

cached_attention_reference = jax.jit(_reference, static_argnames=("layer", "window"))

F32, BF16 = jnp.float32, jnp.bfloat16


def _rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _inputs(seed, B, T, H, KVH, S, hd, dtype, layers=None):
    k = jax.random.split(jax.random.key(seed), 3)
    lead = (layers,) if layers else ()
    q = jax.random.normal(k[0], (B, T, H, hd), F32).astype(dtype)
    kc = jax.random.normal(k[1], lead + (B, KVH, S, hd), F32).astype(dtype)
    vc = jax.random.normal(k[2], lead + (B, KVH, S, hd), F32).astype(dtype)
    return q, kc, vc


def _positions(kind, B, T, S):
    """q_pos [B, T]: each row b starts at start[b] (its cache length before the step)."""
    if kind == "prefill":  # right-padded prompts from position 0; one row fully padded (pos 0..)
        return np.broadcast_to(np.arange(T), (B, T)).astype(np.int32)
    # ragged: 0 (empty sequence / padding row), lengths not multiple of any block, near the end,
    # and past the end (writes dropped: every key visible).
    starts = [0, 37, S - T - 3, S - 2, 77, 1][:B]
    return (np.asarray(starts)[:, None] + np.arange(T)[None]).astype(np.int32)


CASES = [  # id, B, T, H, KVH, S, hd, dtype, positions, kwargs
    ("t1_g1_d64", 4, 1, 4, 4, 192, 64, F32, "ragged", {}),
    ("t1_g4_d128_split3", 4, 1, 8, 2, 192, 128, F32, "ragged", dict(num_splits=3)),
    ("t4_g4_d64_bk32_split2", 3, 4, 8, 2, 160, 64, F32, "ragged", dict(block_k=32, num_splits=2)),
    ("t16_g4_d128", 2, 16, 8, 2, 128, 128, F32, "ragged", {}),
    ("t16_g8_d64_split2", 2, 16, 16, 2, 128, 64, F32, "ragged", dict(num_splits=2)),
    ("t4_g1_d128_bf16", 3, 4, 2, 2, 256, 128, BF16, "ragged", dict(num_splits=4)),
    # the batch-1 sweep's 256-key blocks in one pipeline stage (bench_attention.BATCH1_EXTRA)
    ("b1_t1_g4_d128_bk256_st1", 1, 1, 8, 2, 1024, 128, BF16, "ragged",
     dict(block_k=256, num_splits=2, num_stages=1)),
    ("t1_g4_d64_bf16", 4, 1, 8, 2, 128, 64, BF16, "ragged", {}),
    ("t16_g4_d128_bf16", 2, 16, 8, 2, 64, 128, BF16, "ragged", {}),
    ("prefill48_g4_d64", 2, 48, 8, 2, 64, 64, F32, "prefill", {}),           # 3 q tiles of 64
    ("prefill40_g1_d128_bf16", 2, 40, 2, 2, 64, 128, BF16, "prefill", dict(block_q=16)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(case):
    _, B, T, H, KVH, S, hd, dtype, kind, kw = case
    q, kc, vc = _inputs(CASES.index(case), B, T, H, KVH, S, hd, dtype)
    q_pos = jnp.asarray(_positions(kind, B, T, S))
    out = cached_attention(q, kc, vc, q_pos, interpret=True, **kw)
    assert out.shape == (B, T, H, hd) and out.dtype == dtype
    ref32 = cached_attention_reference(q.astype(F32), kc.astype(F32), vc.astype(F32), q_pos)
    if dtype == F32:
        assert _rel(out, ref32) <= 1e-5
        assert float(jnp.max(jnp.abs(out - ref32))) <= 1e-5
    else:
        assert _rel(out, ref32) <= 1e-2
        assert _rel(out, cached_attention_reference(q, kc, vc, q_pos)) <= 1e-2
    if case[0] in ("t4_g4_d64_bk32_split2", "t16_g4_d128_bf16", "prefill48_g4_d64"):
        # The model's own reference; q_pos >= 0 everywhere here.
        from qspec_jax.model import attention_reference
        model_ref = jax.jit(attention_reference)(q, kc, vc, q_pos)
        assert _rel(out, model_ref) <= (1e-5 if dtype == F32 else 1e-2)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_reference_is_the_model_reference(case):
    """cached_attention_reference == qspec_jax.model.attention_reference (rows with keys)."""
    from qspec_jax.model import attention_reference
    _, B, T, H, KVH, S, hd, dtype, kind, kw = case
    q, kc, vc = _inputs(CASES.index(case), B, T, H, KVH, S, hd, dtype)
    q_pos = jnp.asarray(_positions(kind, B, T, S))
    a = cached_attention_reference(q, kc, vc, q_pos)
    b = jax.jit(attention_reference)(q, kc, vc, q_pos)
    assert _rel(a, b) <= (1e-6 if dtype == F32 else 1e-2)


def test_padding_rows_without_keys_and_kv_len():
    """q_pos = -1 (nothing visible) gives 0 in kernel and reference; kv_len masks keys too."""
    B, T, H, KVH, S, hd = 3, 4, 8, 2, 128, 64
    q, kc, vc = _inputs(5, B, T, H, KVH, S, hd, F32)
    q_pos = jnp.asarray([[-1, -1, -1, -1], [10, 11, 12, 13], [100, 101, 102, 103]], jnp.int32)
    for ns in (1, 2):
        out = cached_attention(q, kc, vc, q_pos, interpret=True, num_splits=ns, block_k=32)
        ref = cached_attention_reference(q, kc, vc, q_pos)
        assert np.all(np.asarray(out[0]) == 0) and np.all(np.isfinite(np.asarray(out)))
        assert _rel(out[1:], ref[1:]) <= 1e-5
    kv_len = jnp.asarray([0, 12, 50], jnp.int32)  # sequence 2 sees only keys < 50
    out = cached_attention(q, kc, vc, q_pos, kv_len, interpret=True, num_splits=2, block_k=32)
    ref = cached_attention_reference(q, kc, vc, q_pos, kv_len)
    assert _rel(out[1:], ref[1:]) <= 1e-5 and np.all(np.asarray(out[0]) == 0)
    ref_trunc = cached_attention_reference(q, kc[:, :, :50], vc[:, :, :50], q_pos)
    assert _rel(out[2], ref_trunc[2]) <= 1e-5


@pytest.mark.parametrize("ns", [5, 7, 16, 66])
def test_split_combine_over_power_of_two_chunks(ns):
    """The split combine loads the splits in power-of-two chunks (5 = 4 + 1, 7 = 4 + 2 + 1, 16;
    66 = 64 + 2: batch 1 of a 2-KV-head model takes a full wave of 66 splits) and the head dim in
    chunks (combine_head_block): every split and head column lands where the f32 reference puts
    it, with empty splits (ragged lengths) and a row without keys."""
    from pallas_kernels.attention import _pow2_chunks, combine_head_block
    assert _pow2_chunks(ns) == {5: [(0, 4), (4, 1)], 7: [(0, 4), (4, 2), (6, 1)],
                                16: [(0, 16)], 66: [(0, 64), (64, 2)]}[ns]
    B, T, H, KVH, S, hd = 2, 1, 8, 2, max(16, ns) * 32, 128
    assert combine_head_block(B * KVH, ns, 16, hd) < hd  # more than one head-dim chunk
    q, kc, vc = _inputs(ns, B, T, H, KVH, S, hd, F32)
    q_pos = jnp.asarray([[S - 1], [70]], jnp.int32)  # sequence 1: most splits see no key
    out, lse = cached_attention(q, kc, vc, q_pos, interpret=True, num_splits=ns, block_k=32,
                                return_lse=True)
    ref = cached_attention_reference(q, kc, vc, q_pos)
    assert _rel(out, ref) <= 1e-5
    one, lse_one = cached_attention(q, kc, vc, q_pos, interpret=True, num_splits=1, block_k=32,
                                    return_lse=True)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_one), rtol=1e-5, atol=1e-5)
    empty = cached_attention(q, kc, vc, jnp.asarray([[-1], [70]], jnp.int32), interpret=True,
                             num_splits=ns, block_k=32)
    assert np.all(np.asarray(empty[0]) == 0) and _rel(empty[1], ref[1]) <= 1e-5


def test_combine_head_block():
    """Batch 1 (8 kv heads, one query tile): 16-wide head chunks -> 64 programs; large batches
    keep the whole head; big tiles (16 splits x 128 rows) narrow it to bound registers."""
    from pallas_kernels.attention import COMBINE_TILE_ELEMS, combine_head_block
    assert combine_head_block(8, 16, 16, 128) == 16
    assert combine_head_block(8 * 64, 4, 16, 128) == 128
    assert combine_head_block(8 * 64, 16, 128, 128) * 16 * 128 <= COMBINE_TILE_ELEMS
    assert combine_head_block(8 * 64, 3, 16, 64) == 64  # 3 splits: a 4-row tile bound


def test_whole_cache_with_layer_index():
    L, B, T, H, KVH, S, hd = 3, 2, 4, 8, 2, 128, 128
    q, kc, vc = _inputs(7, B, T, H, KVH, S, hd, BF16, layers=L)
    q_pos = jnp.asarray(_positions("ragged", B, T, S))
    for layer, ns in ((0, 1), (2, 2)):
        out = cached_attention(q, kc, vc, q_pos, layer=layer, interpret=True, num_splits=ns)
        ref = cached_attention_reference(q, kc[layer], vc[layer], q_pos)
        assert _rel(out, ref) <= 1e-2
        assert _rel(out, cached_attention_reference(q, kc, vc, q_pos, layer=layer)) <= 1e-2
    # a traced layer index (e.g. a scan over layers): the same kernel for every layer
    out = jax.jit(lambda l: cached_attention(q, kc, vc, q_pos, layer=l, interpret=True))(
        jnp.int32(1))
    assert _rel(out, cached_attention_reference(q, kc[1], vc[1], q_pos)) <= 1e-2


def test_stacked_cache_reads_k_and_v_in_place():
    """The model's cache (qspec_jax.model.KVCache): K and V of every layer in one [L, 2, B, KVH,
    S, hd] array, passed once with v_cache None: the same result as the separate arrays, bit
    for bit (the kernel reads the same slabs), with splits and a traced layer index."""
    L, B, T, H, KVH, S, hd = 3, 2, 4, 8, 2, 128, 64
    q, kc, vc = _inputs(11, B, T, H, KVH, S, hd, F32, layers=L)
    kv = jnp.stack([kc, vc], axis=1)
    q_pos = jnp.asarray(_positions("ragged", B, T, S))
    for layer, ns in ((0, 1), (2, 3)):
        out = cached_attention(q, kv, None, q_pos, layer=layer, interpret=True, num_splits=ns)
        sep = cached_attention(q, kc, vc, q_pos, layer=layer, interpret=True, num_splits=ns)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(sep))
        assert _rel(out, cached_attention_reference(q, kc[layer], vc[layer], q_pos)) <= 1e-5
    out = jax.jit(lambda l: cached_attention(q, kv, None, q_pos, layer=l, interpret=True,
                                             window=(2, 40)))(jnp.int32(1))
    ref = cached_attention_reference(q, kc[1], vc[1], q_pos, window=(2, 40))
    assert _rel(out, ref) <= 1e-5
    for bad, kw in ((kc, dict(layer=0)), (kv, {}), (kv[:, :1], dict(layer=0))):
        with pytest.raises(ValueError, match="stacked"):
            cached_attention(q, bad, None, q_pos, interpret=True, **kw)


def test_supported_and_errors():
    assert supported((2, 1, 32, 128), (2, 8, 4096, 128)) == (True, "ok")
    assert supported((2, 1, 32, 128), (32, 2, 8, 4096, 128))[0]
    assert supported((2, 16, 32, 64), (2, 8, 64, 64))[0]
    for qs, ks, word in [((2, 1, 32, 96), (2, 8, 64, 96), "head_dim"),
                         ((2, 1, 30, 128), (2, 8, 64, 128), "multiple"),
                         ((2, 1, 32, 128), (2, 8, 100, 128), "cache length"),
                         ((2, 1, 32, 128), (3, 8, 64, 128), "batch"),
                         ((2, 32, 128), (2, 8, 64, 128), "q must")]:
        ok, why = supported(qs, ks)
        assert not ok and word in why, (qs, ks, why)
    assert not supported((1, 1, 8, 64), (1, 2, 64, 64), jnp.int8)[0]
    q, kc, vc = _inputs(0, 1, 1, 8, 2, 64, 64, F32)
    with pytest.raises(ValueError, match="dtype"):
        cached_attention(q, kc.astype(BF16), vc.astype(BF16), jnp.zeros((1, 1), jnp.int32),
                         interpret=True)
    with pytest.raises(ValueError, match="layer"):
        cached_attention(q, kc, vc, jnp.zeros((1, 1), jnp.int32), layer=0, interpret=True)


def test_default_config():
    # batch 1, 32k: flash-decoding fills the GPU with one wave (8 kv heads x 16 splits = 128 of
    # 132 SMs; attention_sweep_b1_h200.md)
    c = default_config(1, 1, 32, 8, 32768, 128)
    assert c.block_q == 16 and c.block_k == 128 and 8 * c.num_splits >= 0.95 * 132
    # batch 1, 8k: a full wave too, 16 splits of 4 key blocks (the c64168d sweep's fastest)
    assert default_config(1, 1, 32, 8, 8192, 128).num_splits == 16
    # batch 64: enough programs without splitting
    assert default_config(64, 1, 32, 8, 2048, 128).num_splits == 1
    # verify T=8, G=4 -> 32 packed rows in one block; T=16, G=8 -> 128 rows, 8 warps
    assert default_config(8, 8, 32, 8, 4096, 128).block_q == 32
    c = default_config(8, 16, 64, 8, 4096, 128)
    assert c.block_q == 128 and c.num_warps == 8
    # prefill tiles; block_k shrinks to divide S
    assert default_config(1, 512, 32, 8, 4096, 128).block_q == 64
    assert default_config(1, 1, 32, 8, 4160, 128).block_k == 64
    assert default_config(1, 1, 32, 8, 48, 128).block_k == 16
    assert default_config(4, 4, 32, 8, 4096, 128, itemsize=4).block_k == 64  # f32: 64 KB K+V tile
    # shared memory of the pipelined K/V tiles stays within the H200's 227 KB per block
    for B in (1, 8, 32, 64):
        for S in (512, 2048, 8192, 32768):
            for T in (1, 4, 8, 16, 512):
                for hd, isz in ((64, 2), (128, 2), (128, 4)):
                    c = default_config(B, T, 32, 8, S, hd, isz)
                    assert 2 * c.block_k * hd * isz * c.num_stages <= 192 * 1024, c
                    # About a wave of programs, unless splits would get under
                    # MIN_BLOCKS_PER_SPLIT key blocks each (measured slower on the H200; batch 1
                    # from 16 key blocks on: one block each), or, for batch 2-8 up to 8k,
                    # over one wave or FEW_PROGRAMS_SPLITS.
                    programs = B * 8 * c.num_splits * -(-T * 4 // c.block_q)
                    n_blocks = S // c.block_k
                    assert (programs >= min(132, B * 8 * S // 256) * 0.95
                            or c.num_splits == n_blocks // MIN_BLOCKS_PER_SPLIT
                            or (B > 1 and c.num_splits == 4)), c
                    if 1 < B <= 8 and S <= 8192 and T * 4 <= 128:  # few base programs
                        assert programs <= max(132, B * 8 * 4), c


def test_choose_splits_fills_one_wave():
    """The split count the defaults are built on: the most splits whose programs fill their waves
    (within 2%), capped by the blocks per split (min_blocks) and the waves allowed."""
    from pallas_kernels.attention import _choose_splits
    # batch 1, Llama-3-8B heads (8 base programs) on 132 SMs, one wave: 16 splits (128 programs)
    assert _choose_splits(8, 16, 132, 1, min_blocks=1) == 16      # 2k: one block per split
    assert _choose_splits(8, 256, 132, 1, min_blocks=1) == 16     # 32k: more blocks change nothing
    assert _choose_splits(8, 16, 132, 1, min_blocks=4) == 4       # the old 4-blocks-per-split cap
    assert _choose_splits(8, 6, 132, 1, min_blocks=1) == 6        # fewer blocks than a wave wants
    # 2 KV heads: 66 splits fill one wave exactly; 67 would start a second
    assert _choose_splits(2, 256, 132, 1, min_blocks=1) == 66
    # two waves allowed (programs_per_sm 2), 64 base programs: 4 splits = 256 programs (2 waves, 97%)
    assert _choose_splits(64, 128, 132, 2) == 4
    assert _choose_splits(132, 128, 132) == 1                     # already a wave of programs
    for base, n_blocks, ppsm, mb in itertools.product((1, 3, 8, 16, 40), (1, 5, 16, 300), (1, 2),
                                                     (1, 4)):
        ns = _choose_splits(base, n_blocks, 132, ppsm, min_blocks=mb)
        assert 1 <= ns <= max(1, n_blocks // mb) and base * ns <= max(base, ppsm * 132 + base), (
            base, n_blocks, ppsm, mb, ns)


def test_default_config_batch1_sweep(monkeypatch):
    """Batch-1 / 8 defaults are the measured-best configurations of the H200 sweeps
    (experiments/results/attention_sweep_b1_h200.md and attention_sweep_b{1,8}_h200_1f8d2a6.md;
    Llama-3-8B heads, bf16): 32k T=1/4 78.4/78.1 -> 49.9/49.7 us, 8k 28.2 -> 21.9 us, 2k 13.8 ->
    12.8 us; batch 8 x 2k T=1/4/8 29.5/29.9/33.9 -> 27.6/28.2/30.2. Batch 8 x 32k and batch 32/64
    points keep the configuration that ran as "ours" in experiments/results/attention_h200_full.json."""
    import pallas_kernels.attention as attn
    monkeypatch.setattr(attn, "sm_count", lambda: 132)  # H200
    cfg = lambda B, T, S: dataclasses.astuple(default_config(B, T, 32, 8, S, 128, 2))
    # (block_q, block_k, num_splits, num_warps, num_stages)
    # 32k: 3 stages since the 1f8d2a6 sweep (49.9 / 49.7 vs 56.2 / 57.6 us with 2)
    assert cfg(1, 1, 32768) == (16, 128, 16, 4, 3)
    assert cfg(1, 4, 32768) == (16, 128, 16, 4, 3)
    # c64168d sweep, after the all-splits-at-once combine: 16 splits at 8k / 2k, 15.8 / 9.2 us vs
    # 18.0 / 11.3 with the earlier sqrt cap's 8 / 4
    assert cfg(1, 1, 8192) == (16, 128, 16, 4, 3)
    assert cfg(1, 1, 2048) == (16, 128, 16, 4, 3)
    # 2 KV heads (Qwen2.5-7B-like: 28 q heads): a full wave of 66 splits
    c = default_config(1, 1, 28, 2, 32768, 128, 2)
    assert 2 * c.num_splits >= 132 * 0.95 and c.num_splits < 256, c
    # short caches split down to one key block each too (fffd870 sweep: batch 1 x 256 keys, 4
    # splits 5.5 / 5.7 us at T = 1 / 4 vs 6.3 / 6.7 unsplit, attention_sweep_b248_h200_fffd870.md)
    assert cfg(1, 1, 256) == (16, 64, 4, 4, 3)
    assert cfg(1, 4, 256) == (16, 64, 4, 4, 3)
    assert cfg(1, 1, 512) == (16, 64, 8, 4, 3)
    # batch 4 / 8 to 8k, 64-key blocks x 4 splits x 3 stages: batch 8 the 1f8d2a6 batch-8 sweep's
    # fastest (attention_sweep_b8_h200_1f8d2a6.md) and the fffd870 sweep's
    # (attention_sweep_b248_h200_fffd870.md), batch 4 the 74ec0d1 and fffd870 sweeps'
    for B, T, S in ((8, 1, 2048), (8, 4, 2048), (8, 1, 8192), (4, 1, 2048), (4, 1, 8192)):
        assert cfg(B, T, S) == (16, 64, 4, 4, 3), (B, T, S)
    # batch 2: one wave of programs, 8 splits (fffd870 sweep: 11.1 / 24.8 us at 2k / 8k vs
    # 12.7 / 33.2 with 4, now that the split combine is cheap)
    for T, S in ((1, 2048), (1, 8192), (4, 8192)):
        assert cfg(2, T, S) == (16, 64, 8, 4, 3), (T, S)
    assert cfg(8, 8, 2048) == (32, 64, 4, 4, 3)
    # batch 8 x 32k / 32 / 64: one program per SM with 128-key blocks, so 3 stages (batch 64 x
    # 8k / 32k 554 / 2290 -> 498 / 1975 us, attention_sweep_b64_h200_6d65aa3.md)
    assert cfg(64, 1, 8192) == (16, 128, 1, 4, 3)
    assert cfg(64, 1, 32768) == (16, 128, 1, 4, 3)
    assert cfg(8, 1, 32768) == (16, 128, 4, 4, 3)
    assert cfg(8, 8, 512) == (32, 64, 2, 4, 3)
    assert cfg(32, 1, 32768) == (16, 128, 1, 4, 3)
    assert cfg(32, 4, 8192) == (16, 128, 1, 4, 3)
    # 32-row query blocks (T 8) from a wave of programs on: 64-key blocks (batch 32 x 8k T 8:
    # 264.6 vs 307.0 us, attention_sweep_t8_h200_77a681c.md; batch 8 / 32 / 64 x 2k-32k T 8 at
    # 70-89% of 4.8 TB/s, attention_t8k64_h200_*.md); batch 1 keeps 128 keys (47.7 vs 50.9 us)
    assert cfg(32, 8, 2048) == (32, 64, 1, 4, 3)
    assert cfg(64, 8, 32768) == (32, 64, 1, 4, 3)
    assert cfg(8, 8, 32768) == (32, 64, 4, 4, 3)
    assert cfg(1, 8, 32768) == (32, 128, 16, 4, 3)
    # windowed draft at batch 16 with a 4 + 2048 window (not few base programs): 3 stages too
    assert dataclasses.astuple(default_config(16, 1, 32, 8, 32768, 128, 2, window=(4, 2048))) == (
        16, 128, 3, 4, 3)


# ----------------------------------------------------------------------------- windowed (issue 9)
def _window_positions(B, T, S):
    """Ragged q_pos [B, T]: a padding row (no key), an empty sequence, odd lengths, near the cache
    end, past the end (T > 1: writes dropped, the window anchored at the unclipped position)."""
    starts = [None, 0, 37, S - T - 3, S - 2, 90][:B]
    return np.stack([np.full(T, -1) if st is None else st + np.arange(T) for st in starts]
                    ).astype(np.int32)


def _visible(q_pos, kv_len, S, window):
    """[B, T, S] bool: the reference semantics, in numpy."""
    s = np.arange(S)[None, None]
    qp = q_pos[:, :, None]
    vis = s <= qp
    if kv_len is not None:
        vis &= s < kv_len[:, None, None]
    if window is not None:
        vis &= (s < window[0]) | (qp - s < window[1])
    return vis


def _poison_unread_blocks(kc, vc, q_pos, kv_len, window, block_k):
    """K and V with NaN in every key block that holds no key visible to any query of its sequence
    (one query tile per sequence here: T * G <= 128). A kernel that loads such a block and masks
    it after the dot still multiplies its V rows by p = 0, and 0 * NaN = NaN poisons the output;
    only a kernel that never loads the block gives a finite result. Returns (k, v, n_poisoned)."""
    B, S = kc.shape[0], kc.shape[2]
    vis = _visible(q_pos, kv_len, S, window).any(axis=1)             # [B, S]
    needed = vis.reshape(B, S // block_k, block_k).any(axis=2)       # [B, n_blocks]
    bad = np.repeat(~needed, block_k, axis=1)                        # [B, S]
    mask = jnp.asarray(bad)[:, None, :, None]
    return jnp.where(mask, jnp.nan, kc), jnp.where(mask, jnp.nan, vc), int((~needed).sum())


WINDOW_CASES = [  # id, B, T, H, KVH, S, hd, dtype, window, kwargs, with kv_len
    # recent < block_k, not a multiple of it; 4 sinks; flash-decoding splits over the read blocks
    ("t1_g4_sink4_r20_bk32_split3", 6, 1, 8, 2, 192, 64, F32, (4, 20),
     dict(block_k=32, num_splits=3), False),
    # recent > block_k, not a multiple; one sink; one split
    ("t4_g1_sink1_r37_bk16", 6, 4, 2, 2, 160, 64, F32, (1, 37), dict(block_k=16), False),
    # no sink, bf16, kv_len (window anchored at the unclipped q_pos), two splits
    ("t4_g4_sink0_r45_bk32_split2_bf16_kvlen", 6, 4, 8, 2, 128, 128, BF16, (0, 45),
     dict(block_k=32, num_splits=2), True),
]


@pytest.mark.parametrize("case", WINDOW_CASES, ids=[c[0] for c in WINDOW_CASES])
def test_windowed_matches_reference_without_reading_skipped_blocks(case):
    name, B, T, H, KVH, S, hd, dtype, window, kw, with_kv_len = case
    q, kc, vc = _inputs(100 + WINDOW_CASES.index(case), B, T, H, KVH, S, hd, dtype)
    q_pos_np = _window_positions(B, T, S)
    kv_len_np = np.asarray([5, 1, 30, S - 40, S, 50], np.int32)[:B] if with_kv_len else None
    q_pos = jnp.asarray(q_pos_np)
    kv_len = None if kv_len_np is None else jnp.asarray(kv_len_np)
    cfg = default_config(B, T, H, KVH, S, hd, jnp.dtype(dtype).itemsize, window=window, **kw)
    kp, vp, n_bad = _poison_unread_blocks(kc, vc, q_pos_np, kv_len_np, window, cfg.block_k)
    assert n_bad > 0  # every case has blocks to skip (at least the padding row's)
    out = cached_attention(q, kp, vp, q_pos, kv_len, interpret=True, window=window, **kw)
    assert out.shape == (B, T, H, hd) and out.dtype == dtype
    out = np.asarray(out.astype(F32))
    assert np.all(np.isfinite(out)), "the kernel loaded a key block outside the window"
    # The test can tell: reading everything and masking (the reference) is poisoned.
    assert np.isnan(np.asarray(cached_attention_reference(q, kp, vp, q_pos, kv_len,
                                                          window=window))).any()
    f32 = lambda a: a.astype(F32)  # noqa: E731
    ref = cached_attention_reference(f32(q), f32(kc), f32(vc), q_pos, kv_len, window=window)
    empty = ~_visible(q_pos_np, kv_len_np, S, window).any(axis=2)  # [B, T] rows without keys
    assert empty[0].all() and np.all(out[empty] == 0)
    tol = 1e-5 if dtype == F32 else 1e-2
    assert _rel(out, ref) <= tol
    if dtype == F32:
        assert float(np.max(np.abs(out - np.asarray(ref)))) <= 1e-5
    # Sequences shorter than the window (q_pos < recent, e.g. positions 37..40 with recent 45):
    # plain causal attention.
    full = np.asarray(cached_attention_reference(f32(q), f32(kc), f32(vc), q_pos, kv_len))
    short = (q_pos_np < window[1]) & ~empty
    assert short.sum() >= T
    assert _rel(out[short], full[short]) <= tol


def test_windowed_reference_is_the_model_reference():
    """cached_attention_reference(window=...) == qspec_jax.model.attention_reference(window=...)
    on rows with keys, including positions past the cache end (T > 1)."""
    from qspec_jax.model import attention_reference
    for _, B, T, H, KVH, S, hd, dtype, window, _, _ in WINDOW_CASES[1:]:
        q, kc, vc = _inputs(3, B, T, H, KVH, S, hd, F32)
        q_pos = jnp.asarray(_window_positions(B, T, S))
        a = cached_attention_reference(q, kc, vc, q_pos, window=window)
        b = jax.jit(attention_reference, static_argnames="window")(q, kc, vc, q_pos, window=window)
        assert _rel(a[1:], b[1:]) <= 1e-6 and np.all(np.asarray(a[0]) == 0)


def test_window_config_and_checks():
    # batch 1 at 32k with a 4 + 508 window: the splits divide the blocks read (at most one each,
    # as at any short batch-1 cache), not the cache's 256
    full = default_config(1, 1, 32, 8, 32768, 128)
    win = default_config(1, 1, 32, 8, 32768, 128, window=(4, 508))
    read = -(-4 // win.block_k) + -(-508 // win.block_k) + 1
    assert full.num_splits >= 16 and 2 <= win.num_splits <= read and win.block_k <= full.block_k
    assert default_config(64, 1, 32, 8, 8192, 128, window=(4, 1020)).num_splits == 1
    assert supported((1, 1, 8, 64), (1, 2, 64, 64), None, (0, 1)) == (True, "ok")
    for bad in ((0, 0), (-1, 4), (4,), (1.5, 4)):
        ok, why = supported((1, 1, 8, 64), (1, 2, 64, 64), None, bad)
        assert not ok and "window" in why
    q, kc, vc = _inputs(0, 1, 1, 8, 2, 64, 64, F32)
    with pytest.raises(ValueError, match="window"):
        cached_attention(q, kc, vc, jnp.zeros((1, 1), jnp.int32), interpret=True, window=(2, 0))
    # window_blocks (numpy): sink blocks, then from the window start's block to the last key's
    lim = np.asarray([99, 100, 101, 102])
    blocks = window_blocks(lim, lim, 16, 4, 20, 256)
    assert tuple(int(x) for x in blocks) == (1, 5, 7)  # blocks 0 and 5, 6: keys 80..102
    assert tuple(int(x) for x in window_blocks(np.asarray([-1]), np.asarray([-1]), 16, 4, 20,
                                               256)) == (0, 0, 0)
    # a window longer than the cache: every block up to the last key, no overflow
    assert tuple(int(x) for x in window_blocks(lim, lim, 16, 4, 10**12, 256)) == (1, 1, 7)


# ----------------------------------------------------------------------------- Triton lowering
def _lower_cuda(fn, *avals):
    return jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()


def _cuda_lowering_available():
    from jax.experimental import pallas as pl

    def k(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1.0
    from pallas_kernels.attention import pltriton
    if pltriton is None:
        return False
    f = pl.pallas_call(k, out_shape=jax.ShapeDtypeStruct((16,), F32),
                       compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1))
    try:
        _lower_cuda(f, jax.ShapeDtypeStruct((16,), F32))
        return True
    except Exception:  # noqa: BLE001
        return False


LOWER_CASES = [  # B, T, H, KVH, S, hd, dtype, layers, kwargs
    (2, 1, 32, 8, 4096, 128, BF16, None, {}),                  # decode, splits > 1
    (64, 8, 32, 8, 2048, 128, BF16, None, {}),                 # verify, one split
    (2, 16, 64, 8, 1024, 128, BF16, 4, dict(num_splits=4)),    # 128 rows, whole cache + layer
    (1, 300, 32, 8, 1024, 64, BF16, None, {}),                 # prefill, q tiles
    (2, 4, 8, 2, 256, 64, F32, None, dict(num_splits=2)),      # f32 (IEEE dots)
    (64, 4, 32, 8, 4096, 128, BF16, 32, {}),                   # 34 GB cache: 64-bit offsets
    (2, 1, 32, 8, 8192, 128, BF16, None, dict(window=(4, 1020))),           # windowed, splits
    (16, 8, 32, 8, 4096, 128, BF16, 32, dict(window=(0, 500), num_splits=2)),  # + layer
    (1, 1, 32, 8, 32768, 128, BF16, None, dict(block_k=256, num_splits=16, num_stages=1)),  # b1 sweep
    (1, 1, 32, 8, 8192, 128, BF16, None, {}),          # batch-1 default: 16 splits x 3 stages
    (1, 8, 32, 8, 2048, 128, BF16, None, {}),          # 32 rows, 128-key blocks, 3 stages
]


@pytest.mark.parametrize("case", LOWER_CASES)
def test_lowers_to_triton(case):
    if not _cuda_lowering_available():
        pytest.skip("this jaxlib cannot lower Pallas for CUDA on CPU")
    B, T, H, KVH, S, hd, dtype, layers, kw = case
    lead = (layers,) if layers else ()
    q = jax.ShapeDtypeStruct((B, T, H, hd), dtype)
    kc = jax.ShapeDtypeStruct(lead + (B, KVH, S, hd), dtype)
    pos = jax.ShapeDtypeStruct((B, T), jnp.int32)
    layer = 1 if layers else None
    txt = _lower_cuda(lambda a, b, c, d: cached_attention(a, b, c, d, layer=layer, **kw),
                      q, kc, kc, pos)
    assert "xla.gpu.triton" in txt


# ----------------------------------------------------------------------------- bench smoke
def test_bench_quick(tmp_path):
    from experiments import bench_attention
    out = tmp_path / "attn.json"
    doc = bench_attention.main(["--quick", "--batches", "2", "--contexts", "256", "--ts", "4",
                                "--impls", "ours", "ours_layer", "xla", "--out", str(out),
                                "--commit", "test"])
    assert out.exists() and (tmp_path / "attn.md").exists()
    saved = json.loads(out.read_text())
    assert saved["env"]["commit"] == "test" and len(saved["points"]) == 1
    for p in doc["points"]:
        for name in ("ours", "ours_layer", "xla"):  # ours_layer: the model's stacked cache
            r = p["impls"][name]
            assert "error" not in r and r["rel_err_vs_f32"] < 1e-2 and r["us_median"] > 0
        # the read-only floor (XLA's reduction over the same K / V bytes) is timed beside them
        assert p["read_floor_us"] > 0 and p["read_floor_pct_hbm"] > 0
    assert "read floor us (%)" in (tmp_path / "attn.md").read_text()
    # a later run of "ours" alone (after a kernel change) merged over it keeps the peers' times
    # and recomputes the speedups against them; each implementation says which commit timed it
    again = tmp_path / "again.json"
    doc2 = bench_attention.main(["--quick", "--batches", "2", "--contexts", "256", "--ts", "4",
                                 "--impls", "ours", "--out", str(again), "--commit", "later"])
    merged = bench_attention.main(["--merge", str(out), str(again), "--out",
                                   str(tmp_path / "merged.json")])
    (p,) = merged["points"]
    o, new = p["impls"], doc2["points"][0]["impls"]["ours"]
    assert o["ours"]["us_median"] == new["us_median"] and o["ours"]["commit"] == "later"
    assert o["xla"]["us_median"] == saved["points"][0]["impls"]["xla"]["us_median"]
    assert o["xla"]["commit"] == "test" and o["ours_layer"]["commit"] == "test"
    assert o["ours"]["speedup_vs_xla"] == o["xla"]["us_median"] / new["us_median"]
    assert p["read_floor_us"] == doc2["points"][0]["read_floor_us"]


def test_bench_quick_kernel_times(tmp_path):
    """--kernel-times: one profiled call per implementation, device time by kernel (on CPU the
    XLA thunks), per attention call, in the JSON and the Markdown."""
    from experiments import bench_attention
    out = tmp_path / "attn.json"
    doc = bench_attention.main(["--quick", "--batches", "1", "--contexts", "64", "--ts", "1",
                                "--impls", "ours", "--kernel-times", "--out", str(out)])
    k = doc["points"][0]["impls"]["ours"]["kernels"]
    assert k["tracks"] == "host" and k["us_per_call"] and all(v > 0 for v in k["us_per_call"].values())
    assert "Device time per kernel" in (tmp_path / "attn.md").read_text()


def test_bench_quick_window(tmp_path):
    from experiments import bench_attention
    out = tmp_path / "attn_window.json"
    doc = bench_attention.main(["--quick", "--window", "2", "20", "--batches", "2", "--contexts",
                                "256", "--ts", "1", "--out", str(out), "--commit", "test"])
    assert "Windowed draft attention" in (tmp_path / "attn_window.md").read_text()
    (p,) = doc["points"]
    assert p["window"] == [2, 20] and 0 < p["kv_bytes_window"] < p["kv_bytes"]
    for name in ("ours", "ours_window"):
        r = p["impls"][name]
        assert "error" not in r and r["rel_err_vs_f32"] < 1e-2 and r["us_median"] > 0
    assert p["impls"]["ours_window"]["speedup_vs_ours"] > 0


def test_auto_dispatch_uses_the_kernel_only_on_gpu_from_the_measured_batch(monkeypatch, caplog):
    """kernels="auto": XLA attention on CPU and for small batches with short caches on a GPU,
    the Pallas kernel on a GPU from ATTN_MIN_BATCH sequences, from ATTN_LONG_CACHE cache
    positions and for windowed drafts; "xla" never, "pallas" always."""
    import logging
    from pallas_kernels import attention as pk_attention
    from qspec_jax import kernel_dispatch as kd

    calls = []
    monkeypatch.setattr(pk_attention, "cached_attention",
                        lambda q, *a, **kw: calls.append((q.shape[0], kw["interpret"])) or q)
    default_min_batch = kd.ATTN_MIN_BATCH
    monkeypatch.setattr(kd, "ATTN_MIN_BATCH", 8)  # the rule, at the threshold used before a2e4e28
    cache = jnp.zeros((2, kd.ATTN_MIN_BATCH, 2, 64, 32), BF16)
    pos = jnp.zeros((kd.ATTN_MIN_BATCH, 1), jnp.int32)
    q_small, q_big = (jnp.zeros((b, 1, 4, 32), BF16) for b in (kd.ATTN_MIN_BATCH - 1, kd.ATTN_MIN_BATCH))
    assert kd.attention(q_big, cache, cache, pos, 0, "auto") is None  # CPU
    assert kd.attention(q_big, cache, cache, pos, 0, "xla") is None
    assert kd.attention(q_big, cache, cache, pos, 0, "pallas") is q_big and calls == [(8, True)]
    monkeypatch.setattr(kd.jax, "default_backend", lambda: "gpu")
    with caplog.at_level(logging.INFO, logger="qspec_jax"):
        assert kd.attention(q_small, cache[:, :7], cache[:, :7], pos[:7], 1, "auto") is None
    assert "attention uses XLA" in caplog.text
    assert kd.attention(q_big, cache, cache, pos, 1, "auto") is q_big
    assert calls == [(8, True), (8, False)]
    # Small batches take the kernel for windowed drafts and for long caches.
    assert kd.attention(q_small, cache[:, :7], cache[:, :7], pos[:7], 1, "auto", window=(2, 16)) is q_small
    monkeypatch.setattr(kd, "ATTN_LONG_CACHE", 64)  # = the cache length here
    assert kd.attention(q_small, cache[:, :7], cache[:, :7], pos[:7], 1, "auto") is q_small
    assert calls[2:] == [(7, False), (7, False)]
    # The default since b1kern_h200_1d0946d.md: the kernel at every batch on a GPU.
    monkeypatch.setattr(kd, "ATTN_MIN_BATCH", default_min_batch)
    monkeypatch.setattr(kd, "ATTN_LONG_CACHE", 8192)
    q1 = jnp.zeros((1, 1, 4, 32), BF16)
    assert kd.attention(q1, cache[:, :1], cache[:, :1], pos[:1], 1, "auto") is q1
    assert calls[4:] == [(1, False)]


LSE_CASES = [  # B, T, H, KVH, S, hd, dtype, kwargs: one split (in-kernel) and split-K (combine)
    (3, 4, 8, 2, 160, 64, F32, {}),
    (3, 4, 8, 2, 160, 64, F32, dict(block_k=32, num_splits=3)),
    (2, 1, 4, 4, 128, 128, BF16, dict(num_splits=2)),
]


@pytest.mark.parametrize("case", LSE_CASES)
def test_return_lse_matches_float64(case):
    """return_lse=True: f32 output and the log-sum-exp of each row's visible scaled scores
    (float64 numpy reference); rows without keys (q_pos < 0) give lse -1e30 and output 0."""
    B, T, H, KVH, S, hd, dtype, kw = case
    q, kc, vc = _inputs(11, B, T, H, KVH, S, hd, dtype)
    pos = _positions("ragged", B, T, S) - 1  # row 0 starts at -1: no visible key at t = 0
    out, lse = jax.jit(lambda *a: cached_attention(*a, interpret=True, return_lse=True, **kw))(
        q, kc, vc, jnp.asarray(pos))
    assert out.dtype == jnp.float32 and lse.shape == (B, T, H)
    qn, kn, vn = (np.asarray(x.astype(F32), np.float64) for x in (q, kc, vc))
    G = H // KVH
    for b in range(B):
        for t in range(T):
            for h in range(H):
                n = min(pos[b, t], S - 1) + 1
                if n <= 0:
                    assert float(lse[b, t, h]) <= -1e29 and not np.any(np.asarray(out[b, t, h]))
                    continue
                sc = kn[b, h // G, :n] @ qn[b, t, h] / np.sqrt(hd)
                ref_lse = np.log(np.sum(np.exp(sc - sc.max()))) + sc.max()
                ref = np.exp(sc - ref_lse) @ vn[b, h // G, :n]
                assert abs(float(lse[b, t, h]) - ref_lse) < 1e-4 * max(1.0, abs(ref_lse))
                np.testing.assert_allclose(np.asarray(out[b, t, h]), ref, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dtype, window", [(F32, None), (BF16, None), (F32, (3, 20)), (BF16, (0, 2))])
def test_readonly_block_attention_with_the_kernel_matches_xla(dtype, window):
    """The read-only verify attention (gamma="auto"): Pallas over the cache + XLA over the new
    block, merged by log-sum-exp, equals the XLA reference attention_with_block (ragged starts,
    including an empty cache row); with a draft window, windowed over the cache (the kernel
    anchored at each query's position, keys below start) and the block alike. The model's XLA
    path (attention_with_block_parts: the same two softmax parts, no kernel) equals it too."""
    from qspec_jax import kernel_dispatch as kd
    from qspec_jax.model import (attention_with_block, attention_with_block_parts, block_mask,
                                 window_mask)
    L, B, T, H, KVH, S, hd = 2, 3, 4, 8, 2, 64, 64
    k = jax.random.split(jax.random.key(5), 5)
    q = jax.random.normal(k[0], (B, T, H, hd), F32).astype(dtype)
    ck = jax.random.normal(k[1], (L, B, KVH, S, hd), F32).astype(dtype)
    cv = jax.random.normal(k[2], (L, B, KVH, S, hd), F32).astype(dtype)
    kb = jax.random.normal(k[3], (B, KVH, T, hd), F32).astype(dtype)
    vb = jax.random.normal(k[4], (B, KVH, T, hd), F32).astype(dtype)
    start = jnp.asarray([0, 37, 60], jnp.int32)
    q_pos = start[:, None] + jnp.arange(T)[None]
    blk_ok = None if window is None else block_mask(T) & window_mask(q_pos, q_pos, window)
    ours = jax.jit(lambda *a: kd.attention_with_block(*a, 1, "pallas", blk_ok, window, q_pos))(
        q, ck, cv, kb, vb, start)
    ref = attention_with_block(q, ck[1], cv[1], kb, vb, start, blk_ok, window, q_pos)
    if window is not None:  # the window changes the result (it cuts into the cache)
        full = attention_with_block(q, ck[1], cv[1], kb, vb, start)
        assert float(jnp.max(jnp.abs(full.astype(F32) - ref.astype(F32)))) > 1e-2
    tol = 1e-5 if dtype == F32 else 2e-2
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32),
                               rtol=tol, atol=tol)
    parts = jax.jit(attention_with_block_parts)(q, ck[1], cv[1], kb, vb, start, blk_ok, window, q_pos)
    np.testing.assert_allclose(np.asarray(parts, np.float32), np.asarray(ref, np.float32),
                               rtol=tol, atol=tol)
    assert kd.attention_with_block(q, ck, cv, kb, vb, start, 1, "xla") is None
