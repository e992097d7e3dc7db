r"""SmolLM2-135M-Instruct's report on the paper's claims (a) and (c), and a short GRPO run.

(a) Strategy-level diversity at inference (the paper's Fig. 1), on the real task of real/task.py:
    greedy decoding with one prefix token per candidate (sources noise, random_decoder, vae prior,
    vae math region), against plain greedy decoding and token sampling at T = 1; pass@1/4/8/16
    and the number of distinct answers per problem; on the converted model and again after the
    10-step prefix warm-up.
(c) The VAE's latent space by domain: the silhouette of math / code / qa and its PCA picture.
GRPO: the reward of a short rl.py run (linear schedule, L = 1) per step, with its time per step.

runs/smollm2.sh makes the model, the task files, the VAE, the warm-up and the GRPO run, then calls
this; every evaluation is an evaluate.py run, so a rerun reuses what is there:
    python -m real.report --dir runs/smollm2                    # writes runs/smollm2/report/
    python -m real.report --dir runs/smollm2 --readme           # maintainers: also README.md
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from data import gsm8k_prediction  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--dir", default="runs/smollm2", help="the directory runs/smollm2.sh fills")
parser.add_argument("--problems", type=int, default=40, help="test problems of the task for (a)")
parser.add_argument("--n", type=int, default=16, help="candidates per problem for (a)")
parser.add_argument("--max-new-tokens", type=int, default=128)
parser.add_argument("--readme", action="store_true", help="also rewrite README.md's SmolLM2 results")

# (label, evaluate.py flags) of claim (a); "greedy" is one candidate, the rest --n each
SOURCES = [("greedy (no prefix)", ["--mode", "sample", "--temperature", "0", "-n", "1", "--k", "1",
                                   "--prefix-source", "none"]),
           ("token sampling T=1", ["--mode", "sample", "--temperature", "1", "--prefix-source", "none"]),
           ("greedy per latent: noise", ["--mode", "greedy-latent", "--prefix-source", "noise"]),
           ("greedy per latent: random_decoder", ["--mode", "greedy-latent", "--prefix-source", "random_decoder"]),
           ("greedy per latent: vae prior", ["--mode", "greedy-latent", "--prefix-source", "vae"]),
           ("greedy per latent: vae math region", ["--mode", "greedy-latent", "--prefix-source", "vae",
                                                    "--region", "math"])]


def run(script, *args):
    """A stage script as a user runs it; returns its wall time in seconds."""
    cmd = [sys.executable, os.path.join(REPO, script), *[str(a) for a in args]]
    print("$ " + " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{script} failed:\n{result.stderr[-3000:]}")
    return time.time() - t0


def distinct_answers(record):
    """Distinct numbers among a problem's finished candidates (a cut-off one answers nothing)."""
    stopped = record.get("stopped", [True] * len(record["completions"]))
    answers = {gsm8k_prediction(c) for c, done in zip(record["completions"], stopped) if done}
    return len(answers - {None})


def inference_table(world, args):
    """(a): one evaluate.py configuration per row, on the converted model and after the warm-up."""
    ks = [k for k in (1, 4, 8, 16) if k <= args.n]
    rows, seconds = [], {}
    for stage, model in (("before warm-up", f"{world}/model"), ("after warm-up", f"{world}/sft/model")):
        # the sizes are in the directory's name, so a rerun with other sizes never reuses rows
        out = f"{world}/report/inference/{stage.split()[0]}-{args.problems}x{args.n}-{args.max_new_tokens}"
        for label, flags in SOURCES:
            name = label.replace(":", "")
            done = os.path.exists(f"{out}/results.json") and \
                name in json.load(open(f"{out}/results.json"))["configs"]
            n_flags = [] if "-n" in flags else ["-n", args.n, "--k", ",".join(map(str, ks))]
            if not done:
                seconds[(stage, label)] = run(
                    "evaluate.py", "--model", model, "--vae", f"{world}/vae", "--template", "chat",
                    "--benchmarks", f"{world}/data/task_test.jsonl", "--limit", args.problems,
                    "--max-new-tokens", args.max_new_tokens, "--batch-size", 64, "--L", 1,
                    "--out", out, "--config-name", name, *flags, *n_flags)
            result = json.load(open(f"{out}/results.json"))["configs"][name]["benchmarks"]["task_test"]
            records = [json.loads(l) for l in open(f"{out}/task_test.jsonl")]
            records = [r for r in records if r["config"] == name]
            distinct = sum(distinct_answers(r) for r in records) / len(records)
            truncated = sum(not s for r in records for s in r["stopped"]) / sum(len(r["stopped"]) for r in records)
            rows.append((stage, label, result, distinct, truncated))
    header = ["| model | decoding | " + " | ".join(f"pass@{k}" for k in ks) + " | distinct answers | cut off |",
              "| --- | --- |" + " --- |" * (len(ks) + 2)]
    lines = []
    for stage, label, result, distinct, truncated in rows:
        cells = [f"{100 * result[f'pass@{k}']:.1f}" if f"pass@{k}" in result else "–" for k in ks]
        lines.append(f"| {stage} | {label} | " + " | ".join(cells) + f" | {distinct:.1f} | {100 * truncated:.0f}% |")
    return "\n".join(header + lines), seconds


