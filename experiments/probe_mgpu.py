"""Issue 6: the Mosaic GPU swap-AB int4 GEMM (pallas_kernels/w4_mgpu.py) against our Triton
kernels and XLA at decode M, on the GPU.

For each Llama-3-8B shape (K x N) and M: correctness of the Mosaic kernel against the
model-layout references (w4a16_matmul_reference / w4a8_matmul_reference on the same weights
in half-split layout), then per-call time of a config sweep (CUPTI, R weight copies against
L2 as in bench_kernels), beside our default Triton kernels and XLA bf16.

    PYTHONPATH=. python3 experiments/probe_mgpu.py --out DIR [--ms 1,4,8,16] [--sweep small|full]
        [--baseline-variants triton_w4a16,triton_w4a8,xlank_w4a16,xlank_w4a8]

Writes DIR/probe_mgpu.json (rows: shape, M, variant, config, us, TB/s on weight+scale bytes,
% of 4.8 TB/s, max error) incrementally.

    python3 experiments/probe_mgpu.py --report A.json [B.json ...]   # Markdown summary

--sweep diag (issue 6: where the time of a decode GEMM goes): at every shape, mode and M, the
model's GEMM (variant mgpu: kernel + XLA epilogue, checked), the Mosaic kernel alone (mgpu_raw:
split-K partials, no epilogue) and the kernel with its unpack and MMA removed (mgpu_read:
MgpuConfig(probe="read"), the grid + TMA ring + partials store alone); then at M = 1, w4a16,
mgpu_read over tile / K step / ring depth / split-K variants: what this structure can stream.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from experiments.bench_kernels import (HBM_TBS, TIMER, env_meta, make_weights, make_x, measure,  # noqa: E402
                                       n_copies, parse_shapes)
from pallas_kernels._common import quantize_per_token_reference  # noqa: E402
from qspec_jax.layers import quantized_matmul  # noqa: E402
from pallas_kernels.w4_mgpu import (OUT_MN, MgpuConfig, check, default_config,  # noqa: E402
                                    nk_from_half_split, padded_rows, w4_mgpu_matmul)
from pallas_kernels.w4a16_matmul import w4a16_matmul, w4a16_matmul_reference  # noqa: E402
from pallas_kernels.w4a8_matmul import w4a8_matmul, w4a8_matmul_reference  # noqa: E402


def sweep_configs(kind: str, int8: bool, K: int = 0, N: int = 0, M: int = 16):
    ll = "wgmma" if int8 else "upcast"
    if kind == "tune":  # 64-row tiles, split-K chosen for 256-2048 CTAs at this shape
        out = []
        for bk, p in itertools.product((256, 512), (2, 3)):
            for sk in (1, 2, 4, 8, 16):
                if 256 <= N // 64 * sk <= 2048 and K % (bk * sk) == 0 and N % 64 == 0:
                    out.append(MgpuConfig(tile_n=64, block_k=bk, split_k=sk, stages=p,
                                          load_layout=ll))
        return out
    if kind == "ws":  # warp-specialized: 128-row tiles over two compute warpgroups
        out = []
        for bk, p in ((256, 2), (256, 3), (256, 4), (256, 6), (128, 6)):
            for sk in (1, 2, 4, 8, 16):
                if (128 <= N // 128 * sk <= 1024 and K % (bk * sk) == 0 and N % 128 == 0
                        and K // (bk * sk) >= p):  # at least as many K steps as stages
                    out.append(MgpuConfig(tile_n=128, block_k=bk, split_k=sk, stages=p,
                                          load_layout=ll, warp_specialized=True))
        return out
    if kind == "regs":  # narrower K steps (fewer live registers per thread: more resident CTAs)
        out = []         # with deeper rings; block_k 64/128 never timed before (tune: 256/512)
        for bk, p in itertools.product((64, 128), (3, 4, 6, 8)):
            for sk in (1, 2, 4, 8, 16):
                if (256 <= N // 64 * sk <= 2048 and K % (bk * sk) == 0 and N % 64 == 0
                        and K // (bk * sk) >= p):
                    out.append(MgpuConfig(tile_n=64, block_k=bk, split_k=sk, stages=p,
                                          load_layout=ll))
        return out
    if kind == "smem":  # the unpacked tile as a shared-memory wgmma operand, one MMA in flight
        out = []
        for bk, p in itertools.product((128, 256), (2, 3, 4)):
            for sk in (1, 2, 4, 8, 16):
                cfg = MgpuConfig(tile_n=64, block_k=bk, split_k=sk, stages=p, load_layout=ll,
                                 smem_a=True)
                if (256 <= N // 64 * sk <= 2048 and K // (bk * sk) >= p
                        and check(M, K, N, cfg) is None):  # (check: divisibility, smem bound)
                    out.append(cfg)
        return out
    if kind == "persist":  # persistent CTAs: units_per_cta units through one continuous pipeline
        out = []
        for p, sk, upc in itertools.product((2, 4, 6), (1, 2, 4, 8, 16), (2, 3, 4, 7, 8)):
            cfg = MgpuConfig(tile_n=64, block_k=256, split_k=sk, stages=p, load_layout=ll,
                             units_per_cta=upc)
            # (check: divisibility of N, K and the units); 100-264 CTAs, >= 2 K steps per unit
            if (check(M, K, N, cfg) is None and K // (256 * sk) >= 2
                    and 100 <= N // 64 * sk // upc <= 264):
                out.append(cfg)
        return out
    if kind == "bigm":  # x of 64-256 rows: the default's 64-column tiles re-read all of x per
        out = []        # tile (gate/up at M = 256: ~0.9 GB from L2), so wider tiles or x's rows
        Mp = padded_rows(M)  # split over CTAs (tile_m); K step, ring
        for tm, tn, bk, p, sk in itertools.product((0, 64, 128), (64, 128, 256), (128, 256), (2,),
                                                   (1, 2, 4)):
            cfg = MgpuConfig(tile_n=tn, block_k=bk, split_k=sk, stages=p, load_layout=ll,
                             out_mn=OUT_MN, tile_m=tm)
            rows = cfg.rows_per_cta(Mp)
            ctas = N // tn * sk * (Mp // rows)
            # a real M split only; accumulator <= 128 f32 registers per thread; 100-1024 CTAs;
            # >= p K steps per split
            if ((tm == 0 or tm < Mp) and tn * rows <= 128 * 128 and check(M, K, N, cfg) is None
                    and 100 <= ctas <= 1024 and K // (bk * sk) >= p):
                out.append(cfg)
        return out
    if kind == "default":  # what the model runs: w4_mgpu.default_config at this M
        return [dataclasses.replace(default_config(M, K, N, int8), load_layout=ll)]
    if kind == "pdl":  # the default config and its programmatic-dependent-launch variants;
        # "prefetch" also with a 4-deep weight ring (8 KB a stage: all of a 4-step CTA's weights
        # requested before the wait), where the CTA has that many K steps
        base = dataclasses.replace(default_config(M, K, N, int8), load_layout=ll, pdl="")
        k_steps = K // (base.block_k * base.split_k)
        variants = [dataclasses.replace(base, pdl="wait"), dataclasses.replace(base, pdl="prefetch")]
        if k_steps >= 4 and base.stages < 4:
            variants.append(dataclasses.replace(base, pdl="prefetch", stages=4))
        return [base] + [c for c in variants if check(M, K, N, c) is None]
    if kind == "one":
        return [MgpuConfig(load_layout=ll)]
    if kind == "small":
        grid = itertools.product((128,), (256, 512), (1, 2), (4,))
    elif kind == "mid":
        grid = itertools.product((64, 128), (256,), (1, 2, 4, 8), (2, 4))
    else:
        grid = itertools.product((64, 128, 256), (256, 512), (1, 2, 4), (2, 3, 6))
    return [MgpuConfig(tile_n=n, block_k=k, split_k=s, stages=p, load_layout=ll)
            for n, k, s, p in grid]


def report(paths: list[str]) -> str:
    """Markdown summary of probe_mgpu.json files: per shape and M the fastest correct Mosaic
    configuration measured in any of the files against our Triton kernels (last file that timed
    them), the per-decoder-layer sums, and the M = sweep_m config sweeps."""
    rows, metas = [], []
    for i, pth in enumerate(paths):
        d = json.load(open(pth))
        metas.append((pth, d["meta"]))
        rows += [dict(r, _file=i) for r in d["rows"]]
    best, base = {}, {}
    for r in rows:
        if "us" not in r:
            continue
        key = (r["K"], r["N"], r["M"], r["mode"])
        if r["variant"] == "mgpu":
            if r.get("ok") and (key not in best or r["us"] < best[key]["us"]):
                best[key] = r
        else:  # peers: "triton" (stored layout) or "xlank" (XLA over int4 [N, K])
            base[key + (r["variant"].split("_")[0],)] = r
    out = []
    for pth, m in metas:
        out.append(f"- `{os.path.basename(pth)}`: commit {m.get('commit')}, {m.get('gpu')}, "
                   f"jax {m.get('jax')}, timer {m.get('timer') or 'cupti (field unset)'}, {m.get('date')}")
    shapes = sorted({(k[0], k[1]) for k in best}, key=lambda s: (s[0], -s[1]))
    ms = sorted({k[2] for k in best})
    out.append("")
    for mode in ("w4a16", "w4a8"):
        out.append(f"### {mode}: Mosaic GPU swap-AB vs our Triton default (us per call, % of 4.8 TB/s "
                   "on weight+scale bytes)\n")
        out.append("| K x N | M | Mosaic config | Mosaic us [min, max] | % HBM | Triton us | % HBM | speedup "
                   "| XLA int4 [N, K] us |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for K, N in shapes:
            for M in ms:
                b = best.get((K, N, M, mode))
                t = base.get((K, N, M, mode, "triton"))
                xl = base.get((K, N, M, mode, "xlank"))
                if b is None:
                    continue
                tt = f"{t['us']:.2f} | {t['pct_hbm']:.0f}%" if t else "- | -"
                sp = f"{t['us'] / b['us']:.2f}x" if t else "-"
                out.append(f"| {K} x {N} | {M} | {b['config']} | {b['us']:.2f} [{b['us_min']:.2f}, "
                           f"{b['us_max']:.2f}] | {b['pct_hbm']:.0f}% | {tt} | {sp} | "
                           + (f"{xl['us']:.2f} |" if xl else "- |"))
        out.append("")
        out.append(f"Per decoder layer (sum of the shapes above, {mode}):\n")
        out.append("| M | Mosaic us | Triton us | speedup | Mosaic % of the layer's 4.8 TB/s time |")
        out.append("|---|---|---|---|---|")
        for M in ms:
            bs = [best.get((K, N, M, mode)) for K, N in shapes]
            ts = [base.get((K, N, M, mode, "triton")) for K, N in shapes]
            if any(v is None for v in bs):
                continue
            tb = sum(v["us"] for v in bs)
            roof = sum((K * N // 2 + 4 * N) / HBM_TBS / 1e6 for K, N in shapes)
            tt = sum(v["us"] for v in ts) if all(ts) else None
            out.append(f"| {M} | {tb:.1f} | {tt:.1f} | {tt / tb:.2f}x | {100 * roof / tb:.0f}% |" if tt
                       else f"| {M} | {tb:.1f} | - | - | {100 * roof / tb:.0f}% |")
        out.append("")
    out.append("### Config sweeps (w4a16 at each file's sweep M, 16 if unrecorded; fastest first; "
               "`ok` = matches the reference)\n")
    sweep_m = [m.get("sweep_m", 16) for _, m in metas]
    for K, N in shapes:
        sw = sorted((r for r in rows if r["variant"] == "mgpu" and r["K"] == K and r["N"] == N
                     and r["mode"] == "w4a16" and r["M"] == sweep_m[r["_file"]] and "us" in r),
                    key=lambda r: r["us"])
        seen, cells = set(), []
        for r in sw:
            if (r["config"], r["_file"]) in seen:
                continue
            seen.add((r["config"], r["_file"]))
            cells.append(f"{r['config']} {r['us']:.1f}{'' if r.get('ok') else ' (WRONG)'}"
                         + (f" (M {r['M']})" if r["M"] != 16 else ""))
        out.append(f"- {K} x {N}: " + ", ".join(cells))
    return "\n".join(out) + "\n"


def diag_read_configs(K: int, N: int):
    """Read-only structures around the default at M = 1: tile 64 / 128 rows, K steps 256 / 512,
    rings of 2 / 4 / 6 stages, the default split-K, half and double (>= 2 K steps per CTA)."""
    base = default_config(1, K, N).split_k
    out = []
    for tn, bk, p, sk in itertools.product((64, 128), (256, 512), (2, 4, 6),
                                           sorted({max(1, base // 2), base, base * 2})):
        cfg = MgpuConfig(tile_n=tn, block_k=bk, split_k=sk, stages=p, out_mn=True, probe="read")
        if check(1, K, N, cfg) is None and K // (bk * sk) >= 2:
            out.append(cfg)
    return out


def shape_weights(key, K, N):
    """(weight + scale bytes, R copies against L2, half-split weights, int4 [N, K] weights)."""
    wbytes = K * N // 2 + 4 * N
    R = n_copies(wbytes, False)
    ws = make_weights(key, K, N, K, R)
    ws_nk = [(nk_from_half_split(q), s[0]) for q, s in ws]
    jax.block_until_ready(ws_nk)
    return wbytes, R, ws, ws_nk


def shape_inputs(key, M, K, ws, int8: bool):
    """(x bf16, xq int8, sx [M, 1], the model-layout reference f32) of one M."""
    x = make_x(jax.random.fold_in(key, M), M, K)
    xq, sx = quantize_per_token_reference(x, 8)
    ref = (w4a8_matmul_reference(xq, sx, *ws[0]) if int8 else w4a16_matmul_reference(x, *ws[0]))
    return x, xq, sx, np.asarray(ref, np.float32)


def time_row(row, f, targs, wbytes, iters, rows, save, err_chars=600):
    """Time f(*targs) (R weight copies per call: us per GEMM), record the row, print it."""
    try:
        t = measure(f, targs, iters) / row["R"]
        row.update(us=float(np.median(t)), us_min=float(np.min(t)), us_max=float(np.max(t)),
                   TBps=wbytes / float(np.median(t)) / 1e6)
        row["pct_hbm"] = 100 * row["TBps"] / HBM_TBS
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {str(e)[:err_chars]}"
    rows.append(row); save(); print(json.dumps(row), flush=True)


def run_diag(args, shapes, ms, modes, rows, save, key, t_start):
    """--sweep diag: rows of variants mgpu / mgpu_raw / mgpu_read (see the module docstring)."""
    import jax.numpy as jnp

    from pallas_kernels import w4_mgpu
    from pallas_kernels.w4_mgpu import padded_rows

    def timed(row, f, targs, wbytes):
        time_row(row, f, targs, wbytes, args.iters, rows, save)

    def raw(cfg, M, K, N, int8):  # the Mosaic kernel alone over R weight copies
        kern = w4_mgpu._kernel(cfg, padded_rows(M), K, N, int8)
        return jax.jit(lambda a, w: tuple(kern(a, q) for q, _ in w))

    for K, N in shapes:
        wbytes, R, ws, ws_nk = shape_weights(key, K, N)
        for mode in modes:
            int8 = mode == "w4a8"
            ll = "wgmma" if int8 else "upcast"
            for M in ms:
                if time.time() - t_start > args.time_budget:
                    print("[budget] stopping", flush=True); return
                cfg = dataclasses.replace(default_config(M, K, N), load_layout=ll)
                x, xq, sx, ref = shape_inputs(key, M, K, ws, int8)
                base = dict(K=K, N=N, M=M, mode=mode, R=R, config=cfg.short())
                if int8:
                    f = jax.jit(lambda a, b, w, c=cfg: tuple(w4_mgpu_matmul(a, q, s, b, config=c) for q, s in w))
                    targs = (xq, sx.reshape(-1), ws_nk)
                else:
                    f = jax.jit(lambda a, w, c=cfg: tuple(w4_mgpu_matmul(a, q, s, config=c) for q, s in w))
                    targs = (x, ws_nk)
                row = dict(base, variant="mgpu")
                try:
                    got = np.asarray(f(*targs)[0], np.float32)
                    row["max_err"] = float(np.max(np.abs(got - ref)))
                    row["ok"] = bool(row["max_err"] <= 0.02 * float(np.max(np.abs(ref))) + 1e-3)
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e)[:600]}"
                    rows.append(row); save(); print(json.dumps(row), flush=True)
                    continue
                timed(row, f, targs, wbytes)
                xp = jnp.pad((xq if int8 else x).astype(jnp.int8 if int8 else jnp.bfloat16),
                             ((0, padded_rows(M) - M), (0, 0)))
                timed(dict(base, variant="mgpu_raw"), raw(cfg, M, K, N, int8), (xp, ws_nk), wbytes)
                rd = dataclasses.replace(cfg, probe="read")
                timed(dict(base, variant="mgpu_read", config=rd.short()), raw(rd, M, K, N, int8),
                      (xp, ws_nk), wbytes)
        x1 = jnp.zeros((padded_rows(1), K), jnp.bfloat16)
        for cfg in diag_read_configs(K, N):
            if time.time() - t_start > args.time_budget:
                print("[budget] stopping", flush=True); return
            timed(dict(K=K, N=N, M=1, mode="w4a16", R=R, config=cfg.short(), variant="mgpu_read_sweep"),
                  raw(cfg, 1, K, N, False), (x1, ws_nk), wbytes)


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--report":
        print(report(sys.argv[2:]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="8b")
    ap.add_argument("--ms", default="1,4,8,16")
    ap.add_argument("--sweep", default="small",
                    choices=("default", "one", "small", "mid", "tune", "ws", "regs", "smem", "persist",
                             "bigm", "full", "diag", "pdl"),
                    help="default: no sweep, the model's w4_mgpu.default_config at every M; pdl: "
                         "the same and its programmatic-dependent-launch variants at every M")
    ap.add_argument("--sweep-m", type=int, default=16, help="M at which configs are swept")
    ap.add_argument("--modes", default="w4a16,w4a8")
    ap.add_argument("--sweep-modes", default="w4a16,w4a8",
                    help="modes whose configs are swept; the others reuse w4a16's best config")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--no-baselines", dest="baselines", action="store_false",
                    help="skip our Triton kernels (timed by bench_kernels.py anyway)")
    ap.add_argument("--baseline-variants", default="triton_w4a16,triton_w4a8,xlank_w4a16,xlank_w4a8",
                    help="peers timed at every M: our Triton kernels (stored layout) and XLA's GEMM "
                         "over the int4 [N, K] weight (the model's path above kernel_dispatch.mgpu_max_m)")
    ap.add_argument("--time-budget", type=float, default=480.0)
    args = ap.parse_args(argv)
    shapes = parse_shapes(args.shapes)
    ms = [int(v) for v in args.ms.split(",")]
    modes = args.modes.split(",")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "probe_mgpu.json")
    meta = dict(env_meta(args.commit), sweep=args.sweep, sweep_m=args.sweep_m)
    rows = []
    t_start = time.time()

    def save():
        with open(path, "w") as f:
            json.dump(dict(meta=dict(meta, timer=TIMER["name"]), rows=rows), f, indent=1)

    key = jax.random.key(0)
    if args.sweep == "diag":
        run_diag(args, shapes, ms, modes, rows, save, key, t_start)
        save()
        print("wrote", path)
        return
    for K, N in shapes:
        wbytes, R, ws, ws_nk = shape_weights(key, K, N)
        best = {}
        for mode in modes:
            int8 = mode == "w4a8"
            # 1) config sweep at sweep_m, 2) the best config at every M
            per_m = args.sweep in ("default", "pdl")  # configs of their own at every M
            phases = ((("sweep", [args.sweep_m]),) if not per_m else ()) + (("ms", ms),)
            if mode not in args.sweep_modes.split(",") and "w4a16" in best:
                best[mode] = dataclasses.replace(best["w4a16"], load_layout="wgmma" if int8 else "upcast")
                phases = (("ms", ms),)
            for phase, m_list in phases:
                for M in m_list:
                    x, xq, sx, ref = shape_inputs(key, M, K, ws, int8)
                    sxv = sx.reshape(-1)
                    cfgs = (sweep_configs(args.sweep, int8, K, N, M) if phase == "sweep"
                            else sweep_configs(args.sweep, int8, K, N, M) if per_m
                            else [best.get(mode, sweep_configs("one", int8)[0])])
                    for cfg in cfgs:
                        if time.time() - t_start > args.time_budget:
                            print("[budget] stopping", flush=True); save(); return
                        err = check(M, K, N, cfg)
                        if err:
                            continue
                        row = dict(K=K, N=N, M=M, mode=mode, variant="mgpu", config=cfg.short(), R=R)
                        try:
                            if int8:
                                f = jax.jit(lambda a, b, w, c=cfg: tuple(
                                    w4_mgpu_matmul(a, q, s, b, config=c) for q, s in w))
                                out = f(xq, sxv, ws_nk)
                                targs = (xq, sxv, ws_nk)
                            else:
                                f = jax.jit(lambda a, w, c=cfg: tuple(
                                    w4_mgpu_matmul(a, q, s, config=c) for q, s in w))
                                out = f(x, ws_nk)
                                targs = (x, ws_nk)
                            got = np.asarray(out[0], np.float32)
                            row["max_err"] = float(np.max(np.abs(got - ref)))
                            row["ref_scale"] = float(np.max(np.abs(ref)))
                            row["ok"] = bool(row["max_err"] <= 0.02 * row["ref_scale"] + 1e-3)
                            t = measure(f, targs, args.iters) / R
                            row.update(us=float(np.median(t)), us_min=float(np.min(t)),
                                       us_max=float(np.max(t)))
                            row["TBps"] = wbytes / row["us"] / 1e6
                            row["pct_hbm"] = 100 * row["TBps"] / HBM_TBS
                        except Exception as e:  # noqa: BLE001
                            row["error"] = f"{type(e).__name__}: {str(e)[:600]}"
                        rows.append(row); save()
                        print(json.dumps(row), flush=True)
                    if phase == "sweep":
                        good = [r for r in rows if r.get("ok") and r["K"] == K and r["N"] == N
                                and r["mode"] == mode and r["M"] == M and "us" in r]
                        if good:
                            b = min(good, key=lambda r: r["us"])
                            best[mode] = next(c for c in sweep_configs(args.sweep, int8, K, N, M)
                                              if c.short() == b["config"])
        # baselines at every M
        for M in (ms if args.baselines else []):
            x = make_x(jax.random.fold_in(key, M), M, K)
            xq, sx = quantize_per_token_reference(x, 8)
            base = {"triton_w4a16": (jax.jit(lambda a, w: tuple(w4a16_matmul(a, q, s) for q, s in w)), (x, ws)),
                    "triton_w4a8": (jax.jit(lambda a, b, w: tuple(w4a8_matmul(a, b, q, s) for q, s in w)), (xq, sx, ws)),
                    # What the model runs for int4 [N, K] GEMMs the Mosaic kernel does not take
                    # (M > kernel_dispatch.mgpu_max_m): XLA's GEMM over the int4 weight (w4a8: the
                    # model's path from bf16 x, so its time includes the activation quantization).
                    "xlank_w4a16": (jax.jit(lambda a, w: tuple(
                        quantized_matmul(a, q, s[None], "w4a16", "xla") for q, s in w)), (x, ws_nk)),
                    "xlank_w4a8": (jax.jit(lambda a, w: tuple(
                        quantized_matmul(a, q, s[None], "w4a8", "xla") for q, s in w)), (x, ws_nk))}
            for name, (f, targs) in base.items():
                if name.split("_")[1] not in modes or name not in args.baseline_variants.split(","):
                    continue
                time_row(dict(K=K, N=N, M=M, mode=name.split("_")[1], variant=name, R=R), f, targs,
                         wbytes, args.iters, rows, save, err_chars=300)
    save()
    print("wrote", path)


if __name__ == "__main__":
    main()
