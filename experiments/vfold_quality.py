"""Weight-quantization error with and without the per-head Hadamard folded into v_proj
(QuantConfig.rotate_v_heads), on tiny random HF models (CPU; no real checkpoints here).

The fold rotates v_proj's output columns within each head, so its per-channel int4 scales see
other columns; everything else is the same function. Per seed: an HF-built tiny model, w4a16
logits of a QuaRot-rotated quantized load against the float32 model's, relative RMS error,
fold on vs off, for RTN and GPTQ. Writes vfold_quality.{json,md}.

    PYTHONPATH=. python3 experiments/vfold_quality.py --seeds 6 --out experiments/results
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _commit() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default="llama,qwen2")
    p.add_argument("--methods", default="rtn,gptq")
    p.add_argument("--seeds", type=int, default=6)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    import qspec_jax as qj
    from qspec_jax import api
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "tests"))
    from hf_models import build_hf_model

    real = api.make_quant_config
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for arch in a.archs.split(","):
                for seed in range(a.seeds):
                    path = os.path.join(tmp, f"{arch}{seed}")
                    build_hf_model(arch, seed=seed).save_pretrained(path)
                    ids = np.random.RandomState(seed).randint(3, 128, (4, 14))
                    ref = np.asarray(qj.logits(qj.load(path, dtype="float32"), ids))
                    for method in a.methods.split(","):
                        row = {"arch": arch, "seed": seed, "method": method}
                        for fold in (True, False):
                            api.make_quant_config = (lambda *x, f=fold, **k: dataclasses.replace(
                                real(*x, **k), rotate_v_heads=f))
                            m = qj.load(path, dtype="float32", quant="w4", method=method,
                                        calib=np.random.RandomState(1).randint(3, 128, 4096))
                            assert m.module.layers[0].attn.rotate_heads_only == fold
                            out = np.asarray(qj.logits(m, ids, mode="w4a16"))
                            row["fold" if fold else "no_fold"] = float(
                                np.sqrt(np.mean((out - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    finally:
        api.make_quant_config = real
    os.makedirs(a.out, exist_ok=True)
    base = os.path.join(a.out, "vfold_quality")
    with open(base + ".json", "w") as f:
        json.dump({"command": " ".join(["experiments/vfold_quality.py"] + (argv or sys.argv[1:])),
                   "commit": _commit(), "rows": rows}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write("# v_proj per-head Hadamard fold: w4a16 error on tiny random models (CPU)\n\n"
                f"`PYTHONPATH=. python3 experiments/vfold_quality.py --seeds {a.seeds} --archs "
                f"{a.archs} --methods {a.methods} --out OUT`. Relative RMS error of w4a16 logits "
                "(QuaRot-rotated, int4 per channel) against the float32 model, 4 x 14 random "
                "tokens per seed; mean [min, max] over seeds. Tiny random weights: a check that "
                "the fold does not hurt, not a quality figure for real models.\n\n"
                "| arch | method | fold | no fold | fold / no fold |\n|---|---|---|---|---|\n")
        for arch in a.archs.split(","):
            for method in a.methods.split(","):
                sel = [r for r in rows if r["arch"] == arch and r["method"] == method]
                fo, nf = (np.array([r[k] for r in sel]) for k in ("fold", "no_fold"))
                f.write(f"| {arch} | {method} | {fo.mean():.4f} [{fo.min():.4f}, {fo.max():.4f}] | "
                        f"{nf.mean():.4f} [{nf.min():.4f}, {nf.max():.4f}] | "
                        f"{fo.mean() / nf.mean():.3f} |\n")
    print(f"wrote {base}.json/.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
