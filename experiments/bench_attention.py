"""Benchmark of the cached-attention kernel (issue 7) against its peers.

  PYTHONPATH=. python3 experiments/bench_attention.py --out $OUT/attention_h200.json --commit <hash>
  PYTHONPATH=. python3 experiments/bench_attention.py --sweep --out $OUT/attention_sweep_h200.json
  PYTHONPATH=. python3 experiments/bench_attention.py --quick --out /tmp/a.json      # CPU smoke run
  python3 experiments/bench_attention.py --merge a.json b.json --out all.json         # join runs
  PYTHONPATH=. python3 experiments/bench_attention.py --window 4 1020 \
      --out $OUT/attention_window_h200.json --commit <hash>         # windowed draft (issue 9)

Grid: batch {1, 8, 32, 64} x context {512, 2048, 8192, 32768} x T {1, 4, 8}; Llama-3-8B
attention (32 q heads, 8 kv heads, head_dim 128), bf16, one layer's cache [B, 8, ctx, 128].
The T new queries sit at positions ctx - T .. ctx - 1, so every cached key is read:
KV bytes = 2 (K and V) * B * 8 * ctx * 128 * 2 bytes.
Implementations (same inputs, same process):
- ours:  pallas_kernels.attention.cached_attention (default configuration).
- ours_layer (optional, --impls ... ours_layer): the same kernel reading one [R, 2, B, KVH, S, hd]
  array (K and V stacked) with layer=r, as the model calls it on its whole cache
  (qspec_jax.model.KVCache; 64-bit offsets above 4 GB).
- xla:   qspec_jax.model.attention_reference under jit (what the model runs without the kernel).
- decode_attention: jax.experimental.pallas.ops.gpu.decode_attention.mqa (T = 1 only), vmapped
  over the KV heads so that it reads our [B, KVH, S, hd] layout in place (its gqa entry point
  wants [B, S, KVH, hd] and transposes the whole cache inside); its default configuration
  (k_splits=16, block_k=256, block_h=16), kv_seq_len = ctx.
Timing: one jitted lax.fori_loop of n iterations with a static trip count (XLA runs a loop of
known trip count without a host round trip per iteration); each iteration applies the implementation to R distinct cache copies
(R * KV bytes >= 256 MB up to R = 16, so the 50 MB L2 cannot hold the cache; `l2_resident` marks
points where it still could) and feeds a scalar of the outputs into the next iteration's q
(no hoisting). n is chosen so a repeat lasts ~25 ms at 2 TB/s; the figure is wall time / (n R),
median over `--reps` repeats with min and max (dispatch, ~60 us per repeat, is < 0.5%).
Correctness: each implementation's output (from the timed program itself) against a float32
reference on the same bf16 values (relative Frobenius error).
Writes JSON (commit, GPU, jax version, per point results) after every point, and a Markdown
table beside it (same name, .md).

Windowed draft attention (issue 9), --window SINK RECENT: grid batch {1, 4, 16, 32, 64} x
context {2k, 8k, 32k} x T {1} (one layer's cache: up to 8.6 GB); implementations ours (the full-cache kernel,
what verify reads) and ours_window (the same kernel with window=(SINK, RECENT), what the draft
reads), optionally xla_window (the model's reference with the window: reads everything).
`kv_bytes_window` counts the K/V bytes the windowed kernel actually loads (its key blocks per
query tile, pallas_kernels.attention.window_blocks, at its block size); the windowed TB/s figures
are on those bytes. The cache copies R are chosen on the windowed bytes (R * bytes read >= 256 MB,
at most 32 copies and 32 GB of caches), so the windowed reads do not stay in L2 either.
Caches above 4 GB are generated and checked in batch chunks (bounded memory).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import gc
import itertools
import json
import math
import os
import platform
import sys
import time
import traceback

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.attention import (cached_attention, cached_attention_reference, default_config,
                                      window_blocks)

HBM_TBS = 4.8
L2_BYTES_TARGET = 256 << 20
H, KVH, HD = 32, 8, 128
BATCHES = (1, 8, 32, 64)
CONTEXTS = (512, 2048, 8192, 32768)
TS = (1, 4, 8)
WINDOW_BATCHES = (1, 4, 16, 32, 64)
WINDOW_CONTEXTS = (2048, 8192, 32768)
WINDOW_TS = (1,)
WINDOWED = ("ours_window", "xla_window")  # implementations that read only the window
MAX_COPIES_WINDOW = 32
CHUNK_BYTES = 4 << 30  # caches above this are generated / checked in batch chunks


# ----------------------------------------------------------------------------- implementations
def _xla_attention():
    try:
        from qspec_jax.model import attention_reference
        return attention_reference, "qspec_jax.model.attention_reference"
    except Exception:  # noqa: BLE001  (flax missing): same math, our file's reference
        return cached_attention_reference, "pallas_kernels.attention.cached_attention_reference"


def _decode_attention_impl(interpret):
    """decode_attention.mqa vmapped over KV heads on [B, KVH, S, hd]; None if not importable."""
    try:
        from jax.experimental.pallas.ops.gpu import decode_attention as da
    except Exception as e:  # noqa: BLE001
        return None, f"not importable: {type(e).__name__}: {e}"
    mqa = functools.partial(da.mqa, interpret=interpret)

    def run(q, k, v, q_pos):
        B, T, Hq, hd = q.shape
        assert T == 1
        kvh = k.shape[1]
        qg = q.reshape(B, kvh, Hq // kvh, hd)          # [B, KVH, G, hd]
        kv_len = q_pos[:, -1] + 1                      # [B]
        S = k.shape[2]
        splits = 16                                    # its default; smaller only for tiny S
        while splits > 1 and (S % splits or S // splits < 16):
            splits //= 2
        out = jax.vmap(lambda qh, kh, vh: mqa(qh, kh, vh, None, kv_len, k_splits=splits),
                       in_axes=(1, 1, 1), out_axes=1)(qg, k, v)  # [B, KVH, G, hd]
        return out.reshape(B, 1, Hq, hd).astype(q.dtype)  # mqa returns f32 after its combine

    return run, "jax.experimental.pallas.ops.gpu.decode_attention.mqa (vmapped over kv heads)"


def make_impls(names, interpret, cfg_kwargs=None, window=None):
    impls = {}
    notes = {}
    cfg_kwargs = cfg_kwargs or {}
    if "ours" in names:
        impls["ours"] = lambda q, k, v, p: cached_attention(q, k, v, p, interpret=interpret,
                                                            **cfg_kwargs)
        notes["ours"] = "pallas_kernels.attention.cached_attention"
    if "ours_layer" in names:  # the model's path: whole [L, 2, B, KVH, S, hd] cache + layer index
        impls["ours_layer"] = Stacked(lambda q, kv, _, p, r: cached_attention(
            q, kv, None, p, layer=r, interpret=interpret, **cfg_kwargs))
        notes["ours_layer"] = ("cached_attention on one [R, 2, B, KVH, S, hd] array (K and V "
                               "stacked, the model's KVCache) with layer=r (the R copies are "
                               "the layers)")
    if "xla" in names:
        impls["xla"], notes["xla"] = _xla_attention()
    if "decode_attention" in names:
        fn, note = _decode_attention_impl(interpret)
        notes["decode_attention"] = note
        if fn is not None:
            impls["decode_attention"] = fn
    if window is not None and "ours_window" in names:
        impls["ours_window"] = lambda q, k, v, p: cached_attention(q, k, v, p, interpret=interpret,
                                                                   window=window, **cfg_kwargs)
        notes["ours_window"] = f"pallas_kernels.attention.cached_attention(window={window})"
    if window is not None and "xla_window" in names:
        fn, note = _xla_attention()
        impls["xla_window"] = lambda q, k, v, p: fn(q, k, v, p, window=window)
        notes["xla_window"] = f"{note}(window={window}) (reads the whole cache, masks)"
    return impls, notes


# ----------------------------------------------------------------------------- data / timing
def kv_bytes(B, ctx, itemsize=2):
    return 2 * B * KVH * ctx * HD * itemsize


def window_kv_bytes(B, ctx, T, window, block_q, block_k, itemsize=2):
    """K/V bytes the windowed kernel loads: its key blocks per (sequence, kv head, query tile),
    with q_pos = ctx - T .. ctx - 1 as in make_inputs (pallas_kernels.attention.window_blocks)."""
    G = H // KVH
    q_pos = np.arange(ctx - T, ctx)
    rows = np.arange(T * G)
    n_blocks = 0
    for i in range(-(-T * G // block_q)):
        lim = q_pos[rows[i * block_q:(i + 1) * block_q] // G]
        n_sink, start, n_all = window_blocks(lim, lim, block_k, window[0], window[1], ctx)
        n_blocks += int(n_sink + n_all - start)
    return 2 * B * KVH * n_blocks * block_k * HD * itemsize


def _random_cache(key, shape, dtype):
    """jax.random.normal(key, shape, dtype); above CHUNK_BYTES filled batch chunk by batch chunk
    in place (no full-size f32 intermediate)."""
    nbytes = math.prod(shape) * jnp.dtype(dtype).itemsize
    if nbytes <= CHUNK_BYTES:
        return jax.random.normal(key, shape, dtype)
    bc = max(1, int(shape[0] * CHUNK_BYTES // nbytes))
    fill = jax.jit(lambda c, k, b0: lax.dynamic_update_slice_in_dim(
        c, jax.random.normal(k, (bc,) + shape[1:], dtype), b0, 0), donate_argnums=0)
    out = jnp.zeros(shape, dtype)
    for i, b0 in enumerate(range(0, shape[0], bc)):  # the last chunk may overlap the previous one
        out = fill(out, jax.random.fold_in(key, i), min(b0, shape[0] - bc))
    return out


def make_inputs(key, B, ctx, T, R, dtype):
    kq, kk = jax.random.split(key)
    q = jax.random.normal(kq, (B, T, H, HD), jnp.float32).astype(dtype)
    ks, vs = [], []
    for r in range(R):
        k1, k2 = jax.random.split(jax.random.fold_in(kk, r))
        ks.append(_random_cache(k1, (B, KVH, ctx, HD), dtype))
        vs.append(_random_cache(k2, (B, KVH, ctx, HD), dtype))
    q_pos = jnp.broadcast_to(jnp.arange(ctx - T, ctx, dtype=jnp.int32)[None], (B, T))
    return q, ks, vs, q_pos


class Stacked:
    """An implementation called as f(q, kv, None, q_pos, r) on one [R, 2, B, KVH, S, hd] cache."""

    def __init__(self, f):
        self.f = f


def timed_loop(fn, n, R):
    """jit(q, ks, vs, q_pos) -> (scalar, output of copy 0 in the last iteration).

    ks / vs: tuples of R caches, or (Stacked fn) one [R, 2, ...] array and None."""

    @jax.jit
    def run(q, ks, vs, q_pos):
        def body(i, carry):
            acc, _ = carry
            qq = q + (acc * 0).astype(q.dtype)     # data dependency on the previous iteration
            first = None
            for r in range(R):
                if isinstance(fn, Stacked):
                    o = fn.f(qq, ks, vs, q_pos, r)
                else:
                    o = fn(qq, ks[r], vs[r], q_pos)
                first = o if first is None else first
                acc = acc + jnp.sum(o.astype(jnp.float32)) * 1e-30
            return acc, first
        out0 = jnp.zeros(q.shape, q.dtype)
        return lax.fori_loop(0, n, body, (jnp.float32(0), out0))

    return run


def measure(run, args, reps):
    jax.block_until_ready(run(*args))  # compile + warm
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(run(*args))
        ts.append(time.perf_counter() - t0)
    return np.asarray(ts)


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@functools.partial(jax.jit, static_argnames="window")
def _f32_reference(q, k, v, q_pos, window=None):
    f32 = jnp.float32
    return cached_attention_reference(q.astype(f32), k.astype(f32), v.astype(f32), q_pos,
                                      window=window)


def f32_reference(q, k, v, q_pos, window=None):
    """The float32 reference as numpy, in batch chunks of <= CHUNK_BYTES of (bf16) cache."""
    B = q.shape[0]
    nbytes = k.size * k.dtype.itemsize
    bc = max(1, int(B * CHUNK_BYTES // nbytes)) if nbytes > CHUNK_BYTES else B
    return np.concatenate([np.asarray(_f32_reference(q[b:b + bc], k[b:b + bc], v[b:b + bc],
                                                     q_pos[b:b + bc], window=window))
                           for b in range(0, B, bc)])


# ----------------------------------------------------------------------------- one point
def prepare(B, ctx, T, *, quick, dtype, key, window=None):
    """Inputs (R cache copies) and the f32 reference(s) of one benchmark point."""
    isz = jnp.dtype(dtype).itemsize
    nbytes = kv_bytes(B, ctx, isz)
    R = 1 if quick else int(min(16, max(1, math.ceil(L2_BYTES_TARGET / nbytes))))
    prep = dict(B=B, ctx=ctx, T=T, nbytes=nbytes)
    if window is not None:
        cfg = default_config(B, T, H, KVH, ctx, HD, isz, window=window)
        prep["window_config"] = cfg
        prep["nbytes_window"] = window_kv_bytes(B, ctx, T, window, cfg.block_q, cfg.block_k, isz)
        if not quick:  # enough copies that the windowed reads do not stay in L2 either
            R = int(min(MAX_COPIES_WINDOW, max(1, math.ceil(L2_BYTES_TARGET / prep["nbytes_window"])),
                        max(1, (32 << 30) // nbytes)))
    q, ks, vs, q_pos = make_inputs(key, B, ctx, T, R, dtype)
    prep.update(R=R, args=(q, tuple(ks), tuple(vs), q_pos), ref=f32_reference(q, ks[0], vs[0], q_pos))
    if window is not None:
        prep["ref_window"] = f32_reference(q, ks[0], vs[0], q_pos, window=window)
    return prep


def kernel_times(run, args, calls):
    """{kernel name: device us per attention call} from one profiled call of the timed loop
    (``calls`` attention calls in it): which launches an implementation's time goes to."""
    import shutil
    import tempfile

    from experiments.profile_cycle import kernel_times as trace_kernel_times
    tdir = tempfile.mkdtemp(prefix="attn_prof_")
    try:
        with jax.profiler.trace(tdir, create_perfetto_trace=True):
            jax.block_until_ready(run(*args))
        times, kind = trace_kernel_times(tdir)
    finally:
        shutil.rmtree(tdir, ignore_errors=True)
    top = sorted(times.items(), key=lambda kv: -kv[1][0])[:8]
    return {"tracks": kind, "us_per_call": {k: v[0] / calls for k, v in top},
            "launches_per_call": {k: v[1] / calls for k, v in top}}


