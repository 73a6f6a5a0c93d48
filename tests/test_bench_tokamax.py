"""CPU checks of the tokamax_w4a16 peer in experiments/bench_kernels.py (issue 6).

tokamax's kernel needs an NVIDIA Hopper GPU (and Python >= 3.12, jax >= 0.11.1): here only the
skip path, the import fallbacks, and the weight layout/scale math handed to tokamax are checked.
"""
import importlib.util
import sys
import types

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import experiments.bench_kernels as bk


def test_skip_rows_not_errors(tmp_path):
    """On CPU the variant's rows say 'skipped: <reason>', and the report lists them."""
    bk._TOKAMAX.clear()
    jobs = bk.build_jobs([(256, 128)], [1, 4], ["tokamax_w4a16"], lambda K: K, quick=True)
    assert len(jobs) == 2 and all(j.skip and j.skip.startswith("skipped: ") for j in jobs)
    bk.compile_all(jobs, 1)
    rows = bk.run_jobs(jobs, 2)
    assert all("skipped" in r and "error" not in r and "us_median" not in r for r in rows)
    assert "Mosaic GPU" in rows[0]["skipped"]
    md = tmp_path / "k.md"
    meta = dict(gpu="cpu", commit="x", jax=jax.__version__, date="d", timer="host")
    bk.write_md(md, meta, rows, [], [(256, 128)])
    text = md.read_text()
    assert "| skip |" in text and "## Skipped" in text


def test_not_implemented_at_trace_is_skip():
    """A shape the peer refuses with NotImplementedError is a skip; for our kernels, an error."""
    def refuse(x):
        raise NotImplementedError("n=96 must be divisible by 2 * block_n=128")
    x = jnp.zeros((4, 8), jnp.float32)
    j = bk.Job("tokamax_w4a16", 8, 96, 4, 8, None, refuse, (x,))
    bk._compile(j)
    assert j.error is None and j.skip.startswith("skipped: NotImplementedError: n=96")
    j = bk.Job("ours_w4a16", 8, 96, 4, 8, None, refuse, (x,))
    bk._compile(j)
    assert j.skip is None and j.error.startswith("NotImplementedError")


@pytest.mark.parametrize("G", [128, 512])
def test_layout_matches_reference(G):
    """The [1, N, K] int4 + bf16-scale layout, multiplied out as the sm90 kernel does (int4 ->
    bf16, times the bf16 scale, bf16 MMA with f32 accumulation), is W4A16 within bf16 error."""
    K, N, M = 512, 256, 16
    (qw, s), = bk.make_weights(jax.random.key(0), K, N, G, 1)
    q, sc = bk.tokamax_layout(qw, s)
    assert q.shape == (1, N, K) and q.dtype == jnp.int4
    assert sc.shape == (1, N, K // G) and sc.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(q[0].T.astype(jnp.int8)),
                                  np.asarray(bk.unpack_int4(qw)))
    x = bk.make_x(jax.random.key(1), M, K)
    w = q[0].astype(jnp.bfloat16) * jnp.repeat(sc[0], G, axis=1)
    y = jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    r = bk.w4a16_matmul_reference(x, qw, s)
    y, r = np.asarray(y, np.float32), np.asarray(r, np.float32)
    assert np.linalg.norm(y - r) / np.linalg.norm(r) < 1e-2


def test_xprof_stub(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # "not installed"
    for n in ("xprof", "xprof.cli", "xprof.cli.tools"):
        monkeypatch.delitem(sys.modules, n, raising=False)
    bk._stub_xprof()
    from xprof.cli.tools import get_kernel_stats_tool  # noqa: F401
    with pytest.raises(RuntimeError):
        get_kernel_stats_tool()
    for n in ("xprof", "xprof.cli", "xprof.cli.tools"):
        monkeypatch.delitem(sys.modules, n, raising=False)


def test_import_fallback_without_package_init(tmp_path, monkeypatch):
    """If `import tokamax` fails (its __init__ imports every op), the ragged-dot module is
    imported under a bare package module instead."""
    root = tmp_path / "tokamax"
    rd = root / "_src" / "ops" / "ragged_dot"
    rd.mkdir(parents=True)
    (root / "__init__.py").write_text("import jax_triton_missing_for_this_test\n")
    for d in (root / "_src", root / "_src" / "ops", rd):
        (d / "__init__.py").touch()
    (rd / "pallas_mosaic_gpu.py").write_text("class PallasMosaicGpuRaggedDot: pass\nConfig = dict\n")
    (rd / "base.py").write_text("TRANS_RHS_RAGGED_DOT_DIM_NUMS = 'trans'\n")
    (rd / "pallas_mosaic_gpu_common.py").write_text("MatmulDimension = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = {n: m for n, m in sys.modules.items() if n == "tokamax" or n.startswith("tokamax.")}
    for n in saved:
        del sys.modules[n]
    try:
        mod, base, common, how = bk._import_tokamax_ragged_dot()
        assert mod.PallasMosaicGpuRaggedDot and base.TRANS_RHS_RAGGED_DOT_DIM_NUMS == "trans"
        assert how.startswith("bare package (import tokamax failed: ModuleNotFoundError")
        assert isinstance(sys.modules["tokamax"], types.ModuleType)
    finally:
        for n in [n for n in sys.modules if n == "tokamax" or n.startswith("tokamax.")]:
            del sys.modules[n]
        sys.modules.update(saved)
