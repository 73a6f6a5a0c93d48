"""Model configuration: one frozen dataclass built from a Hugging Face ``config.json``.

``model_config_from_hf`` is the only place that reads HF config fields; it validates them
once and names any field we do not support, so later code can trust the config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """A checkpoint's config asks for something this library does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def check_cache_len(self, max_len: int) -> None:
        """Sliding-window attention is not implemented: refuse caches the window would cut."""
        if self.sliding_window is not None and max_len > self.sliding_window:
            raise ConfigError(
                f"this {self.model_type} model uses sliding-window attention "
                f"(sliding_window={self.sliding_window}) but the KV cache holds {max_len} "
                f"positions; qspec-jax only implements full attention, which equals sliding-window "
                f"attention only while the sequence fits the window. Use max_len <= "
                f"{self.sliding_window} (shorter prompt or fewer new tokens).")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How the linear layers' weights are stored (see docs/DESIGN.md and qspec_jax/quant.py)."""

    quant: str | None = None          # None (16-bit weights) or "w4"
    method: str | None = None         # "rtn" | "gptq"
    group_size: int | None = None     # None: one scale per output channel
    rotate: bool = False              # QuaRot folded in: the model applies online Hadamards
    quantize_lm_head: bool = False
    seed: int = 0
    # With rotate: the per-head part of o_proj's online Hadamard is folded into v_proj where the
    # sizes allow it (rotation.v_head_fold_ok), so the model mixes heads only. Settings saved
    # before this field existed read False (their v_proj does not hold it).
    rotate_v_heads: bool = True

    @property
    def quantized(self) -> bool:
        return self.quant is not None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{"rotate_v_heads": False, **{k: v for k, v in d.items() if k in known}})


# Fields that change the math but that we do not implement: (field, value that is fine).
_UNSUPPORTED_IF_SET = (
    ("mlp_bias", False),
    ("pretraining_tp", 1),
)


def _rope_from_hf(cfg: Mapping[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters`; older files have rope_theta + rope_scaling.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", cfg.get("max_position_embeddings", 8192))),
    )


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def model_config_from_hf(cfg: Mapping[str, Any]) -> ModelConfig:
    """Validate an HF config dict and build our ModelConfig (raises ConfigError naming the field)."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"unsupported model_type {model_type!r}; qspec-jax supports: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama 2/3/3.x, Qwen2/2.5, Mistral)")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if cfg.get(k) is None]
    if missing:
        raise ConfigError(f"config.json lacks required field(s): {', '.join(missing)}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"unsupported hidden_act {act!r}: only 'silu' (SwiGLU) is implemented")
    problems = [f"{k}={cfg[k]!r} (only {ok!r} is supported)"
                for k, ok in _UNSUPPORTED_IF_SET if cfg.get(k, ok) not in (ok, None)]
    qkv_bias = model_type == "qwen2"
    if model_type in ("llama", "mistral") and cfg.get("attention_bias", False):
        problems.append("attention_bias=True (biased Llama attention is not supported)")
    if problems:
        raise ConfigError("unsupported config field(s): " + "; ".join(problems))

    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise ConfigError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    if head_dim % 2:
        raise ConfigError(f"head_dim={head_dim} must be even for rotary embeddings")

    sliding = cfg.get("sliding_window")
    if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
        sliding = None
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=_rope_from_hf(cfg),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        sliding_window=int(sliding) if sliding is not None else None,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        pad_token_id=cfg.get("pad_token_id"),
    )


def read_hf_config(path: str | os.PathLike) -> dict:
    """Read ``config.json`` of a checkpoint folder with a clear error if it is absent."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(
            f"{path!s} has no config.json: pass a Hugging Face checkpoint folder or a qspec-convert output")
    with open(cfg_path) as f:
        return json.load(f)


def generation_eos_ids(path: str | os.PathLike, cfg: ModelConfig) -> tuple[int, ...]:
    """EOS ids from generation_config.json when present (Llama 3 lists several), else config.json."""
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            ids = _eos_ids(json.load(f).get("eos_token_id"))
        if ids:
            return ids
    return cfg.eos_token_ids


def round_up(x: int, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)
