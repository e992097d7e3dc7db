r"""When does exploration help? The exploration comparison in the premise world (the second
protocol), fixed in PROTOCOL below and written to <out>/protocol.md before the first run.

    python -m toy.compare --world runs/toy_premise                       # -> runs/toy_premise/compare/
    python -m toy.compare --world runs/toy_premise --quick               # a smoke test -> compare_quick/
    python -m toy.compare --summarise runs/toy_premise/compare           # the report, from finished runs
    python -m toy.compare --summarise runs/toy_premise/compare --publish # maintainers: docs/results/explore.md

The world needs what runs/explore.sh builds: the premise world (toy.build_world --setting premise),
its VAE (train_vae.py), and the premise checks (toy.premise, whose section 5 picks the rollout
temperature). The first protocol (ten arms x 5 seeds x 20 steps from 10-step warm-ups, in both toy
worlds) ran at commit 6d22ca5; docs/results/explore_first_protocol.md keeps its results. No arm,
plain GRPO included, learned the ripple family there, because the minority strategies that solve
it were almost never carried out correctly when sampled at T = 1 and nothing showed the family was
learnable at that budget. This protocol first makes both hold, then compares:

1. Rollout temperature: toy.premise's, the highest temperature at which forced round and split
   solve >= 30% of ripple problems while fewer than 10% of problems see sampling leave column.
2. Warm-ups that make ripple learnable: the world's RL training file, with a fraction of its ripple
   rows re-solved by round or split (alternately), SFT at lr 3e-5 (runs/toy.sh's warm-up) with no
   prefix ("plain"), with vae prefixes and with rsp prefixes (L = 1). The (fraction, steps) is the
   first of SEED_LADDER whose plain warm-up solves >= 5% of the held-out ripple problems greedily:
   more seeded rows first, then more steps (10 steps of 40% seeded rows solved 3% in an earlier,
   unfinished run of this protocol: greedy decoding still picks column, which fails on ripple).
3. The learning rate, on plain GRPO alone: seed 0 at each of LRS; the one with the highest held-out
   ripple pass@1 after the rung's steps (ties: the smaller) is fixed for every arm.
4. Positive control, before any arm: that run must raise held-out ripple pass@1 by >= 20 points over
   its warm-up. If it does not, 3-4 run again at the next rung of CONTROL_LADDER (RL problems,
   steps): the world's RL problems at 60 then 120 steps, then its ripple problems alone at 60 then
   120 steps. If no rung passes, no arm runs and the report says so. The ripple rungs were added
   after this protocol's first run, in which both mixed rungs failed (-8 and -1 points) and a
   240-step run outside the protocol gained 8 points, its held-out pass@1 flat from step 140: on
   the mix a minority rollout is rewarded on ripple and punished on plain, and a model that cannot
   yet tell the families apart learns little. On ripple problems alone the dominant strategy is
   always wrong and the right one must be found by leaving it, which is what claim (b) is about;
   held-out pass@1 on plain problems shows what that costs.
5. The arms (ARMS), seeds 0-4, at the passing rung's problems and steps, its lr and the rollout
   temperature; every rollout counted.
6. The follow-up (FOLLOW_UP), fixed after the arms ran and written to <out>/follow_up.md before its
   first run: plain GRPO from the vae and rsp warm-ups, at the same settings and seeds, so that
   "palette vs grpo" can be split into what the prefix warm-up does and what the prefixes do in RL.

Hypothesis, written before the first run: the palette (linear schedule) beats plain GRPO on held-out
ripple pass@1 at equal steps (the difference of means, Welch's 95% interval above 0).
Primary metrics: held-out greedy pass@1 without prefix after RL on 200 problems (100 ripple, 100
plain; toy.premise.pick_problems), ripple and overall. Secondary: pass@8 at the rollout temperature,
the share of minority-strategy rollouts trained on, ripple rollouts solved in training (all, and by
round or split), rollouts generated, held-out curves every 10 steps (rl.py's --eval-data, all
problems). Spread: mean and 95% t interval
over seeds; every arm is reported, whatever the sign.
"""

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from common import atomic_write_json, atomic_write_text, run_main  # noqa: E402
from common import UserError, ranged, read_jsonl  # noqa: E402
from toy import Provenance, provenance  # noqa: E402

# name -> (warm-up it starts from, rl.py flags); {T_high} is the rollout temperature + 0.5
ARMS = {
    "grpo": ("plain", "--schedule none --prefix-source none"),
    "grpo higher T": ("plain", "--schedule none --prefix-source none --temperature {T_high}"),
    "palette linear": ("vae", "--schedule linear --L 1 --prefix-source vae"),
    "palette two-stage": ("vae", "--schedule two-stage --L 1 --prefix-source vae"),
    "rsp linear": ("rsp", "--schedule linear --L 1 --prefix-source rsp"),
    "resample vae (prefixed)": ("vae", "--schedule none --prefix-source none "
                                       "--resample 24,source=vae,L=1,credit=prefixed"),
    "LoPE lorem-128 (naive)": ("plain", "--schedule none --prefix-source none "
                                        "--resample 24,source=lorem,L=128,credit=naive"),
}
# The follow-up, fixed after the arms ran and before any of its runs: the palette and rsp arms start
# from prefix warm-ups that solve 0% of ripple problems greedily, against the plain warm-up's 8%, so
# "palette vs grpo" mixes two things. Plain GRPO from each prefix warm-up, at the arms' settings and
# seeds, separates what a warm-up costs from what its prefixes do during RL.
FOLLOW_UP = {"grpo from the vae warm-up": ("vae", ARMS["grpo"][1]),
             "grpo from the rsp warm-up": ("rsp", ARMS["grpo"][1])}
