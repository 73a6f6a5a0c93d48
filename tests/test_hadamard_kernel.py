"""The one-kernel online Hadamard transform (pallas_kernels/hadamard.py) in interpret mode:
against the float64 transform (hadamard_matrix), the GEMM form the model runs by default, and
rotation.online_hadamard(impl="pallas") with its stated fallback."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import hadamard as hk
from qspec_jax import rotation


def _x(M, n, dtype=jnp.bfloat16, seed=0):
    return (2 * jax.random.normal(jax.random.key(seed + n + M), (M, n))).astype(dtype)


@pytest.mark.parametrize("M, n, dtype", [
    (3, 192, jnp.bfloat16),    # 12 x 16 (Paley I), padded to 16 rows; 3 tokens: no row leaks
    (2, 1792, jnp.bfloat16),   # 28 x 64 (Paley II: the 14336 = 28 x 512 block of Llama-3-8B)
    (2, 256, jnp.float16),     # Sylvester only (m = 1): viewed as 4 x 64
    (2, 4096, jnp.bfloat16),   # 4096 = S_4096 viewed as 32 x 128 (S_32 as the block)
    (1, 640, jnp.bfloat16),    # 20 x 32, one token
])
def test_kernel_matches_the_exact_transform(M, n, dtype):
    x = _x(M, n, dtype)
    y = jax.jit(lambda v: hk.hadamard(v, interpret=True))(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    exact = np.asarray(x, np.float64) @ rotation.hadamard_matrix(n) / np.sqrt(n)
    got = np.asarray(y, np.float64)
    # one rounding to the output dtype (f32 accumulation of exact +-1 products)
    eps = 2.0 ** -8 if dtype == jnp.bfloat16 else 2.0 ** -11
    np.testing.assert_allclose(got, exact, rtol=0, atol=eps * np.abs(exact).max())
    ref = np.asarray(hk.hadamard_reference(x), np.float64)
    np.testing.assert_allclose(ref, exact, rtol=0, atol=1e-5 * np.abs(exact).max())
    # the GEMM form's outputs, but for rare last-bit flips (f32 summation order)
    dense = np.asarray(rotation.online_hadamard(x, "dense"), np.float64)
    assert np.mean(got == dense) > 0.99
    # applied twice: x @ H H / n (x itself where H is symmetric)
    twice = np.asarray(jax.jit(lambda v: hk.hadamard(v, interpret=True))(y), np.float64)
    h = rotation.hadamard_matrix(n)
    np.testing.assert_allclose(twice, np.asarray(x, np.float64) @ h @ h / n, rtol=0,
                               atol=4 * eps * np.abs(exact).max())


def test_view_moves_sylvester_factors_into_the_block():
    for n, (m, p) in {14336: (28, 512), 8192: (32, 256), 4096: (32, 128), 3584: (28, 128),
                      384: (12, 32), 256: (4, 64)}.items():
        mm, pp, block = hk._view(n)
        assert (mm, pp) == (m, p) and block.shape == (m, m)
        np.testing.assert_array_equal(np.kron(block, rotation.hadamard_matrix(p)),
                                      rotation.hadamard_matrix(n))


def test_sylvester_tile_is_the_sylvester_matrix():
    s = jax.jit(lambda: hk._sylvester_tile(32, 16, 32, 48, jnp.float32))()
    np.testing.assert_array_equal(np.asarray(s), rotation.hadamard_matrix(128)[32:64, 16:64])


def test_supported_and_errors():
    assert hk.supported((4, 14336), jnp.bfloat16) == (True, "ok")
    for shape, dtype, why in [((4, 14336), jnp.float32, "dtype float32"),
                              ((4, 11008), jnp.bfloat16, "no Hadamard block"),
                              ((4, 96), jnp.bfloat16, "power-of-two part must be >= 16"),
                              ((4, 76 * 128), jnp.bfloat16, "must be <= 64"),
                              ((2, 4, 256), jnp.bfloat16, "must be [M, n]")]:
        ok, reason = hk.supported(shape, dtype)
        assert not ok and why in reason, (shape, reason)
    with pytest.raises(ValueError, match="no Hadamard block"):
        hk.hadamard(jnp.zeros((1, 11008), jnp.bfloat16), interpret=True)


def test_online_hadamard_pallas_impl_and_fallback(caplog):
    """impl "pallas" runs the kernel (the interpreter off the GPU) over any leading dims; a width
    it cannot take runs the GEMM form and says so."""
    from qspec_jax import kernel_dispatch
    kernel_dispatch._ANNOUNCED.discard(("hadamard", 208, "bfloat16"))  # said once per process
    x = _x(6, 448).reshape(2, 3, 448)
    with caplog.at_level(logging.INFO, logger="qspec_jax"):
        y = rotation.online_hadamard(x, "pallas")
        z = rotation.online_hadamard(_x(2, 52 * 4), "pallas")  # 104 x 2: p < 16
    assert y.shape == x.shape
    dense = np.asarray(rotation.online_hadamard(x, "dense"), np.float32)
    assert np.mean(np.asarray(y, np.float32) == dense) > 0.99
    np.testing.assert_array_equal(np.asarray(z), np.asarray(rotation.online_hadamard(
        _x(2, 52 * 4), "dense")))
    text = caplog.text
    assert "Pallas Hadamard kernel cannot take" in text and "width 208 = 104 x 2" in text


@pytest.mark.parametrize("M, n", [(3, 192), (2, 1792)])
def test_swiglu_prologue(M, n):
    """prologue "swiglu": x = [gate | up] -> the transform of silu(gate) * up made in the kernel
    (rounded to bf16 after each op: pallas_kernels.hadamard.swiglu), equal to the kernel on that
    input computed outside; within bf16 rounding of XLA's SwiGLU + the GEMM form
    (rotation.swiglu_hadamard's two implementations)."""
    gu = _x(M, 2 * n, seed=7)
    g, u = jnp.split(gu, 2, axis=-1)
    h = hk.swiglu(g.astype(jnp.float32), u.astype(jnp.float32), jnp.bfloat16)
    run = jax.jit(lambda v, pro: hk.hadamard(v, pro, interpret=True), static_argnums=1)
    y = np.asarray(run(gu, "swiglu"), np.float32)
    np.testing.assert_array_equal(y, np.asarray(run(h, "none"), np.float32))
    xla = np.asarray(rotation.swiglu_hadamard(gu, "dense"), np.float32)
    np.testing.assert_allclose(y, xla, rtol=0, atol=2 ** -6 * np.abs(xla).max())
    np.testing.assert_array_equal(np.asarray(rotation.swiglu_hadamard(gu, "pallas"), np.float32), y)
    with pytest.raises(ValueError, match="prologue"):
        hk.hadamard(gu, "gelu", interpret=True)
    with pytest.raises(ValueError, match=r"\[gate \| up\]"):
        hk.hadamard(gu[:, :-1], "swiglu", interpret=True)


@pytest.mark.parametrize("shape, prologue", [((16, 14336), "none"), ((1, 4096), "none"),
                                             ((4, 2 * 14336), "swiglu"), ((3, 3584), "none")])
def test_lowers_to_triton(shape, prologue):
    """The kernel lowers for CUDA (Triton IR) on this CPU machine: the ops and block shapes the
    GPU compile will see (the compile and the timing are the device's: tests/gpu)."""
    from test_attention import _cuda_lowering_available, _lower_cuda  # tests/ on sys.path
    if not _cuda_lowering_available():
        pytest.skip("this jaxlib cannot lower Pallas for CUDA on CPU")
    txt = _lower_cuda(lambda v: hk.hadamard(v, prologue), jax.ShapeDtypeStruct(shape, jnp.bfloat16))
    assert "xla.gpu.triton" in txt and "hadamard" in txt
