"""qspec-convert: input formats, name/shape checks with one complete error, atomic output."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import qspec_jax as qj
from conversion.cli import main as convert_main
from conversion.convert import convert
from conversion.hf import CheckpointError
from qspec_jax.config import ConfigError

from hf_models import build_hf_model


def logits_of(path, ids, **kw):
    return np.asarray(qj.logits(qj.load(path, dtype="float32", **kw), ids))


IDS = np.arange(3, 15)[None]


def copy_config(src, dst):
    os.makedirs(dst, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), dst)


def test_convert_roundtrip_equals_direct_load(hf_dirs, tmp_path):
    src, _ = hf_dirs["qwen2"]
    out = tmp_path / "conv"
    assert convert_main([src, str(out), "--dtype", "float32"]) == 0
    meta = json.load(open(out / "qspec.json"))
    assert meta["dtype"] == "float32" and meta["quant"]["quant"] is None
    np.testing.assert_array_equal(logits_of(str(out), IDS), logits_of(src, IDS))


def test_sharded_safetensors(hf_dirs, tmp_path):
    _, model = hf_dirs["llama"]
    model.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) > 1
    np.testing.assert_array_equal(logits_of(str(tmp_path / "sharded"), IDS),
                                  logits_of(hf_dirs["llama"][0], IDS))


def test_pytorch_bin_bfloat16(hf_dirs, tmp_path):
    src, model = hf_dirs["mistral"]
    dst = tmp_path / "bin"
    copy_config(src, dst)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    torch.save(state, dst / "pytorch_model.bin")
    out = tmp_path / "conv"
    convert(str(dst), str(out), dtype="bfloat16")
    direct = qj.load(str(dst))
    ours = qj.load(str(out))
    np.testing.assert_array_equal(np.asarray(qj.logits(direct, IDS)), np.asarray(qj.logits(ours, IDS)))
    # bf16 values survive exactly: the embedding equals torch's bf16 tensor.
    emb = np.asarray(ours.state["embed"]["embedding"][...], np.float32)
    np.testing.assert_array_equal(emb, state["model.embed_tokens.weight"].float().numpy())


def _write_safetensors(dst, state):
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(dst, "model.safetensors"))


def test_all_tensor_problems_reported_at_once(hf_dirs, tmp_path):
    src, model = hf_dirs["llama"]
    dst = tmp_path / "bad"
    copy_config(src, dst)
    state = dict(model.state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.extra.weight"] = torch.zeros(3)
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 32)
    _write_safetensors(dst, state)
    with pytest.raises(CheckpointError) as e:
        convert(str(dst), str(tmp_path / "out"))
    msg = str(e.value)
    assert "missing tensors (1): model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected tensors (1): model.layers.0.extra.weight" in msg
    assert "model.layers.0.self_attn.q_proj.weight: checkpoint (64, 32) vs config (64, 64)" in msg
    assert not os.path.exists(tmp_path / "out")
    assert os.listdir(tmp_path) == ["bad"]  # no temporary folder left behind


def test_unknown_model_type_lists_supported(tmp_path):
    (tmp_path / "m").mkdir()
    json.dump({"model_type": "gpt2", "vocab_size": 10}, open(tmp_path / "m" / "config.json", "w"))
    with pytest.raises(ConfigError, match="unsupported model_type 'gpt2'.*llama, qwen2, mistral"):
        qj.load(str(tmp_path / "m"))


def test_unsupported_rope_and_fields(hf_dirs, tmp_path):
    src, _ = hf_dirs["llama"]
    cfg = json.load(open(os.path.join(src, "config.json")))
    for field, value, pattern in [("rope_parameters", {"rope_type": "yarn", "factor": 2.0}, "rope scaling type 'yarn'"),
                                  ("mlp_bias", True, "mlp_bias=True"),
                                  ("hidden_act", "gelu", "hidden_act 'gelu'")]:
        bad = {**cfg, field: value}
        with pytest.raises(ConfigError, match=pattern):
            qj.model_config_from_hf(bad)


def test_existing_output_needs_overwrite(hf_dirs, tmp_path):
    src, _ = hf_dirs["qwen2"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert convert_main([src, str(out)]) == 2
    assert (out / "keep.txt").read_text() == "user data"
    assert convert_main([src, str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "qspec.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_failed_conversion_leaves_existing_output_untouched(hf_dirs, tmp_path):
    src, model = hf_dirs["llama"]
    bad = tmp_path / "bad"
    copy_config(src, bad)
    state = dict(model.state_dict())
    del state["model.norm.weight"]
    _write_safetensors(bad, state)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        convert(str(bad), str(out), overwrite=True)
    assert os.listdir(out) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["bad", "out"]


def test_no_weights_error(hf_dirs, tmp_path):
    src, _ = hf_dirs["llama"]
    copy_config(src, tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no weights found"):
        qj.load(str(tmp_path / "empty"))


def test_mistral_sliding_window_shorter_than_cache(tmp_path):
    model = build_hf_model("mistral", sliding_window=16)
    model.save_pretrained(tmp_path / "m")
    loaded = qj.load(str(tmp_path / "m"), dtype="float32")
    out = qj.generate(loaded, [[3, 4, 5]], max_new_tokens=4)  # fits the window: allowed
    assert len(out.tokens[0]) == 4
    with pytest.raises(ConfigError, match="sliding_window=16.*holds 64 positions"):
        qj.generate(loaded, [[3, 4, 5]], max_new_tokens=40)
