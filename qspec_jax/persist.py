"""Persistent caches across processes: XLA's compiled programs and gamma="auto"'s cost tables.

Compiling the decode loops dominates a short run's start-up (the embedded model: ~6 s of a 7 s
``qj.generate`` on a CPU; the 8B-shaped gamma="auto" program: ~100 s on the H200), and
gamma="auto" times the draft and verify steps once per (batch, context) in every process.
``enable_persistent_cache()`` keeps both on disk:

- ``<dir>/xla``: JAX's persistent compilation cache (``jax_compilation_cache_dir``): a later
  process with the same program, device and jax version loads the executable instead of
  compiling it. Enable it before the first compilation of the process.
- ``<dir>/cycle_costs.json``: measured cost tables keyed by everything they depend on (device,
  jax and qspec_jax versions, model shapes and quantization, batch, context bucket, draft
  options); written atomically (a temporary file renamed over the old one).

The CLI enables it by default (``--cache-dir``, ``--no-cache``, or ``QSPEC_JAX_CACHE_DIR=off``);
the Python API on request.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile

import jax

log = logging.getLogger("qspec_jax")

ENV_DIR = "QSPEC_JAX_CACHE_DIR"
COSTS_FILE = "cycle_costs.json"
_state: dict = {"dir": None}


def default_dir() -> str:
    """$QSPEC_JAX_CACHE_DIR, else $XDG_CACHE_HOME/qspec_jax, else ~/.cache/qspec_jax."""
    if os.environ.get(ENV_DIR) and not env_disabled():
        return os.environ[ENV_DIR]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qspec_jax")


def env_disabled() -> bool:
    """$QSPEC_JAX_CACHE_DIR=off (or 0 / none): the CLI does not enable the cache by default."""
    return os.environ.get(ENV_DIR, "").strip().lower() in ("off", "0", "none")


def enable_persistent_cache(directory: str | os.PathLike | None = None) -> str:
    """Keep compiled programs and cost tables under ``directory`` (default: ``default_dir()``)
    from now on in this process; returns the folder. Call it before the first ``generate``:
    programs compiled earlier in the process are not written."""
    path = os.path.abspath(os.path.expanduser(os.fspath(directory or default_dir())))
    try:
        os.makedirs(os.path.join(path, "xla"), exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot use {path!r} as the qspec_jax cache folder ({e}); pass another "
                         f"folder (CLI --cache-dir, or ${ENV_DIR}) or turn the cache off "
                         "(CLI --no-cache)") from e
    jax.config.update("jax_compilation_cache_dir", os.path.join(path, "xla"))
    _state["dir"] = path
    log.info("qspec_jax: persistent cache in %s (compiled programs and gamma='auto' cost tables)",
             path)
    return path


def cache_dir() -> str | None:
    return _state["dir"]


def cost_key(model, key: tuple) -> str:
    """A string naming one cost table: the device, the versions, the model's shapes and
    quantization, and ``key`` (api._cycle_costs': batch, context bucket, max_gamma, draft,
    kernels, draft window, draft layers). Weights do not enter: costs depend on shapes only."""
    from . import __version__
    dev = jax.devices()[0]
    parts = {"device": getattr(dev, "device_kind", dev.platform), "backend": jax.default_backend(),
             "jax": jax.__version__, "qspec_jax": __version__,
             "cfg": dataclasses.asdict(model.cfg), "qcfg": dataclasses.asdict(model.qcfg),
             "dtype": str(model.dtype), "params": _structure_hash(model.state), "key": list(key)}
    return json.dumps(parts, sort_keys=True, default=str)


def _structure_hash(state) -> str:
    """Every parameter's path, shape and dtype (fused or unfused projections, lm_head format)."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    desc = sorted(f"{jax.tree_util.keystr(p)}:{tuple(x.shape)}:{x.dtype}" for p, x in leaves)
    return hashlib.sha256("\n".join(desc).encode()).hexdigest()[:16]


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # a damaged file: measure again, rewrite it
        log.warning("qspec_jax: ignoring unreadable cost-table cache %s (%s)", path, e)
        return {}


def load_costs(model, key: tuple) -> list[float] | None:
    if _state["dir"] is None:
        return None
    costs = _read(os.path.join(_state["dir"], COSTS_FILE)).get(cost_key(model, key))
    if costs is not None:
        log.info("qspec_jax: gamma='auto': cost table for batch %d, context %d loaded from %s",
                 key[0], key[1], _state["dir"])
    return costs


def save_costs(model, key: tuple, costs) -> None:
    if _state["dir"] is None:
        return
    path = os.path.join(_state["dir"], COSTS_FILE)
    data = _read(path)
    data[cost_key(model, key)] = [float(c) for c in costs]
    try:
        fd, tmp = tempfile.mkstemp(dir=_state["dir"], prefix=".cycle_costs-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except OSError as e:
        log.warning("qspec_jax: could not write the cost-table cache %s (%s)", path, e)
