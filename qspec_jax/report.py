"""Quality report across execution modes: token NLL / perplexity and greedy agreement.

``quality_report(model, text_or_ids)`` scores the same tokens in every mode the model supports
and reports, per mode, the mean next-token negative log-likelihood, the perplexity, and how
often its greedy next token equals the verify mode's (w4a16) — a cheap proxy for QSpec's
acceptance rate at temperature 0. ``qspec-report`` is the command-line front end.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from . import api

REFERENCE_MODE = "w4a16"


def _windows(ids: np.ndarray, window: int) -> np.ndarray:
    n = (len(ids) - 1) // window
    if n < 1:
        raise ValueError(f"need more than {window} tokens to score, got {len(ids)}; give more text "
                         "or a smaller window")
    return ids[: n * window + 1]


def quality_report(model: api.QSpecModel, text_or_ids, modes=None, window: int = 256,
                   batch: int = 8, kernels: str = "auto") -> dict:
    """{mode: {"nll", "ppl", "greedy_agreement_vs_w4a16"?, "tokens"}} on the given text."""
    if isinstance(text_or_ids, str):
        if model.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids")
        ids = np.asarray(model.tokenizer(text_or_ids)["input_ids"], np.int32)
    else:
        ids = np.asarray(text_or_ids, np.int32).reshape(-1)
    ids = _windows(ids, window)
    n = (len(ids) - 1) // window
    inputs = np.stack([ids[i * window:(i + 1) * window] for i in range(n)])          # [n, W]
    targets = np.stack([ids[i * window + 1:(i + 1) * window + 1] for i in range(n)])  # [n, W]
    modes = list(modes or model.modes)
    greedy, out = {}, {}
    for mode in modes:
        nll, preds = [], []
        for start in range(0, n, batch):
            logits = np.asarray(api.logits(model, inputs[start:start + batch], mode=mode,
                                           kernels=kernels), np.float64)
            logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
            picked = np.take_along_axis(logits, targets[start:start + batch, :, None], -1)[..., 0]
            nll.append(logz - picked)
            preds.append(logits.argmax(-1))
        mean_nll = float(np.concatenate(nll).mean())
        greedy[mode] = np.concatenate(preds)
        out[mode] = {"nll": mean_nll, "ppl": float(np.exp(mean_nll)), "tokens": int(targets.size)}
    if REFERENCE_MODE in greedy:
        for mode in modes:
            out[mode]["greedy_agreement_vs_w4a16"] = float((greedy[mode] == greedy[REFERENCE_MODE]).mean())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="qspec-report", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    p.add_argument("--text", required=True, help="text file to score")
    p.add_argument("--quant", default=None, choices=["w4"])
    p.add_argument("--method", default="rtn", choices=["rtn", "gptq"])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--modes", default=None, help="comma-separated modes (default: all the model supports)")
    args = p.parse_args(argv)
    try:
        model = api.load(args.model, dtype=args.dtype, quant=args.quant, method=args.method)
        with open(args.text, encoding="utf-8", errors="replace") as f:
            text = f.read()
        report = quality_report(model, text, args.modes.split(",") if args.modes else None, args.window)
    except (ValueError, FileNotFoundError) as e:
        print(f"qspec-report: error: {e}", file=sys.stderr)
        return 2
    print(f"{'mode':<10} {'nll':>8} {'ppl':>10} {'agree w4a16':>12}")
    for mode, r in report.items():
        agree = r.get("greedy_agreement_vs_w4a16")
        print(f"{mode:<10} {r['nll']:8.4f} {r['ppl']:10.3f} {'' if agree is None else f'{agree:12.3f}'}")
    print(json.dumps(report), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