FOLLOW_UP_CONTRASTS = (("palette linear", "grpo from the vae warm-up"), ("palette two-stage", "grpo from the vae warm-up"),
                       ("rsp linear", "grpo from the rsp warm-up"), ("grpo from the vae warm-up", "grpo"),
                       ("grpo from the rsp warm-up", "grpo"))      # (a, b): a - b; the first is the hypothesis
WARMUPS = {"plain": ["--prefix-source", "none"], "vae": ["--prefix-source", "vae", "--L", "1"],
           "rsp": ["--prefix-source", "rsp", "--L", "1"]}
SEED_LADDER, START_RIPPLE = ((0.05, 10), (0.1, 10), (0.2, 10), (0.4, 10), (0.4, 30), (0.4, 60)), 0.05
LRS, CONTROL_GAIN = (2e-5, 5e-5, 1e-4), 0.20
CONTROL_LADDER = (("mixed", 1), ("mixed", 2), ("ripple", 1), ("ripple", 2))   # (RL problems, times --steps)
SHARED = "--prompts-per-step 16 --group-size 8 --max-new-tokens 64 --eval-every 10"
EVAL_PROBLEMS, SAMPLES, DOMINANT = 200, 8, "column"

# Two-sided 95% quantiles of Student's t by degrees of freedom (beyond the table: the normal's).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
       10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(df):
    return T95.get(df) or next((T95[d] for d in sorted(T95) if d >= df), 1.96)


def mean_ci(values):
    """(mean, half-width of the 95% t interval) of a list of numbers; the half-width is 0 for one."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    n, m = len(values), sum(values) / len(values)
    if n < 2:
        return m, 0.0
    return m, t95(n - 1) * math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def welch(a, b):
    """(mean of a - mean of b, half-width of its 95% interval), Welch's degrees of freedom."""
    va, vb = (sum((x - sum(v) / len(v)) ** 2 for x in v) / (len(v) - 1) / len(v) for v in (a, b))
    df = (va + vb) ** 2 / max(va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1), 1e-30)
    return sum(a) / len(a) - sum(b) / len(b), t95(max(1, round(df))) * math.sqrt(va + vb)


def slug(name):
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").replace("__", "_")


# -----------------------------------------------------------------------------
# Scoring a model: greedy and sampled on the held-out problems

def score_model(world, model_dir, temperature=None, seed=0):
    """Greedy pass@1 (all, ripple, plain) of a model on the comparison's held-out problems and, with a
    temperature, pass@8 there and the strategies of its samples."""
    import torch
    from data import format_prompt
    from model import load_policy
    from toy.premise import complete, pick_problems
    from toy.task import detect_strategy, grade
    torch.set_num_threads(1)
    rows = pick_problems(world, EVAL_PROBLEMS, seed=0)
    model, tokenizer = load_policy(model_dir)
    prompts = [format_prompt(r["problem"], "plain") for r in rows]
    settings = argparse.Namespace(max_new_tokens=64)
    greedy = complete(model, tokenizer, prompts, settings, temperature=0)
    right = [grade(t, r["answer"]) for t, r in zip(greedy, rows)]
    family = lambda values, f: sum(v for v, r in zip(values, rows) if r["family"] == f) / \
        max(1, sum(r["family"] == f for r in rows))
    out = {"pass1": sum(right) / len(right), "pass1_ripple": family(right, "ripple"),
           "pass1_plain": family(right, "plain"),
           "greedy_minority": sum(detect_strategy(t) not in (DOMINANT, None) for t in greedy) / len(greedy)}
    if temperature is not None:
        texts = complete(model, tokenizer, [p for p in prompts for _ in range(SAMPLES)], settings, temperature,
                         generator=torch.Generator().manual_seed(1000 + seed))
        hit = [max(grade(t, r["answer"]) for t in texts[i * SAMPLES:(i + 1) * SAMPLES]) for i, r in enumerate(rows)]
        out.update(pass8=sum(hit) / len(hit), pass8_ripple=family(hit, "ripple"))
    return out


