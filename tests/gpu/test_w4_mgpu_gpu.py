"""Mosaic GPU swap-AB int4 GEMM on the GPU against the model-layout references: the 8B shapes,
odd M (not a multiple of the 8 / 16 rows the wgmma takes), the smallest N and K, both modes;
unsupported shapes rejected with a clear error."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._common import quantize_per_token_reference
from pallas_kernels.w4_mgpu import MgpuConfig, nk_from_half_split, w4_mgpu_matmul
from pallas_kernels.w4a16_matmul import w4a16_matmul_reference
from pallas_kernels.w4a8_matmul import w4a8_matmul_reference

SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (256, 64), (512, 192)]


def _case(K, N, M, seed):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    qw = jax.random.randint(k1, (K // 2, N), -128, 128, jnp.int32).astype(jnp.int8)
    s = jax.random.uniform(k2, (1, N), jnp.float32, 0.5, 1.5) * 0.02
    x = jax.random.normal(k3, (M, K), jnp.float32).astype(jnp.bfloat16)
    return qw, s, x


@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("M", [1, 3, 8, 11, 16, 24, 64, 100, 128, 256])
def test_w4a16_matches_reference(K, N, M):
    qw, s, x = _case(K, N, M, seed=K + N + M)
    got = np.asarray(jax.jit(w4_mgpu_matmul)(x, nk_from_half_split(qw), s[0]), np.float32)
    want = np.asarray(w4a16_matmul_reference(x, qw, s), np.float32)
    # Both round an f32 accumulation to bf16 (different summation order): 2 bf16 ulps.
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=1e-3)


@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("M", [1, 5, 16, 40, 100, 256])
def test_w4a8_matches_reference(K, N, M):
    qw, s, x = _case(K, N, M, seed=7 * K + N + M)
    xq, sx = quantize_per_token_reference(x, 8)
    got = np.asarray(jax.jit(w4_mgpu_matmul)(xq, nk_from_half_split(qw), s[0], sx.reshape(-1)),
                     np.float32)
    want = np.asarray(w4a8_matmul_reference(xq, sx, qw, s), np.float32)
    # int32 accumulation is exact; only the f32 scale products may round differently.
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=1e-3)


@pytest.mark.parametrize("K,N", [(8192, 10240), (8192, 8192), (8192, 57344), (28672, 8192)])
@pytest.mark.parametrize("M", [1, 16, 128, 256])
@pytest.mark.parametrize("int8", [False, True])
def test_70b_default_configs_match_reference(K, N, M, int8):
    """The default configs at the Llama-70B shapes (kernels_h200_70b_27efb4b.md times them),
    including the 128-column int8 tile for gate/up (N = 57344) at 256 rows."""
    qw, s, x = _case(K, N, M, seed=K + N + M + int8)
    if int8:
        xq, sx = quantize_per_token_reference(x, 8)
        got = jax.jit(w4_mgpu_matmul)(xq, nk_from_half_split(qw), s[0], sx.reshape(-1))
        want = w4a8_matmul_reference(xq, sx, qw, s)
    else:
        got = jax.jit(w4_mgpu_matmul)(x, nk_from_half_split(qw), s[0])
        want = w4a16_matmul_reference(x, qw, s)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=2 ** -7, atol=1e-3)


@pytest.mark.parametrize("cfg", [MgpuConfig(tile_n=128, block_k=512, split_k=1, stages=3),
                                 MgpuConfig(tile_n=64, block_k=256, split_k=4, stages=4),
                                 MgpuConfig(tile_n=64, block_k=128, split_k=2, stages=6),
                                 MgpuConfig(tile_n=64, block_k=64, split_k=1, stages=8),
                                 MgpuConfig(tile_n=128, block_k=256, split_k=2, stages=3,
                                            warp_specialized=True),
                                 MgpuConfig(tile_n=64, block_k=256, split_k=2, stages=2, smem_a=True),
                                 MgpuConfig(tile_n=64, block_k=128, split_k=1, stages=4, smem_a=True),
                                 MgpuConfig(tile_n=64, block_k=256, split_k=4, stages=4, units_per_cta=4),
                                 MgpuConfig(tile_n=64, block_k=256, split_k=2, stages=2, units_per_cta=8),
                                 MgpuConfig(tile_n=64, block_k=512, split_k=1, stages=3, units_per_cta=16)])
def test_other_configs(cfg):
    K, N, M = 4096, 1024, 9
    qw, s, x = _case(K, N, M, seed=3)
    got = np.asarray(jax.jit(lambda *a: w4_mgpu_matmul(*a, config=cfg))(
        x, nk_from_half_split(qw), s[0]), np.float32)
    want = np.asarray(w4a16_matmul_reference(x, qw, s), np.float32)
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=1e-3)


def _check_default_config_variant(K, N, M, int8, seed, **changes):
    """The kernel with the model's default config for this shape, `changes` applied, against the
    model-layout reference of its mode on fresh random inputs."""
    import dataclasses

    from pallas_kernels.w4_mgpu import default_config
    qw, s, x = _case(K, N, M, seed=seed)
    if changes.get("smem_a") or changes.get("warp_specialized") or changes.get("units_per_cta", 1) > 1:
        changes.setdefault("out_mn", False)  # those variants keep the [M, N] partial sums
    cfg = dataclasses.replace(default_config(M, K, N, int8), **changes)
    if int8:
        xq, sx = quantize_per_token_reference(x, 8)
        got = jax.jit(lambda *a: w4_mgpu_matmul(*a, config=cfg))(
            xq, nk_from_half_split(qw), s[0], sx.reshape(-1))
        want = w4a8_matmul_reference(xq, sx, qw, s)
    else:
        got = jax.jit(lambda *a: w4_mgpu_matmul(*a, config=cfg))(x, nk_from_half_split(qw), s[0])
        want = w4a16_matmul_reference(x, qw, s)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=2 ** -7, atol=1e-3)


@pytest.mark.parametrize("K,N", SHAPES[:4])
@pytest.mark.parametrize("M", [1, 16])
@pytest.mark.parametrize("int8", [False, True])
def test_smem_a_matches_reference(K, N, M, int8):
    """The shared-memory-operand variant (one MMA in flight) at the 8B shapes with the default
    split, both modes."""
    _check_default_config_variant(K, N, M, int8, 11 * K + N + M, smem_a=True)


@pytest.mark.parametrize("K,N", SHAPES[:4])
@pytest.mark.parametrize("M", [1, 16, 64])
@pytest.mark.parametrize("int8", [False, True])
def test_persistent_matches_reference(K, N, M, int8):
    """Persistent CTAs (two units each through one pipeline: the accumulator restarts between
    them) at the 8B shapes with the default split, both modes."""
    _check_default_config_variant(K, N, M, int8, 13 * K + N + M, units_per_cta=2, stages=4)


@pytest.mark.parametrize("K,N", [(4096, 28672), (14336, 4096), (512, 256)])
@pytest.mark.parametrize("M,tile_m,tile_n", [(256, 128, 64), (256, 128, 128), (200, 64, 64),
                                             (128, 64, 128), (40, 128, 64)])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("out_mn", [True, False])
def test_tile_m_matches_reference(K, N, M, tile_m, tile_n, int8, out_mn):
    """x's rows split over CTAs (MgpuConfig.tile_m; M = 40 pads to 64 rows: one M tile) with
    the default split and 128-wide K steps, both modes, both partial-sum layouts."""
    _check_default_config_variant(K, N, M, int8, 17 * K + N + M + tile_n, tile_m=tile_m,
                                  tile_n=tile_n, block_k=128, out_mn=out_mn)


@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("M", [1, 5, 16, 40, 64])
@pytest.mark.parametrize("int8", [False, True])
def test_out_mn_matches_reference(K, N, M, int8):
    """Partial sums stored transposed ([split_k, Mp, N]: the accumulator through the
    WGMMA_TRANSPOSED layout into a transposed shared-memory view) with the default split."""
    _check_default_config_variant(K, N, M, int8, 17 * K + N + M, out_mn=True)


@pytest.mark.parametrize("K,N,out_mn", [(K, N, True) for K, N in SHAPES] + [(512, 192, False)])
@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("pdl", ["wait", "prefetch"])
def test_pdl_matches_reference(K, N, out_mn, M, int8, pdl):
    """The programmatic-dependent-launch variants ("wait": the plain kernel after a
    griddepcontrol wait; "prefetch": weights loaded before the wait, x TMA'd whole after it,
    unpadded x below 8 rows) with the default split, both modes, the model's transposed
    partial sums (and the [split, N, M] layout at one small shape)."""
    _check_default_config_variant(K, N, M, int8, 17 * K + N + M, pdl=pdl, out_mn=out_mn)


def _switch_keeps_the_model_lossless(monkeypatch, request, name, value):
    """Set w4_mgpu.<name> = value on a small random model (int4 [N, K]): logits of both modes
    within bf16 rounding of the default kernel's, QSpec still equal to w4a16 decoding (near-ties
    aside). Returns the (config, Mp) of every Mosaic kernel traced after the switch."""
    import qspec_jax as qj
    from experiments import sweep
    from pallas_kernels import w4_mgpu
    monkeypatch.setitem(sweep.SHAPED, "t256", dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, vocab_size=256))
    m = qj.with_weight_layout(sweep.random_model("t256", True), "nk")
    toks = [[5, 17, 3, 99, 4], [8, 9, 1, 2, 3]]
    jax.clear_caches()  # programs traced by earlier tests (same shapes) must not be reused
    base = {mode: np.asarray(qj.logits(m, toks, mode=mode), np.float32) for mode in ("w4a16", "w4a8")}
    monkeypatch.setattr(w4_mgpu, name, value)
    jax.clear_caches()
    request.addfinalizer(jax.clear_caches)  # nothing traced with the switch outlives the test
    seen = []
    real_kernel = w4_mgpu._kernel

    def spy(cfg, Mp, *a):
        seen.append((cfg, Mp))
        return real_kernel(cfg, Mp, *a)
    monkeypatch.setattr(w4_mgpu, "_kernel", spy)
    for mode, a in base.items():
        b = np.asarray(qj.logits(m, toks, mode=mode), np.float32)
        np.testing.assert_allclose(a, b, atol=0.02 * np.abs(a).max())
    prompts = [[3, 4, 5, 6], [7, 8]] + [[9 + i] * (1 + i % 5) for i in range(10)]
    ar = qj.generate(m, prompts, max_new_tokens=12, mode="w4a16")
    qs = qj.generate(m, prompts, max_new_tokens=12, mode="qspec", gamma=3)
    _assert_equal_but_for_near_ties(m, prompts, qs.tokens, ar.tokens)
    return seen


@pytest.mark.parametrize("pdl", ["wait", "prefetch"])
def test_pdl_in_the_model(monkeypatch, request, pdl):
    """w4_mgpu.PDL (GEMMs of <= 16 padded rows launched with PDL, each overlapping the kernel
    before it): the model stays lossless (_switch_keeps_the_model_lossless); exactly the GEMMs of
    <= PDL_MAX_ROWS padded rows took a pdl config."""
    from pallas_kernels import w4_mgpu
    seen = _switch_keeps_the_model_lossless(monkeypatch, request, "PDL", pdl)
    assert any(cfg.pdl == pdl for cfg, _ in seen)
    assert all(bool(cfg.pdl) == (Mp <= w4_mgpu.PDL_MAX_ROWS) for cfg, Mp in seen), seen


def test_out_mn_in_the_model(monkeypatch, request):
    """w4_mgpu.OUT_MN (every model GEMM stores transposed partial sums): the model stays
    lossless (_switch_keeps_the_model_lossless)."""
    seen = _switch_keeps_the_model_lossless(monkeypatch, request, "OUT_MN", True)
    assert seen and all(cfg.out_mn for cfg, _ in seen)  # every Mosaic GEMM traced after the switch


@pytest.mark.parametrize("K,N", [(4096, 6144), (14336, 4096), (512, 192)])
@pytest.mark.parametrize("M", [1, 3, 5, 11, 40])
@pytest.mark.parametrize("int8", [False, True])
def test_x_pad_by_tma_gives_the_same_bits(K, N, M, int8, monkeypatch):
    """w4_mgpu.X_PAD = "tma" (x unpadded; the TMA tiles zero-fill rows past M): the same output
    as padding x with XLA, bit for bit."""
    from pallas_kernels import w4_mgpu
    qw, s, x = _case(K, N, M, seed=3 * K + N + M)
    args = (x, nk_from_half_split(qw), s[0])
    if int8:
        xq, sx = quantize_per_token_reference(x, 8)
        args = (xq, args[1], s[0], sx.reshape(-1))
    base = np.asarray(jax.jit(w4_mgpu_matmul)(*args), np.float32)
    monkeypatch.setattr(w4_mgpu, "X_PAD", "tma")
    got = np.asarray(jax.jit(lambda *a: w4_mgpu_matmul(*a))(*args), np.float32)
    np.testing.assert_array_equal(got, base)


def test_rejects_unsupported_shapes():
    x = jnp.zeros((4, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiple of tile_n"):
        w4_mgpu_matmul(x, jnp.zeros((96, 256), jnp.int4), jnp.ones((96,), jnp.float32))
    with pytest.raises(ValueError, match="M <= 256"):
        w4_mgpu_matmul(jnp.zeros((257, 256), jnp.bfloat16), jnp.zeros((64, 256), jnp.int4),
                       jnp.ones((64,), jnp.float32))


def test_model_in_nk_layout_uses_the_kernel_and_stays_lossless(caplog):
    """The default model with int4 [N, K] weights on the GPU: decode GEMMs run the Mosaic
    kernel; QSpec's tokens equal w4a16 decoding's in that layout; logits stay within bf16
    rounding of the stored layout's (Triton kernels)."""
    import logging

    import qspec_jax as qj
    m = qj.load(None, quant="w4")
    nk = qj.with_weight_layout(m, "nk")
    with caplog.at_level(logging.INFO, logger="qspec_jax"):
        prompts = ["def add(a, b):\n    return", "import os\n", "class A:\n"]
        ar = qj.generate(nk, prompts, max_new_tokens=24, mode="w4a16")
        qs = qj.generate(nk, prompts, max_new_tokens=24, mode="qspec", gamma=3)
        # 12 sequences: gamma-3 verify passes of 48 rows (the Mosaic kernel where K allows)
        prompts12 = prompts * 4
        ar12 = qj.generate(nk, prompts12, max_new_tokens=24, mode="w4a16")
        qs12 = qj.generate(nk, prompts12, max_new_tokens=24, mode="qspec", gamma=3)
    assert qs.tokens == ar.tokens
    assert qs12.tokens == ar12.tokens
    assert any("Mosaic GPU kernel" in r.getMessage() for r in caplog.records)
    toks = [[5, 17, 3, 99]]
    for mode in ("w4a16", "w4a8"):
        a = np.asarray(qj.logits(m, toks, mode=mode), np.float32)
        b = np.asarray(qj.logits(nk, toks, mode=mode), np.float32)
        np.testing.assert_allclose(a, b, atol=0.05 * np.abs(a).max())


