"""Datasets, prompt templates and answer grading. A source (a JSON-lines file or a Hugging Face dataset id; a
mixture `math=a.jsonl,code=b.jsonl`) gives rows {"problem", "answer", "solution", "domain", "grading_kind"} plus its
own fields; grading_kind ('math', 'gsm8k', 'toy') is set at loading, so a row scores the same in every stage. grade()
returns 1.0 or 0.0 and never raises or hangs: what it cannot grade in time scores 0 (counted in GRADER.failures)."""

import json
import random
import re
import select
import subprocess
import sys
import threading
from decimal import Decimal
from pathlib import Path

from common import UserError, print0

SHARED_DATA_DIR = Path(__file__).resolve().parent.parent / "shared" / "data"

class DataError(UserError, ValueError):
    """Bad input data: the message names the file, line or field and what to do."""

# -----------------------------------------------------------------------------
# Loading

def _adapt_generic(row):
    """problem|question|query, answer|final_answer, solution|response columns; the answer as text: a list's
    first item (OlympiadBench), an integral float without '.0' (AMC), no $...$; other types for load_rows to refuse."""
    first = lambda *names: next((row[n] for n in names if row.get(n) not in (None, "")), None)
    answer = first("answer", "final_answer")
    answer = (answer or [None])[0] if isinstance(answer, list) else answer
    if isinstance(answer, (str, int, float)):
        answer = str(int(answer) if isinstance(answer, float) and answer.is_integer() else answer).strip()
        answer = answer[1:-1].strip() if len(answer) > 1 and answer[0] == answer[-1] == "$" else answer
    return {**{k: v for k, v in row.items() if k not in ("question", "query", "final_answer", "response")},
            "problem": first("problem", "question", "query"), "answer": answer, "solution": first("solution", "response")}

def _adapt_gsm8k(row):
    # "...She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18": the worked solution, then the answer.
    solution, _, answer = row["answer"].partition("####")
    solution = re.sub(r"<<[^>]*>>", "", solution).strip()  # calculator annotations
    return {"problem": row["question"], "answer": answer.strip().replace(",", ""), "solution": solution}

def _adapt_metamath(row):
    # MetaMathQA responses end with "The answer is: <answer>".
    _, found, answer = row["response"].rpartition("The answer is: ")
    return {"problem": row["query"], "answer": answer.strip() if found else None, "solution": row["response"]}

HUB_ADAPTERS = {"openai/gsm8k": (_adapt_gsm8k, "main"), "meta-math/MetaMathQA": (_adapt_metamath, None)}  # (adapter, config)

def _read_jsonl(path):           # (where, row) pairs; none unless each line is a JSON object or blank (explain says why)
    try:
        lines = Path(path).read_bytes().decode("utf-8").split("\n")
        rows = [(f"{path}:{i}", json.loads(line)) for i, line in enumerate(lines, 1) if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    return [(where, _adapt_generic(row)) for where, row in rows] if all(isinstance(r, dict) for _, r in rows) else []

def _read_hub(source, split):
    try:
        import datasets
        adapt, config = HUB_ADAPTERS.get(source, (_adapt_generic, None))     # extra columns (subject, level) are kept
        ds = datasets.load_dataset(source, config, split=split)
    except Exception as e:  # no network, unknown id, bad split: one message, not a deep trace
        raise DataError(f"{source}: not a local file, and loading it from the Hugging Face hub "
                        f"(split {split!r}) failed: {type(e).__name__}: {e}") from None
    return [(f"{source} (split {split!r}) row {i}", {**raw, "id": f"{source}/{split}/{i}", "source": source, **adapt(raw)})
            for i, raw in enumerate(ds)]

# Held-out problems (--eval-data, evaluate.py's --limit) are chosen with this seed, never the run's:
# every --seed scores the same problems, so a spread over seeds is the spread of training alone.
HELD_OUT_SEED = 0

def load_rows(source, domain=None, split="train", limit=None, seed=0):
    """Rows of one source in the common schema: a file (or a name ending in .jsonl), else a hub dataset.
    `domain` overrides the rows' own (required if they have none); `limit` keeps a seeded random subset."""
    is_file = Path(source).is_file() or str(source).endswith(".jsonl")
    read = _read_jsonl(source) if is_file else _read_hub(source, split)
    rows = [{**row, "domain": domain or row.get("domain"),
             "grading_kind": row.get("grading_kind") or grading_kind_for(row.get("source") or source)}
            for _, row in read]
    if not rows or not all(map(row_ok, rows)):
        import explain  # the first line or row that is wrong, and how, in one line
        raise explain.bad_rows(source, domain, None if is_file else read)
    if limit is not None and limit < len(rows):
        rows = [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), limit))]
    return rows

