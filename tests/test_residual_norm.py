"""The fused GEMM epilogue + residual add + RMSNorm kernel (pallas_kernels.residual_norm) in
interpret mode on CPU: against a float64 reference and the model's own ops, its dispatch
gates, and the model routing each junction after o_proj / down_proj through it."""

import logging

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import qspec_jax as qj
from pallas_kernels import residual_norm as rn
from qspec_jax import kernel_dispatch as kd
from qspec_jax.layers import GemmPartials, RMSNorm

EPS = 1e-5


def _case(M, Mp, S, N, kind, dtype=jnp.bfloat16, seed=0):
    r = np.random.RandomState(seed)
    x = jnp.asarray(3 * r.randn(M, N), dtype)
    gain = jnp.asarray(1 + 0.1 * r.randn(N), dtype)
    if kind == "int8":
        part = jnp.asarray(r.randint(-30000, 30000, (S, Mp, N)), jnp.int32)
        scales = jnp.asarray(r.rand(N) * 1e-3, jnp.float32)
        sx = jnp.asarray(r.rand(M) * 1e-2 + 1e-3, jnp.float32)
    elif kind == "f32":
        part = jnp.asarray(4 * r.randn(S, Mp, N), jnp.float32)
        scales, sx = jnp.asarray(r.rand(N) * 0.2, jnp.float32), None
    else:  # a finished GEMM output
        part, scales, sx = jnp.asarray(2 * r.randn(1, Mp, N), dtype), None, None
    return x, part, scales, gain, sx


def _float64(x, part, scales, gain, sx):
    """Independent reference in numpy: h rounded to bf16 as the GEMM returns it (int8: through
    bf16), x + h rounded to x's dtype, then RMSNorm in float64 (the kernel rounds it twice)."""
    M = x.shape[0]
    p = np.asarray(part, np.float64)
    if scales is None:
        h = p[0, :M]
    else:
        acc = np.asarray(part[0], np.float32 if part.dtype == jnp.float32 else np.int64)
        for s in range(1, part.shape[0]):  # split order, in the partials' own precision
            acc = acc + np.asarray(part[s], acc.dtype)
        h = acc[:M].astype(np.float32) * np.asarray(scales)[None]
        if sx is not None:
            h = (h * np.asarray(sx)[:, None]).astype(ml_dtypes.bfloat16)
    xd = np.dtype(x.dtype)
    x_new = (np.asarray(x, np.float64) + np.asarray(h, xd).astype(np.float64)).astype(xd)
    xf = x_new.astype(np.float64)
    normed = np.asarray(gain, np.float64) * xf / np.sqrt(np.mean(xf * xf, -1, keepdims=True) + EPS)
    return x_new, normed


def _run(*args):
    x, part, scales, gain, sx = args
    return jax.jit(lambda x, p, s, g, sx: rn.residual_norm(x, p, s, g, EPS, sx, interpret=True))(
        x, part, scales, gain, sx)


@pytest.mark.parametrize("M,Mp,S,N,kind", [
    (1, 8, 4, 4096, "f32"),     # batch-1 o_proj: 8 padded rows, 4 K splits, one 4096 piece
    (3, 8, 2, 384, "int8"),     # a draft step's int32 sums with per-token scales; 3 pieces
    (5, 16, 3, 3584, "f32"),    # Qwen2.5-7B's width: 7 pieces of 512
    (4, 4, 1, 256, "h"),        # a finished output (another GEMM path)
])
def test_kernel_matches_references(M, Mp, S, N, kind):
    args = _case(M, Mp, S, N, kind, seed=M + N)
    x_new, normed = _run(*args)
    ref_x, ref_n = rn.residual_norm_reference(*args[:4], EPS, args[4])
    # The residual stream is bit-exact: every step rounds as the unfused model path does.
    np.testing.assert_array_equal(np.asarray(x_new), np.asarray(ref_x))
    x64, n64 = _float64(*args)
    np.testing.assert_array_equal(np.asarray(x_new, np.float32), x64.astype(np.float32))
    # The norm: within one bf16 rounding of float64 (and of the jnp reference, whose mean may
    # sum in another order).
    got = np.asarray(normed, np.float64)
    np.testing.assert_allclose(got, n64, rtol=2 ** -7, atol=1e-6)
    np.testing.assert_allclose(got, np.asarray(ref_n, np.float64), rtol=2 ** -7, atol=0)
    assert np.mean(got == np.asarray(ref_n, np.float64)) > 0.99


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M,Mp,S,N,kind", [(1, 8, 4, 4096, "f32"), (3, 8, 2, 384, "int8"),
                                           (4, 4, 1, 256, "h")])
