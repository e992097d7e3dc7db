"""Invariants over the flag space (DESIGN.md section 4, Reliability): not only that every row of
tests/test_pairwise.py's covering array runs, but that what a run logs is right and that every flag
does something.

- test_rl_metrics_recompute_from_samples: a seeded subset of the covering array's accepted rl.py
  rows (12 drawn with random.Random(0), plus, for each --credit rule and each credit= rule of
  --resample, a row that trains it over several updates), each logging every rollout (as rl.py
  always does), clipping at 1% (so that several updates do clip), run in-process for two
  steps with test_pairwise's reward (the parity of the completion's length; group 0 fails whole, so
  that --resample has a group to resample), every checkpoint kept. Every number in metrics.jsonl is
  recomputed from samples.jsonl or by hand, exact for counts and to 1e-9 for floats (relative to
  the terms of a sum): each rollout's verdict regraded from its text; its reward, prefix rows,
  source and credit rule; the logged plan ("prefixed" per group, rho, L) against the rollouts under
  a prefix in each group; the rollout metrics; which rollouts are trained (LoPE's regrouping) and
  the resample counts; each advantage from the rewards of its group's trained rollouts (credit.py's
  shift by hand, then model.ADVANTAGE_ESTIMATORS, 3e-7 as it is logged in float32); the updates
  from the minibatch layout, each rollout's update tokens, loss (= -A times its aggregation weight
  where the ratio is 1); eval_pass1 by greedy decoding under the weights of its step. loss,
  clip_frac, entropy and kl from the update_* sums are a bookkeeping check (the same accumulators
  that rl.py sums): their independent replay, update by update from the weights each update read,
  is tests/test_rl_losses.py::test_update_metrics_equal_a_replay_by_hand. A metric without a
  recomputation here fails the test. Not recomputable from samples.jsonl: grad_norm (it needs the
  gradients: checked to be 0 where the loss has none) and time_*
  (gen_tokens_per_s x time_generate is checked to be the on-policy tokens).
- test_every_flag_changes_the_run_or_is_refused[stage]: rl.py, sft_warmup.py, train_vae.py,
  evaluate.py and infer.py, each from a base command line where every flag matters. Every flag of
  the parser (read from the parser; --help, --out and --resume left out, see SKIPPED) is flipped: a
  switch toggled, every other choice, a number moved (the first of down, up, doubled that its range
  takes and the stage runs), a path to another world's file. The run must differ from the base's
  (weights and every file written, less args.json, timings and keys that only echo a flag's value,
  or the trace of what it did: forward batches and activation checkpointing, the prompts, prefixes
  and tokens of each generate() call, the problems each evaluation read) or be refused in one line.
  A refusal naming another flag the flip left without effect (--vae once no source reads it) drops
  that flag and runs again. The base runs twice first: a run is a function of its flags.
- test_flags_that_cannot_matter_are_noted[case]: rows of rl.py (EDGES) where a flag is accepted
  though it has nothing to act on, decidable from the flags alone (--credit or --L when a constant
  --schedule prefixes no rollout, or under --schedule none; --clip-eps with one update in the sampling
  context): the flip must print a one-line note naming the flag, be refused in one line, or
  change the run.
- test_held_out_set_ignores_seed: the problems rl.py and sft_warmup.py evaluate, and those
  evaluate.py --limit scores, are the same at --seed 0 and 1, while the seed moves the rest; rl.py's
  eval_pass1 is recomputed there on a model whose greedy answers stop on some problems (not 0 or 1).
- test_parser_choices_read_the_registries_live, test_new_registry_entries_join_the_sweep: README's
  "Extending" recipes at run time. A cosine schedule, a scaled-noise prefix source, a max-min
  advantage estimator and a credit rule are registered (monkeypatch.setitem); every flag whose
  choices are a registry's must then offer the new entry (and rl.py's check accept the new credit
  rule for --credit and --resample); test_pairwise imported afresh lists them
  in its factors; a covering-array row with each new entry runs (three steps: cosine and linear
  differ at tau 1/3) and passes the recomputations above.
- Marked slow (pytest.ini leaves them out; -m slow runs them): test_rl_metrics_recompute_whole_sweep,
  the recomputations on every accepted row of the covering array; and
  test_whole_sweep_with_new_registry_entries, the array rebuilt with the run-time entries, every row
  that holds one of them.

Run:  python -m pytest -q tests/test_invariants.py -s            (-s prints the counts; about 50 s
      of CPU, a minute and a half on two shared cores)
      python -m pytest -q tests/test_invariants.py -m slow -s    (the whole sweeps: about 50 s of CPU)
      INVARIANTS_VERBOSE=1 adds, for each flip, where the run changed.
"""
import argparse
import contextlib
import copy
import hashlib
import importlib.util
import io
import json
import math
import os
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

import common
import credit
import diagnostics
import evaluate
import infer
import model
import rl
import sft_warmup
import test_pairwise
import train_vae
from data import HELD_OUT_SEED, format_prompt, load_mixture, load_rows
from common import read_jsonl
from test_pairwise import (RL_FACTORS, argv_of, covering_array, pairwise_reward, parity,  # noqa: F401
                           rl_accepted_by, world)             # (fixtures: pairwise_reward, world)

TIMING = re.compile(r"^time_|^gen_tokens_per_s$")


# -----------------------------------------------------------------------------
# The reward the sweeps run under (as tests/test_pairwise.py's): the parity of the completion's
# length, and group 0 of every step failing whole, so that rewards vary within groups and
# --resample always has a group to resample.

def regraded(sample):
    """The grader's verdict on a logged rollout, recomputed from its text."""
    return 0.0 if sample["group"] == 0 and not sample["resampled"] else parity(sample["completion"])


def fixed_rl(world, out, clip=()):
    return ["--model", str(world / "model"), "--data", str(world / "train.jsonl"), "--steps", "2", "--lr", "1e-3",
            "--out", str(out), *clip]


# The recomputation rows clip at 1% instead of DAPO's 20% / 28%, so that several updates do clip
# tokens at --lr 1e-3 and clip_frac is not 0 throughout (the pairwise sweep leaves --clip-eps out;
# where the ratio is always 1, rl.py notes that the clip has no effect).
CLIP = ("--clip-eps", "0.01")


def clipped(argv):
    return argv + list(CLIP)


@pytest.fixture
def keep_checkpoints(monkeypatch):
    """Every checkpoint kept (rl.py keeps the newest), so that each evaluation can be replayed on the
    weights of its step."""
    save = common.save_checkpoint                              # rl.py saves through common.checkpoint
    monkeypatch.setattr(common, "save_checkpoint", lambda *a, **k: save(*a, **{**k, "keep": 1000}))


def quietly(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args)


def run_stage(module, argv, notes=None):
    """Run a stage in-process as its command line would: None if it finished, else the one-line
    refusal (any other ending fails the test). notes: a list that gets the run's "note: " lines."""
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                module.run_main(lambda: module.main(argv))
            finally:
                if notes is not None:
                    notes += [line for line in out.getvalue().splitlines() if line.startswith("note: ")]
    except SystemExit as e:
        lines = err.getvalue().strip().splitlines()
        assert e.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, e.code, lines[-5:])
        return lines[0]
    return None


# -----------------------------------------------------------------------------
# The rows of the covering array, computed once per module

def memoised(accepts):
    seen = {}

    def check(row):
        key = tuple(sorted(row.items()))
        if key not in seen:
            seen[key] = accepts(row)
        return seen[key]
    return check


