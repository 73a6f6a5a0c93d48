"""Benchmark of the int4 GEMM kernels (issue 6) against XLA peers, and a tile-config sweep.

  PYTHONPATH=. python3 experiments/bench_kernels.py --out $OUT --commit <hash>       # full bench
  PYTHONPATH=. python3 experiments/bench_kernels.py --sweep --out $OUT                # config sweep
  PYTHONPATH=. python3 experiments/bench_kernels.py --quick                           # CPU smoke run

Variants `ours_mgpu_w4a16` / `ours_mgpu_w4a8` (name them in --variants): the Mosaic GPU kernel
(pallas_kernels/w4_mgpu.py, int4 [N, K] weights, the model's default config), which is what the
model runs for M <= 64 in its default layout on Hopper; rows say "skipped: <reason>" off Hopper
and for group scales. (probe_mgpu.py sweeps its configs.)

Peer `tokamax_w4a16` (not in the default variant list; name it in --variants): Google's tokamax
(PyPI, Python >= 3.12, jax >= 0.11.1), its Hopper Mosaic GPU quantized ragged dot with one
group (tokamax/_src/ops/ragged_dot/pallas_mosaic_gpu_kernel_sm90_quant.py). It is not in the
device image; the git-ignored wheels/ folder holds it and the missing pure-Python dependencies
(and pydantic_core for CPython 3.12 x86-64): `bash experiments/fetch_tokamax_wheels.sh` fills it.
On the device (carry wheels/):
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site wheels/*.whl && export PYTHONPATH=.:/tmp/site
  python3 experiments/bench_kernels.py --variants ours_w4a16,xla_s4_dot,tokamax_w4a16 --ms 1,4,16,64
Where tokamax cannot run (not installed, not a Hopper GPU, CPU, a shape its kernel refuses
with NotImplementedError) its rows say "skipped: <reason>" instead of failing the run.

Timing: device time of the kernels only, through CUPTI (jax.experimental.mosaic.gpu.profiler,
the same counters as CUDA events but per kernel, so no Python dispatch), fallback: a jitted
lax.fori_loop (difference of two loop lengths). Each timed call applies the kernel to R
distinct weight copies (R * weight bytes >= 256 MB, so the 50 MB L2 cannot serve the weights
from cache as it would with one copy); the figure is the per-call time = total / R; median and
p10/p90 over the iterations.
Correctness: every (variant, shape, M) of our kernels is checked on fresh random inputs against
the plain-jnp reference of its own file (relative Frobenius error; w4a8 per-channel also
bit-exact count).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import TileConfig, supported
from pallas_kernels.w4a16_matmul import w4a16_matmul, w4a16_matmul_reference, unpack_int4
import importlib
w4a16_mod = importlib.import_module("pallas_kernels.w4a16_matmul")
w4a8_mod = importlib.import_module("pallas_kernels.w4a8_matmul")
from pallas_kernels.w4a8_matmul import (w4a8_matmul, w4a8_matmul_reference,
                                        quantize_per_token_reference)

SHAPES_8B = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # K x N (qkv, o, gate_up, down)
# Llama-3-70B (hidden 8192, 64 query / 8 KV heads of 128, intermediate 28672), same order: the
# issue's "one larger model".
SHAPES_70B = [(8192, 10240), (8192, 8192), (8192, 57344), (28672, 8192)]
# Llama-3.2-1B (hidden 2048, 32 query / 8 KV heads of 64, intermediate 8192), same order: where
# the 1B grid's w4a8 draft step was slower than a w4a16 step (sweepgrid_h200_llama3.2-1b.md).
SHAPES_1B = [(2048, 3072), (2048, 2048), (2048, 16384), (8192, 2048)]
SHAPE_SETS = {"8b": SHAPES_8B, "70b": SHAPES_70B, "1b": SHAPES_1B}


def add_run_args(p: argparse.ArgumentParser, *, iters: int, quick_help: str) -> None:
    """The micro-benchmarks' common options (bench_fused, bench_hadamard): --iters, --out,
    --commit, --tag, --quick."""
    p.add_argument("--iters", type=int, default=iters)
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--commit", default=None)
    p.add_argument("--tag", default="h200")
    p.add_argument("--quick", action="store_true", help=quick_help)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'8b', '70b' or a comma list of KxN (sets may be mixed in: '8b,70b', '8b,1024x512')."""
    shapes = []
    for part in text.split(","):
        part = part.strip().lower()
        if part in SHAPE_SETS:
            shapes += SHAPE_SETS[part]
            continue
        try:
            K, N = (int(v) for v in part.split("x"))
        except ValueError:
            raise ValueError(f"--shapes: {part!r} is neither a shape set ({', '.join(SHAPE_SETS)}) "
                             "nor KxN (e.g. 4096x6144)") from None
        shapes.append((K, N))
    return shapes
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096]
HBM_TBS = 4.8
PEAK_BF16 = 990.0  # TFLOP/s dense
PEAK_INT8 = 1979.0  # TOP/s dense
L2_BYTES_TARGET = 256 << 20


# ----------------------------------------------------------------------------- timing
def _cupti_measure(fn, args, iters):
    from jax.experimental.mosaic.gpu import profiler
    _, ts = profiler.measure(fn, iterations=iters)(*args)
    if ts is None:
        raise RuntimeError("CUPTI returned no kernels")
    if not isinstance(ts, (list, tuple)):
        ts = [ts]
    return np.asarray(ts, dtype=np.float64) * 1e3  # us per iteration


def _loop_measure(fn, args, iters):
    """Fallback: per-iteration time of a jitted fori_loop (difference of two lengths)."""
    x, rest = args[0], args[1:]

    def make(n):
        @jax.jit
        def run(x, *rest):
            def body(i, c):
                xx = x + (c * 0).astype(x.dtype)  # carried dependency: no hoisting out of the loop
                outs = jax.tree_util.tree_leaves(fn(xx, *rest))
                return c + sum(o.reshape(-1)[0].astype(jnp.float32) for o in outs)
            return lax.fori_loop(0, n, body, jnp.float32(0))
        return run

    r1, r2 = make(2), make(2 + iters)
    jax.block_until_ready(r1(x, *rest)); jax.block_until_ready(r2(x, *rest))
    out = []
    for _ in range(5):
        t0 = time.perf_counter(); jax.block_until_ready(r1(x, *rest)); t1 = time.perf_counter()
        jax.block_until_ready(r2(x, *rest)); t2 = time.perf_counter()
        out.append(((t2 - t1) - (t1 - t0)) / iters * 1e6)
    return np.asarray(out)


def _pipelined_measure(fn, args, iters):
    """Fallback without extra compiles: back-to-back async calls, blocked once per batch of 10."""
    jax.block_until_ready(fn(*args))
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        for _ in range(10):
            r = fn(*args)
        jax.block_until_ready(r)
        out.append((time.perf_counter() - t0) / 10 * 1e6)
    return np.asarray(out)


def _host_measure(fn, args, iters):
    jax.block_until_ready(fn(*args))
    out = []
    for _ in range(iters):
        t0 = time.perf_counter(); jax.block_until_ready(fn(*args)); out.append((time.perf_counter() - t0) * 1e6)
    return np.asarray(out)


