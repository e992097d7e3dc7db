"""Tests for the toy world's task generators, verifier, grader and tokenizer.

Run: python -m pytest tests/test_toy_task.py -q      (CPU, a few seconds)
"""

import random
import time

import pytest
from transformers import AutoTokenizer

from toy.task import (CHARSET, DOMAINS, STRATEGIES, detect_strategy, extract_answer,
                      format_problem, generate, grade, make_problem, parse_problem, solve,
                      verify_solution, write_jsonl)
from toy.tokenizer import EOS_ID, PAD_ID, build_tokenizer

KEYS = {"id", "problem", "solution", "answer", "domain", "source", "strategy"}


@pytest.fixture(scope="module")
def rows():
    """Every domain, every strategy, a spread of difficulties: about 700 rows."""
    out = []
    for domain in DOMAINS:
        out += generate(domain, 60, seed=0, strategies="all")
    for digits in (2, 3, 4, (2, 4)):
        out += generate("math", 30, seed=1, strategies="all", digits=digits)
    out += generate("code", 30, seed=1, strategies="all", length=(2, 7), max_value=99)
    out += generate("qa", 30, seed=1, strategies="all", facts=(2, 6), max_count=20)
    return out


# -----------------------------------------------------------------------------
# Generators

@pytest.mark.parametrize("domain", DOMAINS)
def test_generate_deterministic_and_seeded(domain):
    a = generate(domain, 50, seed=3)
    assert a == generate(domain, 50, seed=3)
    assert [r["problem"] for r in a] != [r["problem"] for r in generate(domain, 50, seed=4)]
    assert len(a) == 50 and len({r["problem"] for r in a}) == len({r["id"] for r in a}) == 50
    assert {r["strategy"] for r in a} == set(STRATEGIES[domain])  # one random strategy each


def test_rows_follow_schema(rows):
    for r in rows:
        assert set(r) == KEYS and r["id"].startswith(f"toy-{r['domain']}-") and r["source"] == "toy"
        assert r["strategy"] in STRATEGIES[r["domain"]]
        assert r["solution"].split("\n")[-1] == f"answer: {r['answer']}"
        assert set(r["problem"] + r["solution"]) <= set(CHARSET)


def test_problem_text_round_trips():
    rng = random.Random(0)
    for domain in DOMAINS:
        for _ in range(50):
            p = make_problem(domain, rng)
            assert parse_problem(format_problem(p), domain) == p


def test_exclude_makes_held_out_disjoint():
    train = generate("math", 500, seed=0, digits=2)
    test = generate("math", 200, seed=1, digits=2, exclude={r["problem"] for r in train})
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}


def test_solve_accepts_rows_and_params():
    p = {"domain": "math", "a": 47, "b": 38}
    row = {"problem": "47+38=?", "domain": "math"}
    assert solve(p, "column") == solve(row, "column") == "7+8=15 c1\n4+3+1=8 c0\nanswer: 85"
    assert solve(p, "round") == "38=40-2\n47+40=87\n87-2=85\nanswer: 85"
    assert solve(p, "split") == "47+30=77\n77+8=85\nanswer: 85"
    with pytest.raises(ValueError):
        solve(p, "pairwise")


def test_write_jsonl(tmp_path):
    import json
    rs = generate("qa", 5, seed=0)
    write_jsonl(rs, tmp_path / "qa.jsonl")
    assert [json.loads(line) for line in open(tmp_path / "qa.jsonl")] == rs

# -----------------------------------------------------------------------------
# Verifier: executes the trace, so it accepts all generated traces and rejects corrupted ones

def test_every_generated_solution_verifies(rows):
    bad = [r for r in rows if not verify_solution(r)]
    assert not bad, bad[:3]


def _corruptions(solution):
    """Every trace with one digit of one step line (not the answer line) changed."""
    lines = solution.split("\n")
    for i, line in enumerate(lines[:-1]):
        for j, ch in enumerate(line):
            if ch.isdigit():
                new = line[:j] + str((int(ch) + 1) % 10) + line[j + 1:]
                yield "\n".join(lines[:i] + [new] + lines[i + 1:])


def test_verifier_rejects_any_flipped_digit(rows):
    for r in rows:
        for bad in _corruptions(r["solution"]):
            assert not verify_solution({**r, "solution": bad}), bad


