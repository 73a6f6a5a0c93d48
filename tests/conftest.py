"""Shared fixtures: tiny random Hugging Face models saved with save_pretrained."""

from __future__ import annotations

import gc
import os
import sys

import jax
import numpy as np
import pytest

# The CLI keeps compiled programs in a persistent cache by default; in-process CLI tests must not
# turn JAX's compilation cache on for the rest of the session (tests/test_persist.py runs the CLI
# in subprocesses with their own cache folders).
os.environ["QSPEC_JAX_CACHE_DIR"] = "off"
sys.path.insert(0, os.path.dirname(__file__))
from hf_models import ARCHS, build_hf_model  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
    """Drop JAX's compiled programs after each test module. XLA:CPU maps memory for every
    executable it keeps (about 3 mappings each) and the suite compiles a few thousand programs:
    kept to the end, the process passed 56,000 mappings, near Linux's default vm.max_map_count
    (65,530), past which compilation fails; full runs crashed with a segmentation fault inside
    XLA compilation late in the suite. Now the peak is ~23,000. Tests share compilations within
    a module; across modules almost never (5 duplicate compilations in a full run)."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True)
def _fresh_log_once():
    """Every test sees the library's one-time log lines anew (kernel_dispatch.log_once), so tests
    that assert on them do not depend on which tests ran before in the same process (pytest-xdist
    workers run a different mix each time)."""
    from qspec_jax import kernel_dispatch
    kernel_dispatch._ANNOUNCED.clear()
    yield


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """arch -> (folder saved with save_pretrained, the torch model)."""
    out = {}
    for arch in ARCHS:
        path = tmp_path_factory.mktemp(f"hf_{arch}")
        model = build_hf_model(arch)
        model.save_pretrained(path)
        out[arch] = (str(path), model)
    return out


@pytest.fixture
def rng():
    return np.random.RandomState(0)