def time_impl(fn, prep, *, quick, reps, target_s, windowed=False, profile=False):
    """Builds, checks and times one implementation on prepared inputs -> result dict.
    windowed: checked against the windowed reference, TB/s on the bytes the window reads.
    profile: also the device time per kernel of one profiled call (kernel_times)."""
    nbytes, R = prep["nbytes_window" if windowed else "nbytes"], prep["R"]
    ref = prep["ref_window" if windowed else "ref"]
    predicted = nbytes / 2e12 + 5e-6  # at 2 TB/s + launch
    n = 2 if quick else int(min(2000, max(5, target_s / (predicted * R))))
    res = {"n_iter": n}
    try:
        t0 = time.perf_counter()
        run = timed_loop(fn, n, R)
        if isinstance(fn, Stacked):
            if "args_stacked" not in prep:
                q, ks, vs, q_pos = prep["args"]
                prep["args_stacked"] = (q, jnp.stack([jnp.stack(ks), jnp.stack(vs)], axis=1),
                                        None, q_pos)
            args = prep["args_stacked"]
        else:
            args = prep["args"]
        _, out = jax.block_until_ready(run(*args))
        res["compile_and_first_s"] = round(time.perf_counter() - t0, 3)
        res["rel_err_vs_f32"] = rel_err(out, ref)
        ts = measure(run, args, reps) / (n * R)
        us = ts * 1e6
        res.update(us_median=float(np.median(us)), us_min=float(us.min()), us_max=float(us.max()))
        tbs = nbytes / (np.median(ts) * 1e12)
        res.update(tbs=float(tbs), pct_hbm=float(100 * tbs / HBM_TBS))
        if profile:
            res["kernels"] = kernel_times(run, args, n * R)
    except Exception as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        traceback.print_exc()
    return res