@pytest.fixture(scope="module")
def rl_array(world):
    """(rows, accepts) of test_pairwise's covering array of rl.py."""
    accepts = memoised(rl_accepted_by(RL_FACTORS, fixed_rl(world, "x"), world))
    rows, _, _ = covering_array(RL_FACTORS, accepts)
    return rows, accepts


def value(row, flag, factors=RL_FACTORS):
    return factors[flag][row[flag]]


def logging_everything(row, factors=RL_FACTORS):
    """The row as it runs: rl.py logs every rollout."""
    return row


def several_updates(row, factors=RL_FACTORS):
    return int(value(row, "--epochs", factors)) * int(value(row, "--minibatches", factors)) > 1


def prefixes_something(row, factors=RL_FACTORS):
    schedule = value(row, "--schedule", factors)
    return schedule != "none" and value(row, "--prefix-source", factors) != "none" and \
        not (schedule not in rl.SCHEDULES and float(schedule) == 0)


def rows_for(rule_flag, rule, rows, accepts, factors=RL_FACTORS):
    """A row of the array in which credit rule `rule` (given by `rule_flag`) trains rollouts over
    several updates: one of the array's if it has one, else the first of its rows made so."""
    matters = (lambda r: prefixes_something(r, factors)) if rule_flag == "--credit" else \
        (lambda r: value(r, "--resample", factors) is not None)
    wanted = lambda r: value(r, rule_flag, factors) == rule and several_updates(r, factors) and matters(r)
    found = [r for r in rows if wanted(r) and accepts(logging_everything(r, factors))]
    if found:
        return found[0]
    for r in rows:
        if matters(r):
            r = r | {rule_flag: factors[rule_flag].index(rule), "--epochs": factors["--epochs"].index("2")}
            if accepts(logging_everything(r, factors)):
                return r
    raise AssertionError(f"no accepted row trains {rule_flag} {rule} over several updates")


def invariant_rows(rows, accepts, k=12, seed=0):
    """The default subset: k rows drawn with random.Random(seed), then a row with several updates
    for each --credit rule and credit= rule of --resample, each logging every rollout."""
    picked = random.Random(seed).sample(rows, min(k, len(rows)))
    for flag in ("--credit", "--resample credit"):
        for rule in RL_FACTORS[flag]:
            if rule is not None:
                picked.append(rows_for(flag, rule, rows, accepts))
    unique = list({tuple(sorted(logging_everything(r).items())): logging_everything(r) for r in picked}.values())
    return [r for r in unique if accepts(r)]


# -----------------------------------------------------------------------------
# The recomputation of metrics.jsonl from samples.jsonl

class Checks:
    """Counts the invariants checked and collects the ones that fail (all of them, not the first)."""

    def __init__(self):
        self.n, self.bad, self.where, self.seen = 0, [], "", Counter()

    def eq(self, what, logged, expected):
        self.n += 1
        if logged != expected:
            self.bad.append(f"{self.where}{what}: logged {logged!r}, recomputed {expected!r}")

    def close(self, what, logged, expected, scale=0.0, rel=1e-9):
        """logged equals expected to rel of max(|expected|, scale) (scale: the sum of the |terms| of a
        sum, whose rounding depends on the order of addition)."""
        self.n += 1
        if logged is None or expected is None:
            ok = logged is None and expected is None
        else:
            ok = abs(logged - expected) <= rel * max(abs(expected), scale)
        if not ok:
            self.bad.append(f"{self.where}{what}: logged {logged!r}, recomputed {expected!r}")

    def true(self, what, ok):
        self.n += 1
        if not ok:
            self.bad.append(f"{self.where}{what}")

    def assert_ok(self, context=""):
        assert not self.bad, f"{context}\n{len(self.bad)} of {self.n} invariants fail:\n" + "\n".join(self.bad[:30])


COUNTS = ("step", "L", "updates", "rollouts_generated", "resampled_groups", "rescued_groups", "prefixed")


def credited(rewards, prefixed, inter):
    """credit.py's rule by hand: a prefixed rollout reads r_i + (lambda_i - 1)(mean over the group's
    prefixed rollouts - the group's mean); a group none of whose rollouts is prefixed is left alone."""
    n_pre = sum(prefixed)
    if not n_pre:
        return list(rewards)
    shift = sum(r for r, p in zip(rewards, prefixed) if p) / n_pre - sum(rewards) / len(rewards)
    return [r + (lam - 1) * shift if p else r for r, p, lam in zip(rewards, prefixed, inter)]


def advantages_by_hand(rewards, prefixed, inter, estimator):
    """The group's advantages: the estimator of the registry on the credited rewards; 0 for a group
    whose credited rewards are all equal (or of one rollout)."""
    c = credited(rewards, prefixed, inter)
    if len(c) == 1 or all(x == c[0] for x in c):
        return [0.0] * len(c)
    return model.ADVANTAGE_ESTIMATORS[estimator](torch.tensor([c], dtype=torch.float64))[0].tolist()


class Sources:
    """The prefix sources of a run, built as rl.py builds them, for the rows a prefix takes."""

    def __init__(self, args):
        path = model.resolve_checkpoint(args.model)
        self.E = model.load_embedding_matrix(path)
        self.tokenizer = model.load_tokenizer(path, len(self.E))
        self.args, self.built = args, {}

    def rows(self, name, L):
        if name not in self.built:
            a = self.args
            self.built[name] = model.make_prefix_source(name, self.E, self.tokenizer, a.vae, seed=a.seed)
        return self.built[name].rows(L)


def greedy_pass1(weights_dir, args, grade):
    """Held-out greedy pass@1 recomputed: the first rl.EVAL_PROBLEMS of the held-out file (read with
    the held-out seed), each prompt greedy-decoded without prefix by the policy as the run samples
    with it (fp32, or its bf16 copy), a cut-off answer counting 0."""
    rows = load_mixture(args.eval_data, seed=HELD_OUT_SEED)[:rl.EVAL_PROBLEMS]
    policy = model.Transformer.from_pretrained(weights_dir)
    if args.dtype == "bfloat16":
        sampler = copy.deepcopy(policy).to(torch.bfloat16)
        sampler.inv_freq = policy.inv_freq
        policy = sampler
    tokenizer = model.load_tokenizer(model.resolve_checkpoint(args.model), policy.config.vocab_size)
    prompts = [tokenizer(format_prompt(r["problem"], args.template, tokenizer), add_special_tokens=False)["input_ids"]
               for r in rows]
    out = model.generate(policy, prompts, None, args.max_new_tokens, temperature=0,
                         stop_tokens=[tokenizer.eos_token_id])
    texts = tokenizer.batch_decode(out.token_lists(), skip_special_tokens=True)
    verdicts = [grade(t, r["answer"], r["grading_kind"]) * done
                for t, r, done in zip(texts, rows, out.stopped.tolist())]
    return sum(verdicts) / len(rows)


def weights_at(out, step, args):
    """The directory of the weights the run held before step `step`'s update, if the run kept them."""
    if step == 0:
        return model.resolve_checkpoint(args.model)
    if step == args.steps:
        return str(out / "model")
    path = out / f"checkpoint-{step:06d}" / "model"
    return str(path) if path.is_dir() else None


