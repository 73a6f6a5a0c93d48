"""Fused per-token quantization kernels (pallas_kernels/rmsnorm_quant.py) against XLA's fusion
of the same math (issue 6: keep whichever is faster): RMSNorm + quantization (the qkv and
gate_up inputs), quantization alone (o_proj's input), SwiGLU + quantization (down_proj's input
from the fused [gate | up] output), and for rotated models the online Hadamard before down_proj
+ quantization ("hadamard": XLA's transform, then our quantization kernel or XLA's; the row's
hadamard_only figures time the transform alone, the most a Hadamard + quantization kernel could
save).

    PYTHONPATH=. python3 experiments/bench_fused.py --commit <hash> --out $OUT        # H200
    PYTHONPATH=. python3 experiments/bench_fused.py --quick --out /tmp/fused          # CPU smoke

Per M (tokens) at hidden size D: time per call (a) inside one jitted loop, as the difference of
two loop lengths (launch gaps between XLA's kernels included, host dispatch not), and (b) the
summed device time of the call's kernels through CUPTI where available. Correctness: scales
within bf16 precision and every quantized value within one step of the jnp reference (the bf16
gain product may or may not be rounded, depending on fusion). Writes fused_<tag>.json and .md.
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
from pallas_kernels.rmsnorm_quant import (rmsnorm_quant, rmsnorm_quant_reference,  # noqa: E402
                                          row_quant, row_quant_reference)
from qspec_jax.rotation import online_hadamard  # noqa: E402

EPS = 1e-5


def check(ours, ref) -> dict:
    (q, s), (qr, sr) = ours, ref
    steps = int(np.abs(np.asarray(q, np.int32) - np.asarray(qr, np.int32)).max())
    srel = float(np.max(np.abs(np.asarray(s) - np.asarray(sr)) / np.asarray(sr)))
    return {"max_step_diff": steps, "scale_rel_diff": srel,
            "ok": steps <= 1 and srel <= 2 ** -7,
            "xq_equal_fraction": float(np.mean(np.asarray(q) == np.asarray(qr)))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ms", default="1,4,16,64,256,1024,4096")
    p.add_argument("--d", type=int, default=4096, help="hidden size (Llama-3-8B: 4096)")
    p.add_argument("--ffn", type=int, default=14336,
                   help="intermediate size for the swiglu kind (Llama-3-8B: 14336)")
    p.add_argument("--kinds", default="rmsnorm,none,swiglu",
                   help="rmsnorm (norm + quant), none (quant only), swiglu (SwiGLU + quant), "
                        "hadamard (online Hadamard of width --ffn + quant)")
    p.add_argument("--bits", type=int, default=8)
    add_run_args(p, iters=50, quick_help="tiny CPU run (interpret mode)")
    a = p.parse_args(argv)
    interpret = a.quick or jax.default_backend() != "gpu"
    if a.quick:
        a.ms, a.d, a.ffn, a.iters, a.tag = "1,3", 256, 384, 2, a.tag + "_quick"
    ms = [int(m) for m in a.ms.split(",")]
    kinds = a.kinds.split(",")
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for kind in kinds:
        if kind == "rmsnorm":
            ours = jax.jit(lambda x, g: rmsnorm_quant(x, g, EPS, a.bits, interpret=interpret))
            xla = jax.jit(lambda x, g: rmsnorm_quant_reference(x, g, EPS, a.bits))
            width = a.d
        elif kind in ("none", "swiglu"):
            ours = jax.jit(lambda x, g, k=kind: row_quant(x, a.bits, k, interpret=interpret))
            xla = jax.jit(lambda x, g, k=kind: row_quant_reference(x, a.bits, k))
            width = a.d if kind == "none" else 2 * a.ffn
        elif kind == "hadamard":
            ours = jax.jit(lambda x, g: row_quant(online_hadamard(x), a.bits, "none", interpret=interpret))
            xla = jax.jit(lambda x, g: row_quant_reference(online_hadamard(x), a.bits, "none"))
            width = a.ffn
        else:
            p.error(f"unknown kind {kind!r}")
        for M in ms:
            key = jax.random.key(M)
            x = (2 * jax.random.normal(key, (M, width))).astype(jnp.bfloat16)
            g = (1 + 0.1 * jax.random.normal(jax.random.fold_in(key, 1), (a.d,))).astype(jnp.bfloat16)
            row = {"kind": kind, "M": M, "D": width, "bits": a.bits, **check(ours(x, g), xla(x, g))}
            for name, fn in (("ours", ours), ("xla", xla)):
                loop = _loop_measure(fn, (x, g), a.iters)
                row[f"{name}_loop_us"] = float(np.median(loop))
                row[f"{name}_loop_spread_us"] = [float(loop.min()), float(loop.max())]
                if not interpret:
                    dev = measure(fn, (x, g), a.iters)
                    row[f"{name}_device_us"] = float(np.median(dev))
            if kind == "hadamard":
                alone = jax.jit(lambda x, g: online_hadamard(x))
                loop = _loop_measure(alone, (x, g), a.iters)
                row["hadamard_only_loop_us"] = float(np.median(loop))
                if not interpret:
                    row["hadamard_only_device_us"] = float(np.median(measure(alone, (x, g), a.iters)))
            row["speedup_loop"] = row["xla_loop_us"] / row["ours_loop_us"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = env_meta(a.commit or git_commit())
    meta["timer_device"] = TIMER["name"]
    base = os.path.join(a.out, f"fused_{a.tag}")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(f"# Fused per-token int{a.bits} quantization kernels vs XLA ({meta['gpu']})\n\n"
                f"`PYTHONPATH=. python3 experiments/bench_fused.py --d {a.d} --ffn {a.ffn} "
                f"--kinds {a.kinds} --bits {a.bits} --ms {a.ms}` at commit `{meta['commit']}`, jax {meta['jax']}"
                f"{', Pallas interpret mode (timings meaningless)' if interpret else ''}. "
                "loop us: per call inside one jitted loop (median, [min, max] over 5 repeats); "
                "device us: summed kernel time (CUPTI). Kinds: rmsnorm = RMSNorm + quantization, "
                "none = quantization only, swiglu = silu(gate) * up + quantization; D = the "
                "kernel's input width.\n\n"
                "hadamard only: the online transform alone (kind hadamard).\n\n"
                "| kind | D | M | ours loop us | XLA loop us | XLA / ours | ours device us | XLA device us | "
                "xq equal | max step diff | hadamard only loop / device us |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['kind']} | {r['D']} | {r['M']} | {r['ours_loop_us']:.2f} | {r['xla_loop_us']:.2f} | "
                    f"{r['speedup_loop']:.2f} | {r.get('ours_device_us', float('nan')):.2f} | "
                    f"{r.get('xla_device_us', float('nan')):.2f} | {r['xq_equal_fraction']:.4f} | "
                    f"{r['max_step_diff']} | "
                    + (f"{r['hadamard_only_loop_us']:.2f} / {r.get('hadamard_only_device_us', float('nan')):.2f}"
                       if "hadamard_only_loop_us" in r else "-") + " |\n")
    bad = [r for r in rows if not r["ok"]]
    print(f"wrote {base}.json/.md; {len(bad)} failed checks", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
