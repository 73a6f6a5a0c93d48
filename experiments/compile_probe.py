"""Where a decode program's compile time goes: trace + lower vs XLA compile, for the 8B-shaped
random model in either weight layout (issue 6/8: the int4 [N, K] layout's batch-1 program did not
finish compiling within 95 s on the H200, the stored layout's took 22.8 s).

    PYTHONPATH=. python3 experiments/compile_probe.py --weight-layout nk [--mode w4a16|qspec]
        [--batch 1] [--prompt-len 128] [--new-tokens 64] [--out FILE.json]

Prints and writes seconds for model build, layout conversion, lowering and compiling, and how
many Mosaic GPU custom calls the program holds (step times: sweep.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--weight-layout", default="nk", choices=["half_split", "nk"])
    ap.add_argument("--mode", default="w4a16")
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import qspec_jax as qj
    from experiments.sweep import random_model
    rec = dict(vars(args), jax=jax.__version__, device=str(jax.devices()[0].device_kind))
    t = time.perf_counter()
    model = random_model(args.model, True)
    jax.block_until_ready(model.state)
    rec["build_s"] = time.perf_counter() - t
    t = time.perf_counter()
    model = qj.with_weight_layout(model, args.weight_layout)
    jax.block_until_ready(model.state)
    rec["layout_s"] = time.perf_counter() - t
    prompts = [[3 + (i % 50) for i in range(args.prompt_len)]] * args.batch
    kw = dict(gamma=args.gamma) if args.mode == "qspec" else {}
    call = qj.decode_call(model, prompts, max_new_tokens=args.new_tokens, mode=args.mode, **kw)
    t = time.perf_counter()
    lowered = call.fn.lower(*call.args, **call.kwargs)
    rec["lower_s"] = time.perf_counter() - t
    text = lowered.as_text()
    rec["mosaic_custom_calls"] = text.count("mosaic_gpu")
    t = time.perf_counter()
    compiled = lowered.compile()
    rec["compile_s"] = time.perf_counter() - t
    del compiled
    print(json.dumps(rec), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rec, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