TIMER = {"name": None}


def measure(fn, args, iters):
    if TIMER["name"] in (None, "cupti"):
        try:
            r = _cupti_measure(fn, args, iters)
            TIMER["name"] = "cupti"
            return r
        except Exception as e:  # noqa: BLE001
            if TIMER["name"] == "cupti":
                raise
            TIMER["name"] = "pipelined" if jax.devices()[0].platform == "gpu" else "host"
            print(f"[timer] CUPTI unavailable ({type(e).__name__}: {e}); using {TIMER['name']} timing",
                  flush=True)
    if TIMER["name"] == "loop":
        return _loop_measure(fn, args, iters)
    if TIMER["name"] == "pipelined":
        return _pipelined_measure(fn, args, iters)
    return _host_measure(fn, args, iters)


# ----------------------------------------------------------------------------- data
def n_copies(nbytes: int, quick: bool) -> int:
    if quick:
        return 1
    return int(min(16, max(1, math.ceil(L2_BYTES_TARGET / max(nbytes, 1)))))


def make_weights(key, K, N, G, R):
    ws = []
    for r in range(R):
        k1, k2 = jax.random.split(jax.random.fold_in(key, r))
        qw = jax.random.randint(k1, (K // 2, N), -128, 128, jnp.int32).astype(jnp.int8)
        s = jax.random.uniform(k2, (K // G, N), jnp.float32, 0.5, 1.5) * 0.02
        ws.append((qw, s))
    return ws


def make_x(key, M, K):
    return jax.random.normal(key, (M, K), jnp.float32).astype(jnp.bfloat16)


# ----------------------------------------------------------------------------- variants
def _cfg16(M, K, N, G, dequant):
    return dataclasses.replace(w4a16_mod.default_config(M, K, N, G), dequant=dequant)


def _cfg8(M, K, N, G, dequant):
    return dataclasses.replace(w4a8_mod.default_config(M, K, N, G), dequant=dequant)


def _ours_w4a16(cfg=None, backend=None):
    def f(x, ws):
        return tuple(w4a16_matmul(x, qw, s, config=cfg, backend=backend) for qw, s in ws)
    return f


def _ours_w4a8(cfg=None):
    def f(xq, sx, ws):
        return tuple(w4a8_matmul(xq, sx, qw, s, config=cfg) for qw, s in ws)
    return f


def _ours_w4a8_q(cfg=None):
    def f(x, ws):
        xq, sx = quantize_per_token_reference(x, 8)
        return tuple(w4a8_matmul(xq, sx, qw, s, config=cfg) for qw, s in ws)
    return f


def _ours_w4a8_fq(cfg=None):
    """Float activations in, quantized per token inside the int8 kernel (the scales' max
    reduction stays in XLA, as in the model)."""
    def f(x, ws):
        sx = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True) / 127.0
        return tuple(w4a8_matmul(x, sx, qw, s, config=cfg, bits=8) for qw, s in ws)
    return f


def _ours_mgpu(int8: bool):
    """The Mosaic GPU kernel (pallas_kernels/w4_mgpu.py) over the int4 [N, K] weights with the
    model's default config: what the model runs for M <= 64 in the default layout on Hopper."""
    from pallas_kernels.w4_mgpu import w4_mgpu_matmul
    if int8:
        def f(xq, sx, ws):
            return tuple(w4_mgpu_matmul(xq, w, s[0], sx.reshape(-1)) for w, s in ws)
    else:
        def f(x, ws):
            return tuple(w4_mgpu_matmul(x, w, s[0]) for w, s in ws)
    return f


MGPU_VARIANTS = ("ours_mgpu_w4a16", "ours_mgpu_w4a8")
W4A8_FLOAT_IN = ("ours_w4a8_quant", "ours_w4a8_fq")  # w4a8 kernels that quantize float x first
W4A8_VARIANTS = ("ours_w4a8", "ours_w4a8_magic", "ours_w4a8_gemv", "ours_w4a8_gemvm",
                 "ours_w4a8_int8s", "ours_mgpu_w4a8")  # int8 activations in
# variant -> largest M it is run at (None: all)
VARIANT_MAX_M = {"ours_mgpu_w4a16": 256, "ours_mgpu_w4a8": 256,  # (w4_mgpu.MAX_M)
                 "ours_w4a16_cvt": 128, "ours_w4a16_magic": 128, "ours_w4a8_magic": 128,
                 "ours_w4a16_cvts": 128, "ours_w4a16_asm": 128,
                 "ours_w4a16_gemv": w4a16_mod.GEMV_MAX_M, "ours_w4a8_gemv": w4a16_mod.GEMV_MAX_M,
                 "ours_w4a16_gemvm": w4a16_mod.GEMV_MAX_M, "ours_w4a8_gemvm": w4a16_mod.GEMV_MAX_M}
GEMV_VARIANTS = {"ours_w4a16_gemv": "gemv", "ours_w4a8_gemv": "gemv",
                 "ours_w4a16_gemvm": "gemv_magic", "ours_w4a8_gemvm": "gemv_magic"}
VARIANT_MIN_M = {"ours_w4a16_triton": 128}


def _xla_bf16(x, ws):
    return tuple(jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype) for w in ws)


def _xla_int4(x, ws):
    return tuple(jnp.dot(x, w.astype(jnp.bfloat16) * s.astype(jnp.bfloat16),
                         preferred_element_type=jnp.float32).astype(x.dtype) for w, s in ws)


def _xla_s4_dot(x, ws):
    """int4 weights in XLA's own s4 type, converted inside the dot (XLA may fuse the convert
    into its GEMM), per-channel scale on the f32 result."""
    return tuple((jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32) * s
                  ).astype(x.dtype) for w, s in ws)


def _xla_s4_w8(xq, sx, ws):
    return tuple((sx * (lax.dot(xq, w.astype(jnp.int8), preferred_element_type=jnp.int32)
                        .astype(jnp.float32) * s)).astype(jnp.bfloat16) for w, s in ws)


def _xla_int8(xq, sx, ws):
    return tuple((sx * (lax.dot(xq, w, preferred_element_type=jnp.int32).astype(jnp.float32) * s)
                  ).astype(jnp.bfloat16) for w, s in ws)


# ----------------------------------------------------------------------------- tokamax (peer)
_TOKAMAX: dict = {}


def _stub_xprof():
    """tokamax/_src/benchmarking.py imports xprof.cli.tools.get_kernel_stats_tool at module level
    (tokamax's own benchmarking; this bench never calls it). The xprof wheel is 22 MB with its
    own dependencies, so where it is missing a stub module stands in for it."""
    import importlib.util
    import types
    if importlib.util.find_spec("xprof") is not None:
        return
    mods = {n: types.ModuleType(n) for n in ("xprof", "xprof.cli", "xprof.cli.tools")}

    def get_kernel_stats_tool(*a, **k):
        raise RuntimeError("xprof is a stub in bench_kernels (tokamax benchmarking is not used)")
    mods["xprof.cli.tools"].get_kernel_stats_tool = get_kernel_stats_tool
    mods["xprof"].cli = mods["xprof.cli"]; mods["xprof.cli"].tools = mods["xprof.cli.tools"]
    for n in ("xprof", "xprof.cli"):
        mods[n].__path__ = []
    sys.modules.update(mods)


def _import_tokamax_ragged_dot():
    """Imports tokamax's Mosaic GPU ragged dot. First `import tokamax` (the package __init__
    imports every op, some through optional kernels such as jax_triton); if that fails, imports
    only tokamax._src.ops.ragged_dot.pallas_mosaic_gpu under a bare package module (what the
    public tokamax.ragged_dot_general(..., implementation="mosaic") calls on an NVIDIA GPU)."""
    import importlib
    import importlib.util
    import types
    try:
        import tokamax  # noqa: F401
        how = "import tokamax"
    except Exception as e:  # noqa: BLE001
        first = f"{type(e).__name__}: {str(e)[:200]}"
        for n in [n for n in sys.modules if n == "tokamax" or n.startswith("tokamax.")]:
            del sys.modules[n]
        spec = importlib.util.find_spec("tokamax")
        pkg = types.ModuleType("tokamax")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = spec
        sys.modules["tokamax"] = pkg
        how = f"bare package (import tokamax failed: {first})"
    mod = importlib.import_module("tokamax._src.ops.ragged_dot.pallas_mosaic_gpu")
    base = importlib.import_module("tokamax._src.ops.ragged_dot.base")
    common = importlib.import_module("tokamax._src.ops.ragged_dot.pallas_mosaic_gpu_common")
    return mod, base, common, how


def tokamax_api():
    """What the tokamax_w4a16 variant needs, imported once; raises RuntimeError(reason) where
    tokamax cannot run (the caller records "skipped: <reason>")."""
    if "error" in _TOKAMAX:
        raise RuntimeError(_TOKAMAX["error"])
    if "op_cls" in _TOKAMAX:
        return _TOKAMAX
    try:
        dev = jax.devices()[0]
        if dev.platform != "gpu":
            raise RuntimeError(f"tokamax's int4 matmul is a Mosaic GPU (Hopper sm90) kernel; "
                               f"the platform here is {dev.platform}")
        if sys.version_info < (3, 12):
            raise RuntimeError(f"tokamax needs Python >= 3.12 (this is {platform.python_version()})")
        if jax.__version_info__ < (0, 11, 1):
            raise RuntimeError(f"tokamax 0.0.17 needs jax >= 0.11.1 (this is {jax.__version__})")
        import importlib.util
        if importlib.util.find_spec("tokamax") is None:
            raise RuntimeError("tokamax is not installed (see this file's docstring: pip install "
                               "--no-index --no-deps --target /tmp/site wheels/*.whl)")
        _stub_xprof()
        mod, base, common, how = _import_tokamax_ragged_dot()
        import qwix
        try:  # tokamax parses its absl flags on first read: do it here, not in compile threads
            importlib.import_module("tokamax._src.config").autotuning_cache_miss_fallback.value
        except Exception:  # noqa: BLE001
            pass
        try:
            from importlib.metadata import version
            tv = version("tokamax")
        except Exception:  # noqa: BLE001
            tv = "?"
        _TOKAMAX.update(op_cls=mod.PallasMosaicGpuRaggedDot, config_cls=mod.Config,
                        grid_dim=common.MatmulDimension, dims=base.TRANS_RHS_RAGGED_DOT_DIM_NUMS,
                        qarray=qwix.QArray, version=tv, how=how)
        print(f"[tokamax] {tv} via {how}", flush=True)
        return _TOKAMAX
    except Exception as e:  # noqa: BLE001
        _TOKAMAX["error"] = (str(e) if isinstance(e, RuntimeError)
                             else f"{type(e).__name__}: {e}")[:300]
        raise RuntimeError(_TOKAMAX["error"]) from e


def tokamax_layout(qw, s):
    """Our (packed int4 [K/2, N], f32 scales [K/G, N]) -> tokamax's preferred 'enk' layout
    (pallas_mosaic_gpu.py: "optimized for physical layout mk,enk->mn"): int4 [1, N, K] and bf16
    scales [1, N, K/G], w[n, k] ~ q[0, n, k] * s[0, n, k // G]. The sm90 kernel converts the int4
    tile to the scale dtype and multiplies by the scale before the bf16 MMA, so the scales are
    bf16 (the MMA operand dtype); f32 scales would make an f32 weight tile for a bf16 x."""
    q = unpack_int4(qw).T.astype(jnp.int4)[None]
    return q, s.T.astype(jnp.bfloat16)[None]


def tokamax_weights(qw, s):
    tk = tokamax_api()
    q, sc = tokamax_layout(qw, s)
    return tk["qarray"](qvalue=q, scale=sc, qtype=jnp.int4)


def tokamax_config(K, G):
    """tokamax's own sm90 heuristic for a quantized rhs (PallasMosaicGpuRaggedDot.
    _get_heuristics_config: block 64x64, 2 stages, persistent, M-minor grid) with block_k =
    min(K-subchannel, 256). Given explicitly because that heuristic reads the subchannel as the
    scale tile along axis 1 of the rhs as passed, N in the [1, N, K] layout used here (tile 1:
    block_k would be 1)."""
    tk = tokamax_api()
    return tk["config_cls"](block_m=64, block_n=64, block_k=min(G, 256), num_stages=2, split_k=1,
                            persistent=True, grid_minor_dim=tk["grid_dim"].M, grid_tile_width=1)


def _tokamax_w4a16(op, dims):
    """y = x @ W with tokamax's quantized ragged dot, one group holding all M rows; rhs in the
    [1, N, K] layout with TRANS_RHS dimension numbers (contract x axis 1 with rhs axis 2), so
    the kernel reads the weight as stored (its rhs.mT and the kernel's own .mT cancel)."""
    def f(x, ws):
        gs = jnp.full((1,), x.shape[0], jnp.int32)
        return tuple(op(x, w, group_sizes=gs, ragged_dot_dimension_numbers=dims) for w in ws)
    return f


def bytes_read(variant, M, K, N, G):
    xb = M * K * (1 if variant in W4A8_VARIANTS + ("xla_w8a8", "xla_s4_w8") else 2)
    if variant.startswith("ours") or variant in ("xla_int4_dequant", "xla_s4_dot", "xla_s4_w8"):
        return K * N // 2 + 4 * N * (K // G) + xb
    if variant == "tokamax_w4a16":  # int4 weight + bf16 scales
        return K * N // 2 + 2 * N * (K // G) + xb
    if variant == "xla_bf16":
        return 2 * K * N + xb
    if variant == "xla_w8a8":
        return K * N + 4 * N + 4 * M + xb
    raise KeyError(variant)


def weight_bytes(K, N, G):
    return K * N // 2 + 4 * N * (K // G)


# ----------------------------------------------------------------------------- bench
@dataclasses.dataclass
class Job:
    variant: str
    K: int
    N: int
    M: int
    G: int
    cfg: TileConfig | None
    fn: object = None
    args: tuple = ()
    R: int = 1
    compiled: object = None
    error: str | None = None
    skip: str | None = None  # "skipped: <reason>": a peer that cannot run here (no row timing)
    ref_w: tuple | None = None  # (packed int4 [K/2, N], f32 scales) when args hold another format
    note: str | None = None


# Peers whose NotImplementedError at trace time (shape/platform refused) is a skip, not an error.
SKIPPABLE_VARIANTS = ("tokamax_w4a16",)


def _compile(job: Job):
    if job.skip:
        return job
    try:
        job.compiled = jax.jit(job.fn).lower(*job.args).compile()
    except NotImplementedError as e:
        if job.variant in SKIPPABLE_VARIANTS:
            job.skip = f"skipped: NotImplementedError: {str(e)[:300]}"
        else:
            job.error = f"{type(e).__name__}: {str(e)[:400]}"
    except Exception as e:  # noqa: BLE001
        job.error = f"{type(e).__name__}: {str(e)[:400]}"
    return job


def compile_all(jobs, workers):
    t0 = time.time()
    if workers <= 1:
        for j in jobs:
            _compile(j)
    else:
        with cf.ThreadPoolExecutor(workers) as ex:
            list(ex.map(_compile, jobs))
    print(f"[compile] {len(jobs)} programs in {time.time() - t0:.1f}s "
          f"({sum(j.error is not None for j in jobs)} failed, "
          f"{sum(j.skip is not None for j in jobs)} skipped)", flush=True)


def build_jobs(shapes, ms, variants, G_of, quick, sweep_cfgs=None):
    """Creates data (shared per shape) and jobs. Returns (jobs, checks)."""
    jobs = []
    key = jax.random.key(int(time.time()) & 0xFFFF)
    for (K, N) in shapes:
        G = G_of(K)
        if not supported(None, K, N, G)[0]:
            print(f"skip {K}x{N}: {supported(None, K, N, G)[1]}")
            continue
        R4 = n_copies(weight_bytes(K, N, G), quick)
        ws4 = make_weights(jax.random.fold_in(key, K * 7 + N), K, N, G, R4)
        need = set(variants)
        ws16 = ws8 = ws_int4 = None
        if "xla_bf16" in need:
            R16 = n_copies(2 * K * N, quick)
            ws16 = [(unpack_int4(ws4[r % R4][0]).astype(jnp.bfloat16)
                     * ws4[r % R4][1].astype(jnp.bfloat16)) for r in range(R16)]
        if need & {"xla_int4_dequant", "xla_s4_dot", "xla_s4_w8"}:
            ws_int4 = [(unpack_int4(qw).astype(jnp.int4), s) for qw, s in ws4]
        ws_nk = mgpu_skip = None
        if need & set(MGPU_VARIANTS) and jax.default_backend() != "gpu":
            mgpu_skip = "skipped: the Mosaic GPU kernel runs on an NVIDIA Hopper GPU only"
        elif need & set(MGPU_VARIANTS) and G != K:
            mgpu_skip = f"skipped: the Mosaic GPU kernel takes per-channel scales only (group {G})"
        elif need & set(MGPU_VARIANTS):
            from pallas_kernels.w4_mgpu import nk_from_half_split
            ws_nk = [(nk_from_half_split(qw), s) for qw, s in ws4]
        if "xla_w8a8" in need:
            R8 = n_copies(K * N, quick)
            ws8 = [(unpack_int4(ws4[r % R4][0]), ws4[r % R4][1]) for r in range(R8)]
        ws_tk = tk_op = tk_skip = None
        if "tokamax_w4a16" in need:
            try:
                tk = tokamax_api()
                tk_cfg = tokamax_config(K, G)
                tk_op = tk["op_cls"](config=tk_cfg)
                ws_tk = [tokamax_weights(qw, s) for qw, s in ws4]
                tk_note = f"tokamax {tk['version']}: {tk_cfg}"
            except Exception as e:  # noqa: BLE001
                tk_skip = f"skipped: {str(e)[:300]}"
                print(f"[tokamax_w4a16] {K}x{N}: {tk_skip}", flush=True)
        for M in ms:
            x = make_x(jax.random.fold_in(key, M * 131 + K + N), M, K)
            xq, sx = quantize_per_token_reference(x, 8)
            for v in variants:
                if M > VARIANT_MAX_M.get(v, 1 << 30) or M < VARIANT_MIN_M.get(v, 0):
                    continue
                cfgs = [None]
                if sweep_cfgs is not None and (v in ("ours_w4a16", "ours_w4a8")
                                               or v in GEMV_VARIANTS):
                    cfgs = sweep_cfgs(v, M)
                for cfg in cfgs:
                    if v == "ours_w4a16":
                        j = Job(v, K, N, M, G, cfg, _ours_w4a16(cfg), (x, ws4), R4)
                    elif v == "ours_w4a16_triton":
                        j = Job(v, K, N, M, G, cfg, _ours_w4a16(cfg, "triton"), (x, ws4), R4)
                    elif v in ("ours_w4a16_gemv", "ours_w4a16_gemvm"):
                        c = cfg or w4a16_mod.gemv_config(M, K, N, G, GEMV_VARIANTS[v])
                        j = Job(v, K, N, M, G, c, _ours_w4a16(c), (x, ws4), R4)
                    elif v in ("ours_w4a16_cvt", "ours_w4a16_magic", "ours_w4a16_cvts",
                               "ours_w4a16_asm"):
                        c = _cfg16(M, K, N, G, v.rsplit("_", 1)[1])
                        j = Job(v, K, N, M, G, c, _ours_w4a16(c), (x, ws4), R4)
                    elif v == "ours_w4a8":
                        j = Job(v, K, N, M, G, cfg, _ours_w4a8(cfg), (xq, sx, ws4), R4)
                    elif v in ("ours_w4a8_gemv", "ours_w4a8_gemvm"):
                        c = cfg or w4a16_mod.gemv_config(M, K, N, G, GEMV_VARIANTS[v])
                        j = Job(v, K, N, M, G, c, _ours_w4a8(c), (xq, sx, ws4), R4)
                    elif v in ("ours_w4a8_magic", "ours_w4a8_int8s"):
                        c = _cfg8(M, K, N, G, "magic" if v.endswith("magic") else "int8s")
                        j = Job(v, K, N, M, G, c, _ours_w4a8(c), (xq, sx, ws4), R4)
                    elif v == "ours_w4a8_quant":
                        j = Job(v, K, N, M, G, cfg, _ours_w4a8_q(cfg), (x, ws4), R4)
                    elif v == "ours_w4a8_fq":
                        j = Job(v, K, N, M, G, cfg, _ours_w4a8_fq(cfg), (x, ws4), R4)
                    elif v in MGPU_VARIANTS and mgpu_skip:
                        j = Job(v, K, N, M, G, None, skip=mgpu_skip)
                    elif v == "ours_mgpu_w4a16":
                        j = Job(v, K, N, M, G, None, _ours_mgpu(False), (x, ws_nk), R4, ref_w=ws4[0])
                    elif v == "ours_mgpu_w4a8":
                        j = Job(v, K, N, M, G, None, _ours_mgpu(True), (xq, sx, ws_nk), R4,
                                ref_w=ws4[0])
                    elif v == "xla_bf16":
                        j = Job(v, K, N, M, G, None, _xla_bf16, (x, ws16), len(ws16))
                    elif v == "xla_int4_dequant":
                        j = Job(v, K, N, M, G, None, _xla_int4, (x, ws_int4), len(ws_int4))
                    elif v == "xla_s4_dot":
                        j = Job(v, K, N, M, G, None, _xla_s4_dot, (x, ws_int4), len(ws_int4))
                    elif v == "xla_s4_w8":
                        j = Job(v, K, N, M, G, None, _xla_s4_w8, (xq, sx, ws_int4), len(ws_int4))
                    elif v == "xla_w8a8":
                        j = Job(v, K, N, M, G, None, _xla_int8, (xq, sx, ws8), len(ws8))
                    elif v == "tokamax_w4a16":
                        if tk_skip:
                            j = Job(v, K, N, M, G, None, skip=tk_skip)
                        else:
                            j = Job(v, K, N, M, G, None, _tokamax_w4a16(tk_op, tk["dims"]),
                                    (x, ws_tk), len(ws_tk), ref_w=ws4[0], note=tk_note)
                    else:
                        raise KeyError(v)
                    jobs.append(j)
    return jobs


def check_job(job: Job):
    """Runs the compiled program once on its inputs and compares copy 0 with the reference."""
    out = job.compiled(*job.args)[0]
    if job.variant == "ours_mgpu_w4a8":
        xq, sx, _ = job.args
        ref = w4a8_matmul_reference(xq, sx, *job.ref_w)
    elif job.variant == "ours_mgpu_w4a16":
        ref = w4a16_matmul_reference(job.args[0], *job.ref_w)
    elif job.variant.startswith("ours_w4a16"):
        x, ws = job.args
        ref = w4a16_matmul_reference(x, *ws[0])
    elif job.variant in W4A8_VARIANTS:
        xq, sx, ws = job.args
        ref = w4a8_matmul_reference(xq, sx, *ws[0])
    elif job.variant in ("ours_w4a8_quant", "ours_w4a8_fq"):
        x, ws = job.args
        xq, sx = quantize_per_token_reference(x, 8)
        ref = w4a8_matmul_reference(xq, sx, *ws[0])
    elif job.ref_w is not None:  # peers computing W4A16 from the same int4 weights (tokamax)
        ref = w4a16_matmul_reference(job.args[0], *job.ref_w)
    else:
        return None, None
    o = np.asarray(out.astype(jnp.float32)); r = np.asarray(ref.astype(jnp.float32))
    err = float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-30))
    if not np.isfinite(o).all():
        err = float("inf")
    exact = float(np.mean(o == r))
    return err, exact