def check_rl_run(out, argv, checks, grade=parity, regrade=regraded):
    """Recompute every number of the run's metrics.jsonl from its samples.jsonl or by hand, and
    check every logged rollout; failures go into `checks`. Returns the invariants per row."""
    out = Path(out)
    args = rl.parser.parse_args(argv)
    quietly(rl.check_args, args, 1)                      # the run's reading: --resample's parts, the baseline
    G, P, E, M = args.group_size, args.prompts_per_step, args.epochs, args.minibatches
    rules = credit.CREDIT_RULES
    rule_of = lambda x: rules[x["credit"]] if x["credit"] else credit.PLAIN      # a rollout without a prefix
    sources = Sources(args)
    records = read_jsonl(out / "metrics.jsonl")
    samples = read_jsonl(out / "samples.jsonl")
    steps = [r for r in records if "reward_mean" in r]
    checks.where = f"{out.name}: "
    checks.eq("steps logged", [r["step"] for r in steps], list(range(args.steps)))
    checks.eq("steps sampled", sorted({x["step"] for x in samples}), list(range(args.steps)))
    finals = [r for r in records if "reward_mean" not in r]
    checks.eq("records after the last step", [sorted(r) for r in finals],
              [["eval_pass1", "step"]] if args.eval_data else [])
    evals = [(r["step"], r["eval_pass1"]) for r in records if "eval_pass1" in r]
    checks.eq("evaluated steps", [s for s, _ in evals],
              ([s for s in range(args.steps) if args.eval_every and s % args.eval_every == 0] + [args.steps])
              if args.eval_data else [])
    for step, logged in evals:
        weights = weights_at(out, step, args)
        if weights is not None:
            checks.where = f"{out.name} step {step}: "
            checks.close("eval_pass1", logged, greedy_pass1(weights, args, grade))
    for rec in steps:
        s = rec["step"]
        checks.where = f"{out.name} step {s}: "
        mine = [x for x in samples if x["step"] == s]
        on = [x for x in mine if not x["resampled"]]
        extra = [x for x in mine if x["resampled"]]
        groups = {j: [x for x in on if x["group"] == j] for j in range(P)}
        checks.eq("on-policy rollouts per group", sorted(Counter(x["group"] for x in on).items()),
                  [(j, G) for j in range(P)])
        tau = s / args.steps
        exp = {"step": s, "tau": tau, "lr": args.lr * min(1.0, (s + 1) / rl.WARMUP_STEPS)}

        # -- the logged plan ("prefixed": each group's count) against its rollouts under a prefix
        exp["prefixed"] = [sum(x["prefix_rows"] > 0 for x in groups[j]) for j in range(P)]
        checks.true("a group prefixes at most its G rollouts, none under --schedule none",
                    all(0 <= n <= (G if args.schedule != "none" else 0) for n in exp["prefixed"]))
        exp["rho"], exp["L"] = sum(exp["prefixed"]) / (P * G), args.L if any(exp["prefixed"]) else 0

        # -- every rollout as logged
        for x in mine:
            what = f"rollout {x['group']}/{'resampled' if x['resampled'] else 'on-policy'}: "
            correct = regrade(x)
            checks.eq(what + "correct (regraded from its text)", x["correct"], correct)
            checks.eq(what + "reward", x["reward"], 0.0 if x["truncated"] else correct)
            checks.true(what + "tokens within --max-new-tokens, all of them when cut off",
                        1 <= x["tokens"] <= args.max_new_tokens
                        and (not x["truncated"] or x["tokens"] == args.max_new_tokens))
            source, L, rule = (args.resample_source, args.resample_L, args.resample_credit) if x["resampled"] else \
                (args.prefix_source, exp["L"], args.credit)
            prefixed = x["prefix_rows"] > 0
            checks.eq(what + "prefix rows", x["prefix_rows"], sources.rows(source, L) if prefixed else 0)
            checks.true(what + "a resampled rollout has the prefix its source draws",
                        not x["resampled"] or prefixed == (sources.rows(source, L) > 0))
            checks.eq(what + "prefix source", x["prefix_source"], source if prefixed else "none")
            checks.eq(what + "credit rule (none without a prefix)", x["credit"], rule if prefixed else None)
            checks.eq(what + "trained with prefix", x["trained_with_prefix"],
                      prefixed and rules[x["credit"]].with_prefix)

        # -- rollout metrics over the on-policy rollouts
        n, rewards = len(on), [x["reward"] for x in on]
        mean = sum(rewards) / n
        exp["reward_mean"] = mean
        exp["reward_std"] = math.sqrt(sum((r - mean) ** 2 for r in rewards) / max(n - 1, 1))
        exp["accuracy"] = sum(x["correct"] for x in on) / n
        exp["zero_variance_frac"] = sum(len({x["reward"] for x in g}) == 1 for g in groups.values()) / P
        exp["completion_len"] = sum(x["tokens"] for x in on) / n
        exp["truncated_frac"] = sum(x["truncated"] for x in on) / n
        pre = [x["reward"] for x in on if x["prefix_rows"] > 0]
        plain = [x["reward"] for x in on if x["prefix_rows"] == 0]
        exp["reward_prefixed"] = sum(pre) / len(pre) if pre else None
        exp["reward_plain"] = sum(plain) / len(plain) if plain else None
        exp["rollouts_generated"] = len(mine)

        # -- which rollouts are trained: each group's own, or (--resample) LoPE's regrouping by hand
        trained = {}
        if args.resample:
            failed = [j for j, g in groups.items() if all(x["reward"] == 0 for x in g)]
            checks.eq("resampled rollouts per group", sorted(Counter(x["group"] for x in extra).items()),
                      [(j, args.resample_size) for j in failed])
            rescued = 0
            for j in range(P):
                wins = [x for x in extra if x["group"] == j and x["reward"] > 0][:G - 1]
                trained[j] = groups[j][:G - len(wins)] + wins
                rescued += bool(wins)
            successes = sum(x["reward"] > 0 for x in extra)
            exp.update(resampled_groups=len(failed), rescued_groups=rescued,
                       resample_accuracy=successes / len(extra) if extra else None)
        else:
            checks.eq("resampled rollouts", len(extra), 0)
            trained = groups
        chosen = {id(x) for g in trained.values() for x in g}
        for x in mine:
            checks.eq(f"rollout {x['group']}: trained", x["trained"], id(x) in chosen)

        # -- advantages: the estimator on the credited rewards of each group's G trained rollouts
        for j, g in trained.items():
            expected = advantages_by_hand([x["reward"] for x in g], [x["prefix_rows"] > 0 for x in g],
                                          [rule_of(x).inter_weight for x in g], args.estimator)
            for x, a in zip(g, expected):    # float32 as logged
                checks.close(f"group {j}: advantage", x["advantage"], a, scale=1e-30, rel=3e-7)
        for x in mine:
            if id(x) not in chosen:
                checks.eq(f"rollout {x['group']}: advantage of an untrained rollout", x["advantage"], 0.0)

        # -- the update: minibatch m holds the trained rollout at place k of group j with (j G + k) mod M = m
        taking = [(j * G + k) % M for j, g in trained.items() for k, x in enumerate(g)]
        exp["updates"] = E * len(set(taking))
        retrained = any(x["trained_with_prefix"] != (x["prefix_rows"] > 0) for g in trained.values() for x in g)
        for x in mine:
            what = f"rollout {x['group']}: "
            if id(x) not in chosen:
                sums = [v for k, v in sorted(x.items()) if k.startswith("update_")]
                checks.eq(what + "update sums of a rollout not trained", sums, [0.0] * len(sums))
                continue
            checks.eq(what + "update tokens (its tokens, once per epoch)", x["update_tokens"], float(E * x["tokens"]))
            checks.true(what + "0 <= clipped tokens <= tokens", 0 <= x["update_clipped"] <= x["update_tokens"])
            checks.true(what + "entropy summed over its tokens > 0", x["update_entropy"] > 0)
            if args.kl_coef == 0:
                checks.eq(what + "no kl without --kl-coef", x["update_kl"], 0.0)
            if rule_of(x).shaped:
                checks.eq(what + "a shaped rollout is never clipped", x["update_clipped"], 0.0)
            if E * M == 1 and x["trained_with_prefix"] == (x["prefix_rows"] > 0):
                checks.eq(what + "one update in the sampling context: ratio 1, nothing clipped",
                          x["update_clipped"], 0.0)
            if x["advantage"] == 0 and args.kl_coef == 0:
                checks.eq(what + "no advantage, no kl: no loss", x["update_loss"], 0.0)
        if E * M == 1 and not retrained and args.kl_coef == 0:
            # ratio exactly 1: each rollout's loss is -A_i times its aggregation weight
            kept = [x for g in trained.values() for x in g]
            n_seq, n_tok = len(kept), sum(x["tokens"] for x in kept)
            for x in kept:
                if not rule_of(x).shaped and not (x["prefix_rows"] and rule_of(x).distill_coef):
                    weight = {"token-mean": x["tokens"] / max(n_tok, 1), "seq-mean": 1 / n_seq,
                              "constant": x["tokens"] / (n_seq * args.max_new_tokens)}[args.aggregation]
                    checks.close(f"rollout {x['group']}: loss share -A w", x["update_loss"], -x["advantage"] * weight,
                                 scale=1e-12, rel=1e-5)
        # bookkeeping: the same accumulators as the metrics (independent values: tests/test_rl_losses.py)
        tokens = sum(x["update_tokens"] for x in mine)
        per_token = lambda key: sum(x[f"update_{key}"] for x in mine) / tokens if tokens else None
        exp["loss"] = sum(x["update_loss"] for x in mine) / max(exp["updates"], 1)
        loss_scale = sum(abs(x["update_loss"]) for x in mine) / max(exp["updates"], 1)
        exp["clip_frac"], exp["entropy"] = per_token("clipped"), per_token("entropy")
        if args.kl_coef > 0:
            exp["kl"] = per_token("kl")
        if "eval_pass1" in rec:
            exp["eval_pass1"] = rec["eval_pass1"]             # recomputed above, where the weights are kept

        # -- not recomputable from samples.jsonl: the gradient norm and the clock
        if exp["updates"] == 0 or (all(x["advantage"] == 0 for x in mine) and args.kl_coef == 0):
            checks.eq("grad_norm of a loss without gradient", rec["grad_norm"], 0.0)
        else:        # the KL alone has no gradient while the policy is the reference; clipped tokens none
            checks.true("grad_norm finite and >= 0", 0 <= rec["grad_norm"] < math.inf)
        checks.close("gen_tokens_per_s x time_generate = the on-policy tokens",
                     rec["gen_tokens_per_s"] * max(rec["time_generate"], 1e-9), float(sum(x["tokens"] for x in on)))
        checks.seen.update(clipped_over_several_updates=E * M > 1 and bool(rec.get("clip_frac")),
                           rescued_groups=rec.get("rescued_groups", 0) > 0,
                           nonzero_advantages=any(x["advantage"] != 0 for x in mine),
                           clipped_in_another_context=E * M == 1 and retrained and bool(rec.get("clip_frac")))
        checks.eq("metrics logged (every one needs a recomputation here)",
                  sorted(k for k in rec if not TIMING.match(k) and k != "grad_norm"), sorted(exp))
        for key, expected in exp.items():
            if key in COUNTS:
                checks.eq(key, rec.get(key), expected)
            else:
                checks.close(key, rec.get(key), expected, scale=loss_scale if key == "loss" else 0.0)
    return checks


