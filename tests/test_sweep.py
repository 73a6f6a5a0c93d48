"""Smoke test of the end-to-end sweep script (tiny random model, CPU)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from experiments.sweep import main as sweep_main


def test_sweep_quick_is_resumable(tmp_path):
    out = tmp_path / "sweep.jsonl"
    argv = ["--quick", "--modes", "w4a16,qspec-w4a8", "--batches", "2", "--gammas", "2,auto",
            "--max-gamma", "3", "--cost-gammas", "0,3", "--out", str(out)]
    assert sweep_main(argv) == 0
    rows = [json.loads(l) for l in open(out)]
    runs = [r for r in rows if "mode" in r]
    assert [(r["mode"], r["gamma"]) for r in runs] == [("w4a16", None), ("qspec-w4a8", 2),
                                                      ("qspec-w4a8", "auto")]
    for r in runs:
        assert "error" not in r, r
        assert r["random_weights"] and r["backend"] == "cpu" and r["prefill_s"] > 0
        assert r["weight_layout"] == "half_split"  # the default "auto" without a Hopper GPU
        # Decode time is a difference of two timings: positive, or NaN when below the noise.
        assert not r["decode_tokens_per_s"] <= 0
    # Each mode's decode program: weights + cache + temporaries, the cache donated (in place):
    from experiments.sweep import random_model
    m = random_model("tiny", quantized=True)
    cache = 2 * m.cfg.num_hidden_layers * 2 * m.cfg.num_key_value_heads * runs[0]["cache_len"] * m.cfg.head_dim * 2
    for r in runs:
        assert r["program_bytes"] > cache + r["program_temp_bytes"] > cache, r
        assert r["program_alias_bytes"] >= cache, r  # the cache is updated in place
    qs = next(r for r in runs if r["mode"] == "qspec-w4a8")
    assert 0 <= qs["acceptance_rate"] <= 1 and qs["tokens_per_cycle"] >= 1
    auto = runs[-1]
    assert auto["max_gamma"] == 3 and sum(auto["gamma_cycles"]) == auto["steps"]
    costs = [r for r in rows if "cycle_costs" in r]
    assert len(costs) == 1 and len(costs[0]["cycle_costs"]) == 4
    # Verify widths 1 and 4 timed, 2 and 3 interpolated linearly: with g drafts added, the
    # cycle costs are then linear in g.
    c = costs[0]["cycle_costs"]
    assert abs((c[2] - c[1]) - (c[1] - c[0])) < 1e-9 and abs((c[3] - c[2]) - (c[1] - c[0])) < 1e-9
    # The row keeps the parts: cycle g = g draft steps + the (g + 1)-token verify pass.
    d, v = costs[0]["draft_step_s"], costs[0]["verify_s"]
    assert d > 0 and len(v) == 4 and all(x > 0 for x in v)
    np.testing.assert_allclose(c, [g * d + v[g] for g in range(4)], rtol=1e-12)
    n = len(rows)
    assert sweep_main(argv[:-2] + ["--out", str(out)]) == 0
    # Resumed with everything done: nothing is measured again.
    assert len(open(out).readlines()) == n
    # --report writes only the Markdown report, next to the JSONL.
    md = tmp_path / "sweep.md"
    assert sweep_main(["--report", "--out", str(out)]) == 0
    assert md.exists() and not (tmp_path / "sweep_tiny_throughput.png").exists()
    check_report(md.read_text(), rows, str(out))
    md.unlink()
    # --plot draws the figures and writes the report too.
    assert sweep_main(["--plot", "--out", str(out)]) == 0
    assert (tmp_path / "sweep_tiny_throughput.png").exists()
    assert (tmp_path / "sweep_tiny_speedup.png").exists()
    assert md.exists()
    from experiments.sweep import speedup_table
    fixed, auto_row = speedup_table(rows, "tiny")
    assert fixed["gamma"] == 2 and fixed["predicted"] > 0
    # The prediction re-weighs the cost table by the run's tokens per cycle: the accepted
    # fraction is turned into the per-token rate of E(g, a) (E(2, a) = 1 + 2 * fraction).
    (q,), (cost_row,) = [r for r in rows if r.get("gamma") == 2], [r for r in rows if "cycle_costs" in r]
    c = cost_row["cycle_costs"]
    assert fixed["predicted"] == pytest.approx((1 + 2 * q["acceptance_rate"]) * c[0] / c[2], rel=1e-6)
    assert auto_row["gamma"] == "auto"
    if auto["gamma_cycles"][0] == auto["steps"]:
        # Plain decoding: the measured table gave no gamma AUTO_MIN_GAIN over AR even at full
        # acceptance (CPU timings decide this), so auto predicts exactly AR.
        assert auto_row["predicted"] == pytest.approx(1.0)
    else:
        assert auto_row["predicted"] >= fixed["predicted"]


def md_tables(text: str) -> list[list[dict]]:
    """The Markdown tables of ``text``, each a list of {header: cell} rows."""
    tables, lines = [], text.splitlines()

    def cells(line):  # split on unescaped pipes
        return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = cells(lines[i])
            body, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                body.append(dict(zip(header, cells(lines[i]))))
                i += 1
            tables.append(body)
        else:
            i += 1
    return tables


def check_report(text: str, rows: list[dict], out: str) -> None:
    from experiments.sweep import fmt, speedup_table
    from qspec_jax.cost_model import predicted_speedup
    assert text.startswith("# ") and "## tiny (random weights: timing only)" in text
    assert "random weights" in text and "`default` is the trained model" in text
    assert ("PYTHONPATH=. python3 experiments/sweep.py --models tiny --batches 2 --modes w4a16,qspec-w4a8 "
            "--gammas 2,auto --max-gamma 3 --cost-gammas 0,3 --prompt-len 8 --new-tokens 24 --repeats 2 "
            f"--out {out}") in text
    assert rows[0]["commit"] in text and rows[0]["jax"] in text
    runs, (cost,) = [r for r in rows if "mode" in r], [r for r in rows if "cycle_costs" in r]
    points, costs = md_tables(text)
    # One row per measured point, in batch / mode / gamma order.
    assert [(p["mode"], p["batch"], p["gamma"]) for p in points] == [
        ("w4a16", "2", "—"), ("qspec-w4a8", "2", "2"), ("qspec-w4a8", "2", "auto (≤3)")]
    for p, r in zip(points, runs):
        assert p["decode tok/s"] == fmt(r["decode_tokens_per_s"], ".1f")
    assert points[0]["speedup vs w4a16 (measured)"] == fmt(1.0 if runs[0]["decode_tokens_per_s"] > 0
                                                           else float("nan"))
    assert points[2]["gamma cycles (auto)"] == ", ".join(
        f"{g}:{n}" for g, n in enumerate(runs[2]["gamma_cycles"]) if n)
    # Speedups exactly as speedup_table gives them.
    for s, p in zip(speedup_table(rows, "tiny"), points[1:]):
        assert p["speedup vs w4a16 (measured)"] == fmt(s["measured"])
        assert p["predicted speedup"] == fmt(s["predicted"])
    # Cost table: cycle ms, its parts (draft step, verify pass per gamma) and the predicted
    # speedup at a = 0.9 and 1.0, one column per gamma 0..3.
    gamma_cols = [k for k in costs[0] if k.startswith("γ=")]
    assert gamma_cols == ["γ=0", "γ=1", "γ=2", "γ=3"]
    parts = f"draft step ms: {fmt(1e3 * cost['draft_step_s'], '.3f')}; verify pass ms"
    assert [c["quantity"] for c in costs] == ["cycle ms", parts, "speedup a=0.9", "speedup a=1.0"]
    assert costs[0]["batch"] == "2" and costs[0]["verify widths timed"].startswith("0, 3")
    assert [costs[0][k] for k in gamma_cols] == [fmt(1e3 * x, ".3f") for x in cost["cycle_costs"]]
    assert [costs[1][k] for k in gamma_cols] == [fmt(1e3 * x, ".3f") for x in cost["verify_s"]]
    for c, a in zip(costs[2:], (0.9, 1.0)):
        assert [c[k] for k in gamma_cols] == [fmt(x) for x in predicted_speedup(cost["cycle_costs"], a)]
    assert "## Errors" not in text


@pytest.mark.parametrize("flag, attr, func, mode", [
    ("--norm-quant-fold", "NORM_QUANT_FOLD", "quant.rmsnorm_quantize", "w4a8"),
    ("--norm-scale-fold", "NORM_SCALE_FOLD", "model.NormedInput", "w4a16")])
def test_sweep_quick_with_a_folded_norm(tmp_path, flag, attr, func, mode):
    """--norm-quant-fold: the draft's qkv / gate_up inputs go through quant.rmsnorm_quantize;
    --norm-scale-fold: the verify GEMMs take a NormedInput (they scale their output rows by the
    norm's factor) at every width, prefill included. Either is recorded in every row and in the
    report's command, with no error."""
    import importlib

    from qspec_jax import quant
    key = flag[2:].replace("-", "_")
    out = tmp_path / "fold.jsonl"
    mod_name, func = func.split(".")
    mod = importlib.import_module(f"qspec_jax.{mod_name}")
    calls, real = [], getattr(mod, func)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mod, func, lambda *a: calls.append(a[0].shape) or real(*a))
        mp.setattr(quant, attr, False)  # restored after: the sweep sets it
        import jax
        jax.clear_caches()  # (the flag is read while tracing)
        try:
            assert sweep_main(["--quick", "--modes", mode, "--batches", "1", flag,
                               "--new-tokens", "5", "--out", str(out)]) == 0
        finally:
            jax.clear_caches()
    assert calls
    if mode == "w4a16":  # on: prefill's rows too, not only the batch-1 steps "auto" folds
        assert any(math.prod(s[:-1]) > quant.NORM_SCALE_FOLD_MAX_ROWS for s in calls)
    rows = [json.loads(l) for l in open(out)]
    assert rows and all(r.get(key) and "error" not in r for r in rows)
    assert sweep_main(["--report", "--out", str(out)]) == 0
    assert flag in open(tmp_path / "fold.md").read()


