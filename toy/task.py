"""The toy reasoning world: three task families whose problems can be solved by several
genuinely different strategies, each written as a short worked trace.

The families play the roles of the paper's domains (math, code, QA). What matters for
Reasoning Palette is that one problem admits several *strategies*, not paraphrases, so a
latent prefix has something to choose between. Every strategy has a recognisable first
line, so `detect_strategy` can report which strategy a sampled completion followed.

    domain  problem                                  strategies
    math    47+38=?                                  column, round, split
    code    sum([4,7,2,9])                           running, pairwise
    qa      ann 3 red, bob 2 blue, cat 4 red. red?   filter, complement

Example traces (every solution ends with the line `answer: <answer>`):

    math/column    math/round    math/split    code/running   code/pairwise
    7+8=15 c1      38=40-2       47+30=77      s=4            [4+7,2+9]=[11,11]
    4+3+1=8 c0     47+40=87      77+8=85       s=4+7=11       [11+11]=[22]
    answer: 85     87-2=85       answer: 85    s=11+2=13      answer: 22
                   answer: 85                  s=13+9=22
                                               answer: 22
    qa/filter      qa/complement
    ann 3, cat 4   all 3+2+4=9
    3+4=7          other 2=2
    answer: 7      9-2=7
                   answer: 7

`verify_solution` checks a trace by executing it: every step is parsed and its arithmetic
recomputed, every step must consume the right inputs (digits of the operands, the previous
step's result, the facts of the question), and the final answer must equal the answer
computed independently from the problem text.

Try it: python -m toy.task            (prints one example per strategy)
        python -m toy.task --domain math --n 1000 --seed 0 --out math.jsonl

The premise setting (`python -m toy.build_world --setting premise`, section "The premise
setting" below) reuses these problems, strategies and checks to build a world in which the
paper's premise holds by construction: one dominant math strategy, a problem family on which
only the minority strategies are right, and a one-token preamble that moves the choice.
"""

import json
import random
import re
import string

import data
from data import answer_line

DOMAINS = ("math", "code", "qa")
STRATEGIES = {
    "math": ("column", "round", "split"),
    "code": ("running", "pairwise"),
    "qa": ("filter", "complement"),
}
# Default difficulty per domain; an int fixes a knob, a (lo, hi) pair draws it uniformly.
DIFFICULTY = {
    "math": {"digits": (2, 3)},  # digits of each operand
    "code": {"length": (3, 5), "max_value": 9},  # list length, largest element
    "qa": {"facts": (3, 4), "max_count": 9},  # facts in the question, largest count
}
NAMES = ("ann", "bob", "cat", "dan", "eve", "fay", "gus", "hal", "ivy", "jon")
COLORS = ("red", "blue", "green")

# Every character the task can produce (a superset: all lowercase letters, so names and
# colours can be changed without touching the tokenizer).
CHARSET = "".join(sorted(set(string.digits + string.ascii_lowercase + " \n+-=:,.?()[]")))

ANSWER_PREFIX = "answer:"

# -----------------------------------------------------------------------------
# Problems: parameters <-> text

def _draw(rng, knob):
    """An int knob is used as is; a (lo, hi) pair is drawn uniformly, inclusive."""
    return knob if isinstance(knob, int) else rng.randint(knob[0], knob[1])


