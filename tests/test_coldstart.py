"""experiments/coldstart.py: one configuration's first and second generate call in this process,
appended as one JSON line (a CPU run on the sweep's tiny random model)."""
import json

from experiments import coldstart


def test_coldstart_appends_one_row_per_run(tmp_path):
    out = tmp_path / "c.jsonl"
    for config in ("auto", "qspec3"):
        coldstart.main(["--model", "tiny", "--config", config, "--prompt-len", "8",
                        "--new-tokens", "6", "--commit", "test", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["config"] for r in rows] == ["auto", "qspec3"]
    for r in rows:
        assert r["commit"] == "test" and r["model"] == "tiny" and r["random_weights"]
        assert r["first_call_s"] > 0 and r["second_call_s"] > 0 and r["load_s"] > 0
    # a fixed gamma always speculates; "auto" records which it did
    assert rows[1]["plain_decoding"] is False and rows[1]["cycles"] >= 1
    assert isinstance(rows[0]["plain_decoding"], bool)
    coldstart.main(["--report", str(out)])
    md = (tmp_path / "c.md").read_text()
    assert md.count("| tiny | 1 |") == 2 and "| qspec3 |" in md
