r"""SmolLM2-135M-Instruct's report on the paper's claims (a) and (c), the prefix forms, and a short
GRPO run.

(a) Strategy-level diversity at inference (the paper's Fig. 1), on the real task of real/task.py:
    greedy decoding with one prefix token per candidate (sources noise, random_decoder, vae prior,
    vae math region), against plain greedy decoding and token sampling at T = 1; pass@1/4/8/16,
    distinct answers per problem, the share cut off; on the converted model and again after the
    10-step prefix warm-up.
Prefix forms: each way of turning the VAE's h_hat into a prefix (centred, rescaled, paper), on the
    converted model and after each form's own warm-up, with noise and lorem beside them.
(c) The VAE's latent space by domain: the silhouette of math / code / qa and its PCA picture.
GRPO: the reward of a short rl.py run (linear schedule, L = 1) per step, with its time per step.

All inference numbers are bench/prefix_forms.py's measurements (one results.json, or several made
with the same settings): same problems, same seeded latents, cut-off answers scored wrong.
runs/smollm2.sh makes the model, the task files, the VAE, the warm-up, those measurements and the
GRPO run, then calls this:
    python -m real.report --dir runs/smollm2                    # writes runs/smollm2/report/
    python -m real.report --dir runs/smollm2 --publish          # maintainers: docs/results/, README
"""

import argparse
import json
import math
import os
import shutil
import sys

from common import run_main
from toy import publish_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--dir", default="runs/smollm2", help="the directory runs/smollm2.sh fills")
parser.add_argument("--measurements", default=None,
                    help="comma-separated results.json files of bench/prefix_forms.py "
                         "(default: DIR/prefix_forms/results.json)")
parser.add_argument("--rl", default=None, help="the GRPO run's directory (default: DIR/rl)")
parser.add_argument("--publish", action="store_true",
                    help="also write docs/results/smollm2.md and the README's headline (a maintainer's step)")

BEFORE, AFTER = "base", "warm-up centred, 10 steps"
# (label in the table, the bench's row name) of claim (a)
DECODINGS = [("greedy (no prefix)", "none"),
             ("token sampling T=1", "token sampling T=1"),
             ("greedy per latent: noise", "noise"),
             ("greedy per latent: random_decoder", "random_decoder"),
             ("greedy per latent: vae prior", "vae centred, prior"),
             ("greedy per latent: vae math region", "vae centred, math")]


def load_measurements(paths):
    """The rows of one or more bench results files, which must share their settings; a row measured
    twice must agree (the latents are seeded, so a rerun gives the same numbers)."""
    settings, rows = None, {}
    for path in paths:
        with open(path) as f:
            results = json.load(f)
        if settings is not None and results["settings"] != settings:
            sys.exit(f"error: {path} was measured with other settings than {paths[0]}")
        settings = results["settings"]
        for key, row in results["rows"].items():
            if key in rows and abs(rows[key]["pass@1"] - row["pass@1"]) > 1e-9:
                sys.exit(f"error: row {key!r} differs between the measurement files")
            rows.setdefault(key, row)
    return settings, rows


def pass_at_k_mean(per_problem_pass1, n, k):
    """Unbiased pass@k (Chen et al. 2021) averaged over problems, from each problem's share of
    right candidates out of n."""
    values = []
    for p in per_problem_pass1:
        c = round(p * n)
        values.append(1.0 - math.comb(n - c, k) / math.comb(n, k))
    return sum(values) / len(values)


def table_a(rows, n):
    ks = [k for k in (1, 4, 8, n) if k <= n]
    lines = ["| model | decoding | " + " | ".join(f"pass@{k}" for k in ks) + " | distinct answers | cut off |",
             "| --- | --- |" + " --- |" * (len(ks) + 2)]
    for stage, label in ((BEFORE, "converted"), (AFTER, "after warm-up")):
        for name, key in DECODINGS:
            r = rows.get(f"{stage} | {key}")
            if r is None:
                continue
            cells = []
            for k in ks:
                value = r.get(f"pass@{k}")
                if value is None and f"pass@{n}" in r and k < n:     # a row of n candidates
                    value = 100 * pass_at_k_mean(r["per_problem_pass@1"], n, k)
                ci = r.get(f"pass@{k}_ci95")
                cells.append("–" if value is None else f"{value:.1f}" + (f" ± {ci:.1f}" if ci else ""))
            lines.append(f"| {label} | {name} | " + " | ".join(cells) +
                         f" | {r['distinct_answers']:.2f} | {r.get('cut_off', 0):.0f}% |")
    return "\n".join(lines)


