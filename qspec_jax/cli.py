"""``qspec-generate [--model DIR] --prompt TEXT | --prompt-file PATH [...]``: print continuations
and statistics."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _gamma(value: str):
    return value if value == "auto" else int(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qspec-generate", description="Generate text with qspec-jax.")
    p.add_argument("--model", default=None,
                   help="HF checkpoint or qspec-convert output (default: the embedded model, "
                        "quantized on load to 4-bit with --quant w4 unless --quant none)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-file", action="append", default=[], metavar="PATH",
                   help="a file whose whole text (UTF-8) is one prompt, '-' for standard input "
                        "(repeat for a batch; after the --prompt ones): prompts too long for the "
                        "command line")
    p.add_argument("--chat", action="store_true",
                   help="each prompt is a user message, formatted with the model's chat template "
                        "(instruct models)")
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="with --chat: a system message before each user message")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--stop-token-id", type=int, action="append", default=[], metavar="ID",
                   help="a token id that ends a sequence besides the model's EOS (repeatable)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", default=None,
                   help="w16 | w4a16 | w4a8 | w4a4 | w4a8_fp8 | qspec (default: qspec on quantized models, else w16)")
    p.add_argument("--draft", default="w4a8", help="draft mode for --mode qspec (w4a8 | w4a4 | w4a8_fp8)")
    p.add_argument("--gamma", type=_gamma, default="auto",
                   help="draft tokens per QSpec cycle (1-16), or 'auto' (the default: chosen in "
                        "0..--max-gamma each cycle from measured costs and the acceptance so far, "
                        "0 being a plain w4a16 step)")
    p.add_argument("--max-gamma", type=int, default=7, help="upper bound for --gamma auto")
    p.add_argument("--draft-window", nargs="+", metavar="SINK WINDOW | auto", default=None,
                   help="draft attends only to the first SINK and last WINDOW cached tokens; "
                        "'auto' (with --gamma auto): a window only where the cost tables say the "
                        "full-cache draft cannot pay and a windowed one can")
    p.add_argument("--draft-layers", type=lambda v: [int(i) for i in v.split(",")], default=None,
                   help="comma-separated decoder layers the draft runs (default: all)")
    p.add_argument("--max-len", type=int, default=None,
                   help="KV cache positions (default: what the request needs, rounded up to 64)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="prompt positions per sequence per prefill forward (default: ~16k tokens "
                        "per forward over the batch)")
    p.add_argument("--quant", default=None, choices=["w4", "none"],
                   help="quantize an HF checkpoint on load (w4) or keep it 16-bit (none)")
    p.add_argument("--method", default="rtn", choices=["rtn", "gptq"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--kernels", default="auto", choices=["auto", "pallas", "xla"],
                   help="quantized GEMMs: Pallas kernels on GPU (auto), always Pallas, or XLA")
    p.add_argument("--weight-layout", default="auto", choices=["auto", "half_split", "nk"],
                   help="int4 weights in memory: auto (nk where the Mosaic GPU kernel runs: a "
                        "Hopper GPU; else half_split), half_split (stored format, Pallas Triton "
                        "kernels) or nk (int4 [N, K]: Mosaic GPU kernels for GEMMs of up to 64-256 "
                        "rows, kernel_dispatch.mgpu_max_m; XLA above)")
    p.add_argument("--cache-dir", default=None,
                   help="where compiled programs and gamma='auto' cost tables persist between runs "
                        "(default: $QSPEC_JAX_CACHE_DIR or ~/.cache/qspec_jax; "
                        "QSPEC_JAX_CACHE_DIR=off turns the default off)")
    p.add_argument("--no-cache", action="store_true",
                   help="compile and calibrate from scratch; write nothing to the cache folder")
    p.add_argument("--stats", action="store_true", help="include per-sequence statistics in the JSON line on stderr")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log which kernels run and the gamma='auto' calibration (INFO)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    window = args.draft_window
    if window is not None:
        if window == ["auto"]:
            window = "auto"
        elif len(window) == 2 and all(v.isdigit() for v in window):
            window = (int(window[0]), int(window[1]))
        else:
            parser.error(f"--draft-window takes SINK WINDOW (two integers) or 'auto', got "
                         f"{' '.join(window)!r}")
    prompts = list(args.prompt)
    for path in args.prompt_file:
        try:
            if path == "-":
                prompts.append(sys.stdin.read())
            else:
                with open(path, encoding="utf-8") as f:
                    prompts.append(f.read())
        except (OSError, UnicodeDecodeError) as e:
            parser.error(f"--prompt-file {path!r}: {e}")
    if not prompts:
        parser.error("give at least one prompt: --prompt TEXT or --prompt-file PATH")
    if args.system is not None and not args.chat:
        parser.error("--system needs --chat")
    requests = prompts
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system is not None else []
        requests = [system + [{"role": "user", "content": p}] for p in prompts]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no advice about a missing torch
    import qspec_jax as qj
    from qspec_jax import persist
    quant = args.quant or ("w4" if args.model is None else None)
    quant = None if quant == "none" else quant
    try:
        if not args.no_cache and (args.cache_dir or not persist.env_disabled()):
            qj.enable_persistent_cache(args.cache_dir)
        if args.weight_layout == "nk" and not quant and args.model is not None:
            from conversion import checkpoint
            if not checkpoint.is_converted(args.model):
                raise ValueError("--weight-layout nk needs a quantized model (--quant w4 or a "
                                 "converted checkpoint)")
        model = qj.load(args.model, dtype=args.dtype, quant=quant,
                        method=args.method if quant else "rtn", weight_layout=args.weight_layout)
        out = qj.generate(model, requests, max_new_tokens=args.max_new_tokens, mode=args.mode,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed, draft=args.draft, gamma=args.gamma,
                          max_gamma=args.max_gamma, kernels=args.kernels,
                          draft_window=window,
                          draft_layers=args.draft_layers, max_len=args.max_len,
                          prefill_chunk=args.prefill_chunk, stop_token_ids=args.stop_token_id)
    except (ValueError, FileNotFoundError) as e:
        print(f"qspec-generate: error: {e}", file=sys.stderr)
        return 2
    texts = out.text if out.text is not None else [" ".join(map(str, t)) for t in out.tokens]
    for prompt, text in zip(prompts, texts):
        print(f"{prompt}\n{text}" if args.chat else f"{prompt}{text}")
        if len(prompts) > 1:
            print("-" * 40)
    summary = {k: v for k, v in out.stats.items() if args.stats or not isinstance(v, list)}
    print(json.dumps(summary), file=sys.stderr)  # one line: easy to parse
    return 0


if __name__ == "__main__":
    sys.exit(main())
