"""The int4 weight store and every execution mode against independent NumPy float64 math."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from qspec_jax import quant

K, N, M = 128, 48, 5


def _random_layer(seed, group_size=None):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((K, N)).astype(np.float32)
    x = (rng.standard_normal((2, M, K)) * rng.uniform(0.1, 3.0, (2, M, 1))).astype(np.float32)
    qweight, scales = quant.quantize_weight_rtn(w, group_size)
    return x, w, qweight, scales


# ----------------------------------------------------------------------------- NumPy reference


def _np_unpack(packed):
    """Independent nibble decoding: low nibbles are rows [0, K/2), high ones [K/2, K)."""
    u = np.asarray(packed).astype(np.uint8).astype(np.int64)
    low, high = u & 0xF, u >> 4
    return np.concatenate([low, high]) - 16 * (np.concatenate([low, high]) >= 8)


def _np_group_dot(xv, q, scales):
    """sum_g s[g] * (x_g @ q_g) in float64/int64 for x [..., K], q [K, N], scales [ng, N]."""
    ng = scales.shape[0]
    g = K // ng
    acc = np.stack([xv[..., i * g:(i + 1) * g] @ q[i * g:(i + 1) * g] for i in range(ng)])
    return np.sum(acc.astype(np.float64) * np.asarray(scales, np.float64)[:, None, None, :], 0)


def _np_token_quant(x, qmin, qmax):
    """Per-token scale and values, the division in float32 exactly as the mode defines it."""
    amax = np.abs(x).max(-1, keepdims=True)
    sx = np.where(amax > 0, amax / np.float32(qmax), np.float32(1.0)).astype(np.float32)
    return np.clip(np.round(x / sx), qmin, qmax).astype(np.int64), sx.astype(np.float64)


def _np_mode(x, qweight, scales, mode):
    q = _np_unpack(qweight)
    if mode == "w4a16":
        return _np_group_dot(x.astype(np.float64), q.astype(np.float64), scales)
    if mode == "w4a8_fp8":
        amax = np.abs(x).max(-1, keepdims=True)
        sx = np.where(amax > 0, amax / np.float32(448), np.float32(1.0)).astype(np.float32)
        xq = (x / sx).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
        return sx * _np_group_dot(xq, q.astype(np.float64), scales)
    xq, sx = _np_token_quant(x, *((-127, 127) if mode == "w4a8" else (-8, 7)))
    return sx * _np_group_dot(xq, q, scales)


def _tolerance(x, scales):
    """Bound on f32 rounding of a sum of products: a few ulps of sum |terms| [..., 1]."""
    q_max = 8 * np.abs(np.asarray(scales)).max()
    return 1e-6 * np.abs(x).sum(-1, keepdims=True) * q_max


# ----------------------------------------------------------------------------- format


def test_pack_unpack_round_trip_all_values():
    # Every (low, high) pair of the 16 int4 values once: [2, 256].
    lo, hi = np.meshgrid(np.arange(-8, 8), np.arange(-8, 8))
    q = np.stack([lo.ravel(), hi.ravel()]).astype(np.int8)
    packed = quant.pack_int4(q)
    assert packed.shape == (1, 256) and packed.dtype == jnp.int8
    np.testing.assert_array_equal(quant.unpack_int4(packed), q)
    np.testing.assert_array_equal(_np_unpack(packed), q)


def test_half_split_layout():
    q = np.arange(-8, 8, dtype=np.int8).reshape(16, 1)
    packed = np.asarray(quant.pack_int4(q)).astype(np.uint8)  # [8, 1]
    np.testing.assert_array_equal(packed[:, 0] & 0xF, np.arange(-8, 0) & 0xF)
    np.testing.assert_array_equal(packed[:, 0] >> 4, np.arange(0, 8))


def test_odd_k_rejected():
    with pytest.raises(ValueError, match="even input size K"):
        quant.pack_int4(np.zeros((3, 2), np.int8))


@pytest.mark.parametrize("group_size", [None, 32])
def test_rtn_values_and_scales(group_size):
    _, w, qweight, scales = _random_layer(1, group_size)
    g = K if group_size is None else group_size
    assert scales.shape == (K // g, N) and scales.dtype == jnp.float32
    np.testing.assert_allclose(scales, np.abs(w).reshape(K // g, g, N).max(1) / 7, rtol=1e-6)
    q = _np_unpack(qweight)
    assert q.min() >= -8 and q.max() <= 7
    deq = np.asarray(quant.dequantize_weight(qweight, scales))
    np.testing.assert_allclose(deq, q * np.repeat(scales, g, 0), rtol=1e-7)
    assert np.abs(deq - w).max() <= 0.5 * np.repeat(scales, g, 0).max() * (1 + 1e-6)


def test_bad_group_size_message():
    message = r"G=48 does not divide the input size K=128.*group_size=None"
    with pytest.raises(ValueError, match=message):
        quant.quantize_weight_rtn(np.ones((K, N)), 48)


def test_zero_weight_column_guard():
    x, w, _, _ = _random_layer(2)
    w[:, 3] = 0.0
    qweight, scales = quant.quantize_weight_rtn(w)
    assert float(scales[0, 3]) == 1.0
    for mode in quant.QUANT_MODES:
        y = np.asarray(quant.quantized_matmul_reference(jnp.asarray(x), qweight, scales, mode))
        assert np.all(np.isfinite(y)) and np.all(y[..., 3] == 0.0), mode


# ----------------------------------------------------------------------------- activations


@pytest.mark.parametrize("bits,qmin,qmax", [(8, -127, 127), (4, -8, 7)])
def test_activation_quantization(bits, qmin, qmax):
    x, *_ = _random_layer(3)
    x[0, 1] = 0.0
    xq, sx = quant.quantize_activations(jnp.asarray(x), bits)
    assert xq.dtype == jnp.int8 and sx.shape == (2, M, 1)
    assert float(sx[0, 1, 0]) == 1.0 and not np.any(np.asarray(xq[0, 1]))
    assert np.abs(np.asarray(xq)).max(-1)[1].min() == qmax  # the row maximum hits qmax
    ref_q, ref_s = _np_token_quant(x, qmin, qmax)
    np.testing.assert_array_equal(xq, ref_q)
    np.testing.assert_allclose(sx, ref_s, rtol=2.5e-7)  # XLA may divide via a reciprocal


def test_fp8_activation_quantization():
    x, *_ = _random_layer(4)
    xq, sx = quant.quantize_activations_fp8(jnp.asarray(x))
    assert xq.dtype == jnp.float8_e4m3fn
    xq = np.asarray(xq, np.float32)
    np.testing.assert_allclose(np.abs(xq).max(-1), 448.0)
    # e4m3: half an ulp is 2^-4 relative for normals and 2^-10 absolute for subnormals.
    scaled = x / np.asarray(sx)
    assert np.all(np.abs(xq - scaled) <= np.maximum(2 ** -4 * np.abs(scaled), 2 ** -10))


def test_zero_activation_row_guard():
    x, _, qweight, scales = _random_layer(5, 32)
    x[1, 2] = 0.0
    for mode in quant.QUANT_MODES:
        y = np.asarray(quant.quantized_matmul_reference(jnp.asarray(x), qweight, scales, mode))
        assert np.all(np.isfinite(y)) and np.all(y[1, 2] == 0.0), mode


# ----------------------------------------------------------------------------- modes


@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("mode", quant.QUANT_MODES)
def test_mode_matches_numpy_f32(mode, group_size):
    x, _, qweight, scales = _random_layer(6, group_size)
    y = quant.quantized_matmul_reference(jnp.asarray(x), qweight, scales, mode)
    assert y.shape == (2, M, N) and y.dtype == jnp.float32
    ref = _np_mode(x, qweight, scales, mode)
    if mode in ("w4a8", "w4a4") and group_size is None:
        # int32 accumulation is exact; only the two f32 scale multiplies round.
        np.testing.assert_allclose(y, ref, rtol=1e-6, atol=0)
    else:
        # f32 sums (of products or of group terms) may cancel: bound by sum |terms|.
        assert np.all(np.abs(np.asarray(y, np.float64) - ref) <= _tolerance(x, scales))


@pytest.mark.parametrize("group_size", [None, 32])
def test_w4a16_bf16(group_size):
    x, _, qweight, scales = _random_layer(7, group_size)
    xb = jnp.asarray(x, jnp.bfloat16)
    ref = _np_mode(np.asarray(xb, np.float64), qweight, scales, "w4a16")
    # f32 output: only f32 accumulation error (bf16 x int4 products are exact in f32).
    y32 = quant.quantized_matmul_reference(xb, qweight, scales, "w4a16", out_dtype=jnp.float32)
    assert np.all(np.abs(np.asarray(y32, np.float64) - ref) <= _tolerance(x, scales))
    # bf16 output: one bf16 rounding (relative 2^-8) on top.
    y = quant.quantized_matmul_reference(xb, qweight, scales, "w4a16")
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2 ** -8,
                               atol=_tolerance(x, scales).max())


def test_unknown_mode_and_w16_errors():
    x, _, qweight, scales = _random_layer(8)
    with pytest.raises(ValueError, match="unknown mode 'w8a8'; valid modes: w16, w4a16, w4a8"):
        quant.quantized_matmul_reference(jnp.asarray(x), qweight, scales, "w8a8")
    with pytest.raises(ValueError, match="needs unquantized weights"):
        quant.quantized_matmul_reference(jnp.asarray(x), qweight, scales, "w16")
    assert quant.check_mode("w4a8") == "w4a8"


# ----------------------------------------------------------------------------- trees


def _fake_tree(tied):
    rng = np.random.default_rng(9)
    d, f, v = 16, 32, 24

    def lin(k, n, bias=False):
        out = {"kernel": rng.standard_normal((k, n)).astype(np.float32)}
        return {**out, "bias": np.zeros(n, np.float32)} if bias else out

    layer = {"attn_norm": {"scale": np.ones(d, np.float32)},
             "attn": {"q_proj": lin(d, d, True), "k_proj": lin(d, 8, True),
                      "v_proj": lin(d, 8, True), "o_proj": lin(d, d)},
             "mlp_norm": {"scale": np.ones(d, np.float32)},
             "mlp": {"gate_proj": lin(d, f), "up_proj": lin(d, f), "down_proj": lin(f, d)}}
    tree = {"embed": {"embedding": rng.standard_normal((v, d)).astype(np.float32)},
            "layers": {0: layer, 1: layer}, "final_norm": {"scale": np.ones(d, np.float32)}}
    return tree if tied else {**tree, "lm_head": lin(d, v)}


@pytest.mark.parametrize("quantize_lm_head", [False, True])
def test_quantize_params(quantize_lm_head):
    tree = _fake_tree(tied=False)
    out = quant.quantize_params(tree, group_size=8, quantize_lm_head=quantize_lm_head)
    assert quant.is_quantized(out) and not quant.is_quantized(tree)
    q_proj = out["layers"][1]["attn"]["q_proj"]
    assert set(q_proj) == {"qweight", "scales", "bias"}
    assert q_proj["qweight"].shape == (8, 16) and q_proj["scales"].shape == (2, 16)
    np.testing.assert_array_equal(q_proj["bias"], tree["layers"][1]["attn"]["q_proj"]["bias"])
    down = out["layers"][0]["mlp"]["down_proj"]
    np.testing.assert_allclose(quant.dequantize_weight(down["qweight"], down["scales"]),
                               tree["layers"][0]["mlp"]["down_proj"]["kernel"],
                               atol=0.5 * float(down["scales"].max()) + 1e-6)
    assert ("qweight" in out["lm_head"]) == quantize_lm_head
    assert out["embed"]["embedding"] is tree["embed"]["embedding"]
    assert out["final_norm"]["scale"] is tree["final_norm"]["scale"]
    assert "kernel" in tree["layers"][0]["attn"]["o_proj"]  # input untouched


def test_quantize_params_tied():
    out = quant.quantize_params(_fake_tree(tied=True), quantize_lm_head=True)
    assert "lm_head" not in out and quant.is_quantized(out)
