"""Tests for data.py: loaders and their error messages, prompt templates, grading.

Run:  python -m pytest tests/test_data.py -q      (CPU, no network, about 10 s)

The fixtures are three real rows from each of ../shared/data/{gsm8k_test, math500,
code_alpaca, qa_t0}.jsonl, copied so the tests pass on a clone without ../shared.
"""
import json
import threading
import time
from pathlib import Path

import pytest

import data
from data import DataError, Grader, grade

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GSM8K, MATH500 = FIXTURES / "gsm8k_test.jsonl", FIXTURES / "math500.jsonl"
CODE, QA = FIXTURES / "code_alpaca.jsonl", FIXTURES / "qa_t0.jsonl"


def write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


# -----------------------------------------------------------------------------
# Loading


def test_load_rows_schema():
    rows = data.load_rows(str(MATH500))
    assert len(rows) == 3
    for row in rows:
        assert isinstance(row["problem"], str) and row["problem"]
        assert row["domain"] == "math" and row["answer"] and row["solution"]
        assert row["source"] == "math500" and "level" in row  # extra fields are kept
    code = data.load_rows(str(CODE))
    assert {r["domain"] for r in code} == {"code"} and all(r["answer"] is None for r in code)
    assert data.load_rows(str(GSM8K))[0]["answer"] == "18"


def test_load_rows_domain_override_limit_and_generic_columns(tmp_path):
    path = write(tmp_path, "raw.jsonl", [json.dumps({"question": f"q{i}", "response": f"r{i}"})
                                         for i in range(10)])
    rows = data.load_rows(str(path), domain="qa", limit=4, seed=1)
    assert len(rows) == 4 and all(r["domain"] == "qa" for r in rows)
    assert rows[0]["problem"].startswith("q") and rows[0]["solution"].startswith("r")
    assert rows == data.load_rows(str(path), domain="qa", limit=4, seed=1)  # seeded


def test_hub_adapters():
    gsm = data._adapt_gsm8k({"question": "Q?", "answer": "2 * 3 = <<2*3=6>>6 eggs\n#### 1,006"})
    assert gsm == {"problem": "Q?", "answer": "1006", "solution": "2 * 3 = 6 eggs"}
    meta = data._adapt_metamath({"query": "Q?", "response": "x = 2.\nThe answer is: 2", "type": "t"})
    assert meta["answer"] == "2" and meta["problem"] == "Q?"
    olympiad = data._adapt_generic({"question": "Q?", "final_answer": ["$\\frac{1}{2}$"]})
    assert olympiad["answer"] == "\\frac{1}{2}" and olympiad["problem"] == "Q?"
    assert data._adapt_generic({"problem": "Q", "answer": 27.0})["answer"] == "27"


def test_mixture_spec_caps_and_domains():
    assert data.parse_data_spec(f"math={GSM8K}, {CODE}") == [("math", str(GSM8K)), (None, str(CODE))]
    spec = f"math={GSM8K},math={MATH500},code={CODE},{QA}"  # qa rows keep their own domain
    rows = data.load_mixture(spec, per_domain_cap=2, seed=0)
    counts = {d: sum(r["domain"] == d for r in rows) for d in ("math", "code", "qa")}
    assert counts == {"math": 2, "code": 2, "qa": 2}
    assert len(data.load_mixture(spec, per_domain_cap=None)) == 12
    assert [r["id"] for r in rows] == [r["id"] for r in data.load_mixture(spec, 2, seed=0)]
    with pytest.raises(DataError, match="bad data spec"):
        data.parse_data_spec("math=")


def test_benchmarks_resolve_local_then_hub(tmp_path):
    assert data.resolve_benchmark("gsm8k", data_dir=FIXTURES) == (str(GSM8K), "test")
    assert data.resolve_benchmark("math500", data_dir=tmp_path) == ("HuggingFaceH4/MATH-500", "test")
    assert len(data.load_benchmark("math500", data_dir=FIXTURES)) == 3
    with pytest.raises(DataError, match="unknown benchmark 'gsm9k'.*math500.*aime24"):
        data.resolve_benchmark("gsm9k")


def test_error_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        data.load_rows(str(tmp_path / "nope.jsonl"))


def test_error_malformed_json_names_file_and_line(tmp_path):
    path = write(tmp_path, "bad.jsonl", ['{"problem": "a", "domain": "math"}', "", '{"problem": '])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        data.load_rows(str(path))


def test_error_missing_problem_names_field_file_and_line(tmp_path):
    path = write(tmp_path, "noprob.jsonl", ['{"problem": "a", "domain": "math"}',
                                            '{"answer": "1", "domain": "math"}'])
    with pytest.raises(DataError, match=r"noprob\.jsonl:2: row has no 'problem' field"):
        data.load_rows(str(path))


def test_error_missing_domain_says_what_to_do(tmp_path):
    path = write(tmp_path, "nodom.jsonl", ['{"problem": "a"}'])
    with pytest.raises(DataError, match=r"nodom\.jsonl:1: row has no 'domain' field.*math="):
        data.load_rows(str(path))
    assert data.load_rows(str(path), domain="qa")[0]["domain"] == "qa"


def test_error_empty_dataset(tmp_path):
    path = write(tmp_path, "empty.jsonl", [""])
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows"):
        data.load_rows(str(path))


def test_error_hub_unreachable_is_one_clear_message():
    with pytest.raises(DataError, match="not a local file.*Hugging Face hub"):
        data.load_rows("no-such-org/no-such-dataset-xyz")