def training_record(run_dir):
    """From the run's logs: the held-out curve, rewards, rollouts, and of the rollouts trained on the
    minority share per step and the ripple ones solved (all, and by round or split)."""
    from toy.task import detect_strategy, math_family
    metrics = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    samples = read_jsonl(os.path.join(run_dir, "samples.jsonl"))
    minority = {}
    for s in samples:
        minority.setdefault(s["step"], []).append(detect_strategy(s["completion"]) not in (DOMINANT, None))
    ripple = [s for s in samples if math_family({"problem": s["problem"]}) == "ripple"]
    solved = [s for s in ripple if s["reward"] > 0]
    return {"eval_curve": [[m["step"], m["eval_pass1"]] for m in metrics if "eval_pass1" in m],
            "reward_curve": [m["reward_mean"] for m in metrics if "reward_mean" in m],
            "rollouts": sum(m.get("rollouts_generated", 0) for m in metrics),
            "minority_curve": [sum(v) / len(v) for _, v in sorted(minority.items())],
            "ripple_solved_in_training": len(solved) / max(1, len(ripple)),
            "ripple_solved_by_minority": sum(detect_strategy(s["completion"]) not in (DOMINANT, None)
                                             for s in solved) / max(1, len(ripple))}


# -----------------------------------------------------------------------------
# Runs: warm-ups, then RL; each is skipped when its output exists, so a rerun continues

def run(cmd, log):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        os.makedirs(os.path.dirname(log), exist_ok=True)
        with open(log, "w") as f:
            f.write(done.stdout + done.stderr)
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"{cmd[0]} failed ({tail[0]}); its output is in {log}")


def seeded_data(world, out, fraction):
    """The world's RL training file with `fraction` of its rows replaced by ripple rows re-solved
    correctly by round or split, alternately (a seeded choice)."""
    from toy.task import solve, write_jsonl
    path = os.path.join(out, f"warmup_data_{fraction}.jsonl")
    if not os.path.exists(path):
        rows = read_jsonl(os.path.join(world, "data", "math_train.jsonl"))
        ripple = [i for i, r in enumerate(rows) if r.get("family") == "ripple"]
        for k, i in enumerate(sorted(random.Random(0).sample(ripple, round(fraction * len(rows))))):
            strategy = ("round", "split")[k % 2]
            rows[i] = dict(rows[i], solution=solve(rows[i], strategy), strategy=strategy, seeded=True)
        write_jsonl(rows, path)
    return path


def rl_problems(world, out, problems):
    """The RL training file of a control rung: the world's own ("mixed"), or its ripple rows alone."""
    mixed, ripple = os.path.join(world, "data", "math_train.jsonl"), os.path.join(out, "rl_data_ripple.jsonl")
    if problems == "mixed":
        return mixed
    if not os.path.exists(ripple):
        from toy.task import write_jsonl
        write_jsonl([r for r in read_jsonl(mixed) if r.get("family") == "ripple"], ripple)
    return ripple


def sweep_name(lr, steps, problems):
    return f"sweep lr{lr} steps{steps}" + ("" if problems == "mixed" else f" {problems}")


def warmup(world, out, name, fraction, steps):
    model = os.path.join(out, f"warmup_{name}_{fraction}_{steps}steps")
    if not os.path.exists(os.path.join(model, "model", "config.json")):
        shutil.rmtree(model, ignore_errors=True)
        run(["sft_warmup.py", "--model", f"{world}/base", *(["--vae", f"{world}/vae"] if name == "vae" else []),
             "--data", seeded_data(world, out, fraction), "--steps", str(steps), "--lr", "3e-5", "--out", model,
             *WARMUPS[name]], os.path.join(out, f"warmup_{name}_{fraction}_{steps}steps.log"))
    return os.path.join(model, "model")


def rl_argv(world, run_dir, start, flags, seed, p):
    """rl.py's flags for one run: the shared ones, the protocol's settings p, then the arm's own."""
    return ["--model", start, *(["--vae", f"{world}/vae"] if "vae" in flags else []), "--data", p["data"],
            "--eval-data", f"{world}/data/math_test.jsonl", "--steps", str(p["steps"]), "--lr", str(p["lr"]),
            "--temperature", str(p["temperature"]), "--seed", str(seed), "--save-every", "0",
            "--out", run_dir, *SHARED.split(), *flags.format(T_high=round(p["temperature"] + 0.5, 2)).split()]


def rl_run(world, out, name, start, flags, seed, p):
    """One RL run (rl.py as a user runs it) and its scores; result.json marks it done."""
    run_dir = os.path.join(out, f"{slug(name)}_seed{seed}")
    if os.path.exists(os.path.join(run_dir, "result.json")):
        return json.load(open(os.path.join(run_dir, "result.json")))
    t0 = time.time()
    shutil.rmtree(run_dir, ignore_errors=True)
    argv = rl_argv(world, run_dir, start, flags, seed, p)
    run(["rl.py", *argv], os.path.join(run_dir, "rl.log"))
    temperature = float(argv[len(argv) - 1 - argv[::-1].index("--temperature") + 1])   # the last one counts
    result = {"name": name, "seed": seed, **score_model(world, os.path.join(run_dir, "model"), temperature, seed),
              **training_record(run_dir), "wall_s": time.time() - t0}
    atomic_write_json(os.path.join(run_dir, "result.json"), result)
    return result


def parallel(jobs, n):
    """jobs: picklable callables (partials of rl_run); results in order, n at a time (each run uses one
    CPU thread)."""
    if n == 1:
        return [job() for job in jobs]
    with ProcessPoolExecutor(n) as pool:
        return [future.result() for future in [pool.submit(job) for job in jobs]]


