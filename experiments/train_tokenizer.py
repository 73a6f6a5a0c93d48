"""Train the byte-level BPE tokenizer of the default model and save it (tokenizer.json +
tokenizer_config.json, loadable by ``transformers.AutoTokenizer.from_pretrained``).

    PYTHONPATH=. python3 experiments/train_tokenizer.py --out qspec_jax/default_model

Corpus: 30000 train-split arithmetic problems and the first 12 MB of the train-split stdlib
files of this interpreter (experiments/data.py). Deterministic for a given Python version.
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import data as D  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="qspec_jax/default_model")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--problems", type=int, default=30000)
    ap.add_argument("--code-bytes", type=int, default=12_000_000)
    args = ap.parse_args(argv)
    tok = D.train_tokenizer(D.tokenizer_corpus(args.problems, args.code_bytes), args.vocab_size)
    D.save_tokenizer(tok, args.out)
    print(f"saved {tok.get_vocab_size()}-token tokenizer to {args.out}")


if __name__ == "__main__":
    main()