def bench_point(B, ctx, T, impls, *, quick, reps, dtype, target_s, key, window=None,
                profile=False):
    prep = prepare(B, ctx, T, quick=quick, dtype=dtype, key=key, window=window)
    cfg = default_config(B, T, H, KVH, ctx, HD, jnp.dtype(dtype).itemsize)
    point = {"batch": B, "context": ctx, "T": T, "kv_bytes": prep["nbytes"], "copies": prep["R"],
             "l2_resident": bool(prep["R"] * prep["nbytes"] < 100e6),
             "ours_config": dataclasses.asdict(cfg), "impls": {}}
    if window is not None:
        point.update(window=list(window), kv_bytes_window=prep["nbytes_window"],
                     kv_fraction_window=prep["nbytes_window"] / prep["nbytes"],
                     l2_resident_window=bool(prep["R"] * prep["nbytes_window"] < 100e6),
                     ours_window_config=dataclasses.asdict(prep["window_config"]))
    for name, fn in impls.items():
        if name == "decode_attention" and T != 1:
            continue
        point["impls"][name] = time_impl(fn, prep, quick=quick, reps=reps, target_s=target_s,
                                         windowed=name in WINDOWED, profile=profile)
    # The loop's own per-call cost (the q update and the output sum, ~2 tiny kernels), measured
    # with an implementation that returns q: informative; figures above include it.
    ov = time_impl(lambda q, k, v, p: q + k[0, 0, 0, 0], prep, quick=quick, reps=reps,
                   target_s=target_s)  # (reads one element of each copy: no CSE across copies)
    point["loop_overhead_us"] = ov.get("us_median")
    # A read-only reference for any attention kernel at this point: XLA's reductions over every K
    # and V byte (no attention math, the same loop): % of HBM here is what a plain read of these
    # bytes reached, launch and DRAM round trip included (they dominate small caches).
    if window is None:
        rf = time_impl(lambda q, k, v, p: q + ((jnp.sum(k, dtype=jnp.float32)
                                                + jnp.sum(v, dtype=jnp.float32)) * 1e-30).astype(q.dtype),
                       prep, quick=quick, reps=reps, target_s=target_s)
        if "us_median" in rf:
            point["read_floor_us"] = rf["us_median"]
            point["read_floor_pct_hbm"] = rf["pct_hbm"]
    _speedups(point["impls"])
    del prep
    gc.collect()
    return point