def test_sweep_quick_with_an_int4_lm_head(tmp_path):
    """--quantize-lm-head: the quantized model's lm_head is int4 (read in both modes), recorded
    in every row and in the report's command."""
    from experiments import sweep
    out = tmp_path / "lm.jsonl"
    built = []
    real = sweep.random_model

    def spy(*a, **k):
        m = real(*a, **k)
        built.append(m)
        return m
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweep, "random_model", spy)
        assert sweep_main(["--quick", "--modes", "w4a16,qspec-w4a8", "--batches", "1", "--gammas", "2",
                           "--cost-gammas", "0,2", "--max-gamma", "2", "--quantize-lm-head",
                           "--out", str(out)]) == 0
    assert built and all(m.module.lm_head.is_quantized for m in built)
    rows = [json.loads(l) for l in open(out)]
    assert rows and all(r.get("quantize_lm_head") for r in rows if "mode" in r)
    assert all("error" not in r for r in rows)
    assert sweep_main(["--report", "--out", str(out)]) == 0
    assert "--quantize-lm-head" in open(tmp_path / "lm.md").read()


def test_report_lists_errors_and_nans(tmp_path):
    """The report of a file with an error row, a NaN decode time and gammas 10 / 2 / 'auto'."""
    from experiments.sweep import main as sweep_main
    env = dict(model="m", random_weights=False, commit="c0ffee", device="dev", backend="cpu", jax="9.9")
    run = dict(prompt_len=4, new_tokens=8, ms_per_step=1.0, decode_spread_s=[0.1, 0.2], compile_s=1.0,
               steps=7, hbm_roofline_pct=1.0, **env)
    rows = [dict(mode="w4a16", batch=1, gamma=None, decode_tokens_per_s=100.0, **run),
            dict(mode="qspec-w4a8", batch=1, gamma=10, decode_tokens_per_s=float("nan"),
                 acceptance_rate=0.5, tokens_per_cycle=2.0, **run),
            dict(mode="qspec-w4a8", batch=1, gamma="auto", decode_tokens_per_s=150.0, acceptance_rate=1.0,
                 tokens_per_cycle=3.0, max_gamma=2, gamma_cycles=[0, 1, 3], **run),
            dict(mode="qspec-w4a8", batch=1, gamma=2, decode_tokens_per_s=120.0, acceptance_rate=1.0,
                 tokens_per_cycle=3.0, **run),
            dict(cycle_costs=[1.0, 1.5, 2.0], batch=1, context=8, verify_gammas_timed="all", **env),
            dict(mode="w16", batch=4, gamma=None, error="OOM: out | of memory", **env)]
    out = tmp_path / "r.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sweep_main(["--report", "--out", str(out)]) == 0
    text = (tmp_path / "r.md").read_text()
    points, costs, errors = md_tables(text)
    assert [(p["gamma"], p["decode tok/s"], p["speedup vs w4a16 (measured)"], p["predicted speedup"])
            for p in points] == [("—", "100.0", "1.00", "—"), ("2", "120.0", "1.20", "1.50"),
                                 ("10", "nan", "nan", "—"), ("auto (≤2)", "150.0", "1.50", "1.50")]
    assert points[-1]["gamma cycles (auto)"] == "1:1, 2:3"
    assert [k for k in costs[0] if k.startswith("γ=")] == ["γ=0", "γ=1", "γ=2"]
    assert costs[2]["best γ"] == "2" and errors == [
        {"model": "m", "mode": "w16", "batch": "4", "gamma": "—", "error": "OOM: out \\| of memory"}]
    assert "--batches 1,4 --modes w16,w4a16,qspec-w4a8 --gammas 2,10,auto --max-gamma 2" in text


