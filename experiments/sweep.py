"""End-to-end sweep: decode throughput of every mode, QSpec speedup, predicted vs measured.

    PYTHONPATH=. python3 experiments/sweep.py --models default,llama3-8b,llama3.2-1b \\
        --out experiments/results/sweep_h200.jsonl            # H200
    PYTHONPATH=. python3 experiments/sweep.py --quick --out /tmp/sweep.jsonl   # CPU smoke

Models: the trained default model, and Llama-3-8B / Llama-3.2-1B *shaped* models with random
weights (timing only: their acceptance rates mean nothing, and every row says so).
Per point (model, mode, batch, gamma): prefill time (apart), decode tokens/s and ms per step
(decode time = time(N new tokens) - time(1 new token), EOS disabled), acceptance and tokens per
cycle, compile time, peak device memory, % of the HBM roofline (weight + KV bytes per step at
4.8 TB/s). Results are appended one JSON line per point, so an interrupted sweep resumes where
it stopped; ``--plot`` draws the figures from the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import qspec_jax as qj  # noqa: E402
from qspec_jax.api import assemble  # noqa: E402
from qspec_jax.config import ModelConfig, QuantConfig, RopeConfig  # noqa: E402
from qspec_jax.cost_model import measure_cycle_costs, predicted_speedup  # noqa: E402
from qspec_jax.model import KVCache  # noqa: E402
from qspec_jax.sampling import SamplingConfig  # noqa: E402

HBM_BYTES_PER_S = 4.8e12
MODES = ("w16", "w4a16", "w4a8", "qspec-w4a8", "qspec-w4a4")

# Shapes of public models (random weights: timing only).
SHAPED = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256),
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=512),
}


def shaped_config(name: str) -> ModelConfig:
    s = SHAPED[name]
    return ModelConfig(model_type="llama", rms_norm_eps=1e-5, rope=RopeConfig(theta=500000.0),
                       max_position_embeddings=131072, tie_word_embeddings=False, qkv_bias=False,
                       sliding_window=None, bos_token_id=1, eos_token_ids=(), pad_token_id=0, **s)


def random_model(name: str, quantized: bool, dtype=jnp.bfloat16, seed: int = 0):
    """A shaped model with random weights built on the device (int4 weights drawn directly)."""
    cfg = shaped_config(name)
    qcfg = QuantConfig(quant="w4", method="rtn", rotate=False) if quantized else QuantConfig()
    from flax import nnx
    from qspec_jax.model import Transformer, pure_dict

    @jax.jit
    def init():
        model = Transformer(cfg, qcfg, dtype=dtype, rngs=nnx.Rngs(seed))
        params = pure_dict(model)
        if not quantized:
            return params
        key = jax.random.PRNGKey(seed + 1)

        def fill(path, leaf):
            name = getattr(path[-1], "key", None)
            if name == "qweight":  # random int4 pairs
                return jax.random.randint(key, leaf.shape, -128, 128, jnp.int32).astype(jnp.int8)
            if name == "scales":
                return jnp.full(leaf.shape, 0.02 / 7, jnp.float32)
            return leaf
        return jax.tree_util.tree_map_with_path(fill, params)

    model = assemble(cfg, qcfg, init(), dtype)
    return dataclasses.replace(model, eos_ids=())


def step_bytes(model, batch: int, context: int) -> float:
    """Bytes one decode step must read: all parameters (as stored) + the KV cache in use."""
    params = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(model.state))
    cfg = model.cfg
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * context * batch
    return float(params + kv)


def _run(model, prompts, new_tokens, mode, gamma, draft, kernels):
    t0 = time.perf_counter()
    out = qj.generate(model, prompts, max_new_tokens=new_tokens, mode=mode, gamma=gamma, draft=draft,
                      kernels=kernels)
    return time.perf_counter() - t0, out


def measure_point(model, mode: str, batch: int, gamma, prompt_len: int, new_tokens: int,
                  kernels: str, repeats: int) -> dict:
    rng = np.random.RandomState(0)
    prompts = [rng.randint(3, model.cfg.vocab_size, prompt_len).tolist() for _ in range(batch)]
    qmode, draft = ("qspec", mode.split("-")[1]) if mode.startswith("qspec") else (mode, "w4a8")
    compile_s, _ = _run(model, prompts, new_tokens, qmode, gamma, draft, kernels)
    _run(model, prompts, 1, qmode, gamma, draft, kernels)  # compile the prefill-only shape
    full, one = [], []
    for _ in range(repeats):
        t, out = _run(model, prompts, new_tokens, qmode, gamma, draft, kernels)
        full.append(t)
        one.append(_run(model, prompts, 1, qmode, gamma, draft, kernels)[0])
    # Paired differences remove the prefill; a non-positive one means the decode time is
    # below the timer noise (tiny CPU runs) and is reported as NaN.
    decode_s = float(np.median(np.asarray(full) - np.asarray(one)))
    decode_s = decode_s if decode_s > 0 else float("nan")
    steps = out.stats.get("decode_steps", out.stats.get("cycles"))
    decoded = batch * (new_tokens - 1)
    row = {
        "mode": mode, "batch": batch, "gamma": gamma if qmode == "qspec" else None,
        "prompt_len": prompt_len, "new_tokens": new_tokens, "kernels": kernels,
        "prefill_s": float(np.median(one)), "decode_s": decode_s,
        "decode_tokens_per_s": decoded / decode_s if decode_s > 0 else float("nan"),
        "ms_per_step": 1e3 * decode_s / max(int(steps), 1),
        "decode_spread_s": [float(np.min(np.asarray(full) - np.asarray(one))),
                            float(np.max(np.asarray(full) - np.asarray(one)))],
        "compile_s": compile_s - float(np.median(full)),
        "steps": int(steps),
    }
    if qmode == "qspec":
        row.update(acceptance_rate=out.stats["acceptance_rate"], tokens_per_cycle=out.stats["tokens_per_cycle"])
    # % of the HBM roofline of one decode step (context: the mean cache length while decoding).
    context = prompt_len + new_tokens // 2
    tokens_per_step = batch * (row.get("tokens_per_cycle") or 1.0)
    row["hbm_roofline_pct"] = 100 * step_bytes(model, batch, context) / HBM_BYTES_PER_S / (
        decode_s / max(int(steps), 1))  # NaN when decode_s is
    row["hbm_roofline_note"] = "assumes 4.8 TB/s (H200); meaningless on CPU"
    row["tokens_per_step"] = tokens_per_step
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        row["peak_bytes"] = int(stats["peak_bytes_in_use"])
    return row


def environment(commit: str | None) -> dict:
    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                    check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    dev = jax.devices()[0]
    return {"commit": commit, "device": getattr(dev, "device_kind", str(dev)),
            "backend": jax.default_backend(), "jax": jax.__version__}


def load_done(path: str) -> set:
    done = set()
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if "mode" in r:
                    done.add((r["model"], r["mode"], r["batch"], r["gamma"]))
    return done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="default (the trained model), llama3-8b, llama3.2-1b")
    p.add_argument("--batches", default=None, help="default 1,2,4,...,256")
    p.add_argument("--gammas", default=None, help="default 1..7")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--prompt-len", type=int, default=None, help="default 128")
    p.add_argument("--new-tokens", type=int, default=None, help="default 128")
    p.add_argument("--repeats", type=int, default=None, help="default 3")
    p.add_argument("--kernels", default="auto")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", required=True, help="JSON-lines file (appended; resumable)")
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke configuration")
    p.add_argument("--plot", action="store_true", help="only draw the plots from --out")
    args = p.parse_args(argv)
    if args.plot:
        plot(args.out)
        return 0
    defaults = (dict(models="tiny", batches="1,2", gammas="1,3", prompt_len=8, new_tokens=24, repeats=2)
                if args.quick else
                dict(models="default", batches="1,2,4,8,16,32,64,128,256", gammas="1,2,3,4,5,6,7",
                     prompt_len=128, new_tokens=128, repeats=3))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    from tqdm.auto import tqdm
    env = environment(args.commit)
    done = load_done(args.out)
    modes = args.modes.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    gammas = [int(g) for g in args.gammas.split(",")]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for name in args.models.split(","):
        models = {}
        points = [(m, b, g if m.startswith("qspec") else None) for m in modes for b in batches
                  for g in (gammas if m.startswith("qspec") else [None])]
        for mode, batch, gamma in tqdm(points, desc=f"sweep {name}"):
            if (name, mode, batch, gamma) in done:
                continue
            quantized = mode != "w16"
            if quantized not in models:
                models[quantized] = (qj.load(dtype="bfloat16", quant="w4" if quantized else None,
                                             method="rtn") if name == "default"
                                     else random_model(name, quantized))
            model = models[quantized]
            try:
                row = measure_point(model, mode, batch, gamma, args.prompt_len, args.new_tokens,
                                    args.kernels, args.repeats)
            except Exception as e:  # noqa: BLE001 - record, e.g. out of memory, and go on
                row = {"mode": mode, "batch": batch, "gamma": gamma, "error": f"{type(e).__name__}: {e}"[:300]}
            row.update(model=name, random_weights=name != "default", **env)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        if any(m.startswith("qspec") for m in modes) and True in models:
            with open(args.out, "a") as f:
                for batch in batches:
                    costs = measure_cycle_costs(models[True], batch, args.prompt_len, max(gammas), "w4a8",
                                                kernels=args.kernels)
                    f.write(json.dumps({"model": name, "cycle_costs": costs.tolist(), "batch": batch,
                                        "predicted_speedup_a0.9": predicted_speedup(costs, 0.9).tolist(),
                                        **env}) + "\n")
    return 0


def plot(path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(l) for l in open(path)]
    runs = [r for r in rows if "decode_tokens_per_s" in r]
    base = os.path.splitext(path)[0]
    for name in sorted({r["model"] for r in runs}):
        fig, ax = plt.subplots(figsize=(6, 4))
        for mode in MODES:
            pts = sorted((r["batch"], r["decode_tokens_per_s"]) for r in runs
                         if r["model"] == name and r["mode"] == mode and r["gamma"] in (None, 3))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=mode + (" (gamma 3)" if "qspec" in mode else ""))
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="decode tokens/s",
               title=f"{name}" + (" (random weights)" if name != "default" else ""))
        ax.legend()
        fig.tight_layout()
        fig.savefig(f"{base}_{name}_throughput.png", dpi=120)
        plt.close(fig)
        speedups = speedup_table(rows, name)
        if not speedups:
            continue
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for (mode, gamma) in sorted({(s["mode"], s["gamma"]) for s in speedups}):
            pts = sorted((s["batch"], s["measured"]) for s in speedups
                         if s["mode"] == mode and s["gamma"] == gamma)
            ax1.plot(*zip(*pts), marker="o", label=f"{mode} gamma {gamma}")
        ax1.axhline(1.0, color="k", lw=0.8)
        ax1.set(xscale="log", xlabel="batch", ylabel="speedup over w4a16 AR", title=name)
        ax1.legend(fontsize=7)
        pairs = [(s["predicted"], s["measured"]) for s in speedups if s["predicted"] is not None]
        if pairs:
            ax2.scatter(*zip(*pairs), s=12)
            hi = max(max(p) for p in pairs) * 1.1
            ax2.plot([0, hi], [0, hi], color="k", lw=0.8)
        ax2.set(xlabel="predicted speedup (cost model, measured acceptance)",
                ylabel="measured speedup", title="measured vs predicted")
        fig.tight_layout()
        fig.savefig(f"{base}_{name}_speedup.png", dpi=120)
        plt.close(fig)


def speedup_table(rows: list[dict], name: str) -> list[dict]:
    """QSpec over w4a16 AR per (mode, gamma, batch), measured and predicted from cycle costs."""
    runs = [r for r in rows if r.get("model") == name and "decode_tokens_per_s" in r]
    base = {r["batch"]: r["decode_tokens_per_s"] for r in runs if r["mode"] == "w4a16"}
    costs = {r["batch"]: r["cycle_costs"] for r in rows if r.get("model") == name and "cycle_costs" in r}
    out = []
    for r in runs:
        if not r["mode"].startswith("qspec") or r["batch"] not in base:
            continue
        predicted = None
        if r["batch"] in costs and r["gamma"] < len(costs[r["batch"]]):
            predicted = float(predicted_speedup(costs[r["batch"]], r["acceptance_rate"])[r["gamma"]])
        out.append({"mode": r["mode"], "gamma": r["gamma"], "batch": r["batch"],
                    "measured": r["decode_tokens_per_s"] / base[r["batch"]], "predicted": predicted})
    return out


if __name__ == "__main__":
    sys.exit(main())
