"""End-to-end sweep: decode throughput of every mode, QSpec speedup, predicted vs measured.

    PYTHONPATH=. python3 experiments/sweep.py --models default,llama3-8b,llama3.2-1b \\
        --out experiments/results/sweep_h200.jsonl            # H200
    PYTHONPATH=. python3 experiments/sweep.py --quick --out /tmp/sweep.jsonl   # CPU smoke

Models: the trained default model, and Llama-3-8B / Llama-3.2-1B *shaped* models with random
weights (timing only: their acceptance rates mean nothing, and every row says so).
Per point (model, mode, batch, gamma): prefill time (apart), decode tokens/s and ms per step
(decode time = time(N new tokens) - time(1 new token), EOS disabled), acceptance and tokens per
cycle, compile time, peak device memory, % of the HBM roofline (bytes a step must read:
weights but the untied embedding table, + KV, at 4.8 TB/s). Results are appended one JSON line per point, so an interrupted sweep resumes where
it stopped; ``--plot`` draws the figures and writes the Markdown report from the file, ``--report``
writes only the report (same base name as ``--out``, ``.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import qspec_jax as qj  # noqa: E402
from qspec_jax.api import assemble  # noqa: E402
from qspec_jax.config import (ModelConfig, QuantConfig, RopeConfig, model_config_from_hf,  # noqa: E402
                              read_hf_config, round_up)
from qspec_jax.cost_model import CACHE_BUCKET, measure_cycle_costs, per_token_acceptance, predicted_speedup  # noqa: E402
import qspec_jax.model as model_module  # noqa: E402
from qspec_jax.model import CACHE_WRITES, KVCache  # noqa: E402

HBM_BYTES_PER_S = 4.8e12
MODES = ("w16", "w4a16", "w4a8", "qspec-w4a8", "qspec-w4a4")
DEFAULT_AUTO_MAX_GAMMA = 7

# Shapes of public models (random weights: timing only).
SHAPED = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256),
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=512),
}


def parse_window(text: str) -> tuple[int, int]:
    """'SINK:WINDOW' -> (sink, window), for argparse (a draft window option)."""
    try:
        sink, window = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a draft window is SINK:WINDOW (e.g. 4:1020), got {text!r}")
    if sink < 0 or window < 1:
        raise argparse.ArgumentTypeError(f"a draft window needs SINK >= 0 and WINDOW >= 1, got {text!r}")
    return sink, window


def shaped_config(name: str) -> ModelConfig:
    s = SHAPED[name]
    return ModelConfig(model_type="llama", rms_norm_eps=1e-5, rope=RopeConfig(theta=500000.0),
                       max_position_embeddings=131072, tie_word_embeddings=False, qkv_bias=False,
                       sliding_window=None, bos_token_id=1, eos_token_ids=(), pad_token_id=0, **s)


def random_model(name: str, quantized: bool, dtype=jnp.bfloat16, seed: int = 0,
                 quantize_lm_head: bool = False, rotate: bool = False, rotate_v_heads: bool = True):
    """A shaped model with random weights built on the device (int4 weights drawn directly;
    the lm_head too with quantize_lm_head). ``rotate``: the forward runs the online Hadamard
    transforms of a rotated (QuaRot) conversion, before o_proj and down_proj (the random
    weights are not rotated: timing only); before o_proj across heads only unless
    ``rotate_v_heads`` is False (QuantConfig.rotate_v_heads: conversions before it)."""
    cfg = shaped_config(name)
    qcfg = (QuantConfig(quant="w4", method="rtn", rotate=rotate, rotate_v_heads=rotate_v_heads,
                        quantize_lm_head=quantize_lm_head) if quantized else QuantConfig())
    from flax import nnx
    from qspec_jax.model import Transformer, pure_dict

    if not quantized:
        return dataclasses.replace(assemble(cfg, qcfg, random_w16_params(cfg, dtype, seed), dtype),
                                   eos_ids=())

    @jax.jit
    def init():
        model = Transformer(cfg, qcfg, dtype=dtype, rngs=nnx.Rngs(seed))
        params = pure_dict(model)
        if not quantized:
            return params
        key = jax.random.PRNGKey(seed + 1)

        def fill(path, leaf):
            name = getattr(path[-1], "key", None)
            if name == "qweight":  # random int4 pairs
                return jax.random.randint(key, leaf.shape, -128, 128, jnp.int32).astype(jnp.int8)
            if name == "scales":
                return jnp.full(leaf.shape, 0.02 / 7, jnp.float32)
            return leaf
        return jax.tree_util.tree_map_with_path(fill, params)

    model = assemble(cfg, qcfg, init(), dtype)
    return dataclasses.replace(model, eos_ids=())


def random_w16_params(cfg: ModelConfig, dtype=jnp.bfloat16, seed: int = 0) -> dict:
    """Random 16-bit parameters, drawn leaf by leaf: N(0, 1 / fan_in) matrices (the embedding
    table N(0, 1 / hidden)), norm scales 1, biases 0. One small jitted program per distinct
    shape, not one program for the whole model: on the H200 the 8B model's single jitted init
    (16 GB of bf16 outputs) did not finish compiling within 4 minutes (2026-11-30), so the
    sweep's w16 points never ran."""
    from qspec_jax.api import abstract_model
    from qspec_jax.model import pure_dict
    abstract = pure_dict(abstract_model(cfg, QuantConfig(), dtype))
    n = len(jax.tree_util.tree_leaves(abstract))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), n))

    def fill(path, leaf):
        key, name = next(keys), getattr(path[-1], "key", None)
        if leaf.ndim < 2:
            return (jnp.zeros if name == "bias" else jnp.ones)(leaf.shape, leaf.dtype)
        fan_in = leaf.shape[-1] if name == "embedding" else leaf.shape[0]
        return _scaled_normal(key, leaf.shape, jnp.dtype(leaf.dtype), fan_in ** -0.5)
    return jax.tree_util.tree_map_with_path(fill, abstract)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _scaled_normal(key, shape, dtype, std):
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)


def step_bytes(model, batch: int, context: int) -> float:
    """Bytes one decode step must read: every parameter as stored (int4: two values per byte),
    except an untied model's embedding table, of which a step gathers `batch` rows (a tied one
    is read whole as the lm_head), + the KV cache in use. Rows written before 2026-11-30 counted
    the whole table (1.05 GB of the 8B shapes' ~5.6 GB): reports correct them (roofline_pct)."""
    return float(weight_read_bytes(model, batch) + KVCache.nbytes(model.cfg, batch, context, jnp.bfloat16))


def weight_read_bytes(model, batch: int) -> int:
    """Parameter bytes a decode step of `batch` sequences reads (see step_bytes)."""
    total = 0
    for path, x in jax.tree_util.tree_leaves_with_path(model.state):
        itemsize = jnp.dtype(x.dtype).itemsize
        if getattr(path[0], "key", None) == "embed" and not model.cfg.tie_word_embeddings:
            total += batch * x.shape[-1] * itemsize
        else:
            total += x.size // 2 if x.dtype == jnp.int4 else x.size * itemsize
    return total


def embed_table_bytes(model_name: str) -> int | None:
    """bf16 bytes of a sweep model's embedding table if untied (None: unknown model or tied)."""
    if model_name in SHAPED:
        cfg = shaped_config(model_name)
    elif model_name == "default":
        cfg = model_config_from_hf(read_hf_config(os.path.join(os.path.dirname(qj.__file__), "default_model")))
    else:
        return None
    return None if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size * 2


def roofline_pct(r: dict) -> float | None:
    """A row's % of the HBM roofline; rows without step_bytes (written before the embedding
    table was left out of step_bytes) corrected here: their bytes = pct x 4.8 TB/s x step time,
    less the untied bf16 table."""
    pct = r.get("hbm_roofline_pct")
    if pct is None or "step_bytes" in r or not r.get("ms_per_step"):
        return pct
    emb = embed_table_bytes(r.get("model", ""))
    if emb is None:
        return pct
    old = pct / 100 * HBM_BYTES_PER_S * r["ms_per_step"] / 1e3
    return pct * (old - emb) / old


