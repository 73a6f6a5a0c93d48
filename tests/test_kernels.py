"""CPU checks of the Pallas int4 GEMM kernels in interpret mode (pallas_kernels/).

Tolerances: the w4a8/w4a4 kernel with per-channel scales is compared bit-for-bit with its
reference in float32 output (int32 accumulation is exact and the epilogue does the same float
operations). With group scales the float sum over groups runs in another order: relative
error <= 1e-5. w4a16: f32 activations rel. err <= 1e-5; bf16 activations/outputs rel. err
<= 1e-2 of the f32 reference (bf16 output rounding, ~2e-3 typical).
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import (TileConfig, supported, w4a16_matmul, w4a16_matmul_reference,
                            w4a8_matmul, w4a8_matmul_reference)
from pallas_kernels._common import split_nibbles
from pallas_kernels.w4a8_matmul import quantize_per_token_reference, unpack_int4


def _weights(key, K, N, G):
    k1, k2 = jax.random.split(key)
    qw = jax.random.randint(k1, (K // 2, N), -128, 128, jnp.int32).astype(jnp.int8)
    s = jax.random.uniform(k2, (K // G, N), jnp.float32, 0.5, 1.5) * 0.01
    return qw, s


def _rel(a, b):
    a = np.asarray(a, np.float64); b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _dense_ref(x, qw, s):
    """Independent float64 numpy check of the layout: w[k, n] = q[k, n] * s[k // G, n]."""
    qw = np.asarray(qw).astype(np.int16)
    lo = ((qw & 0xF) ^ 8) - 8
    hi = (((qw >> 4) & 0xF) ^ 8) - 8
    q = np.concatenate([lo, hi], 0).astype(np.float64)
    K = q.shape[0]
    G = K // s.shape[0]
    w = q * np.repeat(np.asarray(s, np.float64), G, axis=0)
    return np.asarray(x, np.float64) @ w


CASES = [  # M, K, N, G, config
    (1, 128, 64, 128, None),
    (5, 256, 96, 256, None),                       # N multiple of 32 only
    (20, 256, 128, 64, None),                      # groups, M not a tile multiple
    (7, 512, 64, 128, TileConfig(16, 32, 64, 2, transpose=True)),   # split-K + transposed
    (33, 256, 64, 256, TileConfig(32, 64, 32, 1, transpose=True)),
    (40, 256, 64, 256, TileConfig(16, 64, 64, 2)),                  # 3 M blocks, split-K
    (9, 256, 64, 256, TileConfig(16, 64, 64, 2, dequant="cvt")),    # int->float conversion path
    (9, 256, 64, 64, TileConfig(16, 64, 32, 1, transpose=True, dequant="int8")),
    (9, 256, 64, 256, TileConfig(16, 64, 32, 2, dequant="int8s")),  # 16x operands, split-K
    (5, 256, 64, 64, TileConfig(16, 64, 32, 1, transpose=True, dequant="int8s")),  # groups
    (6, 256, 64, 256, TileConfig(16, 64, 32, 2, dequant="cvts")),   # w4a16: 16x nibbles
    (6, 256, 64, 64, TileConfig(16, 64, 32, 1, transpose=True, dequant="cvts")),
]
GEMV_CASES = [  # the FMA path for a few token rows (both kernels)
    (1, 256, 64, 256, TileConfig(16, 64, 32, 1, dequant="gemv")),
    (3, 512, 128, 128, TileConfig(16, 64, 32, 2, dequant="gemv")),  # groups + split-K
    (4, 256, 64, 64, TileConfig(16, 32, 32, 2, dequant="gemv")),    # group = bk step
    (2, 512, 64, 512, TileConfig(16, 64, 32, 2, dequant="gemv_magic")),  # bit-trick nibbles
    (3, 256, 64, 64, TileConfig(16, 32, 32, 1, dequant="gemv_magic")),   # ... with groups
]
ASM_CASES = [  # w4a16 only: nibbles -> bf16/f16 by inline PTX on GPUs (jnp bit ops here)
    (6, 256, 64, 256, TileConfig(16, 64, 32, 2, dequant="asm")),
    (17, 256, 128, 64, TileConfig(16, 64, 32, 1, transpose=True, dequant="asm")),  # groups
]
# Default configs use dequant="magic" for w4a16 (bf16) and "int8" MMA for w4a8; an explicit
# TileConfig defaults to "magic" (w4a8: bf16 MMA with exact f32 accumulation).


def test_w4a16_xla_backend_and_auto_dispatch():
    w16 = __import__("importlib").import_module("pallas_kernels.w4a16_matmul")
    K, N = 128, 64
    qw, s = _weights(jax.random.key(3), K, N, K)
    for M in (3, w16.XLA_MIN_M):
        x = jax.random.normal(jax.random.key(M), (M, K), jnp.float32)
        ref = w4a16_matmul_reference(x, qw, s)
        for backend in ("xla", None):
            y = w4a16_matmul(x, qw, s, backend=backend, interpret=True)
            assert _rel(y, ref) < 1e-5


@pytest.mark.parametrize("M,K,N,G,cfg", CASES + GEMV_CASES + ASM_CASES)
def test_w4a16_matches_reference(M, K, N, G, cfg):
    key = jax.random.key(M * 1000 + K + N + G)
    qw, s = _weights(key, K, N, G)
    x32 = jax.random.normal(jax.random.fold_in(key, 1), (M, K), jnp.float32)
    ref32 = w4a16_matmul_reference(x32, qw, s)
    assert _rel(ref32, _dense_ref(x32, qw, s)) < 1e-5  # reference itself vs float64 layout check
    y32 = w4a16_matmul(x32, qw, s, interpret=True, config=cfg)
    assert y32.shape == (M, N) and y32.dtype == jnp.float32
    assert _rel(y32, ref32) < 1e-5
    xb = x32.astype(jnp.bfloat16)
    yb = w4a16_matmul(xb, qw, s, interpret=True, config=cfg)
    assert yb.dtype == jnp.bfloat16
    refb = w4a16_matmul_reference(xb, qw, s)
    assert _rel(yb.astype(jnp.float32), w4a16_matmul_reference(xb.astype(jnp.float32), qw, s)) < 1e-2
    assert _rel(yb.astype(jnp.float32), refb.astype(jnp.float32)) < 1e-2


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M,K,N,G,cfg", CASES + GEMV_CASES)
def test_w4a8_matches_reference(M, K, N, G, cfg, bits):
    key = jax.random.key(M * 7 + K + N + G + bits)
    qw, s = _weights(key, K, N, G)
    x = jax.random.normal(jax.random.fold_in(key, 2), (M, K), jnp.float32)
    if M > 1:
        x = x.at[M - 1].set(0.0)  # an all-zero row (sx = 1, output 0)
    xq, sx = quantize_per_token_reference(x, bits)
    lim = 127 if bits == 8 else 8
    assert int(jnp.max(jnp.abs(xq.astype(jnp.int32)))) <= lim
    ref = w4a8_matmul_reference(xq, sx, qw, s, out_dtype=jnp.float32)
    dq = np.asarray(xq, np.float64) * np.asarray(sx, np.float64)
    assert _rel(ref, _dense_ref(dq, qw, s)) < 1e-5
    y = w4a8_matmul(xq, sx, qw, s, out_dtype=jnp.float32, interpret=True, config=cfg)
    assert y.shape == (M, N) and y.dtype == jnp.float32
    if G == K:
        np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))  # exact
    else:
        assert _rel(y, ref) < 1e-5
    if M > 1:
        assert not np.any(np.asarray(y[M - 1]))
    yb = w4a8_matmul(xq, sx, qw, s, interpret=True, config=cfg)  # default bf16 out
    assert yb.dtype == jnp.bfloat16
    if G == K:
        np.testing.assert_array_equal(np.asarray(yb), np.asarray(ref.astype(jnp.bfloat16)))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M,K,N,G,cfg", [c for c in CASES if c[4] is None or c[4].dequant != "cvt"
                                         and c[4].dequant != "cvts"] + GEMV_CASES[:2])
