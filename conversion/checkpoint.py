"""Our on-disk format: an orbax checkpoint of the parameter tree plus JSON metadata.

```
OUT_DIR/
  qspec.json            format version, dtype, quantization settings, config overrides
  config.json           the source HF config (architecture)
  generation_config.json, tokenizer files (copied when present)
  params/               orbax StandardCheckpointer tree (docs/DESIGN.md)
```
Writers build everything in a temporary sibling folder and rename it at the end, so an
interrupted or failed conversion never leaves a half-written OUT_DIR.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile

import jax
import numpy as np

from qspec_jax.config import QuantConfig, model_config_from_hf, read_hf_config

FORMAT = "qspec-jax"
FORMAT_VERSION = 1
META_FILE = "qspec.json"
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "tokenizer.model", "special_tokens_map.json", "vocab.json", "merges.txt",
                "added_tokens.json", "chat_template.jinja")


def is_converted(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_FILE))


def _str_keys(tree):
    # orbax wants string keys; our layer index keys are ints.
    if isinstance(tree, dict):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def _int_layer_keys(tree):
    if isinstance(tree, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_layer_keys(v)
                for k, v in tree.items()}
    return tree


@contextlib.contextmanager
def atomic_output_dir(out_dir: str, overwrite: bool):
    """Yield a temporary folder next to ``out_dir``; move it into place only on success."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite (overwrite=True) to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should not be
    try:
        yield tmp
        if os.path.exists(out_dir):
            trash = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.replace(out_dir, os.path.join(trash, "old"))
            os.replace(tmp, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_converted(out_dir: str, src_dir: str, params: dict, dtype, qcfg: QuantConfig,
                   config_overrides: dict, *, overwrite: bool = False) -> None:
    import orbax.checkpoint as ocp
    nk = [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
          if getattr(p[-1], "key", None) == "qweight" and v.dtype != np.int8]
    if nk:
        raise ValueError(f"save_converted stores int4 weights in the half-split int8 [K/2, N] "
                         f"format; {nk[0]} (and {len(nk) - 1} more) is not (the in-memory int4 "
                         "[N, K] layout?): convert with qj.with_weight_layout(model, 'half_split') "
                         "first")
    with atomic_output_dir(out_dir, overwrite) as tmp:
        for name in COPIED_FILES:
            src = os.path.join(src_dir, name)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(tmp, name))
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "dtype": np.dtype(dtype).name,
                "quant": qcfg.to_json(), "config_overrides": config_overrides}
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, "params"), _str_keys(jax.device_get(params)))
        ckptr.wait_until_finished()
        ckptr.close()


def read_meta(path: str) -> dict:
    with open(os.path.join(path, META_FILE)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint format {meta.get('format')!r} "
                         f"version {meta.get('version')!r}; re-convert it with this qspec-convert")
    return meta


def load_converted(path: str, *, dtype, quant=None, method=None, rotate=None, group_size=None,
                   quantize_lm_head=None):
    """Load a qspec-convert output; arguments that contradict the stored settings are errors."""
    import orbax.checkpoint as ocp
    from qspec_jax.api import abstract_model, assemble, load_tokenizer
    from qspec_jax.config import generation_eos_ids
    from qspec_jax.model import pure_dict

    meta = read_meta(path)
    qcfg = QuantConfig.from_json(meta["quant"])
    asked = {"quant": quant, "rotate": rotate, "group_size": group_size,
             "method": method if quant is not None else None, "quantize_lm_head": quantize_lm_head}
    conflicts = [f"{k}={v!r} (stored: {getattr(qcfg, k)!r})" for k, v in asked.items()
                 if v is not None and v != getattr(qcfg, k)]
    if conflicts:
        raise ValueError(f"{path} is already converted with other settings: {', '.join(conflicts)}; "
                         "load it without these arguments or convert the HF checkpoint again")
    cfg = dataclasses.replace(model_config_from_hf(read_hf_config(path)), **meta["config_overrides"])
    target = pure_dict(abstract_model(cfg, qcfg, dtype))
    restored = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), "params"),
                                                  _str_keys(target))
    return assemble(cfg, qcfg, _int_layer_keys(restored), dtype, tokenizer=load_tokenizer(path),
                    eos_ids=generation_eos_ids(path, cfg), path=path)