def _run(model, prompts, new_tokens, mode, gamma, draft, kernels):
    t0 = time.perf_counter()
    out = qj.generate(model, prompts, max_new_tokens=new_tokens, mode=mode, gamma=gamma, draft=draft,
                      kernels=kernels)
    return time.perf_counter() - t0, out


_ONE_TOKEN_TIMES: dict = {}  # (model id, batch, prompt, cache length, kernels) -> 1-token run times


DECODE_TIMINGS = ("diff", "slope")


def _steps(out) -> int:
    return int(out.stats.get("decode_steps", out.stats.get("cycles")))


# Timed repeats beyond --repeats while a point's timed runs total less than --min-time seconds
# (fast points: a 1B-shaped model decodes 64 tokens in ~50 ms, where 3 repeats left identical
# programs 15% apart in results/sweepgrid_h200_llama3.2-1b_1f8d2a6_3rep.jsonl), at most this
# many in all.
MAX_REPEATS = 25
# The 1-token runs of a (batch, prompt, cache length) are shared by its later points only when
# they take at least this long (long prompts: each prefill takes seconds); shorter ones are
# re-timed beside every point's N-token runs, so each difference pairs runs made together.
SHARED_ONE_TOKEN_MIN_S = 0.25


def _more(i: int, repeats: int, spent_s: float, min_time_s: float) -> bool:
    """Whether to time repeat i (0-based): the first `repeats`, then more while the timed runs
    total under min_time_s, up to MAX_REPEATS."""
    return i < repeats or (spent_s < min_time_s and i < MAX_REPEATS)


