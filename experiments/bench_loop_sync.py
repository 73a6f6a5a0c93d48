"""Does a loop with a traced trip count cost more per iteration on the GPU than one with a
static trip count? (XLA must read a data-dependent loop predicate or branch index back to the
host unless it runs the loop as a command buffer.) The gamma="auto" program drafted in a loop of
traced length and verified under lax.switch until commit b694ae1 (now: one switch over whole
cycles with static draft scans); the fixed-gamma program drafts with a static scan.

Body: a chain of `--kernels` small dependent matmuls (launch-bound, like a decode step's many
small kernels). Variants, each timed as one jitted call of `--outer` repetitions inside a
while_loop whose trip count is traced (as the decode loop's):
  static:   inner lax.scan of length 3
  traced:   inner lax.fori_loop(0, n) with n = 3 traced
  switch:   lax.switch(n - 1, 3 branches), branch b = static scan of b + 1 steps
Writes JSON + Markdown under --out.

    PYTHONPATH=. python3 experiments/bench_loop_sync.py --out experiments/results
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--kernels", type=int, default=64)
    p.add_argument("--outer", type=int, default=50)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--commit", default="unknown")
    p.add_argument("--out", default="experiments/results")
    a = p.parse_args(argv)
    w = jax.random.normal(jax.random.key(0), (a.kernels, a.dim, a.dim), jnp.float32) / a.dim ** 0.5

    def step(x):
        for i in range(a.kernels):
            x = jnp.tanh(x @ w[i])
        return x

    def inner_static(x, n):
        return jax.lax.scan(lambda c, _: (step(c), None), x, None, length=3)[0]

    def inner_traced(x, n):
        return jax.lax.fori_loop(0, n, lambda i, c: step(c), x)

    def inner_switch(x, n):
        branches = [lambda c, b=b: jax.lax.scan(lambda cc, _: (step(cc), None), c, None, length=b + 1)[0]
                    for b in range(3)]
        return jax.lax.switch(n - 1, branches, x)

    def outer(inner):
        @jax.jit
        def run(x, n, reps):
            return jax.lax.fori_loop(0, reps, lambda i, c: inner(c, n), x)
        return run

    x = jax.random.normal(jax.random.key(1), (8, a.dim), jnp.float32)
    n = jnp.int32(3)
    rows = []
    for name, inner in (("static", inner_static), ("traced", inner_traced), ("switch", inner_switch)):
        f = outer(inner)
        f(x, n, jnp.int32(1)).block_until_ready()
        ts = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            f(x, n, jnp.int32(a.outer)).block_until_ready()
            t1 = time.perf_counter()
            f(x, n, jnp.int32(1)).block_until_ready()
            t2 = time.perf_counter()
            ts.append(((t1 - t0) - (t2 - t1)) / (a.outer - 1))
        per_iter_us = [1e6 * t / 3 for t in ts]
        rows.append(dict(variant=name, us_per_inner_iter_median=statistics.median(per_iter_us),
                         us_min=min(per_iter_us), us_max=max(per_iter_us)))
        print(rows[-1], flush=True)
    meta = dict(commit=a.commit, jax=jax.__version__, device=str(jax.devices()[0].device_kind),
                kernels_per_iter=a.kernels, dim=a.dim, outer=a.outer, reps=a.reps,
                date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "loop_sync.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = ["# Loop trip count: static vs traced vs switch", "",
             f"`PYTHONPATH=. python3 experiments/bench_loop_sync.py` at commit {a.commit}, "
             f"{meta['device']}, jax {meta['jax']}: {a.kernels} dependent {a.dim}x{a.dim} matmuls per "
             f"inner iteration, 3 inner iterations per outer one, per-inner-iteration time "
             f"(difference of {a.outer} and 1 outer iterations, median of {a.reps} [min-max]).", "",
             "| variant | us per inner iteration | [min, max] |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['us_per_inner_iter_median']:.1f} | "
                     f"[{r['us_min']:.1f}, {r['us_max']:.1f}] |")
    with open(os.path.join(a.out, "loop_sync.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
