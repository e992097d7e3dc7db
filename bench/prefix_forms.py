r"""Prefix forms: which way of turning the VAE's decoded h_hat into a prefix embedding can a policy
read, before and after the warm-up? (model.PREFIX_FORMS lists the forms; README, "Prefix forms".)

For one policy and one VAE, on --problems held-out problems, greedy decoding, one prefix token:
    none            greedy pass@1 with no prefix
    vae prior       --latents prior latents per problem, one greedy answer each: pass@1 (mean over
                    the candidates), pass@k (k = --latents: solved by any), distinct answers per
                    problem, share of broken answers (model.is_broken: empty or one repeated token)
    vae <region>    the same with latents from the VAE's --region (default math)
    noise           reference: a Gaussian vector at the token norm (model.NoisePrefix)
    lorem           reference: --lorem-L tokens of pseudo-Latin text and the boundary instruction,
                    as the policy's own token embeddings (model.LoremPrefix, rl.py's lorem source)
Every form is measured on the base model, then each form is warmed up with sft_warmup.py for each
of --warmups steps (its VAE copied with vae.json's "prefix_form" set: the form changes no weight)
and measured again on the warmed model, the references beside it. Latents of problem i come from a
generator seeded by (--seed, i), so every form decodes the same z.

Rows go to --out/results.json as they finish (a rerun skips rows already there, and warm-ups
already done); --out/results.md is the table.

Toy world (after bash runs/toy.sh has built runs/toy):
    python bench/prefix_forms.py --model runs/toy/base --vae runs/toy/vae \
        --data runs/toy/data/math_test.jsonl --problems 100 --max-new-tokens 64 \
        --warmup-data runs/toy/data/math_train.jsonl --warmup-args="--lr 3e-5" \
        --out runs/prefix_forms/toy
SmolLM2-135M-Instruct (the VAE from train_vae.py --template chat; the warm-up on GSM8K):
    python bench/prefix_forms.py --model SMOLLM2_DIR --vae runs/smollm2/vae --template chat \
        --data TASK.jsonl --problems 40 --max-new-tokens 48 \
        --warmup-data math=../shared/data/gsm8k_train.jsonl \
        --warmup-args="--template chat --batch-size 16 --lr 1e-5" --out runs/prefix_forms/smollm2
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import atomic_write_json, atomic_write_text  # noqa: E402
from diagnostics import is_broken, prefix_health  # noqa: E402
from data import answer_of, format_prompt, grade, grading_kind_for, load_rows  # noqa: E402
from model import PREFIX_FORMS, generate, load_policy, make_prefix_source  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# Task
parser.add_argument("--data", required=True, help="held-out problems (JSON lines, graded by data.grade)")
parser.add_argument("--problems", type=int, default=40,
                    help="a seeded subset of this many problems (data.load_rows(limit=..., seed=0))")
parser.add_argument("--template", default="plain", help="plain | math | chat")
parser.add_argument("--max-new-tokens", type=int, default=48)
# Model and palette
parser.add_argument("--model", required=True, help="the base policy (before any warm-up)")
parser.add_argument("--label", default="base", help="--model's name in the table")
parser.add_argument("--vae", required=True, help="directory written by train_vae.py for this policy")
parser.add_argument("--region", default="math", help="the VAE's latent region to sample from")
parser.add_argument("--forms", default=",".join(PREFIX_FORMS), help="prefix forms to measure")
parser.add_argument("--region-forms", default=",".join(PREFIX_FORMS),
                    help="the forms also measured with --region latents (each costs a row per model)")
parser.add_argument("--latents", type=int, default=16, help="prefixes (greedy candidates) per problem")
parser.add_argument("--lorem-L", type=int, default=16, help="text tokens of a lorem reference prefix")
parser.add_argument("--references", default="noise,lorem",
                    help="references measured on every model: noise, lorem, random_decoder, sampling "
                         "(token sampling at T = 1 with no prefix, --latents samples)")
# Warm-ups
parser.add_argument("--warmups", default="10", help="comma-separated sft_warmup.py step counts")
parser.add_argument("--warmup-data", default=None, help="--data for sft_warmup.py (no warm-ups if absent)")
parser.add_argument("--warmup-args", default="", help="more sft_warmup.py flags, e.g. \"--lr 3e-5\"")
# Runtime
parser.add_argument("--batch-size", type=int, default=64, help="rows per generate()")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", required=True)

def mean(values):
    return sum(values) / len(values)


def ci95(values):
    """Half-width of a normal 95% interval for the mean over problems (the spread a reader needs
    to tell two rows apart: the problems are the sample here, the latents are fixed by seed)."""
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return 1.96 * (sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5


def pass_at_k(n, c, k):
    """Unbiased pass@k from c right of n candidates (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    c = round(c)                  # the grader scores 0.0 or 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


class Sampling:
    """Not a prefix: token sampling at temperature 1 with no prefix, --latents samples per problem
    (the paper's baseline for diversity: token-level randomness instead of a latent)."""
    name = "sampling"


@torch.no_grad()
def measure(model, tokenizer, rows, kind, source, args):
    """Greedy answers of every problem under --latents prefixes of `source` (or one answer
    with no prefix when source is None; --latents T = 1 samples when it is Sampling) -> the row's
    numbers."""
    sampling = isinstance(source, Sampling)
    n = 1 if source is None else args.latents
    prompts = [tokenizer(format_prompt(r["problem"], args.template, tokenizer),
                         add_special_tokens=False)["input_ids"] for r in rows]
    eos = tokenizer.eos_token_id
    items = []                                                   # (problem index, prefix or None)
    for i in range(len(rows)):
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + i)   # same z for every form
        L = args.lorem_L if getattr(source, "name", None) == "lorem" else 1      # text needs words
        prefixes = [None] * n if source is None or sampling else list(source.sample(n, L, generator=g))
        items += [(i, p) for p in prefixes]
    correct = [[] for _ in rows]
    answers = [[] for _ in rows]
    broken, cut_off = [], []
    for start in range(0, len(items), args.batch_size):
        batch = items[start:start + args.batch_size]
        prefixes = None if source is None or sampling else [p for _, p in batch]
        generation = generate(model, [prompts[i] for i, _ in batch], prefixes, args.max_new_tokens,
                              temperature=1.0 if sampling else 0, stop_tokens=[eos],
                              generator=torch.Generator().manual_seed(args.seed * 1_000_003 + start))
        out = generation.token_lists()
        for (i, _), ids, finished in zip(batch, out, generation.stopped.tolist()):
            ids = [t for t in ids if t != eos]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            # an answer cut off at --max-new-tokens is wrong, as in evaluate.py and rl.py
            correct[i].append(finished and grade(text, rows[i]["answer"], kind))
            cut_off.append(not finished)
            answers[i].append(answer_of(text, kind))
            broken.append(is_broken(ids, text))
    per_problem = [sum(c) / len(c) for c in correct]
    solved = [float(max(c)) for c in correct]
    return {"pass@1": 100 * mean(per_problem), "pass@1_ci95": 100 * ci95(per_problem),
            f"pass@{n}": 100 * mean(solved), f"pass@{n}_ci95": 100 * ci95(solved),
            **{f"pass@{k}": 100 * mean([pass_at_k(len(c), sum(c), k) for c in correct])
               for k in (4, 8) if k < n},
            "per_problem_pass@1": per_problem,
            "distinct_answers": sum(len({a for a in ans if a is not None}) for ans in answers) / len(rows),
            "broken": 100 * sum(broken) / len(broken), "cut_off": 100 * sum(cut_off) / len(cut_off),
            "examples": [tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True)
                         for ids in out[:3]]}