def _slope_timing(run, new_tokens: int, repeats: int, min_time_s: float = 0.0) -> tuple[dict, object]:
    """decode_timing="slope": runs of N and N/2 new tokens (same cache length); the time per
    step is the slope between them, the rest of the N-token run's time the prefill (it then
    includes any per-call constant)."""
    half = max(2, new_tokens // 2)
    t_half_first, _ = run(half)  # compiles the N/2 program
    run(new_tokens)  # untimed: the first N-token run after a new program's first run is slow
    full, halves, per_step, out = [], [], [], None
    while _more(len(full), repeats, sum(full) + sum(halves), min_time_s):
        t_full, out = run(new_tokens)
        t_half, out_half = run(half)
        d_steps = _steps(out) - _steps(out_half)
        full.append(t_full)
        halves.append(t_half)
        per_step.append((t_full - t_half) / d_steps if d_steps > 0 else float("nan"))
    per_step = np.asarray(per_step)
    step_s = float(np.median(per_step))
    steps = _steps(out)
    ok = step_s > 0  # False (or NaN): below the timer noise (tiny CPU runs)
    decode_s = step_s * steps if ok else float("nan")
    return {"decode_timing": "slope", "half_tokens": half,
            "prefill_s": float(np.median(full)) - decode_s if ok else float("nan"),
            "decode_s": decode_s,
            "decode_spread_s": [float(np.min(per_step) * steps), float(np.max(per_step) * steps)],
            "prefill_shared": False,
            "extra_compile_s": max(t_half_first - float(np.median(halves)), 0.0),
            "full_s": float(np.median(full)), "timed_repeats": len(full)}, out


def _diff_timing(run, key, new_tokens: int, repeats: int,
                 min_time_s: float = 0.0) -> tuple[dict, object]:
    """decode_timing="diff": decode = N-token run - 1-token run (paired per repeat)."""
    # The 1-token runs are one program for every mode at this (batch, prompt, cache length):
    # measured once, shared by the later points when they are long (long prompts: each prefill
    # takes seconds); short ones are timed again beside this point's N-token runs.
    shared = _ONE_TOKEN_TIMES.get(key, [])
    reuse = len(shared) >= repeats and float(np.median(shared)) >= SHARED_ONE_TOKEN_MIN_S
    compile1_s = run(1)[0] if not reuse else 0.0  # compile the prefill-only shape
    if not reuse:
        # One untimed N-token run after the 1-token program's first run: on the H200 the first
        # N-token run after it came out ~0.02 s slow (the slow end of nearly every point's
        # spread, e.g. xpad_h200_7e1796b.md; with 2 repeats the median is their mean).
        run(new_tokens)
    full, one, out = [], [], None
    while _more(len(full), repeats, sum(full) + (0.0 if reuse else sum(one)), min_time_s):
        i = len(full)
        t, out = run(new_tokens)
        full.append(t)
        one.append(shared[i] if reuse and i < len(shared) else run(1)[0])
    if not reuse:
        _ONE_TOKEN_TIMES[key] = one
    # Paired differences remove the prefill; a non-positive one means the decode time is
    # below the timer noise (tiny CPU runs) and is reported as NaN.
    diffs = np.asarray(full) - np.asarray(one)
    decode_s = float(np.median(diffs))
    decode_s = decode_s if decode_s > 0 else float("nan")
    # Compilation of the 1-token program where it was not compiled before (for QSpec it is
    # w4a16 AR's, usually compiled already).
    return {"decode_timing": "diff", "prefill_s": float(np.median(one)), "decode_s": decode_s,
            "decode_spread_s": [float(diffs.min()), float(diffs.max())], "prefill_shared": reuse,
            "extra_compile_s": max(compile1_s - float(np.median(one)), 0.0) if not reuse else 0.0,
            "full_s": float(np.median(full)), "timed_repeats": len(full)}, out


def measure_point(model, mode: str, batch: int, gamma, prompt_len: int, new_tokens: int,
                  kernels: str, repeats: int, cycle_costs=None, max_gamma: int = 7,
                  draft_window=None, decode_timing: str = "diff", min_time_s: float = 0.0) -> dict:
    """One sweep point. decode_timing "diff": decode = (N-token run) - (1-token run);
    "slope": time per step = (N-token run - N/2-token run) / (their step difference), which also
    removes a per-call constant that does not scale with the decode (at 16 x 32k about 0.6% of
    the prefill, 7-15% of a 128-token decode: results/longe2e2k_h200.md). `repeats` timed
    repeats at least, more (up to MAX_REPEATS) while the timed runs total under min_time_s."""
    if decode_timing not in DECODE_TIMINGS:
        raise ValueError(f"decode_timing must be one of {DECODE_TIMINGS}, got {decode_timing!r}")
    if not (min_time_s >= 0):
        raise ValueError(f"min_time_s must be >= 0 seconds, got {min_time_s!r}")
    rng = np.random.RandomState(0)
    prompts = [rng.randint(3, model.cfg.vocab_size, prompt_len).tolist() for _ in range(batch)]
    qmode, draft = ("qspec", mode.split("-")[1]) if mode.startswith("qspec") else (mode, "w4a8")
    kw = dict(mode=qmode, gamma=gamma, draft=draft, kernels=kernels)
    if qmode == "qspec" and draft_window is not None:
        kw["draft_window"] = tuple(draft_window)
    if gamma == "auto":
        kw.update(max_gamma=max_gamma, cycle_costs=cycle_costs)
    # One cache length for every run of every mode at this prompt length (room for the longest
    # QSpec cycle): the 1-token run's prefill is then the very program the N-token run starts
    # with (cache length decides e.g. which attention path a long prompt takes), and AR and
    # QSpec decode over caches of the same size.
    max_len = round_up(prompt_len + new_tokens + max(max_gamma, gamma if isinstance(gamma, int) else 0)
                       + 1, CACHE_BUCKET)
    kw["max_len"] = max_len

    # The 1-token run times the prefill (and the first token) to subtract it. QSpec prefills in
    # its verify mode, so for QSpec modes it is w4a16 AR's 1-token program: the same work,
    # already compiled for the w4a16 point of this batch (one compilation less per point).
    kw_one = dict(mode="w4a16", kernels=kernels, max_len=max_len) if qmode == "qspec" else kw

    def run(n):
        t0 = time.perf_counter()
        out = qj.generate(model, prompts, max_new_tokens=n, **(kw if n > 1 else kw_one))
        return time.perf_counter() - t0, out

    compile_s, _ = run(new_tokens)
    if decode_timing == "slope":
        timing, out = _slope_timing(run, new_tokens, repeats, min_time_s)
    else:
        timing, out = _diff_timing(run, (id(model), batch, prompt_len, max_len, kernels), new_tokens,
                                   repeats, min_time_s)
    decode_s = timing["decode_s"]
    steps = _steps(out)
    decoded = batch * (new_tokens - 1)
    row = {
        "mode": mode, "batch": batch, "gamma": gamma if qmode == "qspec" else None,
        "prompt_len": prompt_len, "new_tokens": new_tokens, "kernels": kernels, "repeats": repeats,
        "timed_repeats": timing["timed_repeats"], "min_time_s": min_time_s,
        "prefill_s": timing["prefill_s"], "decode_s": decode_s,
        "decode_tokens_per_s": decoded / decode_s if decode_s > 0 else float("nan"),
        "ms_per_step": 1e3 * decode_s / max(int(steps), 1),
        "decode_spread_s": timing["decode_spread_s"], "prefill_shared": timing["prefill_shared"],
        "decode_timing": timing["decode_timing"],
        # Compilation of the N-token program, plus that of the shorter run's where it was new.
        "compile_s": compile_s - timing["full_s"] + timing["extra_compile_s"],
        "steps": int(steps), "cache_len": max_len, "prefill_chunk": out.stats.get("prefill_chunk"),
    }
    if "half_tokens" in timing:
        row["half_tokens"] = timing["half_tokens"]
    if qmode == "qspec":
        row.update(acceptance_rate=out.stats["acceptance_rate"], tokens_per_cycle=out.stats["tokens_per_cycle"])
        if gamma == "auto":
            row.update(max_gamma=max_gamma, gamma_cycles=out.stats.get("gamma_cycles"))
    # % of the HBM roofline of one decode step (context: the mean cache length while decoding).
    context = prompt_len + new_tokens // 2
    tokens_per_step = batch * (row.get("tokens_per_cycle") or 1.0)
    row["step_bytes"] = step_bytes(model, batch, context)
    row["hbm_roofline_pct"] = 100 * row["step_bytes"] / HBM_BYTES_PER_S / (
        decode_s / max(int(steps), 1))  # NaN when decode_s is
    row["hbm_roofline_note"] = "assumes 4.8 TB/s (H200); meaningless on CPU"
    row["tokens_per_step"] = tokens_per_step
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        # Process-wide peak so far: points run batch by batch, w4a16 AR before the other modes
        # of the same batch and w16 last, so a mode that needs more memory than w4a16 AR at
        # its batch raises this figure above w4a16's.
        row["peak_bytes"] = int(stats["peak_bytes_in_use"])
    # This mode's own program: XLA's memory plan (arguments incl. weights and the donated cache,
    # outputs, temporaries; jit's executable from the runs above, nothing compiled anew).
    try:
        ma = qj.decode_call(model, prompts, max_new_tokens=new_tokens, **kw).memory_analysis()
        row["program_bytes"] = int(ma.argument_size_in_bytes + ma.output_size_in_bytes
                                   - ma.alias_size_in_bytes + ma.temp_size_in_bytes)
        row["program_temp_bytes"] = int(ma.temp_size_in_bytes)
        row["program_alias_bytes"] = int(ma.alias_size_in_bytes)
    except Exception as e:  # noqa: BLE001 - a figure less, not a failed point
        row["program_bytes_error"] = f"{type(e).__name__}: {e}"[:200]
    return row


def environment(commit: str | None) -> dict:
    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                    check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    dev = jax.devices()[0]
    env = {"commit": commit, "device": getattr(dev, "device_kind", str(dev)),
           "backend": jax.default_backend(), "jax": jax.__version__}
    if os.environ.get("XLA_FLAGS"):
        env["xla_flags"] = os.environ["XLA_FLAGS"]
    return env


def add_mgpu_flags(p) -> None:
    """--mgpu-x-pad, --mgpu-max-m, --mgpu-pdl, --residual-norm: the decode-kernel experiment flags (sweep.py,
    profile_cycle.py)."""
    p.add_argument("--mgpu-x-pad", choices=("xla", "tma"), default=None,
                   help="how x of fewer than 8 rows reaches the Mosaic GEMM: padded by XLA, or "
                        "unpadded with the kernel's TMA loads zero-filling (w4_mgpu.X_PAD)")
    p.add_argument("--mgpu-max-m", type=int, default=None,
                   help="one limit for every mode and width: the most rows of x a GEMM may have "
                        "to run the Mosaic kernel in the model (qspec_jax.kernel_dispatch."
                        "MGPU_MAX_M; default: the measured table of kernel_dispatch.mgpu_max_m, "
                        "recorded as 'auto'; the kernel takes up to pallas_kernels.w4_mgpu.MAX_M)")
    p.add_argument("--mgpu-pdl", choices=("off", "wait", "prefetch"), default=None,
                   help="Mosaic GEMMs of x with <= w4_mgpu.PDL_MAX_ROWS padded rows launched with "
                        "programmatic dependent launch: 'wait' (the kernel waits on the previous "
                        "one before its pipeline) or 'prefetch' (its first weight loads are issued "
                        "before the wait); w4_mgpu.PDL, off by default")
    p.add_argument("--residual-norm", choices=("on", "off"), default=None,
                   help="kernels=auto on the GPU: the GEMM epilogue + residual add + RMSNorm "
                        "after o_proj / down_proj as one Pallas kernel "
                        "(qspec_jax.kernel_dispatch.RESIDUAL_NORM)")
    p.add_argument("--residual-norm-warps", type=int, choices=(1, 2, 4, 8, 16), default=None,
                   help="warps per program of that kernel (kernel_dispatch.RESIDUAL_NORM_WARPS)")


def apply_mgpu_flags(args) -> dict:
    """Set w4_mgpu.X_PAD / PDL, kernel_dispatch.MGPU_MAX_M and RESIDUAL_NORM from
    add_mgpu_flags' arguments; the settings to record."""
    from pallas_kernels import w4_mgpu
    from qspec_jax import kernel_dispatch
    if args.mgpu_x_pad:
        w4_mgpu.X_PAD = args.mgpu_x_pad
    if args.mgpu_max_m is not None:
        if not 1 <= args.mgpu_max_m <= w4_mgpu.MAX_M:
            raise SystemExit(f"--mgpu-max-m {args.mgpu_max_m}: give 1 to {w4_mgpu.MAX_M} (the "
                             "Mosaic kernel's largest M)")
        kernel_dispatch.MGPU_MAX_M = args.mgpu_max_m
    if args.mgpu_pdl:
        w4_mgpu.PDL = "" if args.mgpu_pdl == "off" else args.mgpu_pdl
    if args.residual_norm:
        kernel_dispatch.RESIDUAL_NORM = args.residual_norm == "on"
    if args.residual_norm_warps:
        kernel_dispatch.RESIDUAL_NORM_WARPS = args.residual_norm_warps
    return dict(mgpu_x_pad=w4_mgpu.X_PAD, mgpu_max_m=_mgpu_max_m_setting(),
                mgpu_pdl=w4_mgpu.PDL or "off",
                residual_norm="on" if kernel_dispatch.RESIDUAL_NORM else "off",
                residual_norm_warps=kernel_dispatch.RESIDUAL_NORM_WARPS)


def _mgpu_max_m_setting():
    """What rows record for the Mosaic kernel's row limit: --mgpu-max-m's value, or "auto"
    (kernel_dispatch.mgpu_max_m's table)."""
    from qspec_jax import kernel_dispatch
    return "auto" if kernel_dispatch.MGPU_MAX_M is None else kernel_dispatch.MGPU_MAX_M


def _one_non_default(runs: list[dict], key: str, current, missing=None):
    """The one value rows record for ``key`` (rows without it count as ``missing``; None:
    skipped) when it is not ``current`` (this version's setting), else None."""
    vals = {r.get(key, missing) for r in runs if key in r or missing is not None}
    return vals.pop() if len(vals) == 1 and vals != {current} else None


def load_done(path: str) -> set:
    done = set()
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if "mode" in r:
                    done.add((r["model"], r["mode"], r["batch"], r["gamma"]))
    return done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="default (the trained model), llama3-8b, llama3.2-1b")
    p.add_argument("--batches", default=None, help="default 1,2,4,...,256")
    p.add_argument("--gammas", default=None, help="default 1..7; 'auto' runs gamma='auto'")
    p.add_argument("--max-gamma", type=int, default=None,
                   help="largest gamma of the cost table and of gamma='auto' (default: the largest "
                        f"integer gamma, or {DEFAULT_AUTO_MAX_GAMMA})")
    p.add_argument("--cost-gammas", default=None,
                   help="time the verify pass only at these gammas and interpolate the others "
                        "(saves compilations on large models; default: all)")
    p.add_argument("--time-budget", type=float, default=float("inf"),
                   help="seconds; start no new point after this (resume later)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--prompt-len", type=int, default=None, help="default 128")
    p.add_argument("--new-tokens", type=int, default=None, help="default 128")
    p.add_argument("--repeats", type=int, default=None, help="default 3")
    p.add_argument("--min-time", type=float, default=0.0, metavar="S",
                   help="time more repeats (up to %d in all) while a point's timed runs total "
                        "under S seconds: steadier medians for fast points (default 0: exactly "
                        "--repeats)" % MAX_REPEATS)
    p.add_argument("--kernels", default="auto")
    p.add_argument("--norm-quant-kernel", nargs="?", const="rmsnorm,none,swiglu", default=None,
                   metavar="KINDS",
                   help="draft modes: the fused quantization kernels (RMSNorm + quantization, "
                        "row_quant for the o_proj / down_proj inputs) under kernels=auto "
                        "(kernel_dispatch.NORM_QUANT_AUTO; off by default until measured faster); "
                        "KINDS: a comma list of rmsnorm, none, swiglu (default: all)")
    p.add_argument("--norm-quant-fold", action="store_true",
                   help="draft modes, XLA path: quantize RMSNorm(x) with the norm folded into the "
                        "scale (quant.NORM_QUANT_FOLD: two sibling row reductions and one "
                        "elementwise pass, no normalized tensor; off by default until measured)")
    p.add_argument("--norm-scale-fold", nargs="?", const="on", choices=("on", "off", "auto"),
                   help="verify mode (w4a16): the GEMMs after each RMSNorm read the residual stream "
                        "and scale their output rows by the norm's factor (quant.NORM_SCALE_FOLD: "
                        "no normalize kernel). on (the flag alone) / off: for every input; auto "
                        "(the default): for inputs of at most quant.NORM_SCALE_FOLD_MAX_ROWS rows "
                        "(measured faster at batch 1, slower at batch 16)")
    p.add_argument("--act-quant-in-gemm", action="store_true",
                   help="draft modes: the int8 GEMM quantizes its float input itself "
                        "(kernel_dispatch.ACT_QUANT_IN_GEMM; off by default: measured slower)")
    p.add_argument("--mgpu-out-mn", choices=("on", "off"), default=None,
                   help="on: the Mosaic GEMMs store their partial sums transposed, so XLA can "
                        "fuse the epilogue into the consumer; off: [split, N, M] and a transpose "
                        "(w4_mgpu.OUT_MN, on by default since ed53aaf: outmn_h200.md)")
    p.add_argument("--cache-write", choices=CACHE_WRITES, default=None,
                   help="how decode steps write their K/V: per layer, or once per step after a "
                        "read-only forward (qspec_jax.model.CACHE_WRITE; default: its value)")
    add_mgpu_flags(p)
    p.add_argument("--cache-update", choices=model_module.CACHE_UPDATES, default=None,
                   help="how batch-1 K/V blocks reach the cache (qspec_jax.model.CACHE_UPDATE: "
                        "scatter, or slice: one dynamic_update_slice, no read-back)")
    p.add_argument("--hadamard-impl", default=None,
                   help="how rotated models compute their online Hadamard transforms "
                        "(qspec_jax.rotation.HADAMARD_IMPL: butterfly or dense)")
    p.add_argument("--attn-min-batch", type=int, default=None,
                   help="kernels=auto: smallest batch for the Pallas attention kernel below "
                        "ATTN_LONG_CACHE positions (qspec_jax.kernel_dispatch.ATTN_MIN_BATCH)")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="int4 lm_head in the quantized models (both modes read it: a w4a16 / "
                        "w4a8 GEMM instead of the 1 GB bf16 one on the 8B shapes)")
    p.add_argument("--rotate", action="store_true",
                   help="random-weight quantized models run the online Hadamard transforms of a "
                        "rotated conversion (qspec-convert / qj.load rotate by default; timing "
                        "only: the random weights are not rotated). The default model is always "
                        "rotated.")
    p.add_argument("--full-o-rotation", action="store_true",
                   help="with --rotate: the full online Hadamard before o_proj, as conversions "
                        "made before the per-head part went into v_proj (QuantConfig."
                        "rotate_v_heads False) run it; default: across heads only")
    p.add_argument("--draft-window", type=parse_window, default=None, metavar="SINK:WINDOW",
                   help="QSpec modes draft with windowed attention over the shared cache "
                        "(qj.generate's draft_window; the cost table times that draft); use a "
                        "separate --out file per window")
    p.add_argument("--decode-timing", choices=DECODE_TIMINGS, default="diff",
                   help="diff: decode = N-token run - 1-token run; slope: per-step time from runs of "
                        "N and N/2 tokens, which also removes a per-call constant (use it for long "
                        "prompts, where the prefill is many times the decode)")
    p.add_argument("--weight-layout", default="auto", choices=qj.api.LAYOUT_CHOICES,
                   help="int4 weights as int4 [N, K] (nk: Mosaic GPU kernels for GEMMs of up to 64-256 "
                        "rows (kernel_dispatch.mgpu_max_m), XLA above; qj.with_weight_layout), the stored half-split layout, or "
                        "auto (qj.load's default: nk where the Mosaic GPU kernel runs); rows record "
                        "the layout used")
    p.add_argument("--cache-dir", default=None,
                   help="keep compiled programs and cost tables in this folder (qj.enable_persistent_cache): "
                        "a second sweep with the same folder measures warm-cache compile times")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", required=True, help="JSON-lines file (appended; resumable)")
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke configuration")
    p.add_argument("--plot", action="store_true",
                   help="only draw the plots and write the Markdown report from --out")
    p.add_argument("--report", action="store_true",
                   help="only write the Markdown report (--out with .md) from --out")
    args = p.parse_args(argv)
    if args.plot or args.report:
        if args.plot:
            plot(args.out)
        print(f"[sweep] wrote {report(args.out)}", flush=True)
        return 0
    defaults = (dict(models="tiny", batches="1,2", gammas="1,3", prompt_len=8, new_tokens=24, repeats=2)
                if args.quick else
                dict(models="default", batches="1,2,4,8,16,32,64,128,256", gammas="1,2,3,4,5,6,7",
                     prompt_len=128, new_tokens=128, repeats=3))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.decode_timing == "slope" and args.new_tokens < 4:
        p.error(f"--decode-timing slope needs --new-tokens >= 4 (runs of N and N/2 tokens must "
                f"differ by a step), got {args.new_tokens}")
    if not args.min_time >= 0:
        p.error(f"--min-time must be >= 0 seconds, got {args.min_time}")
    if args.new_tokens < 2:
        p.error(f"--new-tokens must be >= 2 (decode time = time of N tokens - time of 1), got "
                f"{args.new_tokens}")
    from tqdm.auto import tqdm
    t_start = time.perf_counter()
    warned_prefill = False
    env = environment(args.commit)
    if args.cache_dir:
        env["persistent_cache"] = qj.enable_persistent_cache(args.cache_dir)
    if args.norm_quant_kernel:
        from qspec_jax import kernel_dispatch
        kinds = args.norm_quant_kernel.split(",")
        bad = sorted(set(kinds) - set(kernel_dispatch.FUSED_QUANT_KINDS))
        if bad:
            p.error(f"--norm-quant-kernel: unknown kinds {bad}; choose from "
                    f"{', '.join(kernel_dispatch.FUSED_QUANT_KINDS)}")
        kernel_dispatch.NORM_QUANT_AUTO = frozenset(kinds)
        env["norm_quant_kernel"] = ",".join(kinds)
    from qspec_jax import quant as quant_module
    if args.norm_quant_fold:
        quant_module.NORM_QUANT_FOLD = True
        env["norm_quant_fold"] = True
    if args.norm_scale_fold:
        quant_module.NORM_SCALE_FOLD = {"on": True, "off": False, "auto": "auto"}[args.norm_scale_fold]
    env["norm_scale_fold"] = {True: "on", False: "off"}.get(quant_module.NORM_SCALE_FOLD, "auto")
    if args.quantize_lm_head:
        env["quantize_lm_head"] = True
    if args.full_o_rotation and not args.rotate:
        raise SystemExit("--full-o-rotation: only with --rotate")
    if args.rotate:
        env["rotate"] = True
        env["rotate_v_heads"] = not args.full_o_rotation
    draft_window = args.draft_window
    if draft_window:
        env["draft_window"] = list(draft_window)
    if args.act_quant_in_gemm:
        from qspec_jax import kernel_dispatch
        kernel_dispatch.ACT_QUANT_IN_GEMM = True
        env["act_quant_in_gemm"] = True
    if args.cache_write:
        model_module.CACHE_WRITE = args.cache_write
    env["cache_write"] = model_module.CACHE_WRITE
    if args.cache_update:
        model_module.CACHE_UPDATE = args.cache_update
    env["cache_update"] = model_module.CACHE_UPDATE
    from qspec_jax import rotation
    if args.hadamard_impl:
        if args.hadamard_impl not in rotation.HADAMARD_IMPLS:
            raise SystemExit(f"--hadamard-impl {args.hadamard_impl}: one of "
                             f"{', '.join(rotation.HADAMARD_IMPLS)}")
        rotation.HADAMARD_IMPL = args.hadamard_impl
    if args.rotate or args.hadamard_impl:
        env["hadamard_impl"] = rotation.HADAMARD_IMPL
    from qspec_jax import kernel_dispatch as _kd
    if args.attn_min_batch is not None:
        if args.attn_min_batch < 1:
            raise SystemExit(f"--attn-min-batch {args.attn_min_batch}: give a batch of at least 1")
        _kd.ATTN_MIN_BATCH = args.attn_min_batch
    env["attn_min_batch"] = _kd.ATTN_MIN_BATCH
    from pallas_kernels import w4_mgpu
    if args.mgpu_out_mn:
        w4_mgpu.OUT_MN = args.mgpu_out_mn == "on"
    if jax.default_backend() == "gpu":  # the kernel's lowering check may turn the store off
        from qspec_jax import kernel_dispatch
        kernel_dispatch._mgpu_lowering_error.cache_clear()
        why = kernel_dispatch.mgpu_unavailable()
        if args.mgpu_out_mn == "on" and (why or not w4_mgpu.OUT_MN):
            # (the kernel without it, or XLA's path, would be timed under this flag)
            raise SystemExit("--mgpu-out-mn on: the Mosaic GPU kernel with transposed partial "
                             f"sums cannot run ({why or 'this jax cannot lower the store'}); "
                             "nothing was timed")
    env["mgpu_out_mn"] = w4_mgpu.OUT_MN  # (recorded always: the default changed at ed53aaf)
    env.update(apply_mgpu_flags(args))
    done = load_done(args.out)
    modes = args.modes.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    gammas = [g if g == "auto" else int(g) for g in args.gammas.split(",")]
    int_gammas = [g for g in gammas if g != "auto"]
    max_gamma = args.max_gamma or max(int_gammas or [DEFAULT_AUTO_MAX_GAMMA])
    verify_gammas = ([int(g) for g in args.cost_gammas.split(",")] if args.cost_gammas else None)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    context = args.prompt_len + args.new_tokens // 2

    def write(row):
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")

    for name in args.models.split(","):
        models = {}

        def get_model(quantized):
            if quantized not in models:
                t0 = time.perf_counter()
                lm = quantized and args.quantize_lm_head
                models[quantized] = (qj.load(dtype="bfloat16", quant="w4" if quantized else None,
                                             method="rtn", quantize_lm_head=lm,
                                             weight_layout=args.weight_layout) if name == "default"
                                     else random_model(name, quantized, quantize_lm_head=lm,
                                                       rotate=args.rotate,
                                                       rotate_v_heads=not args.full_o_rotation))
                if quantized:  # in place: the sweep owns the model (no second copy at the peak)
                    qj.with_weight_layout(models[quantized], args.weight_layout, in_place=True)
                print(f"[sweep] {name} {'w4' if quantized else 'w16'} model ready in "
                      f"{time.perf_counter() - t0:.1f} s", flush=True)
            return models[quantized]

        # Batch by batch, w4a16 AR first and the 16-bit model last (see the peak memory note).
        points = [(m, b, g if m.startswith("qspec") else None) for b in batches
                  for m in sorted((m for m in modes if m != "w16"), key=lambda m: m != "w4a16")
                  for g in (gammas if m.startswith("qspec") else [None])]
        points += [("w16", b, None) for b in batches if "w16" in modes]
        costs = dict(done_costs(args.out, name))
        for mode, batch, gamma in tqdm(points, desc=f"sweep {name}"):
            if (name, mode, batch, gamma) in done:
                continue
            if time.perf_counter() - t_start > args.time_budget:
                print(f"[sweep] time budget of {args.time_budget:.0f} s spent; stopping before "
                      f"{name} {mode} batch {batch} gamma {gamma} (run again to resume)", flush=True)
                return 0
            quantized = mode != "w16"
            model = get_model(quantized)
            if mode.startswith("qspec") and batch not in costs:
                t0 = time.perf_counter()
                parts = {}
                c = measure_cycle_costs(model, batch, context, max_gamma, "w4a8", kernels=args.kernels,
                                        verify_gammas=verify_gammas, draft_window=draft_window,
                                        parts=parts)
                costs[batch] = c.tolist()
                write({"model": name, "cycle_costs": costs[batch], "batch": batch, "context": context,
                       "draft_step_s": parts["draft_s"], "verify_s": parts["verify_s"],
                       "draft": "w4a8", "verify_gammas_timed": verify_gammas or "all",
                       "predicted_speedup_a0.9": predicted_speedup(c, 0.9).tolist(),
                       "measure_s": time.perf_counter() - t0, "random_weights": name != "default",
                       "weight_layout": model.weight_layout, **env})
                print(f"[sweep] {name} batch {batch}: cycle costs (ms) "
                      f"{', '.join(f'{1e3 * x:.3f}' for x in c)} in {time.perf_counter() - t0:.1f} s",
                      flush=True)
            t0 = time.perf_counter()
            try:
                row = measure_point(model, mode, batch, gamma, args.prompt_len, args.new_tokens,
                                    args.kernels, args.repeats, cycle_costs=costs.get(batch),
                                    max_gamma=max_gamma, draft_window=draft_window,
                                    decode_timing=args.decode_timing, min_time_s=args.min_time)
            except Exception as e:  # noqa: BLE001 - record, e.g. out of memory, and go on
                row = {"mode": mode, "batch": batch, "gamma": gamma, "error": f"{type(e).__name__}: {e}"[:300]}
            row.update(model=name, random_weights=name != "default", point_s=time.perf_counter() - t0,
                       weight_layout=model.weight_layout, **env)
            write(row)
            if (row.get("decode_timing") == "diff" and not warned_prefill
                    and row.get("prefill_s", 0) > 4 * row.get("decode_s", float("inf"))):
                warned_prefill = True
                print(f"[sweep] note: the prefill ({row['prefill_s']:.1f} s) is over 4x the decode "
                      f"({row['decode_s']:.2f} s) here: a per-call constant of ~0.6% of the prefill "
                      "biases the decode time; use --decode-timing slope or more --new-tokens",
                      flush=True)
            print(f"[sweep] {name} {mode} b={batch} gamma={gamma}: "
                  + (f"{row['decode_tokens_per_s']:.1f} tok/s, {row['ms_per_step']:.3f} ms/step, "
                     f"compile {row['compile_s']:.1f} s, point {row['point_s']:.1f} s"
                     if "error" not in row else row["error"]), flush=True)
    return 0