def test_w4a8_quantizes_in_kernel(M, K, N, G, cfg, bits):
    """bits=...: float activations in, quantized per token inside the kernel (interpret mode:
    the same division and ties-to-even rounding as the reference); gemv configurations
    quantize in XLA first. Per-channel outputs equal the reference of the separately quantized
    activations exactly."""
    key = jax.random.key(M * 11 + K + N + G + bits)
    qw, s = _weights(key, K, N, G)
    x = jax.random.normal(jax.random.fold_in(key, 3), (M, K), jnp.float32) * 3
    x = x.at[0, :4].set(jnp.array([0.5, 1.5, -2.5, 3.5]) * (jnp.max(jnp.abs(x[0])) / 127))  # ties
    if M > 1:
        x = x.at[M - 1].set(0.0)
    for dt in (jnp.bfloat16, jnp.float32):
        xd = x.astype(dt)
        # jitted like the kernel's own scales (XLA turns / 7 into a multiply: 1 ulp off eager)
        xq, sx = jax.jit(quantize_per_token_reference, static_argnums=1)(xd, bits)
        ref = w4a8_matmul_reference(xq, sx, qw, s, out_dtype=jnp.float32)
        y = w4a8_matmul(xd, None, qw, s, out_dtype=jnp.float32, interpret=True, config=cfg, bits=bits)
        y2 = w4a8_matmul(xd, sx, qw, s, out_dtype=jnp.float32, interpret=True, config=cfg, bits=bits)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(y2))
        if G == K:
            np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))
        else:
            assert _rel(y, ref) < 1e-5
        if M > 1:
            assert not np.any(np.asarray(y[M - 1]))
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        w4a8_matmul(x, None, qw, s, interpret=True, bits=2)
    with pytest.raises(ValueError, match="x must be float"):
        w4a8_matmul(xq, sx, qw, s, interpret=True, bits=bits)
    with pytest.raises(ValueError, match="sx .* is required"):
        w4a8_matmul(xq, None, qw, s, interpret=True)


