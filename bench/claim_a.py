r"""Claim (a) on a real model, one engine for every row: does sampling a latent per candidate give
strategy-level diversity without a pass@1 cost? For one policy, on each task's held-out problems,
--candidates answers per problem under each decoding row:

    greedy          one greedy answer, no prefix
    T=0.7, T=1      token sampling, no prefix
    noise, rsp, random_decoder, vae, vae:math
                    greedy under a prefix of --L vectors per candidate from that source (the VAE's
                    prior, or its math region), the latents of problem i seeded by (--seed, i)
    lorem           greedy under --lorem-L tokens of pseudo-Latin and the boundary instruction
    SOURCE@T=t      prefixes on top of sampling: each candidate sampled at temperature t under its
                    own prefix from SOURCE (drawn as in the row SOURCE), or under none (none@T=t).
                    Candidate j of a problem draws its sampling noise from derived_seed(--seed,
                    problem id, j) in every such row (model.keyed_uniform), so vae@T=0.7 and
                    none@T=0.7 differ by the prefix alone, and a row's samples do not depend on
                    --batch-size. The rows T=0.7 and T=1 keep the batch's generator their
                    published numbers came from.

Per row and task: pass@1 (the mean over candidates), unbiased pass@k for k up to --candidates,
each with a 95% interval over problems (the problems are the sample; latents and samples are fixed
by seed); distinct answers per problem (and each problem's count, for paired differences); the
shares cut off at --max-new-tokens (scored wrong) and broken (empty or one repeated token). The
VAE's prefixes are at its vae.json's prefix_scale. Rows go to --out/results.json as they finish (a
rerun skips them), each candidate to --out/samples/LABEL/TASK/ROW.jsonl (every number of a row can
be recomputed from it); --out/results.md is the table.

    python bench/claim_a.py --model runs/smollm2/model --label converted --vae runs/smollm2/vae \
        --tasks arithmetic=runs/smollm2/data/arithmetic_test.jsonl,word=runs/smollm2/data/word_test.jsonl \
        --offset 40 --problems 100 --out runs/smollm2/claim_a
runs/smollm2.sh drives it (the protocol: docs/smollm2_protocol.md).
"""
import argparse
import json
import os
import random
import sys
import time
from decimal import Decimal
from typing import NamedTuple, Optional

import torch
from filelock import FileLock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import atomic_write_json, atomic_write_text, derived_seed  # noqa: E402
from data import answer_of, format_prompt, grade, load_rows  # noqa: E402
from diagnostics import is_broken  # noqa: E402
from evaluate import pass_at_k, problem_keys  # noqa: E402
from model import PREFIX_SOURCES, generate, load_policy, make_prefix_source, prefix_class  # noqa: E402
from real.report import mean_ci  # noqa: E402

ROWS = ("greedy", "T=0.7", "T=1", "noise", "rsp", "random_decoder", "lorem", "vae", "vae:math")
DEFAULT_ROWS = "greedy,T=0.7,T=1,noise,rsp,lorem,vae,vae:math"          # the protocol's


class Decoding(NamedTuple):
    """What a row name asks for."""
    source: Optional[str]   # a PREFIX_SOURCES name, None: no prefix
    region: Optional[str]   # the VAE's latent region (vae:math), None: the prior
    temperature: float      # 0: greedy
    keyed: bool             # sampling noise keyed by (problem, candidate), not by the batch


def decoding_of(row):
    """A row name -> its Decoding; an unknown name is a one-line argparse error."""
    if row in ("greedy", "T=0.7", "T=1"):
        return Decoding(None, None, {"greedy": 0.0, "T=0.7": 0.7, "T=1": 1.0}[row], False)
    prefix, at, t = row.partition("@T=")
    name, _, region = prefix.partition(":")
    try:
        temperature = float(t) if at else 0.0
    except ValueError:
        temperature = -1.0
    if name not in PREFIX_SOURCES or (at and not temperature > 0) or (not at and name == "none") \
            or (region and not prefix_class(name).needs_vae):
        raise argparse.ArgumentTypeError(f"unknown row {row!r}: rows are {', '.join(ROWS)}, or SOURCE@T=t with "
                                         f"SOURCE one of {', '.join(PREFIX_SOURCES)} and t > 0")
    return Decoding(None if name == "none" else name, region or None, temperature, bool(at))


