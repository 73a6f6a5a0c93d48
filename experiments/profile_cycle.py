"""Where does a decode step / QSpec cycle spend its device time? Profiles qj.generate for a
few decoding configurations on one model and batch and sums the device kernel time by kernel
name (jax.profiler trace, Perfetto JSON), per generated token and per cycle, plus the
difference between two configurations (e.g. why gamma="auto" drafting gamma 3 takes longer
per cycle than fixed gamma 3).

    PYTHONPATH=. python3 experiments/profile_cycle.py --model llama3-8b --batch 4 \
        --configs w4a16,qspec3,qspec-auto3 --out /tmp/prof --commit $(git rev-parse --short HEAD)

Configurations: w4a16 / w4a8 / w4a4 (AR in that mode), qspecG (QSpec w4a8 draft, fixed gamma G), qspec-autoG (gamma="auto"
with a cost table under which gamma G always pays most, so it drafts G every cycle like the
fixed program and only the program structure differs). Models: the sweep's random shaped models
(experiments/sweep.py) or "default" (the trained model). Writes profile_<model>_b<B>.json and
.md under --out; without a GPU it profiles the CPU (the host's XLA ops).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import qspec_jax as qj  # noqa: E402
from qspec_jax import model as model_module  # noqa: E402
from qspec_jax.model import CACHE_WRITES  # noqa: E402


def _device_events(trace_dir: str) -> tuple[list, str]:
    """The complete ("X") events on the device tracks of the newest Perfetto trace under
    trace_dir, and which tracks those are ("gpu": CUDA streams, or "host": XLA:CPU's thunks)."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(files[-1], "rt") as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    pname = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    tname = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    gpu = {p for p, n in pname.items() if "gpu" in n.lower() and "host" not in n.lower()}
    kind = "gpu" if gpu else "host"

    def wanted(e):
        t = tname.get((e["pid"], e.get("tid")), "")
        if gpu:  # kernels on the CUDA streams (the "XLA Ops" rows repeat them by HLO op)
            return e["pid"] in gpu and t.startswith("Stream")
        name = e.get("name", "")  # CPU: XLA's thunks on its Eigen threads, not the bookkeeping
        return ("XLAEigen" in t and not name.startswith(("ThreadpoolListener", "ThunkExecutor", "end:")))

    return [e for e in events if e.get("ph") == "X" and "dur" in e and wanted(e)], kind


def kernel_times(trace_dir: str) -> tuple[dict, str]:
    """{name: [total_us, count]} of the complete events on device tracks of the newest
    Perfetto trace under trace_dir, and which tracks were used ("gpu" or "host")."""
    events, kind = _device_events(trace_dir)
    out = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        t = out[e["name"]]
        t[0] += float(e["dur"])
        t[1] += 1
    return dict(out), kind


def idle_time(trace_dir: str, min_gap_us: float = 20.0) -> dict:
    """When the device waited: from the first kernel's start to the last one's end (span), the
    time some kernel ran (busy: the union over streams), the rest (idle), and the gaps of at
    least ``min_gap_us`` (count, total). A device-to-host sync (a data-dependent loop test or
    conditional) drains the queue and shows up as such a gap while the host relaunches."""
    events, _ = _device_events(trace_dir)
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events)
    if not spans:
        return dict(span_us=0.0, busy_us=0.0, idle_us=0.0, gaps=0, gap_us=0.0)
    busy, gaps, gap_us = 0.0, 0, 0.0
    cur_s, cur_e = spans[0]
    for s, e in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            if s - cur_e >= min_gap_us:
                gaps, gap_us = gaps + 1, gap_us + (s - cur_e)
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = max(e for _, e in spans) - spans[0][0]
    return dict(span_us=span, busy_us=busy, idle_us=span - busy, gaps=gaps, gap_us=gap_us)


