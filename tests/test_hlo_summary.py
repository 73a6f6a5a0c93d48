"""experiments/hlo_summary.py: kernels of an optimized HLO module traced to source lines."""
import gzip
import inspect
import json

import jax
import jax.numpy as jnp

from experiments import hlo_summary


def _loop(x, c):
    def body(s):
        i, x = s
        y = jnp.concatenate([x[:, 2:], -x[:, :2]], 1) * 2.0
        return i + 1, jnp.tanh(y) + x.sum()  # the line the body's fusions come from
    return jax.lax.while_loop(lambda s: s[0] < c, body, (0, x))


def _compiled_text():
    return jax.jit(_loop).lower(jnp.ones((4, 8)), 3).compile().as_text()


def _line_of(marker):
    src, first = inspect.getsourcelines(_loop)
    return first + next(i for i, line in enumerate(src) if marker in line)


def test_while_body_kernels_per_source_line(tmp_path, capsys):
    """Without a profile: the while body's device-work instructions, each traced through the
    module's stack-frame tables to the line of this file that made it."""
    path = tmp_path / "m.after_optimizations.txt.gz"
    with gzip.open(path, "wt") as f:
        f.write(_compiled_text())
    hlo_summary.main(["--hlo", str(path)])
    out = capsys.readouterr().out
    assert "while body" in out
    want = f"test_hlo_summary.py:{_line_of('the line the body')}"
    row = next(line for line in out.splitlines() if want in line)
    assert "fusion" in row and int(row.split("|")[2]) >= 1


def test_profile_kernels_joined_to_fusions(tmp_path):
    """With a profile_cycle JSON: profiled kernels named like fusions get their fused ops and
    source line, per-line totals add up, and a kernel that is no HLO instruction says so."""
    text = _compiled_text()
    mod = hlo_summary.Module(text)
    (body,) = mod.while_bodies()
    fusions = [i for i in mod.launches(body) if i.op == "fusion"]
    assert fusions
    hlo = tmp_path / "m.txt"
    hlo.write_text(text)
    # the profiler names a kernel after its instruction with '.' and '-' made '_'
    kname = {i.name: i.name.replace(".", "_").replace("-", "_") for i in fusions}
    kernels = {kname[i.name]: [10.0 * (k + 1), 4] for k, i in enumerate(fusions)}
    kernels["kernel_mosaic_gpu_kernel"] = [3.0, 4]
    prof = tmp_path / "p.json"
    prof.write_text(json.dumps({"configs": {"w4a16": {"cycles": 2, "kernels": kernels}}}))
    out = tmp_path / "s.md"
    hlo_summary.main(["--hlo", str(hlo), "--profile", str(prof), "--out", str(out)])
    md = out.read_text()
    line = f"test_hlo_summary.py:{_line_of('the line the body')}"
    src_rows = [r for r in md.split("Device time per source line")[1].splitlines()
                if r.startswith("| ") and not r.startswith("| source")]
    total = sum(us for us, _ in kernels.values()) / 2  # per cycle, every kernel on some line
    assert abs(sum(float(r.split("|")[2]) for r in src_rows) - total) < 0.1
    assert float(next(r for r in src_rows if line in r).split("|")[2]) > 0
    assert "not an HLO instruction" in md
    biggest = max(fusions, key=lambda i: kernels[kname[i.name]][0])
    row = next(r for r in md.splitlines() if f"`{kname[biggest.name]}`" in r)
    assert "fusion" in row and line in row
    assert float(row.split("|")[2]) == kernels[kname[biggest.name]][0] / 2


def test_rejects_text_without_hlo(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("not hlo\n")
    try:
        hlo_summary.main(["--hlo", str(p)])
    except SystemExit as e:
        assert "no HLO computations" in str(e)
    else:
        raise AssertionError("no error for a file without HLO")


def test_gpu_kernel_names_join_dotted_instructions():
    """XLA:GPU's profiler names the kernel of `%loop_pad_fusion.127` `loop_pad_fusion_127`."""
    text = """HloModule m

%fused_pad.127 (p0: bf16[1,4096]) -> bf16[8,4096] {
  %p0 = bf16[1,4096]{1,0} parameter(0)
  %c = bf16[] constant(0)
  ROOT %pad.1 = bf16[8,4096]{1,0} pad(%p0, %c), padding=0_7x0_0
}

ENTRY %main (a: bf16[1,4096]) -> bf16[8,4096] {
  %a = bf16[1,4096]{1,0} parameter(0)
  ROOT %loop_pad_fusion.127 = bf16[8,4096]{1,0} fusion(%a), kind=kLoop, calls=%fused_pad.127
}
"""
    mod = hlo_summary.Module(text)
    rows, _ = hlo_summary.profile_table(mod, {"loop_pad_fusion_127": [6.0, 3]}, 3.0, 10)
    row = next(r for r in rows if "loop_pad_fusion_127" in r)
    assert "fusion kLoop [pad]" in row and "bf16[8,4096]" in row and "not an HLO" not in row