def done_costs(path: str, name: str):
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if r.get("model") == name and "cycle_costs" in r:
                    yield r["batch"], r["cycle_costs"]


def _gamma_key(g) -> tuple:
    """Sort key for gammas: None (AR modes), then integers, then 'auto'."""
    if g is None:
        return (0, 0)
    if g == "auto":
        return (2, 0)
    return (1, int(g))


def _gamma_label(g, max_gamma=None) -> str:
    if g == "auto":
        return "auto" + (f" (≤{max_gamma})" if max_gamma is not None else "")
    return "—" if g is None else str(g)


def _mode_key(mode: str) -> tuple:
    return (MODES.index(mode) if mode in MODES else len(MODES), mode)


def _read_rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _model_names(rows: list[dict]) -> list[str]:
    """Models in the order they first appear in the file."""
    return list(dict.fromkeys(r["model"] for r in rows if "model" in r))


def plot(path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = _read_rows(path)
    runs = [r for r in rows if "decode_tokens_per_s" in r]
    base = os.path.splitext(path)[0]
    for name in sorted({r["model"] for r in runs}):
        mine = [r for r in runs if r["model"] == name]
        auto_max = {r.get("max_gamma") for r in mine if r["gamma"] == "auto"} - {None}
        auto_label = "auto" + (f", cost-model policy, max {max(auto_max)}" if auto_max else "")
        fig, ax = plt.subplots(figsize=(6, 4))
        for mode in MODES:
            ints = sorted({r["gamma"] for r in mine if r["mode"] == mode and isinstance(r["gamma"], int)})
            # One fixed gamma per QSpec mode (3 where measured) plus gamma='auto' (dashed).
            shown = ([None] if not mode.startswith("qspec") else
                     ([3] if 3 in ints else ints[:1]) + ["auto"])
            for g in shown:
                pts = sorted((r["batch"], r["decode_tokens_per_s"]) for r in mine
                             if r["mode"] == mode and r["gamma"] == g)
                if pts:
                    label = mode if g is None else f"{mode} (gamma {auto_label if g == 'auto' else g})"
                    ax.plot(*zip(*pts), marker="o", ls="--" if g == "auto" else "-", label=label)
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="decode tokens/s",
               title=f"{name}" + (" (random weights)" if name != "default" else ""))
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(f"{base}_{name}_throughput.png", dpi=120)
        plt.close(fig)
        speedups = speedup_table(rows, name)
        if not speedups:
            continue
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for (mode, gamma) in sorted({(s["mode"], s["gamma"]) for s in speedups},
                                    key=lambda mg: (_mode_key(mg[0]), _gamma_key(mg[1]))):
            pts = sorted((s["batch"], s["measured"]) for s in speedups
                         if s["mode"] == mode and s["gamma"] == gamma)
            auto = gamma == "auto"
            ax1.plot(*zip(*pts), marker="s" if auto else "o", ls="--" if auto else "-", lw=2 if auto else 1,
                     label=f"{mode} gamma {auto_label if auto else gamma}")
        ax1.axhline(1.0, color="k", lw=0.8)
        ax1.set(xscale="log", xlabel="batch", ylabel="speedup over w4a16 AR",
                title=name + (" (random weights)" if name != "default" else ""))
        ax1.legend(fontsize=7)
        pairs = [(s["predicted"], s["measured"], s["gamma"] == "auto") for s in speedups
                 if s["predicted"] is not None and np.isfinite(s["predicted"]) and np.isfinite(s["measured"])]
        for auto, marker, label in ((False, "o", "fixed gamma"),
                                    (True, "s", "gamma auto (predicted: best gamma of the table)")):
            sel = [(p, m) for p, m, a in pairs if a == auto]
            if sel:
                ax2.scatter(*zip(*sel), s=18, marker=marker, label=label)
        if pairs:
            hi = max(max(p, m) for p, m, _ in pairs) * 1.1
            ax2.plot([0, hi], [0, hi], color="k", lw=0.8)
            ax2.legend(fontsize=7)
        ax2.set(xlabel="predicted speedup (cost model, measured acceptance)",
                ylabel="measured speedup", title="measured vs predicted")
        fig.tight_layout()
        fig.savefig(f"{base}_{name}_speedup.png", dpi=120)
        plt.close(fig)


