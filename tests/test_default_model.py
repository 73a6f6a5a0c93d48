"""The shipped default model (qspec_jax/default_model): an HF Llama checkpoint that
transformers' LlamaForCausalLM loads and that gives the same logits as our model."""
import json
import os

import numpy as np
import pytest

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "qspec_jax",
                    "default_model")

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(PATH, "config.json")),
                                reason="default model not exported yet")


def _texts():
    from experiments import data as D
    return [D.test_set(1)[0].text, "def add(a, b):\n    return a + b\n",
            "Mia has 12 apples. Mia buys 7 more apples. How many apples does Mia have now?\n"]


def test_files_and_sizes():
    with open(os.path.join(PATH, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA
    inter = cfg["intermediate_size"]
    assert inter & (inter - 1)  # not a power of two
    with open(os.path.join(PATH, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert index["metadata"]["total_size"] <= 40 * 2**20
    for s in shards:
        assert os.path.getsize(os.path.join(PATH, s)) < 15 * 10**6
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(PATH, f))


def test_transformers_matches_our_model():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import jax.numpy as jnp

    tok = transformers.AutoTokenizer.from_pretrained(PATH)
    enc = [tok(t)["input_ids"] for t in _texts()]
    T = max(map(len, enc))
    ids = np.zeros((len(enc), T), np.int64)
    for i, e in enumerate(enc):
        ids[i, :len(e)] = e
    hf = transformers.LlamaForCausalLM.from_pretrained(PATH, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()

    try:
        import qspec_jax as qj
        model = qj.load(PATH, dtype="float32")
        ours = np.asarray(qj.logits(model, ids.astype(np.int32), mode="w16"))
    except ImportError:  # fall back on the exporter's own loader
        import jax
        from flax import nnx
        from experiments import train as Tr
        from qspec_jax.config import model_config_from_hf
        from qspec_jax.model import Transformer
        hfcfg, pure = Tr.load_hf_pure(PATH)
        m = Transformer(model_config_from_hf(hfcfg), dtype=jnp.float32, rngs=nnx.Rngs(0))
        g, s = nnx.split(m)
        nnx.replace_by_pure_dict(s, jax.tree_util.tree_map(jnp.asarray, pure))
        ours = np.asarray(Tr.forward_train(nnx.merge(g, s), jnp.asarray(ids, jnp.int32), "model"))
    for i, e in enumerate(enc):  # compare the real (unpadded) positions
        np.testing.assert_allclose(ours[i, :len(e)], ref[i, :len(e)], atol=2e-3, rtol=2e-3)
        assert (ours[i, :len(e)].argmax(-1) == ref[i, :len(e)].argmax(-1)).mean() > 0.99


def test_solves_held_out_problems_in_every_engine_mode():
    """Our engine on held-out problems (one per number of steps): the 16-bit model solves them,
    and QSpec on the 4-bit model reproduces w4a16 greedy decoding token for token."""
    import qspec_jax as qj
    from experiments import data as D

    problems = D.test_set(2)[::2]
    prompts = [p.prompt for p in problems]
    w16 = qj.generate(qj.load(PATH, dtype="float32"), prompts, max_new_tokens=96)
    assert sum(D.score(t, p) for t, p in zip(w16.text, problems)) >= len(problems) - 1
    q = qj.load(PATH, dtype="float32", quant="w4", method="rtn")
    verify = qj.generate(q, prompts, max_new_tokens=96, mode="w4a16")
    spec = qj.generate(q, prompts, max_new_tokens=96, mode="qspec", draft="w4a8", gamma=3)
    assert spec.tokens == verify.tokens
    assert spec.stats["acceptance_rate"] > 0.5
