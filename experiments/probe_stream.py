"""How fast can a Pallas (Triton backend) kernel stream our packed int4 weights at all?

Issue 6 diagnostic. The small-M GEMM kernels read int8 [K/2, N] weight tiles at 1.0-1.6 TB/s
(21-33% of 4.8 TB/s, kernels_h200_asm.md) while XLA's bf16 GEMV reads 4.3 TB/s. This script
times a kernel that only reads the same tiles with the same grid / BlockSpec / K loop as the
GEMMs and sums them (int32, no dequantization, no MMA), over tile configurations, beside XLA's
own reduction over the same bytes. If the read alone is slow, the access structure is the
limit; if it is fast, the per-byte work of the GEMMs is. `xla_rowsum` (a row reduction: every
byte read contiguously, one kernel) is the read floor by size: what one streaming read of that
many bytes reaches on this GPU, whatever the kernel (`--xla-only` times just the XLA variants).

    PYTHONPATH=. python3 experiments/probe_stream.py --out DIR [--quick] [--xla-only]

Writes DIR/probe_stream.json (rows: config, us per call, TB/s) and prints a table. Runs on CPU
in interpret mode with --quick (tiny shapes; a smoke test, no meaningful times).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from experiments.bench_kernels import HBM_TBS, env_meta, measure, parse_shapes  # noqa: E402
from pallas_kernels._common import asm_nibbles  # noqa: E402

try:
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
    pltriton = None


def _read_kernel(q_ref, o_ref, *, bk, rows, dequant, interpret):
    bn = q_ref.shape[1]

    def body(i, acc):
        k0 = pl.multiple_of(i * bk, bk)
        t = q_ref[pl.ds(k0, bk), :]
        if dequant:  # + the GEMM's nibble unpacking (inline PTX), summed in f32: no MMA
            lo, hi = asm_nibbles(t, jnp.bfloat16, interpret)
            return acc + lo.astype(jnp.float32) + hi.astype(jnp.float32)
        return acc + t.astype(jnp.int32)

    dt = jnp.float32 if dequant else jnp.int32
    acc = lax.fori_loop(0, rows // bk, body, jnp.zeros((bk, bn), dt))
    o_ref[...] = jnp.sum(acc, axis=0).astype(o_ref.dtype)


def read_call(q, *, bn, bk, split, warps, stages, dequant=False, interpret=False):
    """Sum of q [R, N] over rows, as [split, N] int32 partials (grid: N tiles x row splits)."""
    R, N = q.shape
    rows = R // split
    params = None if pltriton is None else pltriton.CompilerParams(num_warps=warps, num_stages=stages)
    return pl.pallas_call(
        functools.partial(_read_kernel, bk=bk, rows=rows, dequant=dequant, interpret=interpret),
        out_shape=jax.ShapeDtypeStruct((split, N), jnp.float32 if dequant else jnp.int32),
        grid=(N // bn, split),
        in_specs=[pl.BlockSpec((rows, bn), lambda n, s: (s, n))],
        out_specs=pl.BlockSpec((None, bn), lambda n, s: (s, n)),
        compiler_params=params, interpret=interpret,
        name=f"read{'_asm' if dequant else ''}_bn{bn}_bk{bk}_s{split}_w{warps}_st{stages}")(q)


def configs(quick):
    if quick:
        return [dict(bn=32, bk=16, split=2, warps=4, stages=2),
                dict(bn=32, bk=16, split=2, warps=4, stages=2, dequant=True)]
    # the small-M GEMM defaults' tiles, read only and with the nibble unpacking
    out = [dict(bn=128, bk=64, split=8, warps=4, stages=4, dequant=True)]
    for bn, bk, split in itertools.product((128, 256, 512), (32, 64, 128), (2, 8, 32)):
        if bn * bk <= 16384:  # larger tiles were 1.6-16x slower at 6341a42 (stream_h200_6341a42.md)
            out.append(dict(bn=bn, bk=bk, split=split, warps=4, stages=4))
    for warps, stages in itertools.product((4, 8), (2, 3, 6)):
        out.append(dict(bn=256, bk=64, split=8, warps=warps, stages=stages))
    out.append(dict(bn=128, bk=64, split=8, warps=8, stages=4))
    out += [dict(bn=256, bk=64, split=8, warps=8, stages=4, dequant=True),
            dict(bn=512, bk=32, split=8, warps=8, stages=4, dequant=True)]
    return out


def markdown(meta, rows, args_text="") -> str:
    """The rows as a table: bytes read, us per call (median [p10, p90]), TB/s, % of 4.8 TB/s."""
    lines = [f"# Streaming reads of int4 GEMM weights: {meta.get('gpu')}, jax {meta.get('jax')}, "
             f"commit {meta.get('commit')}", "",
             f"`PYTHONPATH=. python3 experiments/probe_stream.py {args_text}` ({meta.get('date')}, "
             f"timer: {meta.get('timer')}). Per call over copies larger than L2; `xla_rowsum` = "
             "XLA's row reduction (every byte read contiguously, one kernel), `xla_sum` = its column "
             "reduction, `pallas ...` = the GEMMs' grid / tiles reading (asm: and unpacking) only.",
             "", "| K x N | MB | variant | us [p10, p90] | TB/s | % of 4.8 TB/s | correct |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "us" not in r:
            lines.append(f"| {r['K']} x {r['N']} | - | {r['variant']} | error: {r.get('error', '')[:80]} | - | - | - |")
            continue
        lines.append(f"| {r['K']} x {r['N']} | {r['bytes'] / 1e6:.1f} | {r['variant']} | "
                     f"{r['us']:.1f} [{r['us_p10']:.1f}, {r['us_p90']:.1f}] | {r['TBps']:.2f} | "
                     f"{100 * r['TBps'] / HBM_TBS:.0f} | {r['correct']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--shapes", default="4096x28672,14336x4096,4096x6144",
                   help="comma list of KxN and/or shape sets (8b, 70b), as bench_kernels.py")
    p.add_argument("--xla-only", action="store_true",
                   help="only XLA's reductions over the weight bytes (the read floor by size)")
    a = p.parse_args(argv)
    try:
        shapes = [(64, 64)] if a.quick else parse_shapes(a.shapes)
    except ValueError as e:
        p.error(str(e))
    interpret = jax.devices()[0].platform != "gpu"
    meta = env_meta(a.commit)
    os.makedirs(a.out, exist_ok=True)

    def save(rows):
        tmp = os.path.join(a.out, "probe_stream.json.tmp")
        with open(tmp, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        os.replace(tmp, os.path.join(a.out, "probe_stream.json"))
        with open(os.path.join(a.out, "probe_stream.md"), "w") as f:
            f.write(markdown(meta, rows, argv_text))

    argv_text = " ".join(sys.argv[1:] if argv is None else argv)

    rows = []
    for K, N in shapes:
        nbytes = K // 2 * N
        copies = 1 if a.quick else max(1, -(-(256 << 20) // nbytes))  # > L2: never resident
        qs = [jax.random.randint(jax.random.key(c), (K // 2, N), -128, 128, jnp.int32).astype(jnp.int8)
              for c in range(copies)]
        q0 = np.asarray(qs[0], np.int64)
        lo = ((q0 & 0xF) ^ 8) - 8
        variants = [("xla_sum", None), ("xla_rowsum", None)]
        if not a.xla_only:
            variants += [(f"pallas{' asm' if c.get('dequant') else ''} bn{c['bn']} bk{c['bk']} "
                          f"s{c['split']} w{c['warps']} st{c['stages']}", c) for c in configs(a.quick)]
        for name, c in variants:
            if name == "xla_sum":  # a column reduction (not XLA's best read), as the GEMMs' tiles
                one = lambda q: jnp.sum(q, axis=0, dtype=jnp.int32)[None]  # noqa: E731
                want = q0.sum(0)
            elif name == "xla_rowsum":  # rows of N contiguous bytes: the read floor by size
                one = lambda q: jnp.sum(q, axis=1, dtype=jnp.int32)[:, None]  # noqa: E731
                want = q0.sum(1)
            else:
                if N % c["bn"] or (K // 2) % (c["split"] * c["bk"]):
                    continue
                one = functools.partial(read_call, interpret=interpret, **c)
                want = (lo + (q0 >> 4)).sum(0) if c.get("dequant") else q0.sum(0)  # unpacked / raw
            fn = jax.jit(lambda *qs, one=one: [one(q) for q in qs])
            try:
                got = np.asarray(fn(*qs)[0], np.float64)
                got = got[:, 0] if name == "xla_rowsum" else got.sum(0)
                ok = bool((got == want).all())
                us = measure(fn, tuple(qs), 3 if a.quick else 20) / copies
                med = float(np.median(us))
                row = dict(K=K, N=N, bytes=nbytes, variant=name, config=c, correct=ok, us=med,
                           us_p10=float(np.percentile(us, 10)), us_p90=float(np.percentile(us, 90)),
                           TBps=nbytes / med / 1e6)
            except Exception as e:  # noqa: BLE001
                row = dict(K=K, N=N, variant=name, config=c, error=f"{type(e).__name__}: {str(e)[:300]}")
            rows.append(row)
            save(rows)  # after every row: a run cut short keeps what it measured
            print(f"{K}x{N} {name:36s} " + (f"{row['us']:8.1f} us {row['TBps']:5.2f} TB/s "
                                            f"({100 * row['TBps'] / HBM_TBS:3.0f}%) ok={row['correct']}"
                                            if "us" in row else row["error"]), flush=True)


if __name__ == "__main__":
    main()