def test_sweep_quick_with_a_draft_window(tmp_path, monkeypatch):
    """--draft-window: QSpec points draft with windowed attention (generate and the cost table
    get the window), every row records it and the report's command repeats it."""
    import qspec_jax as qj
    from experiments import sweep
    seen = []
    real_generate, real_costs = qj.generate, sweep.measure_cycle_costs

    def gen(*a, **k):
        seen.append(("generate", k.get("mode"), k.get("draft_window")))
        return real_generate(*a, **k)

    def costs(*a, **k):
        seen.append(("costs", k.get("draft_window")))
        return real_costs(*a, **k)
    monkeypatch.setattr(qj, "generate", gen)
    monkeypatch.setattr(sweep, "measure_cycle_costs", costs)
    out = tmp_path / "w.jsonl"
    assert sweep_main(["--quick", "--modes", "w4a16,qspec-w4a8", "--batches", "1", "--gammas", "2",
                       "--cost-gammas", "0,2", "--max-gamma", "2", "--draft-window", "2:4",
                       "--out", str(out)]) == 0
    assert ("costs", (2, 4)) in seen
    assert {w for kind, mode, w in (x for x in seen if x[0] == "generate") if mode == "qspec"} == {(2, 4)}
    assert {w for kind, mode, w in (x for x in seen if x[0] == "generate") if mode == "w4a16"} == {None}
    rows = [json.loads(l) for l in open(out)]
    assert rows and all(r.get("draft_window") == [2, 4] for r in rows) and all("error" not in r for r in rows)
    assert sweep_main(["--report", "--out", str(out)]) == 0
    assert "--draft-window 2:4" in open(tmp_path / "w.md").read()
    with pytest.raises(SystemExit):
        sweep_main(["--quick", "--draft-window", "4", "--out", str(tmp_path / "bad.jsonl")])


