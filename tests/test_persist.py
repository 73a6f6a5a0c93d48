"""Persistent caches: compiled programs and gamma="auto" cost tables survive the process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import qspec_jax as qj
from qspec_jax import persist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args, env_dir=None):
    # Every program is written, however fast it compiled: jax skips programs that compile in
    # under a second by default, which the tiny test model's may do under the suite's fast
    # XLA:CPU compile flags (conftest.py) on a lightly loaded machine (a flaky CI failure).
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    env.pop("QSPEC_JAX_CACHE_DIR", None)
    if env_dir is not None:
        env["QSPEC_JAX_CACHE_DIR"] = str(env_dir)
    res = subprocess.run([sys.executable, "-m", "qspec_jax.cli", *args], capture_output=True,
                         text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def test_cli_reuses_compiled_programs_and_cost_tables(tmp_path):
    """A second qspec-generate process with the same request loads the executables and the
    gamma='auto' cost table the first one wrote (no timing, no new cache entries) and prints
    the same text; --no-cache writes nothing."""
    from hf_models import save_hf_model_with_tokenizer
    model_dir = save_hf_model_with_tokenizer(tmp_path / "m")
    cache = tmp_path / "cache"
    args = ["--model", str(model_dir), "--quant", "w4", "--dtype", "float32", "--prompt", "hello",
            "--max-new-tokens", "12", "--mode", "qspec", "--gamma", "auto", "--max-gamma", "3",
            "-v", "--cache-dir", str(cache)]
    first = run_cli(args)
    entries = set(os.listdir(cache / "xla"))
    assert any(e.startswith("jit_decode_speculative") or e.startswith("jit_decode_autoregressive")
               for e in entries), entries
    costs = json.loads((cache / "cycle_costs.json").read_text())
    assert len(costs) == 1 and all(c > 0 for c in next(iter(costs.values())))
    assert "timing the draft and verify steps" in first.stderr
    second = run_cli(args)
    assert "loaded from" in second.stderr and "timing the draft" not in second.stderr
    assert set(os.listdir(cache / "xla")) == entries  # nothing compiled anew worth caching
    assert second.stdout == first.stdout
    off = tmp_path / "off"
    run_cli([a for a in args if a not in ("--cache-dir", str(cache))] + ["--no-cache"], env_dir=off)
    assert not off.exists()


def test_cost_tables_on_disk(hf_dirs, tmp_path, monkeypatch, caplog):
    """Cost tables are stored per model structure and request, merged into one JSON file
    written by rename, and a damaged file is reported and measured around (never a crash)."""
    import logging
    monkeypatch.setitem(persist._state, "dir", str(tmp_path))  # not the XLA cache: this process
    model = qj.load(hf_dirs["llama"][0], dtype="float32", quant="w4", method="rtn")
    other = qj.load(hf_dirs["qwen2"][0], dtype="float32", quant="w4", method="rtn")
    key = (4, 256, 3, "w4a8", "xla", None, None)
    assert persist.load_costs(model, key) is None
    persist.save_costs(model, key, np.array([1e-3, 2e-3, 3e-3, 4e-3]))
    persist.save_costs(model, key[:5] + ((4, 60), None), [1e-3, 1.5e-3, 2e-3, 2.5e-3])
    assert persist.load_costs(model, key) == [1e-3, 2e-3, 3e-3, 4e-3]
    assert persist.load_costs(model, key[:5] + ((4, 60), None)) == [1e-3, 1.5e-3, 2e-3, 2.5e-3]
    assert persist.load_costs(model, (8,) + key[1:]) is None  # another batch
    assert persist.load_costs(other, key) is None  # another model structure
    assert sorted(os.listdir(tmp_path)) == ["cycle_costs.json"]  # no temporary files left
    # gamma="auto" reads the stored table instead of timing (costs that make gamma 3 pay).
    stored = [1e-3, 1.1e-3, 1.2e-3, 1.3e-3]
    persist.save_costs(model, (1, 256, 3, "w4a8", "xla", None, None), stored)
    out = qj.generate(model, [[5, 6, 7]], max_new_tokens=4, mode="qspec", gamma="auto",
                      max_gamma=3, kernels="xla")
    assert not out.stats.get("plain_decoding")
    assert np.allclose(model.cycle_costs[(1, 256, 3, "w4a8", "xla", None, None)], stored)
    (tmp_path / "cycle_costs.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="qspec_jax"):
        assert persist.load_costs(model, key) is None
    assert "ignoring unreadable cost-table cache" in caplog.text
    persist.save_costs(model, key, [1.0, 2.0, 3.0, 4.0])  # rewrites the damaged file
    assert persist.load_costs(model, key) == [1.0, 2.0, 3.0, 4.0]


def test_unusable_cache_folder_fails_clearly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot use .* as the qspec_jax cache folder"):
        persist.enable_persistent_cache(blocker / "sub")
