"""Training / evaluation data for the qspec-jax default model (issue 5).

Two sources, both deterministic:

* Multi-step arithmetic word problems (GSM8K-like, 2 to 6 solution steps), generated from a
  seed.  A problem is a question, then one line per step (``12 + 7 = 19``), then the fixed answer
  phrase ``The answer is 19.``.  Given numbers are below 100, every intermediate result is below
  1000; multiplications have a one-digit factor and divisions are exact with a one-digit divisor.
  The train and test splits use disjoint seed streams *and* a disjoint question space: a
  question belongs to the test split iff a hash of its text falls in the test bucket, and the
  train generator rejects those (so no held-out question is ever trained on).
* Python source of the interpreter's standard library, read at run time (never copied into the
  repository), split by a hash of the relative path into training files and held-out files for
  perplexity (the split of a given path is the same on every Python version).

The tokenizer is a byte-level BPE (``tokenizers``) with individual digits, special tokens
``<pad>`` (0), ``<s>`` (1), ``</s>`` (2); ``save_tokenizer`` writes ``tokenizer.json`` and
``tokenizer_config.json`` that ``transformers.AutoTokenizer.from_pretrained(dir)`` loads offline.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import sysconfig
from typing import Iterable, Iterator, Sequence

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = [PAD, BOS, EOS]  # ids 0, 1, 2
MIN_STEPS, MAX_STEPS = 2, 6
TEST_BUCKETS = 16  # a question is a test question iff its hash % TEST_BUCKETS == 0

# ----------------------------------------------------------------------------------------------
# Arithmetic word problems
# ----------------------------------------------------------------------------------------------

NAMES = [
    "Mia", "Noah", "Emma", "Liam", "Olivia", "Lucas", "Ava", "Ethan", "Sofia", "Mason",
    "Chloe", "Leo", "Zoe", "Jack", "Lily", "Owen", "Nora", "Sam", "Grace", "Ben",
    "Ella", "Omar", "Ruby", "Hugo", "Maya", "Ivan", "Lena", "Tom", "Anna", "Raj",
    "Yuki", "Carlos", "Fatima", "Pedro", "Ines", "Kofi", "Hana", "Max", "Julia", "Ali",
]
OBJECTS = [
    "apples", "marbles", "stickers", "books", "pencils", "cookies", "cards", "shells",
    "stamps", "coins", "beads", "candies", "toy cars", "crayons", "balloons", "eggs",
    "oranges", "buttons", "flowers", "rocks",
]
CONTAINERS = ["boxes", "bags", "jars", "baskets", "packs", "crates", "bowls", "trays"]
ITEMS = [  # things bought in the money template (singular, plural)
    ("notebook", "notebooks"), ("pen", "pens"), ("ticket", "tickets"), ("sandwich", "sandwiches"),
    ("toy", "toys"), ("plant", "plants"), ("cap", "caps"), ("puzzle", "puzzles"),
    ("mug", "mugs"), ("kite", "kites"),
]
PLACES = ["farm", "school", "library", "garden", "shop", "zoo", "camp", "museum"]
ANIMALS = ["sheep", "chickens", "ducks", "goats", "rabbits", "cows", "geese", "pigs"]

# Phrases for one-step events on the running quantity.  {p}: person, {q}: other person,
# {o}: object word, {n}: the given number, {c}: container word.
ITEM_PHRASES = {
    "+": ["{p} buys {n} more {o}.", "{q} gives {p} {n} {o}.", "{p} finds {n} more {o}.",
          "{p} gets {n} {o} as a gift.", "{p} collects {n} more {o}."],
    "-": ["{p} gives {n} {o} to {q}.", "{p} loses {n} {o}.", "{p} sells {n} {o}.",
          "{p} uses {n} of the {o}.", "{q} takes {n} {o} from {p}."],
    "*": ["{p} ends up with {n} times as many {o}.", "The number of {o} {p} has grows {n} times.",
          "{p} makes the pile of {o} {n} times as big."],
    "/": ["{p} splits the {o} into {n} equal piles and keeps one pile.",
          "{p} shares the {o} equally among {n} kids, {p} included, and keeps one share."],
}
MONEY_PHRASES = {
    "+": ["{p} earns {n} dollars.", "{q} gives {p} {n} dollars.", "{p} saves {n} more dollars.",
          "{p} finds {n} dollars."],
    "-": ["{p} spends {n} dollars on a {i}.", "{p} pays {n} dollars for a {i}.",
          "{p} gives {n} dollars to {q}."],
    "*": ["{p} invests the money and it becomes {n} times as much."],
    "/": ["{p} splits the money into {n} equal parts and keeps one part."],
}
FARM_PHRASES = {
    "+": ["{n} more {a} arrive at the {l}.", "The {l} buys {n} more {a}.",
          "{p} brings {n} {a} to the {l}."],
    "-": ["{n} {a} are sold.", "{p} takes {n} {a} away from the {l}.", "{n} {a} leave the {l}."],
    "*": ["After a year there are {n} times as many {a}."],
    "/": ["The {a} are divided equally among {n} pens, and {p} counts one pen."],
}


@dataclasses.dataclass(frozen=True)
class Problem:
    question: str
    steps: tuple[str, ...]
    answer: int

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    @property
    def prompt(self) -> str:
        """What the model is given (the tokenizer adds ``<s>``)."""
        return self.question + "\n"

    @property
    def solution(self) -> str:
        """The expected completion (without ``</s>``)."""
        return "\n".join(self.steps) + f"\nThe answer is {self.answer}."

    @property
    def text(self) -> str:
        return self.prompt + self.solution


_ANSWER_RE = re.compile(r"The answer is (-?\d+)")


def parse_answer(text: str) -> int | None:
    """The integer of the first ``The answer is N`` in ``text`` (None if there is none)."""
    m = _ANSWER_RE.search(text)
    return int(m.group(1)) if m else None


def score(completion: str, problem: Problem) -> bool:
    """Exact match of the final answer of a completion (the text generated after the prompt)."""
    return parse_answer(completion) == problem.answer


def is_test_question(question: str) -> bool:
    h = hashlib.blake2b(question.encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % TEST_BUCKETS == 0


def _op_line(a: int, op: str, b: int) -> tuple[str, int]:
    r = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    return f"{a} {op} {b} = {r}", r


def _choose_op(rng: random.Random, v: int) -> tuple[str, int] | None:
    """A (op, operand) applicable to the running value v keeping 1 <= result < 1000."""
    cands = []
    if v <= 989:
        cands += ["+"] * 3
    if v >= 3:
        cands += ["-"] * 3
    if 2 <= v <= 99:
        cands += ["*"] * 2
    divs = [k for k in range(2, 10) if v % k == 0 and v // k >= 1 and v <= 999]
    if divs:
        cands += ["/"] * 2
    if not cands:
        return None
    op = rng.choice(cands)
    if op == "+":
        return op, rng.randint(2, min(99, 999 - v))
    if op == "-":
        return op, rng.randint(2, min(99, v - 1))
    if op == "*":
        return op, rng.randint(2, min(9, 999 // v))
    return op, rng.choice(divs)


def make_problem(rng: random.Random, n_steps: int | None = None) -> Problem:
    """One problem with ``n_steps`` solution lines (uniform in [2, 6] when None)."""
    if n_steps is None:
        n_steps = rng.randint(MIN_STEPS, MAX_STEPS)
    kind = rng.choice(["items", "items", "money", "farm"])
    p, q = rng.sample(NAMES, 2)
    sent: list[str] = []
    steps: list[str] = []
    if kind == "items":
        o = rng.choice(OBJECTS)
        fill = dict(p=p, q=q, o=o)
        phrases = ITEM_PHRASES
        if rng.random() < 0.4:  # groups start: one multiplication step
            a, b = rng.randint(2, 9), rng.randint(3, 99)
            c = rng.choice(CONTAINERS)
            sent.append(f"{p} has {a} {c} with {b} {o} in each.")
            line, v = _op_line(a, "*", b)
            steps.append(line)
        else:
            v = rng.randint(5, 99)
            sent.append(f"{p} has {v} {o}.")
        final = f"How many {o} does {p} have now?"
    elif kind == "money":
        i_s, i_p = rng.choice(ITEMS)
        fill = dict(p=p, q=q, i=i_s)
        phrases = MONEY_PHRASES
        v = rng.randint(10, 99)
        sent.append(f"{p} has {v} dollars.")
        final = f"How many dollars does {p} have now?"
    else:
        a_ = rng.choice(ANIMALS)
        l_ = rng.choice(PLACES)
        fill = dict(p=p, q=q, a=a_, l=l_)
        phrases = FARM_PHRASES
        if rng.random() < 0.4:
            a, b = rng.randint(2, 9), rng.randint(3, 99)
            sent.append(f"A {l_} has {a} fields with {b} {a_} in each.")
            line, v = _op_line(a, "*", b)
            steps.append(line)
        else:
            v = rng.randint(5, 99)
            sent.append(f"A {l_} has {v} {a_}.")
        final = f"How many {a_} are there now?"
    while len(steps) < n_steps:
        left = n_steps - len(steps)
        # two-step event of the money template: buy k items at a price each, pay the total
        if kind == "money" and left >= 2 and v >= 4 and rng.random() < 0.35:
            k = rng.randint(2, 9)
            hi = min(30, v // k)
            if hi >= 2:
                price = rng.randint(2, hi)
                line1, cost = _op_line(k, "*", price)
                line2, v = _op_line(v, "-", cost)
                steps += [line1, line2]
                sent.append(f"{p} buys {k} {ITEMS_PLURAL[fill['i']]} "
                            f"for {price} dollars each.")
                continue
        choice = _choose_op(rng, v)
        if choice is None:  # cannot happen for 1 <= v <= 999, kept for safety
            break
        op, n = choice
        tmpl = rng.choice(phrases[op])
        sent.append(tmpl.format(n=n, **fill))
        line, v = _op_line(v, op, n)
        steps.append(line)
    question = " ".join(sent + [final])
    return Problem(question=question, steps=tuple(steps), answer=v)


ITEMS_PLURAL = dict(ITEMS)


def _rng(split: str, seed: int, index: int) -> random.Random:
    return random.Random(f"qspec-arith/{split}/{seed}/{index}")


def problems(split: str, n: int, seed: int = 0, start: int = 0,
             n_steps: int | None = None) -> list[Problem]:
    """``n`` problems of ``split`` ("train" or "test"), problem indices [start, start + n).

    Deterministic: problem i of (split, seed) depends only on (split, seed, i, n_steps).  Train
    and test questions never coincide (see ``is_test_question``).
    """
    if split not in ("train", "test"):
        raise ValueError(split)
    out = []
    for i in range(start, start + n):
        rng = _rng(split if n_steps is None else f"{split}{n_steps}", seed, i)
        while True:
            pr = make_problem(rng, n_steps)
            if is_test_question(pr.question) == (split == "test"):
                break
        out.append(pr)
    return out


def test_set(n_per_steps: int = 100, seed: int = 0) -> list[Problem]:
    """The held-out evaluation set: ``n_per_steps`` problems for each of 2..6 steps."""
    out = []
    for k in range(MIN_STEPS, MAX_STEPS + 1):
        out += problems("test", n_per_steps, seed=seed, n_steps=k)
    return out


# ----------------------------------------------------------------------------------------------
# Python standard-library source
# ----------------------------------------------------------------------------------------------

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__", "encodings", "pydoc_data"}
_TEST_DIRS = {"test", "tests", "idle_test"}
HELDOUT_BUCKETS = 16  # a library (non-test) file is held out iff hash(relpath) % 16 == 0
MAX_FILE_BYTES = 400_000


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str | None = None) -> list[str]:
    """Sorted relative paths of the eligible ``.py`` files of the standard library."""
    root = root or stdlib_dir()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        parts = [] if rel_dir == "." else rel_dir.split(os.sep)
        if any(p in _EXCLUDED_DIRS or p.startswith("config-") for p in parts):
            dirnames[:] = []
            continue
        for f in filenames:
            if not f.endswith(".py"):
                continue
            full = os.path.join(dirpath, f)
            try:
                if os.path.getsize(full) > MAX_FILE_BYTES or not os.path.isfile(full):
                    continue
            except OSError:
                continue
            out.append("/".join(parts + [f]))
    return sorted(out)


def is_test_file(relpath: str) -> bool:
    parts = relpath.split("/")
    return parts[-1].startswith("test_") or any(p in _TEST_DIRS for p in parts[:-1])


def is_heldout_file(relpath: str) -> bool:
    """Held-out files are library (non-test) files in the held-out hash bucket."""
    if is_test_file(relpath):
        return False
    h = hashlib.blake2b(relpath.encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % HELDOUT_BUCKETS == 0


def code_split(root: str | None = None) -> tuple[list[str], list[str]]:
    """(train files, held-out files), relative paths, sorted.

    Training files include the standard library's own test suite; held-out files never do."""
    files = stdlib_files(root)
    held = [f for f in files if is_heldout_file(f)]
    train = [f for f in files if not is_heldout_file(f)]
    return train, held


