"""The issue-6 streaming probe's kernels (read-only and read + nibble unpacking) in interpret
mode: their sums must equal numpy's, or the probe's bandwidth figures mean nothing."""
import json

from experiments import probe_stream


def test_probe_stream_quick_is_exact(tmp_path):
    probe_stream.main(["--out", str(tmp_path), "--quick"])
    rows = json.loads((tmp_path / "probe_stream.json").read_text())["rows"]
    assert [r["variant"].split(" ")[0:2] for r in rows] == [["xla_sum"], ["xla_rowsum"],
                                                           ["pallas", "bn32"], ["pallas", "asm"]]
    assert all(r["correct"] for r in rows), rows
    # --xla-only: the read floor alone (XLA's two reductions over the same bytes)
    probe_stream.main(["--out", str(tmp_path), "--quick", "--xla-only"])
    rows = json.loads((tmp_path / "probe_stream.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["xla_sum", "xla_rowsum"] and all(r["correct"] for r in rows)
    md = (tmp_path / "probe_stream.md").read_text()
    assert "--quick --xla-only" in md and md.count("| 64 x 64 |") == 2
