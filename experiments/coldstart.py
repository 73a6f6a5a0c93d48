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


def report(path: str) -> str:
    """The JSON lines of ``path`` as a Markdown table, written beside it (.md)."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    env = rows[0] if rows else {}
    lines = [f"# Cold start of one generate call: {env.get('device')}, jax {env.get('jax')}, "
             f"commit {env.get('commit')}", "",
             "`experiments/coldstart.py`, one fresh process per row (random weights; first call = "
             "compile + gamma='auto' calibration + decode; second = the same call again).", "",
             "| model | batch | config | load s | first call s | second call s | decoded plainly |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['config']} | {r['load_s']:.1f} | "
                     f"{r['first_call_s']:.1f} | {r['second_call_s']:.2f} | {r['plain_decoding']} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(text)
    return text


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--report", default=None, metavar="JSONL",
                   help="no run: write the rows of this file as a Markdown table beside it")
    p.add_argument("--model", default="llama3-8b", help="a sweep.py shaped model (random weights)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--config", choices=sorted(CONFIGS))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--cache-dir", default=None, help="persistent compilation cache (default: off)")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--out", default=None, help="JSON-lines file to append to")
    a = p.parse_args(argv)
    if a.report:
        print(report(a.report))
        return {}
    if a.config is None or a.out is None:
        p.error("--config and --out are required (or --report JSONL)")
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