def vae_dir_with_form(args, form):
    """A copy of --vae whose vae.json names `form` (weights are shared: the form changes none)."""
    out = os.path.join(args.out, f"vae-{form}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(args.vae, "vae.json")) as f:
        meta = json.load(f)
    meta["prefix_form"] = form
    atomic_write_json(os.path.join(out, "vae.json"), meta)
    weights = os.path.join(out, "vae.safetensors")
    if not os.path.exists(weights):
        os.symlink(os.path.abspath(os.path.join(args.vae, "vae.safetensors")), weights)
    return out


def warm_up(args, form, steps):
    out = os.path.join(args.out, f"sft-{form}-{steps}")
    if not os.path.exists(os.path.join(out, "model", "config.json")):
        cmd = [sys.executable, os.path.join(REPO, "sft_warmup.py"), "--model", args.model,
               "--vae", vae_dir_with_form(args, form), "--data", args.warmup_data,
               "--steps", str(steps), "--out", out, *args.warmup_args.split()]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return os.path.join(out, "model")


def write_table(results, path, k):
    lines = ["| model | prefix | pass@1 (± 95%% CI) | pass@%d | distinct answers | broken %% | cut off %% | pairwise cos | cos to mean |" % k,
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, r in results["rows"].items():
        model_label, prefix = key.split(" | ")
        fmt = lambda v, spec: "-" if v is None else format(v, spec)
        pm = lambda name: "-" if r.get(name) is None else f"{r[name]:.1f} ± {r.get(name + '_ci95', 0):.1f}"
        lines.append(f"| {model_label} | {prefix} | {pm('pass@1')} | {pm(f'pass@{k}')} | "
                     f"{fmt(r.get('distinct_answers'), '.2f')} | {r['broken']:.1f} | {fmt(r.get('cut_off'), '.1f')} | "
                     f"{fmt(r.get('prefix_pairwise_cos'), '.2f')} | {fmt(r.get('prefix_cos_to_corpus_mean'), '.2f')} |")
    atomic_write_text(path, "\n".join(lines) + "\n")


def main():
    args = parser.parse_args()
    forms = [form for form in args.forms.split(",") if form]      # --forms "": references only
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.json")
    settings = {k: getattr(args, k) for k in ("data", "problems", "template", "max_new_tokens",
                                                "latents", "region", "seed", "lorem_L")}
    results = {"settings": settings, "rows": {}}
    if os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)
        if results["settings"] != settings:
            raise SystemExit(f"{results_path} holds rows measured with other settings "
                             f"({results['settings']}); use another --out")
    rows = load_rows(args.data, limit=args.problems, seed=0)
    kind = grading_kind_for(rows[0])

    def run_row(model, tokenizer, model_label, prefix_label, source):
        key = f"{model_label} | {prefix_label}"
        if key in results["rows"]:
            return
        started = time.time()
        r = measure(model, tokenizer, rows, kind, source, args)
        r["seconds"] = time.time() - started
        if source is not None and getattr(source, "name", None) not in ("lorem", "sampling"):
            r.update(prefix_health(source)[0])
        results["rows"][key] = r
        atomic_write_json(results_path, results)
        write_table(results, os.path.join(args.out, "results.md"), args.latents)
        print(f"{key}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items() if isinstance(v, float))
              + f" | e.g. {r['examples'][0]!r}", flush=True)

    def run_model(model_dir, model_label, model_forms):
        model, tokenizer = load_policy(model_dir)
        model.eval()
        E = model.embed_tokens.weight.detach()
        run_row(model, tokenizer, model_label, "none", None)
        for form in model_forms:
            for region in [None] + ([args.region] if form in args.region_forms.split(",") else []):
                source = make_prefix_source("vae", E, vae=args.vae, region=region)
                source.vae.prefix_form = form
                run_row(model, tokenizer, model_label, f"vae {form}, {region or 'prior'}", source)
        if "noise" in args.references.split(","):
            run_row(model, tokenizer, model_label, "noise", make_prefix_source("noise", E))
        if "lorem" in args.references.split(","):
            run_row(model, tokenizer, model_label, f"lorem {args.lorem_L}",
                    make_prefix_source("lorem", E, tokenizer=tokenizer))
        if "random_decoder" in args.references.split(","):
            run_row(model, tokenizer, model_label, "random_decoder",
                    make_prefix_source("random_decoder", E, seed=args.seed))
        if "sampling" in args.references.split(","):
            run_row(model, tokenizer, model_label, "token sampling T=1", Sampling())

    run_model(args.model, args.label, forms)
    if args.warmup_data:
        for steps in [int(s) for s in args.warmups.split(",")]:
            for form in forms:
                run_model(warm_up(args, form, steps), f"warm-up {form}, {steps} steps", [form])
    print(f"wrote {args.out}/results.md")


if __name__ == "__main__":
    main()