def speedup_table(rows: list[dict], name: str) -> list[dict]:
    """QSpec over w4a16 AR per (mode, gamma, batch), measured and predicted from cycle costs."""
    runs = [r for r in rows if r.get("model") == name and "decode_tokens_per_s" in r]
    base = {r["batch"]: r["decode_tokens_per_s"] for r in runs if r["mode"] == "w4a16"}
    costs = {r["batch"]: r["cycle_costs"] for r in rows if r.get("model") == name and "cycle_costs" in r}
    out = []
    for r in runs:
        if not r["mode"].startswith("qspec") or r["batch"] not in base:
            continue
        predicted = None
        if r["batch"] in costs:
            # generate's acceptance_rate is the fraction of drafts accepted; the cost model's a
            # is per token (cost_model.per_token_acceptance). auto: at its most used gamma.
            g_used = r["gamma"]
            if g_used == "auto":
                cyc = r.get("gamma_cycles") or [0, 1]
                g_used = 1 + int(np.argmax(cyc[1:])) if sum(cyc[1:]) else 1
            a = per_token_acceptance(min(max(r["acceptance_rate"], 0.0), 1.0), g_used)
            pred = predicted_speedup(costs[r["batch"]], a)
            if r["gamma"] == "auto":  # the policy aims at the best gamma of the table
                predicted = float(pred.max())
            elif r["gamma"] < len(pred):
                predicted = float(pred[r["gamma"]])
        out.append({"mode": r["mode"], "gamma": r["gamma"], "batch": r["batch"],
                    "measured": r["decode_tokens_per_s"] / base[r["batch"]], "predicted": predicted})
    return out


