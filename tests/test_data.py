"""Data generators, splits, scoring and the tokenizer of the default model (experiments/data.py)."""
import os
import re

import pytest

from experiments import data as D


def test_problems_are_deterministic():
    a = D.problems("train", 50, seed=3)
    b = D.problems("train", 50, seed=3)
    assert a == b
    assert D.problems("train", 10, seed=3, start=20) == a[20:30]
    assert D.problems("train", 50, seed=4) != a
    assert D.test_set(5) == D.test_set(5)


def test_problem_format_and_arithmetic():
    line = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)$")
    for p in D.problems("train", 300) + D.test_set(20):
        assert D.MIN_STEPS <= p.n_steps <= D.MAX_STEPS
        assert p.text == p.prompt + p.solution
        assert p.prompt.endswith("?\n") and "\n" not in p.prompt[:-1]
        assert p.solution.endswith(f"The answer is {p.answer}.")
        prev = None
        for s in p.steps:
            a, op, b, r = line.match(s).groups()
            a, b, r = int(a), int(b), int(r)
            assert r == {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
            if op == "/":
                assert a % b == 0 and 2 <= b <= 9
            if op == "*":
                assert min(a, b) <= 9
            assert 0 <= r < 1000 and b < 1000
            prev = r
        assert prev == p.answer


def test_steps_and_ops_cover_the_range():
    ps = D.problems("train", 2000)
    assert {p.n_steps for p in ps} == set(range(2, 7))
    ops = {s.split()[1] for p in ps for s in p.steps}
    assert ops == {"+", "-", "*", "/"}
    test = D.test_set(10)
    assert [p.n_steps for p in test] == [k for k in range(2, 7) for _ in range(10)]


def test_train_and_test_questions_are_disjoint():
    train = {p.question for p in D.problems("train", 5000)}
    test = D.test_set(200)
    assert all(D.is_test_question(p.question) for p in test)
    assert not any(D.is_test_question(q) for q in train)
    assert not train & {p.question for p in test}
    assert len({p.question for p in test}) == len(test)


def test_parse_answer_and_score():
    p = D.test_set(1)[0]
    assert D.parse_answer(p.solution) == p.answer
    assert D.score(p.solution, p)
    assert D.score(p.solution + "\nThe answer is 12345.", p)  # the first answer counts
    assert not D.score(p.solution.replace(f"is {p.answer}.", f"is {p.answer + 1}."), p)
    assert not D.score("no answer here", p)
    assert D.parse_answer("x\nThe answer is -3.") == -3
    assert D.parse_answer("The answer is") is None


def test_stdlib_split():
    train, held = D.code_split()
    assert train and held
    assert not set(train) & set(held)
    assert train == sorted(train) and held == sorted(held)
    assert not any(D.is_test_file(f) for f in held)
    assert all(f.endswith(".py") for f in train + held)
    assert len(held) < len(train) / 5
    text = next(D.read_code(held[:1]))
    assert isinstance(text, str) and text


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    texts = [p.text for p in D.problems("train", 300)]
    train, _ = D.code_split()
    texts += list(D.read_code(train[:5]))
    tok = D.train_tokenizer(texts, vocab_size=400)
    out = tmp_path_factory.mktemp("tok")
    D.save_tokenizer(tok, str(out))
    return tok, str(out)


def test_tokenizer_round_trip(tiny_tokenizer):
    tok, path = tiny_tokenizer
    p = D.test_set(1)[0]
    code = "def f(x):\n    return x ** 2  # ünïcode ✓\n\tpass\n"
    for text in (p.text, code):
        enc = tok.encode(text)
        assert enc.ids[0] == 1  # <s>
        assert tok.decode(enc.ids, skip_special_tokens=True) == text
    # digits are single tokens
    digits = [t for t in tok.encode("123 + 4567 = 4690").tokens if any(c.isdigit() for c in t)]
    assert all(len(t) == 1 for t in digits)
    assert D.encode_docs(tok, ["a b"])[0][-1] == 2  # </s>
    assert D.load_tokenizer(path).encode(code).ids == tok.encode(code).ids


def test_tokenizer_loads_with_transformers(tiny_tokenizer):
    transformers = pytest.importorskip("transformers")
    tok, path = tiny_tokenizer
    hf = transformers.AutoTokenizer.from_pretrained(path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    text = D.test_set(1)[0].text
    ids = hf(text)["input_ids"]
    assert ids == tok.encode(text).ids
    assert hf.decode(ids, skip_special_tokens=True) == text


def test_default_tokenizer_present():
    path = os.path.join(os.path.dirname(D.__file__), "..", "qspec_jax", "default_model")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        pytest.skip("default model tokenizer not built")
    tok = D.load_tokenizer(path)
    assert tok.get_vocab_size() == 4096
    assert [tok.token_to_id(t) for t in D.SPECIAL_TOKENS] == [0, 1, 2]
