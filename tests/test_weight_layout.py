"""weight_layout="nk" (int4 [N, K] for the Mosaic GPU kernels): the same values as the stored
half-split layout, the same model outputs on the reference path, QSpec still lossless, clear
errors, and on a (pretend) GPU the decode GEMMs lower to the Mosaic GPU kernel."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qspec_jax as qj
from qspec_jax import kernel_dispatch, quant
from qspec_jax.layers import quantized_matmul


@pytest.fixture(scope="module")
def models():
    m = qj.load(None, quant="w4")
    return m, qj.with_weight_layout(m, "nk")


def test_layout_conversion_round_trips():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.integers(-8, 8, (64, 24)), jnp.int8)         # [K, N] int4 values
    hs = quant.pack_int4(q)
    nk = quant.to_weight_layout(hs, "nk")
    assert nk.dtype == jnp.int4 and nk.shape == (24, 64)
    np.testing.assert_array_equal(np.asarray(nk.astype(jnp.int8)), np.asarray(q).T)
    np.testing.assert_array_equal(np.asarray(quant.unpack_int4(nk)), np.asarray(q))
    np.testing.assert_array_equal(np.asarray(quant.to_weight_layout(nk, "half_split")), np.asarray(hs))
    assert quant.weight_shape(nk) == quant.weight_shape(hs) == (64, 24)
    with pytest.raises(ValueError, match="unknown weight layout 'kn'"):
        quant.to_weight_layout(hs, "kn")


def test_model_outputs_match_the_stored_layout(models):
    m, nk = models
    assert (m.weight_layout, nk.weight_layout) == ("half_split", "nk")
    toks = [[5, 17, 3, 99, 42, 7, 8, 1]]
    for mode in ("w4a16", "w4a8"):  # (w4a4 differs from w4a8 only in the activation bits)
        a = np.asarray(qj.logits(m, toks, mode=mode, kernels="xla"), np.float32)
        b = np.asarray(qj.logits(nk, toks, mode=mode, kernels="xla"), np.float32)
        np.testing.assert_array_equal(a, b)  # same integers, same XLA math


def test_qspec_is_lossless_in_the_nk_layout(models):
    _, nk = models
    prompts = ["def add(a, b):\n    return", "import os\n"]
    ar = qj.generate(nk, prompts, max_new_tokens=10, mode="w4a16")
    qs = qj.generate(nk, prompts, max_new_tokens=10, mode="qspec", gamma=3)
    assert qs.tokens == ar.tokens  # (the stored layout's logits are the same: test above)
    assert qs.stats["cycles"] > 0


def test_load_converts_in_place(models):
    m, nk = models
    loaded = qj.load(None, quant="w4", weight_layout="nk")
    assert loaded.weight_layout == "nk" and m.weight_layout == "half_split"
    for (pa, a), (pb, b) in zip(nnx.to_flat_state(loaded.state), nnx.to_flat_state(nk.state)):
        assert pa == pb and a[...].dtype == b[...].dtype
        np.testing.assert_array_equal(np.asarray(a[...].astype(jnp.float32)),
                                      np.asarray(b[...].astype(jnp.float32)))


def test_bad_layout_requests_are_rejected(models):
    m, _ = models
    with pytest.raises(ValueError, match="unknown weight_layout 'kn'"):
        qj.with_weight_layout(m, "kn")
    with pytest.raises(ValueError, match="unknown weight_layout"):
        qj.load(None, quant="w4", weight_layout="bad")
    with pytest.raises(ValueError, match="quantized models"):
        qj.with_weight_layout(qj.load(None), "nk")


def test_cpu_pallas_request_says_the_kernel_needs_a_gpu(models, caplog):
    _, nk = models
    kernel_dispatch._ANNOUNCED.discard(("nk-unavailable",))
    with caplog.at_level(logging.INFO, logger="qspec_jax"):
        out = qj.logits(nk, [[1, 2, 3]], mode="w4a16", kernels="pallas")
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert any("needs a GPU" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


WIDE = kernel_dispatch.MGPU_W4A16_WIDE_N + 64  # a w4a16 GEMM wider than the measured limit's
MID = kernel_dispatch.MGPU_W4A16_MID_N + 64   # between the two width limits (70B qkv: 10240)


@pytest.mark.parametrize("M,mode,N,expect", [
    (4, "w4a16", 128, True), (16, "w4a8", 128, True), (64, "w4a16", WIDE, True),
    (65, "w4a16", WIDE, False), (65, "w4a16", 128, True), (256, "w4a16", 128, True),
    (128, "w4a16", MID, True), (129, "w4a16", MID, False), (256, "w4a8", MID, True),
    (256, "w4a8", WIDE, True), (256, "w4a4", 128, True), (257, "w4a8", 128, False),
    (2, "w4a8_fp8", 128, False)])
def test_decode_gemms_lower_to_the_mosaic_kernel_on_gpu(monkeypatch, M, mode, N, expect):
    """With a GPU backend, GEMMs of an int4 [N, K] weight within kernel_dispatch.mgpu_max_m
    (draft modes up to 256 rows; w4a16 up to 256 but 64 for the widest GEMMs, gate/up, and 128
    for those between MGPU_W4A16_MID_N and MGPU_W4A16_WIDE_N columns, 70B qkv) are the
    Mosaic GPU custom call; wider ones (and modes without a kernel) XLA's dot."""
    K = 512
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(kernel_dispatch, "mgpu_unavailable", lambda: None)  # a pretend Hopper GPU
    nk = quant.to_weight_layout(jnp.zeros((K // 2, N), jnp.int8), "nk")
    s = jnp.ones((1, N), jnp.float32)
    f = jax.jit(lambda x, w, s: quantized_matmul(x, w, s, mode, "auto"))
    text = f.trace(jax.ShapeDtypeStruct((M, K), jnp.bfloat16), nk, s).lower(
        lowering_platforms=("cuda",)).as_text()
    assert ("mosaic_gpu" in text) == expect
    assert ("dot_general" in text) == (not expect)


@pytest.fixture(scope="module")
def grouped():
    return qj.load(None, quant="w4", group_size=32)


def test_group_scales_need_the_stored_layout(grouped):
    m = grouped
    with pytest.raises(ValueError, match="per-channel scales"):
        qj.with_weight_layout(m, "nk")


def test_auto_layout_keeps_the_stored_one_without_a_gpu(caplog):
    """load's default weight_layout="auto" on CPU: the stored layout, the reason logged once."""
    kernel_dispatch._ANNOUNCED.clear()
    with caplog.at_level(logging.INFO, logger="qspec_jax"):
        m = qj.load(None, quant="w4")
    assert m.weight_layout == "half_split"
    assert any("weight_layout='auto' -> 'half_split'" in r.getMessage() and "needs a GPU"
               in r.getMessage() for r in caplog.records)
    assert qj.load(None).weight_layout == "none"  # a 16-bit model: nothing to convert


def test_auto_layout_picks_nk_where_the_mosaic_kernel_runs(models, grouped, monkeypatch, caplog):
    """On a (pretend) Hopper GPU "auto" is nk for shapes the Mosaic kernel takes, and stays
    half_split for shapes it cannot take, group scales, or a GPU older than sm_90."""
    from experiments import sweep
    monkeypatch.setitem(sweep.SHAPED, "t256", dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, vocab_size=256))
    fits = sweep.random_model("t256", True, dtype=jnp.float32)
    odd = models[0]                                       # K = 384: not a multiple of 256
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")

    class Gpu:
        def __init__(self, cc):
            self.compute_capability = cc
    monkeypatch.setattr(jax, "devices", lambda *a: [Gpu("9.0")])
    assert qj.auto_weight_layout(fits) == ("nk", "the Mosaic GPU kernel runs the decode GEMMs")
    nk = qj.with_weight_layout(fits, "auto")
    assert nk.weight_layout == "nk" and fits.weight_layout == "half_split"
    layout, why = qj.auto_weight_layout(odd)
    assert layout == "half_split" and "K=384" in why and "layers.0" in why
    assert qj.with_weight_layout(odd, "auto").weight_layout == "half_split"
    assert qj.auto_weight_layout(grouped)[0] == "half_split"

    assert qj.auto_weight_layout(qj.load(None))[0] == "half_split"  # 16-bit: no int4 weights
    monkeypatch.setattr(jax, "devices", lambda *a: [Gpu("8.0")])
    layout, why = qj.auto_weight_layout(fits)
    assert layout == "half_split" and "Hopper" in why and "sm_80" in why
    monkeypatch.setattr(jax, "devices", lambda *a: [Gpu(None)])
    assert "no CUDA compute capability" in qj.auto_weight_layout(fits)[1]
    # A jax whose Mosaic GPU API the kernel does not fit: said once, with the error, no nk.
    from pallas_kernels import w4_mgpu

    def broken(*a, **k):
        raise TypeError("emit_pipeline() got an unexpected keyword argument")
    monkeypatch.setattr(jax, "devices", lambda *a: [Gpu("9.0")])
    monkeypatch.setattr(w4_mgpu, "w4_mgpu_matmul", broken)
    kernel_dispatch._mgpu_lowering_error.cache_clear()
    layout, why = qj.auto_weight_layout(fits)
    assert layout == "half_split" and "cannot lower it" in why and "emit_pipeline" in why
    assert w4_mgpu.OUT_MN is True  # (tried without the transposed store too, then restored)
    # A jax that rejects only the transposed partial-sum store (jax 0.11.2 at 949938e): the
    # kernel runs without it, said once.
    monkeypatch.undo()
    monkeypatch.setattr(w4_mgpu, "OUT_MN", True)
    real_matmul = w4_mgpu.w4_mgpu_matmul

    def no_transposed_store(*a, **k):
        if w4_mgpu.OUT_MN:
            raise ValueError("The 'memory_space' attribute is not available on traced array")
        return real_matmul(*a, **k)
    monkeypatch.setattr(w4_mgpu, "w4_mgpu_matmul", no_transposed_store)
    kernel_dispatch._mgpu_lowering_error.cache_clear()
    with caplog.at_level(logging.WARNING, logger="qspec_jax"):
        assert kernel_dispatch._mgpu_lowering_error() is None
    assert w4_mgpu.OUT_MN is False and "transposed partial-sum store" in caplog.text
    assert "memory_space" in caplog.text
    kernel_dispatch._mgpu_lowering_error.cache_clear()  # (the real kernel for later tests)


def test_in_place_conversion_converts_the_input():
    m = qj.load(None, quant="w4", weight_layout="half_split")
    m.cycle_costs["k"] = [1.0]
    assert qj.with_weight_layout(m, "half_split").cycle_costs == {"k": [1.0]}  # nothing changed
    out = qj.with_weight_layout(m, "nk", in_place=True)
    assert out is m and m.weight_layout == "nk" and m.cycle_costs == {}  # timed in the old layout
    with pytest.raises(ValueError, match="unknown weight_layout 'kn'.*auto"):
        qj.with_weight_layout(m, "kn")


def test_saving_int4_nk_weights_is_a_clear_error(models, tmp_path):
    """The checkpoint format is half-split int8: nk weights are refused before anything is written."""
    from conversion import checkpoint
    from qspec_jax.model import pure_dict
    _, nk = models
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="with_weight_layout\\(model, 'half_split'\\)"):
        checkpoint.save_converted(str(out), str(tmp_path), pure_dict(nk.state), jnp.bfloat16,
                                  nk.qcfg, {})
    assert not out.exists()
