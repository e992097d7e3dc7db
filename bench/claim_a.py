r"""Claim (a) on a real model, one engine for every row: does sampling a latent per candidate give
strategy-level diversity without a pass@1 cost? For one policy, on each task's held-out problems,
--candidates answers per problem under each decoding row:

    greedy          one greedy answer, no prefix
    T=0.7, T=1      token sampling, no prefix
    noise, rsp, random_decoder, vae, vae:math
                    greedy under a prefix of --L vectors per candidate from that source (the VAE's
                    prior, or its math region), the latents of problem i seeded by (--seed, i)
    lorem           greedy under --lorem-L tokens of pseudo-Latin and the boundary instruction

Per row and task: pass@1 (the mean over candidates), unbiased pass@k for k up to --candidates,
each with a 95% interval over problems (the problems are the sample; latents and samples are fixed
by seed); distinct answers per problem; the shares cut off at --max-new-tokens (scored wrong) and
broken (empty or one repeated token). The VAE's prefixes are at its vae.json's prefix_scale. Rows go
to --out/results.json as they finish (a rerun skips them); --out/results.md is the table.

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

import torch
from filelock import FileLock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import atomic_write_json, atomic_write_text  # noqa: E402
from data import answer_of, format_prompt, grade, load_rows  # noqa: E402
from diagnostics import is_broken  # noqa: E402
from evaluate import pass_at_k  # noqa: E402
from model import generate, load_policy, make_prefix_source  # noqa: E402
from real.report import mean_ci  # noqa: E402

ROWS = ("greedy", "T=0.7", "T=1", "noise", "rsp", "random_decoder", "lorem", "vae", "vae:math")
DEFAULT_ROWS = "greedy,T=0.7,T=1,noise,rsp,lorem,vae,vae:math"          # the protocol's

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", required=True)
parser.add_argument("--label", required=True, help="the model's name in the tables (converted, warm-up ...)")
parser.add_argument("--vae", required=True, help="train_vae.py's directory for this model")
parser.add_argument("--tasks", required=True, help="name=test_file,... (JSON lines, graded by their grading_kind)")
parser.add_argument("--offset", type=int, default=0, help="skip this many problems of each task's seeded order")
parser.add_argument("--problems", type=int, default=100, help="problems per task after --offset")
parser.add_argument("--rows", default=DEFAULT_ROWS, help=f"a comma-separated subset of {', '.join(ROWS)}")
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


def source_for(row, model, tokenizer, args):
    """The prefix source of a row (None: no prefix) and the prefix length."""
    if row in ("greedy", "T=0.7", "T=1"):
        return None, 0
    name, _, region = row.partition(":")
    source = make_prefix_source(name, model.embed_tokens.weight, tokenizer, args.vae, region or None, seed=args.seed)
    return source, args.lorem_L if name == "lorem" else args.L


@torch.no_grad()
def measure(model, tokenizer, rows, row, args):
    """Every candidate of every problem under one decoding row -> the row's numbers."""
    source, L = source_for(row, model, tokenizer, args)
    n = 1 if row == "greedy" else args.candidates
    temperature = {"T=0.7": 0.7, "T=1": 1.0}.get(row, 0.0)
    prompts = [tokenizer(format_prompt(r["problem"], args.template, tokenizer), add_special_tokens=False)["input_ids"]
               for r in rows]
    items = []                                                      # (problem, prefix or None)
    for i in range(len(rows)):
        drawn = source.sample(n, L, torch.Generator().manual_seed(args.seed * 1_000_003 + i)) if source else None
        items += [(i, None if drawn is None else drawn[j]) for j in range(n)]
    eos, verdicts, answers, cut, broken = tokenizer.eos_token_id, [[] for _ in rows], [[] for _ in rows], [], []
    for start in range(0, len(items), args.batch_size):
        batch = items[start:start + args.batch_size]
        out = generate(model, [prompts[i] for i, _ in batch], None if source is None else [p for _, p in batch],
                       args.max_new_tokens, temperature, stop_tokens=[eos],
                       generator=torch.Generator().manual_seed(args.seed * 1_000_003 + start))
        for (i, _), ids, done in zip(batch, out.token_lists(), out.stopped.tolist()):
            text = tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True)
            kind = rows[i]["grading_kind"]
            verdicts[i].append(grade(text, rows[i]["answer"], kind) if done else 0.0)   # cut off: wrong
            answers[i].append(answer_of(text, kind) if done else None)
            cut.append(not done)
            broken.append(is_broken(ids, text))
    result = {"pass@1": mean_ci([sum(v) / n for v in verdicts]),
              **{f"pass@{k}": mean_ci([pass_at_k(n, int(sum(v)), k) for v in verdicts])
                 for k in sorted({4, 8, 16, n}) if 1 < k <= n},
              "distinct_answers": sum(len({a for a in ans if a is not None}) for ans in answers) / len(rows),
              "cut_off": 100 * sum(cut) / len(cut), "broken": 100 * sum(broken) / len(broken),
              "per_problem_pass@1": [sum(v) / n for v in verdicts], "candidates": n}
    return result


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
        for row in args.rows.split(","):
            key = f"{args.label} | {task} | {row}"
            if key in results and results[key]["settings"] == settings:
                continue
            t0 = time.time()
            measured = {**measure(model, tokenizer, rows, row, args), "settings": settings,
                        "seconds": round(time.time() - t0, 1)}
            with FileLock(path + ".lock"):      # two models measured side by side share one --out
                results = {**(json.load(open(path)) if os.path.exists(path) else {}), key: measured}
                atomic_write_json(path, results)
                write_table(results, os.path.join(args.out, "results.md"))
            r, k = results[key], f"pass@{results[key]['candidates']}"
            print(f"{key}: pass@1 {r['pass@1'][0]:.1f} ± {r['pass@1'][1]:.1f}"
                  + (f", {k} {r[k][0]:.1f} ± {r[k][1]:.1f}" if k != "pass@1" else "") + f" ({r['seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
