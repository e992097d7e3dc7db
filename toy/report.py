r"""The toy world's report on the paper's three claims, measured here (and, on request, published:
docs/results/toy.md and the README's headline).

(a) Strategy-level diversity at inference: greedy pass@k with a latent per candidate (vae, noise,
    random_decoder prefixes) against greedy pass@1 and token-sampling pass@k, k up to 32.
(b) RL at equal steps: the baseline (plain GRPO/RLOO from the plain warm-up) against the linear
    and two-stage schedules (from the prefix warm-up), GRPO and RLOO, several seeds each: mean
    and spread of held-out greedy pass@1 after RL, and reward curves (reward_curves.png).
(c) Domain separation in latent space: the VAE's silhouette score and its PCA picture.

It runs the stage scripts as a user would (subprocesses), after runs/toy.sh has built the world,
the VAE and both warm-ups, and ends with where each output lives and a five-line summary:
    python -m toy.report --world runs/toy                       # writes runs/toy/report/ only
    python -m toy.report --world runs/toy --seeds 1 --rl-steps 20                 # a quick look
    python -m toy.report --world runs/toy --publish   # maintainers: docs/results/toy.md, the README's
                                                      # headline and the pictures in docs/results/
    python -m toy.report --across runs/toy runs/toy_build1 --publish
        # maintainers: the headline over world builds (BUILD_SEED=1 bash runs/toy.sh makes the
        # second), each build's numbers side by side and in words only what holds in every build;
        # it reads each build's report/report.json and runs nothing
"""

import argparse
import json
import os
import subprocess
import sys

from common import atomic_write_json, run_main
from common import ranged
from toy import Provenance, provenance, publish_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "a tiny world (TINY=1): its numbers show only that every stage ran, not what the method does"

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--world", default="runs/toy", help="the world directory of runs/toy.sh")
# (a) inference
parser.add_argument("--eval-problems", type=ranged(int, 1), default=100)
parser.add_argument("--n", type=ranged(int, 1), default=32, help="candidates per problem")
# (b) RL
parser.add_argument("--seeds", type=ranged(int, 1), default=3)
parser.add_argument("--rl-steps", type=ranged(int, 1), default=40)
parser.add_argument("--rl-flags", default="--prompts-per-step 16 --group-size 8 --lr 2e-5 --max-new-tokens 64",
                    help="flags shared by every RL run")
parser.add_argument("--across", nargs="+", metavar="WORLD",
                    help="report over these world builds (each with report/report.json) instead of one")
parser.add_argument("--publish", action="store_true",
                    help="also write docs/results/toy.md, the README's headline and docs/results/ pictures "
                         "(tracked files: a maintainer's step, never part of a user's run)")


def run(script, *args):
    cmd = [sys.executable, os.path.join(REPO, script), *[str(a) for a in args]]
    print("$ " + " ".join(cmd[1:]), flush=True)
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{script} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def inference_table(world, out, args):
    """(a): one evaluate.py configuration per decoding mode / prefix source, one shared table."""
    test = f"{world}/data/math_test.jsonl"
    common = ["--model", f"{world}/sft/model", "--benchmarks", test, "--limit", args.eval_problems,
              "--max-new-tokens", 64, "--out", out, "--batch-size", 512]
    ks = ",".join(str(k) for k in (1, 4, 8, 16, 32) if k <= args.n)
    run("evaluate.py", *common, "--mode", "sample", "--temperature", 0, "-n", 1, "--k", 1,
        "--config-name", "greedy (no prefix)", "--prefix-source", "none")
    run("evaluate.py", *common, "--mode", "sample", "--temperature", 1, "-n", args.n, "--k", ks,
        "--config-name", "token sampling T=1", "--prefix-source", "none")
    for source, region in (("vae", None), ("vae", "math"), ("noise", None), ("random_decoder", None)):
        label = f"{source} (math region)" if region else source
        run("evaluate.py", *common, "--mode", "greedy-latent", "--prefix-source", source,
            *(["--vae", f"{world}/vae"] if source == "vae" else []), "--L", 1, "-n", args.n, "--k", ks,
            "--config-name", f"greedy per latent, {label} L=1", *(["--region", region] if region else []))
    results = json.load(open(os.path.join(out, "results.json")))["configs"]
    numbers = {name: next(iter(config["benchmarks"].values())) for name, config in results.items()}
    lines = ["| decoding | " + " | ".join(f"pass@{k}" for k in ks.split(",")) + " |",
             "| --- |" + " --- |" * len(ks.split(","))]
    for name, bench in numbers.items():
        cells = [f"{100 * bench[f'pass@{k}']:.1f}" if f"pass@{k}" in bench else "–" for k in ks.split(",")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines), numbers


