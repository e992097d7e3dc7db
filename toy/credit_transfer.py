r"""From exploring to learning, in the premise world: does crediting the palette's prefixed rollouts to
the prefix-free policy (credit.py's rules) turn the exploration gap into held-out accuracy without a
prefix? A follow-up of the exploration comparison (toy/compare.py), fixed here and written to
<out>/protocol.md before its first run.

    python -m toy.credit_transfer --world runs/toy_premise                  # -> runs/toy_premise/compare_credit/
    python -m toy.credit_transfer --summarise runs/toy_premise/compare_credit [--publish]

Why. In the published comparison (docs/results/explore.md), from the same vae warm-up the palette's
first rollouts reached the minority strategies (round, split) about six times as often as plain
GRPO's (29% against 5%), yet after 60 steps held-out greedy ripple pass@1 without a prefix was not
distinguishable (+2.2 +- 9.6 points). The palette trains each prefixed rollout under its prefix and
is scored without one; what it finds reaches the bare policy only through what the two contexts
share. The credit rules move it there directly: naive and naive-shaped (LoPE's pseudo-rollout:
trained as if sampled without the prefix) and nudge (NudgeRL: inter/intra-context advantages and a
distillation term into the prefix-free context).

The protocol, fixed before any run:
1. The published comparison's world recipe, warm-ups and settings (its calibration is not run
   again): warm-ups from the world's RL file with 40% of its rows re-solved by round or split, 30
   SFT steps at lr 3e-5, with vae and with rsp prefixes (L = 1); RL on the ripple problems alone,
   60 steps, lr 1e-4, rollout temperature 0.7, seeds 0-4, rl.py's flags as toy/compare.py runs them.
2. Arms from the vae warm-up: plain GRPO, and palette linear (L = 1) under each credit rule. Then,
   from the rsp warm-up, rsp linear under the rule whose palette arm has the highest mean held-out
   ripple pass@1 (ties: the earlier in credit.CREDIT_RULES), and plain GRPO from that warm-up.
3. Hypothesis, written before the first run: palette linear with credit transfer beats plain GRPO
   from the same warm-up on held-out greedy ripple pass@1 without a prefix (Welch's 95% interval of
   the difference of means above 0). Tested for each transfer rule (naive, naive-shaped, nudge):
   three contrasts at 95% each, no correction, reported all three whatever their sign.
4. Metrics: as the comparison's (held-out greedy pass@1 on 200 problems, ripple and all, pass@8
   at the rollout temperature, the minority share of the rollouts trained on, ripple rollouts solved
   in training, rollouts generated, held-out curves every 10 steps); every arm with its mean and
   95% t interval over seeds.
"""

import argparse
import json
import os
from functools import partial

from common import atomic_write_json, atomic_write_text, run_main
from credit import CREDIT_RULES
from common import UserError, ranged
from toy import Provenance, provenance
from toy.compare import (ARMS, arm_row, arm_table, contrast, difference, first_step_minority, fix_protocol, mean_ci,
                         parallel, rl_problems, rl_run, score_model, values, verdict, warmup)

SETTINGS = {"fraction": 0.4, "warmup_steps": 30, "problems": "ripple", "steps": 60, "lr": 1e-4, "temperature": 0.7}
TRANSFER = ("naive", "naive-shaped", "nudge")       # the rules that credit the prefix-free policy
GRPO = "grpo from the vae warm-up"
VAE_ARMS = {GRPO: ("vae", ARMS["grpo"][1]),
            **{f"palette linear ({rule})": ("vae", f"{ARMS['palette linear'][1]} --credit {rule}") for rule in CREDIT_RULES}}


def rsp_arms(rule):
    return {f"rsp linear ({rule})": ("rsp", f"{ARMS['rsp linear'][1]} --credit {rule}"),
            "grpo from the rsp warm-up": ("rsp", ARMS["grpo"][1])}


def protocol(args):
    return {"world": args.world, "settings": SETTINGS, "seeds": list(range(args.seeds)), "vae_arms": VAE_ARMS,
            "rsp_arms": "rsp linear under the best palette rule, and plain GRPO, from the rsp warm-up",
            "transfer_rules": TRANSFER,
            "hypothesis": "palette linear with credit transfer beats plain GRPO from the same warm-up on held-out "
                          "greedy ripple pass@1 without a prefix (Welch's 95% interval above 0), for each of "
                          f"{', '.join(TRANSFER)}"}