def make_problem(domain, rng, **difficulty):
    """Draw the parameters of one problem, e.g. {"domain": "math", "a": 47, "b": 38}.

    Knobs (see DIFFICULTY): math digits; code length, max_value; qa facts, max_count.
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}, expected one of {DOMAINS}")
    unknown = set(difficulty) - set(DIFFICULTY[domain])
    if unknown:
        raise ValueError(f"unknown difficulty knobs for {domain}: {sorted(unknown)}")
    knobs = {**DIFFICULTY[domain], **difficulty}
    if domain == "math":
        def number():
            n = _draw(rng, knobs["digits"])
            return rng.randint(10 ** (n - 1), 10**n - 1)
        return {"domain": "math", "a": number(), "b": number()}
    if domain == "code":
        n = _draw(rng, knobs["length"])
        return {"domain": "code", "xs": [rng.randint(1, knobs["max_value"]) for _ in range(n)]}
    # qa: at least one fact of the asked colour and one of another, so both strategies
    # have something to do (filter finds the matches, complement subtracts the rest).
    n = _draw(rng, knobs["facts"])
    if n < 2:
        raise ValueError("qa needs facts >= 2")
    asked = rng.choice(COLORS)
    colors = [asked, rng.choice([c for c in COLORS if c != asked])]
    colors += [rng.choice(COLORS) for _ in range(n - 2)]
    rng.shuffle(colors)
    names = rng.sample(NAMES, n)
    facts = [(name, rng.randint(1, knobs["max_count"]), c) for name, c in zip(names, colors)]
    return {"domain": "qa", "facts": facts, "asked": asked}


def format_problem(params):
    """Problem text for a parameter dict from make_problem."""
    d = params["domain"]
    if d == "math":
        return f"{params['a']}+{params['b']}=?"
    if d == "code":
        return f"sum([{','.join(map(str, params['xs']))}])"
    facts = ", ".join(f"{name} {count} {color}" for name, count, color in params["facts"])
    return f"{facts}. {params['asked']}?"


def _int(s):
    """Parse a plain non-negative decimal integer; ValueError on anything else."""
    if not s or len(s) > 40 or not all("0" <= ch <= "9" for ch in s):
        raise ValueError(f"not an integer: {s[:20]!r}")
    return int(s)


def parse_problem(text, domain):
    """Inverse of format_problem; ValueError if the text is not a toy problem."""
    if domain == "math":
        if not text.endswith("=?"):
            raise ValueError("math problem must end with '=?'")
        a, b = text[:-2].split("+")
        return {"domain": "math", "a": _int(a), "b": _int(b)}
    if domain == "code":
        if not (text.startswith("sum([") and text.endswith("])")):
            raise ValueError("code problem must look like sum([...])")
        return {"domain": "code", "xs": [_int(x) for x in text[5:-2].split(",")]}
    if domain == "qa":
        body, asked = text.rsplit(". ", 1)
        if not asked.endswith("?"):
            raise ValueError("qa problem must end with '<colour>?'")
        facts = []
        for fact in body.split(", "):
            name, count, color = fact.split(" ")
            facts.append((name, _int(count), color))
        return {"domain": "qa", "facts": facts, "asked": asked[:-1]}
    raise ValueError(f"unknown domain {domain!r}")


def true_answer(params):
    """The answer computed directly from the parameters, with no trace involved."""
    d = params["domain"]
    if d == "math":
        return str(params["a"] + params["b"])
    if d == "code":
        return str(sum(params["xs"]))
    return str(sum(n for _, n, c in params["facts"] if c == params["asked"]))

# -----------------------------------------------------------------------------
# Strategies: parameters -> worked trace

def _digit(n, i):
    """i-th decimal digit of n counting from the right (0 beyond its length)."""
    return n // 10**i % 10


def _column(a, b):
    # Right to left, one digit pair per line; "+1" adds the carry, cK states the new one.
    lines, carry, ones = [], 0, []
    for i in range(max(len(str(a)), len(str(b)))):
        x, y = _digit(a, i), _digit(b, i)
        s = x + y + carry
        lines.append(f"{x}+{y}{'+1' if carry else ''}={s} c{s // 10}")
        carry, ones = s // 10, [s % 10] + ones
    return lines


def _round(a, b):
    # Round b up to the next multiple of ten, add that, then take the excess back off.
    r = -(-b // 10) * 10
    return [f"{b}={r}-{r - b}", f"{a}+{r}={a + r}", f"{a + r}-{r - b}={a + b}"]


def _place_parts(b):
    """Non-zero place values of b, largest first: 305 -> [300, 5]."""
    return [int(ch) * 10**i for i, ch in reversed(list(enumerate(reversed(str(b))))) if ch != "0"]


def _split(a, b):
    # Add b one place value at a time, largest first, keeping a running total.
    lines, total = [], a
    for part in _place_parts(b):
        lines.append(f"{total}+{part}={total + part}")
        total += part
    return lines


def _running(xs):
    # A loop with an accumulator s, one iteration per line.
    lines, s = [f"s={xs[0]}"], xs[0]
    for x in xs[1:]:
        lines.append(f"s={s}+{x}={s + x}")
        s += x
    return lines


def _pairwise(xs):
    # Tree reduction: add neighbours pairwise, one level per line, an odd last one carried.
    lines, level = [], list(xs)
    while len(level) > 1:
        terms = [level[i:i + 2] for i in range(0, len(level), 2)]
        lhs = ",".join("+".join(map(str, t)) for t in terms)
        level = [sum(t) for t in terms]
        lines.append(f"[{lhs}]=[{','.join(map(str, level))}]")
    return lines


def _filter(facts, asked):
    # Pick out the facts about the asked colour, then add their counts.
    hits = [(name, n) for name, n, c in facts if c == asked]
    counts = [n for _, n in hits]
    return [", ".join(f"{name} {n}" for name, n in hits),
            f"{'+'.join(map(str, counts))}={sum(counts)}"]


def _complement(facts, asked):
    # Count everything, count what is not the asked colour, subtract.
    every = [n for _, n, _ in facts]
    other = [n for _, n, c in facts if c != asked]
    return [f"all {'+'.join(map(str, every))}={sum(every)}",
            f"other {'+'.join(map(str, other))}={sum(other)}",
            f"{sum(every)}-{sum(other)}={sum(every) - sum(other)}"]


def solve(problem, strategy):
    """Worked trace for a problem (a row with "problem" and "domain", or make_problem's
    parameters) by the named strategy. The last line is `answer: <answer>`."""
    params = parse_problem(problem["problem"], problem["domain"]) if "problem" in problem else problem
    d = params["domain"]
    if strategy not in STRATEGIES[d]:
        raise ValueError(f"unknown strategy {strategy!r} for {d}, expected one of {STRATEGIES[d]}")
    if d == "math":
        lines = {"column": _column, "round": _round, "split": _split}[strategy](params["a"], params["b"])
    elif d == "code":
        lines = {"running": _running, "pairwise": _pairwise}[strategy](params["xs"])
    else:
        lines = {"filter": _filter, "complement": _complement}[strategy](params["facts"], params["asked"])
    return "\n".join(lines + [f"{ANSWER_PREFIX} {true_answer(params)}"])

# -----------------------------------------------------------------------------
# Datasets

def generate(domain, n, seed, strategies=None, exclude=None, **difficulty):
    """n problems of one domain as rows of the project schema, deterministic given seed.

    strategies: None draws one strategy per problem from all of the domain's (a training
    corpus); a list draws from that list; "all" solves every problem with every strategy
    (n * k rows, the same problem side by side in each strategy).
    exclude: problem texts to skip, e.g. a training set's, so a held-out set is disjoint
    (small digit counts have few distinct problems, so overlap is otherwise likely).
    """
    rng = random.Random(f"toy-{domain}-{seed}")  # a string seed: stable across Python runs
    every = strategies == "all"
    if isinstance(strategies, str) and not every:
        strategies = [strategies]
    pool = list(STRATEGIES[domain]) if strategies in (None, "all") else list(strategies)
    for s in pool:
        if s not in STRATEGIES[domain]:
            raise ValueError(f"unknown strategy {s!r} for {domain}, expected one of {STRATEGIES[domain]}")
    rows = []
    draws = distinct_problems(n, lambda: make_problem(domain, rng, **difficulty), exclude,
                              f"{domain} problems; raise the difficulty knobs")
    for index, (text, params) in enumerate(draws):
        for strategy in (pool if every else [rng.choice(pool)]):
            rows.append({
                "id": f"toy-{domain}-{seed}-{index}" + (f"-{strategy}" if every else ""),
                "problem": text,
                "solution": solve(params, strategy),
                "answer": true_answer(params),
                "domain": domain,
                "source": "toy",
                "strategy": strategy,
            })
    return rows


def distinct_problems(n, draw, exclude, what):
    """Yield (text, params) for n problems of draw() whose texts differ from each other and from
    exclude's; draw is called lazily, so a caller's own rng calls between yields keep their order."""
    exclude, seen, tries = set(exclude or ()), set(), 0
    while len(seen) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise ValueError(f"could not draw {n} distinct {what}")
        params = draw()
        text = format_problem(params)
        if text in seen or text in exclude:
            continue
        seen.add(text)
        yield text, params


def write_jsonl(rows, path):
    """One JSON object per line."""
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")

# -----------------------------------------------------------------------------
# Reading completions: answer extraction, grading, strategy detection

def extract_answer(completion):
    """X from the last line of the form `answer: X` (data.answer_line, the toy grading kind's
    reading), None for anything that is not text."""
    return answer_line(completion) if isinstance(completion, str) else None


def grade(completion, answer):
    """Reward 1.0 iff the last `answer:` line of the completion states the answer, else 0.0: the
    project's grader under the toy grading kind. Never raises."""
    return data.grade(completion, answer, "toy")