# ----------------------------------------------------------------------------- reporting
def environment(commit):
    d = jax.devices()[0]
    return {"commit": commit, "gpu": getattr(d, "device_kind", str(d)), "platform": d.platform,
            "jax": jax.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv[1:]}


def _fmt(res, key, spec):
    if not res or key not in res:
        return "err" if res and "error" in res else "-"
    return format(res[key], spec)


def markdown(doc):
    env = doc["env"]
    lines = [f"# Cached attention (issue 7): {env['gpu']}, jax {env['jax']}, commit {env['commit']}",
             "",
             f"Llama-3-8B heads (H={H}, KVH={KVH}, hd={HD}), {doc['dtype']}, one layer's cache; "
             "us per call (median of repeats inside one jitted loop), TB/s on KV bytes, "
             f"% of {HBM_TBS} TB/s; 'loop us' is the timing loop's own per-call cost (included "
             "in every figure; an implementation that returns q); 'read floor' is XLA's reductions "
             "over the same K and V bytes in the same loop (no attention math): what a plain read "
             "of them reached. "
             f"Peers: xla = {doc['notes'].get('xla', '-')}; "
             f"decode_attention = {doc['notes'].get('decode_attention', '-')} (T=1).",
             "",
             "| B | ctx | T | KV MB | ours us | ours TB/s | ours % | ours_layer TB/s | xla us | "
             "xla TB/s | decode_attn us | decode_attn TB/s | x vs xla | x vs decode_attn | "
             "ours err | cfg | loop us | read floor us (%) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in doc["points"]:
        o, ol, x, d = (p["impls"].get(k, {}) for k in ("ours", "ours_layer", "xla",
                                                        "decode_attention"))
        c = p.get("ours_config", {})
        cfg = f"q{c.get('block_q')}/k{c.get('block_k')}/s{c.get('num_splits')}" if c else "-"
        lines.append(
            f"| {p['batch']} | {p['context']} | {p['T']} | {p['kv_bytes'] / 1e6:.1f}"
            f"{' (L2)' if p.get('l2_resident') else ''} | {_fmt(o, 'us_median', '.1f')} | "
            f"{_fmt(o, 'tbs', '.2f')} | {_fmt(o, 'pct_hbm', '.0f')} | {_fmt(ol, 'tbs', '.2f')} | "
            f"{_fmt(x, 'us_median', '.1f')} | "
            f"{_fmt(x, 'tbs', '.2f')} | {_fmt(d, 'us_median', '.1f')} | {_fmt(d, 'tbs', '.2f')} | "
            f"{_fmt(o, 'speedup_vs_xla', '.2f')} | {_fmt(o, 'speedup_vs_decode_attention', '.2f')} | "
            f"{_fmt(o, 'rel_err_vs_f32', '.1e')} | {cfg} | {_fmt(p, 'loop_overhead_us', '.1f')} | "
            f"{_fmt(p, 'read_floor_us', '.1f')}"
            f"{' (' + format(p['read_floor_pct_hbm'], '.0f') + ')' if 'read_floor_pct_hbm' in p else ''} |")
    prof = [(p, name, r["kernels"]) for p in doc["points"] for name, r in p["impls"].items()
            if "kernels" in r]
    if prof:
        lines += ["", "## Device time per kernel (one profiled call of the timed loop, us per "
                  "attention call; the loop's own small kernels included)", "",
                  "| B | ctx | T | impl | kernel | us | launches |", "|---|---|---|---|---|---|---|"]
        for p, name, k in prof:
            for kn, us in k["us_per_call"].items():
                lines.append(f"| {p['batch']} | {p['context']} | {p['T']} | {name} | `{kn[:60]}` | "
                             f"{us:.2f} | {k['launches_per_call'][kn]:.2f} |")
    if doc.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(doc["skipped"])]
    if doc.get("sweep"):
        lines += ["", "## Configuration sweep (ours)", "",
                  "| B | ctx | T | block_q | block_k | splits | warps | stages | us | TB/s | err |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in doc["sweep"]:
            c = s["config"]
            dflt = " (default)" if s.get("default") else ""
            lines.append(f"| {s['batch']} | {s['context']} | {s['T']}{dflt} | {c.get('block_q')} | "
                         f"{c.get('block_k')} | {c.get('num_splits')} | {c.get('num_warps')} | "
                         f"{c.get('num_stages')} | {_fmt(s, 'us_median', '.1f')} | "
                         f"{_fmt(s, 'tbs', '.2f')} | {_fmt(s, 'rel_err_vs_f32', '.1e')} |")
    return "\n".join(lines) + "\n"


def markdown_window(doc):
    env = doc["env"]
    sink, recent = doc["window"]
    lines = [f"# Windowed draft attention (issue 9): {env['gpu']}, jax {env['jax']}, "
             f"commit {env['commit']}", "",
             f"Llama-3-8B heads (H={H}, KVH={KVH}, hd={HD}), {doc['dtype']}, one layer's cache, "
             f"window = {sink} sink + {recent} recent tokens. ours = full-cache kernel (verify); "
             "ours_window = the same kernel with the window (draft): it loads only the key blocks "
             "of the window ('KV MB read', at its block size). us per call (median); TB/s on the "
             f"bytes each reads; % of {HBM_TBS} TB/s. 'x' = ours us / ours_window us.", "",
             "| B | ctx | T | KV MB | KV MB read (window) | read fraction | ours us | ours TB/s | "
             "window us | window TB/s | window % | x vs ours | xla_window us | window err | "
             "window cfg | copies | loop us |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in doc["points"]:
        o, w, x = (p["impls"].get(k, {}) for k in ("ours", "ours_window", "xla_window"))
        c = p.get("ours_window_config", {})
        cfg = f"q{c.get('block_q')}/k{c.get('block_k')}/s{c.get('num_splits')}" if c else "-"
        lines.append(
            f"| {p['batch']} | {p['context']} | {p['T']} | {p['kv_bytes'] / 1e6:.1f} | "
            f"{p.get('kv_bytes_window', 0) / 1e6:.2f}{' (L2)' if p.get('l2_resident_window') else ''}"
            f" | {p.get('kv_fraction_window', 0):.3f} | {_fmt(o, 'us_median', '.1f')} | "
            f"{_fmt(o, 'tbs', '.2f')} | {_fmt(w, 'us_median', '.1f')} | {_fmt(w, 'tbs', '.2f')} | "
            f"{_fmt(w, 'pct_hbm', '.0f')} | {_fmt(w, 'speedup_vs_ours', '.2f')} | "
            f"{_fmt(x, 'us_median', '.1f')} | {_fmt(w, 'rel_err_vs_f32', '.1e')} | {cfg} | "
            f"{p['copies']} | {_fmt(p, 'loop_overhead_us', '.1f')} |")
    if doc.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(doc["skipped"])]
    return "\n".join(lines) + "\n"


def write(doc, out):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(markdown_window(doc) if doc.get("window") else markdown(doc))


# ----------------------------------------------------------------------------- sweep
SWEEP_POINTS = [(1, 8192, 1), (1, 32768, 4), (8, 2048, 8), (8, 8192, 1), (32, 8192, 4),
                (64, 2048, 1)]
# Batch 1 is where the kernel misses the target (7-36% of 4.8 TB/s, attention_h200_full.md);
# JAX's decode_attention, faster there, reads 256-key blocks in 16 splits: --sweep-points
# 1:8192:1,1:32768:1,1:32768:4 times those too (256-key blocks take one pipeline stage: 128 KB).
BATCH1_EXTRA = [(256, 4, 1), (256, 8, 1), (128, 8, 2)]  # (block_k, warps, stages)
SHORT_CACHE_EXTRA = [(128, 2), (256, 1)]  # (block_k, stages): batch 1, caches <= 512 keys


def sweep_configs(B, ctx, T):
    """The default configuration, then variations of block_k / warps / stages / splits."""
    base = default_config(B, T, H, KVH, ctx, HD, 2)
    cfgs = [base]
    for bk in (64, 128):
        for warps in (4, 8):
            for stages in (2, 3, 4):
                c = default_config(B, T, H, KVH, ctx, HD, 2, block_k=bk, num_warps=warps,
                                   num_stages=stages)
                if c not in cfgs:
                    cfgs.append(c)
    for mult in (0.25, 0.5, 2.0, 4.0):
        c = dataclasses.replace(base, num_splits=max(1, int(round(base.num_splits * mult))))
        if c not in cfgs:
            cfgs.append(c)
    if B == 1:
        for (bk, warps, stages), splits in itertools.product(BATCH1_EXTRA, (8, 16)):
            if ctx % bk == 0 and ctx // bk >= splits:
                c = default_config(B, T, H, KVH, ctx, HD, 2, block_k=bk, num_warps=warps,
                                   num_stages=stages, num_splits=splits)
                if c not in cfgs:
                    cfgs.append(c)
        # Short caches (the decode of a short prompt): the whole cache in one or two key blocks
        # per program, no splits (no combine kernel): latency, not bandwidth, sets the time.
        for bk, stages in SHORT_CACHE_EXTRA:
            if ctx <= 512 and ctx % bk == 0:
                c = default_config(B, T, H, KVH, ctx, HD, 2, block_k=bk, num_splits=1,
                                   num_stages=stages)
                if c not in cfgs:
                    cfgs.append(c)
    return cfgs


def _parse_points(text: str) -> list[tuple[int, int, int]]:
    try:
        pts = [tuple(int(v) for v in p.split(":")) for p in text.split(",") if p]
    except ValueError:
        pts = []
    if not pts or any(len(p) != 3 or min(p) < 1 for p in pts):
        raise argparse.ArgumentTypeError(f"expected B:CTX:T[,B:CTX:T...] with positive integers, got {text!r}")
    return pts


def run_sweep(args, doc, key):
    points = [(1, 512, 1), (2, 256, 4)] if args.quick else (args.sweep_points or SWEEP_POINTS)
    doc["sweep"] = []
    t_start = time.perf_counter()
    for B, ctx, T in points:
        if time.perf_counter() - t_start > args.time_budget:
            doc.setdefault("skipped", []).append(f"sweep B={B} ctx={ctx} T={T}: time budget")
            continue
        prep = prepare(B, ctx, T, quick=args.quick, dtype=jnp.bfloat16,
                       key=jax.random.fold_in(key, B * ctx + T))
        cfgs = sweep_configs(B, ctx, T)
        for cfg in (cfgs[:2] if args.quick else cfgs):
            if time.perf_counter() - t_start > args.time_budget:
                doc.setdefault("skipped", []).append(f"sweep B={B} ctx={ctx} T={T} {cfg}: time budget")
                continue
            impls, _ = make_impls(("ours",), args.quick, cfg_kwargs=dataclasses.asdict(cfg))
            res = time_impl(impls["ours"], prep, quick=args.quick, reps=args.reps,
                            target_s=args.target_ms * 1e-3)
            rec = {"batch": B, "context": ctx, "T": T, "kv_bytes": prep["nbytes"],
                   "config": dataclasses.asdict(cfg), "default": cfg == cfgs[0], **res}
            doc["sweep"].append(rec)
            print(f"[sweep] B={B} ctx={ctx} T={T} {cfg}: {_fmt(rec, 'us_median', '.1f')} us "
                  f"{_fmt(rec, 'tbs', '.2f')} TB/s", flush=True)
            write(doc, args.out)
        del prep
        gc.collect()


def _speedups(o):
    """Each of our implementations' speedup over the peers timed at the same point (stale
    ratios, e.g. of a merged point whose peers came from another run, are dropped first)."""
    for r in o.values():
        for k in [k for k in r if k.startswith("speedup_vs_")]:
            del r[k]
    for mine, peers in (("ours", ("xla", "decode_attention")),
                        ("ours_layer", ("xla", "decode_attention")),
                        ("ours_window", ("ours", "xla_window"))):
        if "us_median" in o.get(mine, {}):
            for peer in peers:
                if "us_median" in o.get(peer, {}):
                    o[mine][f"speedup_vs_{peer}"] = o[peer]["us_median"] / o[mine]["us_median"]


def merge(paths, out):
    """Joins result files of several runs (e.g. split by --ts to fit the 10-minute limit).

    A point in several files is joined implementation by implementation, later files winning
    (a re-run of "ours" alone after a kernel change keeps the peers timed earlier); each
    implementation records the commit it ran at ("commit"), the point the read floor and
    configuration of the file that timed "ours" last, and the speedups are recomputed."""
    docs = [json.load(open(p)) for p in paths]
    doc = dict(docs[0])
    key = lambda p: (p["T"], p["context"], p["batch"])  # noqa: E731
    points = {}
    for d in docs:
        commit = (d.get("env") or {}).get("commit")
        for p in d.get("points", []):
            p = copy.deepcopy(p)
            for r in p.get("impls", {}).values():
                r.setdefault("commit", commit)
            old = points.get(key(p))
            if old is not None:
                impls = {**old.get("impls", {}), **p.get("impls", {})}
                if "ours" not in p.get("impls", {}):  # keep the floor / config of the last "ours"
                    p = {**p, **{k: old[k] for k in ("ours_config", "read_floor_us",
                                                     "read_floor_pct_hbm", "loop_overhead_us")
                                 if k in old}}
                p["impls"] = impls
            _speedups(p.get("impls", {}))
            points[key(p)] = p
    doc["points"] = [points[k] for k in sorted(points)]
    done = {f"B={b} ctx={c} T={t}" for t, c, b in points}
    doc["skipped"] = sorted({s for d in docs for s in d.get("skipped", [])
                             if s.split(":")[0] not in done})
    doc["sweep"] = [s for d in docs for s in d.get("sweep", [])]
    doc["notes"] = {k: v for d in docs for k, v in d.get("notes", {}).items()}
    doc["merged_from"] = [{"path": p, "env": d.get("env")} for p, d in zip(paths, docs)]
    write(doc, out)
    print(markdown_window(doc) if doc.get("window") else markdown(doc))
    return doc


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="experiments/results/attention_h200.json")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, Pallas interpret (CPU)")
    ap.add_argument("--sweep", action="store_true", help="configuration sweep of our kernel")
    ap.add_argument("--sweep-points", type=_parse_points, default=None, metavar="B:CTX:T,...",
                    help="with --sweep: these (batch, context, T) points instead of the default ones")
    ap.add_argument("--batches", type=int, nargs="*", default=None)
    ap.add_argument("--contexts", type=int, nargs="*", default=None)
    ap.add_argument("--ts", type=int, nargs="*", default=None)
    ap.add_argument("--impls", nargs="*", default=None,
                    help="default: ours xla decode_attention; with --window: ours ours_window")
    ap.add_argument("--window", type=int, nargs=2, default=None, metavar=("SINK", "RECENT"),
                    help="windowed draft attention: ours_window vs the full-cache kernel")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--target-ms", type=float, default=25.0)
    ap.add_argument("--max-gb", type=float, default=40.0, help="skip points with a larger cache")
    ap.add_argument("--time-budget", type=float, default=520.0,
                    help="seconds; later points are skipped (and listed) past it")
    ap.add_argument("--kernel-times", action="store_true",
                    help="also profile one timed call per implementation: device us per kernel "
                         "(e.g. our attention kernel vs its split combine), in the JSON and a table")
    ap.add_argument("--merge", nargs="*", default=None, metavar="JSON",
                    help="no run: merge the points/sweeps of these result files into --out")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)

    window = tuple(args.window) if args.window else None
    if args.impls is None:
        args.impls = ["ours", "ours_window"] if window else ["ours", "xla", "decode_attention"]
    if args.quick:
        batches, contexts, ts = args.batches or [1, 2], args.contexts or [64, 256], args.ts or [1, 4]
        args.reps = min(args.reps, 2)
    elif window:
        batches = args.batches or WINDOW_BATCHES
        contexts, ts = args.contexts or WINDOW_CONTEXTS, args.ts or WINDOW_TS
    else:
        batches, contexts, ts = args.batches or BATCHES, args.contexts or CONTEXTS, args.ts or TS
    key = jax.random.key(0)
    impls, notes = make_impls(args.impls, args.quick, window=window)
    doc = {"env": environment(args.commit), "dtype": "bfloat16", "heads": [H, KVH, HD],
           "notes": notes, "points": [], "skipped": []}
    if window and not args.sweep:
        doc["window"] = list(window)
    print(json.dumps(doc["env"]), flush=True)
    if args.sweep:
        run_sweep(args, doc, key)
        write(doc, args.out)
        print(markdown(doc))
        return doc

    t_start = time.perf_counter()
    for T in ts:
        for ctx in contexts:
            for B in batches:
                if kv_bytes(B, ctx) > args.max_gb * 1e9:
                    doc["skipped"].append(f"B={B} ctx={ctx} T={T}: cache {kv_bytes(B, ctx) / 1e9:.1f} GB")
                    continue
                if time.perf_counter() - t_start > args.time_budget:
                    doc["skipped"].append(f"B={B} ctx={ctx} T={T}: time budget")
                    continue
                p = bench_point(B, ctx, T, impls, quick=args.quick, reps=args.reps, dtype=jnp.bfloat16,
                                target_s=args.target_ms * 1e-3, key=jax.random.fold_in(key, B * ctx + T),
                                window=window, profile=args.kernel_times)
                doc["points"].append(p)
                o = p["impls"]
                print(f"B={B:3d} ctx={ctx:6d} T={T}: " + "  ".join(
                    f"{k} {_fmt(v, 'us_median', '.1f')}us {_fmt(v, 'tbs', '.2f')}TB/s "
                    f"err {_fmt(v, 'rel_err_vs_f32', '.1e')}" for k, v in o.items()), flush=True)
                write(doc, args.out)
    write(doc, args.out)
    print(markdown_window(doc) if window else markdown(doc))
    return doc


if __name__ == "__main__":
    main()
