"""Cold start of one decoding configuration in a fresh process: what a user's first
``qj.generate`` call costs (compile + gamma="auto" calibration + decode) and the same call again.

Issue 8 / the API default: QSpec with a fixed gamma compiles one program; gamma="auto" times the
draft and verify steps once per batch size (cost_model.measure_cycle_costs, with its early exit
where no gamma can pay) and then compiles what it runs. Run one configuration per process (the
jit caches of one would serve the next):

    for c in w4a16 qspec3 auto; do
      PYTHONPATH=. python3 experiments/coldstart.py --model llama3-8b --batch 1 --config $c \\
          --commit $(git rev-parse --short HEAD) --out coldstart.jsonl
    done

Appends one JSON line per run: load / first-call / second-call seconds, the mode that ran
(plain decoding or QSpec) and the commit, device and jax version. No persistent compilation
cache or cost tables on disk (the API enables none by itself) unless --cache-dir is given.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {"w4a16": dict(mode="w4a16"), "qspec3": dict(mode="qspec", gamma=3),
           "auto": dict(mode="qspec", gamma="auto")}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama3-8b", help="a sweep.py shaped model (random weights)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--config", choices=sorted(CONFIGS), required=True)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--cache-dir", default=None, help="persistent compilation cache (default: off)")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--out", required=True, help="JSON-lines file to append to")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    import jax
    import numpy as np

    import qspec_jax as qj
    from sweep import environment, random_model
    if a.cache_dir:
        qj.enable_persistent_cache(a.cache_dir)
    model = qj.with_weight_layout(random_model(a.model, quantized=True), "auto", in_place=True)
    jax.block_until_ready(jax.tree_util.tree_leaves(model.state))
    load_s = time.perf_counter() - t0
    rng = np.random.RandomState(0)
    prompts = [rng.randint(3, model.cfg.vocab_size, a.prompt_len).tolist() for _ in range(a.batch)]
    walls, out = [], None
    for _ in range(2):
        t = time.perf_counter()
        out = qj.generate(model, prompts, max_new_tokens=a.new_tokens, **CONFIGS[a.config])
        walls.append(time.perf_counter() - t)
    row = dict(model=a.model, batch=a.batch, config=a.config, prompt_len=a.prompt_len,
               new_tokens=a.new_tokens, load_s=load_s, first_call_s=walls[0],
               second_call_s=walls[1], plain_decoding=bool(out.stats.get("plain_decoding", False)),
               cycles=out.stats.get("cycles"), persistent_cache=bool(a.cache_dir),
               random_weights=True, **environment(a.commit))
    with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
