"""CPU (interpret-mode) checks of the fused RMSNorm + per-token quantization kernel and of
row_quant (the same kernel without the norm, or after the MLP's SwiGLU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.rmsnorm_quant import (CHUNK, rmsnorm_quant, rmsnorm_quant_reference, row_quant,
                                          row_quant_reference)
from qspec_jax import quant
from qspec_jax.layers import RMSNorm


def _inputs(M, D, dtype, seed=0):
    key = jax.random.key(seed)
    x = (3 * jax.random.normal(key, (M, D))).astype(dtype)
    if M > 2:
        x = x.at[1].set(0)  # an all-zero token row: sx = 1, xq = 0
    gain = (1 + 0.1 * jax.random.normal(jax.random.fold_in(key, 1), (D,))).astype(dtype)
    return x, gain


def test_row_pieces():
    from pallas_kernels.rmsnorm_quant import MAX_PIECE, piece
    assert [piece(d) for d in (4096, 3584, 3072, 8192, 384)] == [4096, 512, 1024, 8192, 128]
    assert piece(4 * MAX_PIECE) == MAX_PIECE


@pytest.mark.parametrize("M,D,bits", [(1, 256, 8), (5, 384, 8), (3, 512, 4), (2, 1024, 4),
                                      (2, 3072, 8), (1, 16384, 4)])  # 3 pieces; MAX_PIECE cap
def test_float32_equals_the_model_path(M, D, bits):
    """In f32 the fused kernel gives exactly the model's RMSNorm + quantize_activations."""
    x, gain = _inputs(M, D, jnp.float32, M + D)
    xq, sx = rmsnorm_quant(x, gain, 1e-5, bits, interpret=True)
    norm = RMSNorm(D, 1e-5, jnp.float32)
    norm.scale.value = gain
    xq_m, sx_m = quant.quantize_activations(norm(x), bits)
    np.testing.assert_array_equal(np.asarray(xq), np.asarray(xq_m))
    np.testing.assert_allclose(np.asarray(sx), np.asarray(sx_m), rtol=1e-6)
    assert xq.dtype == jnp.int8 and sx.shape == (M, 1)
    lim = (-127, 127) if bits == 8 else (-8, 7)
    assert lim[0] <= int(xq.min()) and int(xq.max()) <= lim[1]
    if M > 2:
        assert float(sx[1, 0]) == 1.0 and not np.any(np.asarray(xq[1]))


@pytest.mark.parametrize("M,D,bits", [(4, 384, 8), (3, 512, 4)])
def test_bfloat16_within_one_step(M, D, bits):
    """bf16: the gain product may be kept in f32 or rounded to bf16 depending on XLA fusion
    (excess precision), on either side: scales agree to bf16 precision and every quantized
    value is within one step of the reference's."""
    x, gain = _inputs(M, D, jnp.bfloat16, 7 * M + D)
    xq, sx = rmsnorm_quant(x, gain, 1e-5, bits, interpret=True)
    xq_r, sx_r = rmsnorm_quant_reference(x, gain, 1e-5, bits)
    np.testing.assert_allclose(np.asarray(sx), np.asarray(sx_r), rtol=2 ** -7)
    assert np.abs(np.asarray(xq, np.int32) - np.asarray(xq_r, np.int32)).max() <= 1


@pytest.mark.parametrize("prologue", ["none", "swiglu"])
@pytest.mark.parametrize("M,D,bits", [(1, 256, 8), (5, 384, 4), (2, 3072, 8)])
def test_row_quant_float32_equals_the_model_path(M, D, bits, prologue):
    """f32: row_quant gives exactly quantize_activations of the model's own computation
    (x itself, or jax.nn.silu(gate) * up of the fused gate_up output)."""
    W = 2 * D if prologue == "swiglu" else D
    x = 3 * jax.random.normal(jax.random.key(M + D + bits), (M, W), jnp.float32)
    if M > 2:
        x = x.at[1].set(0)
    xq, sx = row_quant(x, bits, prologue, interpret=True)
    y = x
    if prologue == "swiglu":
        gate, up = jnp.split(x, 2, axis=-1)
        y = jax.nn.silu(gate) * up
    xq_m, sx_m = quant.quantize_activations(y, bits)
    np.testing.assert_array_equal(np.asarray(xq), np.asarray(xq_m))
    np.testing.assert_array_equal(np.asarray(sx), np.asarray(sx_m))
    xq_r, sx_r = row_quant_reference(x, bits, prologue)
    np.testing.assert_array_equal(np.asarray(xq_r), np.asarray(xq_m))
    assert xq.shape == (M, D) and sx.shape == (M, 1)
    if M > 2:
        assert float(sx[1, 0]) == 1.0 and not np.any(np.asarray(xq[1]))


@pytest.mark.parametrize("prologue", ["none", "swiglu"])
def test_row_quant_bfloat16_within_one_step(prologue):
    M, D = 4, 512
    W = 2 * D if prologue == "swiglu" else D
    x = (2 * jax.random.normal(jax.random.key(9), (M, W))).astype(jnp.bfloat16)
    xq, sx = row_quant(x, 8, prologue, interpret=True)
    xq_r, sx_r = row_quant_reference(x, 8, prologue)
    np.testing.assert_allclose(np.asarray(sx), np.asarray(sx_r), rtol=2 ** -7)
    assert np.abs(np.asarray(xq, np.int32) - np.asarray(xq_r, np.int32)).max() <= 1