def test_quantizing_variant_matches_reference(M, Mp, S, N, kind, bits):
    """bits=8 / 4 (a draft mode's junction): (x + h, the norm quantized per token) as
    quantize_per_token_reference of the reference norm; an all-zero norm row gets scale 1."""
    x, part, scales, gain, sx = _case(M, Mp, S, N, kind, seed=3 * M + N + bits)
    if kind == "h" and M > 2:  # row 1: x = -h, so x + h = 0 and the norm is all zero
        x = x.at[1].set(-part[0, 1].astype(x.dtype))
    x_new, xq, sq = jax.jit(lambda x, p, s, g, sxx: rn.residual_norm(
        x, p, s, g, EPS, sxx, bits=bits, interpret=True))(x, part, scales, gain, sx)
    ref_x, ref_q, ref_s = rn.residual_norm_reference(x, part, scales, gain, EPS, sx, bits=bits)
    assert xq.dtype == jnp.int8 and sq.shape == (M, 1)
    np.testing.assert_array_equal(np.asarray(x_new), np.asarray(ref_x))
    np.testing.assert_allclose(np.asarray(sq), np.asarray(ref_s), rtol=2 ** -7)
    # the same integers but where the norm's last bit differs (its mean's sum order)
    diff = np.abs(np.asarray(xq, np.int32) - np.asarray(ref_q, np.int32))
    assert diff.max() <= 1 and np.mean(diff == 0) > 0.99
    if kind == "h" and M > 2:
        assert float(sq[1, 0]) == 1.0 and not np.asarray(xq[1]).any()
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        rn.residual_norm(x, part, scales, gain, EPS, sx, bits=6, interpret=True)


def test_float32_model_ops():
    """In f32 (no intermediate rounding) the kernel equals the model's ops, x + h and RMSNorm,
    up to f32 rounding (XLA may contract h * scale + x into one FMA in either)."""
    x, part, scales, gain, _ = _case(2, 8, 2, 512, "f32", dtype=jnp.float32, seed=3)
    x_new, normed = _run(x, part, scales, gain, None)
    h = (part[0, :2] + part[1, :2]) * scales[None]
    norm = RMSNorm(512, EPS, jnp.float32)
    norm.scale.value = gain
    np.testing.assert_allclose(np.asarray(x_new), np.asarray(x + h), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(normed), np.asarray(norm(x + h)), rtol=1e-6, atol=1e-6)


def test_rejects_what_it_cannot_take():
    x, part, scales, gain, sx = _case(2, 8, 2, 256, "int8")
    with pytest.raises(ValueError, match="need the per-token scales sx"):
        rn.residual_norm(x, part, scales, gain, EPS, None, interpret=True)
    with pytest.raises(ValueError, match="do not fit"):
        rn.residual_norm(x, part[:, :, :128], scales, gain, EPS, sx, interpret=True)
    with pytest.raises(ValueError, match="do not fit"):
        rn.residual_norm(jnp.zeros((9, 256), x.dtype), part, scales, gain, EPS, sx, interpret=True)
    with pytest.raises(ValueError, match="multiple of 128"):
        rn.residual_norm(x[:, :200], part[:, :, :200], scales[:200], gain[:200], EPS, sx,
                         interpret=True)
    with pytest.raises(ValueError, match=r"comes as \[1, M, N\]"):
        rn.residual_norm(x, part.astype(x.dtype), None, gain, EPS, interpret=True)


def test_gemm_partials_finish_and_dispatch():
    """GemmPartials.finish() is the Mosaic GEMM's epilogue (w4_mgpu.out_mn_epilogue, checked
    against numpy here); kernel_dispatch.residual_norm on it and on a finished [B, T, N] output
    gives x + h and the model's RMSNorm of it."""
    x, part, scales, gain, sx = _case(3, 8, 4, 256, "int8", seed=7)
    gp = GemmPartials(part, scales, sx, (1, 3), jnp.bfloat16)
    h = gp.finish()
    assert h.shape == (1, 3, 256) and h.dtype == jnp.bfloat16
    acc = np.asarray(part, np.int64).sum(0)[:3].astype(np.float32) * np.asarray(scales)[None]
    np.testing.assert_array_equal(np.asarray(h[0], np.float32),
                                  (acc * np.asarray(sx)[:, None]).astype(ml_dtypes.bfloat16)
                                  .astype(np.float32))
    norm = RMSNorm(256, EPS, jnp.bfloat16)
    norm.scale.value = gain
    x3 = x.reshape(1, 3, 256)
    for hh in (gp, h):
        x_new, normed = kd.residual_norm(x3, hh, gain, EPS, True)
        np.testing.assert_array_equal(np.asarray(x_new), np.asarray(x3 + h))
        np.testing.assert_allclose(np.asarray(normed, np.float32),
                                   np.asarray(norm(x3 + h), np.float32), rtol=2 ** -7)


