"""qspec-jax: QSpec quantized self-speculative decoding in JAX/Pallas.

One 4-bit weight store serves a fast activation-quantized draft mode (W4A8/W4A4) and a
weight-only verify mode (W4A16) over one shared KV cache; see README.md.
"""

from .api import (DecodeCall, GenerateOutput, QSpecModel, auto_weight_layout, chat_prompt_ids,
                  decode_call, generate, load, logits, with_weight_layout)
from .config import ModelConfig, QuantConfig, model_config_from_hf
from .generate import DecodeResult, decode_autoregressive
from .model import KVCache, Transformer
from .persist import enable_persistent_cache
from .sampling import SamplingConfig

__all__ = [
    "GenerateOutput", "QSpecModel", "generate", "load", "logits", "ModelConfig", "QuantConfig",
    "model_config_from_hf", "DecodeResult", "decode_autoregressive", "KVCache", "Transformer",
    "SamplingConfig", "enable_persistent_cache", "decode_call", "DecodeCall", "with_weight_layout",
    "auto_weight_layout", "chat_prompt_ids",
]
__version__ = "0.1.0"
