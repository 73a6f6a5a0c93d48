"""GPU checks of the cached-attention kernel (issue 7) against its references.

Matrix (issue 7): ragged lengths in one batch (a length-0 sequence, a padding row that sees no
key, lengths not a multiple of the block, a sequence at the cache end), T in {1, 4, 8, 16,
prefill}, GQA ratios 1, 4, 8, head_dim 64 and 128, bf16 and f32; plus Llama-3-8B shapes with
long caches (flash-decoding splits), a cache length that is not a multiple of 128, kv_len, and
the whole [L, B, KVH, S, hd] cache read in place with `layer` (also one above 4 GB).
All programs (kernel + f32 reference in one jit) are compiled in parallel threads first.
Windowed draft attention (issue 9, kwargs window=(sink, recent)): the same checks against the
windowed references for T 1 / 4 / 8 / 16 / prefill, GQA 4 / 8, splits, layer, kv_len, Llama-3-8B
shapes up to 32k; and a test that the kernel never loads the key blocks outside the window
(they hold NaN: a load followed by masking would give NaN through 0 * NaN in p @ V).
Criteria: f32 inputs: relative Frobenius error <= 1e-5 against the f32 reference (the kernel's
dots use IEEE f32, not TF32). bf16: <= 1e-2 against the f32 reference on the same bf16 values,
and <= 1e-2 against qspec_jax.model.attention_reference (bf16, as the model runs it). Rows
that see no key are exactly 0; no NaN anywhere.
Seed: QSPEC_TEST_SEED (default 0).
"""
import concurrent.futures as cf
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.attention import cached_attention, cached_attention_reference, supported

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")

F32, BF16 = jnp.float32, jnp.bfloat16
SEED = int(os.environ.get("QSPEC_TEST_SEED", "0"))