def test_dispatch_gates(monkeypatch, caplog):
    """"xla" never; "auto" only on a GPU with RESIDUAL_NORM on (not yet measured faster);
    "pallas" always (interpret mode on CPU), for decode shapes (M <= 64) of widths the kernel
    takes, in every quantized mode (the draft modes quantize the norm in the same kernel)."""
    assert kd.residual_norm_runs("xla", "w4a16", 1, 4096) is None
    assert kd.residual_norm_runs("auto", "w4a16", 1, 4096) is None  # CPU
    assert kd.residual_norm_runs("pallas", "w4a16", 1, 4096) is True  # interpret mode
    assert kd.residual_norm_runs("pallas", "w4a16", 65, 4096) is None  # prefill: XLA
    with caplog.at_level(logging.WARNING, logger="qspec_jax"):
        assert kd.residual_norm_runs("pallas", "w4a16", 1, 4100) is None
    assert "cannot take hidden size 4100" in caplog.text
    assert kd.residual_norm_runs("pallas", "w4a8", 1, 4096) is True  # quantizing variant
    monkeypatch.setattr(kd.jax, "default_backend", lambda: "gpu")
    assert kd.residual_norm_runs("auto", "w4a16", 1, 4096) is None
    monkeypatch.setattr(kd, "RESIDUAL_NORM", True)
    assert kd.residual_norm_runs("auto", "w4a16", 16, 4096) is False
    assert kd.residual_norm_runs("auto", "w4a8", 16, 4096) is False  # fused quant not in auto


@pytest.fixture(scope="module")
def h128_dir(tmp_path_factory):
    from hf_models import build_hf_model
    path = tmp_path_factory.mktemp("h128")
    build_hf_model("llama", hidden_size=128, intermediate_size=256).save_pretrained(path)
    return str(path)


