"""One toy RL step's time and its split (generation, scoring, update), this tree against an earlier
commit, side by side in one run: the two sides alternate, each in its own process on one thread,
and the medians over the measured steps are reported with their ratio.

    python bench/rl_step_split.py --world runs/toy --before f61f3aa      # the toy world of runs/toy.sh

A side runs rl.py's main() on the world's base model (16 prompts x 8 rollouts, 64 new tokens, no
prefix: the step every arm shares) and reads the time_* fields its metrics.jsonl records for each
step; the first step of each run (imports, first-call set-up) is left out.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIDE = r'''
import json, shutil, sys, time
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
import rl
world, out, steps = sys.argv[2], sys.argv[3], sys.argv[4]
shutil.rmtree(out, ignore_errors=True)
rl.main(["--model", f"{world}/base", "--data", f"{world}/data/math_train.jsonl", "--out", out,
         "--schedule", "none", "--prefix-source", "none", "--steps", steps, "--prompts-per-step", "16",
         "--group-size", "8", "--max-new-tokens", "64", "--lr", "2e-5", "--save-every", "0"])
'''


def run_side(tree, world, steps, out):
    subprocess.run([sys.executable, "-c", SIDE, tree, world, out, str(steps)], check=True,
                   capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [{k: r[k] for k in ("time_generate", "time_score", "time_update")} for r in records[1:]]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="runs/toy")
    p.add_argument("--before", default="f61f3aa", help="the commit to compare with")
    p.add_argument("--steps", type=int, default=6, help="steps per run (the first is left out)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    args = p.parse_args()
    world = os.path.abspath(args.world)
    with tempfile.TemporaryDirectory() as tmp:
        before = os.path.join(tmp, "before")
        os.makedirs(before)
        archive = subprocess.run(["git", "archive", args.before], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", before], input=archive, check=True)
        times = {"before": [], "now": []}
        for r in range(args.repeats):
            for side, tree in (("before", before), ("now", REPO)):
                times[side] += run_side(tree, world, args.steps, os.path.join(tmp, f"{side}{r}"))
    print(f"one toy RL step (16 x 8 rollouts, 64 new tokens, one thread), medians over "
          f"{len(times['now'])} steps per side:")
    print("| side | step s | generation s | scoring s | update s |\n| --- | --- | --- | --- | --- |")
    med = {side: {k: statistics.median(t[k] for t in ts) for k in ts[0]} for side, ts in times.items()}
    for side, m in med.items():
        name = f"{args.before} (before)" if side == "before" else "this tree"
        print(f"| {name} | {sum(m.values()):.3f} | {m['time_generate']:.3f} | {m['time_score']:.4f} | "
              f"{m['time_update']:.3f} |")
    print(f"before / now: {sum(med['before'].values()) / sum(med['now'].values()):.2f}x")


if __name__ == "__main__":
    main()