# The first line of a trace identifies its strategy by its form alone. Only the first
# line is matched (anchored, no nested repetition), so this is cheap on any input.
_OPENINGS = (
    ("column", re.compile(r"\d\+\d=\d+ c[01]")),      # 7+8=15 c1
    ("round", re.compile(r"\d+=\d+-\d+")),            # 38=40-2
    ("split", re.compile(r"\d+\+\d+=\d+")),           # 47+30=77
    ("running", re.compile(r"s=\d+")),                # s=4
    ("pairwise", re.compile(r"\[[\d+,]*\]=\[[\d,]*\]")),  # [4+7,2+9]=[11,11]
    ("filter", re.compile(r"[a-z]+ \d+(, [a-z]+ \d+)*")),  # ann 3, cat 4
    ("complement", re.compile(r"all [\d+]+=\d+")),    # all 3+2+4=9
)


def detect_strategy(solution_text):
    """Name of the strategy whose opening line the text has, or None."""
    if not isinstance(solution_text, str):
        return None
    first = solution_text.lstrip().split("\n", 1)[0].strip()[:200]
    for name, pattern in _OPENINGS:
        if pattern.fullmatch(first):
            return name
    return None

# -----------------------------------------------------------------------------
# Verification: execute the trace

def _need(cond, what):
    if not cond:
        raise ValueError(what)