# -----------------------------------------------------------------------------
# The protocol, step by step

def protocol(args, temperature):
    return {"world": args.world, "rollout_temperature": temperature, "seed_ladder": SEED_LADDER,
            "start_ripple": START_RIPPLE, "lrs": LRS, "control_gain": CONTROL_GAIN,
            "control_ladder": CONTROL_LADDER, "steps": args.steps,
            "seeds": list(range(args.seeds)), "arms": {k: v for k, v in ARMS.items() if k in args.arms},
            "warmups": WARMUPS, "shared_flags": SHARED, "eval_problems": EVAL_PROBLEMS, "samples": SAMPLES,
            "hypothesis": "palette linear beats grpo on held-out greedy ripple pass@1 at equal steps "
                          "(difference of means, Welch's 95% interval above 0)",
            "quick": args.quick}


def compare(args):
    premise = os.path.join(args.world, "premise", "premise.json")
    if not os.path.exists(premise):
        raise UserError(f"no {premise}: run python -m toy.premise --world {args.world} first (it picks the "
                        "rollout temperature)")
    temperature = json.load(open(premise))["temperatures"]["rollout_temperature"]
    os.makedirs(args.out, exist_ok=True)
    wanted = fix_protocol(args.out, "protocol", protocol(args, temperature), protocol_markdown)
    # threads=1: every run of the protocol has one thread (run() and score_model set it)
    state = {"protocol": wanted, "seed_fraction": [], "lr_sweep": [], "control": None, "runs": [],
             "provenance": provenance(os.path.join(args.world, "base"), threads=1)._asdict()}
    report = lambda: atomic_write_json(os.path.join(args.out, "state.json"), state)

    # 2. the seeding: the first (fraction, steps) whose plain warm-up solves >= START_RIPPLE of ripple
    for fraction, warmup_steps in SEED_LADDER:
        s = score_model(args.world, warmup(args.world, args.out, "plain", fraction, warmup_steps))
        state["seed_fraction"].append({"fraction": fraction, "steps": warmup_steps, **s})
        print(f"seeded {fraction} x {warmup_steps} steps: plain warm-up greedy ripple pass@1 "
              f"{s['pass1_ripple']:.3f}", flush=True)
        if s["pass1_ripple"] >= START_RIPPLE:
            break
    start = state["seed_fraction"][-1]
    starts = {name: warmup(args.world, args.out, name, start["fraction"], start["steps"]) for name in WARMUPS}
    state["start"] = {name: score_model(args.world, path) for name, path in starts.items()}
    report()

    # 3-4. the lr on plain GRPO, then the positive control, rung by rung until one passes
    lrs = LRS[1:2] if args.quick else LRS
    for problems, times in CONTROL_LADDER[:1] if args.quick else CONTROL_LADDER:
        p = {"temperature": temperature, "steps": times * args.steps, "data": rl_problems(args.world, args.out, problems)}
        sweep = parallel([partial(rl_run, args.world, args.out, sweep_name(lr, p["steps"], problems), starts["plain"],
                              ARMS["grpo"][1], 0, dict(p, lr=lr)) for lr in lrs], args.jobs)
        state["lr_sweep"] += [{"lr": lr, "steps": p["steps"], "problems": problems, **r} for lr, r in zip(lrs, sweep)]
        best = max(zip(lrs, sweep), key=lambda x: (x[1]["pass1_ripple"], -x[0]))
        gain = best[1]["pass1_ripple"] - start["pass1_ripple"]
        state["control"] = {"lr": best[0], "steps": p["steps"], "problems": problems, "gain": gain,
                            "passed": gain >= CONTROL_GAIN}
        report()
        print(f"control: {problems} problems, lr {best[0]}, {p['steps']} steps, ripple pass@1 gain {gain:+.3f}",
              flush=True)
        if state["control"]["passed"] or args.quick:
            break
    if not (state["control"]["passed"] or args.quick):
        print("the positive control failed on every rung: no arm runs (the report says so)")
        return state

    # 5. the arms
    p = dict(p, lr=state["control"]["lr"])
    jobs = [partial(rl_run, args.world, args.out, name, starts[ARMS[name][0]], ARMS[name][1], seed, p)
            for name in args.arms for seed in range(args.seeds)]
    state["runs"] = parallel(jobs, args.jobs)
    state["settings"] = p
    report()

    # 6. the follow-up: plain GRPO from the prefix warm-ups, same settings and seeds
    state["follow_up_protocol"] = fix_protocol(args.out, "follow_up", follow_up_protocol(), follow_up_markdown)
    state["follow_up"] = parallel([partial(rl_run, args.world, args.out, name, starts[start], flags, seed, p)
                                   for name, (start, flags) in FOLLOW_UP.items() for seed in range(args.seeds)], args.jobs)
    report()
    print(summary(state))
    return state


