r"""When does exploration help? The exploration comparison in a toy world: ten ways to explore,
the same RL budget in steps, five seeds each, with the protocol fixed before any run.

    python -m toy.compare --world runs/toy                   # the first world -> runs/toy/compare/
    python -m toy.compare --world runs/toy_premise           # the premise world (runs/explore.sh)
    python -m toy.compare --world runs/toy --seeds 2 --steps 6 --out runs/toy/compare_quick  # a quick look
    python -m toy.compare --summarise runs/toy/compare,runs/toy_premise/compare   # both worlds' tables
    python -m toy.compare --summarise runs/toy/compare,runs/toy_premise/compare --readme  # maintainers

A world needs what runs/toy.sh builds (SETTING=premise for the premise world): data/, vae/, sft/
(the prefix warm-up) and sft_plain/ (the plain warm-up, the same 10 steps without prefixes).

The protocol (PROTOCOL below, written to <out>/protocol.md before the first run; a rerun with any
other protocol stops in one line instead of mixing runs):
- Arms (ARMS): plain GRPO; GRPO at temperature 1.2; GRPO with an entropy bonus; the palette with
  the linear and the two-stage schedule (vae prefixes, L = 1, from the prefix warm-up: L = 1 is
  the length the warm-up teaches this 4-layer model to read, and the vae source is the one the
  premise checks find moving the strategy most in the premise world); and the zero-advantage
  resampling arms of rl.py (G' = 24 extra rollouts for a group whose G rollouts all failed):
  naive resampling (no prefix), LoPE (lorem text, naive credit) with a short (16 tokens) and a
  LoPE-length (128 tokens) text, and the palette in the same slot (vae, L = 1) under either
  credit rule. Baselines and LoPE start from the plain warm-up, palette arms from the prefix
  warm-up: both are 10 SFT steps on the same problems.
- Budget: --steps RL steps of 16 prompts x 8 rollouts, lr 2e-5, 64 new tokens, no KL; seeds
  0..--seeds-1 (the seed sets the prompt order and every draw). Resampling arms spend more
  rollouts per step; each run's total is reported beside its scores.
- Metrics, on 200 held-out math problems balanced between the plain and ripple families
  (toy.premise.pick_problems; the first world has fewer ripple problems, so more plain ones):
  greedy pass@1 without prefix after RL, overall and on ripple problems; pass@8 under
  temperature-1 sampling (8 samples per problem, no prefix); the share of non-column strategies
  among the rollouts trained on at each step (in the premise world column is the dominant
  strategy, so this is the minority share); held-out greedy pass@1 every 5 steps for the curves
  (rl.py's own evaluation: 200 problems of the held-out file drawn by the run's seed, so the
  curves carry problem-sampling spread that the final scores, on one fixed set, do not).
- Spread: mean and 95% confidence interval over seeds (Student's t, n - 1 degrees of freedom).
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from common import atomic_write_json, atomic_write_text, run_main  # noqa: E402
from guard import UserError, read_jsonl  # noqa: E402

# name -> (warm-up to start from, rl.py flags). The order is the tables' order.
ARMS = {
    "grpo": ("sft_plain", "--schedule none --prefix-source none"),
    "grpo T=1.2": ("sft_plain", "--schedule none --prefix-source none --temperature 1.2"),
    "grpo + entropy": ("sft_plain", "--schedule none --prefix-source none --entropy-coef 0.01"),
    "palette linear": ("sft", "--schedule linear --L 1 --prefix-source vae"),
    "palette two-stage": ("sft", "--schedule two-stage --L 1 --prefix-source vae"),
    "resample (no prefix)": ("sft_plain", "--schedule none --prefix-source none --resample 24 "
                                         "--resample-source none"),
    "LoPE lorem-16 (naive)": ("sft_plain", "--schedule none --prefix-source none --resample 24 "
                                          "--resample-source lorem --resample-L 16 --resample-credit naive"),
    "LoPE lorem-128 (naive)": ("sft_plain", "--schedule none --prefix-source none --resample 24 "
                                           "--resample-source lorem --resample-L 128 --resample-credit naive"),
    "resample vae (naive)": ("sft", "--schedule none --prefix-source none --resample 24 "
                                   "--resample-source vae --resample-L 1 --resample-credit naive"),
    "resample vae (prefixed)": ("sft", "--schedule none --prefix-source none --resample 24 "
                                      "--resample-source vae --resample-L 1 --resample-credit prefixed"),
}
SHARED_FLAGS = "--prompts-per-step 16 --group-size 8 --lr 2e-5 --max-new-tokens 64"
EVAL_EVERY = 5
EVAL_PROBLEMS = 200
SAMPLES = 8
DOMINANT = "column"

# Two-sided 95% quantiles of Student's t by degrees of freedom (beyond the table: the normal's).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
       10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def mean_ci(values):
    """(mean, half-width of the 95% t interval) of a list of numbers; the half-width is 0 for one."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    n, m = len(values), sum(values) / len(values)
    if n < 2:
        return m, 0.0
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    t = T95.get(n - 1) or next((T95[d] for d in sorted(T95) if d >= n - 1), 1.96)
    return m, t * sd / math.sqrt(n)