def read_code(relpaths: Iterable[str], root: str | None = None) -> Iterator[str]:
    root = root or stdlib_dir()
    for rel in relpaths:
        with open(os.path.join(root, *rel.split("/")), encoding="utf-8", errors="replace") as f:
            yield f.read()


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """Byte-level BPE with individual digits; ``<pad>``=0, ``<s>``=1, ``</s>``=2.

    The post-processor prepends ``<s>`` (``add_special_tokens=True``), like Llama tokenizers.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)])
    assert tok.token_to_id(PAD) == 0 and tok.token_to_id(BOS) == 1 and tok.token_to_id(EOS) == 2
    return tok


def save_tokenizer(tok, out_dir: str, model_max_length: int = 2048) -> None:
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None,
        "add_bos_token": True, "add_eos_token": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, f, indent=2)


def load_tokenizer(path: str):
    """A ``tokenizers.Tokenizer`` from a directory holding tokenizer.json (or the file)."""
    from tokenizers import Tokenizer
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    return Tokenizer.from_file(path)


def tokenizer_corpus(n_problems: int = 30000, code_bytes: int = 12_000_000,
                     seed: int = 0) -> Iterator[str]:
    """The text the tokenizer is trained on: train problems and train-split stdlib files."""
    for pr in problems("train", n_problems, seed=seed + 10_000):
        yield pr.text
    train_files, _ = code_split()
    total = 0
    for text in read_code(train_files):
        yield text
        total += len(text)
        if total >= code_bytes:
            break


def encode_docs(tok, texts: Sequence[str]) -> list[list[int]]:
    """``<s> text </s>`` token ids for each text."""
    eos = tok.token_to_id(EOS)
    return [e.ids + [eos] for e in tok.encode_batch(list(texts), add_special_tokens=True)]
