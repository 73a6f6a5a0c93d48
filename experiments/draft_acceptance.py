"""Acceptance of cheaper drafts (windowed attention, layer subsets) on held-out code.

    PYTHONPATH=. python3 experiments/draft_acceptance.py --out-prefix experiments/results/draft_acceptance_cpu
    # long contexts (issue 9) need a model trained on long rows; on the H200 (stage longmodel of
    # experiments/device_runs.sh, results in experiments/results/draft_acceptance_long_h200.md):
    #   python3 experiments/train.py --seq-len 32768 --batch-size 2 --max-position-embeddings 32768 \
    #       --rope-theta 500000 --code-fraction 0.5 --minutes 2.5 --out /tmp/long --export /tmp/long/hf
    PYTHONPATH=. python3 experiments/draft_acceptance.py --model /tmp/long/hf \
        --contexts 2048,8192,32000 --windows 4:1020,4:4092 --timed --auto --out-prefix $OUT/draft_acceptance_long

For each draft configuration, QSpec (greedy, gamma 3, draft w4a8 unless --draft) continues
prompts cut from held-out standard-library files at a given context length and records the
acceptance rate and tokens per cycle; outputs are compared with w4a16 decoding (every run of a
context uses the same cache length; the first differing token of each sequence is recorded,
with w4a16's logit gap there between the two tokens relative to its largest logit: near 0 is a
near-tie that float rounding of a (gamma+1)-token verify pass can flip).
``--timed`` also times decoding against w4a16 (the decode time is time(N tokens) - time(1
token), paired); ``--auto`` adds gamma="auto" with the full draft and the last window.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

import qspec_jax as qj  # noqa: E402
from experiments import data as D  # noqa: E402
from experiments.sweep import environment  # noqa: E402
from qspec_jax.config import round_up  # noqa: E402
from qspec_jax.cost_model import CACHE_BUCKET  # noqa: E402
from qspec_jax.draft_search import select_draft_layers  # noqa: E402

AUTO_MAX_GAMMA = 7


def code_stream(model) -> list[int]:
    """Token ids of the held-out standard-library files, concatenated (~170k tokens)."""
    ids: list[int] = []
    for text in D.read_code(D.code_split()[1]):
        ids += model.tokenizer(text + "\n\n")["input_ids"]
    return ids


def code_prompts(model, n: int, context: int, stream: list[int] | None = None) -> list[list[int]]:
    """n prompts of exactly ``context`` tokens cut from the concatenated held-out files at
    evenly spaced offsets (long contexts span several files; windows overlap only when
    n * context exceeds the stream)."""
    stream = code_stream(model) if stream is None else stream
    if context > len(stream):
        raise ValueError(f"context {context} exceeds the {len(stream)} held-out code tokens")
    starts = np.linspace(0, len(stream) - context, n).astype(int)
    return [stream[s:s + context] for s in starts]


def timed_generate(model, prompts, new_tokens: int, kw: dict) -> float:
    t0 = time.perf_counter()
    qj.generate(model, prompts, max_new_tokens=new_tokens, **kw)
    return time.perf_counter() - t0


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where two continuations differ (None: identical)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def divergence_gap(model, prompt: list[int], ref: list[int], d: int, other: int,
                   kernels: str) -> float:
    """How close w4a16 was to a tie where a continuation parted from the reference: the gap
    between the reference token's and the other token's w4a16 logits after prompt + ref[:d]
    (teacher-forced full pass), relative to the largest |logit|. Near 0: a near-tie that float
    rounding (cache length, verify width) can flip; large: a real disagreement."""
    tokens = np.asarray([prompt + ref[:d]], np.int32)
    logits = np.asarray(qj.logits(model, tokens, mode="w4a16", kernels=kernels)[0, -1], np.float64)
    return float((logits[ref[d]] - logits[other]) / np.max(np.abs(logits)))


def decode_seconds(model, prompts, new_tokens: int, kw: dict, repeats: int, one: dict) -> float:
    """Median over repeats of time(new_tokens) - time(1 token with ``one``'s w4a16 arguments:
    the prefill), both programs compiled before (paired differences cancel the prefill; NaN
    below timer noise)."""
    diffs = [timed_generate(model, prompts, new_tokens, kw) - timed_generate(model, prompts, 1, one)
             for _ in range(repeats)]
    d = float(np.median(diffs))
    return d if d > 0 else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", default="128,448")
    p.add_argument("--windows", default="4:32,4:64,4:128", help="sink:window pairs")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--draft", default="w4a8")
    p.add_argument("--dtype", default="bfloat16")
    # T_w4a8 / T_w4a16 at M = 1 on the 8B layer shapes (experiments/results/kernels_h200.md).
    p.add_argument("--draft-cost", type=float, default=88.9 / 115.8,
                   help="cost of a full-model draft step relative to a verify step")
    p.add_argument("--model", default=None,
                   help="model folder (HF checkpoint or qspec-convert output; default: the "
                        "embedded model, trained on 512-token rows)")
    p.add_argument("--kernels", default="auto")
    p.add_argument("--timed", action="store_true",
                   help="also time decoding (each generate run again once compiled; decode time = "
                        "time(N new tokens) - time(1 new token)) and report the speedup over w4a16")
    p.add_argument("--timed-repeats", type=int, default=3)
    p.add_argument("--auto", action="store_true",
                   help="also run gamma='auto' (max gamma 7) with the full draft and with the last "
                        "window (auto may decode plainly where drafting cannot pay)")
    p.add_argument("--commit", default=None, help="commit hash to record (default: git's)")
    p.add_argument("--out-prefix", required=True)
    args = p.parse_args(argv)

    model = qj.load(args.model, dtype=args.dtype, quant="w4", method="rtn")
    t0 = time.perf_counter()
    stream = code_stream(model)
    search_tokens = np.asarray(code_prompts(model, 4, 128, stream), np.int32)
    layers, history = select_draft_layers(model, search_tokens, args.draft,
                                          draft_cost=args.draft_cost)
    windows = [tuple(map(int, w.split(":"))) for w in args.windows.split(",")]
    configs = [("full", None, None, args.gamma)]
    configs += [(f"window {w[0]}:{w[1]}", w, None, args.gamma) for w in windows]
    configs += [(f"layers {','.join(map(str, layers))}", None, layers, args.gamma)]
    if args.auto:
        configs += [("auto full", None, None, "auto"),
                    (f"auto window {windows[-1][0]}:{windows[-1][1]}", windows[-1], None, "auto")]
    rows = []
    for context in map(int, args.contexts.split(",")):
        if context + args.new_tokens + args.gamma + 1 > model.cfg.max_position_embeddings:
            print(f"[draft_acceptance] context {context}: past the model's "
                  f"max_position_embeddings ({model.cfg.max_position_embeddings}), skipped")
            continue
        prompts = code_prompts(model, args.prompts, context, stream)
        # One cache length for every run of this context (room for auto's widest verify pass):
        # the attention kernel's launch configuration depends on it, and with it the rounding
        # of its sums, so runs with different cache lengths can part at near-tied logits.
        max_len = round_up(context + args.new_tokens + AUTO_MAX_GAMMA + 1, CACHE_BUCKET)
        ar_kw = dict(mode="w4a16", kernels=args.kernels, max_len=max_len)
        ref = qj.generate(model, prompts, max_new_tokens=args.new_tokens, **ar_kw).tokens
        if args.timed:  # w4a16's own decode time (its N-token program is compiled above)
            timed_generate(model, prompts, 1, ar_kw)  # compile the 1-token (prefill) program
            ar_s = decode_seconds(model, prompts, args.new_tokens, ar_kw, args.timed_repeats, ar_kw)
        for name, window, subset, gamma in configs:
            kw = dict(mode="qspec", draft=args.draft, gamma=gamma, draft_window=window,
                      draft_layers=list(subset) if subset else None, kernels=args.kernels,
                      max_len=max_len)
            if gamma == "auto":
                kw["max_gamma"] = AUTO_MAX_GAMMA
            out = qj.generate(model, prompts, max_new_tokens=args.new_tokens, **kw)
            parted = [first_difference(a, b) for a, b in zip(out.tokens, ref)]
            rows.append({"context": context, "draft_config": name, "window": window,
                         "layers": list(subset) if subset else None,
                         "gamma": gamma, "acceptance_rate": out.stats["acceptance_rate"],
                         "tokens_per_cycle": out.stats["tokens_per_cycle"],
                         "gamma_cycles": out.stats.get("gamma_cycles"),
                         "equals_w4a16": out.tokens == ref,
                         "identical_sequences": sum(d is None for d in parted),
                         "first_difference": parted,
                         "divergence_gap": [
                             None if d is None or d >= min(len(o), len(r_)) else
                             divergence_gap(model, p_, r_, d, o[d], args.kernels)
                             for d, o, r_, p_ in zip(parted, out.tokens, ref, prompts)]})
            if args.timed:
                qspec_s = decode_seconds(model, prompts, args.new_tokens, kw, args.timed_repeats, ar_kw)
                rows[-1].update(w4a16_decode_s=ar_s, qspec_decode_s=qspec_s,
                                measured_speedup=ar_s / qspec_s)
            print(json.dumps(rows[-1]))
    result = {"env": environment(args.commit), "args": vars(args), "wall_s": time.perf_counter() - t0,
              "layer_search": [vars(h) for h in history], "rows": rows}
    with open(args.out_prefix + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(args.out_prefix + ".md", "w") as f:
        f.write(f"# Acceptance of cheaper drafts on held-out code ({result['env']['backend']})\n\n"
                f"`PYTHONPATH=. python3 experiments/draft_acceptance.py "
                + " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                           for k, v in vars(args).items()
                           if v is not None and v is not False and k not in ("draft_cost",))
                + f"` at commit `{result['env']['commit']}`, jax "
                f"{jax.__version__}, {result['env']['device']}; model "
                f"{args.model or 'default (embedded)'}, 4-bit RTN + rotation, draft {args.draft}, gamma "
                f"{args.gamma}, greedy, {args.prompts} prompts per context, {args.new_tokens} new "
                f"tokens, {args.dtype}; {result['wall_s']:.0f} s.\n\n"
                "| context | draft | acceptance | tokens/cycle | output = w4a16 | first difference |"
                + (" decode s (w4a16 / QSpec) | measured speedup |\n|---|---|---|---|---|---|---|---|\n"
                   if args.timed else "\n|---|---|---|---|---|---|\n"))
        for r in rows:
            f.write(f"| {r['context']} | {r['draft_config']} | {r['acceptance_rate']:.3f} | "
                    f"{r['tokens_per_cycle']:.2f} | {'yes' if r['equals_w4a16'] else 'NO'} | "
                    + (", ".join(f"seq {i}: token {d}" + (f" (gap {100 * g:.2f}%)" if g is not None else "")
                                 for i, (d, g) in enumerate(zip(r["first_difference"],
                                                                r["divergence_gap"]))
                                 if d is not None) or "-") + " |"
                    + (f" {r['w4a16_decode_s']:.3f} / {r['qspec_decode_s']:.3f} | "
                       f"{r['measured_speedup']:.2f}x |" if args.timed else "") + "\n")
        f.write("\nLayer search (teacher-forced agreement with w4a16 on 4 x 128 code tokens; "
                f"predicted speedup assumes a full draft step costs {args.draft_cost:.3f} verify "
                "steps, scaled by the share of layers it runs):\n\n")
        for h in history:
            f.write(f"- layers {list(h.layers)}: agreement {h.agreement:.3f}, predicted "
                    f"{h.predicted_speedup:.2f}x at gamma {h.gamma}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