def row_list(text):
    """--rows' type: the row names, each checked (argparse converts the default too)."""
    rows = text.split(",")
    for row in rows:
        decoding_of(row)
    return rows


def answer_text(answer):
    """A stated answer as text, equal for equal answers (data.answer_of's Decimal 18.0 is "18", -0 is
    "0"), so that distinct answers counted over the texts are those counted over the answers."""
    if isinstance(answer, Decimal):
        return format(answer.normalize() if answer else Decimal(0), "f")
    return answer


class Candidate(NamedTuple):
    """One answer of one problem under one row: a line of the row's samples file."""
    index: int              # the problem's position in the measured slice
    problem_id: str         # its identity (evaluate.problem_keys), which keys the sampling noise
    candidate: int          # j of --candidates
    text: str
    answer: Optional[str]   # the stated answer (None: none, or cut off)
    right: float            # the grade (a cut-off answer is wrong)
    cut_off: bool
    broken: bool


parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", required=True)
parser.add_argument("--label", required=True, help="the model's name in the tables (converted, warm-up ...)")
parser.add_argument("--vae", required=True, help="train_vae.py's directory for this model")
parser.add_argument("--tasks", required=True, help="name=test_file,... (JSON lines, graded by their grading_kind)")
parser.add_argument("--offset", type=int, default=0, help="skip this many problems of each task's seeded order")
parser.add_argument("--problems", type=int, default=100, help="problems per task after --offset")
parser.add_argument("--rows", type=row_list, default=DEFAULT_ROWS,
                    help=f"a comma-separated subset of {', '.join(ROWS)}, and SOURCE@T=t rows (vae@T=0.7, none@T=1 ...)")
parser.add_argument("--candidates", type=int, default=8)
parser.add_argument("--L", type=int, default=1, help="prefix vectors per candidate")
parser.add_argument("--lorem-L", type=int, default=16, help="text tokens of a lorem prefix")
parser.add_argument("--template", default="chat-plain")
parser.add_argument("--max-new-tokens", type=int, default=32)
parser.add_argument("--batch-size", type=int, default=256, help="rows per generate()")
parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"),
                    help="the policy's dtype for decoding (bfloat16: about 1.5x faster on this CPU, every row alike)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", required=True)


def problems_of(path, offset, n, seed):
    """Problems offset .. offset + n of the file's seeded order: disjoint slices for tuning and the
    final measurement."""
    rows = load_rows(path)
    order = random.Random(seed).sample(range(len(rows)), len(rows))
    return [rows[i] for i in order[offset:offset + n]]


@torch.no_grad()
def measure(model, tokenizer, rows, row, args):
    """Every candidate of every problem under one decoding row -> (the row's numbers, its Candidates)."""
    decoding = decoding_of(row)
    source = None if decoding.source is None else make_prefix_source(
        decoding.source, model.embed_tokens.weight, tokenizer, args.vae, decoding.region, seed=args.seed)
    L = args.lorem_L if decoding.source == "lorem" else args.L
    n = 1 if row == "greedy" else args.candidates
    prompts = [tokenizer(format_prompt(r["problem"], args.template, tokenizer), add_special_tokens=False)["input_ids"]
               for r in rows]
    ids_of = problem_keys(rows)
    items = []                                                      # (problem, candidate, prefix or None)
    for i in range(len(rows)):
        drawn = source.sample(n, L, torch.Generator().manual_seed(args.seed * 1_000_003 + i)) if source else None
        items += [(i, j, None if drawn is None else drawn[j]) for j in range(n)]
    eos, by_problem = tokenizer.eos_token_id, [[] for _ in rows]
    for start in range(0, len(items), args.batch_size):
        batch = items[start:start + args.batch_size]
        keys = [derived_seed(args.seed, ids_of[i], j) for i, j, _ in batch] if decoding.keyed else None
        out = generate(model, [prompts[i] for i, _, _ in batch], None if source is None else [p for *_, p in batch],
                       args.max_new_tokens, decoding.temperature, stop_tokens=[eos], keys=keys,
                       generator=None if keys else torch.Generator().manual_seed(args.seed * 1_000_003 + start))
        for (i, j, _), ids, done in zip(batch, out.token_lists(), out.stopped.tolist()):
            text = tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True)
            kind = rows[i]["grading_kind"]
            by_problem[i].append(Candidate(i, ids_of[i], j, text, answer_text(answer_of(text, kind)) if done else None,
                                           grade(text, rows[i]["answer"], kind) if done else 0.0,   # cut off: wrong
                                           not done, is_broken(ids, text)))
    shares = [sum(c.right for c in cands) / n for cands in by_problem]
    distinct = [len({c.answer for c in cands} - {None}) for cands in by_problem]
    every = [c for cands in by_problem for c in cands]
    result = {"pass@1": mean_ci(shares),
              **{f"pass@{k}": mean_ci([pass_at_k(n, int(sum(c.right for c in cands)), k) for cands in by_problem])
                 for k in sorted({4, 8, 16, n}) if 1 < k <= n},
              "distinct_answers": sum(distinct) / len(rows),
              "cut_off": 100 * sum(c.cut_off for c in every) / len(every),
              "broken": 100 * sum(c.broken for c in every) / len(every),
              "per_problem_pass@1": shares, "per_problem_distinct": distinct, "candidates": n}
    return result, every