def protocol_markdown(p):
    s = p["settings"]
    return "\n".join([
        f"# From exploring to learning: credit rules in the premise world ({p['world']})", "",
        "Fixed before the first run (toy/credit_transfer.py's docstring gives the reasons); every arm is reported, "
        "whatever the sign.", "",
        f"- Warm-ups: {s['fraction']:.0%} of the RL rows re-solved by round or split, {s['warmup_steps']} steps (vae and rsp).",
        f"- RL: {s['problems']} problems, {s['steps']} steps, lr {s['lr']}, rollout temperature {s['temperature']}, "
        f"seeds {p['seeds']}.", f"- Then: {p['rsp_arms']}.", f"- Hypothesis: {p['hypothesis']}.",
        "- Contrasts (a - b, Welch's 95% interval): each palette arm - plain GRPO from the vae warm-up; rsp linear - "
        "plain GRPO from the rsp warm-up.", "", *arm_table(p["vae_arms"])]) + "\n"


def follow_up(args):
    os.makedirs(args.out, exist_ok=True)
    wanted = fix_protocol(args.out, "protocol", protocol(args), protocol_markdown)
    s = SETTINGS
    starts = {name: warmup(args.world, args.out, name, s["fraction"], s["warmup_steps"]) for name in ("vae", "rsp")}
    state = {"protocol": wanted, "start": {n: score_model(args.world, path) for n, path in starts.items()},
             "provenance": provenance(os.path.join(args.world, "base"), threads=1)._asdict()}
    p = {"temperature": s["temperature"], "steps": s["steps"], "lr": s["lr"],
         "data": rl_problems(args.world, args.out, s["problems"])}
    jobs = lambda arms: [partial(rl_run, args.world, args.out, name, starts[start], flags, seed, p)
                         for name, (start, flags) in arms.items() for seed in range(args.seeds)]
    state["runs"] = parallel(jobs(VAE_ARMS), args.jobs)
    mean_ripple = lambda rule: mean_ci(values(state["runs"], f"palette linear ({rule})", "pass1_ripple"))[0]
    state["rsp_rule"] = max(CREDIT_RULES, key=lambda rule: (mean_ripple(rule), -list(CREDIT_RULES).index(rule)))
    atomic_write_json(os.path.join(args.out, "state.json"), state)
    state["runs"] += parallel(jobs(rsp_arms(state["rsp_rule"])), args.jobs)
    atomic_write_json(os.path.join(args.out, "state.json"), state)
    print(summary(state))


def summary(state):
    """The arms' table, the contrasts, the hypothesis for each transfer rule, and the numbers in words."""
    runs, p, rule = state["runs"], state["protocol"], state["rsp_rule"]
    arms = [*p["vae_arms"], *rsp_arms(rule)]
    starts = ", ".join(f"{n} {100 * s['pass1_ripple']:.0f}% ripple ({100 * s['pass1']:.0f}% all)"
                       for n, s in state["start"].items())
    lines = [f"Warm-ups' held-out greedy pass@1: {starts}.", "",
             "| arm | seeds | greedy pass@1 ripple | plain | all | pass@8 ripple (T) | minority share trained on | "
             "ripple rollouts solved (by round/split) | rollouts |", "| --- |" + " --- |" * 8,
             *filter(None, [arm_row(name, runs) for name in arms]), ""]
    lines += filter(None, [contrast(runs, f"palette linear ({r})", GRPO) for r in CREDIT_RULES])
    lines += filter(None, [contrast(runs, f"rsp linear ({rule})", "grpo from the rsp warm-up")])
    lines += ["", hypothesis(state), "", in_words(state)]
    return "\n".join(lines)


def hypothesis(state):
    p = state["protocol"]
    verdicts = {r: difference(state["runs"], f"palette linear ({r})", GRPO) for r in p["transfer_rules"]}
    return f"- Hypothesis ({p['hypothesis']}): " + "; ".join(
        f"{r}: {verdict(d, 'supported', 'not supported')}" for r, d in verdicts.items() if d) + "."


def headline(state):
    """The README's lines: the numbers in words and the hypothesis (summary: the full tables)."""
    return (f"Premise world, credit rules (the follow-up fixed in toy/credit_transfer.py). "
            f"{in_words(state).removeprefix('**In words.** ')}\n{hypothesis(state)}")