def protocol(args):
    return {"arms": {name: {"start": start, "flags": flags} for name, (start, flags) in ARMS.items()
                     if name in args.arms},
            "seeds": list(range(args.seeds)), "steps": args.steps, "shared_flags": SHARED_FLAGS,
            "eval_every": EVAL_EVERY, "eval_problems": EVAL_PROBLEMS, "samples_per_problem": SAMPLES,
            "metrics": ["greedy pass@1 (no prefix) after RL, all and ripple", "pass@8 at T=1",
                        "non-column share of the trained rollouts per step", "rollouts generated"],
            "spread": "mean and 95% t interval over seeds"}


def protocol_markdown(p, world):
    lines = [f"# Exploration comparison: protocol for {world}", "",
             "Fixed before the first run (toy/compare.py); every arm below is run and reported.", "",
             f"- Seeds: {', '.join(map(str, p['seeds']))}; RL steps: {p['steps']}; shared rl.py flags: "
             f"`{p['shared_flags']}`.",
             f"- Metrics on {p['eval_problems']} held-out math problems: " + "; ".join(p["metrics"]) + ".",
             f"- Spread: {p['spread']}.", "", "| arm | starts from | rl.py flags |", "| --- | --- | --- |"]
    lines += [f"| {name} | {a['start']} | `{a['flags']}` |" for name, a in p["arms"].items()]
    return "\n".join(lines) + "\n"


def slug(arm):
    return "".join(c if c.isalnum() else "_" for c in arm).strip("_").replace("__", "_")


def rl_argv(world, run_dir, arm, seed, steps):
    start, flags = ARMS[arm]
    argv = ["--model", f"{world}/{start}/model", "--data", f"{world}/data/math_train.jsonl",
            "--eval-data", f"{world}/data/math_test.jsonl", "--eval-problems", str(EVAL_PROBLEMS),
            "--eval-every", str(EVAL_EVERY), "--steps", str(steps), "--seed", str(seed),
            "--save-every", "0", "--sample-every", "1", "--samples-per-step", "0", "--out", run_dir]
    argv += SHARED_FLAGS.split() + flags.split()
    if "vae" in flags.split():
        argv += ["--vae", f"{world}/vae"]
    return argv

# -----------------------------------------------------------------------------
# One run: RL (rl.py as a user runs it), then its held-out scores


def greedy_scores(world, model_dir):
    """A model's greedy completions of the comparison's held-out problems (the same for every run
    and every warm-up), with what scoring them needs next."""
    import torch
    from data import format_prompt
    from model import load_policy
    from toy.premise import complete, pick_problems
    from toy.task import grade

    torch.set_num_threads(1)
    rows = pick_problems(world, EVAL_PROBLEMS, seed=0)
    model, tokenizer = load_policy(model_dir)
    prompts = [format_prompt(r["problem"], "plain") for r in rows]
    settings = argparse.Namespace(max_new_tokens=64)
    greedy = complete(model, tokenizer, prompts, settings, temperature=0)
    right = [grade(t, r["answer"]) for t, r in zip(greedy, rows)]
    return rows, greedy, right, (model, tokenizer, prompts, settings)


