"""Hadamard matrices, the fast online transform, and exactness of the QuaRot folding on a
float64 NumPy Llama-like block stack (no dependency on the real model)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qspec_jax import rotation


# ----------------------------------------------------------------------------- matrices


@pytest.mark.parametrize("n,kind", [(1, "sylvester"), (64, "sylvester"), (12, "paley1"),
                                    (20, "paley1"), (28, "paley2"), (36, "paley2"),
                                    (96, "paley1"), (80, "paley1"), (52, "dct"), (6, "dct"),
                                    (7, "dct")])
def test_hadamard_matrix_orthogonal(n, kind):
    h = rotation.hadamard_matrix(n)
    np.testing.assert_allclose(h @ h.T, n * np.eye(n), atol=1e-9)
    assert rotation._decompose(n)[2] == kind
    assert rotation.has_hadamard(n) == (kind != "dct")
    if kind != "dct":
        np.testing.assert_array_equal(np.abs(h), 1.0)


def test_llm_sizes_use_small_blocks():
    assert rotation._decompose(14336) == (28, 512, "paley2")
    assert rotation._decompose(11008) == (43, 256, "dct")  # 172 has no Paley construction
    assert rotation._decompose(4096) == (1, 4096, "sylvester")
    assert rotation._decompose(896) == (28, 32, "paley2")


@pytest.mark.parametrize("impl", rotation.HADAMARD_IMPLS)
@pytest.mark.parametrize("n", [64, 12 * 8, 28 * 16, 20 * 4, 3 * 64, 52, 6, 2048])
def test_online_hadamard_matches_dense(n, impl, monkeypatch):
    monkeypatch.setattr(rotation, "DENSE_STAGE", 32)  # several Sylvester factors at small n
    x = np.random.default_rng(n).standard_normal((2, 3, n))
    dense = x @ rotation.hadamard_matrix(n) / math.sqrt(n)
    y = jax.jit(lambda v: rotation.online_hadamard(v, impl))(jnp.asarray(x, jnp.float32))
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(y, dense, atol=2e-6)
    np.testing.assert_allclose(rotation.hadamard_transform_np(x), dense, atol=1e-12)


def test_online_hadamard_large_and_bf16():
    n = 14336
    x = np.random.default_rng(0).standard_normal((2, n))
    online = jax.jit(rotation.online_hadamard)
    y = np.asarray(online(jnp.asarray(x, jnp.float32)), np.float64)
    np.testing.assert_allclose(y, rotation.hadamard_transform_np(x), atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    yb = online(jnp.asarray(x, jnp.bfloat16))
    assert yb.dtype == jnp.bfloat16


def test_dense_hadamard_equals_the_butterfly_in_bf16():
    """The GEMM form (the bf16 input straight into the first GEMM) gives the butterfly's bf16
    values up to the last bit of a few elements (float32 summation order), at the 8B widths."""
    for n in (14336, 4096):
        xb = jnp.asarray(np.random.default_rng(n).standard_normal((3, n)), jnp.bfloat16)
        exact = rotation.hadamard_transform_np(np.asarray(xb, np.float64))
        ys = {i: np.asarray(jax.jit(lambda v, i=i: rotation.online_hadamard(v, i))(xb), np.float64)
              for i in rotation.HADAMARD_IMPLS}
        assert np.mean(ys["dense"] == ys["butterfly"]) > 0.999
        for y in ys.values():  # both within bf16 rounding of the exact transform
            np.testing.assert_allclose(y, exact, rtol=2 ** -8, atol=1e-6)
    with pytest.raises(ValueError, match="unknown Hadamard implementation 'fft'"):
        rotation.online_hadamard(xb, "fft")


# ----------------------------------------------------------------------------- reference model


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    vocab_size: int = 40
    num_layers: int = 2
    qkv_bias: bool = False


def _random_params(cfg, seed):
    """Pure-dict tree in the DESIGN.md layout with non-trivial norm gains, float64."""
    rng = np.random.default_rng(seed)
    d, f = cfg.hidden_size, cfg.intermediate_size
    n_q, n_kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim

    def lin(k, n, bias=False):
        out = {"kernel": rng.standard_normal((k, n)) / math.sqrt(k)}
        return {**out, "bias": rng.standard_normal(n) * 0.1} if bias else out

    def gain():
        return {"scale": rng.uniform(0.5, 1.5, d)}

    params = {"embed": {"embedding": rng.standard_normal((cfg.vocab_size, d))},
              "layers": {i: {"attn_norm": gain(),
                             "attn": {"q_proj": lin(d, n_q, cfg.qkv_bias),
                                      "k_proj": lin(d, n_kv, cfg.qkv_bias),
                                      "v_proj": lin(d, n_kv, cfg.qkv_bias),
                                      "o_proj": lin(n_q, d)},
                             "mlp_norm": gain(),
                             "mlp": {"gate_proj": lin(d, f), "up_proj": lin(d, f),
                                     "down_proj": lin(f, d)}}
                         for i in range(cfg.num_layers)},
              "final_norm": gain()}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = lin(d, cfg.vocab_size)
    return params


def _rms_norm(x, scale, eps=1e-6):
    return x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + eps) * scale


def _linear(x, lin):
    return x @ lin["kernel"] + lin.get("bias", 0.0)


def _attention(x, attn, cfg):
    """Causal softmax attention with grouped KV heads, no position encoding: [T, H * hd]."""
    t, hd = x.shape[0], cfg.head_dim
    q = _linear(x, attn["q_proj"]).reshape(t, cfg.num_attention_heads, hd)  # [T, H, hd]
    k = _linear(x, attn["k_proj"]).reshape(t, cfg.num_key_value_heads, hd)
    v = _linear(x, attn["v_proj"]).reshape(t, cfg.num_key_value_heads, hd)
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)  # [T, H, hd]
    scores = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)  # [H, T, T]
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", probs, v).reshape(t, -1)


def _forward(params, cfg, tokens, rotated, v_heads=False):
    """Logits [T, V]; a rotated model applies the online Hadamard before o_proj/down_proj (with
    v_heads before o_proj only its across-heads factor A, H_n = A kron S_hd)."""
    def online(a):
        n = a.shape[-1]
        return a @ rotation.hadamard_matrix(n) / math.sqrt(n) if rotated else a

    def online_o(a):
        if not v_heads:
            return online(a)
        n, hd = a.shape[-1], cfg.head_dim
        h_n = rotation.hadamard_matrix(n)
        across = h_n[::hd, ::hd]  # A, since H_n = A kron S_hd and S_hd[0, 0] = 1
        np.testing.assert_array_equal(np.kron(across, rotation.hadamard_matrix(hd)), h_n)
        x = a.reshape(a.shape[0], n // hd, hd)
        return np.einsum("tad,ac->tcd", x, across).reshape(a.shape) / math.sqrt(n // hd)

    h = params["embed"]["embedding"][tokens]  # [T, D]
    for layer in params["layers"].values():
        a = _attention(_rms_norm(h, layer["attn_norm"]["scale"]), layer["attn"], cfg)
        h = h + _linear(online_o(a), layer["attn"]["o_proj"])
        m = _rms_norm(h, layer["mlp_norm"]["scale"])
        gate = _linear(m, layer["mlp"]["gate_proj"])
        act = gate / (1.0 + np.exp(-gate)) * _linear(m, layer["mlp"]["up_proj"])
        h = h + _linear(online(act), layer["mlp"]["down_proj"])
    lm_head = params.get("lm_head", {"kernel": params["embed"]["embedding"].T})
    return _rms_norm(h, params["final_norm"]["scale"]) @ lm_head["kernel"]


CONFIGS = [
    # residual 48 = 12 x 4 (Paley I), heads 48, intermediate 80 = 20 x 4; untied.
    TinyConfig(48, 80, 4, 2, 12, tie_word_embeddings=False),
    # residual 10: random orthogonal; heads 12 (Paley I); intermediate 52 = 13 x 4 (DCT);
    # tied embedding, q/k/v biases (Qwen2-like).
    TinyConfig(10, 52, 2, 1, 6, tie_word_embeddings=True, qkv_bias=True),
    # all powers of two, intermediate 28 x 4 (Paley II); heads 4 x 8: S_8 folded into v_proj.
    TinyConfig(32, 112, 4, 4, 8, tie_word_embeddings=False, num_layers=1),
    # heads 24 x 4 = 96 = 12 x 8 (Paley I): S_4 into v_proj (with its bias), B_12 kron S_2 online;
    # 3 query heads per KV head.
    TinyConfig(24, 80, 24, 8, 4, tie_word_embeddings=False, qkv_bias=True),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_rotation_is_exact_in_float64(cfg):
    params = _random_params(cfg, seed=cfg.hidden_size)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, 7)
    ref = _forward(params, cfg, tokens, rotated=False)
    fold_ok = rotation.v_head_fold_ok(cfg.num_attention_heads * cfg.head_dim, cfg.head_dim)
    assert fold_ok == (cfg.head_dim in (4, 8))
    for v_heads in (False, True):
        rotated, notes = rotation.rotate_params(params, cfg, seed=3, v_heads=v_heads)
        assert notes["v_heads"] == (v_heads and fold_ok)
        out = _forward(rotated, cfg, tokens, rotated=True, v_heads=notes["v_heads"])
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-10 * np.abs(ref).max())
        assert notes["untied_lm_head"] == cfg.tie_word_embeddings
        assert "lm_head" in rotated
    # the jnp transform the model runs: online_hadamard_heads(x S per head) == online_hadamard(x)
    if fold_ok:
        n, hd = cfg.num_attention_heads * cfg.head_dim, cfg.head_dim
        x = np.random.default_rng(2).standard_normal((3, n)).astype(np.float32)
        xs = (x.reshape(3, -1, hd) @ rotation.hadamard_matrix(hd) / math.sqrt(hd)).reshape(3, n)
        got = np.asarray(rotation.online_hadamard_heads(jnp.asarray(xs, jnp.float32), hd))
        np.testing.assert_allclose(got, x @ rotation.hadamard_matrix(n) / math.sqrt(n), atol=1e-5)
        got16 = rotation.online_hadamard_heads(jnp.asarray(xs, jnp.bfloat16), hd)
        assert got16.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got16, np.float32), got, atol=0.05)
    else:
        with pytest.raises(ValueError, match="does not factor into heads"):
            rotation.online_hadamard_heads(jnp.zeros((1, 48)), cfg.head_dim)


def test_rotated_tree_structure():
    cfg = CONFIGS[1]
    params = _random_params(cfg, seed=0)
    rotated, notes = rotation.rotate_params(params, cfg)
    for layer in rotated["layers"].values():
        np.testing.assert_array_equal(layer["attn_norm"]["scale"], 1.0)
        np.testing.assert_array_equal(layer["mlp_norm"]["scale"], 1.0)
    np.testing.assert_array_equal(rotated["final_norm"]["scale"], 1.0)
    bias = params["layers"][0]["attn"]["q_proj"]["bias"]
    np.testing.assert_array_equal(rotated["layers"][0]["attn"]["q_proj"]["bias"], bias)
    assert notes["residual"] == "random_orthogonal 10"
    assert notes["online_down_proj"] == "52 = 13 x 4 (dct)"
    assert "lm_head" not in params  # input untouched


def test_rotation_float32_and_seed():
    """float32 inputs come back float32 and stay close; the seed changes the rotation."""
    cfg = CONFIGS[0]
    params = _random_params(cfg, seed=5)
    params32 = jax.tree.map(lambda a: a.astype(np.float32), params)
    rot_a, _ = rotation.rotate_params(params32, cfg, seed=0)
    rot_b, _ = rotation.rotate_params(params, cfg, seed=1)
    assert {a.dtype for a in jax.tree.leaves(rot_a)} == {np.dtype(np.float32)}
    assert not np.allclose(rot_a["embed"]["embedding"], rot_b["embed"]["embedding"])
    tokens = np.arange(6)
    ref = _forward(params, cfg, tokens, rotated=False)
    out = _forward(rot_a, cfg, tokens, rotated=True)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_online_size_mismatch():
    cfg = dataclasses.replace(CONFIGS[0], intermediate_size=96)
    with pytest.raises(ValueError, match="online rotation size 96"):
        rotation.rotate_params(_random_params(CONFIGS[0], 0), cfg)


def test_rotated_model_runs_either_hadamard(monkeypatch):
    """The model's online transforms (o_proj and down_proj inputs of a rotated w4 model) in the
    GEMM form (the default) and in the Pallas kernel give the butterfly's logits up to bf16
    rounding of the transform's output."""
    import qspec_jax as qj
    m = qj.load(None, quant="w4")
    assert m.qcfg.rotate
    assert rotation.HADAMARD_IMPL == "dense"  # measured faster on the H200 (hadamard_h200.md)
    from qspec_jax import api
    toks = jnp.asarray([[5, 17, 33, 2, 9, 41]], jnp.int32)
    calls = []
    dense = rotation._dense_transform
    monkeypatch.setattr(rotation, "_dense_transform", lambda x: calls.append(x.shape) or dense(x))
    out = {}
    for impl in ("butterfly", "dense", "pallas"):  # pallas: the kernel's interpreter here
        calls.clear()
        monkeypatch.setattr(rotation, "HADAMARD_IMPL", impl)  # read at trace time: a fresh jit
        fwd = jax.jit(lambda s, t: api._logits_jit.__wrapped__(m.graphdef, s, t, mode="w4a16",
                                                               kernels="xla"))
        out[impl] = np.asarray(fwd(m.state, toks), np.float32)
        # o_proj and down_proj inputs, traced once, in the GEMM form only
        assert len(calls) == (2 * m.cfg.num_hidden_layers if impl == "dense" else 0)
    scale = np.abs(out["butterfly"]).max()
    assert np.abs(out["dense"] - out["butterfly"]).max() <= 0.02 * scale
    assert np.abs(out["pallas"] - out["dense"]).max() <= 0.02 * scale


