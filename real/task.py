r"""The tasks SmolLM2-135M-Instruct is measured on: three forms of arithmetic the model solves
sometimes but not always (claim (a) needs greedy pass@1 well between 0 and 100%), each asking for
the answer as a bare number and graded by the project's gsm8k grader (the last number of the
completion; a completion cut off at the token limit is wrong).

    steps        the arithmetic steps of GSM8K worked solutions: the first verified one-operator
                 step of each problem ("She makes 9 * 2 = $18 every day" -> "What is 9 * 2?", 18);
                 train rows from GSM8K train, test rows from GSM8K test (../shared/data or the hub)
    arithmetic   templated: "What is 37 - 18?", two numbers of 1-2 digits, + - or *
    word         templated two-step word problems: "Ann has 7 apples. She buys 5 more and gives 3
                 away. How many apples does she have now?" (a + b - c, never negative)

GSM8K itself is far out of reach of 135M parameters (greedy pass@1 0 of 8 on the easiest test
problems). Each problem ends with INSTRUCTION, so the answer is a number, not prose to be read.
Templated rows are drawn from a seeded generator; their train and test splits never share a
problem.

    from real.task import load_task
    rows = load_task("arithmetic", "test")
    python -m real.task --out runs/smollm2/data             # {task}_{train,test}.jsonl for each task
"""

import argparse
import json
import os
import random
import re

from common import atomic_write_text, run_main
from data import SHARED_DATA_DIR, load_rows

TASKS = ("steps", "arithmetic", "word")
INSTRUCTION = "Answer with the number only."
# "a op b = c": two plain numbers (no thousands commas, no $ before them), one operator, the
# result (a $ allowed before it).
STEP = re.compile(r"(\d+(?:\.\d+)?)\s*([-+*/x])\s*(\d+(?:\.\d+)?)\s*=\s*\$?(\d+(?:\.\d+)?)")
OPERATORS = "+-*/x"
NAMES = (("Ann", "She"), ("Ben", "He"), ("Cara", "She"), ("Dan", "He"), ("Eve", "She"), ("Finn", "He"))
ITEMS = ("apples", "books", "coins", "pencils", "stamps", "marbles")


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


def row(task, i, problem, answer, solution):
    return {"id": f"{task}-{i}", "problem": f"{problem} {INSTRUCTION}", "answer": str(answer),
            "solution": f"{solution} The answer is {answer}.", "domain": "math", "source": task,
            "grading_kind": "gsm8k"}


def steps_rows(split, data_dir=None):
    local = os.path.join(data_dir or SHARED_DATA_DIR, f"gsm8k_{split}.jsonl")
    rows = []
    for r in load_rows(local if os.path.isfile(local) else "openai/gsm8k", domain="math", split=split):
        found = steps_of(r.get("solution") or "")
        if found:
            a, op, b, c = found[0]
            rows.append(row("steps", r["id"], f"What is {a} {op} {b}?", c, f"{a} {op} {b} = {c}."))
    return rows


def templated_rows(task, n=2000):
    """n distinct problems of a templated task, in a seeded order (the same on every machine)."""
    rng, seen, rows = random.Random(f"real-{task}"), set(), []
    while len(rows) < n:
        if task == "arithmetic":
            a, b, op = rng.randint(2, 49), rng.randint(2, 49), rng.choice("+-*")
            if op == "*":
                b = rng.randint(2, 9)
            a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
            answer = {"+": a + b, "-": a - b, "*": a * b}[op]
            problem, solution = f"What is {a} {op} {b}?", f"{a} {op} {b} = {answer}."
        else:
            (name, pronoun), item = rng.choice(NAMES), rng.choice(ITEMS)
            a, b = rng.randint(2, 20), rng.randint(2, 20)
            c = rng.randint(1, a + b - 1)
            answer = a + b - c
            problem = (f"{name} has {a} {item}. {pronoun} buys {b} more and gives {c} away. "
                       f"How many {item} does {name} have now?")
            solution = f"{a} + {b} = {a + b}, {a + b} - {c} = {answer}."
        if problem not in seen:
            seen.add(problem)
            rows.append(row(task, len(rows), problem, answer, solution))
    return rows


def load_task(task, split="test", data_dir=None):
    """Rows {"id", "problem", "answer", "solution", "domain", "source", "grading_kind"} of a task's
    split; the templated tasks' test split is their first 500 problems, train the rest."""
    if task == "steps":
        return steps_rows(split, data_dir)
    rows = templated_rows(task)
    return rows[:500] if split == "test" else rows[500:]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/smollm2/data", help="directory for {task}_{train,test}.jsonl")
    args = parser.parse_args()
    for task in TASKS:
        for split in ("train", "test"):
            rows = load_task(task, split)
            path = os.path.join(args.out, f"{task}_{split}.jsonl")
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
            print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    run_main(main)