def _cases():
    cs = []
    # id, B, T, H, KVH, S, hd, dtype, positions, kwargs, layers
    for hd in (64, 128):
        for G in (1, 4, 8):
            H, KVH = 4 * G, 4
            for T in (1, 4, 8, 16):
                cs.append((f"T{T}_G{G}_d{hd}_bf16", 6, T, H, KVH, 1024, hd, BF16, "ragged", {}, None))
            cs.append((f"prefill_G{G}_d{hd}_bf16", 3, 200, H, KVH, 256, hd, BF16, "prefill", {}, None))
    for T in (1, 4, 16):
        cs.append((f"T{T}_G4_d128_f32", 6, T, 16, 4, 512, 128, F32, "ragged", {}, None))
    cs.append(("T8_G8_d64_f32_split5", 6, 8, 32, 4, 1024, 64, F32, "ragged",
               dict(num_splits=5), None))
    cs.append(("prefill_G4_d64_f32", 2, 100, 16, 4, 128, 64, F32, "prefill", {}, None))
    # 7 splits (combine chunks 4 + 2 + 1) of 128-row query blocks: 8-wide head-dim chunks
    cs.append(("T16_G8_d128_bf16_split7", 3, 16, 32, 4, 2048, 128, BF16, "ragged",
               dict(num_splits=7), None))
    # Llama-3-8B heads
    cs.append(("llama_B1_S32768_T1", 1, 1, 32, 8, 32768, 128, BF16, "full", {}, None))
    # batch 1 defaults since 5a59859: a full wave of 16 splits, down to one 128-key block each
    # (ragged batch 1 = one sequence at position 0: 15 of the 16 splits empty; full: none)
    cs.append(("llama_B1_S2048_T4", 1, 4, 32, 8, 2048, 128, BF16, "ragged", {}, None))
    cs.append(("llama_B1_S8192_T1", 1, 1, 32, 8, 8192, 128, BF16, "full", {}, None))
    cs.append(("llama_B4_S8192_T4", 4, 4, 32, 8, 8192, 128, BF16, "ragged", {}, None))
    cs.append(("llama_B64_S2048_T8", 64, 8, 32, 8, 2048, 128, BF16, "ragged", {}, None))
    cs.append(("llama_B8_S4160_T4_bk64", 8, 4, 32, 8, 4160, 128, BF16, "ragged", {}, None))
    cs.append(("llama_B2_S1024_T8_layer", 2, 8, 32, 8, 1024, 128, BF16, "ragged", {}, 4))
    # the model's stacked K/V cache (qspec_jax.model.KVCache), batch 1 full wave and batch 6 windowed
    cs.append(("llama_B1_S2048_T4_stacked", 1, 4, 32, 8, 2048, 128, BF16, "full",
               dict(stacked=True), 3))
    cs.append(("win_llama_B6_S2048_T1_s4_r500_stacked", 6, 1, 32, 8, 2048, 128, BF16, "ragged",
               dict(stacked=True, window=(4, 500)), 2))
    # whole cache of 4.3 GB per K / V: 64-bit address offsets
    cs.append(("llama_B16_S4096_T4_layers32", 16, 4, 32, 8, 4096, 128, BF16, "ragged", {}, 32))
    cs.append(("llama_B6_S2048_T4_kvlen", 6, 4, 32, 8, 2048, 128, BF16, "kvlen", {}, None))
    cs.append(("llama_B1_S4096_prefill", 1, 512, 32, 8, 4096, 128, BF16, "prefill", {}, None))
    # windowed draft attention (issue 9)
    cs.append(("win_llama_B6_S8192_T1_s4_r1020", 6, 1, 32, 8, 8192, 128, BF16, "ragged",
               dict(window=(4, 1020)), None))
    cs.append(("win_llama_B1_S32768_T1_s4_r508", 1, 1, 32, 8, 32768, 128, BF16, "full",
               dict(window=(4, 508)), None))
    cs.append(("win_llama_B4_S4096_T4_s0_r300_layer", 4, 4, 32, 8, 4096, 128, BF16, "ragged",
               dict(window=(0, 300)), 4))
    cs.append(("win_llama_B6_S2048_T4_s4_r100_kvlen", 6, 4, 32, 8, 2048, 128, BF16, "kvlen",
               dict(window=(4, 100)), None))
    cs.append(("win_T16_G8_d128_s2_r40", 6, 16, 64, 8, 2048, 128, BF16, "ragged",
               dict(window=(2, 40)), None))
    cs.append(("win_T8_G8_d64_f32_s1_r77_split5", 6, 8, 32, 4, 1024, 64, F32, "ragged",
               dict(window=(1, 77), num_splits=5), None))
    cs.append(("win_prefill_G4_d64_s4_r50", 2, 200, 16, 4, 256, 64, BF16, "prefill",
               dict(window=(4, 50)), None))
    return cs


CASES = _cases()