@pytest.mark.parametrize("n_seq", [12, 40])
def test_auto_layout_on_this_gpu(monkeypatch, n_seq):
    """weight_layout="auto" on the device: nk (the Mosaic kernels) for a model whose layers the
    kernel takes on a Hopper GPU, the stored layout for the default model (K = 384 is not a
    multiple of 256); QSpec stays lossless in the chosen layout, verify passes of 48 and 160 rows
    (x padded to 64 / 256) included."""
    import qspec_jax as qj
    from experiments import sweep
    monkeypatch.setitem(sweep.SHAPED, "t256", dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, vocab_size=256))
    hopper = str(getattr(jax.devices()[0], "compute_capability", "")).split(".")[0] == "9"
    m = qj.with_weight_layout(sweep.random_model("t256", True), "auto")
    assert m.weight_layout == ("nk" if hopper else "half_split")
    assert qj.load(None, quant="w4").weight_layout == "half_split"
    # 12 / 40 sequences: draft GEMMs at M = 12 / 40, gamma-3 verify passes at M = 48 / 160 (all
    # on the Mosaic kernel: kernel_dispatch.mgpu_max_m)
    prompts = [[3, 4, 5, 6], [7, 8]] + [[9 + i % 200] * (1 + i % 5) for i in range(n_seq - 2)]
    ar = qj.generate(m, prompts, max_new_tokens=12, mode="w4a16")
    qs = qj.generate(m, prompts, max_new_tokens=12, mode="qspec", gamma=3)
    _assert_equal_but_for_near_ties(m, prompts, qs.tokens, ar.tokens)