def row_ok(row):                   # what graders and tokenizers read: text, and a grading kind we know
    return (isinstance(row["problem"], str) and row["problem"].strip() != "" and isinstance(row["domain"], str)
            and row["domain"] != "" and row["grading_kind"] in GRADING_KINDS
            and all(row[name] is None or isinstance(row[name], str) for name in ("answer", "solution")))

def check_fits_context(rows, extra, what, flag, context):
    """Every prompt (row["prompt_ids"]) plus `extra` tokens fits the context; the longest prompt's length."""
    longest = max(rows, key=lambda r: len(r["prompt_ids"]))
    if len(longest["prompt_ids"]) + extra > context:
        raise UserError(f"{flag}: problem {longest.get('id') or longest['problem'][:40]!r}: {what} = "
                        f"{len(longest['prompt_ids']) + extra} tokens exceeds the model's context of {context}; lower them")
    return len(longest["prompt_ids"])

def parse_data_spec(spec):
    """'math=a.jsonl,c.jsonl' -> [('math', 'a.jsonl'), (None, 'c.jsonl')]: without 'domain=', the rows' own domain."""
    parts = [item.strip().rpartition("=") for item in spec.split(",")]
    if any(not source or (sep and not domain) for domain, sep, source in parts):
        raise DataError(f"bad data spec {spec!r}: expected comma-separated 'domain=path_or_hub_id' or "
                        "'path_or_hub_id' entries")
    return [(domain or None, source) for domain, _, source in parts]

def load_mixture(spec, per_domain_cap=None, seed=0):
    """Rows of every source in `spec`, at most `per_domain_cap` (a seeded subset) per domain, shuffled together."""
    rng, by_domain, rows = random.Random(seed), {}, []
    for domain, source in parse_data_spec(spec):
        for row in load_rows(source, domain=domain, seed=seed):
            by_domain.setdefault(row["domain"], []).append(row)
    for domain_rows in by_domain.values():
        cap = per_domain_cap is not None and len(domain_rows) > per_domain_cap
        rows.extend(rng.sample(domain_rows, per_domain_cap) if cap else domain_rows)
    rng.shuffle(rows)
    return rows

# -----------------------------------------------------------------------------
# Prompts and grading

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
TEMPLATES = ("plain", "math", "chat", "chat-plain")

def format_prompt(problem, template, tokenizer=None):
    """The text the policy is conditioned on: plain (toy world), math (a base model asked for a \\boxed{} answer),
    chat and chat-plain (the tokenizer's chat template)."""
    if template not in TEMPLATES:
        raise DataError(f"unknown prompt template {template!r}; known: {', '.join(TEMPLATES)}")
    if template in ("plain", "math"):
        return f"{problem}\n" if template == "plain" else f"Question: {problem}\n{BOXED_INSTRUCTION}\nAnswer:"
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("template 'chat' needs a tokenizer with a chat template; use 'math' or 'plain' for base models")
    content = problem if template == "chat-plain" else f"{problem}\n{BOXED_INSTRUCTION}"
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)

GRADING_KINDS = ("math", "gsm8k", "toy")
MAX_ANSWER_CHARS = 1000  # longest \boxed{} span graded; gold answers are at most ~200 chars
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")  # 1,000  -3  2.5  ("18." -> 18); no inf, no 1e5

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
    """The exact value (a Decimal: no overflow to inf) of a number as _NUMBER reads one ('1,000', '$18'), else None."""
    text = text.replace("$", "").strip()
    return None if _NUMBER.fullmatch(text) is None else Decimal(text.replace(",", ""))

def gsm8k_prediction(completion):
    """The number a GSM8K completion answers: the first after the last '####', else the last in the last \\boxed{},
    else the last number (small chat models echo "within \\boxed{}." after answering in prose)."""
    if "####" in completion:
        found = _NUMBER.findall(completion.rpartition("####")[2])
        return _number(found[0]) if found else None
    found = _NUMBER.findall(last_boxed(completion) or "") or _NUMBER.findall(completion)
    return _number(found[-1]) if found else None

# math-verify runs in a child process, killed by a grade past Grader.timeout (sympy would compute 10^{10^{10}} for
# ever; a process can be stopped from any thread) and restarted by the next grade. It warms up outside any deadline.
_WORKER = r"""
import json, logging, sys
from math_verify import parse, verify
logging.getLogger("math_verify").setLevel(logging.CRITICAL)
def equal(gold, pred):      # both spans in \\boxed{} so that math-verify reads them as LaTeX answers
    g, p = (parse("\\boxed{%s}" % s, parsing_timeout=None) for s in (gold, pred))
    return bool(g) and bool(p) and verify(g, p, timeout_seconds=None)
print(equal("\\frac{1}{2}", "0.5"), flush=True)   # warmed up (sympy's imports): ready
for line in sys.stdin:
    try:
        reply = equal(*json.loads(line))
    except Exception as e:
        reply = repr(e)
    print(json.dumps(reply), flush=True)
"""

