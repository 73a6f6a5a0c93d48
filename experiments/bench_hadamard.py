"""The online Hadamard transform (qspec_jax.rotation.online_hadamard) of rotated models: the
butterfly, the GEMM form ("dense") and the one-kernel form ("pallas"), per width and M (issue 6;
decides rotation.HADAMARD_IMPL); with --swiglu the rotated MLP's SwiGLU + transform
(rotation.swiglu_hadamard) instead.

    PYTHONPATH=. python3 experiments/bench_hadamard.py --commit <hash> --out $OUT   # GPU
    PYTHONPATH=. python3 experiments/bench_hadamard.py --quick --out /tmp/had       # CPU smoke

Widths: 14336 (Llama-3-8B down_proj input, 28 x 512), 4096 (o_proj input, Sylvester 512 x 8),
8192 (Llama-3.2-1B down_proj input). bf16 input as in the model. Per (width, M, impl): time
per call inside one jitted loop (difference of two loop lengths) and the summed device time of
its kernels (CUPTI, GPU only), the error against the float64 transform (M <= 256) and the
fraction of bf16 outputs equal to the first impl's. Writes hadamard_<tag>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments.bench_kernels import (TIMER, _loop_measure, add_run_args, env_meta, git_commit,  # noqa: E402
                                       measure)
from qspec_jax import rotation  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="14336,4096,8192")
    p.add_argument("--ms", default="1,4,16,64,256,1024,4096")
    p.add_argument("--impls", default=",".join(rotation.HADAMARD_IMPLS),
                   help="implementations to time; the first is the baseline of the ratio and "
                        "equality columns")
    p.add_argument("--swiglu", action="store_true",
                   help="time the rotated MLP's step instead: [gate | up] [M, 2 x width] -> the "
                        "transform of silu(gate) * up (rotation.swiglu_hadamard: XLA's SwiGLU + "
                        "the transform, or the Pallas kernel's SwiGLU prologue)")
    add_run_args(p, iters=50, quick_help="tiny CPU smoke run")
    a = p.parse_args(argv)
    if a.quick:
        a.widths, a.ms, a.iters, a.tag = "448,256", "1,3", 2, a.tag + "_quick"
    widths = [int(w) for w in a.widths.split(",")]
    ms = [int(m) for m in a.ms.split(",")]
    impls = a.impls.split(",")
    for i in impls:
        if i not in rotation.HADAMARD_IMPLS:
            p.error(f"unknown impl {i!r}; choose from {', '.join(rotation.HADAMARD_IMPLS)}")
    on_gpu = jax.default_backend() == "gpu"
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for n in widths:
        for M in ms:
            w = 2 * n if a.swiglu else n
            x = (2 * jax.random.normal(jax.random.key(M * 7 + n), (M, w))).astype(jnp.bfloat16)
            x64 = np.asarray(x, np.float64)
            if a.swiglu:  # the SwiGLU in float64 from the bf16 inputs
                x64 = x64[:, :n] / (1 + np.exp(-x64[:, :n])) * x64[:, n:]
            exact = rotation.hadamard_transform_np(x64) if M <= 256 else None
            outs = {}
            for impl in impls:
                fn = jax.jit((lambda v, i=impl: rotation.swiglu_hadamard(v, i)) if a.swiglu else
                             (lambda v, i=impl: rotation.online_hadamard(v, i)))
                y = np.asarray(fn(x), np.float64)
                outs[impl] = y
                row = {"width": n, "M": M, "impl": impl, "swiglu": a.swiglu,
                       "factors": [rotation._decompose(n)[0]] + rotation._sylvester_factors(
                           rotation._decompose(n)[1])}
                if exact is not None:
                    row["max_rel_err"] = float(np.max(np.abs(y - exact)) / np.max(np.abs(exact)))
                loop = _loop_measure(fn, (x,), a.iters)
                row["loop_us"] = float(np.median(loop))
                row["loop_spread_us"] = [float(loop.min()), float(loop.max())]
                if on_gpu:
                    dev = measure(fn, (x,), a.iters)
                    row["device_us"] = float(np.median(dev))
                    row["device_spread_us"] = [float(np.min(dev)), float(np.max(dev))]
                if impl != impls[0]:
                    row[f"equal_to_{impls[0]}"] = float(np.mean(y == outs[impls[0]]))
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = env_meta(a.commit or git_commit())
    meta["timer_device"] = TIMER["name"] if on_gpu else None
    base = os.path.join(a.out, f"hadamard_{a.tag}")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    by = {(r["width"], r["M"], r["impl"]): r for r in rows}
    with open(base + ".md", "w") as f:
        f.write(f"# Online Hadamard{' after the SwiGLU' if a.swiglu else ''}: "
                f"{' vs '.join(impls)} ({meta['gpu']})\n\n"
                f"`PYTHONPATH=. python3 experiments/bench_hadamard.py --widths {a.widths} --ms {a.ms} "
                f"--impls {a.impls}{' --swiglu' if a.swiglu else ''}` at commit `{meta['commit']}`, jax {meta['jax']}, {meta['date']}"
                f"{' (CPU: timings meaningless)' if not on_gpu else ''}. bf16 input [M, width]; "
                "loop us = per call inside one jitted loop (median [min, max]); device us = summed "
                "kernel time (CUPTI, median [min, max]); rel err = max |y - exact| / max |exact| "
                "against the float64 transform (M <= 256).\n\n"
                f"| width (factors) | M | impl | loop us | device us | rel err | = {impls[0]} | "
                f"{impls[0]} / this (device) |\n|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            b = by.get((r["width"], r["M"], impls[0]))
            ratio = (f"{b['device_us'] / r['device_us']:.2f}x" if b and "device_us" in r else "-")
            f.write(f"| {r['width']} ({' x '.join(map(str, r['factors']))}) | {r['M']} | {r['impl']} | "
                    f"{r['loop_us']:.2f} [{r['loop_spread_us'][0]:.2f}, {r['loop_spread_us'][1]:.2f}] | "
                    + (f"{r['device_us']:.2f} [{r['device_spread_us'][0]:.2f}, {r['device_spread_us'][1]:.2f}]"
                       if "device_us" in r else "-")
                    + f" | {r.get('max_rel_err', float('nan')):.1e} | "
                    f"{r.get(f'equal_to_{impls[0]}', float('nan')):.4f} | {ratio} |\n")
    bad = [r for r in rows if r.get("max_rel_err", 0) > 2 ** -7]
    print(f"wrote {base}.json/.md; {len(bad)} rows off the exact transform by > 2^-7", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
