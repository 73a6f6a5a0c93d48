"""experiments/bench_longctx.py: the quick CPU run, its report, resuming and reusing timings."""

from __future__ import annotations

import json

import pytest

from experiments import bench_longctx as BL


def test_bench_longctx_quick_report_and_reuse(tmp_path, monkeypatch):
    out = str(tmp_path / "lc.jsonl")
    args = ["--quick", "--batches", "1", "--contexts", "64", "--max-gamma", "3", "--out", out]
    assert BL.main(args) == 0
    row = json.loads(open(out).read().splitlines()[0])
    assert set(row["t_draft"]) == {"full", "window", "window+layers"}
    assert set(row["t_verify"]) == {"0", "3"} and row["t_ar"] == row["t_verify"]["0"]
    assert row["window"] == [4, 28] and row["draft_layers"] == [0]  # 3/4 of 2 layers, spread
    assert row["kv_bytes"] == 2 * 2 * 2 * 32 * 2 * (64 + 4)  # layers, kv heads, head_dim, bf16
    md = open(tmp_path / "lc.md").read()
    assert "| 1 | 64 | full |" in md and "random int4 weights" in md

    # A second run resumes (nothing new), a reuse run times only what it cannot take over, and
    # a point whose cache is too large is skipped with the reason.
    timed = []
    real = BL.time_forward

    def counting(model, batch, context, T, mode, **kw):
        timed.append((T, mode, kw.get("window"), kw.get("layers")))
        return real(model, batch, context, T, mode, **kw)

    monkeypatch.setattr(BL, "time_forward", counting)
    assert BL.main(args) == 0 and timed == []
    out2 = str(tmp_path / "lc2.jsonl")
    assert BL.main(args[:-1] + [out2, "--reuse", out, "--reuse-drop", "window"]) == 0
    assert timed == [(1, "w4a8", (4, 28), None)]
    row2 = json.loads(open(out2).read().splitlines()[0])
    assert row2["t_draft"]["full"] == row["t_draft"]["full"]
    assert "draft window" not in row2["reused"] and "verify g=3" in row2["reused"]
    assert "Timings reused from" in open(tmp_path / "lc2.md").read()
    out4 = str(tmp_path / "lc4.jsonl")
    timed.clear()
    assert BL.main(args[:-1] + [out4, "--reuse", out, "--extra-windows", "2:12"]) == 0
    assert timed == [(1, "w4a8", (2, 12), None)]  # only the new window is timed
    row4 = json.loads(open(out4).read().splitlines()[0])
    assert set(row4["t_draft"]) == {"full", "window", "window+layers", "window 2:12"}
    assert "| 1 | 64 | window 2:12 |" in open(tmp_path / "lc4.md").read()
    out3 = str(tmp_path / "lc3.jsonl")
    assert BL.main(args[:-1] + [out3, "--max-kv-gib", "1e-9"]) == 0
    assert "skipped" in json.loads(open(out3).read())


def test_bench_longctx_rejects_bad_options(tmp_path):
    with pytest.raises(SystemExit):
        BL.main(["--quick", "--window", "4", "--out", str(tmp_path / "x.jsonl")])
    with pytest.raises(SystemExit):
        BL.main(["--quick", "--drafts", "full,nope", "--out", str(tmp_path / "x.jsonl")])
    with pytest.raises(ValueError, match="--draft-layers"):
        BL.spread_layers(4, 5)
    assert BL.spread_layers(32, 24)[:3] == (0, 1, 3) and len(BL.spread_layers(32, 24)) == 24


def test_bench_longctx_report_with_acceptance_and_measured_plot(tmp_path):
    """The report turns the acceptance files' accepted fractions into per-token rates (a later
    file replacing an earlier one's rows) and the plot overlays end-to-end speedups."""
    out = str(tmp_path / "lc.jsonl")
    assert BL.main(["--quick", "--batches", "1", "--contexts", "64", "--max-gamma", "3",
                    "--out", out]) == 0
    acc1, acc2 = tmp_path / "a1.json", tmp_path / "a2.json"
    row = dict(context=64, gamma=3, draft_config="window 4:28", acceptance_rate=0.5)
    acc1.write_text(json.dumps({"rows": [row, {**row, "draft_config": "full", "acceptance_rate": 0.9}]}))
    acc2.write_text(json.dumps({"rows": [{**row, "acceptance_rate": 0.72}]}))  # replaces a1's window
    sweep = tmp_path / "e2e.jsonl"
    sweep.write_text("\n".join(json.dumps(r) for r in [
        dict(mode="w4a16", batch=1, prompt_len=56, new_tokens=16, decode_tokens_per_s=100.0),
        dict(mode="qspec-w4a8", gamma=3, batch=1, prompt_len=56, new_tokens=16,
             decode_tokens_per_s=150.0, acceptance_rate=1.0, draft_window=[4, 28])]) + "\n")
    assert BL.main(["--report", "--out", out, "--acceptance", f"{acc1},{acc2}",
                    "--measured", str(sweep)]) == 0
    md = open(tmp_path / "lc.md").read()
    a_window = BL.per_token_acceptance(0.72, 3)
    assert f"| 1 | 64 | window | {a_window:.2f} (64) |" in md and "| 1 | 64 | full | 0.9" in md
    assert (tmp_path / "lc.png").stat().st_size > 10_000
    assert BL.measured_speedups(str(sweep)) == [dict(batch=1, context=64, gamma=3, window=[4, 28],
                                                     speedup=1.5, acceptance=1.0)]