# -----------------------------------------------------------------------------
# Prompts


def test_format_prompt_plain_and_math():
    assert data.format_prompt("12+30=?", "plain") == "12+30=?\n"
    prompt = data.format_prompt("What is 1+1?", "math")
    assert prompt.startswith("Question: What is 1+1?\n") and "\\boxed{}" in prompt
    with pytest.raises(DataError, match="unknown prompt template 'foo'.*plain, math, chat"):
        data.format_prompt("x", "foo")
    with pytest.raises(DataError, match="needs a tokenizer with a chat template"):
        data.format_prompt("x", "chat")


def test_format_prompt_chat_uses_the_tokenizers_template():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    prompt = data.format_prompt("What is 1+1?", "chat", tokenizer=tok)
    assert prompt == f"<|user|>What is 1+1?\n{data.BOXED_INSTRUCTION}<|end|><|assistant|>"


# -----------------------------------------------------------------------------
# Grading


def test_last_boxed_balanced_braces():
    assert data.last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert data.last_boxed("\\boxed{1} then \\boxed{\\frac{1}{2") is None  # truncated
    assert data.last_boxed("no answer") is None


def test_grade_math_right_wrong_malformed():
    grader = Grader()
    assert grader("so \\boxed{\\frac{1}{2}}.", "0.5", "math") == 1.0
    assert grader("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", "math") == 1.0
    assert grader("\\boxed{\\dfrac{14}{3}}", "\\frac{14}{3}", "math") == 1.0
    assert grader("\\boxed{5}", "\\frac{14}{3}", "math") == 0.0
    assert grader("the answer is 0.5", "0.5", "math") == 0.0  # only the boxed span counts
    assert grader("\\boxed{0.5", "0.5", "math") == 0.0
    assert grader(None, "0.5", "math") == 0.0
    assert grader.failures == 0  # wrong or unboxed answers are not failures
    with pytest.raises(DataError, match="unknown grading kind"):
        grader("x", "1", "maths")


def test_grade_gsm8k_numbers():
    assert grade("She makes $1,000 in total.", "1000", "gsm8k") == 1.0
    assert grade("So the answer is 18.", "18", "gsm8k") == 1.0
    assert grade("#### 18\nCheck: 9*2 = 18, plus 3", "18", "gsm8k") == 1.0  # after ####
    assert grade("\\boxed{18} dollars; 4 eggs remain", "18", "gsm8k") == 1.0  # boxed before last
    assert grade("18 eggs, so 17", "18", "gsm8k") == 0.0
    assert grade("no number here", "18", "gsm8k") == 0.0
    assert grade("-2.50", "-2.5", "gsm8k") == 1.0


def test_grade_toy_delegates_to_the_toy_task():
    from toy.task import grade as toy_grade
    for completion, answer in [("answer: 77", "77"), ("answer: 78", "77"), ("", "77")]:
        assert grade(completion, answer, "toy") == toy_grade(completion, answer)


PATHOLOGICAL = [
    "x" * 100_000 + "\\boxed{1}",            # 100 KB completion
    "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",  # deep nesting
    "\\boxed{" * 3000,                        # unbalanced
    "\\boxed{10^10^10^10}",
    "\\boxed{10^{10^{10^{10}}}}",             # sympy would evaluate this forever
    "\\boxed{99999999999!}",
    "1" * 100_000,
]


def test_pathological_completions_score_zero_quickly():
    grader = Grader(timeout=1.0)
    for completion in PATHOLOGICAL:
        for kind in ("math", "gsm8k"):
            start = time.time()
            assert grader(completion, "18", kind) == 0.0
            assert time.time() - start < 3.0, (completion[:40], kind)
    assert grader.failures >= 2  # the towers timed out and were counted


def test_grading_off_the_main_thread_is_time_bounded():
    grader, results = Grader(timeout=1.0), []
    def work():  # signals only reach the main thread: this uses the watchdog subprocess
        for completion, gold in [("\\boxed{\\frac{1}{2}}", "0.5"), ("\\boxed{9^{9^{9^{9}}}}", "18"),
                                 ("\\boxed{2}", "2")]:
            start = time.time()
            results.append((grader(completion, gold, "math"), time.time() - start))
    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert [r for r, _ in results] == [1.0, 0.0, 1.0]  # a fresh worker after the kill
    assert results[1][1] < 3.0 and grader.failures == 1


def test_check_gold_answers_flags_unreadable_gold():
    rows = data.load_rows(str(MATH500)) + [
        {"id": "none", "answer": None}, {"id": "empty", "answer": " "}, {"id": "junk", "answer": "}{"}]
    assert data.check_gold_answers(rows, "math") == ["none", "empty", "junk"]
    gsm = data.load_rows(str(GSM8K)) + [{"id": "word", "answer": "eighteen"}]
    assert data.check_gold_answers(gsm, "gsm8k") == ["word"]


def test_grading_kind_for():
    assert data.grading_kind_for({"source": "toy", "domain": "math"}) == "toy"
    assert data.grading_kind_for(data.load_rows(str(GSM8K))[0]) == "gsm8k"
    assert data.grading_kind_for("openai/gsm8k") == "gsm8k"
    assert data.grading_kind_for(str(MATH500)) == "math"
    assert data.grading_kind_for("toy_math.jsonl") == "toy"
