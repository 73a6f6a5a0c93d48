"""Smoke test of the end-to-end sweep script (tiny random model, CPU)."""

from __future__ import annotations

import json

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
        # Decode time is a difference of two timings: positive, or NaN when below the noise.
        assert not r["decode_tokens_per_s"] <= 0
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
    n = len(rows)
    assert sweep_main(argv[:-2] + ["--out", str(out)]) == 0
    # Resumed with everything done: nothing is measured again.
    assert len(open(out).readlines()) == n
    assert sweep_main(["--plot", "--out", str(out)]) == 0
    assert (tmp_path / "sweep_tiny_throughput.png").exists()
    assert (tmp_path / "sweep_tiny_speedup.png").exists()
    from experiments.sweep import speedup_table
    fixed, auto_row = speedup_table(rows, "tiny")
    assert fixed["gamma"] == 2 and fixed["predicted"] > 0
    assert auto_row["gamma"] == "auto" and auto_row["predicted"] >= fixed["predicted"]