def test_verifier_rejects_wrong_answers_and_garbage():
    r = {"problem": "47+38=?", "domain": "math", "answer": "85"}
    assert verify_solution({**r, "solution": "7+8=15 c1\n4+3+1=8 c0\nanswer: 85"})
    # consistent arithmetic that adds the wrong digits
    assert not verify_solution({**r, "solution": "7+7=14 c1\n4+3+1=8 c0\nanswer: 84"})
    # right steps, wrong final line; right answer, missing steps
    assert not verify_solution({**r, "solution": "7+8=15 c1\n4+3+1=8 c0\nanswer: 86"})
    assert not verify_solution({**r, "solution": "answer: 85"})
    assert not verify_solution({**r, "solution": "47+38=85\nanswer: 85"})  # not the split strategy
    assert not verify_solution({**r, "answer": "86", "solution": "47+30=77\n77+8=85\nanswer: 85"})
    for junk in ("", None, "é\n\x00", "[" * 10_000, "7+8=15 c1\n" * 1000):
        assert not verify_solution({**r, "solution": junk})
    assert not verify_solution({"problem": "not a problem", "domain": "code", "solution": "s=1\nanswer: 1"})

# -----------------------------------------------------------------------------
# Strategy detection

def test_detect_strategy_recovers_generating_strategy(rows):
    for r in rows:
        assert detect_strategy(r["solution"]) == r["strategy"], r
    for junk in ("", None, "hello", "answer: 5", "\n\n", "x" * 100_000):
        assert detect_strategy(junk) is None

# -----------------------------------------------------------------------------
# Grader

@pytest.mark.parametrize("completion, answer, expected", [
    ("7+8=15 c1\n4+3+1=8 c0\nanswer: 85", "85", 1.0),
    ("answer: 85", "85", 1.0),
    ("answer:85  \n", "85", 1.0),             # whitespace around the answer is ignored
    ("  answer: 85\nsome trailing text", "85", 1.0),
    ("answer: 84\nanswer: 85", "85", 1.0),     # the last answer line counts
    ("answer: 85\nanswer: 84", "85", 0.0),
    ("answer: 86", "85", 0.0),
    ("answer: 085", "85", 0.0),
    ("the answer: 85", "85", 0.0),            # not at the start of a line
    ("Answer: 85", "85", 0.0),
    ("85", "85", 0.0),                        # no answer line
    ("", "85", 0.0),
    (None, "85", 0.0),
    ("answer: 85", None, 0.0),
    ("answer: ８５", "85", 0.0),               # full-width digits are not the answer
    ("答案\nanswer: 85 ✓", "85", 0.0),
    ("\x00\ud800answer: 85", "85", 0.0),
])
def test_grade(completion, answer, expected):
    assert grade(completion, answer) == expected


def test_extract_answer():
    assert extract_answer("a\nanswer:  12 \nb") == "12"
    assert extract_answer("no line") is None
    assert extract_answer(None) is None
    assert extract_answer(123) is None


def test_grade_is_fast_on_pathological_input():
    rng = random.Random(0)
    garbage = [
        "".join(rng.choice("answer: 0123\n\t") for _ in range(1_000_000)),
        "answer:" * 150_000,
        "a" * 1_000_000,
        "\n" * 1_000_000,
        "".join(chr(rng.randint(0x80, 0xD7FF)) for _ in range(200_000)),
    ]
    start = time.perf_counter()
    for g in garbage:
        assert grade(g, "85") in (0.0, 1.0)
        assert grade(g + "\nanswer: 85", "85") == 1.0
        detect_strategy(g)
    assert time.perf_counter() - start < 2.0

# -----------------------------------------------------------------------------
# Tokenizer

@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(d)
    return d


def test_tokenizer_loads_with_special_ids(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert (tok.pad_token, tok.pad_token_id) == ("<pad>", PAD_ID) == ("<pad>", 0)
    assert (tok.eos_token, tok.eos_token_id) == ("<eos>", EOS_ID) == ("<eos>", 1)
    assert len(tok) == len(CHARSET) + 3 < 64
    assert tok.encode("ab") == tok("ab")["input_ids"]  # no BOS / EOS added
    assert len(tok.encode("ab")) == 2


def test_tokenizer_round_trips_every_char(tok_dir, rows):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids = tok.encode(CHARSET)
    assert len(ids) == len(CHARSET) and len(set(ids)) == len(CHARSET)
    assert min(ids) > EOS_ID
    samples = [CHARSET, " ", "\n", "  a  \n\n b ", " , . ? \n", "answer: 85\n"]
    samples += [r["problem"] + "\n" + r["solution"] for r in rows[:100]]
    for s in samples:
        ids = tok.encode(s)
        assert len(ids) == len(s)  # one token per character
        assert tok.decode(ids) == s
    assert tok.decode(tok.encode("answer: 85") + [EOS_ID], skip_special_tokens=True) == "answer: 85"
