"""The one-kernel online Hadamard transform (pallas_kernels/hadamard.py) compiled for the GPU
(Triton backend): against the float64 transform and the GEMM form at the model widths, and in a
rotated model (rotation.HADAMARD_IMPL = "pallas") where QSpec must stay lossless."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import hadamard as hk
from qspec_jax import rotation


@pytest.mark.parametrize("n", [14336, 8192, 4096, 3584, 1792])  # 8B / 1B down_proj, o_proj, 28 x 128
@pytest.mark.parametrize("M", [1, 5, 16, 64])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_compiled_kernel_matches_the_exact_transform(n, M, dtype):
    x = (2 * jax.random.normal(jax.random.key(n + M), (M, n))).astype(dtype)
    got = np.asarray(jax.jit(hk.hadamard)(x), np.float64)
    exact = np.asarray(x, np.float64) @ rotation.hadamard_matrix(n) / np.sqrt(n)
    eps = 2.0 ** -8 if dtype == jnp.bfloat16 else 2.0 ** -11
    np.testing.assert_allclose(got, exact, rtol=0, atol=eps * np.abs(exact).max())
    dense = np.asarray(jax.jit(lambda v: rotation.online_hadamard(v, "dense"))(x), np.float64)
    assert np.mean(got == dense) > 0.99


@pytest.mark.parametrize("n", [14336, 8192])
@pytest.mark.parametrize("M", [1, 16])
def test_compiled_swiglu_prologue(n, M):
    gu = (2 * jax.random.normal(jax.random.key(n + M + 1), (M, 2 * n))).astype(jnp.bfloat16)
    g, u = jnp.split(gu, 2, axis=-1)
    h = jax.jit(lambda a, b: hk.swiglu(a.astype(jnp.float32), b.astype(jnp.float32),
                                       jnp.bfloat16))(g, u)
    y = np.asarray(jax.jit(lambda v: hk.hadamard(v, "swiglu"))(gu), np.float32)
    # (XLA may drop the per-op roundings of hk.swiglu inside its fusion: within bf16 rounding)
    pre = np.asarray(jax.jit(hk.hadamard)(h), np.float32)
    np.testing.assert_allclose(y, pre, rtol=0, atol=2 ** -6 * np.abs(pre).max())
    xla = np.asarray(jax.jit(lambda v: rotation.swiglu_hadamard(v, "dense"))(gu), np.float32)
    np.testing.assert_allclose(y, xla, rtol=0, atol=2 ** -6 * np.abs(xla).max())


def test_rotated_model_with_the_kernel(monkeypatch):
    """A rotated w4 model (the embedded default) with every online transform on the kernel:
    logits within bf16 rounding of the GEMM form's, QSpec greedy tokens equal to w4a16's."""
    import qspec_jax as qj
    m = qj.load(None, quant="w4")
    toks = [[5, 17, 33, 2, 9, 41]]
    base = np.asarray(qj.logits(m, toks, mode="w4a16"), np.float32)
    monkeypatch.setattr(rotation, "HADAMARD_IMPL", "pallas")
    jax.clear_caches()
    try:
        got = np.asarray(qj.logits(m, toks, mode="w4a16"), np.float32)
        out = qj.generate(m, toks, max_new_tokens=16, mode="w4a16").tokens
        spec = qj.generate(m, toks, max_new_tokens=16, mode="qspec", gamma=3).tokens
    finally:
        monkeypatch.setattr(rotation, "HADAMARD_IMPL", "dense")
        jax.clear_caches()
    assert np.abs(got - base).max() <= 0.05 * np.abs(base).max()
    assert spec == out
