"""HF checkpoint folder -> qspec-jax checkpoint (orbax), optionally rotated and quantized."""

from __future__ import annotations

import dataclasses
import logging
import os

from qspec_jax.api import abstract_model, flat_shapes, make_quant_config, resolve_dtype
from qspec_jax.config import QuantConfig, model_config_from_hf, read_hf_config
from qspec_jax.model import pure_dict

from . import checkpoint, hf
from .quantize import prepare_params

log = logging.getLogger("qspec_jax")


def convert(hf_dir: str, out_dir: str, *, dtype="bfloat16", quant: str | None = None,
            method: str = "rtn", group_size: int | None = None, rotate: bool | None = None,
            quantize_lm_head: bool = False, calib=None, calib_tokens: int = 16384,
            overwrite: bool = False, rotate_v_heads: bool = True) -> str:
    """Convert ``hf_dir`` into ``out_dir`` atomically; returns out_dir.

    ``rotate`` defaults to True when quantizing (QuaRot), False otherwise; ``rotate_v_heads``
    as in ``qspec_jax.load`` (stored in the checkpoint's settings).
    """
    dtype = resolve_dtype(dtype)
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"{hf_dir} is not a folder")
    if os.path.abspath(hf_dir) == os.path.abspath(out_dir):
        raise ValueError("OUT_DIR must differ from HF_DIR")
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it")
    hf_cfg = model_config_from_hf(read_hf_config(hf_dir))
    qcfg = make_quant_config(quant, method, rotate, group_size, quantize_lm_head, rotate_v_heads)
    expected = flat_shapes(pure_dict(abstract_model(hf_cfg, QuantConfig(), dtype)))
    params = hf.load_hf_params(hf_dir, hf_cfg, expected, dtype)
    cfg = hf_cfg
    if qcfg.rotate or qcfg.quantized:
        cfg, params = prepare_params(hf_cfg, qcfg, params, dtype, calib=calib,
                                     calib_tokens=calib_tokens, tokenizer_path=hf_dir)
    overrides = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                 if getattr(cfg, f.name) != getattr(hf_cfg, f.name)}
    checkpoint.save_converted(out_dir, hf_dir, params, dtype, qcfg, overrides, overwrite=overwrite)
    log.info("wrote %s", out_dir)
    return out_dir