def _assert_equal_but_for_near_ties(model, prompts, got, want, rel=2 ** -6):
    """Greedy QSpec tokens equal verify-mode decoding's, except that a sequence may part ways
    where verify mode's two best logits are within bf16 rounding of each other (a random-weight
    model has such near-ties, and a verify pass over M rows need not round like a decode step
    over fewer: same math, other kernel tiles). At most a quarter of the sequences may."""
    import qspec_jax as qj
    parted = 0
    for p, g, w in zip(prompts, got, want):
        if g == w:
            continue
        parted += 1
        i = next(j for j in range(min(len(g), len(w))) if g[j] != w[j])
        lg = np.asarray(qj.logits(model, [list(p) + w[:i]], mode="w4a16"), np.float32)[0, -1]
        top2 = np.sort(lg)[-2:]
        assert top2[1] - top2[0] <= rel * np.abs(lg).max(), (
            f"QSpec left verify-mode decoding at step {i} where verify mode's margin is "
            f"{top2[1] - top2[0]:.4g} (logits up to {np.abs(lg).max():.4g}): not a near-tie")
        assert {g[i], w[i]} <= set(np.argsort(lg)[-2:].tolist())
    assert parted <= len(prompts) // 4, f"{parted} of {len(prompts)} sequences differ"