def _positions(kind, B, T, S):
    """(q_pos [B, T], kv_len [B] or None). Ragged rows: a length-0 sequence (start 0), a padding
    row that sees no key (q_pos = -1), odd lengths, the cache end, past the end (dropped)."""
    if kind == "prefill":
        return np.broadcast_to(np.arange(T), (B, T)).astype(np.int32), None
    if kind == "full":
        return np.broadcast_to(np.arange(S - T, S), (B, T)).astype(np.int32), None
    starts = [0, None, 37, S - T, S // 2 + 5, S - 2, 129, 1000][:B]
    rows = []
    for st in starts:
        rows.append(np.full(T, -1) if st is None else st + np.arange(T))
    while len(rows) < B:
        rows.append((len(rows) * 97) % (S - T) + np.arange(T))
    q_pos = np.stack(rows).astype(np.int32)
    kv_len = None
    if kind == "kvlen":
        kv_len = np.clip(q_pos.max(axis=1) + 1 - np.arange(B) * 3, 0, S).astype(np.int32)
    return q_pos, kv_len


def _program(case):
    _, B, T, H, KVH, S, hd, dtype, kind, kw, layers = case
    layer = layers - 1 if layers else None
    window = kw.get("window")

    def fn(key, q_pos, kv_len):
        k1, k2, k3 = jax.random.split(key, 3)
        lead = (layers,) if layers else ()
        q = jax.random.normal(k1, (B, T, H, hd), F32).astype(dtype)
        kc = jax.random.normal(k2, lead + (B, KVH, S, hd), F32).astype(dtype)
        vc = jax.random.normal(k3, lead + (B, KVH, S, hd), F32).astype(dtype)
        if kw.get("stacked"):  # the model's [L, 2, B, KVH, S, hd] cache, read in place
            kw2 = {k: v for k, v in kw.items() if k != "stacked"}
            out = cached_attention(q, jnp.stack([kc, vc], axis=1), None, q_pos, kv_len,
                                   layer=layer, **kw2)
        else:
            out = cached_attention(q, kc, vc, q_pos, kv_len, layer=layer, **kw)
        if layers:
            kc, vc = kc[layer], vc[layer]
        ref32 = cached_attention_reference(q.astype(F32), kc.astype(F32), vc.astype(F32), q_pos,
                                           kv_len, window=window)
        ref16 = cached_attention_reference(q, kc, vc, q_pos, kv_len, window=window)
        return out, ref32, ref16

    return jax.jit(fn)


@pytest.fixture(scope="module")
def compiled():
    def build(case):
        _, B, T, H, KVH, S, hd, dtype, kind, kw, layers = case
        q_pos, kv_len = _positions(kind, B, T, S)
        args = (jax.random.key(SEED + CASES.index(case)), jnp.asarray(q_pos),
                None if kv_len is None else jnp.asarray(kv_len))
        exe = _program(case).lower(*args).compile()
        return case[0], (exe, args)

    with cf.ThreadPoolExecutor(8) as ex:
        return dict(ex.map(build, CASES))


def _visible(q_pos, kv_len, S, window):
    """[B, T, S] bool: key s visible to query (b, t) (the references' semantics, numpy)."""
    s = np.arange(S)[None, None]
    qp = np.asarray(q_pos)[:, :, None]
    vis = s <= qp
    if kv_len is not None:
        vis &= s < np.asarray(kv_len)[:, None, None]
    if window is not None:
        vis &= (s < window[0]) | (qp - s < window[1])
    return vis


def _rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_attention_gpu(case, compiled):
    name, B, T, H, KVH, S, hd, dtype, kind, kw, layers = case
    assert supported((B, T, H, hd), ((layers,) if layers else ()) + (B, KVH, S, hd), dtype)[0]
    exe, args = compiled[name]
    out, ref32, ref16 = jax.block_until_ready(exe(*args))
    out = np.asarray(out.astype(F32))
    assert out.shape == (B, T, H, hd)
    assert np.all(np.isfinite(out)), "NaN/inf in the kernel output"
    q_pos = np.asarray(args[1])
    kv_len = args[2]
    empty = ~_visible(q_pos, kv_len, S, kw.get("window")).any(axis=2)  # [B, T] rows see no key
    assert np.all(out[empty] == 0)
    tol = 1e-5 if dtype == F32 else 1e-2
    err = _rel(out[~empty], np.asarray(ref32)[~empty])
    assert err <= tol, f"{name}: rel err {err:.2e} vs f32 reference (tol {tol})"
    if dtype == BF16:
        err16 = _rel(out[~empty], np.asarray(ref16.astype(F32))[~empty])
        assert err16 <= tol, f"{name}: rel err {err16:.2e} vs bf16 reference"


def test_matches_model_reference_gpu():
    """The model's own attention_reference (bf16 on the GPU), Llama-3-8B heads, verify step."""
    from qspec_jax.model import attention_reference
    B, T, H, KVH, S, hd = 4, 4, 32, 8, 2048, 128
    k1, k2, k3 = jax.random.split(jax.random.key(SEED + 1000), 3)
    q = jax.random.normal(k1, (B, T, H, hd), F32).astype(BF16)
    kc = jax.random.normal(k2, (B, KVH, S, hd), F32).astype(BF16)
    vc = jax.random.normal(k3, (B, KVH, S, hd), F32).astype(BF16)
    q_pos = jnp.asarray([[0, 1, 2, 3], [500, 501, 502, 503], [2044, 2045, 2046, 2047],
                         [1023, 1024, 1025, 1026]], jnp.int32)
    out = cached_attention(q, kc, vc, q_pos)
    ref = jax.jit(attention_reference)(q, kc, vc, q_pos)
    assert _rel(out.astype(F32), ref.astype(F32)) <= 1e-2


@pytest.mark.parametrize("T, window, kw", [(1, (4, 1020), {}), (4, (0, 300), {}),
                                          (1, (4, 100), dict(num_splits=7)),
                                          (8, (1, 77), dict(block_k=64))])
def test_windowed_never_loads_skipped_blocks_gpu(T, window, kw):
    """Llama-3-8B heads, 8k cache: every key block that holds no key visible to its sequence is
    NaN in K and V. A kernel that loads such a block and masks after the dot multiplies its V
    rows by p = 0 (0 * NaN = NaN); only one that never loads them matches the clean reference."""
    from pallas_kernels.attention import default_config
    B, H, KVH, S, hd = 6, 32, 8, 8192, 128
    q_pos, _ = _positions("ragged", B, T, S)
    k1, k2, k3 = jax.random.split(jax.random.key(SEED + 2000 + T), 3)
    q = jax.random.normal(k1, (B, T, H, hd), F32).astype(BF16)
    kc = jax.random.normal(k2, (B, KVH, S, hd), F32).astype(BF16)
    vc = jax.random.normal(k3, (B, KVH, S, hd), F32).astype(BF16)
    bk = default_config(B, T, H, KVH, S, hd, 2, window=window, **kw).block_k
    vis = _visible(q_pos, None, S, window).any(axis=1)                   # [B, S]
    needed = vis.reshape(B, S // bk, bk).any(axis=2)
    bad = jnp.asarray(np.repeat(~needed, bk, axis=1))[:, None, :, None]
    assert float(needed.mean()) < 0.3
    kp, vp = jnp.where(bad, jnp.nan, kc), jnp.where(bad, jnp.nan, vc)
    q_pos = jnp.asarray(q_pos)
    out = np.asarray(cached_attention(q, kp, vp, q_pos, window=window, **kw).astype(F32))
    assert np.all(np.isfinite(out)), "the kernel loaded a key block outside the window"
    ref = np.asarray(cached_attention_reference(q.astype(F32), kc.astype(F32), vc.astype(F32),
                                                q_pos, window=window))
    assert _rel(out, ref) <= 1e-2


def test_windowed_matches_model_reference_gpu():
    """qspec_jax.model.attention_reference(window=...) (bf16 on the GPU), Llama-3-8B heads."""
    from qspec_jax.model import attention_reference
    B, T, H, KVH, S, hd = 4, 4, 32, 8, 4096, 128
    k1, k2, k3 = jax.random.split(jax.random.key(SEED + 1001), 3)
    q = jax.random.normal(k1, (B, T, H, hd), F32).astype(BF16)
    kc = jax.random.normal(k2, (B, KVH, S, hd), F32).astype(BF16)
    vc = jax.random.normal(k3, (B, KVH, S, hd), F32).astype(BF16)
    q_pos = jnp.asarray([[0, 1, 2, 3], [500, 501, 502, 503], [4092, 4093, 4094, 4095],
                         [3000, 3001, 3002, 3003]], jnp.int32)
    out = cached_attention(q, kc, vc, q_pos, window=(4, 1020))
    ref = jax.jit(attention_reference, static_argnames="window")(q, kc, vc, q_pos,
                                                                 window=(4, 1020))
    assert _rel(out.astype(F32), ref.astype(F32)) <= 1e-2


@pytest.mark.parametrize("B, T, S, dtype, window", [(1, 4, 8192, BF16, None), (8, 4, 2048, BF16, None),
                                                    (4, 8, 1000 // 16 * 16, F32, None),
                                                    (1, 4, 8192, BF16, (4, 1020)),
                                                    (4, 1, 2048, BF16, (4, 300))])
def test_readonly_block_attention_gpu(B, T, S, dtype, window):
    """gamma="auto"'s read-only verify attention: the kernel over the cache (log-sum-exp
    output, flash-decoding splits at 8k) merged with the new block's attention equals the XLA
    reference qspec_jax.model.attention_with_block (Llama-3-8B heads, ragged starts); with a
    draft window, windowed over both (auto's read-only windowed drafts)."""
    from qspec_jax import kernel_dispatch as kd
    from qspec_jax.model import attention_with_block, block_mask, window_mask
    L, H, KVH, hd = 2, 32, 8, 128
    k = jax.random.split(jax.random.fold_in(jax.random.key(SEED), 77), 5)
    q = jax.random.normal(k[0], (B, T, H, hd), F32).astype(dtype)
    ck = jax.random.normal(k[1], (L, B, KVH, S, hd), F32).astype(dtype)
    cv = jax.random.normal(k[2], (L, B, KVH, S, hd), F32).astype(dtype)
    kb = jax.random.normal(k[3], (B, KVH, T, hd), F32).astype(dtype)
    vb = jax.random.normal(k[4], (B, KVH, T, hd), F32).astype(dtype)
    start = jnp.asarray(np.linspace(0, S - T, B).astype(np.int32))
    q_pos = start[:, None] + jnp.arange(T)[None]
    blk_ok = None if window is None else block_mask(T) & window_mask(q_pos, q_pos, window)
    ours = jax.jit(lambda *a: kd.attention_with_block(*a, 1, "pallas", blk_ok, window, q_pos))(
        q, ck, cv, kb, vb, start)
    ref = jax.jit(lambda *a: attention_with_block(*a, blk_ok, window, q_pos))(
        q, ck[1], cv[1], kb, vb, start)
    assert not np.isnan(np.asarray(ours, np.float32)).any()
    # f32: XLA's f32 einsums (reference and the new-block part) may run as TF32 on the GPU.
    assert _rel(ours, ref) <= (2e-3 if dtype == F32 else 1e-2)


def chunked_vs_whole_prefill(tmp_path, lens, chunk, cache_len, **sizes):
    """(logits, K, V) of a prompt prefilled in chunks through the Pallas kernel and of one XLA
    forward over the whole prompt, for a random bf16 model saved with save_pretrained."""
    import qspec_jax as qj
    from hf_models import build_hf_model
    from qspec_jax.generate import prefill
    from qspec_jax.model import KVCache
    build_hf_model("llama", **sizes).save_pretrained(tmp_path / "m")
    model = qj.load(str(tmp_path / "m"), dtype="bfloat16")
    toks = np.random.RandomState(0).randint(3, model.cfg.vocab_size, (len(lens), max(lens)))
    out = []
    for c, kernels in ((None, "xla"), (chunk, "pallas")):
        run = jax.jit(lambda t, l, cache, c=c, kernels=kernels: prefill(
            model.module, t, l, cache, mode="w16", kernels=kernels, chunk=c))
        cache = KVCache.create(model.cfg, len(lens), cache_len, model.dtype)
        logits, cache = run(jnp.asarray(toks), jnp.asarray(lens), cache)
        out.append((np.asarray(logits), np.asarray(cache.k.astype(F32)),
                    np.asarray(cache.v.astype(F32))))
    return out


def test_chunked_prefill_through_the_kernel_gpu(tmp_path):
    """2 prompts of 3000 / 1777 tokens prefilled in chunks of 1024 through the Pallas kernel
    (8 heads of 128, GQA 4; 3 chunks, the last overlapping) = one XLA forward over the whole
    prompt: logits at the last tokens and the cache at every prompt position (bf16)."""
    lens = [3000, 1777]
    (whole, chunked) = chunked_vs_whole_prefill(
        tmp_path, lens, 1024, 3072, hidden_size=1024, intermediate_size=2048,
        num_attention_heads=8, num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096)
    assert _rel(chunked[0], whole[0]) <= 2e-2
    for b, n in enumerate(lens):
        for i in (1, 2):
            assert _rel(chunked[i][:, b, :, :n], whole[i][:, b, :, :n]) <= 2e-2