def config_kwargs(name: str, max_gamma: int):
    if name in ("w4a16", "w4a8", "w4a4"):  # plain decoding in that mode (w4a8 / w4a4: the draft's)
        return dict(mode=name)
    if name.startswith("qspec-auto"):
        g = int(name[len("qspec-auto"):])
        # Cycle costs under which gamma g pays most at every acceptance: drafting is cheap.
        costs = [1.0] + [1.0 + 0.01 * i if i != g else 0.5 for i in range(1, max_gamma + 1)]
        return dict(mode="qspec", draft="w4a8", gamma="auto", max_gamma=max_gamma, cycle_costs=costs)
    if name.startswith("qspec"):
        return dict(mode="qspec", draft="w4a8", gamma=int(name[len("qspec"):]))
    raise ValueError(f"unknown configuration {name!r} (w4a16, w4a8, w4a4, qspecG, qspec-autoG)")


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="default")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--configs", default="w4a16,qspec3,qspec-auto3")
    p.add_argument("--max-gamma", type=int, default=3)
    p.add_argument("--kernels", default="auto")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--rotate", action="store_true",
                   help="random-weight models run a rotated conversion's online Hadamard "
                        "transforms (sweep.random_model's rotate; timing only)")
    p.add_argument("--cache-write", choices=CACHE_WRITES, default=None,
                   help="how decode steps write K/V: per layer or once per step after a "
                        "read-only forward (qspec_jax.model.CACHE_WRITE; default: its value)")
    from sweep import add_mgpu_flags, apply_mgpu_flags
    add_mgpu_flags(p)
    p.add_argument("--commit", default="unknown")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.cache_write is not None:
        model_module.CACHE_WRITE = a.cache_write
    mgpu = apply_mgpu_flags(a)
    if a.model == "default":
        model = qj.load(None, quant="w4")
    else:
        from sweep import random_model
        model = random_model(a.model, quantized=True, rotate=a.rotate)
        model = qj.with_weight_layout(model, "auto", in_place=True)  # as qj.load: nk on Hopper
    rng = np.random.RandomState(0)
    prompts = [rng.randint(3, model.cfg.vocab_size, a.prompt_len).tolist() for _ in range(a.batch)]
    os.makedirs(a.out, exist_ok=True)
    res = {}
    for name in a.configs.split(","):
        kw = config_kwargs(name, a.max_gamma)
        run = lambda: qj.generate(model, prompts, max_new_tokens=a.new_tokens, kernels=a.kernels,  # noqa: E731
                                  **kw)
        t0 = time.perf_counter()
        run()  # compile
        compile_s = time.perf_counter() - t0
        tdir = os.path.join(a.out, f"trace_{name}")
        with jax.profiler.trace(tdir, create_perfetto_trace=True):
            t0 = time.perf_counter()
            out = run()
            wall = time.perf_counter() - t0
        times, kind = kernel_times(tdir)
        idle = idle_time(tdir)
        st = out.stats
        cycles = int(st.get("cycles") or 0) or (a.new_tokens - 1)
        total = sum(v[0] for v in times.values())
        res[name] = dict(wall_s=wall, compile_s=compile_s, cycles=cycles, tracks=kind,
                         total_kernel_us=total, per_cycle_us=total / cycles,
                         gamma_cycles=st.get("gamma_cycles"), acceptance=st.get("acceptance_rate"),
                         idle=idle, idle_per_cycle_us=idle["idle_us"] / cycles,
                         gaps_per_cycle=idle["gaps"] / cycles,
                         kernels={k: v for k, v in sorted(times.items(), key=lambda kv: -kv[1][0])})
        print(f"[profile] {name}: wall {wall:.3f} s, {cycles} cycles, device {total / 1e3:.1f} ms "
              f"({kind} tracks), {total / cycles:.1f} us per cycle, device idle "
              f"{idle['idle_us'] / cycles:.1f} us per cycle ({idle['gaps'] / cycles:.2f} gaps >= 20 us)",
              flush=True)
    meta = dict(commit=a.commit, jax=jax.__version__, device=str(jax.devices()[0].device_kind),
                model=a.model, batch=a.batch, prompt_len=a.prompt_len, new_tokens=a.new_tokens,
                kernels=a.kernels, cache_write=model_module.CACHE_WRITE, **mgpu,
                rotate=a.rotate or a.model == "default", date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    stem = os.path.join(a.out, f"profile_{a.model}_b{a.batch}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, configs=res), f, indent=1)
    names = list(res)
    lines = [f"# Device time by kernel: {a.model}, batch {a.batch}", "",
             f"`PYTHONPATH=. python3 experiments/profile_cycle.py --model {a.model} --batch {a.batch} "
             f"--configs {a.configs} --max-gamma {a.max_gamma} --prompt-len {a.prompt_len} "
             f"--new-tokens {a.new_tokens} --cache-write {model_module.CACHE_WRITE}"
             f"{' --rotate' if a.rotate else ''}"
             f"{' --mgpu-x-pad ' + a.mgpu_x_pad if a.mgpu_x_pad else ''}"
             f"{' --residual-norm ' + a.residual_norm if a.residual_norm else ''}` at commit {a.commit}, "
             f"{meta['device']}, jax {meta['jax']}. "
             "One profiled generate call per configuration after its compile; times are sums of "
             "kernel durations on the device tracks (prefill included), per cycle = / cycles "
             "(a cycle is one step for w4a16). Idle: time between the first kernel's start and "
             "the last one's end with no kernel running (profiling slows the host, so gaps are "
             "larger than unprofiled); gaps: idle stretches of 20 us or more.", "",
             "| config | wall s | cycles | device ms | us per cycle | idle us per cycle | gaps >= 20 us per cycle | tracks |",
             "|---|---|---|---|---|---|---|---|"]
    for n in names:
        r = res[n]
        lines.append(f"| {n} | {r['wall_s']:.3f} | {r['cycles']} | {r['total_kernel_us'] / 1e3:.1f} | "
                     f"{r['per_cycle_us']:.1f} | {r['idle_per_cycle_us']:.1f} | "
                     f"{r['gaps_per_cycle']:.2f} | {r['tracks']} |")
    if len(names) >= 2:
        x, y = names[-1], names[-2]
        keys = set(res[x]["kernels"]) | set(res[y]["kernels"])

        def per_cycle(n, k):
            return res[n]["kernels"].get(k, [0.0, 0])[0] / res[n]["cycles"]
        diff = sorted(keys, key=lambda k: -abs(per_cycle(x, k) - per_cycle(y, k)))[:a.top]
        lines += ["", f"Largest per-cycle differences, {x} minus {y} (us per cycle; calls per cycle):", "",
                  f"| kernel | {x} | {y} | difference | calls/cycle {x} | calls/cycle {y} |",
                  "|---|---|---|---|---|---|"]
        for k in diff:
            cx = res[x]["kernels"].get(k, [0, 0])[1] / res[x]["cycles"]
            cy = res[y]["kernels"].get(k, [0, 0])[1] / res[y]["cycles"]
            lines.append(f"| `{k[:80]}` | {per_cycle(x, k):.1f} | {per_cycle(y, k):.1f} | "
                         f"{per_cycle(x, k) - per_cycle(y, k):+.1f} | {cx:.2f} | {cy:.2f} |")
    for n in names:
        lines += ["", f"Top kernels of {n} (us per cycle, calls per cycle):", "",
                  "| kernel | us/cycle | calls/cycle |", "|---|---|---|"]
        for k, (t, c) in list(res[n]["kernels"].items())[:a.top]:
            lines.append(f"| `{k[:80]}` | {t / res[n]['cycles']:.1f} | {c / res[n]['cycles']:.2f} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:12 + len(names)]))


if __name__ == "__main__":
    main()