def by_family(values, rows, family):
    picked = [v for v, r in zip(values, rows) if r["family"] == family]
    return sum(picked) / len(picked) if picked else None


def score_run(world, run_dir, seed):
    """Greedy and sampled scores of the run's final model, and its training curves."""
    import torch
    from toy.premise import complete
    from toy.task import detect_strategy, extract_answer, grade

    rows, greedy, right, (model, tokenizer, prompts, settings) = greedy_scores(
        world, os.path.join(run_dir, "model"))
    generator = torch.Generator().manual_seed(1000 + seed)
    sampled = complete(model, tokenizer, [p for p in prompts for _ in range(SAMPLES)], settings,
                       temperature=1.0, generator=generator)
    any_right, distinct = [], []
    for i, r in enumerate(rows):
        texts = sampled[i * SAMPLES:(i + 1) * SAMPLES]
        any_right.append(max(grade(t, r["answer"]) for t in texts))
        distinct.append(len({extract_answer(t) for t in texts} - {None}))

    metrics = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    steps = [m for m in metrics if "reward_mean" in m]
    minority = {}
    for s in read_jsonl(os.path.join(run_dir, "samples.jsonl")):
        minority.setdefault(s["step"], []).append(detect_strategy(s["completion"]) not in (DOMINANT, None))
    return {
        "pass1": sum(right) / len(right), "pass1_ripple": by_family(right, rows, "ripple"),
        "pass1_plain": by_family(right, rows, "plain"),
        "pass8": sum(any_right) / len(any_right), "pass8_ripple": by_family(any_right, rows, "ripple"),
        "distinct_answers": sum(distinct) / len(distinct),
        "greedy_minority": sum(detect_strategy(t) not in (DOMINANT, None) for t in greedy) / len(greedy),
        "sampled_minority": sum(detect_strategy(t) not in (DOMINANT, None) for t in sampled) / len(sampled),
        "minority_curve": [sum(v) / len(v) for _, v in sorted(minority.items())],
        "reward_curve": [m["reward_mean"] for m in steps],
        "eval_curve": [[m["step"], m["eval_pass1"]] for m in metrics if "eval_pass1" in m],
        "rollouts": sum(m.get("rollouts_generated", 0) for m in steps),
        "ripple_problems": sum(r["family"] == "ripple" for r in rows),
    }


def run_one(world, out, arm, seed, steps):
    """RL for one (arm, seed), then score it; result.json marks it done (a rerun skips it)."""
    run_dir = os.path.join(out, f"{slug(arm)}_seed{seed}")
    result_path = os.path.join(run_dir, "result.json")
    if os.path.exists(result_path):
        return json.load(open(result_path))
    t0 = time.time()
    if not os.path.exists(os.path.join(run_dir, "model", "config.json")):
        if os.path.isdir(run_dir):                 # a run stopped part-way starts again
            shutil.rmtree(run_dir)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, os.path.join(REPO, "rl.py"), *rl_argv(world, run_dir, arm, seed, steps)]
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            os.makedirs(run_dir, exist_ok=True)
            log = os.path.join(run_dir, "rl.log")
            with open(log, "w") as f:
                f.write(done.stdout + done.stderr)
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise UserError(f"{arm}, seed {seed}: rl.py failed ({tail[0]}); its output is in {log}")
    result = {"arm": arm, "seed": seed, **score_run(world, run_dir, seed), "wall_s": time.time() - t0}
    atomic_write_json(result_path, result)
    return result

# -----------------------------------------------------------------------------
# Tables and pictures


def pct(m_ci):
    m, ci = m_ci
    return "–" if m is None else f"{100 * m:.1f} ± {100 * ci:.1f}"


def before_rl(world):
    """Greedy pass@1, overall and on ripple problems, of each warm-up the arms start from, on the
    problems the runs are scored on (one model each: no spread)."""
    scores = {}
    for start in sorted({start for start, _ in ARMS.values()}):
        rows, _, right, _ = greedy_scores(world, os.path.join(world, start, "model"))
        scores[start] = (sum(right) / len(right), by_family(right, rows, "ripple"))
    return scores


