"""The fused GEMM epilogue + residual add + RMSNorm kernel compiled for the GPU (Triton
backend): against its reference at the 8B / Qwen widths, on the Mosaic GEMM's own partial sums,
and in the model (kernel_dispatch.RESIDUAL_NORM) where QSpec must stay lossless."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import residual_norm as rn

EPS = 1e-5


@pytest.mark.parametrize("M,Mp,S,N,kind", [(1, 8, 4, 4096, "f32"), (16, 16, 2, 4096, "int8"),
                                           (5, 8, 3, 3584, "f32"), (64, 64, 1, 8192, "h")])
@pytest.mark.parametrize("warps", [4, 8, 16])  # kernel_dispatch.RESIDUAL_NORM_WARPS candidates (8: the default)
def test_compiled_kernel_matches_reference(M, Mp, S, N, kind, warps):
    from test_residual_norm import _case  # tests/ is on sys.path (its conftest)
    x, part, scales, gain, sx = _case(M, Mp, S, N, kind, seed=M + N)
    x_new, normed = jax.jit(lambda *a: rn.residual_norm(*a[:4], EPS, a[4], num_warps=warps))(
        x, part, scales, gain, sx)
    ref_x, ref_n = jax.jit(lambda *a: rn.residual_norm_reference(*a[:4], EPS, a[4]))(
        x, part, scales, gain, sx)
    np.testing.assert_array_equal(np.asarray(x_new), np.asarray(ref_x))
    got, want = np.asarray(normed, np.float32), np.asarray(ref_n, np.float32)
    np.testing.assert_allclose(got, want, rtol=2 ** -7)  # the mean's sum order: 1 bf16 ulp
    assert np.mean(got == want) > 0.99


def test_on_the_mosaic_gemm_partials():
    """residual_norm on w4_mgpu_matmul(partials=True) = x + w4_mgpu_matmul(...) bit for bit."""
    from pallas_kernels.w4_mgpu import nk_from_half_split, w4_mgpu_matmul
    K, N, M = 14336, 4096, 3
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    qw = nk_from_half_split(jax.random.randint(k1, (K // 2, N), -128, 128, jnp.int32)
                            .astype(jnp.int8))
    s = jax.random.uniform(k2, (N,), jnp.float32, 0.5, 1.5) * 0.02
    a = jax.random.normal(k3, (M, K), jnp.float32).astype(jnp.bfloat16)
    x = jax.random.normal(k4, (M, N), jnp.float32).astype(jnp.bfloat16)
    gain = jnp.ones((N,), jnp.bfloat16)
    part = jax.jit(lambda a, w, s: w4_mgpu_matmul(a, w, s, partials=True))(a, qw, s)
    h = jax.jit(w4_mgpu_matmul)(a, qw, s)
    x_new, _ = jax.jit(lambda *z: rn.residual_norm(*z, EPS))(x, part, s, gain)
    np.testing.assert_array_equal(np.asarray(x_new), np.asarray(x + h))


def test_model_with_the_kernel_stays_lossless(monkeypatch, caplog):
    """RESIDUAL_NORM on (kernels="auto", int4 [N, K] weights): each decode junction runs the
    kernel on the Mosaic GEMM's partial sums (the draft's quantizing the norm); QSpec's tokens
    equal w4a16 AR's; logits within bf16 rounding of the setting off."""
    import logging

    import qspec_jax as qj
    from qspec_jax import kernel_dispatch
    m = qj.with_weight_layout(qj.load(None, quant="w4"), "nk")
    toks = [[5, 17, 3, 99]]
    off = np.asarray(qj.logits(m, toks, mode="w4a16"), np.float32)
    monkeypatch.setattr(kernel_dispatch, "RESIDUAL_NORM", True)
    kinds = []
    real = rn.residual_norm
    monkeypatch.setattr(rn, "residual_norm",
                        lambda x, p, s, *a, **k: kinds.append((p.dtype, s is None)) or real(x, p, s, *a, **k))
    with caplog.at_level(logging.INFO, logger="qspec_jax"):
        on = np.asarray(qj.logits(m, toks, mode="w4a16"), np.float32)
        prompts = ["def add(a, b):\n    return", "import os\n", "class A:\n"]
        ar = qj.generate(m, prompts, max_new_tokens=24, mode="w4a16")
        qs = qj.generate(m, prompts, max_new_tokens=24, mode="qspec", gamma=3)
    assert "use the fused Pallas kernel" in caplog.text
    assert (jnp.float32, False) in kinds  # on the Mosaic GEMM's partial sums
    assert (jnp.int32, False) in kinds  # the w4a8 draft's int8 GEMM partials (quantizing)
    np.testing.assert_allclose(on, off, atol=0.02 * np.abs(off).max())
    assert qs.tokens == ar.tokens


@pytest.mark.parametrize("bits", [8, 4])
def test_compiled_quantizing_variant(bits):
    from test_residual_norm import _case
    x, part, scales, gain, sx = _case(16, 16, 4, 4096, "int8", seed=bits)
    out = jax.jit(lambda *a: rn.residual_norm(*a[:4], EPS, a[4], bits=bits))(x, part, scales, gain, sx)
    ref = rn.residual_norm_reference(x, part, scales, gain, EPS, sx, bits=bits)
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(ref[0]))
    diff = np.abs(np.asarray(out[1], np.int32) - np.asarray(ref[1], np.int32))
    assert diff.max() <= 1 and np.mean(diff == 0) > 0.99
    np.testing.assert_allclose(np.asarray(out[2]), np.asarray(ref[2]), rtol=2 ** -7)