def test_bench_hadamard_quick(tmp_path):
    from experiments.bench_hadamard import main
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    rows = __import__("json").load(open(tmp_path / "hadamard_h200_quick.json"))["rows"]
    assert [(r["width"], r["M"], r["impl"]) for r in rows] == [
        (n, m, i) for n in (448, 256) for m in (1, 3) for i in rotation.HADAMARD_IMPLS]
    assert all(r["max_rel_err"] < 2 ** -7 for r in rows)
    assert all(r["equal_to_butterfly"] > 0.99 for r in rows if r["impl"] != "butterfly")
    assert "| 448 (28 x 16) | 3 | dense |" in open(tmp_path / "hadamard_h200_quick.md").read()
    # --swiglu: [gate | up] in, the first impl the baseline
    out = tmp_path / "swi"
    assert main(["--quick", "--swiglu", "--impls", "dense,pallas", "--out", str(out)]) == 0
    rows = __import__("json").load(open(out / "hadamard_h200_quick.json"))["rows"]
    assert [(r["width"], r["M"], r["impl"]) for r in rows] == [
        (n, m, i) for n in (448, 256) for m in (1, 3) for i in ("dense", "pallas")]
    assert all(r["swiglu"] and r["max_rel_err"] < 2 ** -7 for r in rows)
    # (the SwiGLUs round differently: XLA's fusion vs bf16 after each op; as close to exact)
    err = {(r["width"], r["M"], r["impl"]): r["max_rel_err"] for r in rows}
    assert all(err[n, m, "pallas"] <= 2 * err[n, m, "dense"] for n, m, _ in err)
    text = open(out / "hadamard_h200_quick.md").read()
    assert "after the SwiGLU: dense vs pallas" in text and "dense / this (device)" in text


def test_vfold_quality_smoke(tmp_path):
    """experiments/vfold_quality.py: one seed, RTN, llama: both errors measured and sane, the
    table written."""
    from experiments.vfold_quality import main
    assert main(["--seeds", "1", "--archs", "llama", "--methods", "rtn", "--out", str(tmp_path)]) == 0
    rows = __import__("json").load(open(tmp_path / "vfold_quality.json"))["rows"]
    assert len(rows) == 1 and 0 < rows[0]["fold"] < 0.5 and 0 < rows[0]["no_fold"] < 0.5
    assert "| llama | rtn |" in open(tmp_path / "vfold_quality.md").read()