def write_table(results, path):
    lines = []
    for task in dict.fromkeys(k.split(" | ")[1] for k in results):
        ks = sorted({int(name[5:]) for key, r in results.items() if key.split(" | ")[1] == task
                     for name in r if name.startswith("pass@") and name != "pass@1"})
        lines += [f"### {task}", "", "| model | decoding | pass@1 | " + " | ".join(f"pass@{k}" for k in ks) +
                  " | distinct answers | cut off % | broken % |", "| --- |" * 1 + " --- |" * (5 + len(ks))]
        for key, r in results.items():
            label, t, row = key.split(" | ")
            if t == task:
                cells = [f"{r['pass@1'][0]:.1f} ± {r['pass@1'][1]:.1f}"] + \
                    [f"{r[f'pass@{k}'][0]:.1f} ± {r[f'pass@{k}'][1]:.1f}" if f"pass@{k}" in r else "–" for k in ks]
                lines.append(f"| {label} | {row} | " + " | ".join(cells) +
                             f" | {r['distinct_answers']:.2f} | {r['cut_off']:.1f} | {r['broken']:.1f} |")
        lines.append("")
    atomic_write_text(path, "\n".join(lines))


def samples_path(out, label, task, row):
    return os.path.join(out, "samples", label, task, f"{row}.jsonl")


def main(argv=None):
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    torch.manual_seed(args.seed)
    model, tokenizer = load_policy(args.model, dtype=getattr(torch, args.dtype))
    model.eval()
    settings = {k: getattr(args, k) for k in ("model", "vae", "offset", "problems", "candidates", "L",
                                                "lorem_L", "template", "max_new_tokens", "dtype", "seed")}
    for spec in args.tasks.split(","):
        task, _, file = spec.partition("=")
        rows = problems_of(file, args.offset, args.problems, args.seed)
        for row in args.rows:
            key = f"{args.label} | {task} | {row}"
            if key in results and results[key]["settings"] == settings:
                continue
            t0 = time.time()
            numbers, candidates = measure(model, tokenizer, rows, row, args)
            measured = {**numbers, "settings": settings, "seconds": round(time.time() - t0, 1)}
            samples = samples_path(args.out, args.label, task, row)
            os.makedirs(os.path.dirname(samples), exist_ok=True)
            atomic_write_text(samples, "".join(json.dumps(c._asdict()) + "\n" for c in candidates))
            with FileLock(path + ".lock"):      # two models measured side by side share one --out
                results = {**(json.load(open(path)) if os.path.exists(path) else {}), key: measured}
                atomic_write_json(path, results)
                write_table(results, os.path.join(args.out, "results.md"))
            r, k = results[key], f"pass@{results[key]['candidates']}"
            print(f"{key}: pass@1 {r['pass@1'][0]:.1f} ± {r['pass@1'][1]:.1f}"
                  + (f", {k} {r[k][0]:.1f} ± {r[k][1]:.1f}" if k != "pass@1" else "") + f" ({r['seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