class Grader:
    """Reward in {0.0, 1.0}. math: the last \\boxed{...} equivalent to the gold answer (math-verify); gsm8k: the same
    number; toy: the same answer_line(). A failure (or a math grade past `timeout` s) scores 0.0 and counts in .failures."""

    def __init__(self, timeout=3.0):
        self.timeout, self.failures, self._worker, self._lock = timeout, 0, None, threading.Lock()

    def __call__(self, completion, answer, kind):
        if kind not in GRADING_KINDS:  # a caller's bug, not a bad completion: fail loudly
            raise DataError(f"unknown grading kind {kind!r}; known: {', '.join(GRADING_KINDS)}")
        try:
            if not isinstance(completion, str) or answer is None or (pred := answer_of(completion, kind)) is None:
                return 0.0
            if kind == "math":
                return float(self.math_equal(str(answer), pred))
            return float(pred == (_number(str(answer)) if kind == "gsm8k" else str(answer).strip()))
        except Exception:
            self.failures += 1
            return 0.0

    def math_equal(self, gold, pred):
        """math-verify equivalence of two LaTeX answer spans, in the worker; raises past the deadline."""
        with self._lock:  # one request at a time on the worker's pipe
            if self._worker is None or self._worker.poll() is not None:
                self._worker = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                                                stdout=subprocess.PIPE, text=True, bufsize=1)
                self._await_reply(60.0)  # start-up: importing sympy takes a few seconds
            self._worker.stdin.write(json.dumps([gold, pred]) + "\n")     # line-buffered: sent at once
            reply = json.loads(self._await_reply(self.timeout))
        if not isinstance(reply, bool):
            raise RuntimeError(f"grading worker: {reply}")
        return reply

    def _await_reply(self, seconds):
        if not select.select([self._worker.stdout], [], [], seconds)[0]:
            self._worker.kill()
            self._worker.wait()         # reaped: the next grade sees it ended and starts another
            raise TimeoutError(f"grading took more than {seconds} s")
        return self._worker.stdout.readline()

grade = GRADER = Grader()        # grade(completion, answer, kind): see Grader

def answer_line(completion):
    """X from the last line of the form `answer: X` (the toy world's answers), else None; linear time."""
    found = [line.strip()[len("answer:"):].strip() for line in completion.split("\n") if line.strip().startswith("answer:")]
    return found[-1] if found else None

def answer_of(completion, kind):
    """The answer a completion states, read as grade() reads it (None: it states none)."""
    return {"toy": answer_line, "gsm8k": gsm8k_prediction}.get(kind, last_boxed)(completion)

def grading_kind_for(row_or_source):
    """How a row (its own grading_kind, else by its source), or a file or hub id, is graded: toy*, *gsm8k*, else math."""
    row = row_or_source if isinstance(row_or_source, dict) else {"source": row_or_source}
    name = Path(str(row.get("source") or "")).name.lower()  # 'openai/gsm8k' -> 'gsm8k'
    return row.get("grading_kind") or ("toy" if name.startswith("toy") else "gsm8k" if "gsm8k" in name else "math")

def check_gold_answers(rows):
    """Positions of the rows whose gold answer their grading kind cannot read: they could never be rewarded."""
    def readable(answer, kind):
        try:    # a math answer must equal itself
            return _number(answer) is not None if kind == "gsm8k" else kind != "math" or GRADER.math_equal(answer, answer)
        except Exception:
            return False
    return [i for i, row in enumerate(rows) if row.get("answer") is None or not str(row["answer"]).strip()
            or not readable(str(row["answer"]), grading_kind_for(row))]

def load_problems(spec, flag, tokenizer, template, seed, room, context, limit=None):
    """The problems of `spec` that can be rewarded, prompts tokenised, each leaving `room` tokens in the context."""
    rows = load_mixture(spec, seed=seed)[:limit]
    if bad := set(check_gold_answers(rows)):
        print0(f"warning: {flag}: {len(bad)} of {len(rows)} gold answers cannot be read; they are left out")
        rows = [r for i, r in enumerate(rows) if i not in bad]
    if not rows:
        raise UserError(f"{flag} {spec}: no problem has a gold answer to reward against")
    ids = tokenizer([format_prompt(r["problem"], template, tokenizer) for r in rows], add_special_tokens=False)
    for r, prompt_ids in zip(rows, ids["input_ids"]):
        r["prompt_ids"] = prompt_ids
    check_fits_context(rows, room, "prompt + prefix + --max-new-tokens", flag, context)
    return rows