def run_rows(rows, factors, world, tmp_path, seen, prefix="row"):
    """Run each row in-process and recompute it. Returns (rows, invariants checked); `seen` counts
    what the rows showed (clipping under several updates, rescued groups, non-zero advantages)."""
    total = 0
    for k, row in enumerate(rows):
        out = tmp_path / f"{prefix}{k}"
        argv = clipped(argv_of(row, factors, fixed_rl(world, out), world))
        quietly(rl.main, argv)
        checks = check_rl_run(out, argv, Checks())
        checks.assert_ok(" ".join(argv))
        total += checks.n
        seen.update(checks.seen)
    return len(rows), total


def test_rl_metrics_recompute_from_samples(world, rl_array, tmp_path, pairwise_reward, keep_checkpoints, capsys,
                                           one_thread):
    rows, accepts = rl_array
    picked = invariant_rows(rows, accepts)
    assert {value(r, "--credit") for r in picked if several_updates(r) and prefixes_something(r)} == \
        set(RL_FACTORS["--credit"])
    seen = Counter()
    n_rows, n_checks = run_rows(picked, RL_FACTORS, world, tmp_path, seen)
    with capsys.disabled():
        print(f"\nrl.py metrics recomputed: {n_rows} of the array's {len(rows)} rows x {n_checks // n_rows} invariants "
              f"on average = {n_checks} checked; steps that showed: {dict(seen)}")
    assert all(seen[k] for k in ("clipped_over_several_updates", "rescued_groups", "nonzero_advantages"))


@pytest.mark.slow
def test_rl_metrics_recompute_whole_sweep(world, rl_array, tmp_path, pairwise_reward, keep_checkpoints, capsys,
                                          one_thread):
    rows, accepts = rl_array
    every = [logging_everything(r) for r in rows]
    every = [r for r in every if accepts(r)]
    seen = Counter()
    n_rows, n_checks = run_rows(every, RL_FACTORS, world, tmp_path, seen)
    with capsys.disabled():
        print(f"\nrl.py metrics recomputed, whole sweep: {n_rows} of {len(rows)} rows x {n_checks // n_rows} "
              f"invariants on average = {n_checks} checked; steps that showed: {dict(seen)}")


# -----------------------------------------------------------------------------
# Every flag changes what the run does, or is refused