def check_same_run(run_dir, argv):
    """A finished RL run is reused only if its args.json holds the flags this report would run it
    with; a report asked with other flags (--rl-steps, --rl-flags, ...) stops in one line instead
    of mixing old runs into a new table."""
    import rl
    wanted = json.loads(json.dumps(vars(rl.parser.parse_args([str(a) for a in argv]))))   # as args.json holds it
    with open(f"{run_dir}/args.json") as f:
        saved = json.load(f)
    # a flag missing from args.json did not exist when the run was made: it ran as the default did
    differ = sorted(k for k in wanted if k != "resume" and k in saved and saved[k] != wanted[k])
    if differ:
        sys.exit(f"error: {run_dir} holds a finished run made with other flags "
                 f"({', '.join('--' + k.replace('_', '-') for k in differ)}); delete it (or the whole "
                 f"report directory) to run it again with these")


def rl_comparison(world, out, args):
    """(b): the same RL budget for every arm; held-out greedy pass@1 after RL (the table, and per
    estimator and arm the values over seeds), reward curves."""
    vae = ["--vae", f"{world}/vae"]
    arms = [("baseline", "sft_plain", ["--schedule", "none", "--prefix-source", "none"]),
            ("linear L=1", "sft", ["--schedule", "linear", "--L", 1, *vae]),
            ("two-stage L=1", "sft", ["--schedule", "two-stage", "--L", 1, *vae]),
            ("linear L=8", "sft", ["--schedule", "linear", "--L", 8, *vae])]
    curves, finals = {}, {}
    for estimator in ("grpo", "rloo"):
        for arm, start, flags in arms:
            for seed in range(args.seeds):
                run_dir = f"{out}/{estimator}_{arm.replace(' ', '_').replace('=', '')}_seed{seed}"
                argv = ["--model", f"{world}/{start}/model", "--data", f"{world}/data/math_train.jsonl",
                        "--eval-data", f"{world}/data/math_test.jsonl",
                        "--eval-every", 0, "--steps", args.rl_steps, "--estimator", estimator,
                        "--seed", seed, "--save-every", 0, "--out", run_dir, *flags, *args.rl_flags.split()]
                if os.path.exists(f"{run_dir}/model/config.json"):
                    check_same_run(run_dir, argv)           # a finished run is reused only as it was asked
                else:
                    run("rl.py", *argv)
                records = [json.loads(l) for l in open(f"{run_dir}/metrics.jsonl")]
                curves.setdefault((estimator, arm), []).append([r["reward_mean"] for r in records if "reward_mean" in r])
                finals.setdefault((estimator, arm), []).append(
                    next(r["eval_pass1"] for r in reversed(records) if "eval_pass1" in r))
    plot_curves(curves, f"{out}/reward_curves.png")
    lines = ["| estimator | arm | held-out greedy pass@1 after RL (mean ± std over seeds) | per seed | "
             "mean training reward, last 10 steps |", "| --- | --- | --- | --- | --- |"]
    for (estimator, arm), values in finals.items():
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5
        last = [sum(c[-10:]) / len(c[-10:]) for c in curves[(estimator, arm)]]
        lines.append(f"| {estimator} | {arm} | {100 * mean:.1f} ± {100 * std:.1f} | "
                     f"{', '.join(f'{100 * v:.1f}' for v in values)} | {100 * sum(last) / len(last):.1f} |")
    by_arm = {e: {arm: v for (e2, arm), v in finals.items() if e2 == e} for e in dict.fromkeys(e for e, _ in finals)}
    return "\n".join(lines) + "\n\n" + verdict(finals), by_arm


def verdict(finals):
    """One sentence per estimator: the best palette arm against the baseline, in points."""
    mean = lambda values: 100 * sum(values) / len(values)
    words = []
    for estimator in dict.fromkeys(e for e, _ in finals):
        arms = {arm: mean(v) for (e, arm), v in finals.items() if e == estimator}
        best = max((a for a in arms if a != "baseline"), key=arms.get)
        d = arms[best] - arms["baseline"]
        words.append(f"{estimator.upper()}: the best palette arm ({best}) ends {abs(d):.1f} points "
                     f"{'above' if d > 0 else 'below'} the plain baseline")
    return "In words: " + "; ".join(words) + " (held-out greedy pass@1 after RL, means over seeds)."