def run_jobs(jobs, iters, check=True, partial_path=None):
    rows = []
    t0 = time.time()
    for ij, j in enumerate(jobs):
        if partial_path and ij % 40 == 39:
            with open(partial_path, "w") as f:
                json.dump(rows, f)
            print(f"[run] {ij}/{len(jobs)} rows in {time.time() - t0:.0f}s", flush=True)
        row = dict(variant=j.variant, K=j.K, N=j.N, M=j.M, G=j.G,
                   config=(j.cfg.short() if j.cfg else None), R=j.R)
        if j.note:
            row["note"] = j.note
        if j.skip:
            row["skipped"] = j.skip
            rows.append(row)
            continue
        if j.error:
            row["error"] = j.error
            rows.append(row)
            continue
        try:
            if check:
                err, exact = check_job(j)
                row["rel_err"], row["frac_bitexact"] = err, exact
            ts = measure(j.fn if TIMER["name"] == "loop" else j.compiled, j.args, iters) / j.R
            med = float(np.median(ts))
            row.update(us_median=med, us_p10=float(np.percentile(ts, 10)),
                       us_p90=float(np.percentile(ts, 90)), n_iter=len(ts))
            b = bytes_read(j.variant, j.M, j.K, j.N, j.G)
            row["TBps"] = b / med / 1e6
            row["TBps_weights"] = (weight_bytes(j.K, j.N, j.G) if j.variant.startswith("ours")
                                   else b - j.M * j.K) / med / 1e6
            row["pct_hbm"] = 100 * row["TBps"] / HBM_TBS
            fl = 2 * j.M * j.N * j.K
            row["TFLOPs"] = fl / med / 1e6
            peak = (PEAK_INT8 if j.variant in W4A8_VARIANTS + W4A8_FLOAT_IN + ("xla_w8a8", "xla_s4_w8")
                    else PEAK_BF16)
            row["config_full"] = repr(j.cfg) if j.cfg else None
            row["pct_mma"] = 100 * row["TFLOPs"] / peak
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        rows.append(row)
        j.compiled = None  # free executables as we go
    return rows