def table_forms(rows, n):
    lines = [f"| model | prefix | pass@1 | pass@{n} | distinct answers | broken | cut off | pairwise cos | cos to corpus mean |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    fmt = lambda v, spec: "–" if v is None else format(v, spec)
    for key, r in rows.items():
        model_label, prefix = key.split(" | ")
        if prefix in ("random_decoder", "token sampling T=1"):
            continue                                  # those rows belong to claim (a)
        pm = lambda name: "–" if r.get(name) is None else f"{r[name]:.1f} ± {r.get(name + '_ci95', 0):.1f}"
        lines.append(f"| {model_label} | {prefix} | {pm('pass@1')} | {pm(f'pass@{n}')} | "
                     f"{fmt(r.get('distinct_answers'), '.2f')} | {r['broken']:.0f}% | {fmt(r.get('cut_off'), '.0f')}% | "
                     f"{fmt(r.get('prefix_pairwise_cos'), '.2f')} | {fmt(r.get('prefix_cos_to_corpus_mean'), '.2f')} |")
    return "\n".join(lines)


def grpo_summary(run_dir):
    """Reward per step of the GRPO run and its mean time per step (generation, scoring, update)."""
    records = [json.loads(l) for l in open(f"{run_dir}/metrics.jsonl") if l.strip()]
    steps = [r for r in records if "reward_mean" in r]
    args = json.load(open(f"{run_dir}/args.json"))
    per_step = [r["time_generate"] + r["time_score"] + r["time_update"] for r in steps]
    return {"args": args, "rewards": [r["reward_mean"] for r in steps],
            "prefixed": [r["reward_prefixed"] for r in steps], "plain": [r["reward_plain"] for r in steps],
            "seconds_per_step": sum(per_step) / len(per_step),
            "generate_share": sum(r["time_generate"] for r in steps) / sum(per_step)}


def main():
    args = parser.parse_args()
    world = args.dir
    vae = json.load(open(f"{world}/vae/vae.json"))
    conversion = json.load(open(f"{world}/model/conversion.json"))
    paths = (args.measurements or f"{world}/prefix_forms/results.json").split(",")
    settings, rows = load_measurements(paths)
    n = settings["latents"]
    grpo = grpo_summary(args.rl or f"{world}/rl")
    a = grpo["args"]
    rewards = ", ".join(f"{100 * r:.0f}" for r in grpo["rewards"])
    where = ", ".join(f"`{os.path.dirname(p)}`" for p in paths)
    section = f"""Measured on this project's 2-core CPU machine (weights: {conversion['weights']}); the
commands are in `runs/smollm2.sh`. Numbers are what came out, whatever their sign. Every row:
{settings['problems']} test problems of the task, {n} candidates each (greedy under one prefix token,
or T = 1 samples), {settings['max_new_tokens']} new tokens, an answer cut off there scored wrong;
± is a 95% interval over the problems; measurements in {where}.

**(a) Diversity from latents at inference**, on the converted model and after the standard
10-step warm-up (prefix form centred):

{table_a(rows, n)}

**Prefix forms.** Each form on the converted model and after its own 10-step warm-up
("broken": empty, or one token repeated):

{table_forms(rows, n)}

**(c) Domains in latent space.** Silhouette of the math / code / qa posterior means:
{vae['silhouette']:.3f} over {vae['n_pairs']} pairs (PCA picture below, `{world}/vae/latents.png`). Norms: token
embedding {vae['norms']['token_embedding']:.3f}, mean-pooled h {vae['norms']['mean_pooled_h']:.3f}, decoded prefix
{vae['norms']['prefix']:.3f}.

**GRPO** ({len(grpo['rewards'])} steps of `rl.py --schedule {a['schedule']} --L {a['L']}` from the warmed-up model,
P = {a['prompts_per_step']}, G = {a['group_size']}, lr {a['lr']:g}, {a['max_new_tokens']} new tokens, on the task's train split):
mean reward per step (%) {rewards}; {grpo['seconds_per_step']:.0f} s per step, {100 * grpo['generate_share']:.0f}% of it generation.

![SmolLM2 latent space](smollm2_latents.png)
"""
    os.makedirs(f"{world}/report", exist_ok=True)
    with open(f"{world}/report/report.md", "w") as f:
        f.write(section)
    print(section)
    if args.publish:
        shutil.copy(f"{world}/vae/latents.png", os.path.join(REPO, "docs", "results", "smollm2_latents.png"))
        publish_results("smollm2", section, section.split("\n\n")[1], f"python -m real.report --dir {world} --publish")
        print("wrote docs/results/smollm2.md and the README's headline")
    else:
        print(f"wrote {world}/report/report.md (docs/ and README.md untouched; --publish writes them)")


if __name__ == "__main__":
    run_main(main)
