"""Quantized models end to end: rotation exactness, mode behaviour, converted checkpoints."""

from __future__ import annotations

import json

import math

import numpy as np
import pytest

import qspec_jax as qj
from conversion.convert import convert

IDS = np.random.RandomState(0).randint(3, 128, (2, 14))


def rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_rotation_is_exact_in_w16(arch, hf_dirs):
    """QuaRot folded into the weights + online Hadamards = the same function (float32)."""
    plain = qj.logits(qj.load(hf_dirs[arch][0], dtype="float32"), IDS)
    rotated_model = qj.load(hf_dirs[arch][0], dtype="float32", rotate=True)
    assert rotated_model.qcfg.rotate and not rotated_model.qcfg.quantized
    # the per-head part of o_proj's online Hadamard sits in v_proj: heads mixed online only
    assert rotated_model.qcfg.rotate_v_heads
    assert rotated_model.module.layers[0].attn.rotate_heads_only
    assert rel(qj.logits(rotated_model, IDS), plain) < 2e-5


def test_rotation_without_the_v_head_fold(hf_dirs, tmp_path):
    """qj.load(rotate_v_heads=False) / qspec-convert --no-v-head-fold (and what settings saved
    before the field read as): v_proj as it is, the full online transform before o_proj; the
    same function. A converted checkpoint whose settings lack the field loads that way."""
    from conversion.cli import main as convert_main
    from qspec_jax.config import QuantConfig
    src = hf_dirs["llama"][0]
    plain = qj.logits(qj.load(src, dtype="float32"), IDS)
    old = qj.load(src, dtype="float32", rotate=True, rotate_v_heads=False)
    assert not old.qcfg.rotate_v_heads and not old.module.layers[0].attn.rotate_heads_only
    assert rel(qj.logits(old, IDS), plain) < 2e-5
    new = qj.load(src, dtype="float32", rotate=True)
    attn_old, attn_new = old.state["layers"][0]["attn"], new.state["layers"][0]["attn"]
    name = "v_proj" if "v_proj" in attn_old else "qkv_proj"  # (q, k, v fused: [q | k | v])
    v_old = np.asarray(attn_old[name]["kernel"][...])[:, -old.cfg.kv_size:]
    v_new = np.asarray(attn_new[name]["kernel"][...])[:, -new.cfg.kv_size:]
    assert not np.allclose(v_old, v_new, atol=1e-3)  # the fold changed v_proj
    np.testing.assert_allclose(np.asarray(attn_old[name]["kernel"][...])[:, :-old.cfg.kv_size],
                               np.asarray(attn_new[name]["kernel"][...])[:, :-new.cfg.kv_size],
                               atol=1e-6)  # q and k untouched
    assert QuantConfig.from_json({"quant": "w4", "rotate": True}).rotate_v_heads is False
    # a checkpoint written before the field: its settings lack it, its v_proj is unfolded
    # (written here with qspec-convert --no-v-head-fold, then the field taken out)
    out = tmp_path / "legacy"
    assert convert_main([src, str(out), "--dtype", "float32", "--quant", "w4", "--method", "rtn",
                         "--no-v-head-fold"]) == 0
    meta_path = out / "qspec.json"
    meta = json.load(open(meta_path))
    assert meta["quant"]["rotate"] and meta["quant"]["rotate_v_heads"] is False
    direct = qj.load(src, dtype="float32", quant="w4", method="rtn", rotate_v_heads=False)
    del meta["quant"]["rotate_v_heads"]
    json.dump(meta, open(meta_path, "w"))
    legacy = qj.load(str(out), dtype="float32")
    assert legacy.qcfg.rotate and not legacy.qcfg.rotate_v_heads
    assert not legacy.module.layers[0].attn.rotate_heads_only
    np.testing.assert_array_equal(np.asarray(qj.logits(legacy, IDS, mode="w4a16")),
                                  np.asarray(qj.logits(direct, IDS, mode="w4a16")))


def test_quantized_modes_track_w16(hf_dirs):
    src = hf_dirs["llama"][0]
    ref = np.asarray(qj.logits(qj.load(src, dtype="float32"), IDS))
    model = qj.load(src, dtype="float32", quant="w4", method="rtn")
    errs = {m: rel(qj.logits(model, IDS, mode=m), ref) for m in ("w4a16", "w4a8", "w4a4", "w4a8_fp8")}
    # Random tiny weights are hard to quantize; the point is the ordering and a sane size.
    assert errs["w4a16"] < 0.2 and errs["w4a8"] < 0.2
    assert errs["w4a8"] <= errs["w4a4"]
    # w4a8 on top of the same weights stays near w4a16 (8-bit activations are fine-grained).
    w4a16 = qj.logits(model, IDS, mode="w4a16")
    assert rel(qj.logits(model, IDS, mode="w4a8"), w4a16) < 0.05