def test_cache_write_per_step_on_the_gpu(monkeypatch):
    """qspec_jax.model.CACHE_WRITE = "step" (read-only forwards through the Pallas attention
    with a block, K/V written once per step) on the GPU: the default model in the nk layout
    gives the per-layer writes' tokens for w4a16 decoding and QSpec gamma 3, at 3 and 12
    sequences (the attention kernel's batch threshold between them), near-ties aside: a
    read-only pass merges the cache's and the block's softmax parts (at another split point
    in a verify pass than in a decode step), which rounds unlike one softmax over the written
    cache (runs at b5157b3 and d6bc22a each parted in one of 12 sequences, in a repeating loop)."""
    import qspec_jax as qj
    from qspec_jax import model as model_module
    nk = qj.with_weight_layout(qj.load(None, quant="w4"), "nk")
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    for ps in (prompts, [p + [13 + i] for i, p in enumerate(prompts * 4)]):
        monkeypatch.setattr(model_module, "CACHE_WRITE", "layer")
        ref = qj.generate(nk, ps, max_new_tokens=24, mode="w4a16").tokens
        monkeypatch.setattr(model_module, "CACHE_WRITE", "step")
        ar = qj.generate(nk, ps, max_new_tokens=24, mode="w4a16").tokens
        _assert_equal_but_for_near_ties(nk, ps, ar, ref)
        qs = qj.generate(nk, ps, max_new_tokens=24, mode="qspec", gamma=3).tokens
        _assert_equal_but_for_near_ties(nk, ps, qs, ref)