# ----------------------------------------------------------------------------- sweep configs
def sweep_cfgs_many_programs(variant, M):
    """Configurations with many small programs (large split-K, narrow N tiles): the first H200
    gemv_magic sweep (kernels_h200_gemvm_sweep.json) got faster with every doubling of the
    program count (latency-bound loads), without saturating at 512-768 programs."""
    C = TileConfig
    if variant in GEMV_VARIANTS:
        d = GEMV_VARIANTS[variant]
        return ([C(16, bn, bk, sp, 4, 3, dequant=d) for bn in (64, 128) for bk in (16, 32)
                 for sp in (16, 32, 64)]
                + [C(16, 32, 32, sp, 4, 3, dequant=d) for sp in (32, 64)]
                + [C(16, 64, 32, 32, 2, 3, dequant=d), C(16, 128, 32, 32, 2, 3, dequant=d)])
    if M > 16:  # verify-pass sizes: one M tile of up to 64 rows, split-K 2-8
        bm = min(64, M)
        ds = ("int8",) if variant == "ours_w4a8" else ("cvt", "magic")
        return [C(bm, bn, bk, sp, 4, 4, tr, dequant=d) for d in ds for tr in (False, True)
                for bn in (64, 128) for bk in ((64,) if len(ds) == 2 else (64, 128))
                for sp in (2, 4, 8)]
    d = "int8" if variant == "ours_w4a8" else "cvt"
    return [C(16, bn, bk, sp, 4, 4, dequant=d)
            for bn, bk in ((128, 128), (64, 128), (128, 64), (64, 64), (32, 128))
            for sp in (8, 16, 32)]


