"""Smoke test of experiments/draft_acceptance.py on the default model (CPU)."""

import json

import experiments.draft_acceptance as DA
from experiments.draft_acceptance import main


def test_draft_acceptance_smoke(tmp_path, monkeypatch):
    # Kept cheap on CPU (this test used to take ~40 s, nearly all XLA compilation):
    # - the layer search on the default model keeps every layer (no drop improves its predicted
    #   speedup), so the output is the same when the search stops after scoring the full model;
    #   that skips compiling one draft forward per candidate subset (7 programs). The search
    #   itself, candidates included, is tested in test_speculative.py (test_draft_layer_search);
    #   here it still runs through the script's call and its history is reported.
    # - float32: XLA:CPU compiles the bfloat16 programs about 2x slower. QSpec exactness in
    #   bfloat16 on the default model is checked by test_quality.py.
    real = DA.select_draft_layers

    def first_step_only(model, tokens, draft="w4a8", **kw):
        kw["min_layers"] = model.cfg.num_hidden_layers
        return real(model, tokens, draft, **kw)

    monkeypatch.setattr(DA, "select_draft_layers", first_step_only)
    prefix = str(tmp_path / "acc")
    assert main(["--contexts", "64", "--windows", "2:8", "--prompts", "2", "--new-tokens", "8",
                 "--dtype", "float32", "--timed", "--timed-repeats", "1", "--commit", "abc123",
                 "--out-prefix", prefix]) == 0
    result = json.load(open(prefix + ".json"))
    names = [r["draft_config"] for r in result["rows"]]
    assert names[0] == "full" and names[1] == "window 2:8" and names[2].startswith("layers ")
    assert all(r["equals_w4a16"] for r in result["rows"])  # cheaper drafts never change output
    full, windowed = result["rows"][0], result["rows"][1]
    assert windowed["acceptance_rate"] <= full["acceptance_rate"]
    md = open(prefix + ".md").read()
    assert "| 64 | window 2:8 |" in md and "`abc123`" in md and "--timed " in md
    for r in result["rows"]:
        assert r["identical_sequences"] == 2 and r["first_difference"] == [None, None]
        # timed: paired differences of compiled runs (NaN only below the timer's noise)
        assert r["w4a16_decode_s"] > 0 or r["w4a16_decode_s"] != r["w4a16_decode_s"]
        assert "measured_speedup" in r
        assert r["divergence_gap"] == [None, None]
    # The gap at a divergence: w4a16's own argmax against another token is a positive share of
    # the largest logit (0 only for the argmax itself).
    import qspec_jax as qj
    model = qj.load(dtype="float32", quant="w4", method="rtn")
    prompt = model.tokenizer("def f(x):")["input_ids"]
    ref = qj.generate(model, [prompt], max_new_tokens=3, mode="w4a16").tokens[0]
    assert DA.divergence_gap(model, prompt, ref, 2, ref[2], "auto") == 0.0
    gap = DA.divergence_gap(model, prompt, ref, 2, (ref[2] + 1) % model.cfg.vocab_size, "auto")
    assert 0.0 < gap <= 2.0
    assert DA.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert DA.first_difference([1, 2], [1, 2, 3]) == 2 and DA.first_difference([4], [4]) is None
