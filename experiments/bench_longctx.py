"""Long-context step costs (issue 9): where the KV cache, not the weights, decides a step's cost.

    PYTHONPATH=. python3 experiments/bench_longctx.py --out experiments/results/longctx_h200.jsonl  # H200
    PYTHONPATH=. python3 experiments/bench_longctx.py --quick --out /tmp/longctx.jsonl           # CPU smoke
    PYTHONPATH=. python3 experiments/bench_longctx.py --report --out experiments/results/longctx_h200.jsonl \\
        --acceptance experiments/results/draft_acceptance_long_h200.json

For each (batch, context) of a Llama-3-8B-shaped model with random int4 weights (timing only),
one forward per step is timed inside one jitted loop (``qspec_jax.cost_model.time_forward``) for:
w4a16 AR (T = 1), the verify pass (T = gamma + 1 at the timed gammas, interpolated between), and
the draft step (T = 1, w4a8) with the full cache, with windowed attention (sink + recent
window of the shared cache) and with windowed attention over a subset of layers. From these the
report predicts QSpec's speedup over w4a16 AR per draft configuration and gamma,
``E(g, a) * T_AR / (g * T_draft + T_verify(g + 1))`` (METHOD.md), at the acceptance rates measured
on a trained long-context model (``--acceptance``: experiments/draft_acceptance.py's JSON) and at
a grid of rates, and what gamma="auto" would pick (the best gamma, or plain decoding).
The cache is zero-filled: attention reads the same bytes whatever the values.
Results are appended one JSON line per point (resumable); points whose cache would not fit
(``--max-kv-gib``) are skipped and said so.
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
import jax.numpy as jnp  # noqa: E402

from experiments.sweep import (HBM_BYTES_PER_S, embed_table_bytes, environment, parse_window,  # noqa: E402
                               random_model, weight_read_bytes)
from qspec_jax.cost_model import expected_tokens, per_token_acceptance, time_forward  # noqa: E402
from qspec_jax.model import KVCache  # noqa: E402

DRAFTS = ("full", "window", "window+layers", "layers")
GRID = (0.6, 0.8, 0.9)


def spread_layers(n_layers: int, keep: int) -> tuple[int, ...]:
    """``keep`` layer indices spread evenly over [0, n_layers), first and last included."""
    if not 1 <= keep <= n_layers:
        raise ValueError(f"--draft-layers must be in [1, {n_layers}], got {keep}")
    return tuple(sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, keep)}))


def kv_bytes(cfg, batch: int, context: int) -> int:
    """bf16 K and V of ``batch`` sequences of ``context`` positions."""
    return KVCache.nbytes(cfg, batch, context, jnp.bfloat16)


def read_bytes(r: dict) -> float:
    """A row's bytes per w4a16 AR step: KV + weights; rows written before 2026-11-30 (no
    weights_gathered_embedding) counted the whole untied embedding table, taken off here."""
    w = r["weight_bytes"]
    if not r.get("weights_gathered_embedding"):
        w -= embed_table_bytes(r.get("model", "")) or 0
    return r["kv_bytes"] + w


def measure(model, batch: int, context: int, args, window, layers, reuse: dict | None = None) -> dict:
    """Seconds per forward for every configuration of one (batch, context) point; timings
    found in ``reuse`` (a row of an earlier run at this point) are taken from it."""
    kw = dict(kernels=args.kernels, steps=args.steps, repeats=args.repeats)
    reuse = reuse or {}
    row = {"batch": batch, "context": context, "reused": []}

    def timing(table: str, name: str, label: str, T: int, mode: str, w=None, ls=None) -> float:
        if name in reuse.get(table, {}):
            row["reused"].append(label)
            return reuse[table][name]
        return time_forward(model, batch, context, T, mode, window=w, layers=ls, **kw)

    timed = sorted({0, args.max_gamma} | set(args.verify_gammas))
    row["verify_gammas_timed"] = timed
    row["t_verify"] = {str(g): timing("t_verify", str(g), f"verify g={g}", g + 1, "w4a16")
                       for g in timed}
    row["t_ar"] = row["t_verify"]["0"]
    draft_opts = {"full": (None, None), "window": (window, None),
                  "window+layers": (window, layers), "layers": (None, layers)}
    # More window sizes (full layers), named by their window.
    draft_opts.update({f"window {w[0]}:{w[1]}": (w, None) for w in args.extra_windows})
    names = list(args.drafts) + [f"window {w[0]}:{w[1]}" for w in args.extra_windows]
    row["t_draft"] = {name: timing("t_draft", name, f"draft {name}", 1, args.draft, *draft_opts[name])
                      for name in names}
    return row


def verify_costs(row: dict, max_gamma: int) -> np.ndarray:
    timed = row["verify_gammas_timed"]
    return np.interp(np.arange(max_gamma + 1), timed, [row["t_verify"][str(g)] for g in timed])


def predictions(row: dict, draft: str, a: float, max_gamma: int, gamma: int) -> dict:
    """Predicted speedup over w4a16 AR at gamma, and the best gamma (auto's choice) at a; the
    gammas searched stop at the widest verify pass the row timed (no extrapolation)."""
    max_gamma = min(max_gamma, max(row["verify_gammas_timed"]))
    tv = verify_costs(row, max_gamma)
    td = row["t_draft"][draft]
    speed = np.array([expected_tokens(g, a) * row["t_ar"] / (g * td + tv[g])
                      for g in range(max_gamma + 1)])
    best = int(np.argmax(speed))
    return {"gamma": float(speed[gamma]), "best_gamma": best, "best": float(speed[best])}


def load_acceptance(paths: str | None) -> list[dict]:
    """Rows of draft_acceptance.py JSON files (comma-separated paths); where two files measured
    the same draft at the same context, the later file's row wins."""
    rows = {}
    for path in filter(None, (paths or "").split(",")):
        with open(path) as f:
            for r in json.load(f)["rows"]:
                rows[(r["context"], r["draft_config"])] = r
    return list(rows.values())


def measured_acceptance(acc_rows: list[dict], context: int, draft: str, window) -> tuple:
    """(per-token acceptance a, context it was measured at) for a draft configuration, from the
    trained model's rows at the nearest measured context (their acceptance_rate, the fraction
    of drafts accepted at the row's gamma, turned into E(g, a)'s per-token rate); None when not
    measured."""
    want = draft if draft.startswith("window ") else {
        "full": "full", "window": f"window {window[0]}:{window[1]}"}.get(draft)
    rows = [r for r in acc_rows if r["draft_config"] == want]
    if not rows:
        return None, None
    r = min(rows, key=lambda r: abs(np.log(r["context"] / context)))
    return per_token_acceptance(float(r["acceptance_rate"]), int(r["gamma"])), int(r["context"])


def report(path: str, acceptance_path: str | None = None) -> str:
    rows = [json.loads(line) for line in open(path)]
    points = [r for r in rows if "t_ar" in r]
    skipped = [r for r in rows if "skipped" in r]
    if not points:
        raise SystemExit(f"{path}: no measured points")
    meta = points[0]
    acc_rows = load_acceptance(acceptance_path)
    window, layers = tuple(meta["window"]), meta["draft_layers"]
    g, mg = meta["gamma"], meta["max_gamma"]
    drafts = list(meta["t_draft"])
    out = [f"# Long-context step costs and predicted QSpec speedup ({meta['device']})", "",
           f"`{meta['command']}` at commit `{meta['commit']}`, jax {meta['jax']}, "
           f"{meta['model']} shapes with **random int4 weights** (timing only), bf16, kernels "
           f"{meta['kernels']}; per forward: median of {meta['repeats']} timings, each the "
           f"difference of jitted loops of {3 * meta['steps']} and {meta['steps']} forwards. "
           f"Draft {meta['draft']}; window = sink {window[0]} + recent {window[1]} tokens; layers = "
           f"{len(layers)} of {meta['num_layers']} ({', '.join(map(str, layers))})."
           + (f" Timings reused from `{meta['reused_from']['file']}` (commit "
              f"`{meta['reused_from']['commit']}`) for every configuration but "
              f"{', '.join(meta['reused_from']['dropped']) or 'none'} (re-timed here; the rows' "
              f"`reused` field lists what was taken)." if meta.get("reused_from") else ""), "",
           "## Step costs (ms)", "",
           "| batch | context | KV GB | weights GB | w4a16 AR | % of 4.8 TB/s | verify g=" + str(g)
           + " | " + " | ".join(f"draft {d}" for d in drafts) + " | commit |",
           "|---|---|---|---|---|---|---|" + "---|" * (len(drafts) + 1)]
    for r in points:
        tv = verify_costs(r, mg)
        roof = 100 * read_bytes(r) / HBM_BYTES_PER_S / r["t_ar"]
        out.append(f"| {r['batch']} | {r['context']} | {r['kv_bytes'] / 1e9:.1f} | "
                   f"{(read_bytes(r) - r['kv_bytes']) / 1e9:.2f} | {1e3 * r['t_ar']:.2f} | {roof:.0f}% | "
                   f"{1e3 * tv[g]:.2f} | "
                   + " | ".join(f"{1e3 * r['t_draft'][d]:.2f} ({r['t_draft'][d] / r['t_ar']:.2f}x AR)"
                                if d in r["t_draft"] else "-" for d in drafts)
                   + f" | {r['commit']}" + (f" ({', '.join(r['reused'])} from {r['reused_from']['commit']})"
                                           if r.get("reused") else "") + " |")
    out += ["", f"## Predicted speedup over w4a16 AR (gamma {g}; auto = best gamma in 0..{mg})", ""]
    if acc_rows:
        measured = sorted({r["draft_config"] for r in acc_rows
                           if r["draft_config"] == "full" or r["draft_config"].startswith("window ")})
        out.append(f"Per-token acceptance a (the rate of E(g, a) = 1 + a + ... + a^g, from the "
                   f"fraction of drafts accepted at gamma 3) measured on the trained long-context model "
                   f"(`{'`, `'.join(acceptance_path.split(','))}`; a later file's rows replace "
                   f"an earlier one's) at the nearest measured context, for the drafts it "
                   f"measured ({', '.join(measured)}; 'window' = {window[0]}:{window[1]}); the grid columns "
                   f"assume a rate.")
        out.append("")
    head = ["batch", "context", "draft"]
    if acc_rows:
        head += ["measured a (ctx)", f"g={g} at a", "auto at a"]
    head += [f"g={g} a={a}" for a in GRID] + [f"auto a={GRID[-1]}"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in points:
        for d in drafts:
            if d not in r["t_draft"]:
                continue
            cells = [str(r["batch"]), str(r["context"]), d]
            if acc_rows:
                a, ctx = measured_acceptance(acc_rows, r["context"], d, window)
                if a is None:
                    cells += ["-", "-", "-"]
                else:
                    p = predictions(r, d, a, mg, g)
                    cells += [f"{a:.2f} ({ctx})", f"{p['gamma']:.2f}x",
                              f"{max(p['best'], 1.0):.2f}x (g={p['best_gamma']})"]
            for a in GRID:
                cells.append(f"{predictions(r, d, a, mg, g)['gamma']:.2f}x")
            p = predictions(r, d, GRID[-1], mg, g)
            cells.append(f"{max(p['best'], 1.0):.2f}x (g={p['best_gamma']})")
            out.append("| " + " | ".join(cells) + " |")
    if skipped:
        out += ["", "Skipped (cache would not fit): " + ", ".join(
            f"batch {r['batch']} x {r['context']} ({r['kv_bytes'] / 2**30:.0f} GiB)" for r in skipped)]
    md = os.path.splitext(path)[0] + ".md"
    with open(md, "w") as f:
        f.write("\n".join(out) + "\n")
    return md


def measured_speedups(path: str | None) -> list[dict]:
    """End-to-end QSpec speedups over w4a16 AR from a sweep file (experiments/sweep.py rows):
    [{batch, context, gamma, window, speedup, acceptance}] for every QSpec row with a w4a16 row
    of the same batch and prompt length."""
    if not path:
        return []
    rows = [json.loads(line) for line in open(path)]
    ar = {(r["batch"], r["prompt_len"]): r["decode_tokens_per_s"] for r in rows
          if r.get("mode") == "w4a16" and "decode_tokens_per_s" in r}
    out = []
    for r in rows:
        key = (r.get("batch"), r.get("prompt_len"))
        if str(r.get("mode", "")).startswith("qspec") and key in ar and "decode_tokens_per_s" in r:
            out.append(dict(batch=r["batch"], context=r["prompt_len"] + r["new_tokens"] // 2,
                            gamma=r["gamma"], window=r.get("draft_window"),
                            speedup=r["decode_tokens_per_s"] / ar[key],
                            acceptance=r.get("acceptance_rate")))
    return out


def plot(path: str, acceptance_path: str | None = None, measured_path: str | None = None) -> str:
    """Predicted speedup over w4a16 AR vs batch, one panel per context: each draft at the
    trained model's measured acceptance (solid; where measured), the window at full
    acceptance (dashed), the best of them with auto's gamma (black), and the end-to-end
    measurements of ``measured_path`` (markers). Writes <out>.png next to the report."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [json.loads(line) for line in open(path)]
    points = [r for r in points if "t_ar" in r]
    meta = points[0]
    window, g, mg = tuple(meta["window"]), meta["gamma"], meta["max_gamma"]
    acc_rows = load_acceptance(acceptance_path)
    measured = measured_speedups(measured_path)
    contexts = sorted({r["context"] for r in points})
    fig, axes = plt.subplots(1, len(contexts), figsize=(4.2 * len(contexts), 3.8), sharey=True,
                             squeeze=False)
    for ax, ctx in zip(axes[0], contexts):
        rows = sorted((r for r in points if r["context"] == ctx), key=lambda r: r["batch"])
        batches = [r["batch"] for r in rows]
        best = np.ones(len(rows))
        for d in meta["t_draft"]:
            a, _ = measured_acceptance(acc_rows, ctx, d, window)
            if a is None or not all(d in r["t_draft"] for r in rows):
                continue
            ys = [predictions(r, d, a, mg, g)["gamma"] for r in rows]
            best = np.maximum(best, [predictions(r, d, a, mg, g)["best"] for r in rows])
            ax.plot(batches, ys, "o-", label=f"{d}, g={g}, a={a:.2f}")
        if all("window" in r["t_draft"] for r in rows):
            ax.plot(batches, [predictions(r, "window", 1.0, mg, g)["gamma"] for r in rows], "s--",
                    color="tab:orange", alpha=0.6, label=f"window, g={g}, a=1.0")
        if acc_rows:
            ax.plot(batches, best, "kD-", lw=2, ms=5, alpha=0.5, label="auto (best draft and gamma)")
        for m in measured:
            if min(contexts, key=lambda c: abs(np.log(c / m["context"]))) == ctx:
                ax.plot([m["batch"]], [m["speedup"]], "*" if m["gamma"] != "auto" else "P",
                        ms=13 if m["gamma"] != "auto" else 9, color="tab:red",
                        label=f"measured e2e, g={m['gamma']}, a={m['acceptance']:.2f}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.axhline(1.8, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_title(f"context {ctx}")
        ax.set_xlabel("batch")
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7)
    axes[0][0].set_ylabel("QSpec speedup over w4a16 AR")
    fig.suptitle(f"{meta['model']} shapes (random int4 weights), {meta['device']}: predicted from "
                 f"measured step costs; window {window[0]}+{window[1]}", fontsize=9)
    fig.tight_layout()
    png = os.path.splitext(path)[0] + ".png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="shaped model (experiments/sweep.py SHAPED); default llama3-8b")
    p.add_argument("--batches", default=None, help="default 1,4,16,32,64")
    p.add_argument("--contexts", default=None, help="default 2048,8192,32768")
    p.add_argument("--window", type=parse_window, default=parse_window("4:1020"))
    p.add_argument("--extra-windows", default="",
                   help="comma list of more SINK:WINDOW sizes to time as full-layer drafts "
                        "(reported as 'window SINK:WINDOW'; for the window-size trade-off)")
    p.add_argument("--draft-layers", type=int, default=None,
                   help="layers the layer-skipping drafts run (spread evenly; default 3/4 of them)")
    p.add_argument("--drafts", default=",".join(DRAFTS[:3]), help=f"comma list of {', '.join(DRAFTS)}")
    p.add_argument("--draft", default="w4a8", help="draft mode (w4a8 or w4a4)")
    p.add_argument("--gamma", type=int, default=3, help="gamma of the fixed-gamma predictions")
    p.add_argument("--max-gamma", type=int, default=7, help="largest gamma auto may pick")
    p.add_argument("--verify-gammas", default="3", help="verify widths timed besides 0 and max-gamma")
    p.add_argument("--max-kv-gib", type=float, default=96.0, help="skip points with a larger cache")
    p.add_argument("--steps", type=int, default=None, help="forwards per timed loop (default 4)")
    p.add_argument("--repeats", type=int, default=None, help="default 3")
    p.add_argument("--kernels", default="auto")
    p.add_argument("--time-budget", type=float, default=float("inf"),
                   help="seconds; start no new point after this (run again to resume)")
    p.add_argument("--commit", default=None)
    p.add_argument("--out", required=True, help="JSON-lines file (appended; resumable)")
    p.add_argument("--reuse", default=None,
                   help="an earlier run's JSON lines: take the timings of the configurations "
                        "it measured at the same (batch, context, window, layers) and time only "
                        "the others")
    p.add_argument("--reuse-drop", default="",
                   help="comma list of draft configurations not to take from --reuse")
    p.add_argument("--acceptance", default=None,
                   help="draft_acceptance.py JSON files, comma-separated (trained long-context model) for the report")
    p.add_argument("--measured", default=None,
                   help="sweep JSON-lines file with end-to-end QSpec and w4a16 rows to overlay on "
                        "the plot (e.g. experiments/results/longe2e_h200.jsonl)")
    p.add_argument("--report", action="store_true", help="only write the Markdown report from --out")
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke configuration")
    args = p.parse_args(argv)
    if args.report:
        print(f"[longctx] wrote {report(args.out, args.acceptance)}", flush=True)
        print(f"[longctx] wrote {plot(args.out, args.acceptance, args.measured)}", flush=True)
        return 0
    defaults = (dict(model="tiny", batches="1,2", contexts="64,192", steps=2, repeats=1)
                if args.quick else
                dict(model="llama3-8b", batches="1,4,16,32,64", contexts="2048,8192,32768",
                     steps=4, repeats=3))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.quick and args.window == parse_window("4:1020"):
        args.window = (4, 28)
    args.drafts = args.drafts.split(",")
    try:
        args.extra_windows = [parse_window(w) for w in args.extra_windows.split(",") if w]
    except argparse.ArgumentTypeError as e:
        p.error(f"--extra-windows: {e}")
    bad = sorted(set(args.drafts) - set(DRAFTS))
    if bad:
        p.error(f"--drafts: unknown {bad}; choose from {', '.join(DRAFTS)}")
    if not 1 <= args.gamma <= args.max_gamma:
        p.error(f"--gamma must be in [1, --max-gamma={args.max_gamma}], got {args.gamma}")
    args.verify_gammas = [int(v) for v in args.verify_gammas.split(",") if v]
    if args.gamma not in args.verify_gammas:
        args.verify_gammas.append(args.gamma)
    from tqdm.auto import tqdm
    t_start = time.perf_counter()
    env = environment(args.commit)
    t0 = time.perf_counter()
    model = random_model(args.model, quantized=True)
    print(f"[longctx] {args.model} w4 model ready in {time.perf_counter() - t0:.1f} s", flush=True)
    n_layers = model.cfg.num_hidden_layers
    layers = spread_layers(n_layers, args.draft_layers or max(1, (3 * n_layers) // 4))
    done = set()
    if os.path.exists(args.out):
        done = {(r["batch"], r["context"]) for r in map(json.loads, open(args.out))}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    meta = dict(model=args.model, num_layers=n_layers, window=list(args.window),
                draft_layers=list(layers), draft=args.draft, gamma=args.gamma,
                max_gamma=args.max_gamma, kernels=args.kernels, steps=args.steps,
                repeats=args.repeats, random_weights=True,
                command="python3 experiments/bench_longctx.py " + " ".join(argv or sys.argv[1:]), **env)
    reuse = {}
    if args.reuse:
        drop = set(filter(None, args.reuse_drop.split(",")))
        for r in map(json.loads, open(args.reuse)):
            if ("t_ar" in r and r["window"] == meta["window"] and r["draft_layers"] == meta["draft_layers"]
                    and r["draft"] == args.draft):
                r["t_draft"] = {k: v for k, v in r["t_draft"].items() if k not in drop}
                reuse[(r["batch"], r["context"])] = r
        meta["reused_from"] = {"file": args.reuse, "commit": next(iter(reuse.values()), {}).get("commit"),
                               "dropped": sorted(drop)}
    points = [(b, c) for c in map(int, args.contexts.split(",")) for b in map(int, args.batches.split(","))]
    for batch, context in tqdm(points, desc="longctx"):
        if (batch, context) in done:
            continue
        if time.perf_counter() - t_start > args.time_budget:
            print(f"[longctx] time budget spent; stopping before batch {batch} context {context} "
                  f"(run again to resume)", flush=True)
            break
        kv = kv_bytes(model.cfg, batch, context + args.max_gamma + 1)
        row = dict(batch=batch, context=context, kv_bytes=kv, weight_bytes=weight_read_bytes(model, batch),
                   weights_gathered_embedding=True, **meta)
        if kv > args.max_kv_gib * 2**30:
            row["skipped"] = f"cache {kv / 2**30:.0f} GiB > --max-kv-gib {args.max_kv_gib:g}"
            print(f"[longctx] batch {batch} context {context}: {row['skipped']}; skipped", flush=True)
        else:
            t0 = time.perf_counter()
            try:
                row.update(measure(model, batch, context, args, args.window, layers,
                                   reuse.get((batch, context))))
            except Exception as e:  # noqa: BLE001 - record (e.g. out of memory) and go on
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            row["point_s"] = time.perf_counter() - t0
            print(f"[longctx] batch {batch} context {context}: "
                  + (f"AR {1e3 * row['t_ar']:.2f} ms, drafts "
                     + ", ".join(f"{k} {1e3 * v:.2f}" for k, v in row["t_draft"].items())
                     + f" ms ({row['point_s']:.0f} s)" if "error" not in row else row["error"]),
                  flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    if any("t_ar" in json.loads(line) for line in open(args.out)):
        print(f"[longctx] wrote {report(args.out, args.acceptance)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
