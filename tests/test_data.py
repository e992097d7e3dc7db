"""Tests for data.py: loaders and their error messages, prompt templates, grading.

Run:  python -m pytest tests/test_data.py -q      (CPU, no network, about 30 s)

The fixtures are three real rows from each of ../shared/data/{gsm8k_test, math500,
code_alpaca, qa_t0}.jsonl, copied so the tests pass on a clone without ../shared.
"""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import data
import evaluate
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
    assert evaluate.resolve_benchmark("gsm8k", data_dir=FIXTURES) == (str(GSM8K), "test")
    assert evaluate.resolve_benchmark("math500", data_dir=tmp_path) == ("HuggingFaceH4/MATH-500", "test")
    source, _ = evaluate.resolve_benchmark("math500", data_dir=FIXTURES)
    assert len(data.load_rows(source, domain="math")) == 3
    with pytest.raises(DataError, match="unknown benchmark 'gsm9k'.*math500.*aime24"):
        evaluate.resolve_benchmark("gsm9k")


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


def test_error_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"problem": "a", "domain": "math"}\n{"problem": "caf\xe9", "domain": "math"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not valid UTF-8 \(byte 0xe9"):
        data.load_rows(str(path))


@pytest.mark.parametrize("field, value, message", [
    ("solution", ["step 1", "step 2"], "'solution' is a list; expected a string"),
    ("solution", 42, "'solution' is an int; expected a string"),
    ("answer", {"value": 18}, "'answer' is a dict; expected a string or a number"),
    ("problem", ["a", "b"], "'problem' is a list; expected a non-empty string"),
    ("problem", "   ", "'problem' is an empty string"),
    ("domain", ["math"], "'domain' is a list; expected a string"),
])
def test_error_fields_of_the_wrong_type_name_the_field(tmp_path, field, value, message):
    row = {"problem": "a", "answer": "1", "solution": "s", "domain": "math", field: value}
    path = write(tmp_path, "types.jsonl", [json.dumps({"problem": "ok", "domain": "math"}), json.dumps(row)])
    with pytest.raises(DataError, match=r"types\.jsonl:2: " + message.replace("(", r"\(")):
        data.load_rows(str(path))


def test_numeric_answers_are_text_and_null_fields_are_absent(tmp_path):
    path = write(tmp_path, "ok.jsonl", [json.dumps({"problem": "a", "answer": 18, "solution": None,
                                                    "domain": "math"})])
    row = data.load_rows(str(path))[0]
    assert row["answer"] == "18" and row["solution"] is None


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
    # chat-plain: the problem's own words only (a task that says how to answer)
    assert data.format_prompt("What is 1+1?", "chat-plain", tokenizer=tok) == "<|user|>What is 1+1?<|end|><|assistant|>"


# -----------------------------------------------------------------------------
# Grading


def test_last_boxed_balanced_braces():
    assert data.last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert data.last_boxed("\\boxed{1} then \\boxed{\\frac{1}{2") is None  # truncated
    assert data.last_boxed("no answer") is None


def test_answer_of_reads_what_the_grader_reads():
    """The answer counted as distinct is the one each grading kind compares."""
    assert data.answer_of("x \\boxed{1} then \\boxed{\\frac{1}{2}}", "math") == "\\frac{1}{2}"
    assert data.answer_of("so 3 apples, 1,200 in all\n#### 1,250", "gsm8k") == data.gsm8k_prediction(
        "so 3 apples, 1,200 in all\n#### 1,250")
    assert data.answer_of("4+5=9 c0\nanswer: 59\nanswer: 61", "toy") == "61"
    assert data.answer_of("no answer here", "toy") is None
    assert data.answer_of("no box", "math") is None


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


def test_pathological_completions_score_zero():
    # Without the deadline the towers would run for ever and this test would hang.
    grader = Grader(timeout=1.0)
    for completion in PATHOLOGICAL:
        for kind in ("math", "gsm8k"):
            assert grader(completion, "18", kind) == 0.0
    assert grader.failures >= 2  # the towers timed out and were counted


def test_grading_off_the_main_thread_is_time_bounded():
    grader, results = Grader(timeout=1.0), []
    def work():  # signals only reach the main thread: this uses the watchdog subprocess
        for completion, gold in [("\\boxed{\\frac{1}{2}}", "0.5"), ("\\boxed{9^{9^{9^{9}}}}", "18"),
                                 ("\\boxed{2}", "2")]:
            results.append(grader(completion, gold, "math"))
    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=120)
    assert results == [1.0, 0.0, 1.0]  # the tower's worker was killed; a fresh one graded the last
    assert grader.failures == 1


def test_first_math_grade_of_a_fresh_process_is_not_cut_by_the_import():
    # Importing math-verify and sympy takes a second or more; inside a 0.5 s deadline it used to
    # score this correct answer 0. A fresh interpreter, so nothing is imported yet.
    code = ("import data; g = data.Grader(timeout=0.5); "
            "print(g('so \\\\boxed{5}', '5', 'math'), g.failures)")
    repo = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo,
                         env=dict(os.environ, PYTHONPATH=repo), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1.0", "0"]


def test_gsm8k_hostile_gold_answers_match_nothing():
    # Read as floats, 'inf', '1e400' and a 400-digit integer were all inf, and
    # abs(pred - gold) <= 1e-6 * abs(gold) held for every prediction against them.
    big = "9" * 400
    for gold in ["inf", "-inf", "Infinity", "nan", "1e400", "1e5", big]:
        assert grade("#### 5", gold, "gsm8k") == 0.0, gold
        assert grade(f"\\boxed{{{5}}}", gold, "gsm8k") == 0.0, gold
    for gold in ["inf", "1e400"]:
        assert grade(f"#### {gold}", gold, "gsm8k") == 0.0  # not a number GSM8K grading reads
    rows = [{"answer": a, "grading_kind": "gsm8k"} for a in ["inf", "-inf", "nan", "1e400", big, "18", "-2.5", "1,000"]]
    assert data.check_gold_answers(rows) == [0, 1, 2, 3]  # the big integer is exact


def test_gsm8k_integers_of_any_length_compare_exactly():
    big = "9" * 400
    assert grade(f"#### {big}", big, "gsm8k") == 1.0
    assert grade(f"The total is {big[:-1]}8.", big, "gsm8k") == 0.0
    assert grade("#### 1" + "0" * 399 + "1", "1" + "0" * 400, "gsm8k") == 0.0      # longer
    assert grade(f"#### {10**400 + 1}", str(10**400), "gsm8k") == 0.0              # last digit
    assert grade(f"#### {2**64 + 1}", str(2**64), "gsm8k") == 0.0                  # equal as floats
    assert grade(f"#### {2**64:,}", str(2**64), "gsm8k") == 1.0                    # commas
    assert grade("#### 18.00", "18", "gsm8k") == 1.0 and grade("#### 0.1", "0.10", "gsm8k") == 1.0
    assert grade("#### 0.30000001", "0.3", "gsm8k") == 0.0


def test_check_gold_answers_flags_unreadable_gold():
    rows = data.load_rows(str(MATH500)) + [
        {"id": "none", "answer": None}, {"id": "empty", "answer": " "}, {"id": "junk", "answer": "}{"}]
    assert data.check_gold_answers(rows) == [3, 4, 5]  # positions in rows (no kind: math)
    gsm = data.load_rows(str(GSM8K)) + [{"id": "word", "answer": "eighteen", "grading_kind": "gsm8k"}]
    assert data.check_gold_answers(gsm) == [3]
    assert data.check_gold_answers(gsm + rows) == [3, 7, 8, 9]  # each row by its own kind


def test_a_row_without_source_is_graded_the_same_by_every_stage(tmp_path):
    # GSM8K rows without a 'source' field, in a file named like GSM8K's. rl.py and sft_warmup.py
    # take the kind of load_mixture's first row; evaluate.py of load_rows' first row, or of the
    # path when the rows have no source. All must say gsm8k, so '#### 18' scores 1 everywhere.
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    path = write(tmp_path, "gsm8k_train.jsonl", [json.dumps({k: v for k, v in r.items() if k != "source"})
                                                 for r in rows])
    mixture = data.load_mixture(f"math={path}")
    plain = data.load_rows(str(path), domain="math")
    by_rl = data.grading_kind_for(mixture[0])
    by_evaluate = data.grading_kind_for(plain[0] if plain[0].get("source") else str(path))
    assert "source" not in plain[0] and by_rl == by_evaluate == "gsm8k"
    assert {r["grading_kind"] for r in mixture + plain} == {"gsm8k"}
    answer = plain[0]["answer"]
    assert grade(f"#### {answer}", answer, by_rl) == grade(f"#### {answer}", answer, by_evaluate) == 1.0


def test_a_rows_own_grading_kind_wins_and_is_checked(tmp_path):
    path = write(tmp_path, "train.jsonl", [
        json.dumps({"problem": "a", "answer": "18", "domain": "math", "grading_kind": "gsm8k"}),
        json.dumps({"problem": "b", "answer": "18", "domain": "math", "source": "gsm8k"}),
        json.dumps({"problem": "c", "answer": "18", "domain": "math"})])
    assert [data.grading_kind_for(r) for r in data.load_rows(str(path))] == ["gsm8k", "gsm8k", "math"]
    bad = write(tmp_path, "bad.jsonl", [json.dumps({"problem": "a", "domain": "math", "grading_kind": "gsm"})])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: 'grading_kind' is 'gsm'; known: math, gsm8k, toy"):
        data.load_rows(str(bad))


def test_grading_kind_for():
    assert data.grading_kind_for({"source": "toy", "domain": "math"}) == "toy"
    assert data.grading_kind_for(data.load_rows(str(GSM8K))[0]) == "gsm8k"
    assert data.grading_kind_for("openai/gsm8k") == "gsm8k"
    assert data.grading_kind_for(str(MATH500)) == "math"
    assert data.grading_kind_for("toy_math.jsonl") == "toy"