def fix_protocol(out, name, wanted, markdown):
    """Write <out>/<name>.json and .md before the protocol's first run; refuse a different one there."""
    path = os.path.join(out, f"{name}.json")
    if os.path.exists(path) and json.load(open(path)) != json.loads(json.dumps(wanted)):
        raise UserError(f"{out} holds runs of another protocol ({path}); delete it, or give --out")
    atomic_write_json(path, wanted)
    atomic_write_text(os.path.join(out, f"{name}.md"), markdown(wanted))
    return wanted


def follow_up_protocol():
    a, b = FOLLOW_UP_CONTRASTS[0]
    return {"arms": FOLLOW_UP, "contrasts": FOLLOW_UP_CONTRASTS,
            "hypothesis": f"{a} beats {b} on held-out greedy ripple pass@1 at equal steps (Welch's 95% interval "
                          "above 0): from the same warm-up, prefixes during RL help"}


def follow_up_markdown(p):
    return "\n".join(["# Follow-up: the warm-up or the prefixes?", "",
                      "Fixed after the comparison's arms ran and before any run of its own (toy/compare.py's "
                      "FOLLOW_UP says why): the comparison's problems, steps, lr, temperature and seeds.", "",
                      f"- Hypothesis: {p['hypothesis']}.", "- Contrasts (a - b, Welch's 95% interval): "
                      + "; ".join(f"{a} - {b}" for a, b in p["contrasts"]) + ".", "", *arm_table(p["arms"])]) + "\n"


def arm_table(arms):
    return ["| arm | starts from | rl.py flags |", "| --- | --- | --- |",
            *[f"| {name} | {start} warm-up | `{flags}` |" for name, (start, flags) in arms.items()]]


def protocol_markdown(p):
    lines = [f"# Exploration comparison, second protocol: {p['world']}", "",
             "Fixed before the first run (toy/compare.py's docstring gives the reasons); every arm is "
             "reported, whatever the sign.", "",
             f"- Rollout temperature (toy.premise section 5): {p['rollout_temperature']}.",
             f"- Warm-ups: (seeded fraction, steps) the first of {p['seed_ladder']} whose plain warm-up solves >= "
             f"{p['start_ripple']:.0%} of held-out ripple problems; warm-ups {', '.join(p['warmups'])}.",
             f"- lr: the best held-out ripple pass@1 of plain GRPO, seed 0, among {p['lrs']}; positive control: "
             f"a gain of >= {p['control_gain']:.0%} over the warm-up, else the next rung of (RL problems, steps) "
             f"{[(d, n * p['steps']) for d, n in p['control_ladder']]} (mixed: the world's RL problems; ripple: its "
             "ripple ones alone), and no arm if none passes. The ripple rungs were added after this protocol's first "
             "run, in which the mixed rungs failed and no arm ran (the docstring says why).",
             f"- Arms x seeds {p['seeds']}, at the passing rung's problems and steps, shared rl.py flags "
             f"`{p['shared_flags']}`.", f"- Hypothesis: {p['hypothesis']}.",
             f"- Primary metrics: held-out greedy pass@1 (no prefix), ripple and all, on {p['eval_problems']} "
             "problems; secondary: pass@8 at the rollout temperature, the minority share trained on, ripple "
             "rollouts solved in training, rollouts generated, curves.", "",
             *arm_table(p["arms"])]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# The report

def pct(m_ci):
    m, ci = m_ci
    return "–" if m is None else f"{100 * m:.1f} ± {100 * ci:.1f}"


def summary(state):
    """The arms' table, the calibration before it, and what the numbers say."""
    p, runs = state["protocol"], state["runs"]
    lines = ["**Calibration, before any arm.** Seeded fraction: " + ", ".join(
        f"{s['fraction']} x {s['steps']} steps -> ripple {100 * s['pass1_ripple']:.1f}%" for s in state["seed_fraction"]) +
        ". Warm-ups' greedy pass@1 (ripple): " + ", ".join(
        f"{n} {100 * s['pass1']:.1f} ({100 * s['pass1_ripple']:.1f})" for n, s in state["start"].items()) + ".",
        "", "lr sweep (plain GRPO, seed 0): " + ", ".join(
            f"{s['problems']} problems, lr {s['lr']} x {s['steps']} steps -> ripple {100 * s['pass1_ripple']:.1f}"
            for s in state["lr_sweep"]) + ".",
        f"Positive control: {state['control']['problems']} problems, lr {state['control']['lr']}, "
        f"{state['control']['steps']} steps, ripple pass@1 "
        f"{100 * state['control']['gain']:+.1f} points ({'passed' if state['control']['passed'] else 'failed'}; "
        f"the bar is +{100 * p['control_gain']:.0f}).", ""]
    if not runs:
        return "\n".join(lines + ["No arm ran: the positive control failed."])
    header = ["| arm | seeds | greedy pass@1 ripple | plain | all | pass@8 ripple (T) | minority share trained on | "
              "ripple rollouts solved (by round/split) | rollouts |", "| --- |" + " --- |" * 8]
    lines += header + list(filter(None, [arm_row(name, runs) for name in p["arms"]])) + [""]
    lines += filter(None, [contrast(runs, other, "grpo") for other in p["arms"] if other != "grpo"])
    hypothesis = difference(runs, "palette linear", "grpo")
    if hypothesis:
        lines += [f"- Hypothesis ({p['hypothesis']}): {verdict(hypothesis, 'supported', 'not supported')}.", "",
                  in_words(state, *hypothesis)]
    if state.get("follow_up"):
        f, both = state["follow_up_protocol"], runs + state["follow_up"]
        starts = ", ".join(f"{n} {100 * s['pass1_ripple']:.0f}%" for n, s in state["start"].items())
        lines += ["", f"**Follow-up, fixed after the arms ran** (follow_up.md): the warm-up or the prefixes? The "
                  f"warm-ups' greedy ripple pass@1: {starts}. Plain GRPO from each prefix warm-up, at the arms' "
                  "settings and seeds:", ""] + header + list(filter(None, [arm_row(name, both) for name in f["arms"]])) + [""]
        lines += filter(None, [contrast(both, a, b) for a, b in f["contrasts"]])
        hypothesis = difference(both, *f["contrasts"][0])
        if hypothesis:
            lines += [f"- Follow-up hypothesis ({f['hypothesis']}): {verdict(hypothesis, 'supported', 'not supported')}.",
                      "", follow_up_words(both, *f["contrasts"][0], hypothesis, state["control"]["steps"])]
    return "\n".join(lines)


