"""CPU smoke run of experiments/train.py: a tiny model trains, evaluates and exports."""
import json
import os

import numpy as np
import pytest

from experiments import data as D
from experiments import train as T

TOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "qspec_jax",
                   "default_model")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    if not os.path.isfile(os.path.join(TOK, "tokenizer.json")):
        pytest.skip("qspec_jax/default_model/tokenizer.json is missing")
    out = tmp_path_factory.mktemp("smoke")
    report = T.main(["--smoke", "--out", str(out), "--tokenizer", TOK, "--steps", "24",
                     "--log-every", "4"])
    return report, str(out)


def test_loss_goes_down(smoke):
    report, _ = smoke
    losses = [h["loss"] for h in report["history"]]
    assert len(losses) == 6
    assert np.isfinite(losses).all()
    assert np.mean(losses[-2:]) < losses[0] - 1.0, losses


def test_report_and_export(smoke):
    report, out = smoke
    with open(os.path.join(out, "report.json")) as f:
        saved = json.load(f)
    assert saved["steps"] == 24
    assert set(saved["arithmetic"]["accuracy_by_steps"]) == {"2", "3", "4", "5", "6"}
    assert saved["perplexity"]["perplexity"] > 1
    hf = os.path.join(out, "hf")
    files = set(os.listdir(hf))
    assert {"config.json", "generation_config.json", "model.safetensors.index.json",
            "tokenizer.json", "tokenizer_config.json"} <= files
    with open(os.path.join(hf, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    for f in files:
        assert os.path.getsize(os.path.join(hf, f)) < 15 * 10**6


def test_export_round_trip_and_forward_paths(smoke):
    """Export -> import gives back the params; the training forward equals the model's call."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from qspec_jax.config import model_config_from_hf
    from qspec_jax.model import Transformer

    _, out = smoke
    hfcfg, pure = T.load_hf_pure(os.path.join(out, "hf"))
    cfg = model_config_from_hf(hfcfg)
    model = Transformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    g, s = nnx.split(model)
    nnx.replace_by_pure_dict(s, jax.tree_util.tree_map(jnp.asarray, pure))
    model = nnx.merge(g, s)
    tok = D.load_tokenizer(TOK)
    ids = jnp.asarray([tok.encode(D.test_set(1)[0].text).ids[:40]] * 2)
    a = np.asarray(T.forward_train(model, ids, "model"))
    b = np.asarray(T.forward_train(model, ids, "xla"))
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    # the bf16 writer rounds like jnp.astype(bfloat16)
    x = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    ref = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))
    path = os.path.join(out, "t.safetensors")
    T.write_safetensors(path, {"x": x})
    np.testing.assert_array_equal(T.read_safetensors(path)["x"], ref)