def test_asm_dequant_bit_trick_and_ptx():
    """dequant="asm": the bit arithmetic its PTX performs (run in jnp under interpret) gives
    every nibble value exactly in bf16 and f16; the PTX holds the same constants; an f16
    activation through the kernel matches the reference."""
    from pallas_kernels._common import _asm_ptx, asm_nibbles
    q = jnp.arange(-128, 128, dtype=jnp.int32).astype(jnp.int8).reshape(16, 16)
    ref_lo, ref_hi = split_nibbles(q)
    for dt, pat, neg in ((jnp.bfloat16, "0x43084308", "0xc308c308"),
                         (jnp.float16, "0x64086408", "0xe408e408")):
        lo, hi = asm_nibbles(q, dt, interpret=True)
        assert lo.dtype == hi.dtype == dt
        np.testing.assert_array_equal(np.asarray(lo, np.float32), np.asarray(ref_lo, np.float32))
        np.testing.assert_array_equal(np.asarray(hi, np.float32), np.asarray(ref_hi, np.float32))
        for high in (False, True):
            ptx = _asm_ptx(jnp.dtype(dt).name, high)
            assert ptx.count(pat) == 2 and f"mov.b32 off, {neg};" in ptx and ptx.count("fma.rn.") == 2
            assert ("shr.u32" in ptx) == high
    M, K, N = 5, 256, 64
    qw, s = _weights(jax.random.key(11), K, N, K)
    x = jax.random.normal(jax.random.key(12), (M, K), jnp.float32).astype(jnp.float16)
    y = w4a16_matmul(x, qw, s, interpret=True, config=TileConfig(16, 64, 32, 2, dequant="asm"))
    assert y.dtype == jnp.float16
    assert _rel(y.astype(jnp.float32), w4a16_matmul_reference(x.astype(jnp.float32), qw, s)) < 1e-2


