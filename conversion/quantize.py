"""Turn 16-bit parameters into the served form: QuaRot rotation, then RTN or GPTQ 4-bit weights.

GPTQ runs layer by layer (memory stays at one layer's activations): for each decoder layer it
captures the inputs of each group of linears that share an input (q/k/v, o, gate/up, down), with
the already-quantized linears of the layer in place, builds their Hessians, quantizes them, and
feeds the quantized layer's output to the next layer.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from qspec_jax import quant
from qspec_jax.config import ModelConfig, QuantConfig
from qspec_jax.layers import capture_linear_inputs, finished, rope_inv_freq
from qspec_jax.model import DecoderLayer, KVCache

log = logging.getLogger("qspec_jax")

# Linears of one decoder layer grouped by shared input, in the order GPTQ quantizes them.
GPTQ_STAGES = ((("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj")),
               (("attn", "o_proj"),),
               (("mlp", "gate_proj"), ("mlp", "up_proj")),
               (("mlp", "down_proj"),))
CALIB_SEQ_LEN = 512


def _to_np32(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(jnp.asarray(a, jnp.float32)), tree)


def _cast(tree, dtype):
    """Floats to the model dtype; int4 stores and their f32 scales stay as they are."""
    def cast(path, a):
        name = getattr(path[-1], "key", None)
        if name in ("qweight", "scales"):
            return jnp.asarray(a)
        return jnp.asarray(a, dtype)
    return jax.tree_util.tree_map_with_path(cast, tree)


def prepare_params(cfg: ModelConfig, qcfg: QuantConfig, params: dict, dtype, *, calib=None,
                   calib_tokens: int = 16384, tokenizer_path: str | None = None):
    """Return (config, params) for ``qcfg``: rotated and/or quantized as it asks."""
    params = _to_np32(params)
    if qcfg.rotate:
        from qspec_jax.rotation import rotate_params
        params, notes = rotate_params(params, cfg, seed=qcfg.seed, v_heads=qcfg.rotate_v_heads)
        log.info("QuaRot rotation folded in: %s", notes)
        cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
    if qcfg.quantize_lm_head and "lm_head" not in params:
        # A tied head gets its own copy so that it can be stored in int4.
        params = {**params, "lm_head": {"kernel": np.asarray(params["embed"]["embedding"]).T}}
        cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
    if qcfg.quantized:
        if qcfg.method == "gptq":
            tokens = calibration_tokens(cfg, calib, calib_tokens, tokenizer_path)
            params = gptq_params(cfg, qcfg, params, tokens)
        else:
            params = quant.quantize_params(params, group_size=qcfg.group_size,
                                           quantize_lm_head=qcfg.quantize_lm_head)
    return cfg, _cast(params, dtype)


def calibration_tokens(cfg: ModelConfig, calib, n_tokens: int, tokenizer_path: str | None) -> np.ndarray:
    """[n_seq, CALIB_SEQ_LEN] int32 calibration tokens.

    ``calib``: a path to a local text file, an int array of token ids, or None for the built-in
    data of the default model (arithmetic problems and Python source).
    """
    if calib is not None and not isinstance(calib, (str, os.PathLike)):
        ids = np.asarray(calib, np.int64).reshape(-1)
    else:
        if calib is None:
            text = builtin_calibration_text(n_chars=n_tokens * 8)
        else:
            if not os.path.isfile(calib):
                raise FileNotFoundError(f"calibration file {calib} does not exist")
            with open(calib, encoding="utf-8", errors="replace") as f:
                text = f.read()
        from qspec_jax.api import load_tokenizer
        tok = load_tokenizer(tokenizer_path) if tokenizer_path else None
        if tok is None:
            raise ValueError("GPTQ calibration from text needs the model's tokenizer files; pass "
                             "calibration token ids instead, or use method='rtn'")
        ids = np.asarray(tok(text)["input_ids"], np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
        raise ValueError(f"calibration token ids must be in [0, {cfg.vocab_size})")
    seq = min(CALIB_SEQ_LEN, max(16, ids.size))
    n_seq = min(max(1, n_tokens // seq), ids.size // seq)
    if n_seq < 1:
        raise ValueError(f"calibration data too short: {ids.size} tokens, need at least {seq}")
    return ids[: n_seq * seq].reshape(n_seq, seq).astype(np.int32)


def builtin_calibration_text(n_chars: int) -> str:
    """The default model's training mix: arithmetic problems interleaved with Python source."""
    from experiments import data
    problems = data.problems("train", max(1, n_chars // 400), seed=1)
    arithmetic = "\n\n".join(p.text for p in problems)[: n_chars // 2]
    code = []
    for text in data.read_code(data.code_split()[0]):
        code.append(text)
        if sum(map(len, code)) >= n_chars // 2:
            break
    return arithmetic + "\n\n" + "".join(code)[: n_chars // 2]


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set_linear(layer_params: dict, path, new_lin) -> dict:
    out = dict(layer_params)
    out[path[0]] = {**layer_params[path[0]], path[1]: new_lin}
    return out


def _run_layer_fn(cfg: ModelConfig, qcfg: QuantConfig):
    """jitted (layer params, x [B,S,D]) -> (y, {linear path: its input}) in f32, w16 math, for
    layer params prepared as ``qcfg`` says (its rotation; unquantized)."""
    qcfg = QuantConfig(rotate=qcfg.rotate, rotate_v_heads=qcfg.rotate_v_heads)
    abstract = nnx.eval_shape(lambda: DecoderLayer(cfg, qcfg, jnp.float32, nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim)

    @jax.jit
    def run(state, x):
        layer = nnx.merge(graphdef, state)
        B, S, _ = x.shape
        modules = nnx.iter_modules(layer) if hasattr(nnx, "iter_modules") else layer.iter_modules()
        names = {id(m): tuple(str(p) for p in path) for path, m in modules}
        cache = KVCache.create(dataclasses.replace(cfg, num_hidden_layers=1, sliding_window=None),
                               B, S, jnp.float32)
        positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        with capture_linear_inputs() as captured:
            y, _, mlp_out = layer(x, cache, 0, positions, inv_freq, "w16", "xla")
        return y + finished(mlp_out), {names[k]: v for k, v in captured.items()}

    def call(layer_params, x):
        _, state = nnx.split(abstract)
        nnx.replace_by_pure_dict(state, layer_params)
        return run(state, x)

    return call


def gptq_params(cfg: ModelConfig, qcfg: QuantConfig, params: dict, tokens: np.ndarray) -> dict:
    """GPTQ every decoder linear, layer by layer, on calibration ``tokens`` [n_seq, S]."""
    from qspec_jax.gptq import HessianAccumulator, gptq_quantize
    run_layer = _run_layer_fn(cfg, qcfg)
    x = jnp.take(jnp.asarray(params["embed"]["embedding"]), jnp.asarray(tokens), axis=0)
    layers = {}
    steps = len(params["layers"]) * len(GPTQ_STAGES)
    with tqdm(total=steps, desc="GPTQ", unit="stage") as bar:
        for idx in sorted(params["layers"]):
            float_layer = params["layers"][idx]
            quantized = float_layer          # float kernels replaced stage by stage
            dequantized = float_layer        # same, with the dequantized weights as kernels
            for stage in GPTQ_STAGES:
                _, inputs = run_layer(dequantized, x)
                acc = HessianAccumulator(inputs[stage[0]].shape[-1])
                acc.add(inputs[stage[0]])
                hessian = acc.hessian  # [K, K], shared by the stage's linears
                for path in stage:
                    lin = _get(float_layer, path)
                    qw, sc = gptq_quantize(np.asarray(lin["kernel"]), hessian, group_size=qcfg.group_size)
                    q_lin = {k: v for k, v in lin.items() if k != "kernel"}
                    q_lin.update(qweight=np.asarray(qw), scales=np.asarray(sc, np.float32))
                    quantized = _set_linear(quantized, path, q_lin)
                    dq = {**lin, "kernel": np.asarray(quant.dequantize_weight(qw, sc), np.float32)}
                    dequantized = _set_linear(dequantized, path, dq)
                bar.update(1)
            x, _ = run_layer(dequantized, x)
            layers[idx] = quantized
    out = {**params, "layers": layers}
    if qcfg.quantize_lm_head and "lm_head" in out:
        qw, sc = quant.quantize_weight_rtn(out["lm_head"]["kernel"], qcfg.group_size)
        out["lm_head"] = {"qweight": qw, "scales": sc}
    return out
