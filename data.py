"""Datasets, prompt templates and answer grading.

Every loader yields rows in one schema (the one of ../shared/data/*.jsonl):

    {"problem": str, "answer": str | None, "solution": str | None, "domain": str, ...}

plus whatever extra fields the source has (id, source, subject, level, ...). `answer` is
the short final answer a grader compares against; `solution` is a worked solution. A
source is a local JSON-lines file (UTF-8) or a Hugging Face hub dataset id; a mixture spec
`math=a.jsonl,code=b.jsonl,qa=c.jsonl` combines several into the VAE's training mix.

Every row also carries `grading_kind` ('math', 'gsm8k' or 'toy'), decided once here when it
is loaded: the row's own `grading_kind` field if it has one, else from its `source` field, else
from the file name or hub id (see grading_kind_for). Every stage grades a row by that kind, so a
row scores the same in RL as in evaluation.

Grading (`grade(completion, answer, kind)`) returns 1.0 or 0.0 and never raises or hangs:
a completion that cannot be graded in `Grader.timeout` seconds scores 0 and is counted
in `GRADER.failures`, which training and evaluation scripts log.
"""

import json
import logging
import os
import random
import re
import select
import signal
import subprocess
import sys
import threading
from decimal import Decimal
from pathlib import Path

from guard import UserError

REPO_DIR = Path(__file__).resolve().parent
SHARED_DATA_DIR = REPO_DIR.parent / "shared" / "data"


class DataError(UserError, ValueError):
    """Bad input data: the message names the file, line or field and what to do."""


# -----------------------------------------------------------------------------
# Loading


def _text(value):
    """A field as a plain string: lists keep their first item (OlympiadBench's final_answer),
    integral floats lose their '.0' (AMC's answers), surrounding $...$ is dropped. Values that
    are neither text nor numbers are returned as they are, for load_rows to refuse."""
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None or not isinstance(value, (str, int, float)):
        return value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    if len(text) > 1 and text[0] == text[-1] == "$":
        text = text[1:-1].strip()
    return text


def _first(row, names):
    return next((row[n] for n in names if row.get(n) not in (None, "")), None)


def _adapt_generic(row):
    """Rows with problem|question|query and answer|final_answer, solution|response columns."""
    out = dict(row)
    for name in ("question", "query", "final_answer", "response"):
        out.pop(name, None)
    out["problem"] = _first(row, ("problem", "question", "query"))
    out["answer"] = _text(_first(row, ("answer", "final_answer")))
    out["solution"] = _first(row, ("solution", "response"))
    return out


def _adapt_gsm8k(row):
    # "...She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18": the worked solution, then the answer.
    solution, _, answer = row["answer"].partition("####")
    solution = re.sub(r"<<[^>]*>>", "", solution).strip()  # calculator annotations
    return {"problem": row["question"], "answer": answer.strip().replace(",", ""), "solution": solution}


def _adapt_metamath(row):
    # MetaMathQA responses end with "The answer is: <answer>".
    _, found, answer = row["response"].rpartition("The answer is: ")
    return {"problem": row["query"], "answer": answer.strip() if found else None,
            "solution": row["response"], "type": row.get("type")}


HUB_ADAPTERS = {"openai/gsm8k": _adapt_gsm8k, "meta-math/MetaMathQA": _adapt_metamath}
HUB_CONFIGS = {"openai/gsm8k": "main"}  # hub datasets that need a config name