def sweep_cfgs_asm(variant, M):
    """Tiles for the inline-PTX nibbles (w4a16 dequant="asm"), chosen at 829d358 by swapping
    "asm" into the "cvt" / "magic" tiles: N tile, K step, split-K and pipeline depth around
    them, plain and transposed; at M > 16 one M tile of up to 64 rows."""
    C = TileConfig
    if M <= 16:
        return [C(16, bn, bk, sp, 4, 4, tr, dequant="asm")
                for bn, bk in ((128, 64), (64, 64), (128, 32), (256, 64), (64, 128))
                for sp in (4, 8, 16) for tr in (False, True)]
    bm = min(64, M)
    return [C(bm, bn, 64, sp, 4, 4, tr, dequant="asm") for bn in (64, 128)
            for sp in (1, 2, 4, 8) for tr in (False, True)]


def sweep_cfgs(variant, M):
    C = TileConfig
    if variant in GEMV_VARIANTS:  # FMA path: tiles x split-K x warps
        d = GEMV_VARIANTS[variant]
        return ([C(16, bn, bk, sp, 4, 3, dequant=d)
                 for bn, bk in ((128, 32), (256, 32), (512, 16), (256, 64)) for sp in (4, 8, 16)]
                + [C(16, 256, 32, 8, 8, 3, dequant=d), C(16, 512, 32, 8, 8, 3, dequant=d)])
    if M <= 16:
        cs = [C(16, 64, 256, 1, 4, 4), C(16, 64, 256, 2, 4, 4), C(16, 64, 256, 4, 4, 4),
              C(16, 64, 128, 4, 4, 4), C(16, 128, 256, 4, 4, 4), C(16, 128, 128, 8, 4, 4),
              C(16, 32, 256, 2, 4, 4), C(16, 32, 512, 4, 4, 3), C(16, 64, 512, 2, 4, 3),
              C(16, 128, 256, 4, 8, 4), C(16, 64, 256, 2, 4, 4, True), C(16, 128, 256, 4, 4, 4, True),
              C(16, 128, 128, 2, 4, 4, True), C(16, 256, 128, 8, 4, 4, True), C(16, 64, 256, 1, 4, 4, True)]
    elif M <= 64:
        cs = [C(64, 64, 128, 1, 4, 4), C(64, 64, 128, 2, 4, 4), C(64, 128, 64, 1, 4, 4),
              C(64, 128, 64, 2, 4, 4), C(64, 128, 128, 1, 4, 4, True), C(64, 64, 128, 2, 4, 4, True),
              C(64, 128, 128, 2, 8, 3, True), C(32, 64, 128, 2, 4, 4)]
    else:
        cs = [C(128, 128, 64, 1, 8, 3), C(128, 128, 64, 1, 4, 4), C(128, 256, 64, 1, 8, 3),
              C(64, 128, 64, 1, 4, 4), C(128, 128, 128, 1, 8, 3), C(128, 128, 64, 1, 8, 3, True),
              C(64, 256, 64, 1, 8, 3, True), C(128, 256, 64, 1, 8, 3, True), C(256, 128, 64, 1, 8, 3)]
    return cs