def plot_curves(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, estimator in zip(axes, ("grpo", "rloo")):
        for (est, arm), runs in curves.items():
            if est != estimator:
                continue
            n = min(len(r) for r in runs)
            data = np.array([r[:n] for r in runs])
            smooth = np.array([np.convolve(r, np.ones(5) / 5, mode="valid") for r in data])
            x = np.arange(smooth.shape[1]) + 2
            ax.plot(x, smooth.mean(0), label=arm)
            ax.fill_between(x, smooth.min(0), smooth.max(0), alpha=0.2)
        ax.set_title(f"{estimator.upper()}: training reward (5-step mean; band = seeds)")
        ax.set_xlabel("RL step")
        ax.legend()
    axes[0].set_ylabel("mean reward")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    args = parser.parse_args()
    if args.across:
        return across_builds(args.across, args.publish)
    world = args.world
    out = f"{world}/report"
    os.makedirs(out, exist_ok=True)
    base = json.load(open(f"{world}/base/world_report.json"))
    vae = json.load(open(f"{world}/vae/vae.json"))
    sft = next(r for r in map(json.loads, open(f"{world}/sft/summary.jsonl")) if "before" in r)
    sft_steps = json.load(open(f"{world}/sft/args.json"))["steps"]
    passk = next(k for k in base if k.startswith("pass@"))         # the k the world was built with
    table_a, inference = inference_table(world, f"{out}/inference", args)
    table_b, finals = rl_comparison(world, f"{out}/rl", args)
    here, built = provenance(f"{world}/base"), base.get("provenance")
    results = {"world": world, "tiny": json.load(open(f"{world}/args.json")).get("size") == "tiny",
               "provenance": here._asdict(), "world_build": built, "base_greedy_pass@1": base["greedy_pass@1"],
               "warmup_pass1_no_prefix": [sft["before"]["pass1_no_prefix"], sft["after"]["pass1_no_prefix"]],
               "inference": inference, "rl_steps": args.rl_steps, "seeds": args.seeds, "rl": finals,
               "silhouette": vae["silhouette"]}
    atomic_write_json(f"{out}/report.json", results)
    origin = str(here) + (f"; the world's build: CPU capability {built['cpu_capability']}, threads {built['threads']}"
                          if built else "")
    section = (f"**This is {TINY}.**\n\n" if results["tiny"] else "") + f"""Measured by `bash runs/toy.sh` (its last step is `python -m toy.report --world {world}`) on
this project's 2-core CPU machine. Numbers are what came out, whatever their sign.

**The world.** Base model: {base['n_params'] / 1e6:.2f}M parameters, built in {base['build_seconds']:.0f} s;
held-out greedy pass@1 {100 * base['greedy_pass@1']:.1f}%, {passk} {100 * base[passk]:.1f}% (sampled).
Strategies in its samples: {', '.join(f'{k} {100 * v:.0f}%' for k, v in base['strategy_shares'].items())}.
Provenance (this report): {origin}.
Warm-up (prefix source vae, L = 1, {sft_steps} steps): greedy pass@1 without prefix {100 * sft['before']['pass1_no_prefix']:.1f}% ->
{100 * sft['after']['pass1_no_prefix']:.1f}%; problems whose greedy answer differs between two prefixes
{100 * sft['before']['frac_differ_between_prefixes']:.1f}% -> {100 * sft['after']['frac_differ_between_prefixes']:.1f}%.

**(a) Diversity from latents at inference** ({args.eval_problems} held-out problems, after the prefix warm-up,
{args.n} candidates each; `{world}/report/inference/results.md`):

{table_a}

**(b) RL at equal steps** ({args.rl_steps} steps, `{args.rl_flags}`, {args.seeds} seeds;
curves in `{world}/report/rl/reward_curves.png`):

{table_b}

The training reward averages over all rollouts, prefixed ones included, so the palette arms'
curves start lower by construction (a prefixed rollout is less often right); the held-out column
is measured without prefixes for every arm and is the comparison at equal steps.

**(c) Domains in latent space.** Silhouette of the math / code / qa posterior means:
{vae['silhouette']:.3f} (PCA picture: `{world}/vae/latents.png`). Norms: token embedding
{vae['norms']['token_embedding']:.3f}, mean-pooled h {vae['norms']['mean_pooled_h']:.3f}, decoded prefix
{vae['norms']['prefix']:.3f}.
"""
    section += "\n![latent space](toy_latents.png) ![reward curves](toy_reward_curves.png)\n"
    open(f"{out}/report.md", "w").write(section)
    print(section)
    if args.publish:
        c = claims(results)
        headline = f"The toy world `{world}`: {c['world']}; (c) {c['(c)']}.\n- (a) {c['(a)']}.\n- (b) {c['(b)']}."
        publish_results("toy", section, headline, f"python -m toy.report --world {world} --publish",   # the pictures
                        pictures=[(f"{world}/vae/latents.png", "toy_latents.png"),                 # it shows
                                  (f"{out}/rl/reward_curves.png", "toy_reward_curves.png")])
    else:
        print(f"wrote {out}/report.md (docs/ and README.md untouched; --publish writes them)")
    print(where(world, out) + "\n" + summary(results))


def where(world, out):
    """Where each output of runs/toy.sh and of this report lives."""
    places = {"the world: data, base model and world_report.json": f"{world}/data, {world}/base",
              "the VAE: vae.json, latents.png": f"{world}/vae",
              "the warm-ups, prefix (vae) and plain": f"{world}/sft, {world}/sft_plain",
              "RL, plain and linear: metrics.jsonl, model": f"{world}/rl_none, {world}/rl_linear",
              "the palette: infer.py's completions": f"{world}/palette.jsonl",
              "this report: report.md, report.json": out,
              "(a)'s table; (b)'s runs and reward_curves.png": f"{out}/inference; {out}/rl"}
    return "Outputs:\n" + "\n".join(f"  {what:<50} {path}" for what, path in places.items())


def summary(r):
    """A heading and five lines from report.json's numbers (r)."""
    head = f"Summary ({TINY}):" if r["tiny"] else f"Summary (the full report: {r['world']}/report/report.md):"
    return "\n".join([head] + [f"  {key:<8} {line}" for key, line in claims(r).items()])


def claims(r):
    """One line each from report.json's numbers (r): the world, the warm-up, then claims (a), (b), (c)."""
    pct, mean = lambda v: f"{100 * v:.1f}%", lambda v: sum(v) / len(v)
    a = {label: r["inference"][name] for label, name in (("token sampling T=1", "token sampling T=1"),
         ("greedy per vae latent", "greedy per latent, vae L=1"), ("per noise latent", "greedy per latent, noise L=1"))}
    n = max(int(key[5:]) for key in a["token sampling T=1"] if key.startswith("pass@"))     # the largest k measured
    b = []
    for estimator, arms in r["rl"].items():
        best = max((arm for arm in arms if arm != "baseline"), key=lambda arm: mean(arms[arm]))   # as verdict()
        b.append(f"{estimator.upper()} baseline {pct(mean(arms['baseline']))}, "
                 f"best palette arm ({best}) {pct(mean(arms[best]))}")
    before, after = r["warmup_pass1_no_prefix"]
    return {"world": f"base greedy pass@1 {pct(r['base_greedy_pass@1'])}; {Provenance(**r['provenance'])}",
            "warm-up": f"greedy pass@1 without prefix {pct(before)} -> {pct(after)}",
            "(a)": f"pass@{n} (distinct answers per problem): " +
                   ", ".join(f"{label} {pct(c[f'pass@{n}'])} ({c['distinct_answers']:.1f})" for label, c in a.items()),
            "(b)": f"held-out greedy pass@1 after {r['rl_steps']} RL steps, mean of {r['seeds']} seed"
                   f"{'s' * (r['seeds'] != 1)}: " + "; ".join(b),
            "(c)": f"silhouette of math / code / qa in latent space {r['silhouette']:.3f}"}


def across_builds(worlds, publish):
    """The tables over world builds: one column per build for every number of (a), (b) and (c),
    each build's spread over seeds in (b), and sentences that say a sign only where every build
    agrees on it; docs/results/toy.md holds them and each build's own report below, the README's
    headline the sentences alone."""
    reports = []
    for world in worlds:
        path = f"{world}/report/report.json"
        if not os.path.exists(path):
            sys.exit(f"error: {path} is missing; run runs/toy.sh for that build first (BUILD_SEED=N bash runs/toy.sh)")
        reports.append(json.load(open(path)))
    if len({tuple(sorted(r["rl"])) for r in reports}) != 1 or len({(r["rl_steps"], r["seeds"]) for r in reports}) != 1:
        sys.exit("error: the builds' reports were made with other RL settings; rerun them with the same ones")
    pct = lambda v: f"{100 * v:.1f}"
    mean = lambda v: sum(v) / len(v)
    std = lambda v: (sum((x - mean(v)) ** 2 for x in v) / max(len(v) - 1, 1)) ** 0.5
    names = [f"build {i}" for i in range(len(reports))]
    head = lambda first: f"| {first} | " + " | ".join(names) + " |\n|" + " --- |" * (len(names) + 1)
    world_rows = [head("the world"),
                  "| directory | " + " | ".join(f"`{r['world']}`" for r in reports) + " |",
                  "| base weights sha256 | " + " | ".join(r["provenance"]["weights_sha256"] for r in reports) + " |",
                  "| base greedy pass@1 | " + " | ".join(pct(r["base_greedy_pass@1"]) for r in reports) + " |",
                  "| warm-up greedy pass@1 (no prefix), before -> after | " +
                  " | ".join(f"{pct(r['warmup_pass1_no_prefix'][0])} -> {pct(r['warmup_pass1_no_prefix'][1])}"
                             for r in reports) + " |",
                  "| (c) silhouette of the domains in latent space | " +
                  " | ".join(f"{r['silhouette']:.3f}" for r in reports) + " |"]
    n = max(int(k[5:]) for k in reports[0]["inference"]["token sampling T=1"] if k.startswith("pass@"))
    a_rows = [head(f"(a) decoding: pass@1 / pass@{n}")]
    for config in reports[0]["inference"]:
        cells = [r["inference"][config] for r in reports]
        a_rows.append(f"| {config} | " + " | ".join(f"{pct(c['pass@1'])} / {pct(c[f'pass@{n}'])}" if f"pass@{n}" in c
                                                  else pct(c["pass@1"]) for c in cells) + " |")
    b_rows = [head(f"(b) held-out greedy pass@1 after RL, mean ± std over {reports[0]['seeds']} seeds")]
    words = []
    for estimator, arms in reports[0]["rl"].items():
        for arm in arms:
            b_rows.append(f"| {estimator} {arm} | " + " | ".join(
                f"{pct(mean(r['rl'][estimator][arm]))} ± {pct(std(r['rl'][estimator][arm]))}" for r in reports) + " |")
        gaps = [{arm: mean(v) - mean(r["rl"][estimator]["baseline"]) for arm, v in r["rl"][estimator].items()
                 if arm != "baseline"} for r in reports]
        best = [max(g, key=g.get) for g in gaps]
        sign = ("below" if all(g[b] < 0 for g, b in zip(gaps, best)) else
                "above" if all(g[b] > 0 for g, b in zip(gaps, best)) else None)
        told = ", ".join(f"{100 * g[b]:+.1f} points ({b}) in {name}" for g, b, name in zip(gaps, best, names))
        words.append(f"{estimator.upper()}: the best palette arm minus the plain baseline is {told}: " +
                     (f"every palette arm ends {sign} the baseline in every build" if sign == "below" and
                      all(v < 0 for g in gaps for v in g.values()) else
                      f"the best palette arm ends {sign} the baseline in every build" if sign else
                      "the sign differs between builds, so no verdict holds across them"))
    vae, sampling = "greedy per latent, vae L=1", "token sampling T=1"
    diff = [r["inference"][vae][f"pass@{n}"] - r["inference"][sampling][f"pass@{n}"] for r in reports]
    words.insert(0, f"(a) pass@{n} of greedy decoding under a vae latent per candidate minus token sampling at T = 1: " +
                 ", ".join(f"{100 * d:+.1f} points in {name}" for d, name in zip(diff, names)) +
                 ("; lower in every build" if all(d < 0 for d in diff) else "; higher in every build"
                  if all(d > 0 for d in diff) else "; its sign differs between builds"))
    tables = "\n\n".join("\n".join(rows) for rows in (world_rows, a_rows, b_rows))
    over = (f"Over {len(reports)} builds of the toy world (the same code, data recipe and settings, "
            f"build seeds differing; {reports[0]['rl_steps']} RL steps)")
    headline = (f"{over}, only what holds in every build is stated as holding:\n- {words[0]}.\n- (b) "
                + "; ".join(words[1:]) + ".")                    # the README's; the full tables below
    full = (f"{over}:\n\n{tables}\n\nIn words, only what holds in every build is stated as holding:\n\n"
            + "\n".join(f"- {w}." for w in words)
            + "".join(f"\n\n## {name}: `{r['world']}`\n\n" + open(f"{r['world']}/report/report.md").read()
                      .replace("(toy_latents.png)", f"(toy_latents{i or ''}.png)")
                      .replace("(toy_reward_curves.png)", f"(toy_reward_curves{i or ''}.png)")
                      for i, (name, r) in enumerate(zip(names, reports))))
    print(full)
    if publish:
        pictures = [(f"{r['world']}/{source}", f"toy_{name}{i or ''}.png") for i, r in enumerate(reports)
                    for source, name in (("vae/latents.png", "latents"), ("report/rl/reward_curves.png", "reward_curves"))]
        publish_results("toy", full, headline, "python -m toy.report --across " + " ".join(worlds) + " --publish",
                        pictures=pictures)


if __name__ == "__main__":
    run_main(main)