def test_gptq_beats_rtn_on_model_output(hf_dirs):
    src = hf_dirs["llama"][0]
    ref = np.asarray(qj.logits(qj.load(src, dtype="float32"), IDS))
    calib = np.random.RandomState(1).randint(3, 128, 4096)
    errs = {}
    for method in ("rtn", "gptq"):
        model = qj.load(src, dtype="float32", quant="w4", method=method, rotate=False, calib=calib)
        errs[method] = rel(qj.logits(model, IDS, mode="w4a16"), ref)
    assert errs["gptq"] < errs["rtn"]


def test_mode_model_mismatch_errors(hf_dirs):
    q = qj.load(hf_dirs["llama"][0], dtype="float32", quant="w4", method="rtn")
    with pytest.raises(ValueError, match="mode 'w16' is not available for this quantized model"):
        qj.logits(q, IDS, mode="w16")
    with pytest.raises(ValueError, match="unknown mode 'w3a3'; valid modes"):
        qj.logits(q, IDS, mode="w3a3")
    with pytest.raises(ValueError, match="group_size G=48 does not divide the input size K=64"):
        qj.load(hf_dirs["llama"][0], dtype="float32", quant="w4", method="rtn", group_size=48)
    with pytest.raises(ValueError, match="unknown quant='w3'"):
        qj.load(hf_dirs["llama"][0], quant="w3")


def test_default_mode_follows_the_model(hf_dirs):
    """mode=None: a quantized model decodes with QSpec (as the CLI does; gamma="auto" by default)
    and its logits are verify mode's (w4a16); a 16-bit model uses w16."""
    q = qj.load(hf_dirs["llama"][0], dtype="float32", quant="w4", method="rtn")
    assert (q.default_mode(), q.default_mode(speculative=False)) == ("qspec", "w4a16")
    np.testing.assert_array_equal(np.asarray(qj.logits(q, IDS)), np.asarray(qj.logits(q, IDS, mode="w4a16")))
    prompts = [[5, 9, 14, 3], [7, 8]]
    out = qj.generate(q, prompts, max_new_tokens=6)  # gamma="auto": calibrated here, then run
    assert out.stats["mode"] == "qspec" and "acceptance_rate" in out.stats
    # gamma="auto" (max_gamma 7): a count per gamma 0..7, one per cycle (fixed gamma 3: 4 counts)
    assert len(out.stats["gamma_cycles"]) == 8
    assert sum(out.stats["gamma_cycles"]) == out.stats["cycles"] > 0
    assert out.tokens == qj.generate(q, prompts, max_new_tokens=6, mode="w4a16").tokens
    w16 = qj.load(hf_dirs["llama"][0], dtype="float32")
    assert w16.default_mode() == w16.default_mode(speculative=False) == "w16"
    assert qj.generate(w16, prompts, max_new_tokens=3).stats["mode"] == "w16"


@pytest.mark.parametrize("group_size", [None, 32])
def test_quantized_conversion_reloads_identically(hf_dirs, tmp_path, group_size):
    src = hf_dirs["qwen2"][0]
    out = tmp_path / "q"
    convert(src, str(out), dtype="float32", quant="w4", method="rtn", group_size=group_size)
    meta = json.load(open(out / "qspec.json"))
    assert meta["quant"] == {**meta["quant"], "quant": "w4", "method": "rtn", "rotate": True,
                             "group_size": group_size}
    assert meta["config_overrides"] == {"tie_word_embeddings": False}  # rotation unties lm_head
    direct = qj.load(src, dtype="float32", quant="w4", method="rtn", group_size=group_size)
    reloaded = qj.load(str(out), dtype="float32")
    for mode in ("w4a16", "w4a8"):
        np.testing.assert_array_equal(np.asarray(qj.logits(reloaded, IDS, mode=mode)),
                                      np.asarray(qj.logits(direct, IDS, mode=mode)))
    with pytest.raises(ValueError, match="already converted with other settings: group_size=64"):
        qj.load(str(out), group_size=64)
    with pytest.raises(ValueError, match="rotate=False"):
        qj.load(str(out), rotate=False)