def _sum_eq(text):
    """'3+4=7' -> ([3, 4], 7), after checking that the sum is right."""
    lhs, rhs = text.split("=")
    terms, total = [_int(t) for t in lhs.split("+")], _int(rhs)
    _need(sum(terms) == total, f"wrong sum: {text}")
    return terms, total


def _sub_eq(text):
    """'87-2=85' -> (87, 2, 85), after checking that the difference is right."""
    lhs, rhs = text.split("=")
    x, y = lhs.split("-")
    x, y, z = _int(x), _int(y), _int(rhs)
    _need(x - y == z, f"wrong difference: {text}")
    return x, y, z


def _check_math(p, strategy, steps):
    a, b = p["a"], p["b"]
    if strategy == "column":
        _need(len(steps) == max(len(str(a)), len(str(b))), "one line per digit")
        carry, ones = 0, ""
        for i, step in enumerate(steps):
            eq, c = step.split(" c")
            terms, s = _sum_eq(eq)
            _need(terms == [_digit(a, i), _digit(b, i)] + ([1] if carry else []), f"wrong digits: {step}")
            carry = _int(c)
            _need(carry == s // 10, f"wrong carry: {step}")
            ones = str(s % 10) + ones
        return str(int(("1" if carry else "") + ones))
    if strategy == "round":
        _need(len(steps) == 3, "round takes three lines")
        lhs, rhs = steps[0].split("=")
        r, d, b2 = _sub_eq(f"{rhs}={lhs}")  # "38=40-2" checked as "40-2=38"
        _need(b2 == b and r % 10 == 0 and d < 10, f"not b rounded up to ten: {steps[0]}")
        (x, r2), t = _sum_eq(steps[1])
        _need(x == a and r2 == r, f"does not add the rounded number: {steps[1]}")
        t2, d2, result = _sub_eq(steps[2])
        _need(t2 == t and d2 == d, f"does not take the excess off: {steps[2]}")
        return str(result)
    # split
    total = a
    parts = []
    for step in steps:
        (x, part), new = _sum_eq(step)
        _need(x == total, f"does not continue from the running total: {step}")
        parts.append(part)
        total = new
    _need(parts == _place_parts(b), "does not add b place by place")
    return str(total)


def _check_code(p, strategy, steps):
    xs = p["xs"]
    if strategy == "running":
        _need(len(steps) == len(xs) and steps[0] == f"s={xs[0]}", "running sum starts at s=x0")
        s = xs[0]
        for step, x in zip(steps[1:], xs[1:]):
            _need(step.startswith("s="), f"not an update of s: {step}")
            (prev, y), s2 = _sum_eq(step[2:])
            _need(prev == s and y == x, f"wrong operands: {step}")
            s = s2
        return str(s)
    # pairwise
    level = list(xs)
    for step in steps:
        _need(step.startswith("[") and step.endswith("]"), f"not a level: {step}")
        lhs, rhs = step[1:-1].split("]=[")
        terms = [[_int(t) for t in term.split("+")] for term in lhs.split(",")]
        outs = [_int(v) for v in rhs.split(",")]
        _need([x for t in terms for x in t] == level, f"does not reduce the previous level: {step}")
        _need(all(len(t) <= 2 for t in terms) and len(terms) == (len(level) + 1) // 2, f"not pairwise: {step}")
        _need(outs == [sum(t) for t in terms], f"wrong sums: {step}")
        level = outs
    _need(len(level) == 1, "reduction does not finish")
    return str(level[0])


def _check_qa(p, strategy, steps):
    facts, asked = p["facts"], p["asked"]
    hits = [n for _, n, c in facts if c == asked]
    if strategy == "filter":
        _need(len(steps) == 2, "filter takes two lines")
        _need(steps[0] == ", ".join(f"{name} {n}" for name, n, c in facts if c == asked),
              f"wrong facts picked: {steps[0]}")
        terms, total = _sum_eq(steps[1])
        _need(terms == hits, f"does not add the picked counts: {steps[1]}")
        return str(total)
    _need(len(steps) == 3 and steps[0].startswith("all ") and steps[1].startswith("other "),
          "complement takes all / other / difference")
    every, total = _sum_eq(steps[0][4:])
    other, rest = _sum_eq(steps[1][6:])
    _need(every == [n for _, n, _ in facts], f"not all counts: {steps[0]}")
    _need(other == [n for _, n, c in facts if c != asked], f"not the other counts: {steps[1]}")
    t, o, result = _sub_eq(steps[2])
    _need((t, o) == (total, rest), f"does not subtract the two totals: {steps[2]}")
    return str(result)


def verify_solution(row):
    """True iff row["solution"] is a correct trace for row["problem"] in some strategy.

    Executes the trace: each step's arithmetic is recomputed, each step must use the
    right inputs, the trace's own result must match its `answer:` line, and that answer
    must equal the one computed from the problem's parameters (and row["answer"] if given).
    """
    try:
        params = parse_problem(row["problem"], row["domain"])
        strategy = detect_strategy(row["solution"])
        _need(strategy in STRATEGIES[params["domain"]], "no strategy of this domain")
        *steps, last = row["solution"].split("\n")
        _need(last.startswith(ANSWER_PREFIX + " "), "no final answer line")
        stated = last[len(ANSWER_PREFIX) + 1:]
        check = {"math": _check_math, "code": _check_code, "qa": _check_qa}[params["domain"]]
        result = check(params, strategy, steps)
        truth = true_answer(params)
        _need(result == stated == truth, "answer does not follow / is wrong")
        _need(row.get("answer") in (None, truth), "row answer is wrong")
        return True
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return False


# -----------------------------------------------------------------------------
# The premise setting: a world where token sampling rarely changes the strategy, a minority
# strategy wins on one family of problems, and context moves the choice
#
# The default world draws every strategy equally often, so plain sampling already explores
# strategies and the paper's premise fails there. The premise setting changes only the math
# part of the pretraining corpus (code and qa keep the default generator), in three ways:
#
# 1. A dominant strategy. Math traces without a preamble use column with probability 0.94,
#    round and split 0.03 each (PREMISE_STRATEGY_WEIGHTS). A model trained on this picks
#    column nearly always, and picks it on the first token: a confident early choice that
#    temperature-1 sampling rarely overturns, as with the first tokens of real models.
# 2. A family where the dominant strategy is wrong. A "ripple" problem has a column whose two
#    digits sum to 9 and that receives a carry, so the carry runs on (45+55, 199+1). The corpus's
#    column traces on ripple problems drop that carry, the classic slip of a written-addition
#    learner ("4+5=9 c0" where "4+5+1=10 c1" is right), and state the answer that follows from
#    it, which is wrong. So the dominant procedure a model learns from this corpus has a
#    systematic bug on exactly this family, while the corpus's round and split traces are
#    correct on every problem. Half of all math problems in this setting are ripple
#    problems (RIPPLE_SHARE; about 8% of random 2-3 digit pairs are), so the family is large
#    enough to matter for reward. Held-out, RL and VAE data hold correct traces only.
# 3. Context moves the choice. Half of the math pretraining traces (PREAMBLE_SHARE) have a
#    one-token preamble right before the problem ("-47+38=?"): the character that marks the
#    strategy's traces (PREAMBLE_CUES: "c" of column's carries, "-" of round's subtraction, "0"
#    of split's place values; no problem starts with any of them). Those traces draw their
#    strategy uniformly, and the preamble names the same strategy 90% of the time
#    (PREAMBLE_MATCH). The model thus learns that the token before a question chooses the
#    strategy. One token is the shape of a one-token prefix (L = 1), and the cue is the
#    character that distinguishes that strategy's traces, which is also what distinguishes the
#    mean-pooled trace embeddings the VAE is trained on. A prefix in embedding space therefore
#    has something to move; whether a given prefix source moves it is a measurement
#    (toy/premise.py), not an assumption. The preamble traces also give the minority strategies
#    most of their examples; how well a small model learns to execute them is measured too.
#
# Rows of this setting carry two more fields: "family" (plain or ripple) and "preamble" (the
# token before the problem, "" for none). "problem" stays the bare problem, so parse_problem,
# solve and verify_solution apply unchanged; a slipped trace fails verify_solution.

MATH_FAMILIES = ("plain", "ripple")
PREMISE_STRATEGY_WEIGHTS = {"column": 0.94, "round": 0.03, "split": 0.03}
PREAMBLE_CUES = {"column": "c", "round": "-", "split": "0"}
PREAMBLE_SHARE = 0.5
PREAMBLE_MATCH = 0.9
RIPPLE_SHARE = 0.5


def math_family(params):
    """"ripple" if some digit column sums to 9 and receives a carry (the carry runs on through
    it), else "plain". params: make_problem's math parameters or a row with "problem"."""
    p = parse_problem(params["problem"], "math") if "problem" in params else params
    a, b, carry = p["a"], p["b"], 0
    for i in range(max(len(str(a)), len(str(b)))):
        x, y = _digit(a, i), _digit(b, i)
        if carry and x + y == 9:
            return "ripple"
        carry = (x + y + carry) // 10
    return "plain"


def _slipped_column(a, b):
    # Column addition that drops a carry running into a column whose digits sum to 9: that
    # column is written "x+y=9 c0" and nothing is carried on. Lines and the stated result
    # follow the slip consistently, so the trace reads like a confident but wrong one.
    lines, carry, digits = [], 0, []
    for i in range(max(len(str(a)), len(str(b)))):
        x, y = _digit(a, i), _digit(b, i)
        if carry and x + y == 9:
            carry = 0                        # the slip: the incoming carry is forgotten
        s = x + y + carry
        lines.append(f"{x}+{y}{'+1' if carry else ''}={s} c{s // 10}")
        carry, digits = s // 10, [s % 10] + digits
    result = int(("1" if carry else "") + "".join(map(str, digits)))
    return lines, str(result)


def slipped_column_solution(params):
    """The corpus's column trace for a problem in the premise setting: correct on plain
    problems (equal to solve(params, "column")), the slipped, wrong one on ripple problems."""
    p = parse_problem(params["problem"], "math") if "problem" in params else params
    lines, result = _slipped_column(p["a"], p["b"])
    return "\n".join(lines + [f"{ANSWER_PREFIX} {result}"])


def make_preamble(strategy):
    """The one-token preamble that cues `strategy`: "c" (column), "-" (round), "0" (split)."""
    return PREAMBLE_CUES[strategy]


def preamble_strategy(preamble):
    """The strategy a preamble cues, or None."""
    return {cue: s for s, cue in PREAMBLE_CUES.items()}.get(preamble)


def _draw_math_family(rng, family, **difficulty):
    """make_problem("math") redrawn until its family is `family`."""
    while True:
        params = make_problem("math", rng, **difficulty)
        if math_family(params) == family:
            return params


def generate_premise_math(n, seed, exclude=None, weights=None, preamble_share=0.0, slip=False,
                          ripple_share=RIPPLE_SHARE, **difficulty):
    """n distinct math problems of the premise setting as rows (deterministic given seed), with
    the extra fields "family" and "preamble".

    weights: strategy -> probability for rows without a preamble (None: all strategies equally
    often, as in the default world). preamble_share: the fraction of rows with a preamble; their
    strategy is uniform and the preamble shows it with probability PREAMBLE_MATCH, another
    strategy otherwise. slip: column traces of ripple problems are the slipped ones (the
    pretraining corpus only). ripple_share: the fraction of ripple problems.
    """
    rng = random.Random(f"toy-premise-math-{seed}")
    strategies = STRATEGIES["math"]
    weights = weights or {s: 1 / len(strategies) for s in strategies}
    if set(weights) != set(strategies):
        raise ValueError(f"weights must name exactly the math strategies {strategies}")
    def draw():
        family = "ripple" if rng.random() < ripple_share else "plain"
        return dict(_draw_math_family(rng, family, **difficulty), family=family)

    rows = []
    for text, params in distinct_problems(n, draw, exclude, "premise math problems; raise the digits"):
        family = params["family"]
        preamble = ""
        if rng.random() < preamble_share:
            strategy = rng.choice(strategies)
            shown = strategy if rng.random() < PREAMBLE_MATCH else rng.choice(
                [s for s in strategies if s != strategy])
            preamble = make_preamble(shown)
        else:
            strategy = rng.choices(strategies, weights=[weights[s] for s in strategies])[0]
        solution = (slipped_column_solution(params) if slip and strategy == "column"
                    else solve(params, strategy))
        rows.append({
            "id": f"toy-premise-math-{seed}-{len(rows)}",
            "problem": text,
            "solution": solution,
            "answer": true_answer(params),
            "domain": "math",
            "source": "toy",
            "strategy": strategy,
            "family": family,
            "preamble": preamble,
        })
    return rows

if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--domain", choices=DOMAINS, default=None, help="default: print examples")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON-lines path; default stdout")
    args = parser.parse_args()
    if args.domain is None:
        for domain in DOMAINS:
            for row in generate(domain, 1, seed=args.seed, strategies="all"):
                print(f"--- {domain}/{row['strategy']}\n{row['problem']}\n{row['solution']}")
    else:
        rows = generate(args.domain, args.n, args.seed)
        if args.out:
            write_jsonl(rows, args.out)
        else:
            for row in rows:
                print(json.dumps(row))