@pytest.fixture(scope="module")
def other(world):
    """Another file for each path flag: the model with other layer weights (the same embeddings, so
    the world's VAE still fits it) and one with other embeddings too, other problems, a VAE with
    other weights; and a model whose greedy answers stop on some held-out problems (its eos logit
    raised)."""
    from model import PaletteVAE, embedding_fingerprint, save_vae
    from toy.task import generate as toy_rows, write_jsonl
    from toy.tokenizer import EOS_ID
    root = world / "other"
    root.mkdir(exist_ok=True)
    policy = model.Transformer.from_pretrained(str(world / "model"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.model.layers.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    policy.save_pretrained(str(root / "model"))
    with torch.no_grad():                   # train_vae.py reads the embeddings alone
        policy.embed_tokens.weight.add_(0.05 * torch.randn(policy.embed_tokens.weight.shape, generator=g))
    policy.save_pretrained(str(root / "embeddings"))
    policy = model.Transformer.from_pretrained(str(world / "model"))
    with torch.no_grad():
        policy.lm_head.weight[EOS_ID, 0] = 0.46
    policy.save_pretrained(str(root / "stops"))
    write_jsonl(toy_rows("math", 20, seed=5, digits=1), str(root / "train.jsonl"))
    write_jsonl(toy_rows("math", 4, seed=6, digits=1), str(root / "test.jsonl"))
    E = policy.embed_tokens.weight.detach()
    torch.manual_seed(1)
    vae = PaletteVAE(E.shape[1], latent_dim=4, hidden_dim=16)
    vae.set_statistics(E[:40].reshape(10, 4, -1).mean(1), E)
    save_vae(vae, str(root / "vae"), {"beta": 0.1, "model": "tiny", "fingerprint": embedding_fingerprint(E),
                                     "domains": {"math": {"mean": [0.3] * 4, "cov": torch.eye(4).tolist()}}})
    return root


SKIPPED = {"--help": "prints the help and exits", "--out": "says where the outcome goes, not what it is",
           "--resume": "continues a run already there: tests/test_stages.py and the kill/resume tests"}


def stages(world, other):
    """Each stage: its module, a base command line where every flag matters ("{dir}": the run's
    directory) and, for flags that take a path or text, other values to flip them to. The template
    is math: the world's chat template renders chat-plain as plain does. rl.py's completions of up
    to 8 tokens differ in length (so the loss aggregations differ) and some resampled successes are
    trained (so --resample's credit= matters); numbers sit where a move changes something (a cap below
    the data's size, a gradient clip between the step's gradient norms). rl.py's --credit and --resample
    are flipped to every rule and source of the registries."""
    W, O = str(world), str(other)
    prefix = ["--prefix-source", "vae", "--vae", f"{W}/vae", "--region", "math", "--L", "2"]
    return {
        "rl": (rl, ["--model", f"{W}/model", "--data", f"{W}/train.jsonl", "--out", "{dir}", "--steps", "2",
                    "--lr", "1e-2", "--schedule", "0.5", "--prefix-source", "noise", "--L", "2",
                    "--resample", "4,source=vae", "--vae", f"{W}/vae",
                    "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "8", "--template", "math",
                    "--clip-eps", "0.01", "--kl-coef", "0.05",
                    "--epochs", "2", "--minibatches", "2", "--micro-batch-size", "3",
                    "--eval-data", f"{W}/test.jsonl", "--eval-every", "1", "--save-every", "1"],
               {"model": [f"{O}/model"], "data": [f"{O}/train.jsonl"], "eval_data": [f"{O}/test.jsonl"],
                "vae": [f"{O}/vae"], "credit": [c for c in credit.CREDIT_RULES if c != "prefixed"],
                "schedule": [*rl.SCHEDULES, "0.25"],
                "clip_eps": ["0.05", "0.01,0.05"],
                "resample": [None, "2,source=vae", "4,source=vae,L=1",
                             *[f"4,source=vae,credit={c}" for c in credit.CREDIT_RULES if c != "naive"],
                             *[f"4,source={s}" for s in model.PREFIX_SOURCES if s != "vae"]]}),
        "sft_warmup": (sft_warmup, ["--model", f"{W}/model", "--data", f"{W}/train.jsonl", "--out", "{dir}",
                                    "--lr", "1e-2", "--steps", "2", "--batch-size", "4", "--micro-batch-size", "2",
                                    "--warmup-steps", "3", "--weight-decay", "0.1", "--grad-clip", "0.5", *prefix,
                                    "--template", "math", "--max-tokens", "117", "--per-domain-cap", "10",
                                    "--eval-data", f"{W}/test.jsonl",
                                    "--eval-problems", "2", "--eval-max-new-tokens", "4"],
                       {"model": [f"{O}/model"], "data": [f"{O}/train.jsonl"], "eval_data": [f"{O}/test.jsonl"],
                        "vae": [f"{O}/vae"], "region": [None]}),
        "train_vae": (train_vae, ["--model", f"{W}/model", "--data", f"math={W}/train.jsonl", "--out", "{dir}",
                                  "--steps", "2", "--batch-size", "4", "--latent-dim", "4", "--hidden-dim", "8",
                                  "--depth", "1", "--kl-warmup-steps", "3", "--per-domain-cap", "10",
                                  "--max-tokens", "16", "--template", "math"],
                      {"model": [f"{O}/embeddings"], "data": [f"math={O}/train.jsonl"]}),
        "evaluate": (evaluate, ["--benchmarks", f"{W}/test.jsonl", "--limit", "3", "--model", f"{W}/model",
                                "--out", "{dir}", "--mode", "latent-sample", *prefix, "--num-samples", "4",
                                "--k", "1,2",
                                "--top-p", "0.9", "--max-new-tokens", "5", "--batch-size", "4", "--config-name", "base",
                                "--template", "math"],
                     {"benchmarks": [f"{O}/test.jsonl"], "model": [f"{O}/model"], "vae": [f"{O}/vae"], "region": [None],
                      "k": ["1,3"], "config_name": ["other"]}),
        "infer": (infer, ["--model", f"{W}/model", "--prompt", "1+2=?", "--prompt", "3+4=?", *prefix,
                          "--num-latents", "2", "--temperature", "1.0", "--top-p", "0.9", "--max-new-tokens", "5",
                          "--batch-size", "1", "--template", "math", "--out", "{dir}/completions.jsonl"],
                  {"model": [f"{O}/model"], "vae": [f"{O}/vae"], "region": [None], "prompt": [["5+6=?"]],
                   "prompts_file": [f"{W}/test.jsonl"]}),
    }


def options(parser):
    """flag -> argparse action, one entry per action (its first --long spelling)."""
    return {next(s for s in a.option_strings if s.startswith("--")): a for a in parser._actions if a.option_strings}


def as_pairs(argv, parser):
    """A command line as [(flag, value)]: value True for a switch."""
    by_string = {s: a for a in parser._actions for s in a.option_strings}
    long = {s: next(o for o in a.option_strings if o.startswith("--")) for s, a in by_string.items()}
    pairs, i = [], 0
    while i < len(argv):
        flag = long[argv[i]]
        if by_string[argv[i]].nargs == 0:
            pairs, i = pairs + [(flag, True)], i + 1
        else:
            pairs, i = pairs + [(flag, argv[i + 1])], i + 2
    return pairs


def with_value(pairs, flag, new):
    """pairs with flag set to `new`: None or False leaves it out, True switches it on, a list repeats it."""
    kept = [(f, v) for f, v in pairs if f != flag]
    if new is None or new is False:
        return kept
    return kept + ([(flag, True)] if new is True else [(flag, str(v)) for v in new] if isinstance(new, list)
                   else [(flag, str(new))])


def argv_from(pairs, directory):
    argv = []
    for flag, v in pairs:
        argv += [flag] if v is True else [flag, v.replace("{dir}", str(directory))]
    return argv


def flips(action, current, others):
    """The values to flip a flag to, from its action: a switch toggled; every other choice; the
    stage's other values for a path or text; a number moved down, up, doubled (the first the flag's
    own range accepts)."""
    if action.nargs == 0:
        return [not current]
    if action.choices is not None:
        return [c for c in action.choices if c != current]
    if action.dest in others:
        return others[action.dest]
    kind = getattr(action.type, "__name__", None)
    assert kind in ("int", "float"), \
        f"{action.option_strings}: no value to flip it to; give the stage other values for it"
    raw = [1, 2, 5] if current is None else [current - 1, current + 1, 2 * current, 1, 2, 5] if kind == "int" \
        else [current / 2, 2 * current, current + 0.1, 0.1, 1.0]
    out = []
    for v in raw:
        try:
            action.type(str(v))
        except (argparse.ArgumentTypeError, ValueError):
            continue
        if v != current and v not in out:
            out.append(v)
    return out


def stripped(x, dests):
    """A logged value without what may only echo a flag (a key named like a flag's dest, holding a
    single value: a record's "credit", "lr", "L", evaluate.py's settings) and without timings. A value
    a flag only echoes shows nothing; what the flag does must show elsewhere."""
    if isinstance(x, dict):
        return {k: stripped(v, dests) for k, v in x.items()
                if not (k in dests and not isinstance(v, (dict, list))) and not TIMING.match(k)}
    if isinstance(x, list):
        return [stripped(v, dests) for v in x]
    return x


def outcome(directory, trace, parser, argv, stage):
    """What the run of `argv` did: every file it wrote (args.json aside; JSON without echoes and
    timings; other files by content; TensorBoard's event files by presence), what a VAE it trained
    draws, and the trace of its forward passes, generations and evaluations."""
    directory, args = Path(directory), parser.parse_args(argv)
    dests = {a.dest for a in parser._actions}
    files = {}
    for path in sorted(directory.rglob("*")):
        if not path.is_file() or path.name in ("args.json", ".lock"):
            continue
        rel = path.relative_to(directory).as_posix()
        if "tfevents" in path.name:
            files[re.sub(r"events\.out\.tfevents.*", "events", rel)] = "present"
        elif path.suffix == ".jsonl":
            files[rel] = [stripped(json.loads(line), dests) for line in path.read_text().splitlines() if line.strip()]
        elif path.suffix == ".json":
            files[rel] = stripped(json.loads(path.read_text()), dests)
        else:
            files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    if stage == "train_vae" and (directory / "vae.json").exists():      # the prefixes the VAE gives
        E = model.load_embedding_matrix(args.model)
        drawn = model.make_prefix_source("vae", E, vae=str(directory)).sample(4, 2, torch.Generator().manual_seed(0))
        files["prefixes drawn"] = hashlib.sha256(drawn.numpy().tobytes()).hexdigest()
    return {"files": files, "trace": list(trace)}


def difference(a, b):
    """Which parts of two outcomes differ."""
    keys = sorted(set(a["files"]) | set(b["files"]))
    parts = [k for k in keys if a["files"].get(k) != b["files"].get(k)]
    return parts + (["trace"] if a["trace"] != b["trace"] else [])


def digest(x):
    """A short hash of token lists, tensors or lists of them (None stays None)."""
    if x is None:
        return None
    items = x if isinstance(x, (list, tuple)) else [x]
    h = hashlib.sha256()
    for item in items:
        h.update((repr(item.tolist()) if torch.is_tensor(item) else repr(item)).encode())
    return h.hexdigest()[:16]


@pytest.fixture
def trace(monkeypatch):
    """What a run does that its files need not show: each training forward (rows, activation
    checkpointing), each generate() call of evaluate.py, infer.py and the warm-up's check (rows,
    dtype, and the prompts, prefixes and tokens: a tiny model's sampled tokens hardly read the
    context, so the context it was given is recorded), the problems each evaluation reads."""
    seen = []

    def forward(real):
        def traced(m, embeds, *a, **k):
            seen.append(("forward", embeds.shape[0], bool(getattr(m, "gradient_checkpointing", False))))
            return real(m, embeds, *a, **k)
        return traced

    def generation(real):
        def traced(m, prompts, prefixes=None, *a, **k):
            out = real(m, prompts, prefixes, *a, **k)
            seen.append(("generate", len(prompts), str(next(m.parameters()).dtype), digest(prompts), digest(prefixes),
                         digest(out.token_lists())))
            return out
        return traced

    def evaluation(real, rows_at):
        def traced(*a, **k):
            seen.append(("evaluated", tuple(r["problem"] for r in rows_at(a))))
            return real(*a, **k)
        return traced
    def saving(real):
        def traced(out, step, *a, **k):
            seen.append(("checkpoint", step))
            return real(out, step, *a, **k)
        return traced
    monkeypatch.setattr(common, "save_checkpoint", saving(common.save_checkpoint))
    monkeypatch.setattr(rl, "token_logprobs", forward(rl.token_logprobs))
    monkeypatch.setattr(sft_warmup, "token_logprobs", forward(sft_warmup.token_logprobs))
    for module in (evaluate, infer, diagnostics):
        monkeypatch.setattr(module, "generate", generation(module.generate))
    monkeypatch.setattr(rl, "evaluate_greedy", evaluation(rl.evaluate_greedy, lambda a: a[2]))
    monkeypatch.setattr(diagnostics, "prefix_sensitivity", evaluation(diagnostics.prefix_sensitivity, lambda a: a[2]))
    return seen


def flip_run(module, pairs, flag, directory, trace, notes=None):
    """Run a flipped command line; a refusal naming another flag that the flip left without effect
    drops that flag and runs again (in a new directory). Returns ("ran", (pairs, directory)) or
    ("refused", line) or ("crashed", why); notes: a list that gets the run's notes."""
    for _ in range(6):
        trace.clear()
        try:
            refusal = run_stage(module, argv_from(pairs, directory), notes)
        except (AssertionError, Exception) as e:          # a stack trace, or an exit that is not one line
            return "crashed", f"{type(e).__name__}: {str(e)[-300:]}"
        if refusal is None:
            return "ran", (pairs, directory)
        named = re.match(r"error: (--[\w-]+)", refusal)
        useless = named and named.group(1) != flag and named.group(1) in dict(pairs) and \
            ("no effect" in refusal or "needs a VAE source" in refusal)
        if not useless:
            return "refused", refusal
        pairs = with_value(pairs, named.group(1), None)
        directory = Path(f"{directory}+")
    return "refused", refusal


@pytest.mark.parametrize("stage", ["rl", "sft_warmup", "train_vae", "evaluate", "infer"])
def test_every_flag_changes_the_run_or_is_refused(stage, world, other, tmp_path, pairwise_reward, trace, capsys,
                                                  one_thread):
    module, base_argv, others = stages(world, other)[stage]
    parser = module.parser
    base = as_pairs(base_argv, parser)
    for flag, action in options(parser).items():      # "auto" resolves to one of the other choices:
        if action.choices is not None and action.default == "auto" and flag not in dict(base):   # name one
            base.append((flag, next(c for c in action.choices if c != "auto")))
    outcomes = []
    for k in range(2):                                   # the base twice: a run is a function of its flags
        trace.clear()
        assert run_stage(module, argv_from(base, tmp_path / f"base{k}")) is None
        outcomes.append(outcome(tmp_path / f"base{k}", trace, parser, argv_from(base, tmp_path / f"base{k}"), stage))
    assert outcomes[0] == outcomes[1], difference(*outcomes)
    reference = outcomes[0]
    if stage == "rl":          # resampled successes are trained, so --resample's credit= can matter
        assert any(r.get("rescued_groups") for r in read_jsonl(tmp_path / "base0" / "metrics.jsonl"))
    current = vars(parser.parse_args(argv_from(base, tmp_path / "x")))
    changed, refused, failures, n = {}, {}, [], 0
    for flag, action in options(parser).items():
        if flag in SKIPPED:
            continue
        values = flips(action, current[action.dest], others)
        assert values, f"{flag}: no value to flip it to"
        each = action.choices is not None or action.dest in others      # every value must matter, not just one
        for v in values:
            n += 1
            status, result = flip_run(module, with_value(base, flag, v), flag, tmp_path / f"flip{n}", trace)
            label = f"{flag} {v}"
            if status == "crashed":
                failures.append(f"{label}: crashed ({result})")
            elif status == "refused":
                refused[label] = result
                continue
            else:
                pairs, ran = result
                diff = difference(reference, outcome(ran, trace, parser, argv_from(pairs, ran), stage))
                if diff:
                    changed[label] = diff
                else:
                    failures.append(f"{label}: ran exactly as the base ({' '.join(argv_from(pairs, 'DIR'))})")
            if not each:
                break
    with capsys.disabled():
        print(f"\n{stage}: {len(changed)} flips changed the run, {len(refused)} were refused in one line, "
              f"{len(failures)} failed ({', '.join(sorted(SKIPPED))} left out)")
        for label, line in refused.items():
            print(f"    refused  {label}: {line}")
        if os.environ.get("INVARIANTS_VERBOSE"):
            for label, parts in changed.items():
                print(f"    changed  {label}: {', '.join(parts)}")
    assert not failures, "\n".join(failures)


EDGES = {   # rows of rl.py where a flag, though accepted, has nothing to act on: each must be noted
    "credit-unprefixed": ("--credit when --schedule 0.1 prefixes no rollout: round(0.1 x 4) = 0",
                          ["--schedule", "0.1", "--L", "2"], "--credit", "naive"),
    "L-unprefixed": ("--L when --schedule 0 prefixes no rollout", ["--schedule", "0", "--L", "2"], "--L", "3"),
    "credit-schedule-none": ("--credit under --schedule none", ["--schedule", "none"], "--credit", "naive"),
    "L-schedule-none": ("--L under --schedule none", ["--schedule", "none"], "--L", "3"),
    "source-schedule-none": ("--prefix-source under --schedule none", ["--schedule", "none"], "--prefix-source", "noise"),
    "clip-ratio-1": ("--clip-eps with one update in the sampling context: the ratio is 1",
                     ["--schedule", "0.5", "--L", "2", "--epochs", "1", "--minibatches", "1"],
                     "--clip-eps", "0.1"),
}


@pytest.mark.parametrize("case", list(EDGES))
def test_flags_that_cannot_matter_are_noted(case, world, tmp_path, pairwise_reward, trace, one_thread):
    """Beyond the base rows: rows where the flag has nothing to act on, decidable from the flags
    alone. The flip must print a one-line note naming the flag, be refused in one line, or change
    the run."""
    what, row, flag, flipped = EDGES[case]
    base = as_pairs(["--model", str(world / "model"), "--data", str(world / "train.jsonl"), "--out", "{dir}",
                     "--steps", "2", "--lr", "1e-2", "--prefix-source", "noise", "--prompts-per-step", "2",
                     "--group-size", "4", "--max-new-tokens", "8", *row], rl.parser)
    refused = run_stage(rl, argv_from(base, tmp_path / "base"))
    if refused is not None:              # the row itself has nothing for the flag to act on: refused
        assert refused.startswith("error: ") and "\n" not in refused, refused
        return
    reference = outcome(tmp_path / "base", trace, rl.parser, argv_from(base, tmp_path / "base"), "rl")
    notes = []
    flipped_pairs = with_value(base, flag, flipped) + [("--vae", str(world / "vae"))] * (flipped == "vae")
    status, result = flip_run(rl, flipped_pairs, flag, tmp_path / "flip", trace, notes)
    assert status != "crashed", result
    if status == "ran" and not any(line.startswith(f"note: {flag} ") for line in notes):
        pairs, ran = result
        if not difference(reference, outcome(ran, trace, rl.parser, argv_from(pairs, ran), "rl")):
            pytest.fail(f"{what}: {flag} {flipped} is accepted, changes nothing and is not noted; note it in one line")


# -----------------------------------------------------------------------------
# The held-out set does not move with --seed

def even(text, answer, kind=None):
    """A reward that some greedy answers earn and others not: a text of even length (the empty one of
    an answer that stops at once too) for a problem whose gold answer is even."""
    return float(len(text) % 2 == 0 and int(answer) % 2 == 0)


def test_held_out_set_ignores_seed(world, other, tmp_path, trace, keep_checkpoints, monkeypatch, capsys, one_thread):
    held_out = [r["problem"] for r in load_rows(str(world / "test.jsonl"), domain="math")]
    runs, checks = {}, Checks()
    monkeypatch.setattr(rl, "grade", even)
    monkeypatch.setattr(rl, "EVAL_PROBLEMS", 3)          # 3 of the file's 4 problems: which 3 is the question
    for seed in ("0", "1"):
        # rl.py, on a model whose greedy answers stop on some problems, so that eval_pass1 is not 0
        out = tmp_path / f"rl{seed}"
        argv = ["--model", str(other / "stops"), "--data", str(world / "train.jsonl"), "--eval-data",
                str(world / "test.jsonl"), "--eval-every", "1", "--steps", "2", "--lr", "1e-2",
                "--schedule", "none", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "6",
                "--save-every", "1", "--seed", seed, "--out", str(out)]
        trace.clear()
        quietly(rl.main, argv)
        args = rl.parser.parse_args(argv)
        evals = [r for r in read_jsonl(out / "metrics.jsonl") if "eval_pass1" in r]
        for r in evals:                                  # every step's weights are kept: all recomputed
            checks.where = f"rl.py --seed {seed} step {r['step']}: "
            checks.close("eval_pass1", r["eval_pass1"], greedy_pass1(weights_at(out, r["step"], args), args, even))
        runs["rl", seed] = {"evaluated": [t[1] for t in trace if t[0] == "evaluated"],
                            "trained on": sorted(x["problem"] for x in read_jsonl(out / "samples.jsonl")),
                            "scores": [r["eval_pass1"] for r in evals]}
        # sft_warmup.py: the before/after check's problems
        trace.clear()
        assert run_stage(sft_warmup, ["--model", str(world / "model"), "--data", str(world / "train.jsonl"),
                                      "--out", str(tmp_path / f"sft{seed}"), "--steps", "1", "--batch-size", "2",
                                      "--prefix-source", "noise", "--eval-data", str(world / "test.jsonl"),
                                      "--eval-problems", "2", "--eval-max-new-tokens", "2", "--seed", seed]) is None
        runs["sft", seed] = {"evaluated": [t[1] for t in trace if t[0] == "evaluated"]}
        # evaluate.py --limit: the problems of <benchmark>.jsonl
        assert run_stage(evaluate, ["--model", str(world / "model"), "--benchmarks", str(world / "test.jsonl"),
                                    "--limit", "2", "--num-samples", "2", "--max-new-tokens", "3", "--seed", seed,
                                    "--out", str(tmp_path / f"eval{seed}")]) is None
        records = read_jsonl(tmp_path / f"eval{seed}" / "test.jsonl")
        runs["evaluate", seed] = {"evaluated": [tuple(r["problem"] for r in records)],
                                  "completions": [r["completions"] for r in records]}
    checks.assert_ok()
    for stage, size in (("rl", 3), ("sft", 2), ("evaluate", 2)):
        a, b = runs[stage, "0"], runs[stage, "1"]
        assert len(set(a["evaluated"])) == 1 and len(a["evaluated"][0]) == size, a["evaluated"]   # one set a run
        assert set(a["evaluated"][0]) < set(held_out)                                            # of the file
        assert a["evaluated"] == b["evaluated"], (stage, a["evaluated"], b["evaluated"])         # whatever --seed
    assert runs["rl", "0"]["trained on"] != runs["rl", "1"]["trained on"]          # while --seed moves the rest
    assert runs["evaluate", "0"]["completions"] != runs["evaluate", "1"]["completions"]
    assert any(0 < v < 1 for v in runs["rl", "0"]["scores"] + runs["rl", "1"]["scores"])   # the recomputation bit
    with capsys.disabled():
        print(f"\nheld-out set: rl.py {len(runs['rl', '0']['evaluated'])} evaluations a run (eval_pass1 "
              f"{runs['rl', '0']['scores']} and {runs['rl', '1']['scores']} recomputed), sft_warmup.py "
              f"{len(runs['sft', '0']['evaluated'])}, evaluate.py 1: the same problems at --seed 0 and 1")


# -----------------------------------------------------------------------------
# The registries at run time: README's "Extending" recipes, followed by a test

class ScaledNoisePrefix(model.NoisePrefix):
    """A new prefix source as README's recipe makes one: Gaussian vectors at twice the token norm."""
    name = "noise-x2"
    summary = "a Gaussian vector at twice the mean token-embedding norm"

    def _draw(self, n, L, generator):
        return 2 * super()._draw(n, L, generator)


def registries():
    return {"schedule": rl.SCHEDULES, "prefix source": model.PREFIX_SOURCES,
            "advantage estimator": model.ADVANTAGE_ESTIMATORS, "credit rule": credit.CREDIT_RULES}


NEW = {"schedule": ("cosine", lambda tau, last: 0.5 * (1 + math.cos(math.pi * tau))),
       "prefix source": (ScaledNoisePrefix.name, ScaledNoisePrefix),
       "advantage estimator": ("maxmin", lambda r: (r - r.mean(1, keepdim=True))
                               / (r.amax(1, keepdim=True) - r.amin(1, keepdim=True) + 1e-6)),
       "credit rule": ("half-nudge", credit.CreditRule("half-nudge", with_prefix=False, inter_weight=1.3,
                                                       distill_coef=0.05))}


def registry_flags():
    """(stage, flag, action, registry kind) of every flag whose choices are a registry's names, read
    before anything is registered."""
    found = []
    for module in (rl, sft_warmup, train_vae, evaluate, infer):
        for flag, action in options(module.parser).items():
            for kind, registry in registries().items():
                if action.choices is not None and list(action.choices) == list(registry):
                    found.append((module.__name__, flag, action, kind))
    return found


def register(monkeypatch):
    """Register NEW; returns the flags that offer a registry as argparse choices (credit rules are
    checked by credit.py against its registry instead, schedules by rl.schedule_arg)."""
    flags = registry_flags()
    assert {kind for _, _, _, kind in flags} == set(registries()) - {"credit rule", "schedule"}
    for kind, (name, entry) in NEW.items():
        monkeypatch.setitem(registries()[kind], name, entry)
    return flags


def test_parser_choices_read_the_registries_live(world, monkeypatch):
    """A new entry registered at run time must be a choice of every flag that offers its registry:
    argparse must read the registry (choices=REGISTRY), not a list copied at import; rl.py's check
    must accept a new credit rule for --credit and for --resample's credit=."""
    copies = [f"{stage}.py {flag} ({kind})" for stage, flag, action, kind in register(monkeypatch)
              if NEW[kind][0] not in action.choices]
    assert not copies, ("these flags' choices are lists copied from the registry at import, so an entry "
                        "registered later is refused: " + ", ".join(copies))
    rule = NEW["credit rule"][0]
    args = rl.parser.parse_args(fixed_rl(world, "x") + ["--prefix-source", "noise", "--credit", rule,
                                                        "--resample", f"2,credit={rule}"])
    quietly(rl.check_args, args, 1)
    assert args.credit == args.resample_credit == rule
    schedule = NEW["schedule"][0]
    assert rl.parser.parse_args(fixed_rl(world, "x") + ["--schedule", schedule]).schedule == schedule


def fresh_pairwise():
    """tests/test_pairwise.py imported afresh (its factors are read from the parsers at import)."""
    spec = importlib.util.spec_from_file_location("test_pairwise_fresh", test_pairwise.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    return fresh


def live_registries(monkeypatch):
    """Register one entry of each kind and let argparse read the registries live (the parsers' fix,
    applied here where the parsers copy them). Returns test_pairwise imported afresh, with its factors."""
    for _, _, action, kind in register(monkeypatch):
        monkeypatch.setattr(action, "choices", registries()[kind])
    fresh = fresh_pairwise()
    for kind, (name, _) in NEW.items():
        assert any(name in values for values in fresh.RL_FACTORS.values()), (kind, name)
    assert ScaledNoisePrefix.name in fresh.SFT_FACTORS["--prefix-source"]
    return fresh


def rows_with_new_entries(rows, factors, accepts):
    """For each new entry, a row of the array (given by value) with the entry in place of the value
    it most resembles: cosine for linear, the scaled noise for noise, the estimator for grpo, the
    credit rule for --credit (and --resample's credit=) under several updates."""
    by_value = [{flag: RL_FACTORS[flag][i] for flag, i in row.items()} for row in rows]
    index = lambda row: {flag: factors[flag].index(v) for flag, v in row.items()}
    wanted = {"schedule": (lambda r: r["--schedule"] == "linear", {"--schedule": NEW["schedule"][0]}),
              "prefix source": (lambda r: r["--prefix-source"] == "noise" and r["--schedule"] != "none",
                                {"--prefix-source": NEW["prefix source"][0]}),
              "advantage estimator": (lambda r: r["--estimator"] == "grpo" and r["--max-new-tokens"] != "1",
                                      {"--estimator": NEW["advantage estimator"][0]}),
              "credit rule": (lambda r: r["--schedule"] in rl.SCHEDULES and r["--schedule"] != "none"
                              and r["--resample"] is not None
                              and r["--prefix-source"] != "none",
                              {"--credit": NEW["credit rule"][0], "--resample credit": NEW["credit rule"][0],
                               "--epochs": "2"})}
    picked = {}
    for kind, (fits, change) in wanted.items():
        for row in by_value:
            candidate = logging_everything(index(row | change), factors)
            if fits(row) and accepts(candidate):
                picked[kind] = candidate
                break
        assert kind in picked, f"no row of the array takes the new {kind}"
    return picked


def test_new_registry_entries_join_the_sweep(world, rl_array, tmp_path, pairwise_reward, keep_checkpoints, monkeypatch,
                                             capsys, one_thread):
    fresh = live_registries(monkeypatch)
    factors = fresh.RL_FACTORS
    accepts = memoised(rl_accepted_by(factors, fixed_rl(world, "x"), world))
    picked = rows_with_new_entries(rl_array[0], factors, accepts)
    total = 0
    for kind, row in picked.items():
        out = tmp_path / kind.replace(" ", "_")
        # three steps: at tau 1/3 and 2/3 cosine prefixes other numbers of rollouts than linear does
        argv = clipped(argv_of(row, factors, fixed_rl(world, out), world) + ["--steps", "3"])
        quietly(rl.main, argv)
        checks = check_rl_run(out, argv, Checks())
        checks.assert_ok(" ".join(argv))
        total += checks.n
        used = {x[key] for x in read_jsonl(out / "samples.jsonl") for key in ("prefix_source", "credit")}
        rhos = [r["rho"] for r in read_jsonl(out / "metrics.jsonl") if "rho" in r]
        G = rl.parser.parse_args(argv).group_size
        linear = [math.floor((1 - s / 3) * G + 0.5) / G for s in range(3)]
        assert {"schedule": rhos != linear, "prefix source": NEW[kind][0] in used,
                "credit rule": NEW[kind][0] in used, "advantage estimator": True}[kind], (kind, used, rhos)
    with capsys.disabled():
        print(f"\nregistries at run time: {', '.join(f'{k} {v[0]}' for k, v in NEW.items())} registered; "
              f"test_pairwise's factors list them; {len(picked)} rows x {total // len(picked)} invariants on average")


@pytest.mark.slow
def test_whole_sweep_with_new_registry_entries(world, tmp_path, pairwise_reward, keep_checkpoints, monkeypatch, capsys,
                                               one_thread):
    """The covering array rebuilt with the run-time entries: every row that holds one of them."""
    fresh = live_registries(monkeypatch)
    factors = fresh.RL_FACTORS
    accepts = memoised(rl_accepted_by(factors, fixed_rl(world, "x"), world))
    rows, _, _ = covering_array(factors, accepts)
    new = {name for name, _ in NEW.values()}
    holding = [logging_everything(r, factors) for r in rows if new & {factors[f][i] for f, i in r.items()}]
    holding = [r for r in holding if accepts(r)]
    seen = Counter()
    n_rows, n_checks = run_rows(holding, factors, world, tmp_path, seen)
    with capsys.disabled():
        print(f"\nrl.py whole sweep with the run-time entries: {n_rows} of {len(rows)} rows hold one, x "
              f"{n_checks // max(n_rows, 1)} invariants on average = {n_checks} checked")