def in_words(state):
    runs, rule = state["runs"], state["rsp_rule"]
    first = lambda name: 100 * first_step_minority(runs, name)
    seeds = lambda name: ", ".join(f"{100 * v:.0f}" for v in values(runs, name, "pass1_ripple"))
    diffs = {r: difference(runs, f"palette linear ({r})", GRPO) for r in CREDIT_RULES}
    best = max(diffs, key=lambda r: diffs[r][0])
    return (f"**In words.** From the vae warm-up, at the first step, {first(GRPO):.0f}% of plain GRPO's rollouts were "
            f"round or split and {first('palette linear (prefixed)'):.0f}% of the palette's. After "
            f"{state['protocol']['settings']['steps']} steps, held-out greedy ripple pass@1 without a prefix, palette "
            "minus plain GRPO: " + ", ".join(f"{r} {100 * d[0]:+.1f} ± {100 * d[1]:.1f}" for r, d in diffs.items())
            + f" points. The best rule, {best}, is {verdict(diffs[best], 'better than', 'worse than', 'not distinguishable from')} "
            f"plain GRPO (per seed {seeds(GRPO)}% for plain GRPO, {seeds(f'palette linear ({best})')}% for it). "
            f"From the rsp warm-up, rsp linear under {rule} minus plain GRPO: "
            + "{:+.1f} ± {:.1f} points.".format(*[100 * x for x in difference(runs, f'rsp linear ({rule})', 'grpo from the rsp warm-up')]))


def draw(state, path):
    """Held-out greedy pass@1 (all problems) over training, mean and 95% band per arm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name in dict.fromkeys(r["name"] for r in state["runs"]):
        mine = [r for r in state["runs"] if r["name"] == name]
        steps = [s for s, _ in mine[0]["eval_curve"]]
        stats = [mean_ci([dict(map(tuple, r["eval_curve"])).get(s) for r in mine]) for s in steps]
        line, = ax.plot(steps, [100 * m for m, _ in stats], marker="o", ms=3, label=name,
                        ls="--" if name.startswith(("grpo", "rsp")) else "-")
        ax.fill_between(steps, [100 * (m - c) for m, c in stats], [100 * (m + c) for m, c in stats],
                        color=line.get_color(), alpha=0.1)
    ax.set(xlabel="RL step", ylabel="held-out greedy pass@1, all problems (%)", title="credit rules (5 seeds, 95% bands)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarise(out, publish):
    state = json.load(open(os.path.join(out, "state.json")))
    picture = os.path.join(out, "curves.png")
    draw(state, picture)
    table = summary(state)
    full = "\n\n".join([protocol_markdown(state["protocol"]), f"Provenance: {Provenance(**state['provenance'])}.",
                        "## Results\n\n" + table, f"![curves]({'explore_credit.png' if publish else 'curves.png'})"])
    if publish:
        from toy import publish_results
        publish_results("explore_credit", full, headline(state),
                        f"python -m toy.credit_transfer --world runs/toy_premise; python -m toy.credit_transfer "
                        f"--summarise {out} --publish", pictures=[(picture, "explore_credit.png")])
    else:
        atomic_write_text(os.path.join(out, "report.md"), full)
    print(full)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default=None, help="run the follow-up in this premise world")
    p.add_argument("--out", default=None, help="default: <world>/compare_credit")
    p.add_argument("--seeds", type=ranged(int, 1), default=5)
    p.add_argument("--jobs", type=ranged(int, 1), default=2, help="runs at once, one CPU thread each")
    p.add_argument("--summarise", default=None, help="a finished follow-up's directory: its report")
    p.add_argument("--publish", action="store_true", help="with --summarise: docs/results/explore_credit.md and the "
                   "README's headline (a maintainer's step)")
    args = p.parse_args(argv)
    if (args.world is None) == (args.summarise is None):
        raise UserError("give --world (run the follow-up) or --summarise (report a finished one)")
    if args.world:
        for name in ("base/config.json", "data/math_train.jsonl", "vae/vae.json"):
            if not os.path.exists(os.path.join(args.world, name)):
                raise UserError(f"--world {args.world}: no {name}; runs/explore.sh builds the premise world")
        args.out = args.out or os.path.join(args.world, "compare_credit")
        follow_up(args)
    else:
        summarise(args.summarise, args.publish)


if __name__ == "__main__":
    run_main(main)