# ----------------------------------------------------------------------------- report
def qspec_implication(rows, shapes, gamma=3, a=0.9):
    """Per-layer linear time (sum over the 4 shapes) -> QSpec cycle vs plain W4A16 decoding.

    T16(M) = fastest of our w4a16 variants (what default_config then selects), T8(M) = fastest of
    our w4a8 variants; T8q adds the measured cost of the per-token quantization (XLA fusion).
    """
    t = {}
    for r in rows:
        if "us_median" in r and (r["K"], r["N"]) in shapes:
            t.setdefault((r["variant"], r["K"], r["N"]), {})[r["M"]] = r["us_median"]

    def layer(variants, M):
        tot = 0.0
        for (K, N) in shapes:
            c = [t[(v, K, N)][M] for v in variants if M in t.get((v, K, N), {})]
            if not c:
                return None
            tot += min(c)
        return tot

    v16 = ["ours_w4a16", "ours_w4a16_cvt", "ours_w4a16_cvts", "ours_w4a16_magic", "ours_w4a16_asm",
           "ours_w4a16_triton", "ours_mgpu_w4a16"]
    v8 = ["ours_w4a8", "ours_w4a8_magic", "ours_w4a8_int8s", "ours_mgpu_w4a8"]
    E = (1 - a ** (gamma + 1)) / (1 - a)
    out = []
    Ms = sorted({r["M"] for r in rows})
    for B in Ms:
        T16, T8, Tv = layer(v16, B), layer(v8, B), layer(v16, B * (gamma + 1))
        if None in (T16, T8, Tv):
            continue
        q8, q8q = layer(["ours_w4a8"], B), layer(["ours_w4a8_quant"], B)
        T8q = T8 + (q8q - q8 if q8 is not None and q8q is not None else 0.0)
        for name, td in (("w4a8 kernel", T8), ("w4a8 + quant", T8q)):
            cycle = gamma * td + Tv
            out.append(dict(draft=name, B=B, T16_B=T16, T8_B=td, T16_verify=Tv,
                            us_per_token_w4a16=T16, us_per_token_qspec=cycle / E,
                            speedup=E * T16 / cycle, E=E))
    return out


def _layer_name(shapes):
    """What the QSpec table sums: one Llama-3-8B / Llama-70B layer's linears, else the shapes."""
    names = {"8b": "Llama-3-8B", "70b": "Llama-70B", "1b": "Llama-3.2-1B"}
    for key, ss in SHAPE_SETS.items():
        if sorted(shapes) == sorted(ss):
            return f"Linear layers of one {names[key]} decoder layer (sum of the {len(ss)} shapes)"
    return "The shapes " + ", ".join(f"{K}x{N}" for K, N in shapes) + " (K x N) summed as one layer"