def values(runs, name, key):
    """One arm's values of `key`, in seed order."""
    return [r[key] for r in sorted(runs, key=lambda r: r["seed"]) if r["name"] == name]


def first_step_minority(runs, name):
    """The share of an arm's rollouts that were round or split at its first step, mean over seeds."""
    return mean_ci([c[0] for c in values(runs, name, "minority_curve") if c])[0]


def follow_up_words(runs, palette, grpo, d_ci, steps):
    """The follow-up in words: from one warm-up, how often each arm's first rollouts left the dominant
    strategy, where they ended, seed by seed."""
    first = lambda name: 100 * first_step_minority(runs, name)
    seeds = lambda name: ", ".join(f"{100 * v:.0f}" for v in values(runs, name, "pass1_ripple"))
    return (f"**In words.** From the same warm-up, at the first step, before any update, {first(grpo):.0f}% of "
            f"plain GRPO's rollouts were round or split and {first(palette):.0f}% of the palette's ({palette}). After "
            f"{steps} steps the palette minus plain GRPO is {100 * d_ci[0]:+.1f} ± {100 * d_ci[1]:.1f} points of "
            f"held-out ripple pass@1, {verdict(d_ci, 'better', 'worse', 'not distinguishable')}; per seed, "
            f"{grpo} ended at {seeds(grpo)}% and {palette} at {seeds(palette)}%.")


def arm_row(name, runs):
    """One arm's row of the table: each cell the mean and 95% interval over its seeds (None: no run)."""
    mine = [r for r in runs if r["name"] == name]
    if not mine:
        return None
    minority = [sum(r["minority_curve"]) / max(1, len(r["minority_curve"])) for r in mine]
    rollouts = mean_ci([r["rollouts"] for r in mine])
    cell = lambda key: pct(mean_ci([r[key] for r in mine]))
    return (f"| {name} | {len(mine)} | {cell('pass1_ripple')} | {cell('pass1_plain')} | {cell('pass1')} | "
            f"{cell('pass8_ripple')} | {pct(mean_ci(minority))} | {cell('ripple_solved_in_training')} "
            f"({cell('ripple_solved_by_minority')}) | {rollouts[0]:.0f} ± {rollouts[1]:.0f} |")


def difference(runs, a, b, key="pass1_ripple"):
    """(mean of a - mean of b, Welch's 95% half-width) over seeds; None with fewer than two seeds on a side."""
    va, vb = values(runs, a, key), values(runs, b, key)
    return welch(va, vb) if min(len(va), len(vb)) > 1 else None


def verdict(d_ci, above, below, neither=None):
    d, ci = d_ci
    return above if d - ci > 0 else below if neither is None or d + ci < 0 else neither


def contrast(runs, a, b):
    """'- a: ripple pass@1 d ± ci points against b: better than / worse than / not distinguishable from b
    (all problems: ...)', or None with fewer than two seeds on a side."""
    ripple, overall = difference(runs, a, b), difference(runs, a, b, key="pass1")
    if ripple is None:
        return None
    return (f"- {a}: ripple pass@1 {100 * ripple[0]:+.1f} ± {100 * ripple[1]:.1f} points against {b}: "
            f"{verdict(ripple, 'better than', 'worse than', 'not distinguishable from')} {b} "
            f"(all problems: {100 * overall[0]:+.1f} ± {100 * overall[1]:.1f}).")