# --- Markdown report --------------------------------------------------------------------------

SHAPED_AS = {"llama3-8b": "Llama-3-8B", "llama3.2-1b": "Llama-3.2-1B",
             "tiny": "a tiny Llama-style test configuration"}
REPORT_ACCEPTANCES = (0.9, 1.0)


def fmt(x, spec: str = ".2f") -> str:
    """A number for the report: '—' when absent, 'nan' when not finite (e.g. CPU timer noise)."""
    if x is None:
        return "—"
    x = float(x)
    return format(x, spec) if np.isfinite(x) else "nan"


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(row) + " |" for row in body])


def _join(values) -> str:
    return ",".join(str(v) for v in values)


def reproduce_commands(rows: list[dict], out: str) -> list[str]:
    """Sweep commands that produce the points in ``rows`` (one per group of models that share
    their options)."""
    groups: dict[tuple, list[str]] = {}
    for name in _model_names(rows):
        mine = [r for r in rows if r.get("model") == name]
        runs = [r for r in mine if "mode" in r]
        costs = [r for r in mine if "cycle_costs" in r]
        batches = sorted({r["batch"] for r in mine if "batch" in r})
        modes = sorted({r["mode"] for r in runs}, key=_mode_key)
        gammas = sorted({r["gamma"] for r in runs
                         if r["mode"].startswith("qspec") and r["gamma"] is not None}, key=_gamma_key)
        args = [("--batches", _join(batches)), ("--modes", _join(modes))]
        if gammas:
            max_gammas = ({len(r["cycle_costs"]) - 1 for r in costs}
                          | {r["max_gamma"] for r in runs if r.get("max_gamma") is not None})
            args.append(("--gammas", _join(gammas)))
            if max_gammas:
                args.append(("--max-gamma", _join(sorted(max_gammas))))
            timed = sorted({g for r in costs if r.get("verify_gammas_timed", "all") != "all"
                            for g in r["verify_gammas_timed"]})
            if timed:
                args.append(("--cost-gammas", _join(timed)))
        for key, flag in (("prompt_len", "--prompt-len"), ("new_tokens", "--new-tokens"),
                          ("repeats", "--repeats"), ("kernels", "--kernels")):
            vals = sorted({r[key] for r in runs if key in r}, key=str)
            if vals and not (key == "kernels" and vals == ["auto"]) and vals != ["mma"]:
                args.append((flag, _join(vals)))
        min_times = sorted({r["min_time_s"] for r in runs if r.get("min_time_s")})
        if min_times:
            args.append(("--min-time", _join(min_times)))
        nq = {str(r["norm_quant_kernel"]) for r in runs if r.get("norm_quant_kernel")}
        if nq:  # (True in files written before the kinds: all of them, the flag's default)
            kinds = sorted({k for v in nq if v != "True" for k in v.split(",")})
            args.append(("--norm-quant-kernel", "" if "True" in nq else ",".join(kinds)))
        if any(r.get("norm_quant_fold") for r in runs):
            args.append(("--norm-quant-fold", ""))
        folds = {r.get("norm_scale_fold") for r in runs} - {None, "auto"}
        if folds:  # (True in files written while the flag was on / off only)
            args.append(("--norm-scale-fold", _join(sorted("on" if v is True else str(v)
                                                           for v in folds))))
        if any(r.get("quantize_lm_head") for r in runs):
            args.append(("--quantize-lm-head", ""))
        if any(r.get("rotate") for r in runs):
            args.append(("--rotate", ""))
            if any(r.get("rotate_v_heads") is False for r in runs):
                args.append(("--full-o-rotation", ""))
        if any(r.get("act_quant_in_gemm") for r in runs):
            args.append(("--act-quant-in-gemm", ""))
        if runs and all(r.get("mgpu_out_mn") is False for r in runs):  # (on: the default)
            args.append(("--mgpu-out-mn", "off"))
        # (rows before 2026-11-30 wrote per layer); named when not this version's default
        from pallas_kernels import w4_mgpu
        from qspec_jax import kernel_dispatch as _kd
        from qspec_jax import rotation
        for flag, key, current, missing in (
                ("--cache-write", "cache_write", model_module.CACHE_WRITE, "layer"),
                ("--hadamard-impl", "hadamard_impl", rotation.HADAMARD_IMPL, None),
                ("--mgpu-x-pad", "mgpu_x_pad", w4_mgpu.X_PAD, "xla"),
                ("--mgpu-pdl", "mgpu_pdl", w4_mgpu.PDL or "off", "off"),
                ("--cache-update", "cache_update", model_module.CACHE_UPDATE, "scatter"),
                ("--attn-min-batch", "attn_min_batch", _kd.ATTN_MIN_BATCH, None),
                ("--residual-norm", "residual_norm", "on" if _kd.RESIDUAL_NORM else "off", "off"),
                ("--residual-norm-warps", "residual_norm_warps", _kd.RESIDUAL_NORM_WARPS, 4),
                # (rows before 2026-12-01 ran GEMMs of up to 64 rows on the kernel, any mode)
                ("--mgpu-max-m", "mgpu_max_m", _mgpu_max_m_setting(), 64)):
            val = _one_non_default(runs, key, current, missing)
            if val is not None:
                args.append((flag, str(val)))
        if any(r.get("decode_timing") == "slope" for r in runs):
            args.append(("--decode-timing", "slope"))
        if any(r.get("weight_layout") == "nk" for r in runs):
            args.append(("--weight-layout", "nk"))
        elif any(r.get("backend") == "gpu" and r.get("mode", "w16") != "w16" for r in runs):
            args.append(("--weight-layout", "half_split"))  # (rows before "auto": no field)
        windows = {tuple(r["draft_window"]) for r in runs if r.get("draft_window")}
        if windows:
            args.append(("--draft-window", ",".join(f"{a}:{b}" for a, b in sorted(windows))))
        groups.setdefault(tuple(args), []).append(name)
    return ["PYTHONPATH=. python3 experiments/sweep.py --models " + ",".join(names)
            + "".join(f" {flag} {val}".rstrip() for flag, val in args) + f" --out {out}"
            for args, names in groups.items()]