def test_slope_timing_removes_a_per_call_constant():
    """decode_timing="slope" recovers the per-step time and the prefill exactly from runs whose
    time is prefill + constant + steps x step (the 16 x 32k H200 runs carried a ~0.17 s constant
    the 1-token difference attributes to the decode), where "diff" is biased by the constant."""
    from types import SimpleNamespace

    from experiments import sweep
    prefill, const, step = 5.0, 0.17, 0.0175

    def steps_of(n):
        return -(-(n - 1) // 4)  # QSpec gamma 3, every draft accepted: 4 tokens per cycle

    def run(n):
        out = SimpleNamespace(stats={"cycles": steps_of(n)})
        t = prefill + (0.0 if n == 1 else const + steps_of(n) * step)
        return t, out

    timing, out = sweep._slope_timing(run, 384, repeats=2)
    assert timing["half_tokens"] == 192
    assert timing["decode_s"] == pytest.approx(step * steps_of(384), rel=1e-9)
    assert timing["prefill_s"] == pytest.approx(prefill + const, rel=1e-9)
    sweep._ONE_TOKEN_TIMES.clear()
    diff, _ = sweep._diff_timing(run, ("key",), 384, repeats=2)
    sweep._ONE_TOKEN_TIMES.clear()
    assert diff["decode_s"] == pytest.approx(step * steps_of(384) + const, rel=1e-9)


def test_timings_leave_out_the_slow_first_run_after_a_new_program():
    """On the H200 the first N-token run after the 1-token (or N/2) program's first run was
    ~0.02 s slow; with 2 repeats the median (= mean) kept half of it. Both timings now run N
    once untimed after compiling the other program: a run fn that is slow exactly there gives
    the exact per-step time."""
    from types import SimpleNamespace

    from experiments import sweep
    prefill, step = 0.3, 0.002

    def make_run():
        state = {"others_run": False, "slowed": False}

        def run(n):
            t = prefill + (n - 1) * step
            if n == 384 and state["others_run"] and not state["slowed"]:
                state["slowed"] = True
                t += 0.5
            if n != 384:
                state["others_run"] = True
            return t, SimpleNamespace(stats={"decode_steps": n - 1})
        return run

    sweep._ONE_TOKEN_TIMES.clear()
    diff, _ = sweep._diff_timing(make_run(), ("key",), 384, repeats=2)
    sweep._ONE_TOKEN_TIMES.clear()
    assert diff["decode_s"] == pytest.approx(383 * step, rel=1e-9)
    assert diff["decode_spread_s"][1] == pytest.approx(383 * step, rel=1e-9)
    slope, _ = sweep._slope_timing(make_run(), 384, repeats=2)
    assert slope["decode_s"] == pytest.approx(383 * step, rel=1e-9)


def _linear_run(prefill, step, calls=None, offset=None):
    """A run fn taking prefill + (n - 1) x step (+ offset["s"]), counting its calls per n."""
    from types import SimpleNamespace

    def run(n):
        if calls is not None:
            calls[n] = calls.get(n, 0) + 1
        return (prefill + (n - 1) * step + (offset or {}).get("s", 0.0),
                SimpleNamespace(stats={"decode_steps": n - 1}))
    return run


@pytest.mark.parametrize("timing", ["diff", "slope"])
def test_min_time_adds_repeats_to_fast_points(timing):
    """--min-time: after the --repeats timed repeats, more while the timed runs total less than
    it (a 1B-shaped point decodes 64 tokens in ~50 ms), at most MAX_REPEATS."""
    from experiments import sweep

    def timed(min_time_s):
        sweep._ONE_TOKEN_TIMES.clear()
        run = _linear_run(0.002, 0.0008)
        if timing == "diff":
            t, _ = sweep._diff_timing(run, ("key",), 64, 3, min_time_s)
        else:
            t, _ = sweep._slope_timing(run, 64, 3, min_time_s)
        sweep._ONE_TOKEN_TIMES.clear()
        assert t["decode_s"] == pytest.approx(63 * 0.0008, rel=1e-9)
        return t["timed_repeats"]

    per_repeat = (0.002 + 63 * 0.0008) + (0.002 if timing == "diff" else 0.002 + 31 * 0.0008)
    assert timed(0.0) == 3
    assert timed(0.5) == math.ceil(0.5 / per_repeat) > 3
    assert timed(1e3) == sweep.MAX_REPEATS


def test_short_one_token_runs_are_timed_beside_each_point():
    """The 1-token runs of a batch are shared by its later points only when long (>=
    SHARED_ONE_TOKEN_MIN_S: long prompts); short ones are re-timed with each point, so a drift
    between points (clocks, another process) does not enter its decode time."""
    from experiments import sweep
    key = ("key",)
    for prefill, shared in ((0.01, False), (2 * sweep.SHARED_ONE_TOKEN_MIN_S, True)):
        sweep._ONE_TOKEN_TIMES.clear()
        offset = {"s": 0.0}
        sweep._diff_timing(_linear_run(prefill, 0.001, offset=offset), key, 64, 3)
        offset["s"] = 0.004  # every later run 4 ms slower
        calls = {}
        t, _ = sweep._diff_timing(_linear_run(prefill, 0.001, calls, offset), key, 64, 3)
        sweep._ONE_TOKEN_TIMES.clear()
        assert t["prefill_shared"] is shared
        if shared:  # long prefills: no 1-token run; the drift is the price
            assert 1 not in calls and t["decode_s"] == pytest.approx(0.063 + 0.004, rel=1e-9)
        else:
            assert calls[1] >= 3 and t["decode_s"] == pytest.approx(0.063, rel=1e-9)


def test_sweep_rejects_a_negative_min_time(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sweep_main(["--quick", "--min-time", "-1", "--out", str(tmp_path / "x.jsonl")])
    assert "--min-time must be >= 0" in capsys.readouterr().err


def test_sweep_quick_slope_timing(tmp_path):
    out = tmp_path / "slope.jsonl"
    assert sweep_main(["--quick", "--modes", "w4a16", "--batches", "1", "--new-tokens", "24",
                       "--decode-timing", "slope", "--out", str(out)]) == 0
    rows = [json.loads(l) for l in open(out) if '"mode"' in l]
    assert rows and all(r["decode_timing"] == "slope" and r["half_tokens"] == 12 for r in rows)
    for r in rows:  # NaN only when CPU timer noise beats the tiny decode (both then NaN)
        assert r["ms_per_step"] == pytest.approx(1e3 * r["decode_s"] / r["steps"], nan_ok=True)
    assert sweep_main(["--report", "--out", str(out)]) == 0
    assert "--decode-timing slope" in open(tmp_path / "slope.md").read()  # the reproduce command
    with pytest.raises(SystemExit):
        sweep_main(["--quick", "--decode-timing", "median", "--out", str(tmp_path / "x.jsonl")])
    with pytest.raises(SystemExit):
        sweep_main(["--quick", "--decode-timing", "slope", "--new-tokens", "3", "--out",
                    str(tmp_path / "y.jsonl")])


def test_sweep_quick_with_the_nk_weight_layout(tmp_path):
    """--weight-layout nk: the quantized models hold int4 [N, K] weights (step bytes count two
    values per byte), recorded in every row and in the report's command."""
    from experiments import sweep
    import jax.numpy as jnp
    out = tmp_path / "nk.jsonl"
    assert sweep_main(["--quick", "--modes", "w4a16", "--batches", "1", "--weight-layout", "nk",
                       "--out", str(out)]) == 0
    rows = [json.loads(l) for l in open(out)]
    assert rows and all(r.get("weight_layout") == "nk" for r in rows if "mode" in r)
    assert all("error" not in r for r in rows)
    assert sweep_main(["--report", "--out", str(out)]) == 0
    assert "--weight-layout nk" in open(tmp_path / "nk.md").read()
    import jax
    import qspec_jax as qj
    m = sweep.random_model("tiny", True)
    nk = qj.with_weight_layout(m, "nk")
    assert nk.weight_layout == "nk" and m.weight_layout == "half_split"
    assert sweep.step_bytes(nk, 1, 8) == sweep.step_bytes(m, 1, 8)
    assert any(x.dtype == jnp.int4 for x in jax.tree_util.tree_leaves(nk.state))


def test_sweep_quick_with_mgpu_out_mn_and_cache_write(tmp_path, monkeypatch):
    """--mgpu-out-mn on / off sets the Mosaic GEMMs' transposed partial-sum store for the run
    (w4_mgpu.OUT_MN), --cache-write how decode steps write K/V (qspec_jax.model.CACHE_WRITE);
    both are recorded in every row and in the report's command (on CPU the model runs the
    reference path: the rows just carry the out_mn setting)."""
    from pallas_kernels import w4_mgpu
    from qspec_jax import model as model_module
    monkeypatch.setattr(model_module, "CACHE_WRITE", "layer")  # restored after the test
    for flag, want, cw in (("on", True, "layer"), ("off", False, "step")):
        monkeypatch.setattr(w4_mgpu, "OUT_MN", not want)
        out = tmp_path / f"mn_{flag}.jsonl"
        modes = "w4a16,qspec-w4a8" if cw == "step" else "w4a16"  # (the rows' fields are the point)
        assert sweep_main(["--quick", "--modes", modes, "--batches", "1", "--mgpu-out-mn",
                           flag, "--cache-write", cw, "--out", str(out)]) == 0
        assert w4_mgpu.OUT_MN is want and model_module.CACHE_WRITE == cw
        rows = [json.loads(l) for l in open(out) if '"mode"' in l]
        assert rows and all(r["mgpu_out_mn"] is want and r["cache_write"] == cw for r in rows)
        assert all("error" not in r for r in rows)
        model_module.CACHE_WRITE = "layer"  # a later run's default (the report names what differs)
        assert sweep_main(["--report", "--out", str(out)]) == 0
        text = open(tmp_path / f"mn_{flag}.md").read()
        # (the command names them only away from the defaults: out_mn on, per-layer writes)
        assert ("--mgpu-out-mn off" in text) is (not want)
        assert ("--cache-write step" in text) is (cw == "step")
    model_module.CACHE_WRITE = "step"  # were "step" the default, per-layer rows would say so
    assert sweep_main(["--report", "--out", str(tmp_path / "mn_on.jsonl")]) == 0
    assert "--cache-write layer" in open(tmp_path / "mn_on.md").read()


def test_sweep_quick_with_cache_update_and_attn_min_batch(tmp_path, monkeypatch):
    """--cache-update / --attn-min-batch / --hadamard-impl / --mgpu-x-pad / --residual-norm /
    --mgpu-pdl set qspec_jax.model.CACHE_UPDATE, kernel_dispatch.ATTN_MIN_BATCH,
    rotation.HADAMARD_IMPL, w4_mgpu.X_PAD, kernel_dispatch.RESIDUAL_NORM and w4_mgpu.PDL for the
    run (and --min-time is recorded); rows record them and
    the report's command names them where they differ from the defaults; bad values are refused."""
    from pallas_kernels import w4_mgpu
    from qspec_jax import kernel_dispatch as kd
    from qspec_jax import model as model_module
    from qspec_jax import rotation
    defaults = (model_module.CACHE_UPDATE, kd.ATTN_MIN_BATCH, rotation.HADAMARD_IMPL)
    for mod, name in ((model_module, "CACHE_UPDATE"), (kd, "ATTN_MIN_BATCH"),
                      (rotation, "HADAMARD_IMPL"), (w4_mgpu, "X_PAD"), (kd, "RESIDUAL_NORM"),
                      (kd, "MGPU_MAX_M"), (kd, "RESIDUAL_NORM_WARPS"), (w4_mgpu, "PDL")):
        monkeypatch.setattr(mod, name, getattr(mod, name))  # restored after the test
    cu = next(c for c in model_module.CACHE_UPDATES if c != defaults[0])
    amb = defaults[1] + 3
    had = next(i for i in rotation.HADAMARD_IMPLS if i != defaults[2])
    out = tmp_path / "cs.jsonl"
    assert sweep_main(["--quick", "--modes", "w4a16", "--batches", "1", "--cache-update", cu,
                       "--attn-min-batch", str(amb), "--hadamard-impl", had,
                       "--mgpu-x-pad", "tma", "--residual-norm", "on", "--mgpu-max-m", "256",
                       "--residual-norm-warps", "16", "--mgpu-pdl", "prefetch", "--min-time", "0.1",
                       "--out", str(out)]) == 0
    assert w4_mgpu.X_PAD == "tma" and kd.RESIDUAL_NORM and kd.MGPU_MAX_M == 256
    assert w4_mgpu.PDL == "prefetch"
    assert kd.RESIDUAL_NORM_WARPS == 16
    assert (model_module.CACHE_UPDATE, kd.ATTN_MIN_BATCH, rotation.HADAMARD_IMPL) == (cu, amb, had)
    rows = [json.loads(l) for l in open(out) if '"mode"' in l]
    assert rows and all((r["cache_update"], r["attn_min_batch"], r["hadamard_impl"],
                         r["mgpu_x_pad"], r["residual_norm"], r["mgpu_max_m"],
                         r["residual_norm_warps"], r["mgpu_pdl"], r["min_time_s"])
               == (cu, amb, had, "tma", "on", 256, 16, "prefetch", 0.1)
               for r in rows)
    assert all("error" not in r for r in rows)
    model_module.CACHE_UPDATE, kd.ATTN_MIN_BATCH, rotation.HADAMARD_IMPL = defaults
    w4_mgpu.X_PAD, kd.RESIDUAL_NORM, kd.MGPU_MAX_M, kd.RESIDUAL_NORM_WARPS = "xla", False, None, 8
    w4_mgpu.PDL = ""
    assert sweep_main(["--report", "--out", str(out)]) == 0
    text = open(tmp_path / "cs.md").read()
    assert "--residual-norm on" in text and "--mgpu-max-m 256" in text
    assert "--residual-norm-warps 16" in text
    assert f"--cache-update {cu}" in text and f"--attn-min-batch {amb}" in text
    assert f"--hadamard-impl {had}" in text and "--mgpu-x-pad tma" in text
    assert "--mgpu-pdl prefetch" in text and "--min-time 0.1" in text
    for flag, bad in (("--attn-min-batch", "0"), ("--hadamard-impl", "fft"), ("--mgpu-max-m", "300")):
        with pytest.raises(SystemExit, match=f"{flag} {bad}"):
            sweep_main(["--quick", "--modes", "w4a16", "--batches", "1", flag, bad,
                        "--out", str(tmp_path / "bad.jsonl")])


def test_step_bytes_leave_out_the_gathered_embedding_table():
    """% of the HBM roofline counts what a decode step must read: an untied model's embedding
    table is gathered (B rows), not read; a tied one is the lm_head and counts whole. Rows
    written before that (no step_bytes) are corrected in the report."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from experiments import sweep
    from qspec_jax.model import KVCache
    m = sweep.random_model("tiny", True)
    V, D = sweep.SHAPED["tiny"]["vocab_size"], sweep.SHAPED["tiny"]["hidden_size"]
    whole = sum(x.size // 2 if x.dtype == jnp.int4 else x.nbytes for x in jax.tree_util.tree_leaves(m.state))
    for B in (1, 4):
        kv = KVCache.nbytes(m.cfg, B, 8, jnp.bfloat16)
        assert sweep.step_bytes(m, B, 8) == whole - V * D * 2 + B * D * 2 + kv
    tied = dataclasses.replace(m, cfg=dataclasses.replace(m.cfg, tie_word_embeddings=True))
    assert sweep.step_bytes(tied, 1, 8) == whole + KVCache.nbytes(m.cfg, 1, 8, jnp.bfloat16)
    # an old 8B row: 5.6 GB counted at 2.739 ms -> 42.76%; without the 1.05 GB table 34.77%
    old = dict(model="llama3-8b", hbm_roofline_pct=42.76381399974752, ms_per_step=2.7389836338582474)
    assert abs(sweep.roofline_pct(old) - 34.772) < 1e-3
    assert sweep.roofline_pct(dict(old, step_bytes=1.0)) == old["hbm_roofline_pct"]  # new rows as is
    assert sweep.roofline_pct(dict(old, model="somebody-else")) == old["hbm_roofline_pct"]


def test_sweep_refuses_to_time_out_mn_where_it_cannot_run(tmp_path, monkeypatch):
    """--mgpu-out-mn on where the kernel's lowering check turns the transposed store off (or
    the kernel cannot run at all): nothing is timed, the message says why."""
    import jax
    from pallas_kernels import w4_mgpu
    from qspec_jax import kernel_dispatch
    monkeypatch.setattr(w4_mgpu, "OUT_MN", True)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # a pretend GPU: only the check runs

    def store_rejected():
        w4_mgpu.OUT_MN = False  # what _mgpu_lowering_error does when only the store fails
        return None
    for check, pattern in ((store_rejected, "cannot lower the store"), (lambda: "no Hopper", "no Hopper")):
        monkeypatch.setattr(kernel_dispatch, "mgpu_unavailable", check)
        out = tmp_path / "refused.jsonl"
        with pytest.raises(SystemExit, match=f"--mgpu-out-mn on.*{pattern}.*nothing was timed"):
            sweep_main(["--quick", "--modes", "w4a16", "--batches", "1", "--mgpu-out-mn", "on",
                        "--out", str(out)])
        assert not out.exists()


def test_sweep_rotate_times_the_online_hadamards(tmp_path, monkeypatch):
    """--rotate: the random-weight quantized model runs the online Hadamard transforms of a
    rotated conversion (the same random weights give other logits, and the transform is traced
    in the forward), rows record it and the report's command and weights note name it."""
    import numpy as np
    import qspec_jax as qj
    from experiments import sweep
    from qspec_jax import rotation
    plain, rot = sweep.random_model("tiny", True), sweep.random_model("tiny", True, rotate=True)
    full = sweep.random_model("tiny", True, rotate=True, rotate_v_heads=False)
    assert not plain.qcfg.rotate and rot.qcfg.rotate and rot.qcfg.rotate_v_heads
    calls = []
    real, real_heads = rotation.online_hadamard, rotation.online_hadamard_heads
    monkeypatch.setattr(rotation, "online_hadamard",
                        lambda x, *a, **k: calls.append(x.shape) or real(x, *a, **k))
    monkeypatch.setattr(rotation, "online_hadamard_heads",
                        lambda x, hd: calls.append(("heads", x.shape)) or real_heads(x, hd))
    toks = [[5, 17, 3, 99, 4]]
    a = np.asarray(qj.logits(plain, toks, mode="w4a16"), np.float32)
    assert not calls
    b = np.asarray(qj.logits(rot, toks, mode="w4a16"), np.float32)
    L, I = sweep.SHAPED["tiny"]["num_hidden_layers"], sweep.SHAPED["tiny"]["intermediate_size"]
    n = rot.cfg.q_size
    # before o_proj (across heads: v_proj holds the per-head part) and down_proj, every layer
    assert calls.count((1, 5, I)) == L and calls.count(("heads", (1, 5, n))) == L
    assert len(calls) == 2 * L
    assert np.abs(a - b).max() > 1e-3
    calls.clear()
    qj.logits(full, toks, mode="w4a16")
    assert calls.count((1, 5, I)) == L and calls.count((1, 5, n)) == L and len(calls) == 2 * L
    out = tmp_path / "rot.jsonl"
    assert sweep_main(["--quick", "--modes", "w4a16", "--batches", "1", "--rotate", "--out", str(out)]) == 0
    rows = [json.loads(l) for l in open(out) if '"mode"' in l]
    assert rows and all(r.get("rotate") is True and "error" not in r for r in rows)
    assert sweep_main(["--report", "--out", str(out)]) == 0
    text = open(tmp_path / "rot.md").read()
    assert "--rotate" in text and "run the online Hadamard transforms" in text
    assert "--full-o-rotation" not in text and all(r["rotate_v_heads"] for r in rows)
    out = tmp_path / "full.jsonl"
    assert sweep_main(["--quick", "--modes", "w4a16", "--batches", "1", "--rotate",
                       "--full-o-rotation", "--out", str(out)]) == 0
    rows = [json.loads(l) for l in open(out) if '"mode"' in l]
    assert rows and all(r["rotate_v_heads"] is False and "error" not in r for r in rows)
    assert sweep_main(["--report", "--out", str(out)]) == 0
    assert "--full-o-rotation" in open(tmp_path / "full.md").read()
    with pytest.raises(SystemExit, match="only with --rotate"):
        sweep_main(["--quick", "--full-o-rotation", "--out", str(tmp_path / "x.jsonl")])


def test_report_flags_ar_steps_that_disagree_with_the_cost_table():
    """A w4a16 row's ms per step is checked against its cost table's timed gamma-0 step (same
    model, batch, context): more than 15% apart is flagged, agreement and other batches are not."""
    from experiments import sweep
    row = dict(model="m", mode="w4a16", batch=32, prompt_len=8064, new_tokens=64, repeats=1,
               decode_timing="slope", ms_per_step=12.45)
    cost = dict(model="m", batch=32, context=8096, cycle_costs=[0.010435, 0.015])
    (line,) = sweep.timing_disagreements([row], [cost])
    assert "12.450" in line and "10.435" in line and "19% apart" in line and "1 repeat" in line
    assert sweep.timing_disagreements([dict(row, ms_per_step=11.9)], [cost]) == []
    assert sweep.timing_disagreements([row], [dict(cost, batch=16)]) == []
    assert sweep.timing_disagreements([row], [dict(cost, context=4096)]) == []
    assert sweep.timing_disagreements([dict(row, mode="qspec-w4a8")], [cost]) == []


def test_random_w16_model_is_drawn_leaf_by_leaf(tmp_path):
    """The sweep's random 16-bit model (random_w16_params, one small program per shape): the
    Transformer's own tree, shapes and dtypes, matrices N(0, 1 / fan_in), norm scales 1; the
    sweep times a w16 point with it."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from experiments import sweep
    from qspec_jax.config import QuantConfig
    from qspec_jax.model import Transformer, pure_dict
    cfg = sweep.shaped_config("tiny")
    params = sweep.random_w16_params(cfg, jnp.bfloat16, seed=3)
    want = jax.eval_shape(lambda: pure_dict(Transformer(cfg, QuantConfig(), dtype=jnp.bfloat16,
                                                        rngs=nnx.Rngs(0))))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(want)
    seen = set()
    for (path, x), w in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(want)):
        assert x.shape == w.shape and x.dtype == w.dtype, jax.tree_util.keystr(path)
        v, name = np.asarray(x, np.float64), path[-1].key
        if x.ndim == 1:
            assert name == "scale" and (v == 1).all()
            continue
        fan_in = x.shape[1] if name == "embedding" else x.shape[0]
        assert abs(v.mean()) < 0.1 * fan_in ** -0.5 and abs(v.std() * fan_in ** 0.5 - 1) < 0.1, jax.tree_util.keystr(path)
        seen.add(v.tobytes()[:64])
    assert len(seen) == sum(x.ndim == 2 for x in jax.tree_util.tree_leaves(params))  # distinct draws
    out = tmp_path / "w16.jsonl"
    assert sweep_main(["--quick", "--modes", "w16", "--batches", "1", "--out", str(out)]) == 0
    rows = [json.loads(l) for l in open(out)]
    assert [r["mode"] for r in rows if "mode" in r] == ["w16"] and all("error" not in r for r in rows)