def in_words(state, d, ci):
    """What the arms say about claim (b), and the number that explains it: how often the rollouts of
    plain GRPO and of the palette left the dominant strategy at their first step, before any update."""
    runs, control, start = state["runs"], state["control"], state["start"]
    of = lambda name, key: values(runs, name, key)
    first = lambda name: first_step_minority(runs, name)
    better = [n for n in state["protocol"]["arms"] if n != "grpo"
              and (d_ci := difference(runs, n, "grpo")) and verdict(d_ci, True, False)]
    scarce = first("grpo") < 0.1      # the premise checks' bar for "sampling rarely leaves the dominant strategy"
    plain = [mean_ci(of(n, "pass1_plain"))[0] for n in state["protocol"]["arms"] if of(n, "pass1_plain")]
    return (f"**In words.** In this world, at this budget ({control['problems']} problems, {control['steps']} steps, "
            f"lr {control['lr']}), plain GRPO raised held-out greedy ripple pass@1 from its warm-up's "
            f"{100 * start['plain']['pass1_ripple']:.0f}% to {100 * mean_ci(of('grpo', 'pass1_ripple'))[0]:.0f}%. The "
            f"palette (linear) minus GRPO is {100 * d:+.1f} ± {100 * ci:.1f} points, "
            + (f"and {', '.join(better)} beat GRPO" if better else "and no arm beats GRPO") + ": claim (b) is "
            + ("supported" if d - ci > 0 else "not supported") + f" here. At their first step, before any "
            f"update, {100 * first('grpo'):.0f}% of plain GRPO's rollouts were round or split, against "
            f"{100 * first('palette linear'):.0f}% of the palette's"
            + ("." if scarce else
               f": the seeded plain warm-up (ripple {100 * start['plain']['pass1_ripple']:.0f}% greedily, against "
               f"{100 * start['vae']['pass1_ripple']:.0f}% for the vae one) already had token sampling reach the "
               "winning strategies, so from that warm-up plain GRPO had no scarcity of strategies to overcome.")
            + f" Plain problems paid: the arms' held-out plain pass@1 is {100 * min(plain):.0f}-{100 * max(plain):.0f}% "
            f"(the plain warm-up's {100 * start['plain']['pass1_plain']:.0f}%)"
            + (": training on ripple problems alone moved the model to round and split everywhere, and they lose "
               "to column on plain problems." if control["problems"] == "ripple" else "."))


def draw(state, path):
    """Held-out greedy pass@1 over training (mean and 95% band per arm), and the positive control.
    With no arm run, the left panel is what the lr sweep trained on: the minority-strategy share."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    follow_up = state.get("follow_up") or []                       # dashed
    for name in [*state["protocol"]["arms"], *dict.fromkeys(r["name"] for r in follow_up)]:
        mine = [r for r in state["runs"] + follow_up if r["name"] == name]
        if not mine:
            continue
        steps = [s for s, _ in mine[0]["eval_curve"]]
        stats = [mean_ci([dict(map(tuple, r["eval_curve"])).get(s) for r in mine]) for s in steps]
        line, = left.plot(steps, [100 * m for m, _ in stats], marker="o", ms=3, label=name,
                          ls="-" if name in state["protocol"]["arms"] else "--")
        left.fill_between(steps, [100 * (m - c) for m, c in stats], [100 * (m + c) for m, c in stats],
                          color=line.get_color(), alpha=0.12)
    for s in state["lr_sweep"] if not state["runs"] else ():
        left.plot(range(1, len(s["minority_curve"]) + 1), [100 * m for m in s["minority_curve"]], lw=1,
                  label=f"{s['problems']}, lr {s['lr']}, {s['steps']} steps")
    for s in state["lr_sweep"]:
        right.plot([x for x, _ in s["eval_curve"]], [100 * y for _, y in s["eval_curve"]], marker="o", ms=3,
                   label=f"{s['problems']}, lr {s['lr']}, {s['steps']} steps")
    left.set(xlabel="RL step", ylabel="held-out greedy pass@1, all problems (%)", title="arms (5 seeds, 95% bands)")
    if not state["runs"]:
        left.set(ylabel="rollouts trained on: round or split (%)", title="plain GRPO leaves the minority strategies")
    right.set(xlabel="RL step", ylabel="held-out greedy pass@1, all problems (%)", title="plain GRPO: lr sweep and control")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def why_no_arm(state, out):
    """Plain words, from the control run's rollouts, on why plain GRPO did not learn ripple."""
    from toy.task import detect_strategy, math_family
    lr, steps = state["control"]["lr"], state["control"]["steps"]
    name = sweep_name(lr, steps, state["control"]["problems"])
    samples = read_jsonl(os.path.join(out, f"{slug(name)}_seed0", "samples.jsonl"))
    last = max(s["step"] for s in samples)
    # each rollout classified once: family, strategy, reward
    for s in samples:
        s.update(family=math_family({"problem": s["problem"]}),
                 minority=detect_strategy(s["completion"]) not in (DOMINANT, None), solved=s["reward"] > 0)

    def rate(keep, of):   # % of the rollouts passing `of` that also pass `keep`
        chosen = [s for s in samples if of(s)]
        return 100 * sum(map(keep, chosen)) / max(1, len(chosen))
    family, minority, solved = (lambda s: s["family"]), (lambda s: s["minority"]), (lambda s: s["solved"])
    share = lambda fam, early: rate(minority, lambda s: family(s) == fam and (s["step"] < 10 if early else s["step"] > last - 10))
    return (f"**Why.** In the control run's rollouts (lr {lr}, {steps} steps), column solved "
            f"{rate(solved, lambda s: family(s) == 'plain' and not minority(s)):.0f}% of plain problems and "
            f"{rate(solved, lambda s: family(s) == 'ripple' and not minority(s)):.0f}% of ripple ones; round or split "
            f"solved {rate(solved, lambda s: family(s) == 'ripple' and minority(s)):.0f}% of ripple problems and "
            f"{rate(solved, lambda s: family(s) == 'plain' and minority(s)):.0f}% of plain ones. A minority rollout is "
            "rewarded on ripple and punished on plain, and the punishment wins on both families: the share of "
            f"round or split among its rollouts fell on ripple problems from {share('ripple', True):.0f}% "
            f"(first 10 steps) to {share('ripple', False):.0f}% (last 10), and on plain ones from "
            f"{share('plain', True):.0f}% to {share('plain', False):.0f}%. From these warm-ups, at these budgets, plain "
            "GRPO does not learn ripple, so no exploration method could show a gain in ripple pass@1 here, and claim "
            "(b) stays untested in this world. A longer budget (the minority share can recover late in a run), or a "
            "world where the minority strategies do not lose on the other family, is what would test it.")