# AR step vs the cost table's timed step: flagged past this. The decode loop's own work per
# step (sampling, bookkeeping) is in the first only; across the committed sweeps the two sat
# within 15% but for old or tiny-model rows, while one slope-timed 32 x 8k run was 19% off.
TIMING_DISAGREEMENT = 0.15


def timing_disagreements(runs: list[dict], costs: list[dict]) -> list[str]:
    """Lines for the report where a w4a16 AR row's ms per step and its cost table's timed
    gamma-0 step (same model, batch and context) differ by more than TIMING_DISAGREEMENT: two
    measurements of nearly the same step (the row's also holds the loop's sampling and
    bookkeeping), so one of them is likely noisy (e.g. a single slope-timed run at a long
    prompt, whose prefill jitter divided by the step difference lands on the step)."""
    out = []
    for r in runs:
        if r.get("mode") != "w4a16" or not np.isfinite(r.get("ms_per_step", np.nan)):
            continue
        context = r.get("prompt_len", 0) + r.get("new_tokens", 0) // 2
        for c in costs:
            if (c.get("model"), c.get("batch")) != (r.get("model"), r.get("batch")):
                continue
            if c.get("context", context) != context:
                continue
            timed = 1e3 * c["cycle_costs"][0]
            gap = abs(r["ms_per_step"] - timed) / timed
            if gap > TIMING_DISAGREEMENT:
                out.append(f"- **Check the timing:** {r['model']} w4a16 batch {r['batch']}: "
                           f"{r['ms_per_step']:.3f} ms per step decoding, {timed:.3f} ms in the "
                           f"cost table's timed step ({100 * gap:.0f}% apart; "
                           f"{r.get('repeats', '?')} repeat(s), {r.get('decode_timing', 'diff')} "
                           "timing): more than the decode loop's own work explains; one of "
                           "the two is likely noisy, measure again.")
            break
    return out


