"""Command-line front ends: qspec-convert, qspec-generate, qspec-report."""

from __future__ import annotations

import io
import json
import re

import pytest

from conversion.cli import main as convert_main
from qspec_jax.cli import main as generate_main
from qspec_jax.report import main as report_main


def last_json_line(err: str) -> dict:
    """The statistics line; progress bars share stderr and end their lines with \\r."""
    return json.loads(re.split(r"[\r\n]", err.strip())[-1])


def test_convert_then_generate_qspec(hf_dirs, tmp_path, capsys):
    src = hf_dirs["llama"][0]
    out = tmp_path / "q"
    assert convert_main([src, str(out), "--quant", "w4", "--method", "rtn", "--dtype", "float32"]) == 0
    capsys.readouterr()
    # No tokenizer in the tiny model: prompts as text fail clearly...
    assert generate_main(["--model", str(out), "--prompt", "hi"]) == 2
    assert "no tokenizer files" in capsys.readouterr().err
    # ...and errors in arguments are reported without a traceback.
    assert generate_main(["--model", str(out), "--prompt", "hi", "--gamma", "0"]) == 2
    assert "gamma" in capsys.readouterr().err
    # --draft-window: two integers or 'auto' (which needs --gamma auto, the default).
    assert generate_main(["--model", str(out), "--prompt", "hi", "--gamma", "3",
                          "--draft-window", "auto"]) == 2
    assert "draft_window='auto'" in capsys.readouterr().err
    for bad in (["4"], ["4", "x"], ["auto", "3"]):
        with pytest.raises(SystemExit) as e:
            generate_main(["--model", str(out), "--prompt", "hi", "--draft-window", *bad])
        assert e.value.code == 2 and "--draft-window takes SINK WINDOW" in capsys.readouterr().err


def test_generate_cli_with_tokenizer(tmp_path, capsys, monkeypatch):
    """A tiny model with a real (locally trained) tokenizer, end to end through the CLI."""
    from hf_models import save_hf_model_with_tokenizer

    path = tmp_path / "m"
    save_hf_model_with_tokenizer(path)
    argv = ["--model", str(path), "--prompt", "hello", "--prompt", "def f", "--max-new-tokens", "5",
            "--dtype", "float32", "--stats"]
    assert generate_main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("hello")
    stats = last_json_line(captured.err)
    assert stats["batch"] == 2 and stats["new_tokens"] <= 10
    assert generate_main(argv[:-1] + ["--quant", "w4", "--mode", "qspec", "--gamma", "2"]) == 0
    qspec_out = capsys.readouterr()
    stats = last_json_line(qspec_out.err)
    assert 0.0 <= stats["acceptance_rate"] <= 1.0
    # The int4 [N, K] layout (Mosaic GPU kernels; the XLA path here) gives the same text.
    assert generate_main(argv[:-1] + ["--quant", "w4", "--mode", "qspec", "--gamma", "2",
                                      "--weight-layout", "nk"]) == 0
    assert capsys.readouterr().out == qspec_out.out
    assert generate_main(argv + ["--weight-layout", "nk"]) == 2
    assert "--weight-layout nk needs a quantized model" in capsys.readouterr().err
    # Memory options reach generate; bad values are reported without a traceback.
    assert generate_main(argv + ["--prefill-chunk", "0"]) == 2
    assert "prefill_chunk must be a positive integer" in capsys.readouterr().err
    assert generate_main(argv + ["--max-len", "2"]) == 2
    assert "raise max_len or shorten the request" in capsys.readouterr().err
    assert generate_main(argv + ["--stop-token-id", "100000"]) == 2  # --stop-token-id reaches generate
    assert "stop_token_ids must be token ids in [0, " in capsys.readouterr().err
    assert generate_main(argv + ["--max-len", "128", "--prefill-chunk", "1"]) == 0
    stats = last_json_line(capsys.readouterr().err)
    assert stats["cache_len"] == 128 and stats["prefill_chunk"] == 1
    # --prompt-file: a file's whole text is one prompt (after the --prompt ones), '-' is stdin;
    # same continuation as the same text through --prompt.
    pf = tmp_path / "p.txt"
    pf.write_text("def f\n", encoding="utf-8")
    short = ["--model", str(path), "--max-new-tokens", "5", "--dtype", "float32"]
    assert generate_main(short + ["--prompt", "def f\n"]) == 0
    want = capsys.readouterr().out
    assert generate_main(short + ["--prompt-file", str(pf)]) == 0
    assert capsys.readouterr().out == want
    monkeypatch.setattr("sys.stdin", io.StringIO("def f\n"))
    assert generate_main(short + ["--prompt", "hello", "--prompt-file", "-"]) == 0
    out = capsys.readouterr()
    assert last_json_line(out.err)["batch"] == 2 and out.out.startswith("hello")
    assert want in out.out
    for bad, msg in ((["--prompt-file", str(tmp_path / "missing.txt")], "--prompt-file"),
                     ([], "give at least one prompt")):
        with pytest.raises(SystemExit) as e:
            generate_main(short + bad)
        assert e.value.code == 2 and msg in capsys.readouterr().err

    text = tmp_path / "t.txt"
    # ~210 tokens: 6 windows of 32, one batch per mode (one compilation each).
    text.write_text("hello world def f(x): return x + 1\n" * 6)
    assert report_main(["--model", str(path), "--quant", "w4", "--text", str(text), "--window", "32",
                        "--dtype", "float32"]) == 0
    table = capsys.readouterr().out
    assert "w4a16" in table and "w4a4" in table