def test_int_path_exact_accumulation():
    """Large |values| at the int4/int8 extremes: the int32 accumulator must be exact."""
    M, K, N = 3, 512, 64
    qw = jnp.full((K // 2, N), -0x78, jnp.int8)  # low nibble 8 -> -8, high nibble 0x8 -> -8
    s = jnp.ones((1, N), jnp.float32)
    xq = jnp.full((M, K), -127, jnp.int8)
    sx = jnp.ones((M, 1), jnp.float32)
    y = w4a8_matmul(xq, sx, qw, s, out_dtype=jnp.float32, interpret=True)
    assert float(y[0, 0]) == 127.0 * 8 * K
    assert np.asarray(unpack_int4(qw)).min() == -8


def test_cross_check_with_qspec_quant():
    quant = pytest.importorskip("qspec_jax.quant")
    needed = ("quantized_matmul_reference", "quantize_weight_rtn", "quantize_activations")
    if not all(hasattr(quant, n) for n in needed):
        pytest.skip("qspec_jax.quant API not complete yet")
    K, N, M = 256, 64, 6
    key = jax.random.key(0)
    w = jax.random.normal(key, (K, N), jnp.float32)
    try:
        qw, s = quant.quantize_weight_rtn(w)
    except TypeError:
        pytest.skip("quantize_weight_rtn signature differs")
    x = jax.random.normal(jax.random.fold_in(key, 1), (M, K), jnp.float32)
    y16 = w4a16_matmul(x, qw, s, interpret=True)
    r16 = quant.quantized_matmul_reference(x, qw, s, "w4a16")
    assert _rel(y16, r16) < 1e-5
    xq, sx = quant.quantize_activations(x, 8)
    y8 = w4a8_matmul(xq, sx, qw, s, out_dtype=jnp.float32, interpret=True)
    r8 = quant.quantized_matmul_reference(x, qw, s, "w4a8")
    assert _rel(y8, r8) < 1e-5


@pytest.mark.parametrize("K,N,G,msg", [
    (100, 64, 100, "K=100 must be a multiple of 64"),
    (256, 48, 256, "N=48 must be a multiple of the smallest N tile 32"),
    (256, 64, 96, "group size G=96"),        # G does not divide K/2... nor K
    (384, 64, 128, "group size G=128"),      # G divides K but not K/2
])
def test_unsupported_shapes_raise(K, N, G, msg):
    ok, why = supported(4, K, N, G)
    assert not ok and msg in why
    nscale = K // G if K % G == 0 else -(-K // G)  # a G that does not divide K: 3 scale rows
    qw = jnp.zeros((K // 2, N), jnp.int8)
    s = jnp.ones((nscale, N), jnp.float32)
    with pytest.raises(ValueError, match="unsupported shape|must divide|scales shape"):
        w4a16_matmul(jnp.ones((4, K), jnp.bfloat16), qw, s, interpret=True)
    with pytest.raises(ValueError, match="unsupported shape|must divide|scales shape"):
        w4a8_matmul(jnp.ones((4, K), jnp.int8), jnp.ones((4, 1)), qw, s, interpret=True)


def test_operand_errors():
    qw = jnp.zeros((128, 64), jnp.int8)
    s = jnp.ones((1, 64), jnp.float32)
    with pytest.raises(ValueError, match="qweight"):
        w4a16_matmul(jnp.ones((2, 128), jnp.bfloat16), qw, s, interpret=True)  # K mismatch
    with pytest.raises(ValueError, match="scales shape"):
        w4a16_matmul(jnp.ones((2, 256), jnp.bfloat16), qw, jnp.ones((3, 64)), interpret=True)
    with pytest.raises(ValueError, match="xq must be int8"):
        w4a8_matmul(jnp.ones((2, 256), jnp.bfloat16), jnp.ones((2, 1)), qw, s, interpret=True)
    with pytest.raises(ValueError, match="backend"):
        w4a16_matmul(jnp.ones((2, 256), jnp.bfloat16), qw, s, backend="cuda-c")
    assert supported(1, 4096, 4096, 128) == (True, "ok")
    assert supported(None, 14336, 4096, None)[0]


def test_gemv_path_limits():
    qw, s = _weights(jax.random.key(5), 256, 64, 256)
    x = jnp.ones((20, 256), jnp.float32)
    with pytest.raises(ValueError, match="dequant='gemv' takes M <= bm"):
        w4a16_matmul(x, qw, s, interpret=True, config=TileConfig(16, 64, 32, 1, dequant="gemv"))
    xq, sx = quantize_per_token_reference(x, 8)
    with pytest.raises(ValueError, match="dequant='gemv' takes M <= bm"):
        w4a8_matmul(xq, sx, qw, s, interpret=True, config=TileConfig(16, 64, 32, 1, dequant="gemv"))
    K = 16384 + 64  # per-channel sums could pass 2**24: not exact in f32
    with pytest.raises(ValueError, match="needs K <= 16384"):
        w4a8_matmul(jnp.zeros((1, K), jnp.int8), jnp.ones((1, 1)), jnp.zeros((K // 2, 64), jnp.int8),
                    jnp.ones((1, 64)), interpret=True, config=TileConfig(16, 64, 32, 1, dequant="gemv"))


def test_magic_nibbles_f32_is_exact_for_every_byte():
    from pallas_kernels._common import magic_nibbles_f32
    q = jnp.arange(-128, 128, dtype=jnp.int32).astype(jnp.int8).reshape(16, 16)
    lo, hi = magic_nibbles_f32(q)
    ref_lo, ref_hi = split_nibbles(q)
    assert lo.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(lo), np.asarray(ref_lo, np.float32))
    np.testing.assert_array_equal(np.asarray(hi), np.asarray(ref_hi, np.float32))


@pytest.mark.parametrize("kernel,dequant", [("w4a16", "gemv"), ("w4a8", "gemv"),
                                            ("w4a16", "gemv_magic"), ("w4a8", "int8s"),
                                            ("w4a16", "cvts"), ("w4a16", "asm")])
def test_gemv_kernel_lowers_for_cuda(kernel, dequant):
    """The GEMV path lowers to a Triton kernel for CUDA (no GPU needed to lower) on the Llama
    shapes; compiling and timing it is the GPU tests' and bench_kernels' job."""
    for M, K, N, G in [(1, 4096, 4096, 4096), (4, 4096, 6144, 128), (3, 14336, 4096, 14336)]:
        cfg = TileConfig(16, 256, 32, 4, 4, 3, dequant=dequant)
        if kernel == "w4a16":
            fn = lambda x, q, s: w4a16_matmul(x, q, s, config=cfg)  # noqa: E731
            xs = (jax.ShapeDtypeStruct((M, K), jnp.bfloat16),)
        else:
            fn = lambda xq, sx, q, s: w4a8_matmul(xq, sx, q, s, config=cfg)  # noqa: E731
            xs = (jax.ShapeDtypeStruct((M, K), jnp.int8), jax.ShapeDtypeStruct((M, 1), jnp.float32))
        try:
            txt = jax.jit(fn).trace(
                *xs, jax.ShapeDtypeStruct((K // 2, N), jnp.int8),
                jax.ShapeDtypeStruct((K // G, N), jnp.float32)).lower(lowering_platforms=("cuda",)).as_text()
        except Exception as e:  # noqa: BLE001
            if "cuda" in str(e).lower() and "platform" in str(e).lower():
                pytest.skip(f"no CUDA lowering in this jaxlib: {e}")
            raise
        assert f"{kernel}_bm16_bn256_bk32_s4" in txt and dequant in txt
        if kernel == "w4a8" and dequant == "int8s":  # ... and with the in-kernel quantization
            fq = lambda x, sx, q, s: w4a8_matmul(x, sx, q, s, config=cfg, bits=8)  # noqa: E731
            txt = jax.jit(fq).trace(
                jax.ShapeDtypeStruct((M, K), jnp.bfloat16), xs[1],
                jax.ShapeDtypeStruct((K // 2, N), jnp.int8),
                jax.ShapeDtypeStruct((K // G, N), jnp.float32)).lower(lowering_platforms=("cuda",)).as_text()
            assert "w4a8_bm16_bn256_bk32_s4" in txt and "_q" in txt
        if dequant == "asm":  # the inline PTX is in the Triton kernel
            assert "lop3.b32" in txt and "prmt.b32" in txt


@pytest.mark.parametrize("kernel", ["w4a16", "w4a8"])
def test_default_configs_lower_for_cuda_on_the_70b_shapes(kernel):
    """The issue's larger model (Llama-3-70B layers, bench_kernels.SHAPES_70B): every M regime's
    default configuration fits these shapes and lowers to Triton for CUDA (the w4a16 XLA path
    from M = 256 lowers to XLA's own GEMM); timing them is the device's job (stage kernels70b)."""
    from experiments.bench_kernels import SHAPES_70B, parse_shapes
    assert parse_shapes("70b") == SHAPES_70B and parse_shapes("8b,1024x512")[-1] == (1024, 512)
    with pytest.raises(ValueError, match="neither a shape set"):
        parse_shapes("80b")
    for K, N in SHAPES_70B:
        assert supported(None, K, N)[0]
        for M in (1, 16, 64, 128, 256):
            if kernel == "w4a16":
                fn = w4a16_matmul
                xs = (jax.ShapeDtypeStruct((M, K), jnp.bfloat16),)
            else:
                fn = w4a8_matmul
                xs = (jax.ShapeDtypeStruct((M, K), jnp.int8), jax.ShapeDtypeStruct((M, 1), jnp.float32))
            try:
                txt = jax.jit(fn).trace(
                    *xs, jax.ShapeDtypeStruct((K // 2, N), jnp.int8),
                    jax.ShapeDtypeStruct((1, N), jnp.float32)).lower(lowering_platforms=("cuda",)).as_text()
            except Exception as e:  # noqa: BLE001
                if "cuda" in str(e).lower() and "platform" in str(e).lower():
                    pytest.skip(f"no CUDA lowering in this jaxlib: {e}")
                raise
            if kernel == "w4a16" and M >= 256:
                assert "xla.gpu.triton" not in txt  # dequantize + XLA GEMM
            else:
                assert f"{kernel}_bm" in txt and "xla.gpu.triton" in txt