def test_quality_report(hf_dirs):
    from qspec_jax.report import quality_report
    model = qj.load(hf_dirs["llama"][0], dtype="float32", quant="w4", method="rtn")
    ids = np.random.RandomState(2).randint(3, 128, 70)
    rep = quality_report(model, ids, window=32)
    assert set(rep) == {"w4a16", "w4a8", "w4a4", "w4a8_fp8"}
    assert rep["w4a16"]["greedy_agreement_vs_w4a16"] == 1.0
    # Independent check of the NLL for one mode.
    logits = np.asarray(qj.logits(model, np.stack([ids[:32], ids[32:64]]), mode="w4a8"), np.float64)
    targets = np.stack([ids[1:33], ids[33:65]])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1).mean()
    assert rep["w4a8"]["nll"] == pytest.approx(nll, rel=1e-6)
    assert rep["w4a8"]["tokens"] == 64


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_projections_equal_the_unfused_model(arch, hf_dirs, monkeypatch):
    """A loaded model runs q/k/v and gate/up as one GEMM each (qwen2: with the q/k/v biases);
    the same model assembled unfused (the checkpoint layout, one GEMM per projection) gives the
    same logits in every quantized mode, and QSpec the same tokens (the Pallas path runs the
    fused model in the tests below)."""
    from functools import partial

    from qspec_jax import api
    fused = qj.load(hf_dirs[arch][0], dtype="float32", quant="w4", method="rtn")
    layer = fused.module.layers[0]
    assert set(vars(layer.attn)) >= {"qkv_proj", "o_proj"} and not hasattr(layer.attn, "q_proj")
    assert hasattr(layer.mlp, "gate_up_proj") and not hasattr(layer.mlp, "up_proj")
    monkeypatch.setattr(api, "assemble", partial(api.assemble, fused=False))
    unfused = qj.load(hf_dirs[arch][0], dtype="float32", quant="w4", method="rtn")
    assert hasattr(unfused.module.layers[0].attn, "k_proj")
    for mode in ("w4a16", "w4a8", "w4a4"):
        a = np.asarray(qj.logits(fused, IDS, mode=mode, kernels="xla"))
        np.testing.assert_allclose(a, np.asarray(qj.logits(unfused, IDS, mode=mode, kernels="xla")),
                                   rtol=1e-5, atol=1e-5 * np.abs(a).max(), err_msg=mode)
    outs = [qj.generate(m, [list(IDS[0, :6])], max_new_tokens=8, mode="qspec", gamma=3).tokens
            for m in (fused, unfused)]
    assert outs[0] == outs[1]


def test_fuse_projections_rejects_incomplete_trees():
    from qspec_jax.model import fuse_projections
    lin = {"qweight": np.zeros((2, 4), np.int8), "scales": np.ones((1, 4), np.float32)}
    tree = {"layers": {0: {"attn": {"q_proj": lin, "k_proj": lin, "o_proj": lin},
                           "mlp": {"gate_proj": lin, "up_proj": lin, "down_proj": lin}}}}
    with pytest.raises(ValueError, match="layer 0 attn: cannot fuse, missing v_proj"):
        fuse_projections(tree)
    tree["layers"][0]["attn"]["v_proj"] = {"kernel": np.zeros((4, 4), np.float32)}
    with pytest.raises(ValueError, match="store different arrays"):
        fuse_projections(tree)
    tree["layers"][0]["attn"]["v_proj"] = lin
    out = fuse_projections(tree)["layers"][0]
    assert out["attn"]["qkv_proj"]["qweight"].shape == (2, 12) and "q_proj" not in out["attn"]
    assert out["mlp"]["gate_up_proj"]["scales"].shape == (1, 8) and "down_proj" in out["mlp"]
    assert "q_proj" in tree["layers"][0]["attn"]  # the input tree is left as it was


def test_pallas_kernels_in_the_model_match_xla(hf_dirs, caplog):
    """kernels="pallas" (interpret mode on CPU) through the whole model; the down_proj input
    size (96) is not a kernel shape, so that layer falls back with one warning."""
    import logging
    model = qj.load(hf_dirs["llama"][0], dtype="float32", quant="w4", method="rtn")
    ids = IDS[:1, :8]
    with caplog.at_level(logging.INFO, logger="qspec_jax"):
        for mode in ("w4a16", "w4a8", "w4a4"):
            ours = np.asarray(qj.logits(model, ids, mode=mode, kernels="pallas"))
            ref = np.asarray(qj.logits(model, ids, mode=mode, kernels="xla"))
            assert rel(ours, ref) < 1e-5, mode
    assert "Pallas GEMM cannot take K=96" in caplog.text
    assert caplog.text.count("Pallas GEMM cannot take K=96") == 1
    with pytest.raises(ValueError, match="unknown kernels='cuda'"):
        qj.logits(model, ids, mode="w4a16", kernels="cuda")