def test_convert_cli_errors(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert convert_main([str(tmp_path / "m"), str(tmp_path / "o")]) == 2
    assert "unsupported model_type 'bert'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert convert_main([str(tmp_path / "missing"), str(tmp_path / "o")]) == 2


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def test_chat_conversations_use_the_chat_template(tmp_path, capsys):
    """A conversation (list of message dicts) is rendered with the tokenizer's chat template and
    its assistant opening, tokenized without a second BOS: the same tokens as the rendered text
    tokenized by hand. The CLI's --chat / --system build that conversation. Models without a
    template, and malformed messages, fail clearly."""
    from transformers import AutoTokenizer

    from hf_models import save_hf_model_with_tokenizer
    import qspec_jax as qj

    plain_path = save_hf_model_with_tokenizer(tmp_path / "base")
    path = save_hf_model_with_tokenizer(tmp_path / "chat")
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    model = qj.load(str(path), dtype="float32")
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    want = tok("<s>system: be brief\n<s>user: hello\nassistant:", add_special_tokens=False)["input_ids"]
    assert want.count(tok.bos_token_id) == 2  # the template's own BOS tokens, none added
    assert qj.chat_prompt_ids(model, conv) == want
    by_hand = qj.generate(model, [want], max_new_tokens=4)
    assert qj.generate(model, [conv], max_new_tokens=4).tokens == by_hand.tokens
    assert qj.generate(model, conv, max_new_tokens=4).tokens == by_hand.tokens  # one conversation
    with pytest.raises(ValueError, match="string 'role' and 'content'"):
        qj.generate(model, [[{"role": "user"}]], max_new_tokens=4)
    with pytest.raises(ValueError, match="no chat template"):
        qj.generate(qj.load(str(plain_path), dtype="float32"), [conv], max_new_tokens=4)
    # CLI: --chat --system gives the same continuation as the API.
    argv = ["--model", str(path), "--dtype", "float32", "--max-new-tokens", "4", "--prompt", "hello"]
    assert generate_main(argv + ["--chat", "--system", "be brief"]) == 0
    assert capsys.readouterr().out == f"hello\n{by_hand.text[0]}\n"
    assert generate_main(["--model", str(plain_path), "--dtype", "float32", "--prompt", "hi",
                          "--chat"]) == 2
    assert "no chat template" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        generate_main(argv + ["--system", "x"])
    assert e.value.code == 2 and "--system needs --chat" in capsys.readouterr().err
