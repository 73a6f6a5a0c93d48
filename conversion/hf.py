"""Read Hugging Face PyTorch checkpoints into our parameter tree (docs/DESIGN.md).

Inputs: ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``, or
``pytorch_model*.bin`` (loaded by torch with ``weights_only=True``: tensors only, never
arbitrary pickled objects). Names go through one table per architecture family; every tensor
is checked against the shapes our model expects, and all problems are reported at once.
"""

from __future__ import annotations

import glob
import json
import os
import re

import jax.numpy as jnp
from tqdm.auto import tqdm

from qspec_jax.config import ModelConfig

# HF name inside a decoder layer -> (our path inside layers[i], transpose [out,in] -> [in,out]).
_LLAMA_LAYER = {
    "input_layernorm.weight": (("attn_norm", "scale"), False),
    "self_attn.q_proj.weight": (("attn", "q_proj", "kernel"), True),
    "self_attn.k_proj.weight": (("attn", "k_proj", "kernel"), True),
    "self_attn.v_proj.weight": (("attn", "v_proj", "kernel"), True),
    "self_attn.o_proj.weight": (("attn", "o_proj", "kernel"), True),
    "post_attention_layernorm.weight": (("mlp_norm", "scale"), False),
    "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), True),
    "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), True),
    "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), True),
}
_QWEN2_LAYER = {
    **_LLAMA_LAYER,
    "self_attn.q_proj.bias": (("attn", "q_proj", "bias"), False),
    "self_attn.k_proj.bias": (("attn", "k_proj", "bias"), False),
    "self_attn.v_proj.bias": (("attn", "v_proj", "bias"), False),
}
_GLOBAL = {
    "model.embed_tokens.weight": (("embed", "embedding"), False),
    "model.norm.weight": (("final_norm", "scale"), False),
    "lm_head.weight": (("lm_head", "kernel"), True),
}
# One table per architecture family: (per-layer map, global map).
NAME_TABLES = {
    "llama": (_LLAMA_LAYER, _GLOBAL),
    "mistral": (_LLAMA_LAYER, _GLOBAL),
    "qwen2": (_QWEN2_LAYER, _GLOBAL),
}
# Buffers some checkpoints carry that hold no parameters.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class CheckpointError(ValueError):
    """The checkpoint's tensors do not match what its config describes."""


def list_weight_files(path: str) -> tuple[str, list[str]]:
    """Return ("safetensors" | "bin", files) for a checkpoint folder."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that are not in {path}: {', '.join(missing)}")
        return "safetensors", [os.path.join(path, s) for s in shards]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return "safetensors", [single]
    bins = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if bins:
        return "bin", bins
    raise CheckpointError(
        f"no weights found in {path}: expected model.safetensors, model.safetensors.index.json "
        "with its shards, or pytorch_model*.bin")


def _iter_safetensors(files):
    from safetensors import safe_open
    for file in files:
        # framework="flax" reads bfloat16 tensors as jax arrays (numpy has no bfloat16).
        with safe_open(file, framework="flax") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _iter_torch_bin(files):
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CheckpointError("reading pytorch_model*.bin needs PyTorch: pip install torch "
                              "(or convert the checkpoint to safetensors)") from e
    for file in files:
        state = torch.load(file, map_location="cpu", weights_only=True)
        for name, t in state.items():
            dtype = jnp.bfloat16 if t.dtype == torch.bfloat16 else None
            # bf16 -> f32 -> bf16 is exact; numpy cannot hold bf16 directly.
            arr = jnp.asarray(t.float().numpy() if dtype is not None else t.numpy())
            yield name, arr.astype(dtype) if dtype is not None else arr


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _our_path(name: str, cfg: ModelConfig):
    layer_map, global_map = NAME_TABLES[cfg.model_type]
    m = _LAYER_RE.match(name)
    if m:
        entry = layer_map.get(m.group(2))
        if entry is None:
            return None
        path, transpose = entry
        return ("layers", int(m.group(1))) + path, transpose
    return global_map.get(name)


def load_hf_params(path: str, cfg: ModelConfig, expected_shapes: dict, dtype) -> dict:
    """Read all tensors of an HF checkpoint into our pure-dict tree, cast to ``dtype``.

    ``expected_shapes`` maps our flattened paths to shapes (from the abstract model). Raises
    CheckpointError listing every missing, unexpected and mis-shaped tensor.
    """
    kind, files = list_weight_files(path)
    reader = _iter_safetensors if kind == "safetensors" else _iter_torch_bin
    params, seen = {}, set()
    unexpected, mismatched = [], []
    for name, arr in tqdm(reader(files), desc="reading weights", unit="tensor", leave=False):
        if _IGNORED.match(name):
            continue
        mapped = _our_path(name, cfg)
        if mapped is None:
            unexpected.append(name)
            continue
        our, transpose = mapped
        if our not in expected_shapes:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # a tied head saved anyway: the embedding is the same tensor
            unexpected.append(name)
            continue
        if transpose:
            arr = arr.T
        seen.add(our)
        if tuple(arr.shape) != tuple(expected_shapes[our]):
            mismatched.append(f"{name}: checkpoint {tuple(arr.shape[::-1] if transpose else arr.shape)}"
                              f" vs config {tuple(expected_shapes[our][::-1] if transpose else expected_shapes[our])}")
            continue
        _set(params, our, jnp.asarray(arr, dtype=dtype))
    missing = [_hf_name(p) for p in expected_shapes if p not in seen]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(sorted(missing))}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(sorted(unexpected))}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match its config.json "
                              f"({cfg.model_type}):\n  " + "\n  ".join(problems))
    return params


def _hf_name(our: tuple) -> str:
    """Inverse of the name tables, for error messages."""
    for table in (_QWEN2_LAYER,):
        if our[0] == "layers":
            for hf, (p, _) in table.items():
                if p == our[2:]:
                    return f"model.layers.{our[1]}.{hf}"
    for hf, (p, _) in _GLOBAL.items():
        if p == our:
            return hf
    return ".".join(map(str, our))
