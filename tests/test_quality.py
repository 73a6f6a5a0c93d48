"""Smoke test of the quality table script (experiments/quality.py --quick, CPU)."""

from __future__ import annotations

import json

from experiments.quality import main as quality_main


def test_quality_quick(tmp_path):
    prefix = str(tmp_path / "quality_quick")
    assert quality_main(["--quick", "--out-prefix", prefix, "--commit", "test"]) == 0
    res = json.load(open(prefix + ".json"))
    meta, models, configs = res["meta"], res["models"], res["configs"]
    for k in ("commit", "jax", "device", "backend", "dtype", "n_problems", "problems_per_steps",
              "max_new_tokens", "ppl_tokens_scored", "gammas", "wall_s", "command"):
        assert k in meta, k
    assert meta["commit"] == "test" and meta["dtype"] == "bfloat16"
    # the quick set: w4a4 and a QSpec row, plus the implied w4a16 row of the same model
    assert set(configs) == {"rtn-rot/w4a16", "rtn-rot/w4a4", "rtn-rot/qspec-w4a8-g2"}
    assert set(models["rtn-rot"]["ppl"]) == {"w4a16", "w4a4"}
    n = meta["n_problems"]
    for name, r in configs.items():
        assert r["n"] == n == len(r["correct"]) == len(r["completion_hash"])
        assert 0 <= r["accuracy"] <= 1 and r["correct_count"] == r["correct"].count("1")
        assert set(r["accuracy_by_steps"]) == {"2", "3", "4", "5", "6"}
        assert r["wall_s"] > 0
        if r["mode"] != "qspec":
            assert r["ppl"] > 1 and r["ppl_tokens"] == meta["ppl_tokens_scored"]
    assert configs["rtn-rot/w4a16"]["code_agreement_vs_w4a16"] == 1.0
    qs, ref = configs["rtn-rot/qspec-w4a8-g2"], configs["rtn-rot/w4a16"]
    assert qs["draft"] == "w4a8" and qs["gamma"] == 2
    assert 0 <= qs["acceptance_rate"] <= 1 and 1 <= qs["tokens_per_cycle"] <= 3
    assert qs["drafted"] == 2 * qs["cycles"]
    # QSpec's greedy output is the w4a16 output: same accuracy on the same problems
    assert qs["accuracy"] == ref["accuracy"] and qs["correct"] == ref["correct"]
    assert qs["vs_w4a16"]["accuracy_equal"]
    md = open(prefix + ".md").read()
    assert "rtn-rot/qspec-w4a8-g2" in md and "## What the figures show" in md
    assert (tmp_path / "quality_quick.png").stat().st_size > 0
    # --resume with everything done measures nothing again and keeps the results
    assert quality_main(["--quick", "--out-prefix", prefix, "--commit", "test", "--resume"]) == 0
    again = json.load(open(prefix + ".json"))
    assert again["configs"]["rtn-rot/w4a4"]["correct"] == configs["rtn-rot/w4a4"]["correct"]
    assert again["configs"]["rtn-rot/w4a4"]["wall_s"] == configs["rtn-rot/w4a4"]["wall_s"]
