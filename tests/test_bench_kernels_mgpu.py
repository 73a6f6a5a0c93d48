"""CPU checks of the Mosaic GPU variants of experiments/bench_kernels.py (ours_mgpu_w4a16 /
ours_mgpu_w4a8: the model's small-M kernel in the issue-6 table). The kernel itself needs a
Hopper GPU (tests/gpu/test_w4_mgpu_gpu.py); here: the skip path, and the wiring (int4 [N, K]
weights, per-channel scales, per-token activation scales, the references the rows are checked
against) with the kernel's own jnp reference standing in for it."""
import jax
import pytest

import experiments.bench_kernels as bk
import pallas_kernels.w4_mgpu as w4_mgpu


def test_skipped_off_gpu_and_above_256_rows(tmp_path):
    jobs = bk.build_jobs([(256, 128)], [1, 256, 512], list(bk.MGPU_VARIANTS), lambda K: K, quick=True)
    assert sorted((j.variant, j.M) for j in jobs) == [  # (the kernel takes M <= w4_mgpu.MAX_M)
        ("ours_mgpu_w4a16", 1), ("ours_mgpu_w4a16", 256), ("ours_mgpu_w4a8", 1), ("ours_mgpu_w4a8", 256)]
    assert all(j.skip and "Hopper" in j.skip for j in jobs)
    bk.compile_all(jobs, 1)
    rows = bk.run_jobs(jobs, 2)
    assert all("skipped" in r and "error" not in r for r in rows)
    meta = dict(gpu="cpu", commit="x", jax=jax.__version__, date="d", timer="host")
    bk.write_md(tmp_path / "k.md", meta, rows, [], [(256, 128)])
    assert "| skip |" in (tmp_path / "k.md").read_text()


def test_group_scales_are_skipped(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    jobs = bk.build_jobs([(256, 128)], [4], ["ours_mgpu_w4a16"], lambda K: 128, quick=True)
    assert len(jobs) == 1 and "per-channel scales only" in jobs[0].skip


@pytest.mark.parametrize("variant", bk.MGPU_VARIANTS)
def test_wiring_against_the_model_layout_references(monkeypatch, variant):
    """With w4_mgpu.reference in place of the kernel, every row is checked against the model
    layout's reference (half-split int8 weights) and agrees within bf16 rounding; the row's
    bytes count int8 activations for w4a8 and its MMA peak is the int8 one."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(w4_mgpu, "w4_mgpu_matmul", w4_mgpu.reference)
    jobs = bk.build_jobs([(256, 128)], [1, 5, 16], [variant], lambda K: K, quick=True)
    assert len(jobs) == 3 and not any(j.skip for j in jobs)
    bk.compile_all(jobs, 1)
    rows = bk.run_jobs(jobs, 2)
    assert all("error" not in r for r in rows), rows
    assert all(r["rel_err"] < 1e-2 for r in rows), [r["rel_err"] for r in rows]
    int8 = variant.endswith("w4a8")
    assert bk.bytes_read(variant, 4, 256, 128, 256) - bk.weight_bytes(256, 128, 256) == 4 * 256 * (1 if int8 else 2)