def summary_rows(results, before):
    """One table row per arm: its warm-up's score (before: start -> (pass@1, ripple pass@1)), then
    mean ± 95% CI over seeds of each metric."""
    arms = [a for a in ARMS if any(r["arm"] == a for r in results)]
    rows = []
    for arm in arms:
        mine = [r for r in results if r["arm"] == arm]
        start, ripple = before[ARMS[arm][0]]
        cells = [f"{100 * start:.1f} ({'–' if ripple is None else f'{100 * ripple:.1f}'})"]
        cells += [pct(mean_ci([r[k] for r in mine])) for k in ("pass1", "pass1_ripple", "pass8", "pass8_ripple")]
        cells.append(pct(mean_ci([sum(r["minority_curve"]) / len(r["minority_curve"]) for r in mine])))
        cells.append(pct(mean_ci([r["greedy_minority"] for r in mine])))
        m, ci = mean_ci([r["rollouts"] for r in mine])
        cells.append(f"{m:.0f} ± {ci:.0f}")
        rows.append(f"| {arm} | {len(mine)} | " + " | ".join(cells) + " |")
    header = ("| arm | seeds | before RL: greedy pass@1 (ripple) | greedy pass@1 | pass@1 ripple | pass@8 (T=1) | pass@8 ripple | "
              "non-column share, training | non-column share, greedy after | rollouts |\n"
              "| --- |" + " --- |" * 9)
    return header + "\n" + "\n".join(rows)


def ripple_rollouts(run_dir):
    """Post-hoc diagnostic (added after the runs, not in the protocol): of the rollouts trained on
    for ripple problems, the fraction solved and the fraction solved by a non-column strategy,
    from the run's samples.jsonl (every rollout of every step)."""
    from toy.task import detect_strategy, math_family
    ripple = [s for s in read_jsonl(os.path.join(run_dir, "samples.jsonl"))
              if math_family({"problem": s["problem"]}) == "ripple"]
    solved = [s for s in ripple if s["reward"] > 0]
    by_minority = [s for s in solved if detect_strategy(s["completion"]) not in (DOMINANT, None)]
    return len(solved) / max(1, len(ripple)), len(by_minority) / max(1, len(ripple))


def diagnostic_rows(out, p):
    lines = ["| arm | ripple rollouts solved in training | solved by round or split |", "| --- | --- | --- |"]
    for arm in p["arms"]:
        runs = [os.path.join(out, f"{slug(arm)}_seed{seed}") for seed in p["seeds"]]
        values = [ripple_rollouts(r) for r in runs if os.path.exists(os.path.join(r, "result.json"))]
        if values:
            lines.append(f"| {arm} | {pct(mean_ci([v[0] for v in values]))} | "
                         f"{pct(mean_ci([v[1] for v in values]))} |")
    return "\n".join(lines)