def test_row_quant_bad_input():
    with pytest.raises(ValueError, match="prologue must be one of"):
        row_quant(jnp.ones((2, 256)), 8, "gelu", interpret=True)
    with pytest.raises(ValueError, match="multiple of 128 times 2"):
        row_quant(jnp.ones((2, 384)), 8, "swiglu", interpret=True)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        row_quant(jnp.ones((2, 256)), 3, interpret=True)


def test_bad_shapes():
    x, gain = _inputs(2, CHUNK + 64, jnp.float32)
    with pytest.raises(ValueError, match=f"multiple of {CHUNK}"):
        rmsnorm_quant(x, gain, 1e-5, interpret=True)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        rmsnorm_quant(x, gain, 1e-5, bits=6, interpret=True)
    with pytest.raises(ValueError, match="gain"):
        rmsnorm_quant(x, gain[:-1], 1e-5, interpret=True)


def test_lowers_for_cuda():
    """Lowers to a Triton kernel for CUDA (no GPU needed); compiling and timing it on the
    H200 is experiments/bench_fused.py's job."""
    try:
        txt = jax.jit(lambda x, g: rmsnorm_quant(x, g, 1e-5)).trace(
            jax.ShapeDtypeStruct((16, 4096), jnp.bfloat16),
            jax.ShapeDtypeStruct((4096,), jnp.bfloat16)).lower(lowering_platforms=("cuda",)).as_text()
    except Exception as e:  # noqa: BLE001
        if "cuda" in str(e).lower() and "platform" in str(e).lower():
            pytest.skip(f"no CUDA lowering in this jaxlib: {e}")
        raise
    assert "rmsnorm_quant_a8" in txt
    for prologue, W in (("none", 4096), ("swiglu", 2 * 14336)):  # o_proj / down_proj inputs
        txt = jax.jit(lambda x: row_quant(x, 8, prologue)).trace(  # noqa: B023
            jax.ShapeDtypeStruct((16, W), jnp.bfloat16)).lower(lowering_platforms=("cuda",)).as_text()
        assert f"row_quant_{prologue}_a8" in txt


def test_round_half_even_matches_jnp_round():
    from pallas_kernels._common import round_half_even as _round_half_even
    v = jnp.concatenate([jnp.arange(-130, 130, 0.5, dtype=jnp.float32),
                         jax.random.uniform(jax.random.key(0), (4096,), jnp.float32, -200, 200)])
    np.testing.assert_array_equal(np.asarray(jax.jit(_round_half_even)(v)), np.asarray(jnp.round(v)))


def test_bench_fused_quick(tmp_path):
    from experiments.bench_fused import main
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    rows = __import__("json").load(open(tmp_path / "fused_h200_quick.json"))["rows"]
    assert [(r["kind"], r["M"]) for r in rows] == [(k, m) for k in ("rmsnorm", "none", "swiglu")
                                                   for m in (1, 3)]
    assert all(r["ok"] for r in rows) and rows[-1]["D"] == 2 * 384
    assert "| swiglu | 768 | 3 |" in open(tmp_path / "fused_h200_quick.md").read()


def test_bench_fused_quick_hadamard(tmp_path):
    """kind "hadamard" (rotated models' down_proj input): the online transform + quantization,
    checked against the jnp reference, with the transform alone timed beside it."""
    from experiments.bench_fused import main
    assert main(["--quick", "--kinds", "hadamard", "--out", str(tmp_path)]) == 0
    rows = __import__("json").load(open(tmp_path / "fused_h200_quick.json"))["rows"]
    assert [(r["kind"], r["M"], r["D"]) for r in rows] == [("hadamard", 1, 384), ("hadamard", 3, 384)]
    assert all(r["ok"] and "hadamard_only_loop_us" in r for r in rows)
    assert "| hadamard | 384 | 3 |" in open(tmp_path / "fused_h200_quick.md").read()


@pytest.mark.parametrize("M,D,bits,dtype", [(5, 384, 8, jnp.float32), (3, 512, 4, jnp.float32),
                                            (4, 4096, 8, jnp.bfloat16), (3, 512, 4, jnp.bfloat16)])
def test_folded_norm_quantization_matches_norm_then_quantize(M, D, bits, dtype):
    """quant.rmsnorm_quantize (the norm folded into the scale: no normalized tensor) against the
    model's RMSNorm followed by quantize_activations: scales equal to f32 rounding (bf16: to the
    rounding of the normalized values), codes within one step and nearly all equal, an all-zero
    row gives sx = 1 and xq = 0."""
    x, gain = _inputs(M, D, dtype, 3 * M + D)
    xq, sx = quant.rmsnorm_quantize(x, gain, 1e-5, bits)
    xq_r, sx_r = rmsnorm_quant_reference(x, gain, 1e-5, bits)
    f32 = dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(sx), np.asarray(sx_r), rtol=1e-6 if f32 else 2 ** -7)
    diff = np.abs(np.asarray(xq, np.int32) - np.asarray(xq_r, np.int32))
    assert diff.max() <= 1 and (diff > 0).mean() <= (1e-3 if f32 else 0.05)
    assert xq.dtype == jnp.int8 and sx.shape == (M, 1)
    assert float(sx[1, 0]) == 1.0 and not np.any(np.asarray(xq[1]))
    with pytest.raises(ValueError, match="activation bits must be one of"):
        quant.rmsnorm_quantize(x, gain, 1e-5, 6)
