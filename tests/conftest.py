"""Shared fixtures: tiny random Hugging Face models saved with save_pretrained."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import warnings

# XLA:CPU flags for the suite (see _fast_cpu_compiles)
FAST_COMPILE_FLAGS = ("--xla_cpu_use_fusion_emitters=false", "--xla_backend_optimization_level=0",
                      "--xla_llvm_disable_expensive_passes=true")


def _fast_cpu_compiles() -> None:
    """On a machine without an NVIDIA GPU (CI, laptops) nearly all of the suite's time is XLA:CPU
    compiling small programs that then run for milliseconds. XLA's older elemental fusion
    emitters instead of its MLIR fusion emitters, and LLVM at -O0 without its expensive passes,
    compile them about 2.5x faster (a greedy QSpec == AR test: 33.4 -> 13.1 s; the whole suite,
    2 cores, fresh-clone `.ci/run`: 1,462 -> 732 s of tests). No fast-math either way; every tolerance
    and exact-equality check holds with them (exact ones compare two programs compiled alike).
    Opt out with QSPEC_TEST_FAST_COMPILE=0; flags already in XLA_FLAGS win. Not applied where a
    GPU may run the tests (tests/gpu on the device): the GPU backend reads the same LLVM level.
    XLA aborts on flags it does not know, so a child process tries them first (once: pytest-xdist
    workers inherit the result through the environment)."""
    if os.environ.get("QSPEC_TEST_FAST_COMPILE", "1") == "0":
        return
    if shutil.which("nvidia-smi") or os.path.exists("/dev/nvidia0"):
        return
    flags = os.environ.get("XLA_FLAGS", "")
    new = [f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in flags]
    if not new:
        return
    trial = " ".join([flags, *new]).strip()
    probe = subprocess.run(
        [sys.executable, "-c", "import jax.numpy as jnp; jnp.arange(4).sum().block_until_ready()"],
        env={**os.environ, "XLA_FLAGS": trial, "JAX_PLATFORMS": "cpu"}, capture_output=True,
        text=True, timeout=300)
    if probe.returncode != 0:
        warnings.warn("tests/conftest.py: this jaxlib refuses the fast-compile XLA flags "
                      f"{new} ({probe.stderr.strip().splitlines()[-1:]}); the suite runs "
                      "without them (slower)")
        return
    os.environ["XLA_FLAGS"] = trial


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