def headline(state, temperature):
    """The README's lines: each hypothesis with the contrast that tests it (summary: the full tables)."""
    lines = [f"Premise world, second protocol (rollout temperature {temperature}, chosen by the premise checks; "
             "warm-ups seeded so that ripple is learnable):"]
    if not state["runs"]:
        return f"{lines[0]} no arm ran: the positive control failed."
    tests = [("Hypothesis", state["protocol"]["hypothesis"], state["runs"], ("palette linear", "grpo"))]
    if state.get("follow_up"):
        f = state["follow_up_protocol"]
        tests.append(("Follow-up hypothesis", f["hypothesis"], state["runs"] + state["follow_up"], f["contrasts"][0]))
    for name, hypothesis, runs, (a, b) in tests:
        if d_ci := difference(runs, a, b):
            lines.append(f"{contrast(runs, a, b)} {name} ({hypothesis}): {verdict(d_ci, 'supported', 'not supported')}.")
    return "\n".join(lines)


def summarise(out, publish):
    state = json.load(open(os.path.join(out, "state.json")))
    premise = json.load(open(os.path.join(state["protocol"]["world"], "premise", "premise.json")))
    picture = os.path.join(out, "curves.png")        # published as docs/results/explore.png
    draw(state, picture)
    from toy.premise import markdown as premise_markdown
    t = premise["temperatures"]
    table = summary(state) + ("" if state["runs"] else "\n\n" + why_no_arm(state, out))
    world = [f"Provenance: {Provenance(**state['provenance'])}."] if "provenance" in state else []
    full = "\n\n".join([protocol_markdown(state["protocol"]), *world, "## Results\n\n" + table,
                        f"![curves]({'explore.png' if publish else 'curves.png'})",
                        "## The premise checks\n\n" + premise_markdown(premise).split("\n", 1)[1]])
    if publish:
        from toy import publish_results
        publish_results("explore", full, headline(state, t["rollout_temperature"]),
                        f"bash runs/explore.sh; python -m toy.compare --summarise {out} --publish",
                        pictures=[(picture, "explore.png")])
    else:
        atomic_write_text(os.path.join(out, "report.md"), full)
    print(full)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default=None, help="run the comparison in this premise world")
    p.add_argument("--out", default=None, help="default: <world>/compare (<world>/compare_quick with --quick)")
    p.add_argument("--seeds", type=ranged(int, 1), default=5)
    p.add_argument("--steps", type=ranged(int, 1), default=60)
    p.add_argument("--arms", default=",".join(ARMS), help="a comma-separated subset of the arms")
    p.add_argument("--jobs", type=ranged(int, 1), default=2, help="runs at once, one CPU thread each")
    p.add_argument("--quick", action="store_true", help="a smoke test: 2 seeds, 8 steps, one lr, no control bar")
    p.add_argument("--summarise", default=None, help="a finished comparison's directory: its report")
    p.add_argument("--publish", action="store_true", help="with --summarise: docs/results/explore.md and the "
                   "README's headline (a maintainer's step)")
    args = p.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        raise UserError(f"--arms: unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}")
    if (args.world is None) == (args.summarise is None):
        raise UserError("give --world (run the comparison) or --summarise (report a finished one)")
    if args.quick:
        args.seeds, args.steps = min(args.seeds, 2), 8
    if args.world:
        for name in ("base/config.json", "data/math_train.jsonl", "vae/vae.json"):
            if not os.path.exists(os.path.join(args.world, name)):
                raise UserError(f"--world {args.world}: no {name}; runs/explore.sh builds the premise world")
        args.out = args.out or os.path.join(args.world, "compare_quick" if args.quick else "compare")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.world:
        compare(args)
    else:
        summarise(args.summarise, args.publish)


if __name__ == "__main__":
    run_main(main)