def report(path: str) -> str:
    """Write the Markdown report of a sweep JSONL file next to it (same base name, .md)."""
    rows = _read_rows(path)
    names = _model_names(rows)
    runs = [r for r in rows if "mode" in r and "error" not in r]
    errors = [r for r in rows if "error" in r]
    costs = [r for r in rows if "cycle_costs" in r]

    def values(key, src=rows):
        return ", ".join(sorted({str(r[key]) for r in src if key in r})) or "?"

    md_path = os.path.splitext(path)[0] + ".md"
    L = [f"# QSpec end-to-end sweep: {os.path.basename(path)}", ""]
    L.append(f"Commit {values('commit')}; device {values('device')} ({values('backend')}); "
             f"jax {values('jax')}; prompt {values('prompt_len', runs)} tokens, "
             f"{values('new_tokens', runs)} new tokens per sequence (EOS disabled); "
             f"measured points: {len(runs)}, cost tables: {len(costs)}, errors: {len(errors)}. "
             "Reproduce at the commit above (the command appends to the file and skips the points it "
             "already holds):")
    L += ["", "```"] + reproduce_commands(rows, path) + ["```", ""]
    random = [n for n in names if any(r.get("random_weights") for r in rows if r.get("model") == n)]
    trained = [n for n in names if n not in random]
    words = ["**Weights.** The sweep's `llama3-8b` and `llama3.2-1b` are models with **random weights** "
             "shaped like Llama-3-8B and Llama-3.2-1B (timing only: their acceptance rates, tokens per "
             "cycle and the predicted speedups that use them are not meaningful); `default` is the "
             "trained model (its acceptance rates are real)."]
    if random:
        words.append("Random weights in this file: " + ", ".join(
            f"`{n}`" + (f" (shaped like {SHAPED_AS[n]})" if n in SHAPED_AS else "") for n in random) + ".")
        rot = any(r.get("rotate") for r in rows if r.get("model") in random)
        words.append("Their quantized forwards run the online Hadamard transforms of a rotated "
                     "conversion (`--rotate`; the weights are not rotated)." if rot else
                     "Their quantized forwards skip the online Hadamard transforms before o_proj "
                     "and down_proj that a rotated conversion (the converter's default) runs; "
                     "`--rotate` times them.")
    if trained:
        words.append("Trained weights: " + ", ".join(f"`{n}`" for n in trained) + ".")
    L += [" ".join(words), ""]
    L += ["Columns: decode tokens/s = batch × (new tokens − 1) / decode seconds (decode = time of N new "
          "tokens − time of 1, median of the paired repeats; with --decode-timing slope, steps × the "
          "median of (time of N − time of N/2) / (their step difference); nan when below the timer "
          "noise); ms/step is "
          "per decode step, per QSpec cycle for qspec modes; decode s = [min, max] over the repeats; "
          "speedup = decode tokens/s over w4a16 AR at the same batch (measured); predicted = cost model "
          "(the cycle costs below) at the measured acceptance (the fraction of drafts accepted, turned "
          "into the cost model's per-token rate at the row's gamma; auto: at its most used gamma), for "
          "gamma auto the best gamma of the table; "
          "gamma cycles (auto) = cycles run at gamma 0, 1, ... (zeros left out; `0:N` with no "
          "drafts = gamma auto decoded plainly, running the w4a16 AR program itself, so its "
          "speedup vs the AR row is run-to-run variation); peak GiB = process-wide "
          "peak device memory so far; program GiB = XLA's memory plan of the mode's decode program "
          "(arguments + outputs − donated + temporaries: weights, KV cache, prefill and loop buffers); % HBM roofline = (bytes a step must read at 4.8 TB/s: "
          "weights but the untied embedding table, of which a step gathers B rows, + KV) / measured "
          "step time (meaningful on an H200 only; rows written before 2026-11-30 counted the whole "
          "embedding table and are corrected here).", ""]
    for name in names:
        mine = sorted((r for r in runs if r["model"] == name),
                      key=lambda r: (r["batch"], _mode_key(r["mode"]), _gamma_key(r["gamma"])))
        mine_costs = sorted((r for r in costs if r["model"] == name), key=lambda r: r["batch"])
        if not mine and not mine_costs:
            continue
        L += [f"## {name}" + (" (random weights: timing only)" if name in random else " (trained)"), ""]
        if mine:
            base = {r["batch"]: r["decode_tokens_per_s"] for r in mine if r["mode"] == "w4a16"}
            spd = {(s["mode"], s["gamma"], s["batch"]): s for s in speedup_table(rows, name)}
            body = []
            for r in mine:
                s = spd.get((r["mode"], r["gamma"], r["batch"]))
                measured = (s["measured"] if s else r["decode_tokens_per_s"] / base[r["batch"]]
                            if r["batch"] in base else None)
                spread = r.get("decode_spread_s")
                cycles = r.get("gamma_cycles")
                body.append([
                    r["mode"], str(r["batch"]), _gamma_label(r["gamma"], r.get("max_gamma")),
                    fmt(r["decode_tokens_per_s"], ".1f"), fmt(r["ms_per_step"], ".3f"),
                    f"{fmt(spread[0], '.3f')}–{fmt(spread[1], '.3f')}" if spread else "—",
                    fmt(measured), fmt(s["predicted"] if s else None),
                    # gamma='auto' may run every cycle at gamma 0: no draft, no acceptance.
                    "— (no drafts)" if cycles and not any(cycles[1:])
                    else fmt(r.get("acceptance_rate"), ".3f"),
                    fmt(r.get("tokens_per_cycle")),
                    ", ".join(f"{g}:{n}" for g, n in enumerate(cycles) if n) if cycles else "—",
                    fmt(r.get("compile_s"), ".1f"),
                    fmt(r["peak_bytes"] / 2 ** 30 if "peak_bytes" in r else None),
                    fmt(r["program_bytes"] / 2 ** 30 if "program_bytes" in r else None, ".3f"),
                    fmt(roofline_pct(r), ".1f")])
            L += _md_table(["mode", "batch", "gamma", "decode tok/s", "ms/step (qspec: /cycle)",
                            "decode s [min–max]", "speedup vs w4a16 (measured)", "predicted speedup",
                            "acceptance", "tokens/cycle", "gamma cycles (auto)", "compile s", "peak GiB",
                            "program GiB", "% HBM roofline"], body) + [""]
        if mine_costs:
            G = max(len(r["cycle_costs"]) for r in mine_costs)
            L += [f"Cost model of {name}: seconds per QSpec cycle (gamma drafts w4a8 + one w4a16 verify of "
                  "gamma + 1 tokens; gamma 0 = the plain w4a16 AR step) from timed forwards, and the "
                  "speedup over w4a16 AR it predicts at acceptance "
                  + " and ".join(str(a) for a in REPORT_ACCEPTANCES) + ".", ""]
            body = []
            for r in mine_costs:
                c = r["cycle_costs"]
                timed = r.get("verify_gammas_timed", "all")
                timed = ("all" if timed == "all" else
                         ", ".join(str(g) for g in timed) + " (others interpolated)")
                pad = [""] * (G - len(c))
                body.append([str(r["batch"]), str(r.get("context", "?")), timed,
                             fmt(r.get("measure_s"), ".1f"), "cycle ms"]
                            + [fmt(1e3 * x, ".3f") for x in c] + pad + [""])
                if r.get("verify_s") and len(r["verify_s"]) == len(c):  # the parts (since 2026-12-01)
                    body.append(["", "", "", "", f"draft step ms: {fmt(1e3 * r['draft_step_s'], '.3f')}; "
                                 "verify pass ms"] + [fmt(1e3 * x, ".3f") for x in r["verify_s"]]
                                + pad + [""])
                for a in REPORT_ACCEPTANCES:
                    pred = predicted_speedup(c, a)
                    body.append(["", "", "", "", f"speedup a={a}"] + [fmt(x) for x in pred] + pad
                                + [str(int(np.argmax(pred))) if np.all(np.isfinite(pred)) else "—"])
            L += _md_table(["batch", "context", "verify widths timed", "measure s", "quantity"]
                           + [f"γ={g}" for g in range(G)] + ["best γ"], body) + [""]
            checks = timing_disagreements(mine, mine_costs)
            if checks:
                L += checks + [""]
    if errors:
        L += ["## Errors", ""]
        L += _md_table(["model", "mode", "batch", "gamma", "error"],
                       [[r.get("model", "?"), r.get("mode", "?"), str(r.get("batch", "?")),
                         _gamma_label(r.get("gamma")), r["error"].replace("|", "\\|").replace("\n", " ")]
                        for r in errors]) + [""]
    with open(md_path, "w") as f:
        f.write("\n".join(L))
    return md_path


if __name__ == "__main__":
    sys.exit(main())