def write_md(path, meta, rows, qs, shapes):
    L = [f"# Int4 GEMM kernels on {meta['gpu']}", "",
         f"commit `{meta['commit']}`, jax {meta['jax']}, {meta['date']}, timer: {meta['timer']}. "
         "Per-call device time (median, [p10, p90]) of one kernel call, averaged over R distinct weight "
         "copies per timed call (weights never L2-resident). TB/s counts weight+scale+activation bytes read; "
         "% HBM is against 4.8 TB/s; % MMA against 990 (bf16) / 1979 (int8) dense TFLOP/s.", ""]
    by = {}
    for r in rows:
        by.setdefault((r["K"], r["N"]), []).append(r)
    variants = []
    for r in rows:
        if r["variant"] not in variants:
            variants.append(r["variant"])
    for (K, N) in shapes:
        rs = by.get((K, N), [])
        if not rs:
            continue
        L += [f"## K x N = {K} x {N} (int4 weight bytes {K * N // 2 / 1e6:.1f} MB)", "",
              "| M | " + " | ".join(variants)
              + " | fastest ours w4a16: TB/s (%HBM) | fastest ours w4a8: TB/s (%HBM), TFLOP/s (%MMA) |",
              "|---|" + "---|" * (len(variants) + 2)]
        for M in sorted({r["M"] for r in rs}):
            cells = []
            for v in variants:
                rr = [r for r in rs if r["M"] == M and r["variant"] == v]
                if not rr or "us_median" not in rr[0]:
                    cells.append(("skip" if "skipped" in rr[0] else "err") if rr else "-")
                    continue
                r = rr[0]
                cells.append(f"{r['us_median']:.1f} [{r['us_p10']:.1f}, {r['us_p90']:.1f}]")
            timed = [r for r in rs if r["M"] == M and "us_median" in r and r["variant"].startswith("ours")]
            b16 = min((r for r in timed if r["variant"] not in W4A8_VARIANTS + W4A8_FLOAT_IN),
                      key=lambda r: r["us_median"], default=None)
            b8 = min((r for r in timed if r["variant"] in W4A8_VARIANTS),
                     key=lambda r: r["us_median"], default=None)
            extra16 = f"{b16['TBps']:.2f} ({b16['pct_hbm']:.0f}%) {b16['variant']}" if b16 else ""
            extra8 = (f"{b8['TBps']:.2f} ({b8['pct_hbm']:.0f}%), {b8['TFLOPs']:.0f} ({b8['pct_mma']:.0f}%) "
                      f"{b8['variant']}" if b8 else "")
            L.append(f"| {M} | " + " | ".join(cells) + f" | {extra16} | {extra8} |")
        L.append("")
    errs = [r for r in rows if r.get("rel_err") is not None]
    if errs:
        worst = {}
        for r in errs:
            worst[r["variant"]] = max(worst.get(r["variant"], 0), r["rel_err"])
        L += ["## Correctness (fresh random inputs, copy 0 of every timed program vs its reference)", ""]
        for v, e in worst.items():
            ex = [r["frac_bitexact"] for r in errs if r["variant"] == v]
            L.append(f"- {v}: worst relative error {e:.2e}; fraction of bit-identical outputs min {min(ex):.4f}")
        L.append("")
    skipped = {}
    for r in rows:
        if "skipped" in r:
            skipped.setdefault((r["variant"], r["skipped"]), []).append(f"{r['K']}x{r['N']} M={r['M']}")
    if skipped:
        L += ["## Skipped (peers that cannot run here)", ""]
        for (v, why), where in skipped.items():
            L.append(f"- {v}: {why} ({len(where)} rows: {', '.join(where[:4])}"
                     f"{', ...' if len(where) > 4 else ''})")
        L.append("")
    notes = {r["variant"]: r["note"] for r in rows if r.get("note")}
    if notes:
        L += ["## Peer configurations", ""] + [f"- {v}: {n}" for v, n in notes.items()] + [""]
    bad = [r for r in rows if "error" in r]
    if bad:
        L += ["## Failures", ""] + [f"- {r['variant']} {r['K']}x{r['N']} M={r['M']}: {r['error'][:200]}"
                                    for r in bad[:20]] + [""]
    if qs:
        L += ["## What T_w4a16(M) and T_w4a8(M) imply for QSpec (gamma = 3, acceptance a = 0.9)", "",
              f"{_layer_name(shapes)}. A QSpec cycle costs "
              "3 draft steps at M = B plus one verify pass at M = 4B and yields E = (1 - a^4)/(1 - a) = "
              f"{qs[0]['E']:.3f} tokens; plain W4A16 decoding costs T_w4a16(B) per token. Attention, norms, "
              "lm_head and sampling are not included.", "",
              "| draft | B | T_w4a16(B) us | T_w4a8(B) us | T_w4a16(4B) us | us/token W4A16 | us/token QSpec | speedup |",
              "|---|---|---|---|---|---|---|---|"]
        for q in qs:
            L.append(f"| {q['draft']} | {q['B']} | {q['T16_B']:.1f} | {q['T8_B']:.1f} | {q['T16_verify']:.1f} | "
                     f"{q['us_per_token_w4a16']:.1f} | {q['us_per_token_qspec']:.1f} | {q['speedup']:.2f}x |")
        L.append("")
    with open(path, "w") as f:
        f.write("\n".join(L))


def plot(path, rows, shapes):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print("no matplotlib:", e)
        return
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, (K, N) in zip(axes[0], shapes):
        rs = [r for r in rows if r["K"] == K and r["N"] == N and "us_median" in r]
        for v in sorted({r["variant"] for r in rs}):
            pts = sorted((r["M"], r["us_median"]) for r in rs if r["variant"] == v)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=v)
        ax.set_xscale("log", base=2); ax.set_yscale("log")
        ax.set_title(f"K={K} N={N}"); ax.set_xlabel("M"); ax.set_ylabel("us / call")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def env_meta(commit):
    d = jax.devices()[0]
    try:
        import flax
        fv = flax.__version__
    except Exception:  # noqa: BLE001
        fv = None
    return dict(commit=commit, gpu=getattr(d, "device_kind", d.platform), platform=d.platform,
                jax=jax.__version__, jaxlib=getattr(jax.lib, "__version__", None) or jax.__version__,
                flax=fv, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                timer=TIMER["name"], hbm_TBps=HBM_TBS, peak_bf16=PEAK_BF16, peak_int8=PEAK_INT8)


def probe(out):
    """First-call checks: versions, GPU, Triton + Mosaic GPU lowering, timer."""
    info = env_meta(None)
    try:
        info["nvidia_smi"] = subprocess.check_output(
            ["nvidia-smi", "--query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.limit",
             "--format=csv"], text=True).strip()
    except Exception as e:  # noqa: BLE001
        info["nvidia_smi"] = str(e)
    print("[probe]", json.dumps(info), flush=True)
    # Triton backend: one small call of each kernel.
    K, N, M = 4096, 4096, 5
    x = make_x(jax.random.key(1), M, K)
    (qw, s), = make_weights(jax.random.key(2), K, N, K, 1)
    for name, f in [("triton_w4a16", lambda: w4a16_matmul(x, qw, s)),
                    ("triton_w4a8", lambda: w4a8_matmul(*quantize_per_token_reference(x, 8), qw, s))]:
        try:
            jax.block_until_ready(f()); info[name] = "ok"
        except Exception as e:  # noqa: BLE001
            info[name] = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"[probe] {name}: {info[name]}", flush=True)
    # Mosaic GPU: JAX's own Hopper mixed-type (int8 x bf16) matmul, computing (W^T x^T) with the
    # unpacked int8 weight as the register operand: what a Mosaic W4A16 in transposed form could
    # reach at large M (it reads 2x the weight bytes and applies no scales).
    try:
        from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as hm
        res = []
        for (Mx, Kx, Nx) in [(256, 4096, 28672), (4096, 4096, 28672), (4096, 4096, 4096)]:
            a = jax.random.randint(jax.random.key(3), (Nx, Kx), -8, 8, jnp.int8)
            b = jax.random.normal(jax.random.key(4), (Kx, Mx), jnp.bfloat16)
            for tm, tn, tk, wg in [(128, 128, 64, hm.MatmulDimension.N), (128, 64, 128, hm.MatmulDimension.N),
                                   (64, 128, 64, hm.MatmulDimension.M)]:
                cfg = hm.TuningConfig(tile_m=tm, tile_n=tn, tile_k=tk, max_concurrent_steps=4,
                                      grid_minor_dim=hm.MatmulDimension.N, grid_tile_width=4, wg_dimension=wg)
                try:
                    f = jax.jit(lambda a, b, cfg=cfg: hm.mixed_matmul_kernel(a, b, out_dtype=jnp.bfloat16, config=cfg))
                    o = f(a, b)
                    r = jnp.dot(a.astype(jnp.bfloat16), b, preferred_element_type=jnp.float32)
                    err = float(jnp.linalg.norm(o.astype(jnp.float32) - r) / jnp.linalg.norm(r))
                    t = float(np.median(measure(f, (a, b), 10)))
                    res.append(dict(M=Mx, K=Kx, N=Nx, cfg=[tm, tn, tk, str(wg)], us=t, err=err,
                                    TFLOPs=2 * Mx * Nx * Kx / t / 1e6))
                except Exception as e:  # noqa: BLE001
                    res.append(dict(M=Mx, K=Kx, N=Nx, cfg=[tm, tn, tk, str(wg)], error=f"{type(e).__name__}: {str(e)[:200]}"))
                print("[probe] mgpu", res[-1], flush=True)
        info["mosaic_mixed"] = res
    except Exception as e:  # noqa: BLE001
        info["mosaic_mixed"] = f"{type(e).__name__}: {str(e)[:300]}"
        print("[probe] mosaic:", info["mosaic_mixed"], flush=True)
    info["timer"] = TIMER["name"]
    with open(os.path.join(out, "kernels_probe.json"), "w") as f:
        json.dump(info, f, indent=1)


