"""``qspec-convert HF_DIR OUT_DIR [--dtype D] [--quant w4 --method rtn|gptq ...]``."""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qspec-convert", description=
                                "Convert a local Hugging Face Llama/Qwen2/Mistral checkpoint to qspec-jax's format.")
    p.add_argument("hf_dir", help="folder with config.json and model.safetensors / shards / pytorch_model*.bin")
    p.add_argument("out_dir", help="output folder (written atomically)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--quant", default=None, choices=["w4"], help="store 4-bit weights (all modes)")
    p.add_argument("--method", default="gptq", choices=["rtn", "gptq"], help="weight quantizer (default gptq)")
    p.add_argument("--group-size", type=int, default=None, help="input channels per scale (default: per channel)")
    p.add_argument("--no-rotate", action="store_true", help="skip the QuaRot rotation (on by default with --quant)")
    p.add_argument("--no-v-head-fold", action="store_true",
                   help="rotated: keep v_proj as it is and run o_proj's whole online Hadamard (default: "
                        "its per-head part folded into v_proj, only a mixing of the heads online)")
    p.add_argument("--quantize-lm-head", action="store_true", help="store lm_head in int4 too (off by default)")
    p.add_argument("--calib", default=None, help="text file for GPTQ calibration (default: built-in data)")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("qspec_jax").setLevel(logging.INFO)
    from .convert import convert
    try:
        convert(args.hf_dir, args.out_dir, dtype=args.dtype, quant=args.quant, method=args.method,
                group_size=args.group_size, rotate=(False if args.no_rotate else None),
                quantize_lm_head=args.quantize_lm_head, rotate_v_heads=not args.no_v_head_fold,
                calib=args.calib, calib_tokens=args.calib_tokens, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"qspec-convert: error: {e}", file=sys.stderr)
        return 2
    print(f"converted {args.hf_dir} -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