def _read_jsonl(path):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file. Pass a JSON-lines file (one {{\"problem\": ...}} "
                        "object per line) or a Hugging Face dataset id such as openai/gsm8k.")
    try:
        f = open(path, "rb")  # bytes, decoded line by line, so a bad byte is reported with its line
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    rows = []
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} at "
                                f"byte {e.start + 1} of the line); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                                "expected one JSON object per line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((f"{path}:{lineno}", _adapt_generic(row)))
    return rows


def _read_hub(source, split):
    try:
        import datasets
        ds = datasets.load_dataset(source, HUB_CONFIGS.get(source), split=split)
    except Exception as e:  # no network, unknown id, bad split: one message, not a deep trace
        raise DataError(f"{source}: not a local file, and loading it from the Hugging Face hub "
                        f"(split {split!r}) failed: {type(e).__name__}: {e}") from None
    adapt = HUB_ADAPTERS.get(source, _adapt_generic)
    rows = []
    for i, raw in enumerate(ds):
        row = {"id": f"{source}/{split}/{i}", "source": source, **adapt(raw)}
        for key, value in raw.items():  # keep extra columns such as subject and level
            row.setdefault(key, value)
        rows.append((f"{source} (split {split!r}) row {i}", row))
    return rows


# Held-out problems (rl.py's and sft_warmup.py's --eval-data, evaluate.py's --limit) are chosen with
# this seed, never the run's: every --seed scores the same problems, so a spread over seeds is the
# spread of training alone.
HELD_OUT_SEED = 0


def load_rows(source, domain=None, split="train", limit=None, seed=0):
    """Rows of one source in the common schema. `source` is a local .jsonl file or a hub
    dataset id; `domain` overrides the rows' own `domain` field (required if they have
    none); `limit` keeps a random subset of that size (seeded, in file order)."""
    # Anything that is a file, or is named like one, is read locally; the rest (hub ids,
    # dataset directories) goes to datasets.load_dataset.
    is_file = os.path.isfile(source) or str(source).endswith(".jsonl")
    located = _read_jsonl(source) if is_file else _read_hub(source, split)
    rows = []
    for where, row in located:
        if row.get("problem") is None:
            raise DataError(f"{where}: row has no 'problem' field (a non-empty string; "
                            "'question' and 'query' are accepted too)")
        if not isinstance(row["problem"], str) or not row["problem"].strip():
            raise DataError(f"{where}: 'problem' is {_describe(row['problem'])}; "
                            "expected a non-empty string")
        for name in ("answer", "solution"):  # text the graders and tokenizers read, or absent
            if row.get(name) is not None and not isinstance(row[name], str):
                raise DataError(f"{where}: {name!r} is {_describe(row[name])}; expected a string"
                                + (" or a number" if name == "answer" else "") + ", or null")
        row["domain"] = domain or row.get("domain")
        if not row["domain"]:
            raise DataError(f"{where}: row has no 'domain' field; add one to each row or give "
                            f"the domain in the data spec, e.g. math={source}")
        if not isinstance(row["domain"], str):
            raise DataError(f"{where}: 'domain' is {_describe(row['domain'])}; expected a string")
        row.setdefault("answer", None)
        row.setdefault("solution", None)
        row["grading_kind"] = row.get("grading_kind") or grading_kind_for(row.get("source") or source)
        if row["grading_kind"] not in GRADING_KINDS:
            raise DataError(f"{where}: 'grading_kind' is {row['grading_kind']!r}; "
                            f"known: {', '.join(GRADING_KINDS)}")
        rows.append(row)
    if not rows:
        raise DataError(f"{source}: no rows (empty file or split)")
    if limit is not None and limit < len(rows):
        keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
        rows = [rows[i] for i in keep]
    return rows


def _describe(value):
    """'a list', 'a dict', 'an empty string': what a field holds, for error messages."""
    if isinstance(value, str) and not value.strip():
        return "an empty string"
    name = type(value).__name__
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def parse_data_spec(spec):
    """'math=a.jsonl,code=b.jsonl,c.jsonl' -> [('math', 'a.jsonl'), ('code', 'b.jsonl'),
    (None, 'c.jsonl')]; a source without 'domain=' keeps its rows' own domain field."""
    pairs = []
    for item in spec.split(","):
        domain, sep, source = item.strip().rpartition("=")
        if not source or (sep and not domain):
            raise DataError(f"bad data spec {spec!r}: expected comma-separated "
                            "'domain=path_or_hub_id' or 'path_or_hub_id' entries")
        pairs.append((domain or None, source))
    return pairs


def load_mixture(spec, per_domain_cap=None, seed=0):
    """Rows of every source in `spec`, at most `per_domain_cap` per domain (a seeded random
    subset of each domain), shuffled together so domains interleave."""
    rng = random.Random(seed)
    by_domain = {}
    for domain, source in parse_data_spec(spec):
        for row in load_rows(source, domain=domain, seed=seed):
            by_domain.setdefault(row["domain"], []).append(row)
    rows = []
    for domain_rows in by_domain.values():
        if per_domain_cap is not None and len(domain_rows) > per_domain_cap:
            domain_rows = rng.sample(domain_rows, per_domain_cap)
        rows.extend(domain_rows)
    rng.shuffle(rows)
    return rows


# The paper's evaluation sets: name -> (hub id, split, file in ../shared/data).
BENCHMARKS = {
    "gsm8k": ("openai/gsm8k", "test", "gsm8k_test.jsonl"),
    "math500": ("HuggingFaceH4/MATH-500", "test", "math500.jsonl"),
    "minerva_math": ("math-ai/minervamath", "test", "minerva_math.jsonl"),
    "olympiadbench": ("math-ai/olympiadbench", "test", "olympiadbench.jsonl"),
    "amc23": ("math-ai/amc23", "test", "amc23.jsonl"),
    "aime24": ("HuggingFaceH4/aime_2024", "train", "aime24.jsonl"),
}


def resolve_benchmark(name, data_dir=None):
    """(source, split) for a named benchmark: the local file in `data_dir` (default
    ../shared/data next to the repo) when it is there, else the hub dataset."""
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    hub_id, split, filename = BENCHMARKS[name]
    local = Path(data_dir or SHARED_DATA_DIR) / filename
    return (str(local), split) if local.is_file() else (hub_id, split)


def load_benchmark(name, data_dir=None, limit=None, seed=0):
    source, split = resolve_benchmark(name, data_dir)
    return load_rows(source, domain="math", split=split, limit=limit, seed=seed)


# -----------------------------------------------------------------------------
# Prompts

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
TEMPLATES = ("plain", "math", "chat", "chat-plain")


def format_prompt(problem, template, tokenizer=None):
    """The text the policy is conditioned on (the prefix embeddings go before it).
    plain: the problem and a newline (base models; the toy world's format).
    math:  a base-model prompt asking for step-by-step reasoning and a \\boxed{} answer.
    chat:  the tokenizer's chat template around the problem and the same instruction.
    chat-plain: the chat template around the problem alone (a problem that says how to answer)."""
    if template == "plain":
        return f"{problem}\n"
    if template == "math":
        return f"Question: {problem}\n{BOXED_INSTRUCTION}\nAnswer:"
    if template in ("chat", "chat-plain"):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError("template 'chat' needs a tokenizer with a chat template; "
                            "use 'math' or 'plain' for base models")
        content = problem if template == "chat-plain" else f"{problem}\n{BOXED_INSTRUCTION}"
        messages = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise DataError(f"unknown prompt template {template!r}; known: {', '.join(TEMPLATES)}")


# -----------------------------------------------------------------------------
# Grading

GRADING_KINDS = ("math", "gsm8k", "toy")
MAX_ANSWER_CHARS = 1000  # longest \boxed{} span graded; gold answers are at most ~200 chars
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")  # 1,000  -3  2.5  ("18." -> 18); no inf, no 1e5

# math-verify logs each parse failure with its full input: a 100 KB completion would flood
# the log. Failures are counted in Grader.failures instead.
logging.getLogger("math_verify").setLevel(logging.CRITICAL)


def last_boxed(text):
    """Content of the last \\boxed{...} in text, braces balanced; None if there is none, it
    is unbalanced (a truncated answer is not an answer) or longer than MAX_ANSWER_CHARS."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    begin, depth = start + len("\\boxed{"), 1
    for i in range(begin, min(len(text), begin + MAX_ANSWER_CHARS + 1)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
    return None


def _number(text):
    """The exact value of a number written the way _NUMBER reads one ('1,000', '-2.50', '$18'),
    else None ('inf', '1e400', 'eighteen'). A Decimal, not a float: integers and decimals of
    any length compare exactly, and nothing overflows to infinity (as a float a 400-digit gold
    answer is inf, and any prediction was within a relative tolerance of it)."""
    text = text.replace("$", "").strip()
    if _NUMBER.fullmatch(text) is None:
        return None
    return Decimal(text.replace(",", ""))


def gsm8k_prediction(completion):
    """The number a GSM8K completion answers: the first number after the last '####' if
    there is one, else the last number inside the last \\boxed{}, else the last number. A box
    without a number is no answer: small chat models echo the prompt's instruction as "The
    answer is within \\boxed{}." after answering in prose, so the prose's last number counts."""
    if "####" in completion:
        found = _NUMBER.findall(completion.rpartition("####")[2])
        return _number(found[0]) if found else None
    found = _NUMBER.findall(last_boxed(completion) or "") or _NUMBER.findall(completion)
    return _number(found[-1]) if found else None


class GradingTimeout(BaseException):
    """Raised by the alarm. A BaseException so that `except Exception` blocks inside
    math-verify and sympy cannot swallow it and keep computing."""


_MATH_VERIFY = None  # (parse, verify) once warm_math_grader() has run


def warm_math_grader():
    """Import math-verify and grade one answer, without a deadline. The first math grade in a
    process otherwise pays for importing sympy and building the LaTeX parser (one to a few
    seconds under load) inside its deadline, and a correct answer scores 0. Idempotent."""
    global _MATH_VERIFY
    if _MATH_VERIFY is None:
        from math_verify import parse, verify  # lazy: only math grading needs sympy
        verify(parse("\\boxed{\\frac{1}{2}}"), parse("\\boxed{0.5}"))
        _MATH_VERIFY = parse, verify
    return _MATH_VERIFY


def _math_verify_equal(gold, pred):
    parse, verify = warm_math_grader()
    # Both spans are wrapped in \boxed{} so math-verify reads them as LaTeX answers.
    # Its own timeouts are off (None): they use signal.alarm, which would cancel ours.
    g = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
    p = parse(f"\\boxed{{{pred}}}", parsing_timeout=None)
    return bool(g) and bool(p) and verify(g, p, timeout_seconds=None)


def _run_with_deadline(seconds, fn, *args):
    """fn(*args), interrupted by SIGALRM after `seconds` (main thread only). Python checks
    signals between bytecodes and inside long integer arithmetic, so this also stops
    sympy evaluating 10^{10^{10}}."""
    def on_alarm(signum, frame):
        raise GradingTimeout(f"grading took more than {seconds} s")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _worker_main():
    """Loop of the grading subprocess: one JSON [gold, pred] per line in, one reply out."""
    warm_math_grader()  # before "ready": the parent gives start-up its own, longer wait
    print("ready", flush=True)
    for line in sys.stdin:
        try:
            reply = _math_verify_equal(*json.loads(line))
        except Exception as e:
            reply = repr(e)
        print(json.dumps(reply), flush=True)


class Grader:
    """Grades completions; a failure (exception or timeout) scores 0.0 and adds 1 to
    `.failures`. On the main thread math-verify runs in-process under a SIGALRM deadline;
    signals only reach the main thread, so other threads use a child process that is
    killed (and restarted on the next call) when it overruns."""

    def __init__(self, timeout=3.0):
        self.timeout = timeout
        self.failures = 0
        self._worker = None
        self._lock = threading.Lock()

    def __call__(self, completion, answer, kind):
        if kind not in GRADING_KINDS:  # a caller's bug, not a bad completion: fail loudly
            raise DataError(f"unknown grading kind {kind!r}; known: {', '.join(GRADING_KINDS)}")
        if not isinstance(completion, str) or answer is None:
            return 0.0
        try:
            if kind == "toy":
                return float(answer_line(completion) == str(answer).strip())
            if kind == "gsm8k":
                pred, gold = gsm8k_prediction(completion), _number(str(answer))
                return float(pred is not None and gold is not None and pred == gold)
            pred = last_boxed(completion)
            return 0.0 if pred is None else float(self.math_equal(str(answer), pred))
        except (Exception, GradingTimeout):
            self.failures += 1
            return 0.0

    def math_equal(self, gold, pred):
        """math-verify equivalence of two LaTeX answer spans, time-bounded; raises on timeout."""
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
            warm_math_grader()  # outside the deadline
            return _run_with_deadline(self.timeout, _math_verify_equal, gold, pred)
        with self._lock:  # one request at a time on the worker's pipe
            if self._worker is None or self._worker.poll() is not None:
                self._worker = subprocess.Popen(
                    [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO_DIR)!r}); "
                     "import data; data._worker_main()"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                self._await_reply(60.0)  # start-up: importing sympy takes a few seconds
            self._worker.stdin.write(json.dumps([gold, pred]) + "\n")
            self._worker.stdin.flush()
            reply = json.loads(self._await_reply(self.timeout))
        if not isinstance(reply, bool):
            raise RuntimeError(f"grading worker: {reply}")
        return reply

    def _await_reply(self, seconds):
        ready, _, _ = select.select([self._worker.stdout], [], [], seconds)
        if not ready:
            self._worker.kill()
            self._worker.wait()
            self._worker = None
            raise TimeoutError(f"grading took more than {seconds} s")
        return self._worker.stdout.readline()


