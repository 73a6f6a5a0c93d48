"""Mosaic GPU swap-AB int4 GEMM (pallas_kernels/w4_mgpu.py) on CPU: the layout conversion and
the kernel's reference against the model-layout references, shape errors, and lowering for CUDA
(the kernel itself runs only on a GPU: tests/gpu/test_w4_mgpu_gpu.py)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import w4_mgpu
from pallas_kernels._common import quantize_per_token_reference, unpack_int4
from pallas_kernels.w4_mgpu import MgpuConfig, check, nk_from_half_split, reference, w4_mgpu_matmul
from pallas_kernels.w4a16_matmul import w4a16_matmul_reference
from pallas_kernels.w4a8_matmul import w4a8_matmul_reference


def _weights(K, N, seed=0):
    rng = np.random.default_rng(seed)
    qw = jnp.asarray(rng.integers(-128, 128, (K // 2, N)), jnp.int8)
    s = jnp.asarray(rng.uniform(0.5, 1.5, (1, N)) * 0.02, jnp.float32)
    return qw, s


def _lowers_to_mosaic(M, K, N, int8, cfg=None) -> bool:
    """Whether w4_mgpu_matmul (bf16 x, or int8 x with per-token scales) at this shape and config
    (None: the default) lowers for CUDA on this CPU to the Mosaic GPU custom call."""
    avals = [jax.ShapeDtypeStruct((M, K), jnp.int8 if int8 else jnp.bfloat16),
             jax.ShapeDtypeStruct((N, K), jnp.int4), jax.ShapeDtypeStruct((N,), jnp.float32)]
    if int8:
        avals.append(jax.ShapeDtypeStruct((M,), jnp.float32))
    text = jax.jit(lambda *a: w4_mgpu_matmul(*a, config=cfg)).trace(*avals).lower(
        lowering_platforms=("cuda",)).as_text()
    return "mosaic_gpu" in text


def test_nk_layout_is_the_transposed_unpacked_weight():
    qw, _ = _weights(64, 24)
    nk = nk_from_half_split(qw)
    assert nk.dtype == jnp.int4 and nk.shape == (24, 64)
    q = np.asarray(qw).astype(np.int16)
    lo = ((q & 15) ^ 8) - 8          # low nibble, two's complement, computed independently
    hi = q >> 4
    expect = np.concatenate([lo, hi], axis=0).T
    np.testing.assert_array_equal(np.asarray(nk.astype(jnp.int8)), expect)
    np.testing.assert_array_equal(np.asarray(nk.astype(jnp.int8)), np.asarray(unpack_int4(qw)).T)


@pytest.mark.parametrize("M", [1, 5, 16])
def test_reference_matches_model_layout_references(M):
    K, N = 256, 64
    qw, s = _weights(K, N, seed=M)
    x = jax.random.normal(jax.random.key(M), (M, K), jnp.float32).astype(jnp.bfloat16)
    nk = nk_from_half_split(qw)
    got = reference(x, nk, s[0])
    want = w4a16_matmul_reference(x, qw, s)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=1e-2, atol=1e-2)  # both round one f32 result to bf16
    xq, sx = quantize_per_token_reference(x, 8)
    got8 = reference(xq, nk, s[0], sx.reshape(-1))
    want8 = w4a8_matmul_reference(xq, sx, qw, s)
    np.testing.assert_allclose(np.asarray(got8, np.float32), np.asarray(want8, np.float32),
                               rtol=1e-2, atol=1e-3)


def test_shape_errors_name_the_problem():
    assert "M <= 256" in check(257, 256, 64, MgpuConfig())
    assert check(17, 256, 64, MgpuConfig(tile_n=64)) is None
    from pallas_kernels.w4_mgpu import padded_rows
    assert [padded_rows(m) for m in (1, 8, 9, 16, 17, 33, 64, 65, 200, 256)] == [
        8, 8, 16, 16, 32, 64, 64, 128, 256, 256]
    # x padded to 256 rows: 256-wide K steps in two stages overflow shared memory (Mosaic's
    # own count: 344,080 bytes); the message says what to change
    err = check(256, 4096, 6144, MgpuConfig(tile_n=64, block_k=256, split_k=1, stages=2))
    assert "344064 bytes of shared memory" in err and "smaller block_k" in err
    assert check(256, 4096, 6144, MgpuConfig(tile_n=64, block_k=128, split_k=1, stages=2)) is None
    assert "multiple of tile_n" in check(4, 256, 96, MgpuConfig(tile_n=64))
    assert "block_k*split_k" in check(4, 256, 64, MgpuConfig(tile_n=64, block_k=256, split_k=2))
    assert "multiple of 64" in check(4, 256, 64, MgpuConfig(tile_n=32))
    assert "128 with warp_specialized" in check(4, 256, 64, MgpuConfig(tile_n=64, warp_specialized=True))
    assert check(16, 512, 128, MgpuConfig(tile_n=64, split_k=2)) is None
    x = jnp.zeros((280, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="w4_mgpu_matmul: M=280"):
        w4_mgpu_matmul(x, jnp.zeros((64, 256), jnp.int4), jnp.ones((64,), jnp.float32))


def test_default_configs_fit_the_1b_shapes():
    """The Llama-3.2-1B layers (bench_kernels.SHAPES_1B; stage kernels1b times them): every
    default config from 1 to 256 rows passes check() and one lowers for CUDA per shape."""
    from experiments.bench_kernels import SHAPES_1B, parse_shapes
    assert parse_shapes("1b") == SHAPES_1B
    for K, N in SHAPES_1B:
        for M in (1, 4, 16, 64, 128, 256):
            for int8 in (False, True):
                assert check(M, K, N, w4_mgpu.default_config(M, K, N, int8)) is None, (M, K, N, int8)
        assert _lowers_to_mosaic(16, K, N, True)


def test_probe_diag_read_configs_fit_and_lower():
    """probe_mgpu.py --sweep diag: the read-only structures it times at the 8B shapes pass
    check() and lower for CUDA without the MMA the GEMM has; probe values are checked."""
    from experiments.probe_mgpu import diag_read_configs
    for K, N in [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]:
        cfgs = diag_read_configs(K, N)
        assert len(cfgs) >= 12 and all(c.probe == "read" and check(1, K, N, c) is None for c in cfgs)
        assert any(c.tile_n == 128 for c in cfgs) and any(c.stages == 6 for c in cfgs)
    avals = (jax.ShapeDtypeStruct((8, 1024), jnp.bfloat16), jax.ShapeDtypeStruct((128, 1024), jnp.int4))
    texts = {}
    for probe in ("", "read"):
        cfg = MgpuConfig(tile_n=64, block_k=256, split_k=2, stages=2, probe=probe)
        texts[probe] = w4_mgpu._kernel(cfg, 8, 1024, 128, False).trace(*avals).lower(
            lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in texts[probe]
    assert len(texts["read"]) < len(texts[""]) // 2  # no unpack, no wgmma in the read probe
    assert "probe='x'" in check(1, 1024, 128, MgpuConfig(tile_n=64, probe="x"))
    assert "plain kernel only" in check(1, 1024, 128, MgpuConfig(tile_n=64, probe="read", smem_a=True))
    assert MgpuConfig(probe="read").short().endswith("-read")


@pytest.mark.parametrize("mode", ["w4a16", "w4a8"])
@pytest.mark.parametrize("ws,bk,stages,sa,upc", [(False, 256, 2, False, 1), (True, 256, 2, False, 1),
                                                 (False, 64, 8, False, 1), (False, 256, 2, True, 1),
                                                 (False, 256, 4, False, 2), (False, 256, 2, False, "mn")])
def test_lowers_for_cuda(mode, ws, bk, stages, sa, upc):
    """The Mosaic GPU kernel (plain, warp-specialized, narrow K steps with a deep ring, the
    shared-memory-operand variant, persistent CTAs, transposed partial sums) traces and lowers
    to its custom call on CPU (no GPU needed; Mosaic's layout inference runs here)."""
    M, K, N = 5 if not ws else 40, 1024, 128
    int8 = mode == "w4a8"
    cfg = MgpuConfig(tile_n=128 if ws else 64, block_k=bk, split_k=2, stages=stages,
                     load_layout="wgmma" if int8 else "upcast", warp_specialized=ws, smem_a=sa,
                     units_per_cta=1 if upc == "mn" else upc, out_mn=upc == "mn")
    assert _lowers_to_mosaic(M, K, N, int8, cfg)


def test_smem_a_shapes_it_cannot_hold_are_rejected():
    """smem_a keeps x's K slice in shared memory: 16 rows of the 8B gate/up input fit at 2
    splits, 64 rows of it at 1 split do not, and the error says what to change."""
    cfg = MgpuConfig(tile_n=64, block_k=256, split_k=2, stages=2, smem_a=True)
    assert check(16, 4096, 28672, cfg) is None
    err = check(64, 4096, 28672, MgpuConfig(tile_n=64, block_k=256, split_k=1, stages=2, smem_a=True))
    assert "shared memory" in err and "larger split_k" in err
    assert "do not combine" in check(16, 4096, 28672, MgpuConfig(smem_a=True, warp_specialized=True))


def test_default_config_follows_the_h200_sweep():
    """mgpu_h200.md / mgpu_h200_m64.md: the fastest measured split per 8B shape (64-row tiles,
    256-wide K steps)."""
    from pallas_kernels.w4_mgpu import default_config
    splits = {(4096, 28672): 2, (14336, 4096): 8, (4096, 6144): 4, (4096, 4096): 4}
    for (K, N), sk in splits.items():
        cfg = default_config(16, K, N)
        assert (cfg.tile_n, cfg.block_k, cfg.split_k, cfg.stages) == (64, 256, sk, 2)
        assert check(16, K, N, cfg) is None
    # x padded to 64 rows (M 33-64): about half the CTAs (mgpu_h200_m64.md's tune sweep)
    for (K, N), sk in {(4096, 28672): 1, (14336, 4096): 4, (4096, 6144): 4, (4096, 4096): 4}.items():
        assert default_config(33, K, N).split_k == default_config(64, K, N).split_k == sk
    assert default_config(32, 4096, 28672).split_k == 2
    # x padded to 128 / 256 rows (bigm_h200_c477f3c.md): the fastest measured config per 8B
    # shape and mode, or one within 5% of it: (block_k, split_k, tile_m), tile_n 64 but for
    # the fastest w4a8 gate/up at 256 rows (128 columns, 128-wide K steps: tile_n in `want`)
    best = {(128, False): {(4096, 6144): (128, 2, 0), (4096, 4096): (128, 4, 0),
                           (4096, 28672): (128, 1, 0), (14336, 4096): (128, 4, 0)},
            (256, False): {(4096, 6144): (128, 1, 128), (4096, 4096): (128, 2, 128),
                           (4096, 28672): (128, 1, 128), (14336, 4096): (128, 2, 128)},
            (128, True): {(4096, 6144): (256, 2, 0), (4096, 4096): (256, 4, 0),
                          (4096, 28672): (256, 1, 0), (14336, 4096): (256, 4, 0)},
            (256, True): {(4096, 6144): (256, 1, 128), (4096, 4096): (256, 2, 128),
                          (4096, 28672): (128, 128, 1, 128), (14336, 4096): (256, 2, 128)}}
    for (M, int8), shapes in best.items():
        for (K, N), want in shapes.items():
            for m in (M // 2 + 1, M):  # every M that pads to these rows
                cfg = default_config(m, K, N, int8)
                want = want if len(want) == 4 else (64, *want)
                assert (cfg.tile_n, cfg.block_k, cfg.split_k, cfg.tile_m) == want, (m, K, N, int8)
                assert check(m, K, N, cfg) is None


@pytest.mark.parametrize("M", [100, 128, 200, 256])
@pytest.mark.parametrize("K,N", [(4096, 6144), (14336, 4096)])
@pytest.mark.parametrize("int8", [False, True])
def test_large_m_default_configs_fit_and_lower(M, K, N, int8):
    """The kernel takes M up to MAX_M = 256 (the wgmma's N): each M's default config passes
    check() (shared memory included) and lowers for CUDA in both modes."""
    from pallas_kernels.w4_mgpu import MAX_M, default_config, padded_rows
    assert MAX_M == 256
    cfg = default_config(M, K, N, int8)
    assert cfg.block_k == (256 if int8 else 128)
    assert cfg.tile_m == (128 if padded_rows(M) == 256 else 0)
    assert check(M, K, N, cfg) is None
    assert _lowers_to_mosaic(M, K, N, int8)


def test_wide_int8_default_config_at_256_rows_fits_and_lowers():
    """The one 128-column default (int8 x at 256 rows, N >= WIDE_N_INT8_256: 8B / 70B gate/up)
    passes check() and lowers for CUDA; narrower GEMMs and bf16 x keep 64-column tiles."""
    from pallas_kernels.w4_mgpu import WIDE_N_INT8_256, default_config
    for K, N in ((4096, 28672), (8192, 57344)):
        cfg = default_config(256, K, N, True)
        assert (cfg.tile_n, cfg.block_k, cfg.tile_m) == (128, 128, 128) and check(256, K, N, cfg) is None
        assert default_config(256, K, N).tile_n == default_config(128, K, N, True).tile_n == 64
    assert default_config(256, 4096, WIDE_N_INT8_256 - 64, True).tile_n == 64
    odd = default_config(256, 4096, WIDE_N_INT8_256 + 64, True)  # N not a multiple of 128
    assert odd.tile_n == 64 and check(256, 4096, WIDE_N_INT8_256 + 64, odd) is None
    assert _lowers_to_mosaic(256, 4096, 28672, True)


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("out_mn", [True, False])
@pytest.mark.parametrize("M,tile_m", [(256, 128), (200, 64), (128, 64)])
def test_tile_m_configs_lower(M, tile_m, int8, out_mn):
    """x's rows split over CTAs (MgpuConfig.tile_m: a third grid axis, [tile_m, block_k] x
    tiles, a [tile_n, tile_m] accumulator stored at its rows) lowers for CUDA in both modes and
    both partial-sum layouts; its shared memory counts one M tile."""
    from pallas_kernels.w4_mgpu import padded_rows, plain_smem_bytes
    K, N = 1024, 256
    cfg = MgpuConfig(tile_n=128, block_k=128, split_k=2, stages=2, tile_m=tile_m, out_mn=out_mn,
                     load_layout="wgmma" if int8 else "upcast")
    assert check(M, K, N, cfg) is None and cfg.rows_per_cta(padded_rows(M)) == tile_m
    assert plain_smem_bytes(M, cfg) == 2 * (128 * tile_m * 2 + 128 * 128 // 2) + 128 * tile_m * 4
    assert _lowers_to_mosaic(M, K, N, int8, cfg)
    assert cfg.short().endswith(f"m{tile_m}")


def test_tile_m_is_checked():
    """tile_m is 0 (all rows), 64 or 128, and runs the plain kernel only; at or above x's
    padded rows it is one M tile (the unsplit kernel)."""
    assert "64 or 128" in check(256, 1024, 256, MgpuConfig(tile_n=64, tile_m=32))
    for bad in (dict(warp_specialized=True, tile_n=128), dict(smem_a=True),
                dict(units_per_cta=2)):
        assert "plain kernel only" in check(256, 1024, 256, MgpuConfig(tile_m=128, block_k=128,
                                                                       **bad))
    assert MgpuConfig(tile_m=128).rows_per_cta(64) == 64
    assert MgpuConfig(tile_m=0).rows_per_cta(256) == 256


def test_probe_bigm_sweep_configs_fit_and_lower():
    """experiments/probe_mgpu.py --sweep bigm (device stages bigm / bigm8): at M 128 and 256,
    every config passes check() at its M, includes split-M ones, keeps the accumulator within
    128 registers per thread, and a split-M one lowers for CUDA."""
    from experiments.probe_mgpu import sweep_configs
    from pallas_kernels.w4_mgpu import padded_rows
    for M in (128, 256):
        for K, N in [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]:
            cfgs = sweep_configs("bigm", False, K, N, M)
            assert cfgs and all(check(M, K, N, c) is None for c in cfgs)
            assert all(c.tile_n * c.rows_per_cta(padded_rows(M)) <= 128 * 128 for c in cfgs)
            assert any(c.tile_m for c in cfgs)
    cfg = next(c for c in sweep_configs("bigm", True, 4096, 4096, 256) if c.tile_m)
    assert _lowers_to_mosaic(256, 4096, 4096, True, cfg)


def test_mismatched_operands_are_rejected():
    x = jnp.zeros((4, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="must be int4"):
        w4_mgpu_matmul(x, jnp.zeros((64, 256), jnp.int8), jnp.ones((64,), jnp.float32))
    with pytest.raises(ValueError, match="do not fit"):
        w4_mgpu_matmul(x, jnp.zeros((64, 512), jnp.int4), jnp.ones((64,), jnp.float32))
    with pytest.raises(ValueError, match="do not fit"):
        w4_mgpu_matmul(x, jnp.zeros((64, 256), jnp.int4), jnp.ones((1, 64), jnp.float32))


def test_persistent_configs_are_checked():
    """units_per_cta must divide the (column tile, K split) units and runs the plain kernel only;
    the error names the unit count."""
    assert check(16, 4096, 28672, MgpuConfig(tile_n=64, split_k=2, units_per_cta=7)) is None
    err = check(16, 4096, 4096, MgpuConfig(tile_n=64, split_k=4, units_per_cta=3))
    assert "must divide the 256" in err
    assert "plain kernel only" in check(16, 4096, 4096, MgpuConfig(tile_n=64, units_per_cta=2,
                                                                   smem_a=True))
    assert ">= 1" in check(16, 4096, 4096, MgpuConfig(tile_n=64, units_per_cta=0))
    assert MgpuConfig(tile_n=64, units_per_cta=4).short().endswith("u4")
    assert "plain kernel only" in check(16, 4096, 4096, MgpuConfig(tile_n=64, units_per_cta=2,
                                                                   out_mn=True))


def test_out_mn_switch_reaches_the_default_config(monkeypatch):
    """w4_mgpu.OUT_MN (sweep.py --mgpu-out-mn) turns the transposed store on for every config
    the model takes; it lowers at x padded to 8, 16 and 64 rows in both modes."""
    from pallas_kernels import w4_mgpu
    monkeypatch.setattr(w4_mgpu, "OUT_MN", False)
    assert not w4_mgpu.default_config(16, 4096, 4096).out_mn
    monkeypatch.setattr(w4_mgpu, "OUT_MN", True)
    for M in (1, 16, 64):
        cfg = w4_mgpu.default_config(M, 4096, 4096)
        assert cfg.out_mn and cfg.short().endswith("mn") and check(M, 4096, 4096, cfg) is None
        for int8 in (False, True):
            avals = [jax.ShapeDtypeStruct((M, 4096), jnp.int8 if int8 else jnp.bfloat16),
                     jax.ShapeDtypeStruct((4096, 4096), jnp.int4),
                     jax.ShapeDtypeStruct((4096,), jnp.float32)]
            if int8:
                avals.append(jax.ShapeDtypeStruct((M,), jnp.float32))
            text = jax.jit(w4_mgpu_matmul).trace(*avals).lower(
                lowering_platforms=("cuda",)).as_text()
            assert "mosaic_gpu" in text


@pytest.mark.parametrize("kind", ["smem", "persist"])
def test_probe_sweep_configs_fit_and_lower(kind):
    """experiments/probe_mgpu.py --sweep smem / persist (device stages smema, persist): every
    config it would time at the 8B shapes passes check(), and one per shape lowers for CUDA."""
    from experiments.probe_mgpu import sweep_configs
    for K, N in [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]:
        cfgs = sweep_configs(kind, False, K, N)
        variant = (lambda c: c.smem_a) if kind == "smem" else (lambda c: c.units_per_cta > 1)
        assert cfgs and all(variant(c) and check(16, K, N, c) is None for c in cfgs)
        assert _lowers_to_mosaic(16, K, N, False, cfgs[0])


def test_probe_diag_runs_end_to_end_with_a_stand_in_kernel(tmp_path, monkeypatch):
    """probe_mgpu.py --sweep diag's bookkeeping on CPU (the Mosaic kernel needs a Hopper GPU):
    with a jnp stand-in for the kernel, every shape / mode / M gets the mgpu (checked against
    the model-layout reference), mgpu_raw and mgpu_read rows, then the read-only sweep rows."""
    import json

    from experiments import probe_mgpu

    def stand_in_kernel(cfg, Mp, K, N, int8):  # the kernel's contract: [split, N, Mp] or [split, Mp, N]
        def f(xp, w):
            acc = jnp.dot(xp.astype(jnp.float32), w.astype(jnp.float32).T)  # [Mp, N]
            part = jnp.stack([acc] + [jnp.zeros_like(acc)] * (cfg.split_k - 1))
            part = part if cfg.out_mn else part.transpose(0, 2, 1)
            return part.astype(jnp.int32 if int8 else jnp.float32)
        return jax.jit(f)
    monkeypatch.setattr(w4_mgpu, "_kernel", stand_in_kernel)
    monkeypatch.setattr(probe_mgpu, "diag_read_configs",
                        lambda K, N: [MgpuConfig(tile_n=64, block_k=256, split_k=1, stages=2,
                                                 out_mn=True, probe="read")])
    probe_mgpu.main(["--out", str(tmp_path), "--shapes", "512x128", "--ms", "1,5", "--sweep", "diag",
                     "--iters", "2", "--commit", "test"])
    rows = json.load(open(tmp_path / "probe_mgpu.json"))["rows"]
    assert not [r for r in rows if "error" in r], rows
    for mode in ("w4a16", "w4a8"):
        for M in (1, 5):
            got = {r["variant"] for r in rows if r["mode"] == mode and r["M"] == M
                   and r["variant"] != "mgpu_read_sweep"}
            assert got == {"mgpu", "mgpu_raw", "mgpu_read"}, (mode, M, got)
    assert all(r["ok"] for r in rows if r["variant"] == "mgpu")
    assert [r["config"] for r in rows if r["variant"] == "mgpu_read_sweep"] == ["n64k256s1p2w0umn-read"]
    assert all(r["us"] > 0 for r in rows)


def test_x_pad_by_tma_lowers_without_a_pad():
    """w4_mgpu.X_PAD = "tma": x of M < 8 rows goes to the plain kernel unpadded (its TMA tiles
    zero-fill the missing rows on the GPU), so the program has no pad op; "xla" pads; the
    smem_a kernel (which copies x's rows itself) keeps the pad."""
    from pallas_kernels import w4_mgpu
    avals = (jax.ShapeDtypeStruct((3, 1024), jnp.bfloat16), jax.ShapeDtypeStruct((128, 1024), jnp.int4),
             jax.ShapeDtypeStruct((128,), jnp.float32))
    old = w4_mgpu.X_PAD
    try:
        texts = {}
        for how in ("xla", "tma"):
            w4_mgpu.X_PAD = how
            for sa in (False, True):
                cfg = MgpuConfig(tile_n=64, block_k=256, split_k=2, stages=2, smem_a=sa)
                f = jax.jit(lambda *a, cfg=cfg: w4_mgpu_matmul(*a, config=cfg))
                traced = f.trace(*avals)
                assert traced.out_info.shape == (3, 128)
                texts[how, sa] = traced.lower(lowering_platforms=("cuda",)).as_text()
        assert "stablehlo.pad" in texts["xla", False] and "stablehlo.pad" not in texts["tma", False]
        assert "stablehlo.pad" in texts["tma", True]
        w4_mgpu.X_PAD = "bad"
        with pytest.raises(ValueError, match="X_PAD='bad'"):
            jax.jit(w4_mgpu_matmul).trace(*avals)
    finally:
        w4_mgpu.X_PAD = old


def test_model_takes_the_kernel_up_to_mgpu_max_m(tmp_path, monkeypatch):
    """A verify-sized forward of 32 x 4 = 128 rows runs its GEMMs on the Mosaic kernel (the
    default table: this model's GEMMs are narrow) and the whole forward lowers for CUDA on CPU
    (the dispatch told it runs on a Hopper GPU); with the uniform limit kernel_dispatch.MGPU_MAX_M
    = 64 (sweep.py --mgpu-max-m 64) they run on XLA's GEMM, and with the w4a16 width limit below
    this model's widest GEMM (gate/up, 1024 columns) that one alone leaves the kernel."""
    import qspec_jax as qj
    from hf_models import build_hf_model
    from qspec_jax import kernel_dispatch as kd
    from qspec_jax.model import KVCache
    build_hf_model("llama", hidden_size=256, intermediate_size=512).save_pretrained(tmp_path)
    model = qj.with_weight_layout(qj.load(str(tmp_path), dtype="bfloat16", quant="w4",
                                          method="rtn", rotate=False), "nk")
    monkeypatch.setattr(kd, "mgpu_unavailable", lambda: None)
    monkeypatch.setattr(kd.jax, "default_backend", lambda: "gpu")
    ms = []
    real = w4_mgpu.w4_mgpu_matmul
    monkeypatch.setattr(w4_mgpu, "w4_mgpu_matmul", lambda x, *a, **k: ms.append(x.shape[0]) or real(x, *a, **k))
    net, L = model.module, model.cfg.num_hidden_layers
    for max_m, wide_n, want in ((None, kd.MGPU_W4A16_WIDE_N, 4 * L), (64, kd.MGPU_W4A16_WIDE_N, 0),
                                (256, 512, 4 * L), (None, 512, 3 * L)):
        monkeypatch.setattr(kd, "MGPU_MAX_M", max_m)
        monkeypatch.setattr(kd, "MGPU_W4A16_WIDE_N", wide_n)
        ms.clear()
        cache = KVCache.create(model.cfg, 32, 64, jnp.bfloat16)
        fn = jax.jit(lambda t, c, s: net(t, c, s, mode="w4a16", kernels="auto"))
        text = fn.trace(jnp.zeros((32, 4), jnp.int32), cache, jnp.zeros((32,), jnp.int32)).lower(
            lowering_platforms=("cuda",)).as_text()
        assert ms == [128] * want, (max_m, ms)
        assert ("mosaic_gpu" in text) is (want > 0)
    # A draft step of 256 rows (batch 256) takes the kernel with x's rows split over two CTAs
    # (default_config's tile_m at 256 rows, int8 x: 256-wide K steps) and lowers for CUDA.
    monkeypatch.setattr(kd, "MGPU_MAX_M", None)
    cfgs, real_cfg = [], w4_mgpu.default_config
    monkeypatch.setattr(w4_mgpu, "default_config", lambda *a: cfgs.append(real_cfg(*a)) or cfgs[-1])
    ms.clear()
    cache = KVCache.create(model.cfg, 256, 64, jnp.bfloat16)
    fn = jax.jit(lambda t, c, s: net(t, c, s, mode="w4a8", kernels="auto"))
    text = fn.trace(jnp.zeros((256, 1), jnp.int32), cache, jnp.zeros((256,), jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert ms == [256] * (4 * L) and "mosaic_gpu" in text
    used = [c for c in cfgs if c.tile_m]  # (the dispatch's checks call default_config too)
    assert len(used) >= 4 * L and all((c.tile_m, c.block_k) == (128, 256) for c in used)


@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("out_mn", [True, False])
def test_pdl_variants_lower_with_the_grid_dependency_instructions(M, int8, out_mn):
    """MgpuConfig(pdl="wait" / "prefetch") lowers for CUDA on CPU (x of < 8 rows unpadded: its
    TMA loads fill the rows past M), and its kernel holds griddepcontrol.wait (from which jax >=
    0.11 marks the launch as programmatic-dependent) and launch_dependents; the default kernel
    holds neither; "prefetch" is a different kernel from "wait" (x resident, weights first)."""
    K, N = 1024, 128
    cfg = MgpuConfig(tile_n=64, block_k=256, split_k=2, stages=2,
                     load_layout="wgmma" if int8 else "upcast", out_mn=out_mn)
    texts = {}
    for pdl in ("", "wait", "prefetch"):
        c = dataclasses.replace(cfg, pdl=pdl)
        avals = [jax.ShapeDtypeStruct((M, K), jnp.int8 if int8 else jnp.bfloat16),
                 jax.ShapeDtypeStruct((N, K), jnp.int4), jax.ShapeDtypeStruct((N,), jnp.float32)]
        if int8:
            avals.append(jax.ShapeDtypeStruct((M,), jnp.float32))
        texts[pdl] = jax.jit(lambda *a, c=c: w4_mgpu_matmul(*a, config=c)).trace(*avals).lower(
            lowering_platforms=("cuda",)).as_text()
    for pdl in ("wait", "prefetch"):
        assert "mosaic_gpu" in texts[pdl]
        assert "griddepcontrol.wait" in texts[pdl] and "griddepcontrol.launch_dependents" in texts[pdl]
        assert "pad" not in texts[pdl]  # M 1 / 5: the TMA fills rows past M; 16: no padding
    assert "griddepcontrol" not in texts[""]
    assert len({texts[""], texts["wait"], texts["prefetch"]}) == 3


def test_pdl_is_checked_and_the_switch_reaches_default_config(monkeypatch):
    """pdl runs with the plain kernel's options only and keeps x's K slice in shared memory
    (shapes that cannot hold it are rejected, naming the fix); w4_mgpu.PDL gives the pdl config
    to GEMMs of <= PDL_MAX_ROWS padded rows whose K slice fits, and every such default config
    passes check (the 8B and 70B shapes)."""
    for pdl in ("wait", "prefetch"):
        assert "plain kernel's options only" in check(1, 1024, 128, MgpuConfig(tile_n=64, pdl=pdl, smem_a=True))
        assert "plain kernel's options only" in check(200, 1024, 128, MgpuConfig(tile_n=64, pdl=pdl, tile_m=64))
    assert "one of" in check(1, 1024, 128, MgpuConfig(tile_n=64, pdl="on"))
    big = MgpuConfig(tile_n=64, block_k=256, split_k=1, pdl="prefetch")
    err = check(16, 28672, 128, big)
    assert "x's whole K slice" in err and "pdl='wait'" in err
    assert check(16, 28672, 128, dataclasses.replace(big, pdl="wait")) is None
    assert MgpuConfig(pdl="prefetch").short().endswith("pdlp")
    assert not w4_mgpu.default_config(1, 4096, 6144).pdl  # off by default
    monkeypatch.setattr(w4_mgpu, "PDL", "on")
    with pytest.raises(ValueError, match="one of"):
        w4_mgpu.default_config(1, 4096, 6144)
    shapes = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096),
              (8192, 10240), (8192, 8192), (8192, 57344), (28672, 8192)]
    for mode in ("wait", "prefetch"):
        monkeypatch.setattr(w4_mgpu, "PDL", mode)
        for K, N in shapes:
            for M in (1, 4, 11, 16, 17, 64, 256):
                for int8 in (False, True):
                    cfg = w4_mgpu.default_config(M, K, N, int8)
                    assert check(M, K, N, cfg) is None, (M, K, N, cfg)
                    if w4_mgpu.padded_rows(M) > w4_mgpu.PDL_MAX_ROWS:
                        assert cfg.pdl == "", (M, K, N)
                        continue
                    fits = w4_mgpu.pdl_smem_bytes(M, K, cfg) <= w4_mgpu.SMEM_BYTES
                    assert cfg.pdl == (mode if fits else "wait"), (M, K, N, cfg)
    # the 70B down_proj at 16 rows: x's K slice (229 KB) does not fit: "wait"
    assert w4_mgpu.default_config(16, 28672, 8192).pdl == "wait"
    assert w4_mgpu.default_config(1, 4096, 6144).pdl == "prefetch"
    assert isinstance(w4_mgpu.pdl_launch_supported(), bool)


def test_probe_pdl_sweep_times_the_default_and_its_pdl_variants():
    """experiments/probe_mgpu.py --sweep pdl (device stage pdl): at every M the default config
    (pdl off, whatever w4_mgpu.PDL says) and its "wait" / "prefetch" variants where they fit,
    (also with a 4-deep ring), all passing check(), otherwise the default config's fields."""
    from experiments.probe_mgpu import sweep_configs
    for K, N in [(4096, 6144), (14336, 4096), (28672, 8192)]:
        for M in (1, 16):
            for int8 in (False, True):
                cfgs = sweep_configs("pdl", int8, K, N, M)
                base = w4_mgpu.default_config(M, K, N, int8)
                assert [c.pdl for c in cfgs][:2] == ["", "wait"]
                assert all(check(M, K, N, c) is None for c in cfgs)
                assert all(dataclasses.replace(c, pdl="", load_layout=base.load_layout,
                                               stages=base.stages) == base for c in cfgs)
    assert [(c.pdl, c.stages) for c in sweep_configs("pdl", False, 4096, 6144, 16)] == [
        ("", 2), ("wait", 2), ("prefetch", 2), ("prefetch", 4)]
    assert [c.pdl for c in sweep_configs("pdl", False, 28672, 8192, 16)] == ["", "wait"]  # 229 KB x
    assert _lowers_to_mosaic(16, 4096, 6144, False, sweep_configs("pdl", False, 4096, 6144, 16)[-1])


@pytest.mark.parametrize("pdl", ["wait", "prefetch"])
def test_model_decode_step_takes_the_pdl_kernels_and_lowers(tmp_path, monkeypatch, caplog, pdl):
    """w4_mgpu.PDL set: a batch-1 decode step's GEMMs (both modes) take the pdl config and the
    forward lowers for CUDA on CPU with the grid-dependency instructions in it; a verify-sized
    forward of 32 x 4 rows keeps the plain kernel (more than PDL_MAX_ROWS rows). On this jax
    (no PDL launch before 0.11) the dispatch says once that the kernels launch plainly."""
    import logging

    import qspec_jax as qj
    from hf_models import build_hf_model
    from qspec_jax import kernel_dispatch as kd
    from qspec_jax.model import KVCache
    build_hf_model("llama", hidden_size=256, intermediate_size=512).save_pretrained(tmp_path)
    model = qj.with_weight_layout(qj.load(str(tmp_path), dtype="bfloat16", quant="w4",
                                          method="rtn", rotate=False), "nk")
    monkeypatch.setattr(kd, "mgpu_unavailable", lambda: None)
    monkeypatch.setattr(kd.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(kd, "_ANNOUNCED", set())
    monkeypatch.setattr(w4_mgpu, "PDL", pdl)
    cfgs, real_kernel = [], w4_mgpu._kernel
    monkeypatch.setattr(w4_mgpu, "_kernel", lambda cfg, Mp, *a: cfgs.append((Mp, cfg.pdl)) or real_kernel(cfg, Mp, *a))
    net, L = model.module, model.cfg.num_hidden_layers
    for mode in ("w4a16", "w4a8"):
        cfgs.clear()
        cache = KVCache.create(model.cfg, 1, 64, jnp.bfloat16)
        fn = jax.jit(lambda t, c, s, mode=mode: net(t, c, s, mode=mode, kernels="auto"))
        with caplog.at_level(logging.INFO):
            text = fn.trace(jnp.zeros((1, 1), jnp.int32), cache, jnp.zeros((1,), jnp.int32)).lower(
                lowering_platforms=("cuda",)).as_text()
        assert cfgs == [(8, pdl)] * (4 * L), cfgs
        assert "griddepcontrol.wait" in text
    cfgs.clear()
    cache = KVCache.create(model.cfg, 32, 64, jnp.bfloat16)
    fn = jax.jit(lambda t, c, s: net(t, c, s, mode="w4a16", kernels="auto"))
    fn.trace(jnp.zeros((32, 4), jnp.int32), cache, jnp.zeros((32,), jnp.int32)).lower(
        lowering_platforms=("cuda",))
    assert cfgs and all(p == "" for _, p in cfgs)
    if not w4_mgpu.pdl_launch_supported():
        assert "launches Mosaic GPU kernels without programmatic dependent launch" in caplog.text