@pytest.mark.parametrize("arch, rotate, dtype", [("llama", True, "float32"),
                                                 ("qwen2", False, "float32"),
                                                 ("llama", True, "bfloat16")])
def test_norm_scale_fold_in_verify_mode(arch, rotate, dtype, hf_dirs, monkeypatch):
    """quant.NORM_SCALE_FOLD: the w4a16 GEMMs after each RMSNorm read the residual stream (times
    the gains where no rotation folded them: qwen2 unrotated, with q/k/v biases) and scale their
    output rows by the norm's factor instead. The same function: float32 logits equal up to
    rounding on the XLA and the Pallas (interpret) paths, bfloat16 within its rounding (the
    normalized input is no longer rounded to bf16); the draft modes are untouched; greedy
    tokens unchanged and QSpec still exactly verify mode's."""
    import jax

    from qspec_jax import quant
    model = qj.load(hf_dirs[arch][0], dtype=dtype, quant="w4", method="rtn", rotate=rotate)
    assert model.module.layers[0].gains_folded == rotate
    ids, prompts = IDS[:1, :8], [list(IDS[0, :6]), list(IDS[1, :4])]
    kinds = ("xla", "pallas") if dtype == "float32" else ("xla",)
    base = {k: np.asarray(qj.logits(model, ids, mode="w4a16", kernels=k), np.float32) for k in kinds}
    draft = np.asarray(qj.logits(model, ids, mode="w4a8"))
    ref = qj.generate(model, prompts, max_new_tokens=8, mode="w4a16").tokens
    from qspec_jax import model as model_module
    calls, normed = [], model_module.NormedInput
    monkeypatch.setattr(model_module, "NormedInput", lambda *a: calls.append(1) or normed(*a))
    monkeypatch.setattr(quant, "NORM_SCALE_FOLD", True)
    jax.clear_caches()  # the flag is read while tracing
    try:
        for k, b in base.items():
            got = np.asarray(qj.logits(model, ids, mode="w4a16", kernels=k), np.float32)
            assert rel(got, b) < (1e-5 if dtype == "float32" else 3e-2), k
        assert calls  # the folded path ran
        np.testing.assert_array_equal(np.asarray(qj.logits(model, ids, mode="w4a8")), draft)
        out = qj.generate(model, prompts, max_new_tokens=8, mode="w4a16").tokens
        spec = qj.generate(model, prompts, max_new_tokens=8, mode="qspec", gamma=3).tokens
    finally:
        monkeypatch.setattr(quant, "NORM_SCALE_FOLD", False)
        jax.clear_caches()  # no folded program outlives the test
    assert spec == out
    if dtype == "float32":
        assert out == ref


def test_norm_scale_fold_auto_takes_single_rows(hf_dirs, monkeypatch):
    """quant.NORM_SCALE_FOLD = "auto" (the default) folds the norm for inputs of at most
    NORM_SCALE_FOLD_MAX_ROWS rows (batch-1 decode steps: measured faster on the H200) and not for
    wider ones (prefill, verify passes, batch 16: slower); QSpec stays exactly verify mode's."""
    import jax

    from qspec_jax import quant
    assert quant.NORM_SCALE_FOLD == "auto" and quant.NORM_SCALE_FOLD_MAX_ROWS >= 1
    assert quant.norm_scale_fold(1) and not quant.norm_scale_fold(quant.NORM_SCALE_FOLD_MAX_ROWS + 1)
    model = qj.load(hf_dirs["llama"][0], dtype="float32", quant="w4", method="rtn", rotate=True)
    from qspec_jax import model as model_module
    calls, normed = [], model_module.NormedInput
    monkeypatch.setattr(model_module, "NormedInput",
                        lambda x, f: calls.append(x.shape) or normed(x, f))
    jax.clear_caches()  # the choice is made while tracing
    try:
        qj.logits(model, IDS[:1, :8], mode="w4a16")
        assert not calls  # 8 rows: the plain norm
        qj.logits(model, IDS[:1, :1], mode="w4a16")
        assert calls and all(math.prod(s[:-1]) == 1 for s in calls)
        prompts = [list(IDS[0, :6])]
        out = qj.generate(model, prompts, max_new_tokens=8, mode="w4a16").tokens
        spec = qj.generate(model, prompts, max_new_tokens=8, mode="qspec", gamma=3).tokens
        monkeypatch.setattr(quant, "NORM_SCALE_FOLD", False)
        jax.clear_caches()
        plain = qj.generate(model, prompts, max_new_tokens=8, mode="w4a16").tokens
    finally:
        jax.clear_caches()
    assert spec == out == plain


