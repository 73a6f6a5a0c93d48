"""experiments/profile_cycle.py: the trace reader sums kernel time on the CUDA stream rows only
(the profiler's "XLA Ops" rows repeat the same time by HLO op), and on CPU the XLA thunks."""
import gzip
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))

import profile_cycle  # noqa: E402


def _write(tmp_path, events):
    d = tmp_path / "plugins" / "profile" / "run1"
    d.mkdir(parents=True)
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    return str(tmp_path)


def _meta(pid, tid, pname, tname):
    return [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": pname}},
            {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": tname}}]


def test_gpu_trace_counts_stream_kernels_once(tmp_path):
    ev = (_meta(1, 10, "/device:GPU:0", "Stream #7(Compute)") + _meta(1, 11, "/device:GPU:0", "XLA Ops")
          + _meta(2, 20, "/host:CPU", "python"))
    ev += [{"ph": "X", "pid": 1, "tid": 10, "name": "w4a16_gemm", "ts": 0, "dur": 5.0},
           {"ph": "X", "pid": 1, "tid": 10, "name": "w4a16_gemm", "ts": 9, "dur": 7.0},
           {"ph": "X", "pid": 1, "tid": 10, "name": "fusion.3", "ts": 20, "dur": 2.0},
           {"ph": "X", "pid": 1, "tid": 11, "name": "custom-call.1", "ts": 0, "dur": 12.0},
           {"ph": "X", "pid": 2, "tid": 20, "name": "generate", "ts": 0, "dur": 100.0}]
    times, kind = profile_cycle.kernel_times(_write(tmp_path, ev))
    assert kind == "gpu"
    assert times == {"w4a16_gemm": [12.0, 2], "fusion.3": [2.0, 1]}


def test_idle_time_is_the_span_minus_the_union_of_kernels(tmp_path):
    ev = _meta(1, 10, "/device:GPU:0", "Stream #7(Compute)") + _meta(1, 12, "/device:GPU:0", "Stream #8")
    ev += [{"ph": "X", "pid": 1, "tid": 10, "name": "a", "ts": 0, "dur": 10.0},
           {"ph": "X", "pid": 1, "tid": 12, "name": "b", "ts": 5, "dur": 10.0},    # overlaps a
           {"ph": "X", "pid": 1, "tid": 10, "name": "c", "ts": 20, "dur": 5.0},    # 5 us gap
           {"ph": "X", "pid": 1, "tid": 10, "name": "d", "ts": 100, "dur": 1.0},   # 75 us gap
           {"ph": "X", "pid": 1, "tid": 10, "name": "e", "ts": 100.5, "dur": 0.2}]  # inside d
    idle = profile_cycle.idle_time(_write(tmp_path, ev))
    assert idle == dict(span_us=101.0, busy_us=21.0, idle_us=80.0, gaps=1, gap_us=75.0)


def test_cpu_trace_counts_xla_thunks(tmp_path):
    ev = _meta(1, 10, "/host:CPU", "tf_XLAEigen/123") + _meta(1, 11, "/host:CPU", "python")
    ev += [{"ph": "X", "pid": 1, "tid": 10, "name": "dot.1", "ts": 0, "dur": 3.0},
           {"ph": "X", "pid": 1, "tid": 10, "name": "ThunkExecutor::Execute", "ts": 0, "dur": 9.0},
           {"ph": "X", "pid": 1, "tid": 11, "name": "jit_generate", "ts": 0, "dur": 50.0}]
    times, kind = profile_cycle.kernel_times(_write(tmp_path, ev))
    assert kind == "host" and times == {"dot.1": [3.0, 1]}


def test_auto_cost_table_makes_the_requested_gamma_pay_most():
    import jax.numpy as jnp
    from qspec_jax.speculative import choose_gamma
    kw = profile_cycle.config_kwargs("qspec-auto3", 4)
    costs = jnp.asarray(kw["cycle_costs"], jnp.float32)
    for a in (0.0, 0.3, 0.9, 1.0):
        assert int(choose_gamma(costs, jnp.float32(a))) == 3


def test_config_names():
    assert profile_cycle.config_kwargs("w4a8", 3) == dict(mode="w4a8")
    assert profile_cycle.config_kwargs("qspec5", 7) == dict(mode="qspec", draft="w4a8", gamma=5)
    with pytest.raises(ValueError, match="unknown configuration"):
        profile_cycle.config_kwargs("w8a8", 3)


def test_main_records_rotate_and_cache_write(tmp_path, monkeypatch):
    """One CPU run of the script on a tiny random model: --rotate and --cache-write reach the
    model and the module setting, and the JSON meta and the Markdown command record them."""
    import json

    from pallas_kernels import w4_mgpu
    from qspec_jax import model as model_module
    monkeypatch.setattr(model_module, "CACHE_WRITE", "layer")  # restored after the test
    from qspec_jax import kernel_dispatch
    monkeypatch.setattr(w4_mgpu, "X_PAD", "xla")
    monkeypatch.setattr(kernel_dispatch, "RESIDUAL_NORM", False)
    out = tmp_path / "p"
    profile_cycle.main(["--model", "tiny", "--batch", "1", "--prompt-len", "4", "--new-tokens", "3",
                        "--configs", "w4a16,w4a8", "--kernels", "xla", "--rotate",
                        "--cache-write", "step", "--mgpu-x-pad", "tma", "--residual-norm", "on",
                        "--out", str(out)])
    rec = json.load(open(out / "profile_tiny_b1.json"))
    meta = rec["meta"]
    assert set(rec["configs"]) == {"w4a16", "w4a8"}  # plain decoding in the draft's mode too
    assert meta["rotate"] is True and meta["cache_write"] == "step"
    assert meta["mgpu_x_pad"] == "tma" and w4_mgpu.X_PAD == "tma"
    assert meta["residual_norm"] == "on" and kernel_dispatch.RESIDUAL_NORM
    md = open(out / "profile_tiny_b1.md").read()
    assert "--cache-write step --rotate --mgpu-x-pad tma --residual-norm on`" in md
