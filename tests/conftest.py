"""Shared fixtures: tiny random Hugging Face models saved with save_pretrained."""

from __future__ import annotations

import gc
import os
import shutil
import sys


def _fast_cpu_compiles() -> None:
    """On a machine without an NVIDIA GPU (CI, laptops) nearly all of the suite's time is XLA:CPU
    compiling small programs that then run for milliseconds. LLVM at -O0 without its expensive
    passes compiles them ~45% faster (a greedy QSpec == AR test: 33.4 -> 18.4 s; the whole suite on 2
    cores 1,462 -> 987 s). No fast-math either way; every tolerance and exact-equality check
    holds at -O0 (exact ones compare two programs compiled alike). Opt out with
    QSPEC_TEST_FAST_COMPILE=0; flags already in XLA_FLAGS win. Not applied where a GPU may run
    the tests (tests/gpu on the device): the GPU backend reads the same LLVM level."""
    if os.environ.get("QSPEC_TEST_FAST_COMPILE", "1") == "0":
        return
    if shutil.which("nvidia-smi") or os.path.exists("/dev/nvidia0"):
        return
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"):
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags


_fast_cpu_compiles()  # before jax reads XLA_FLAGS (at its first backend use)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

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
