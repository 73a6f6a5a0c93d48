"""Smoke test of experiments/draft_acceptance.py on the default model (CPU)."""

import json

from experiments.draft_acceptance import main


def test_draft_acceptance_smoke(tmp_path):
    prefix = str(tmp_path / "acc")
    assert main(["--contexts", "64", "--windows", "2:8", "--prompts", "2", "--new-tokens", "8",
                 "--out-prefix", prefix]) == 0
    result = json.load(open(prefix + ".json"))
    names = [r["draft_config"] for r in result["rows"]]
    assert names[0] == "full" and names[1] == "window 2:8" and names[2].startswith("layers ")
    assert all(r["equals_w4a16"] for r in result["rows"])  # cheaper drafts never change output
    full, windowed = result["rows"][0], result["rows"][1]
    assert windowed["acceptance_rate"] <= full["acceptance_rate"]
    assert "| 64 | window 2:8 |" in open(prefix + ".md").read()
