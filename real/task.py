r"""The real task SmolLM2-135M-Instruct is measured on: the arithmetic steps of GSM8K solutions.

Each row is one calculation that a GSM8K worked solution performs, with one operator and two
numbers, asked as a question: the solution line "She makes 9 * 2 = $18 every day" becomes
"What is 9 * 2?" with the answer 18. Only steps whose stated result is right are kept, and one
step per GSM8K problem (its first), so rows do not repeat one problem. Train rows come from GSM8K
train (../shared/data/gsm8k_train.jsonl, or openai/gsm8k from the hub), test rows from GSM8K test.
Grading is the project's: data.grade(completion, answer, "gsm8k") (the rows' source names gsm8k,
so every stage picks that grader by itself).

Why this task. The paper's claim (a) is measured on a task the model solves sometimes but not
always: greedy pass@1 between 10% and 60%. GSM8K itself is far out of reach of 135M parameters.
Greedy pass@1 under the chat template (data.format_prompt(..., "chat")), 200 new tokens:
    GSM8K test, the easiest problems (two solution lines)            0 / 8
    GSM8K, every problem solved by one calculation (25 in all)        2 / 25, one of them by luck
    GSM8K test, two-line problems with the first line given           0 / 27
    MATH-500 level 1                                                  0 / 27 (no \boxed{} ever)
This task, 60 test problems (load_task("test", limit=60), seed 0):
    64 new tokens                                                     23.3% (14 / 60)
    128 new tokens                                                    35.0% (21 / 60)
    python -m real.task --out runs/smollm2/data
    python evaluate.py --model runs/smollm2/model --benchmarks runs/smollm2/data/task_test.jsonl \
        --limit 60 --template chat --mode sample --temperature 0 -n 1 --max-new-tokens 64 --out OUT
By operation (128 new tokens): * 10/19, x 4/7, - 3/12, + 2/14, / 2/8. So it is a task the model
solves sometimes, by prose reasoning it can get wrong, which is what claim (a) needs; it is
arithmetic, not GSM8K's multi-step word problems, and the report says so.
The model answers in prose ("1. 3 * 2 = 6\n\nSo the answer is 6.") and never in \boxed{}; the
gsm8k grader reads the last number of the completion, and since the model often closes with
"The answer is within \boxed{}." (an empty box, the prompt's instruction echoed), it reads the
last number when the box holds none. A completion cut off at max_new_tokens is scored wrong.

    from real.task import load_task
    rows = load_task("test", limit=60)                      # a seeded subset of the test split
    python -m real.task --out runs/smollm2/data             # task_train.jsonl, task_test.jsonl
"""

import argparse
import json
import os
import random
import re

from common import atomic_write_text, run_main
from data import SHARED_DATA_DIR, load_rows

NAME = "gsm8k_steps"
# "a op b = c": two plain numbers (no thousands commas, no $ before them), one operator, the
# result (a $ allowed before it).
STEP = re.compile(r"(\d+(?:\.\d+)?)\s*([-+*/x])\s*(\d+(?:\.\d+)?)\s*=\s*\$?(\d+(?:\.\d+)?)")
OPERATORS = "+-*/x"


def steps_of(solution):
    """The verified one-operator steps of a worked solution: [(a, op, b, c)] as written. A step
    inside a longer chain ("2+1=3+4=7", "5*3-2=13") is not one: nothing but text may come before
    a, and no operator after c."""
    found = []
    for m in STEP.finditer(solution):
        before, after = solution[:m.start()].rstrip(), solution[m.end():].lstrip()
        if (before and before[-1] in OPERATORS + "=$,0123456789") or \
                (after[:1] in tuple(OPERATORS) and re.match(r".\s*\$?\d", after)) or after[:1].isdigit():
            continue
        a, op, b, c = m.groups()
        x, y = float(a), float(b)
        value = {"+": x + y, "-": x - y, "*": x * y, "x": x * y, "/": x / y if y else None}[op]
        if value is not None and abs(value - float(c)) <= 1e-9 * max(1.0, abs(value)):
            found.append((a, op, b, c))
    return found


def load_task(split="test", limit=None, seed=0, data_dir=None):
    """Rows {"id", "problem", "answer", "solution", "domain", "source"} of the task; `limit` keeps
    a seeded random subset (in file order), the same one for every caller with the same seed."""
    local = os.path.join(data_dir or SHARED_DATA_DIR, f"gsm8k_{split}.jsonl")
    source = local if os.path.isfile(local) else "openai/gsm8k"
    rows = []
    for row in load_rows(source, domain="math", split=split):
        steps = steps_of(row.get("solution") or "")
        if steps:
            a, op, b, c = steps[0]
            rows.append({"id": f"{row['id']}/step", "problem": f"What is {a} {op} {b}?", "answer": c,
                         "solution": f"{a} {op} {b} = {c}", "domain": "math", "source": NAME})
    if limit is not None and limit < len(rows):
        keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
        rows = [rows[i] for i in keep]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/smollm2/data", help="directory for task_{train,test}.jsonl")
    args = parser.parse_args()
    for split in ("train", "test"):
        rows = load_task(split)
        path = os.path.join(args.out, f"task_{split}.jsonl")
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    run_main(main)