def test_model_routes_each_junction_through_the_kernel(h128_dir, monkeypatch):
    """kernels="pallas", w4a16, hidden 128: every junction but the first layer's (no GEMM output
    before it) and the final norm's runs the kernel (2L - 1 per forward); logits as the XLA
    path's in f32. Prefill-sized forwards (M > 64) keep XLA's ops."""
    calls = []
    real = rn.residual_norm
    monkeypatch.setattr(rn, "residual_norm", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    model = qj.load(h128_dir, dtype="float32", quant="w4", method="rtn")
    L = model.cfg.num_hidden_layers
    ids = np.random.RandomState(0).randint(3, 128, (2, 5))
    ours = np.asarray(qj.logits(model, ids, mode="w4a16", kernels="pallas"))
    assert calls == [(10, 128)] * (2 * L - 1)
    ref = np.asarray(qj.logits(model, ids, mode="w4a16", kernels="xla"))
    assert np.max(np.abs(ours - ref)) <= 1e-5 * np.max(np.abs(ref))
    calls.clear()
    qj.logits(model, np.zeros((2, 33), np.int64) + 5, mode="w4a16", kernels="pallas")
    assert not calls  # 66 rows


def test_draft_junctions_quantize_in_the_kernel(h128_dir, monkeypatch):
    """w4a8 / w4a4, kernels="pallas": each junction's kernel returns the norm quantized
    (bits 8 / 4) and the next GEMMs take it as it is; logits as the XLA path's (f32)."""
    calls = []
    real = rn.residual_norm
    monkeypatch.setattr(rn, "residual_norm", lambda *a, **k: calls.append(k.get("bits")) or real(*a, **k))
    model = qj.load(h128_dir, dtype="float32", quant="w4", method="rtn")
    L = model.cfg.num_hidden_layers
    ids = np.random.RandomState(1).randint(3, 128, (1, 6))
    for mode, bits in (("w4a8", 8), ("w4a4", 4)):
        calls.clear()
        ours = np.asarray(qj.logits(model, ids, mode=mode, kernels="pallas"))
        assert calls == [bits] * (2 * L - 1), mode
        ref = np.asarray(qj.logits(model, ids, mode=mode, kernels="xla"))
        assert np.max(np.abs(ours - ref)) <= 1e-5 * np.max(np.abs(ref)), mode


def test_qspec_stays_lossless_with_the_kernel(h128_dir, monkeypatch):
    """bf16, kernels="pallas" (the kernel in every draft, verify and AR junction, quantizing
    in the draft): QSpec's tokens equal w4a16 AR's."""
    calls = []
    real = rn.residual_norm
    monkeypatch.setattr(rn, "residual_norm", lambda *a, **k: calls.append(k.get("bits")) or real(*a, **k))
    model = qj.load(h128_dir, dtype="bfloat16", quant="w4", method="rtn")
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    ar = qj.generate(model, prompts, max_new_tokens=8, mode="w4a16", kernels="pallas")
    assert calls
    spec = qj.generate(model, prompts, max_new_tokens=8, mode="qspec", gamma=2, kernels="pallas")
    assert spec.tokens == ar.tokens
    assert 8 in calls  # the w4a8 draft's junctions


@pytest.mark.parametrize("M,Mp,S,N,dtype,scaled,int8", [
    (1, 8, 4, 4096, jnp.float32, True, False), (16, 16, 2, 4096, jnp.int32, True, True),
    (5, 8, 3, 3584, jnp.float32, True, False), (64, 64, 1, 8192, jnp.bfloat16, False, False)])
@pytest.mark.parametrize("bits", [None, 8])
def test_lowers_for_cuda(M, Mp, S, N, dtype, scaled, int8, bits):
    """The kernel lowers to Triton for a CUDA GPU (checked here on CPU; compiled and timed on
    the H200: tests/gpu/test_residual_norm_gpu.py, device stage resnorm)."""
    if rn.pltriton is None:
        pytest.skip("no Pallas Triton backend in this jax")
    avals = [jax.ShapeDtypeStruct((M, N), jnp.bfloat16), jax.ShapeDtypeStruct((S, Mp, N), dtype),
             jax.ShapeDtypeStruct((N,), jnp.float32) if scaled else None,
             jax.ShapeDtypeStruct((N,), jnp.bfloat16),
             jax.ShapeDtypeStruct((M,), jnp.float32) if int8 else None]
    text = jax.jit(lambda x, p, s, g, sx: rn.residual_norm(x, p, s, g, EPS, sx, bits=bits)).trace(
        *avals).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text.lower() and "residual_norm" in text


def test_whole_decode_forward_lowers_for_cuda(tmp_path, monkeypatch):
    """The GPU path end to end, lowered on CPU: an int4 [N, K] model (hidden 256, MLP 2048: a
    down_proj of 2 K splits) whose GEMMs take the Mosaic kernel (the dispatch told it runs on
    a Hopper GPU), with RESIDUAL_NORM on:
    every junction but the first gets the GEMM's partial sums (f32 in w4a16; int32 with the
    activation scales in w4a8, whose norm the kernel quantizes), and the whole forward lowers
    for CUDA (the kernels compile on the device: tests/gpu/test_residual_norm_gpu.py)."""
    from hf_models import build_hf_model
    from qspec_jax.model import KVCache
    build_hf_model("llama", hidden_size=256, intermediate_size=2048).save_pretrained(tmp_path)
    model = qj.with_weight_layout(qj.load(str(tmp_path), dtype="bfloat16", quant="w4",
                                          method="rtn", rotate=False), "nk")
    monkeypatch.setattr(kd, "mgpu_unavailable", lambda: None)
    monkeypatch.setattr(kd.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(kd, "RESIDUAL_NORM", True)
    seen = []
    real = rn.residual_norm
    monkeypatch.setattr(rn, "residual_norm", lambda x, p, s, *a, **k:
                        seen.append((p.dtype, p.shape[0], k.get("bits"))) or real(x, p, s, *a, **k))
    L, net = model.cfg.num_hidden_layers, model.module
    for mode, dtype, bits in (("w4a16", jnp.float32, None), ("w4a8", jnp.int32, 8)):
        seen.clear()
        cache = KVCache.create(model.cfg, 2, 64, jnp.bfloat16)
        fn = jax.jit(lambda t, c, s: net(t, c, s, mode=mode, kernels="auto"))
        text = fn.trace(jnp.zeros((2, 1), jnp.int32), cache, jnp.zeros((2,), jnp.int32)).lower(
            lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text and "residual_norm" in text
        assert len(seen) == 2 * L - 1 and all(d == dtype and b == bits for d, _, b in seen), seen
        assert any(s > 1 for _, s, _ in seen)  # split-K partial sums, added in the kernel