def grpo_summary(world):
    """Reward per step of the GRPO run and its mean time per step (generation, scoring, update)."""
    records = [json.loads(l) for l in open(f"{world}/rl/metrics.jsonl") if l.strip()]
    steps = [r for r in records if "reward_mean" in r]
    args = json.load(open(f"{world}/rl/args.json"))
    per_step = [r["time_generate"] + r["time_score"] + r["time_update"] for r in steps]
    return {"args": args, "rewards": [r["reward_mean"] for r in steps],
            "prefixed": [r["reward_prefixed"] for r in steps], "plain": [r["reward_plain"] for r in steps],
            "seconds_per_step": sum(per_step) / len(per_step),
            "generate_share": sum(r["time_generate"] for r in steps) / sum(per_step)}


def write_readme(section):
    path = os.path.join(REPO, "README.md")
    text = open(path).read()
    start, end = "<!-- smollm2-report:start -->", "<!-- smollm2-report:end -->"
    block = f"{start}\n{section}\n{end}"
    if start not in text:
        sys.exit(f"README.md has no {start} marker: add the SmolLM2 section first")
    text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    open(path, "w").write(text)


def main():
    args = parser.parse_args()
    world = args.dir
    vae = json.load(open(f"{world}/vae/vae.json"))
    conversion = json.load(open(f"{world}/model/conversion.json"))
    table_a, seconds = inference_table(world, args)
    grpo = grpo_summary(world)
    times_path = f"{world}/report/times.json"
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    times.update({f"{stage}: {label}": s for (stage, label), s in seconds.items()})
    json.dump(times, open(times_path, "w"), indent=1)
    a = grpo["args"]
    rewards = ", ".join(f"{100 * r:.0f}" for r in grpo["rewards"])
    section = f"""Measured by `bash runs/smollm2.sh` on this project's 2-core CPU machine (weights: {conversion['weights']}).
Numbers are what came out, whatever their sign.

**(a) Diversity from latents at inference** ({args.problems} test problems of the task, {args.n} candidates
each, one prefix token, {args.max_new_tokens} new tokens; prefix form `{vae.get('prefix_form', 'rescaled')}`;
"distinct answers" counts the different numbers a problem's candidates answer;
`{world}/report/inference/*/results.md`):

{table_a}

**(c) Domains in latent space.** Silhouette of the math / code / qa posterior means:
{vae['silhouette']:.3f} over {vae['n_pairs']} pairs (PCA picture: `{world}/vae/latents.png`). Norms: token embedding
{vae['norms']['token_embedding']:.3f}, mean-pooled h {vae['norms']['mean_pooled_h']:.3f}, decoded prefix
{vae['norms']['prefix']:.3f}.

**GRPO** ({len(grpo['rewards'])} steps of `rl.py --schedule {a['schedule']} --L {a['L']}` from the warmed-up model,
P = {a['prompts_per_step']}, G = {a['group_size']}, lr {a['lr']:g}, {a['max_new_tokens']} new tokens, on the task's train split):
mean reward per step (%) {rewards}; {grpo['seconds_per_step']:.0f} s per step, {100 * grpo['generate_share']:.0f}% of it generation.
"""
    section += "\n![SmolLM2 latent space](docs/smollm2_latents.png)\n"
    os.makedirs(f"{world}/report", exist_ok=True)
    open(f"{world}/report/report.md", "w").write(section)
    print(section)
    if args.readme:
        shutil.copy(f"{world}/vae/latents.png", os.path.join(REPO, "docs", "smollm2_latents.png"))
        write_readme(section)
        print("README.md updated")
    else:
        print(f"wrote {world}/report/report.md (README.md untouched; --readme refreshes it)")


if __name__ == "__main__":
    main()