def git_commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], stderr=subprocess.DEVNULL,
                                       text=True).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="tiny CPU run (interpret mode)")
    p.add_argument("--sweep", action="store_true", help="tile-config sweep of our kernels")
    p.add_argument("--sweep-set", default="base", choices=["base", "many", "asm"],
                   help="which configurations --sweep tries ('many': many small programs)")
    p.add_argument("--probe", action="store_true", help="print versions, test lowering, then go on")
    p.add_argument("--out", default=None)
    p.add_argument("--commit", default=None)
    p.add_argument("--tag", default="h200")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--timer", default=None, choices=["cupti", "loop", "pipelined", "host"])
    p.add_argument("--ms", default=None, help="comma list of M")
    p.add_argument("--shapes", default=None,
                   help="comma list of KxN and/or shape sets: 8b (default), 70b (Llama-3-70B "
                        "layers), 1b (Llama-3.2-1B layers)")
    p.add_argument("--group", type=int, default=0, help="group size (0: per-channel)")
    p.add_argument("--variants", default=None)
    a = p.parse_args(argv)
    commit = a.commit or git_commit()
    G_of = (lambda K: K) if a.group <= 0 else (lambda K: a.group)
    if a.quick:
        # CPU smoke run: interpret mode, tiny shapes.
        w4a16_mod_call = w4a16_mod.w4a16_matmul
        w4a8_mod_call = w4a8_mod.w4a8_matmul
        VARIANT_MIN_M["ours_w4a16_triton"] = 4
        global w4a16_matmul, w4a8_matmul  # noqa: PLW0603
        w4a16_matmul = lambda *args, **kw: w4a16_mod_call(*args, interpret=True, **kw)  # noqa: E731
        w4a8_matmul = lambda *args, **kw: w4a8_mod_call(*args, interpret=True, **kw)  # noqa: E731
        shapes = [(256, 128), (512, 64)]
        ms = [1, 4, 16]
        a.iters = 3
        out = a.out or "/tmp/bench_kernels_quick"
    else:
        shapes = SHAPES_8B
        ms = MS
        out = a.out or "experiments/results"
    if a.shapes:
        try:
            shapes = parse_shapes(a.shapes)
        except ValueError as e:
            p.error(str(e))
    if a.ms:
        ms = [int(v) for v in a.ms.split(",")]
    variants = (a.variants.split(",") if a.variants else
                ["ours_w4a16", "ours_w4a16_triton", "ours_w4a16_cvt", "ours_w4a16_magic",
                 "ours_w4a16_gemv", "ours_w4a8", "ours_w4a8_gemv",
                 "ours_w4a8_magic",
                 "ours_w4a8_quant", "xla_bf16", "xla_int4_dequant", "xla_w8a8"])
    os.makedirs(out, exist_ok=True)
    print(f"jax {jax.__version__} devices {jax.devices()} commit {commit}", flush=True)
    if a.timer:
        TIMER["name"] = a.timer
    if a.probe:
        probe(out)
    tag = a.tag + ("_sweep" if a.sweep else "") + ("_quick" if a.quick else "")
    sweeper = {"many": sweep_cfgs_many_programs, "asm": sweep_cfgs_asm}.get(a.sweep_set, sweep_cfgs)
    jobs = build_jobs(shapes, ms, variants, G_of, a.quick, sweeper if a.sweep else None)
    compile_all(jobs, 1 if a.quick else a.workers)
    rows = run_jobs(jobs, a.iters, partial_path=os.path.join(out, f"kernels_{tag}_partial.json"))
    meta = env_meta(commit)
    qs = [] if a.sweep else qspec_implication(rows, shapes)
    res = dict(meta=meta, shapes=shapes, ms=ms, rows=rows, qspec=qs)
    with open(os.path.join(out, f"kernels_{tag}.json"), "w") as f:
        json.dump(res, f, indent=1)
    if os.path.exists(os.path.join(out, f"kernels_{tag}_partial.json")):
        os.remove(os.path.join(out, f"kernels_{tag}_partial.json"))
    if a.sweep:
        best = {}
        for r in rows:
            if "us_median" not in r or not r["variant"].startswith("ours") or not ((r.get("rel_err") or 0) < 2e-2):
                continue
            k = (r["variant"], r["K"], r["N"], r["M"])
            if k not in best or r["us_median"] < best[k]["us_median"]:
                best[k] = r
        print("\nbest configs:")
        for k in sorted(best):
            r = best[k]
            alts = sorted((x["us_median"], x["config"]) for x in rows
                          if (x["variant"], x["K"], x["N"], x["M"]) == k and "us_median" in x)
            print(f"{k[0]:16s} {k[1]:5d}x{k[2]:<5d} M={k[3]:<5d} {r['us_median']:8.1f}us {r['config']:28s} "
                  f"next: {[f'{t:.1f}:{c}' for t, c in alts[1:3]]}")
        base = [r for r in rows if r["variant"].startswith("xla") and "us_median" in r]
        for r in base:
            print(f"{r['variant']:16s} {r['K']:5d}x{r['N']:<5d} M={r['M']:<5d} {r['us_median']:8.1f}us")
    else:
        write_md(os.path.join(out, f"kernels_{tag}.md"), meta, rows, qs, shapes)
        plot(os.path.join(out, f"kernels_{tag}.png"), rows, shapes)
        print()
        print(open(os.path.join(out, f"kernels_{tag}.md")).read()[-6000:])
    nerr = sum("error" in r for r in rows)
    nskip = sum("skipped" in r for r in rows)
    bad = [r for r in rows if r.get("rel_err") is not None and not r["rel_err"] < 1e-2]
    print(f"\n{len(rows)} rows, {nerr} errors, {nskip} skipped, {len(bad)} failed checks", flush=True)
    for why in sorted({r["skipped"] for r in rows if "skipped" in r})[:5]:
        print("SKIP", why)
    for r in bad[:10]:
        print("BAD", r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