GRADER = Grader()


def grade(completion, answer, kind):
    """Reward in {0.0, 1.0} for a completion against a gold answer. What is compared:
    math:  the last \\boxed{...} (balanced braces) of the completion against the gold
           answer, both read as LaTeX and checked for equivalence by math-verify;
    gsm8k: the number from gsm8k_prediction() against the gold number (commas and $
           stripped), compared exactly as decimals ('2.50' equals '2.5'); a gold answer
           that is not such a number ('inf', '1e400') matches nothing;
    toy:   the last 'answer: X' line's X against the answer, as strings (answer_line).
    Failures count in GRADER.failures; use a Grader of your own to count separately."""
    return GRADER(completion, answer, kind)


def answer_line(completion):
    """X from the last line of the form `answer: X` (whitespace stripped), else None: the toy
    world's answers. A plain scan of lines, so time is linear in the input whatever it holds."""
    for line in reversed(completion.split("\n")):
        if line.strip().startswith("answer:"):
            return line.strip()[len("answer:"):].strip()
    return None


def answer_of(completion, kind):
    """The answer a completion states, read as grade() reads it (None: it states none): the last
    \\boxed{} for math, gsm8k_prediction for gsm8k, the last 'answer:' line for toy. For counting
    distinct answers among the candidates of a problem."""
    if kind == "toy":
        return answer_line(completion)
    return gsm8k_prediction(completion) if kind == "gsm8k" else last_boxed(completion)