def test_fused_norm_quant_in_the_draft_modes(tmp_path, monkeypatch, caplog):
    """kernels="pallas" in w4a8/w4a4 (hidden size 128, a kernel shape): each RMSNorm and the
    per-token quantization of its output run as one fused kernel: the first layer's as
    rmsnorm_quant, every later one with the residual add before it (residual_norm with bits,
    2L - 1 per forward); the o_proj and down_proj inputs' quantization as row_quant (2 per
    layer); the quantized layers take each (xq, sx) as it is; logits as the XLA path's (which
    quantizes each layer's input itself; in bfloat16 a few values may round one step apart).
    Not under "auto" until measured faster on the H200 (kernel_dispatch.NORM_QUANT_AUTO,
    RESIDUAL_NORM), never in w4a16."""
    import logging

    import jax.numpy as jnp
    from hf_models import build_hf_model
    from pallas_kernels import residual_norm as rn
    from pallas_kernels import rmsnorm_quant as rq
    from qspec_jax import kernel_dispatch
    from qspec_jax.layers import QuantizedInput
    path = tmp_path / "h128"
    build_hf_model("llama", hidden_size=128, intermediate_size=256).save_pretrained(path)
    model = qj.load(str(path), dtype="float32", quant="w4", method="rtn")
    real, calls = rq.rmsnorm_quant, []
    monkeypatch.setattr(rq, "rmsnorm_quant", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    real_rn, rn_calls = rn.residual_norm, []
    monkeypatch.setattr(rn, "residual_norm",
                        lambda *a, **k: rn_calls.append(k.get("bits")) or real_rn(*a, **k))
    real_row, row_calls = rq.row_quant, []
    monkeypatch.setattr(rq, "row_quant", lambda x, bits, prologue="none", **k:
                        row_calls.append((bits, prologue)) or real_row(x, bits, prologue, **k))
    ids = IDS[:1, :6]
    L = model.cfg.num_hidden_layers
    with caplog.at_level(logging.INFO, logger="qspec_jax"):
        for mode, bits in (("w4a8", 8), ("w4a4", 4)):
            ours = np.asarray(qj.logits(model, ids, mode=mode, kernels="pallas"))
            ref = np.asarray(qj.logits(model, ids, mode=mode, kernels="xla"))
            assert calls[-1:] == [bits] and rn_calls[-(2 * L - 1):] == [bits] * (2 * L - 1), mode
            assert row_calls[-2 * L:] == [(bits, "none")] * (2 * L), mode  # after the Hadamard
            assert rel(ours, ref) < 1e-5, mode  # float32: the same quantized values
        n, n_rn = len(calls), len(rn_calls)
        qj.logits(model, ids, mode="w4a16", kernels="pallas")
        assert len(calls) == n and rn_calls[n_rn:] == [None] * (2 * L - 1)  # bf16 norms
        qj.logits(model, ids, mode="w4a8", kernels="auto")  # CPU: the XLA path
        assert len(calls) == n and len(rn_calls) == n_rn + 2 * L - 1
        assert not kernel_dispatch.NORM_QUANT_AUTO and not kernel_dispatch.RESIDUAL_NORM
    assert "fused Pallas kernel (interpret mode: no GPU)" in caplog.text
    # Unrotated, down_proj's input comes straight from the fused gate_up output ("swiglu").
    plain = qj.load(str(path), dtype="float32", quant="w4", method="rtn", rotate=False)
    for m, prologues in ((plain, ["none", "swiglu"]),):
        for mode, bits in (("w4a8", 8), ("w4a4", 4)):
            row_calls.clear()
            ours = np.asarray(qj.logits(m, ids, mode=mode, kernels="pallas"))
            ref = np.asarray(qj.logits(m, ids, mode=mode, kernels="xla"))
            assert row_calls == [(bits, p) for p in prologues] * L, (mode, row_calls)
            assert rel(ours, ref) < 1e-5, mode
    # A pre-quantized input through one layer (XLA path) = the layer quantizing it itself.
    lin = model.module.layers[0].attn.qkv_proj
    x = jnp.asarray(np.random.RandomState(0).randn(3, 128), jnp.float32)
    from qspec_jax.quant import quantize_activations
    xq, sx = quantize_activations(x, 8)
    np.testing.assert_array_equal(np.asarray(lin(QuantizedInput(xq, sx, x.dtype), "w4a8")),
                                  np.asarray(lin(x, "w4a8")))
    with pytest.raises(ValueError, match="pre-quantized input needs a quantized layer in mode"):
        lin(QuantizedInput(xq, sx, x.dtype), "w4a16")


def test_fused_quant_kinds_gate_auto_separately(monkeypatch):
    """Under kernels="auto" on a GPU each fused quantization kind runs only once listed in
    NORM_QUANT_AUTO (measured faster); "pallas" forces every kind, "xla" none."""
    from qspec_jax import kernel_dispatch as kd
    monkeypatch.setattr(kd.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(kd, "NORM_QUANT_AUTO", frozenset({"swiglu"}))
    run = {k: kd._fused_quant_interpret("auto", 4096, k) for k in kd.FUSED_QUANT_KINDS}
    assert run == {"rmsnorm": None, "none": None, "swiglu": False}  # False: not interpret mode
    assert kd._fused_quant_interpret("pallas", 4096, "rmsnorm") is False
    assert kd._fused_quant_interpret("xla", 4096, "swiglu") is None
    assert kd._fused_quant_interpret("pallas", 4100, "none") is None  # not a multiple of 128


def test_act_quant_in_gemm_in_the_draft_modes(hf_dirs, monkeypatch):
    """kernel_dispatch.ACT_QUANT_IN_GEMM (off by default: slower on the H200): the int8 kernel
    takes the float activations and quantizes them itself (bits=8 / 4); logits equal the XLA
    path's, and every draft GEMM call passes ``bits``."""
    import importlib
    from qspec_jax import kernel_dispatch
    pk = importlib.import_module("pallas_kernels")
    real, bits_seen = pk.w4a8_matmul, []
    monkeypatch.setattr(pk, "w4a8_matmul",
                        lambda *a, **k: bits_seen.append(k.get("bits")) or real(*a, **k))
    monkeypatch.setattr(kernel_dispatch, "ACT_QUANT_IN_GEMM", True)
    model = qj.load(hf_dirs["llama"][0], dtype="float32", quant="w4", method="rtn")
    ids = IDS[:2, :5]
    for mode, bits in (("w4a8", 8), ("w4a4", 4)):
        bits_seen.clear()
        ours = np.asarray(qj.logits(model, ids, mode=mode, kernels="pallas"))
        ref = np.asarray(qj.logits(model, ids, mode=mode, kernels="xla"))
        assert bits_seen and set(bits_seen) == {bits}, (mode, bits_seen)
        assert rel(ours, ref) < 1e-5, mode


def test_small_m_default_in_the_model_matches_xla(hf_dirs):
    """One-token decode steps (M = 1) take the small-M MMA default (inline-PTX nibbles; f32
    activations fall back to conversions) in w4a16 and the int8 kernel, quantizing its input
    itself, in w4a8: same logits as the XLA reference."""
    import importlib
    w16mod = importlib.import_module("pallas_kernels.w4a16_matmul")
    assert w16mod.default_config(1, 256, 128, 256).dequant == "asm"
    model = qj.load(hf_dirs["llama"][0], dtype="float32", quant="w4", method="rtn")
    ids = IDS[:1, :1]
    for mode in ("w4a16", "w4a8"):
        ours = np.asarray(qj.logits(model, ids, mode=mode, kernels="pallas"))
        ref = np.asarray(qj.logits(model, ids, mode=mode, kernels="xla"))
        assert rel(ours, ref) < 1e-5, mode


def test_pallas_attention_in_the_model(hf_dirs, caplog):
    """Decoding through the cache with kernels="pallas" (GEMMs and attention, interpret mode):
    same greedy tokens as the XLA path."""
    import logging
    from qspec_jax import kernel_dispatch
    kernel_dispatch._ANNOUNCED.clear()
    model = qj.load(hf_dirs["llama"][0], dtype="float32", quant="w4", method="rtn")
    prompts = [[5, 6, 7, 8], [9, 10]]
    ref = qj.generate(model, prompts, max_new_tokens=5, mode="w4a8", kernels="xla")
    with caplog.at_level(logging.INFO, logger="qspec_jax"):
        out = qj.generate(model, prompts, max_new_tokens=5, mode="w4a8", kernels="pallas")
    assert "attention uses the Pallas kernel" in caplog.text
    assert out.tokens == ref.tokens


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_int4_lm_head_option(hf_dirs, arch):
    src = hf_dirs[arch][0]
    plain = qj.load(src, dtype="float32", quant="w4", method="rtn", rotate=False)
    q = qj.load(src, dtype="float32", quant="w4", method="rtn", rotate=False, quantize_lm_head=True)
    assert "qweight" in q.state["lm_head"] and q.qcfg.quantize_lm_head
    assert "lm_head" not in plain.state or "kernel" in plain.state["lm_head"]
    ref = np.asarray(qj.logits(plain, IDS, mode="w4a16"))
    got = np.asarray(qj.logits(q, IDS, mode="w4a16"))
    assert 0 < rel(got, ref) < 0.2  # the head is quantized too, but still close
    with pytest.raises(ValueError, match="quantize_lm_head needs quant='w4'"):
        qj.load(src, quantize_lm_head=True)


def _prefilled(hf_dirs, arch="llama", mode="w4a16", B=2, S=32):
    """(model, its module, a cache of S positions holding 9 prefilled tokens per sequence,
    ragged starts [6, 9]) for the read-only forward tests."""
    import jax.numpy as jnp
    from qspec_jax.model import KVCache
    model = qj.load(hf_dirs[arch][0], dtype="float32", quant="w4", method="rtn")
    net = model.module
    cache = KVCache.create(model.cfg, B, S, jnp.float32)
    _, cache = net(jnp.asarray(IDS[:, :9]), cache, jnp.zeros((B,), jnp.int32), mode=mode)
    return model, net, cache, jnp.array([6, 9], jnp.int32)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_readonly_cache_forward_matches_writing_forward(hf_dirs, arch):
    """readonly_cache=True (the verify pass inside gamma="auto"'s switch): same logits as the
    writing forward, the cache untouched, and the returned K/V blocks equal to what the writing
    forward stores; stale cache entries at and past each sequence's start are ignored."""
    import jax
    import jax.numpy as jnp
    from qspec_jax.model import KVCache
    B, S, T = 2, 32, 4
    model, net, cache, start = _prefilled(hf_dirs, arch)
    # Stale entries past each start (as drafts leave them): must not matter.
    junk = jax.random.normal(jax.random.key(0), cache.k.shape, jnp.float32)
    pos = jnp.arange(S)[None, None, None, :, None]
    stale = pos >= start[None, :, None, None, None]
    cache = KVCache.of(jnp.where(stale, junk, cache.k), jnp.where(stale, -junk, cache.v))
    tokens = jnp.asarray(IDS[:, 9:9 + T])
    ref_logits, written = net(tokens, cache, start, mode="w4a16")
    logits, (k_blk, v_blk) = net(tokens, cache, start, mode="w4a16", readonly_cache=True)
    assert rel(np.asarray(logits), np.asarray(ref_logits)) < 1e-5
    L, KVH, hd = model.cfg.num_hidden_layers, model.cfg.num_key_value_heads, model.cfg.head_dim
    assert k_blk.shape == (L, B, KVH, T, hd)
    for b in range(B):
        s = int(start[b])
        for blk, full in ((k_blk, written.k), (v_blk, written.v)):
            # Layer 0 sees only embeddings: identical; later layers differ by float summation
            # order in the attention before them.
            np.testing.assert_array_equal(np.asarray(blk[0, b]), np.asarray(full[0, b, :, s:s + T]))
            np.testing.assert_allclose(np.asarray(blk[:, b]), np.asarray(full[:, b, :, s:s + T]),
                                       rtol=1e-4, atol=1e-5)
    # A layer subset (draft_layers under gamma="auto"): the writing forward's logits; skipped
    # layers give zero blocks.
    ro, (k_sub, _) = net(tokens, cache, start, mode="w4a16", readonly_cache=True, layers=(0,))
    wr, _ = net(tokens, cache, start, mode="w4a16", layers=(0,))
    assert rel(np.asarray(ro), np.asarray(wr)) < 1e-5
    np.testing.assert_array_equal(np.asarray(k_sub[0]), np.asarray(k_blk[0]))
    assert not np.any(np.asarray(k_sub[1:]))
    # Windowed attention (draft_window under gamma="auto"): windows that cut into the cache
    # (1 + 3: even into the new block, whose last token sees only itself and 2 before it) give
    # the writing windowed forward's logits, and differ from full attention.
    for window in ((1, 3), (2, 5)):
        ro, _ = net(tokens, cache, start, mode="w4a16", readonly_cache=True, window=window)
        wr, _ = net(tokens, cache, start, mode="w4a16", window=window)
        assert rel(np.asarray(ro), np.asarray(wr)) < 1e-5, window
        assert rel(np.asarray(ro), np.asarray(ref_logits)) > 1e-3, window


@pytest.mark.parametrize("kernels, window", [("xla", None), ("pallas", None), ("xla", (1, 2)),
                                             ("pallas", (2, 3))])
def test_readonly_draft_steps_with_a_prefix_block(hf_dirs, kernels, window):
    """gamma="auto"'s read-only draft steps: token i of a cycle sees the cache below the cycle's
    start plus the K/V of the tokens drafted before it, kept in a prefix block (first n of P
    slots valid, the rest junk), never in the cache. Same logits and K/V as one-token writing
    forwards that store each token in the cache first (ragged starts, stale cache entries);
    with a draft window, windowed the same way (windows shorter than the cycle cut into the
    prefix block too)."""
    import jax
    import jax.numpy as jnp
    from qspec_jax.model import KVCache
    B, S, P = 2, 32, 3
    model, net, cache, start = _prefilled(hf_dirs, mode="w4a8")
    junk = jax.random.normal(jax.random.key(1), cache.k.shape, jnp.float32)
    stale = jnp.arange(S)[None, None, None, :, None] >= start[None, :, None, None, None]
    ro_cache = KVCache.of(jnp.where(stale, junk, cache.k), jnp.where(stale, junk, cache.v))
    shape = (model.cfg.num_hidden_layers, B, model.cfg.num_key_value_heads, P, model.cfg.head_dim)
    bk, bv = (jax.random.normal(jax.random.key(k), shape, jnp.float32) for k in (2, 3))  # junk
    writing = ro_cache
    for i in range(P):
        tok = jnp.asarray(IDS[:, 9 + i:10 + i])
        ref, writing = net(tok, writing, start + i, mode="w4a8", window=window)
        got, (k_new, v_new) = net(tok, ro_cache, start + i, mode="w4a8", readonly_cache=True,
                                  prefix=(bk, bv, jnp.int32(i)), kernels=kernels, window=window)
        assert rel(np.asarray(got), np.asarray(ref)) < 1e-5, i
        for b in range(B):
            np.testing.assert_allclose(np.asarray(k_new[:, b, :, 0]),
                                       np.asarray(writing.k[:, b, :, int(start[b]) + i]),
                                       rtol=1e-4, atol=1e-5)
        bk, bv = bk.at[:, :, :, i].set(k_new[:, :, :, 0]), bv.at[:, :, :, i].set(v_new[:, :, :, 0])
    with pytest.raises(ValueError, match="prefix blocks are for read-only forwards"):
        net(tok, ro_cache, start, mode="w4a8", prefix=(bk, bv, 0))


def test_readonly_forward_with_the_attention_kernel(hf_dirs, monkeypatch):
    """kernels="pallas": the read-only verify forward runs the Pallas attention kernel over the
    cache (with its log-sum-exp, merged with the new block's attention) and gives the writing
    forward's logits."""
    import jax.numpy as jnp
    from pallas_kernels import attention as pk_attention
    T = 4
    model, net, cache, start = _prefilled(hf_dirs)
    tokens = jnp.asarray(IDS[:, 9:9 + T])
    real, calls = pk_attention.cached_attention, []
    monkeypatch.setattr(pk_attention, "cached_attention",
                        lambda *a, **kw: calls.append(kw.get("return_lse")) or real(*a, **kw))
    ref_logits, _ = net(tokens, cache, start, mode="w4a16")
    logits, _ = net(tokens, cache, start, mode="w4a16", readonly_cache=True, kernels="pallas")
    assert calls and all(calls) and len(calls) == model.cfg.num_hidden_layers
    assert rel(np.asarray(logits), np.asarray(ref_logits)) < 1e-5