def draw(results, path, title):
    """Held-out greedy pass@1 and the non-column share over training, mean and 95% band per arm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for arm in [a for a in ARMS if any(r["arm"] == a for r in results)]:
        mine = [r for r in results if r["arm"] == arm]
        steps = [s for s, _ in mine[0]["eval_curve"]]
        stats = [mean_ci([dict(map(tuple, r["eval_curve"])).get(s) for r in mine]) for s in steps]
        line, = left.plot(steps, [100 * m for m, _ in stats], marker="o", ms=3, label=arm)
        left.fill_between(steps, [100 * (m - c) for m, c in stats], [100 * (m + c) for m, c in stats],
                          color=line.get_color(), alpha=0.12)
        n = min(len(r["minority_curve"]) for r in mine)
        smooth = [[sum(c[max(0, i - 1):i + 2]) / len(c[max(0, i - 1):i + 2]) for i in range(n)]
                  for c in (r["minority_curve"][:n] for r in mine)]     # over 3 steps: 384 rollouts
        stats = [mean_ci([c[i] for c in smooth]) for i in range(n)]
        right.plot(range(n), [100 * m for m, _ in stats], color=line.get_color())
        right.fill_between(range(n), [100 * (m - c) for m, c in stats], [100 * (m + c) for m, c in stats],
                           color=line.get_color(), alpha=0.12)
    left.set(xlabel="RL step", ylabel="held-out greedy pass@1 (%)", title=f"{title}: held-out accuracy")
    right.set(xlabel="RL step", ylabel="non-column rollouts trained on (%, 3-step mean)",
              title=f"{title}: strategy exploration")
    left.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def world_title(world):
    args = json.load(open(os.path.join(world, "args.json")))
    return "premise world" if args.get("setting") == "premise" else "first world"

# -----------------------------------------------------------------------------
# Both worlds side by side: the premise checks, then the comparison


def premise_rows(worlds):
    """The premise checks (toy.premise's premise.json) of each world, a column per world."""
    checks = [json.load(open(os.path.join(w, "premise", "premise.json"))) for w in worlds]

    def row(label, cell):
        return f"| {label} | " + " | ".join(cell(c) for c in checks) + " |"

    def shares(s):
        return " / ".join(f"{100 * s[k]:.0f}" for k in ("column", "round", "split"))

    def forced(strategy):
        return lambda c: (f"{100 * c['base']['forced_success'][strategy]['plain']:.1f} / "
                          f"{100 * c['base']['forced_success'][strategy]['ripple']:.1f}")

    def moved(name):
        def cell(c):
            p = c["prefixes"].get(name)
            return "–" if p is None else (f"{shares(p['greedy']['shares'])} "
                                          f"({100 * p['greedy']['problems_leaving_dominant']:.0f}%)")
        return cell

    lines = ["| premise check | " + " | ".join(world_title(w) for w in worlds) + " |",
             "| --- |" + " --- |" * len(worlds),
             row("greedy shares, column / round / split (%)", lambda c: shares(c["base"]["greedy_shares"])),
             row("T=1 shares (%)", lambda c: shares(c["base"]["sampled_shares"])),
             row("T=1 samples leaving the greedy strategy",
                 lambda c: f"{100 * c['base']['sampled_leaves_greedy_strategy']:.1f}%")]
    lines += [row(f"forced {s}: success plain / ripple (%)", forced(s)) for s in ("column", "round", "split")]
    lines += [row(f"greedy shares under {name} prefixes after the warm-up (problems leaving column)", moved(name))
              for name in ("noise", "vae_centred", "vae_centred (math region)")]
    return "\n".join(lines)


def summarise(outs, readme):
    """The README's exploration section for these comparisons (each an --out of a world's run,
    the world its parent directory): premise checks, tables, pictures."""
    worlds = [os.path.dirname(os.path.normpath(o)) for o in outs]
    for w, o in zip(worlds, outs):
        for path in (os.path.join(w, "premise", "premise.json"), os.path.join(o, "protocol.json")):
            if not os.path.exists(path):
                raise UserError(f"--summarise: no {path}; run runs/explore.sh (or its step for that "
                                f"world) first")
    pictures = os.path.join(REPO, "docs", "results") if readme else outs[0]
    parts = ["Measured by `bash runs/explore.sh` on this project's 2-core CPU machine; the protocol "
             "(arms, seeds, steps, metrics) was written to each world's `compare/protocol.md` before "
             "its first run and is the one in `toy/compare.py`'s docstring. Mean ± 95% CI over seeds; "
             "numbers are what came out, whatever their sign.", "",
             "**Premise checks** (`python -m toy.premise`, 200 held-out problems, before any RL):", "",
             premise_rows(worlds)]
    for w, out in zip(worlds, outs):
        p = json.load(open(os.path.join(out, "protocol.json")))
        results = [json.load(open(os.path.join(out, f"{slug(arm)}_seed{seed}", "result.json")))
                   for arm in p["arms"] for seed in p["seeds"]
                   if os.path.exists(os.path.join(out, f"{slug(arm)}_seed{seed}", "result.json"))]
        title = world_title(w)
        picture = os.path.join(pictures, f"explore_{title.split()[0]}.png")
        draw(results, picture, title)
        ripple = results[0]["ripple_problems"] if results else 0
        parts += ["", f"**{title[0].upper() + title[1:]}** (`{w}`; {p['steps']} RL steps, "
                      f"{len(p['seeds'])} seeds; {ripple} of the {EVAL_PROBLEMS} held-out problems are ripple):",
                  "", summary_rows(results, before_rl(w)), "",
                  "Diagnostic added after the runs (not in the protocol), from every rollout trained on "
                  "(`samples.jsonl`), % of ripple-problem rollouts:", "", diagnostic_rows(out, p), "",
                  f"![{title}]({os.path.basename(picture)})" if readme else f"picture: {picture}"]
    section = "\n".join(parts)
    if readme:
        from toy import publish_results
        publish_results("explore", section, premise_rows(worlds), "bash runs/explore.sh (README=1)")
        print("wrote docs/results/explore.md and the README's headline")
    else:
        atomic_write_text(os.path.join(outs[0], "summary.md"), section + "\n")
        print(section)

# -----------------------------------------------------------------------------
# Main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default=None, help="run the comparison in this world (runs/toy.sh's layout)")
    p.add_argument("--out", default=None, help="default: <world>/compare")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--arms", default=",".join(ARMS), help="a comma-separated subset of the arms")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one CPU thread each")
    p.add_argument("--summarise", default=None, help="comma-separated comparison directories (--out of "
                   "each world's run) to tabulate side by side")
    p.add_argument("--readme", action="store_true", help="with --summarise: also rewrite README.md's "
                   "exploration section and docs/ pictures (a maintainer's step)")
    args = p.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    for arm in args.arms:
        if arm not in ARMS:
            raise UserError(f"--arms: unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    if (args.world is None) == (args.summarise is None):
        raise UserError("give --world (run a comparison) or --summarise (tabulate finished ones)")
    if min(args.seeds, args.steps, args.jobs) < 1:
        raise UserError("--seeds, --steps and --jobs must be at least 1")
    if args.world:
        for name in ("data/math_train.jsonl", "vae/vae.json", "sft/model/config.json",
                     "sft_plain/model/config.json"):
            if not os.path.exists(os.path.join(args.world, name)):
                raise UserError(f"--world {args.world}: no {name}; build the world with runs/toy.sh "
                                f"(SETTING=premise for the premise world) first")
        args.out = args.out or os.path.join(args.world, "compare")
    return args


def compare(args):
    os.makedirs(args.out, exist_ok=True)
    wanted = protocol(args)
    path = os.path.join(args.out, "protocol.json")
    if os.path.exists(path):
        if json.load(open(path)) != wanted:
            raise UserError(f"{args.out} holds runs made under another protocol ({path}); delete the "
                            f"directory, or give --out, to run this one")
    else:   # written before the first run: the protocol is fixed, whatever comes out
        atomic_write_json(path, wanted)
        atomic_write_text(os.path.join(args.out, "protocol.md"), protocol_markdown(wanted, args.world))
    jobs = [(arm, seed) for arm in args.arms for seed in range(args.seeds)]
    results, t0 = [], time.time()
    if args.jobs == 1:       # in this process: one run after another
        finished = (run_one(args.world, args.out, arm, seed, args.steps) for arm, seed in jobs)
    else:
        pool = ProcessPoolExecutor(args.jobs)
        finished = (f.result() for f in as_completed(
            [pool.submit(run_one, args.world, args.out, arm, seed, args.steps) for arm, seed in jobs]))
    for i, r in enumerate(finished):
        results.append(r)
        print(f"[{i + 1}/{len(jobs)}] {r['arm']}, seed {r['seed']}: pass@1 {100 * r['pass1']:.1f}, "
              f"pass@8 {100 * r['pass8']:.1f}, rollouts {r['rollouts']} ({time.time() - t0:.0f}s)",
              flush=True)
    results.sort(key=lambda r: (list(ARMS).index(r["arm"]), r["seed"]))
    title = world_title(args.world)
    table = summary_rows(results, before_rl(args.world))
    draw(results, os.path.join(args.out, "curves.png"), title)
    atomic_write_text(os.path.join(args.out, "results.md"),
                      protocol_markdown(wanted, args.world) + f"\n## Results ({title})\n\n{table}\n")
    print(table)
    print(f"wrote {args.out}/results.md and curves.png")


def main(argv=None):
    args = parse_args(argv)
    if args.world:
        return compare(args)
    summarise([w for w in args.summarise.split(",") if w], args.readme)


if __name__ == "__main__":
    run_main(main)