def grading_kind_for(row_or_source):
    """How completions for a row, or for the rows of a file or hub dataset, are graded.
    A row's `grading_kind` (load_rows sets one on every row, so every stage gets the same
    answer); else from the row's `source` field, or from the file name or hub id: 'toy' for
    the toy world (toy*), 'gsm8k' for GSM8K (*gsm8k*), else 'math'."""
    if isinstance(row_or_source, dict):
        if row_or_source.get("grading_kind"):
            return row_or_source["grading_kind"]
        row_or_source = row_or_source.get("source") or ""
    name = Path(str(row_or_source)).name.lower()  # 'openai/gsm8k' -> 'gsm8k'
    if name.startswith("toy"):
        return "toy"
    return "gsm8k" if "gsm8k" in name else "math"


def check_gold_answers(rows):
    """Positions in `rows` of the rows whose gold answer cannot be read by their own grading kind:
    missing; for gsm8k not a plain finite number such as '18', '1,000' or '-2.5' ('inf' and '1e400'
    are refused); for math unparseable LaTeX. Such rows could never be rewarded: callers leave them
    out and say so, rather than train or evaluate on them silently."""
    bad = []
    for i, row in enumerate(rows):
        answer, kind = row.get("answer"), grading_kind_for(row)
        ok = answer is not None and str(answer).strip() != ""
        try:
            if ok and kind == "gsm8k":
                ok = _number(str(answer)) is not None
            elif ok and kind == "math":
                ok = GRADER.math_equal(str(answer), str(answer))  # parses, and equals itself
        except (Exception, GradingTimeout):
            ok = False
        if not ok:
            bad.append(i)
    return bad
