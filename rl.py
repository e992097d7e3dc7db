r"""Stage 3: GRPO / RLOO with latent-guided exploration (Reasoning Palette).

One step reads rollout -> score -> update -> log:

    rollout  P prompts (sharded over ranks; a group never spans ranks), G completions of each.
             The schedule decides how many rollouts of each group carry a prefix, and
             choose_prefixed which ones: each of those draws its OWN latent z, decoded into L
             prefix embeddings placed before the prompt; the rest get none. The prefix is stored
             with its rollout, so every later log-prob is computed in the context it was sampled in.
             Every random draw of group j (who is prefixed, the prefixes, each rollout's sampling
             noise) comes from seeds derived from (--seed, step, j): a run gives the same rollouts on
             any number of ranks, and a resumed run continues them exactly.
    score    rewards from the grader (a cut-off answer is worth 0), group advantages.
    update   update_policy: E epochs x M minibatches of optimiser steps on the batch.
    log      one record per step in metrics.jsonl; decoded rollouts in samples.jsonl.

The objective, per minibatch (sum over completion tokens t of the kept rollouts i):

    J = sum_it w_it * [ min(r_it * A_i, clip(r_it, 1 - eps_low, 1 + eps_high) * A_i)
                        - kl_coef * k3_it + entropy_coef * H_it ]
        + sum_i d_i A_i / B' * mean_t log pi(o_it | q, o_i<t)            (nudge's distillation)
    r_it  = pi(o_it | c_i, q, o_i<t) / pi_old(o_it | p_i, q, o_i<t), both from training forward
            passes at the sampling temperature; p_i is the prefix rollout i was sampled under (or
            none) and c_i the context it is trained in, set by its credit rule (credit.py;
            --credit for the schedule's prefixed rollouts): c_i = p_i (prefixed, nudge) or none
            (naive, naive-shaped, which also shape the term as LoPE does); pi_old is the policy
            before the batch's first update: with one update per batch and c_i = p_i it is pi
            itself and r = 1; with more, it is recomputed in other micro-batches, and the first
            update's r is 1 in fp32 but under bf16 off by up to about 3e-3 in |log r|; the
            sampler's own log-probs are never used
    A_i   = grpo:   (R_i - mean_g R) / (std_g R + 1e-6), std with Bessel's correction
            (under nudge sqrt((G - 1) / G) times NudgeRL's, which divides by the population std)
            rloo:   R_i - mean of the other G - 1 rewards of the group
            drgrpo: R_i - mean_g R
            where R is the reward, except under nudge, whose prefixed rollouts read
            R_i + 0.1 (mean of the group's prefixed rewards - mean_g R); a group with equal rewards
            has A = 0 and is counted as zero-variance
    k3_it = exp(ref - logp) - (ref - logp) - 1, ref = log pi_ref(o_it | c_i, q, o_i<t) under the
            checkpoint --model as loaded (its own embeddings, the same prefix vectors);
            kl_coef = 0 by default, and then no reference model is loaded at all
    H_it  = the entropy of the policy's next-token distribution at the sampling temperature
    w_it  = token-mean: 1 / (kept completion tokens of the minibatch); seq-mean: 1 / (B' |o_i|);
            constant: 1 / (B' * max_new_tokens) (Dr. GRPO); B' = kept rollouts of the minibatch.
            Every rollout is kept, except cut-off ones under --truncated mask.
    d_i   = 0.1 for a prefixed rollout under nudge, else 0 (credit.py; NudgeRL distills every
            rollout, but for a prefix-free one the term repeats the policy gradient)
Minibatch m holds the trained rollouts at places k of groups j with (j G + k) mod M = m, the same
rollouts on any number of ranks; each rank splits its share into micro-batches of
--micro-batch-size kept rollouts, and the gradient accumulated over micro-batches and ranks is the
gradient of -J on the whole minibatch (tests/test_rl_losses.py checks this in float64).

GRPO here is DeepSeekMath's with asymmetric clipping (DAPO), no KL by default and token-mean
aggregation; RLOO is used with the same clipped surrogate (RLOO proper is plain REINFORCE:
--epochs 1 --minibatches 1). docs/trl_differences.md lists where the conventions differ from
TRL's trainers. Schedules, rho(tau) over progress tau = step / steps (the table SCHEDULES):
none (baseline); two-stage (every rollout prefixed while tau < 0.5, none after); linear
(rho = 1 - tau); constant (--rho). round(rho * G) rollouts of each group, halves rounded up, get
an L-token prefix. Zero-advantage resampling (--resample, LoPE's rule with any prefix source) is
off the main path, in resample.py; docs/resampling.md states its rule. Sharding (--fsdp) is in
fsdp.py; docs/fsdp.md gives the memory per GPU.

Precision: weights and AdamW's moments stay fp32; --dtype bfloat16 computes the training forward
under autocast (FSDP2's bf16 parameters with fp32 gradient reduction under --fsdp), takes the
log-probs from fp32 logits (the KL reference too: fp32 weights on the same path, so k3 = 0 before
the first update), and samples with a bf16 copy of the policy refreshed after every update. Memory: guard.memory_need models what a rank holds; at start-up --micro-batch-size 0 and
--activation-checkpointing auto take the first setting that fits the free memory, and a run that
cannot fit is refused before the model is loaded.

Toy world:
    python rl.py --model runs/toy/sft/model --vae runs/toy/vae --schedule linear --L 1 \
        --data runs/toy/data/math_train.jsonl --eval-data runs/toy/data/math_test.jsonl --out runs/toy/rl_linear
    python rl.py --model runs/toy/sft_plain/model --schedule none ... --out runs/toy/rl_none
Qwen3-4B on 8 GPUs of 80 GB (sharded: replicated fp32 weights, gradients and AdamW take 64 GB a GPU):
    torchrun --nproc_per_node 8 rl.py --model runs/sft-qwen3-4b/model --vae runs/vae-qwen3-4b \
        --schedule linear --L 8 --data math=../shared/data/gsm8k_train.jsonl --template math \
        --prompts-per-step 64 --group-size 8 --max-new-tokens 1024 --dtype bfloat16 --fsdp \
        --out runs/rl-qwen3-4b
Resume a killed run from its newest checkpoint: the same command with --resume.
"""

import argparse
import copy
import math
import random
import time
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

import credit
import diagnostics
import fsdp
import resample
from common import (RunDir, all_reduce_mean, all_reduce_sum, check_ranks_in_sync, compute_init, derived_seed,
                    gather_objects, kept_note, load_checkpoint, print0, progress, run_main,
                    save_checkpoint, seed_everything, sync_gradients)
from data import HELD_OUT_SEED, TEMPLATES, check_gold_answers, format_prompt, grade, load_mixture
from guard import SEED, ArgumentParser, UserError, check_fits_context, fit_memory, memory_need, ranged, refuse_unused
from model import (ADVANTAGE_ESTIMATORS, LOSS_AGGREGATIONS, Transformer, add_prefix_arguments,
                   check_prefix_sources, completion_batch, decode_buckets, generate, group_advantages, load_config,
                   load_embedding_matrix, load_tokenizer, loss_token_weights, make_prefix_source, policy_loss,
                   resolve_checkpoint, token_logprobs)

# name -> rho(tau, rho flag): the fraction of each group's rollouts that carry a prefix at
# progress tau in [0, 1). argparse takes its choices from here.
SCHEDULES = {
    "none": lambda tau, rho: 0.0,
    "two-stage": lambda tau, rho: 1.0 if tau < 0.5 else 0.0,
    "linear": lambda tau, rho: 1.0 - tau,
    "constant": lambda tau, rho: rho,
}

parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# Data
parser.add_argument("--data", required=True, help="training problems: domain=path_or_id,... or a path")
parser.add_argument("--per-domain-cap", type=ranged(int, 1), default=None)
parser.add_argument("--template", default="plain", choices=TEMPLATES)
parser.add_argument("--eval-data", default=None, help="held-out problems for greedy pass@1")
parser.add_argument("--eval-problems", type=ranged(int, 1), default=200, help="the same problems for every --seed")
parser.add_argument("--eval-every", type=ranged(int, 0), default=10, help="steps between evaluations (0: at the end)")
# Model
parser.add_argument("--model", required=True, help="hub id or checkpoint directory (after sft_warmup.py)")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="bfloat16: bf16 compute, fp32 master weights and optimiser state")
parser.add_argument("--activation-checkpointing", default="auto", choices=["auto", "on", "off"],
                    help="recompute layers in backward (auto: when the memory model says it is needed)")
parser.add_argument("--fsdp", action="store_true", help="shard weights, gradients and optimiser state "
                    "over ranks (FSDP2, fsdp.py) instead of replicating them (DDP)")
# Palette
parser.add_argument("--schedule", default="linear", choices=SCHEDULES)
parser.add_argument("--rho", type=ranged(float, 0, 1), default=0.5, help="prefixed fraction of each group (constant)")
add_prefix_arguments(parser, L=8, L_help="prefix tokens of a prefixed rollout")   # --prefix-source --vae --region --L --tie
parser.add_argument("--credit", default="prefixed", choices=credit.CREDIT_RULES,
                    help="how the schedule's prefixed rollouts are trained (credit.py)")
resample.add_arguments(parser)
# Rollouts
parser.add_argument("--prompts-per-step", type=ranged(int, 1), default=16, help="P, over all ranks")
parser.add_argument("--group-size", type=ranged(int, 2), default=8, help="G completions per prompt (advantages "
                    "compare the rollouts of a group)")
parser.add_argument("--max-new-tokens", type=ranged(int, 1), default=128)
parser.add_argument("--temperature", type=ranged(float, above=0), default=1.0,
                    help="> 0: the loss reads log-probs at the sampling temperature")
parser.add_argument("--top-p", type=ranged(float, high=1, above=0), default=1.0)
parser.add_argument("--truncated", default="zero", choices=["zero", "mask"],
                    help="a completion cut at --max-new-tokens gets reward 0; mask also leaves it out "
                         "of the loss (DAPO's overlong filtering)")
# Objective
parser.add_argument("--estimator", default="grpo", choices=ADVANTAGE_ESTIMATORS)
parser.add_argument("--clip-eps-low", type=ranged(float, 0, below=1), default=0.2)
parser.add_argument("--clip-eps-high", type=ranged(float, 0), default=0.28)
parser.add_argument("--kl-coef", type=ranged(float, 0), default=0.0, help="k3 KL to the initial policy (0: no reference model)")
parser.add_argument("--entropy-coef", type=ranged(float, 0), default=0.0, help="token-entropy bonus (0: none)")
parser.add_argument("--aggregation", default="token-mean", choices=LOSS_AGGREGATIONS)
parser.add_argument("--epochs", type=ranged(int, 1, 100), default=1, help="optimisation passes over each rollout batch")
parser.add_argument("--minibatches", type=ranged(int, 1), default=1, help="optimiser steps per pass")
parser.add_argument("--micro-batch-size", type=ranged(int, 0), default=0,
                    help="rollouts per forward/backward (0: the largest of 32, 16, ..., 1 that fits the memory)")
# Optimisation
parser.add_argument("--steps", type=ranged(int, 1), default=100)
parser.add_argument("--lr", type=ranged(float, 0), default=1e-6)
parser.add_argument("--warmup-steps", type=ranged(int, 0), default=5)
parser.add_argument("--weight-decay", type=ranged(float, 0), default=0.0)
parser.add_argument("--grad-clip", type=ranged(float, above=0, inf=True), default=1.0, help="inf: no clipping")
parser.add_argument("--seed", type=SEED, default=0)
# Checkpoints and logs
parser.add_argument("--out", required=True)
parser.add_argument("--save-every", type=ranged(int, 0), default=25, help="steps between checkpoints (0: at the end)")
parser.add_argument("--keep-checkpoints", type=ranged(int, 1), default=1, help="newest checkpoints kept")
parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
parser.add_argument("--sample-every", type=ranged(int, 0), default=10, help="steps between decoded rollouts in samples.jsonl")
parser.add_argument("--samples-per-step", type=ranged(int, 0), default=4,
                    help="rollouts written at such a step, spread over every rank's (0: every rollout)")
parser.add_argument("--tensorboard", action="store_true", help="also log metrics.jsonl's records to --out/tensorboard "
                    "(TensorBoard event files, which W&B can import); needs the tensorboard package")


def check_args(args, world_size):
    """The rules between flags, before anything is loaded (each flag's own range is on the flag)."""
    if args.lr * args.weight_decay >= 1:
        raise UserError(f"--lr {args.lr} x --weight-decay {args.weight_decay} >= 1 would flip every "
                        "weight's sign at each step; lower them")
    if args.prompts_per_step % world_size:
        raise UserError(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the {world_size} ranks")
    per_rank = args.prompts_per_step // world_size * args.group_size
    if args.minibatches > per_rank:
        raise UserError(f"--minibatches {args.minibatches} is more than the {per_rank} rollouts each rank holds "
                        "(prompts-per-step / ranks x group-size)")
    if args.schedule != "none" and (args.prefix_source == "none" or args.L == 0):
        raise UserError(f"--schedule {args.schedule} needs a --prefix-source and --L >= 1; use --schedule "
                        "none for the baseline")
    if args.schedule == "constant" and prefix_plan("constant", 0.0, args.group_size, args.rho, args.L)[0] == 0:
        raise UserError(f"--rho {args.rho} prefixes round({args.rho} x {args.group_size}) = 0 rollouts of each group: "
                        "none at all; use --schedule none for the baseline")
    if args.fsdp and (args.truncated == "mask" or credit.CREDIT_RULES[args.credit].distill_coef
                      or credit.CREDIT_RULES[args.resample_credit].distill_coef):
        raise UserError("--fsdp needs the same forward passes on every rank (each is a collective), which --truncated mask "
                        "and nudge's distillation pass do not give; use --truncated zero and another --credit / --resample-credit")
    used = [("--prefix-source", args.prefix_source)] if args.schedule != "none" else []
    used += resample.check_args(args, parser)
    unused = {} if args.schedule == "constant" else {"rho": "it is the prefixed fraction of --schedule constant"}
    if not args.eval_data:
        unused.update(dict.fromkeys(("eval_every", "eval_problems"), "there is no --eval-data"))
    replayed = lambda credit_name: credit.CREDIT_RULES[credit_name].with_prefix
    if args.epochs * args.minibatches == 1 and (args.schedule == "none" or replayed(args.credit)) and \
            (not args.resample or args.resample_source == "none" or replayed(args.resample_credit)):
        unused.update(dict.fromkeys(("clip_eps_low", "clip_eps_high"), "one update per batch, every rollout trained "
                                    "in the context it was sampled in: the ratio is 1, never clipped"))
    if args.schedule == "none":
        why = "--schedule none draws no prefix"
        unused.update(credit=why, **({} if args.prefix_source == "none" else {"prefix_source": why}))
        unused.update({k: why for k in ("L", "tie") if not any(flag == "--resample-source" for flag, _ in used)})
    refuse_unused(args, parser, unused)
    lengths = ([args.L] if args.schedule != "none" else []) + ([args.resample_L] if args.resample else [])
    check_prefix_sources(used, args.vae, args.region, args.tie, max(lengths, default=0))


def prefix_plan(schedule, tau, G, rho, L):
    """(rollouts of each group that carry a prefix, prefix length) at progress tau in [0, 1)."""
    n_prefixed = math.floor(SCHEDULES[schedule](tau, rho) * G + 0.5) if L > 0 else 0   # halves round up
    return n_prefixed, L if n_prefixed else 0


def choose_prefixed(G, n_prefixed, generator):
    """Which of a group's G rollouts carry a prefix: n_prefixed of them, chosen uniformly at random
    so that a rollout's place in its group says nothing. Returns a bool tensor (G,)."""
    return torch.rand(G, generator=generator).argsort().argsort() < n_prefixed    # rank of each key


def step_prompts(rows, step, P, seed):
    """The P problems of a step: consecutive slices of per-epoch shuffles of the data, so the data
    position is a function of the step alone and a resumed run continues exactly."""
    n, ks = len(rows), range(step * P, (step + 1) * P)
    orders = {e: random.Random(seed + e).sample(range(n), n) for e in {k // n for k in ks}}   # epoch -> shuffle
    return [rows[orders[k // n][k % n]] for k in ks]


def load_problems(spec, flag, tokenizer, template, seed, per_domain_cap=None, limit=None):
    """The problems of `spec` that can be rewarded, each with its prompt tokenised once
    (row["prompt_ids"]). Rows whose gold answer cannot be read are left out, with a warning."""
    rows = load_mixture(spec, per_domain_cap=per_domain_cap, seed=seed)[:limit]
    bad = set(check_gold_answers(rows))
    if bad:
        print0(f"warning: {flag}: {len(bad)} of {len(rows)} gold answers cannot be read; they are left out")
        rows = [r for i, r in enumerate(rows) if i not in bad]
    if not rows:
        raise UserError(f"{flag} {spec}: no problem has a gold answer to reward against")
    ids = tokenizer([format_prompt(r["problem"], template, tokenizer) for r in rows], add_special_tokens=False)
    for r, prompt_ids in zip(rows, ids["input_ids"]):
        r["prompt_ids"] = prompt_ids
    return rows


def memory_plan(args, config, world_size, train_len, generations, device):
    """(micro-batch, checkpointing) for this run, from guard.fit_memory; generations: (rows, tokens
    each) of each generate() call of a step (rollouts, resampled ones, the evaluation), each ending
    with --max-new-tokens."""
    gen_rows, gen_len = max(generations, key=lambda rows_len: rows_len[0] * rows_len[1])
    # a compiled decode (on a GPU) keeps one cache per bucketed shape from step to step
    held = {decode_buckets(rows, tokens) for rows, tokens in generations if rows} if device.type == "cuda" else ()
    need = lambda micro, checkpointing: memory_need(
        config, args.dtype == "bfloat16", world_size, args.fsdp, sampler_copy=not args.fsdp, ref=args.kl_coef > 0,
        train_rows=micro, train_len=train_len, loss_len=args.max_new_tokens, checkpointing=checkpointing,
        gen_rows=gen_rows, gen_len=gen_len, prompt_len=gen_len - args.max_new_tokens, kv_held=held)
    return fit_memory(need, device, args.micro_batch_size, args.activation_checkpointing,
                      "--prompts-per-step x --group-size or --max-new-tokens")


# -----------------------------------------------------------------------------
# Rollouts: one record per step, every per-rollout quantity sliced by the same indices

STATS = ("loss", "tokens", "clipped", "kl", "entropy")        # what the update adds up per rollout

@dataclass
class Rollouts:
    """One step's rollouts on this rank: its groups' G rollouts each, then any resampled ones."""
    problems: list                      # B data rows (each problem G times), prompt ids in each
    prefixes: list                      # B prefixes sampled under: (rows, d) or token ids (rows,), or None
    completions: list                   # B token-id lists, the stop token included
    truncated: torch.Tensor             # (B,) bool: cut at --max-new-tokens
    sources: list                       # B names of the prefix sources ("none": no prefix)
    credit: list                        # B credit rules (credit.py): how each rollout is trained
    group: torch.Tensor                 # (B,) the problem's place in the step, over all ranks
    resampled: torch.Tensor = None      # (B,) bool: drawn by resample.py
    trained: torch.Tensor = None        # (B,) bool: one of its group's G trained rollouts
    texts: list = None                  # B decoded completions                          (score)
    correct: torch.Tensor = None        # (B,) the grader's verdict                      (score)
    rewards: torch.Tensor = None        # (B,) 0 for a cut-off answer                    (score)
    keep: torch.Tensor = None           # (B,) bool: carries loss                        (score)
    advantages: torch.Tensor = None     # (B,), 0 where not trained                      (set_advantages)
    old_logprobs: list = None           # B tensors (|o_i|,) under pi_old, where needed  (update)
    ref_logprobs: list = None           # B tensors (|o_i|,) under pi_ref, if a KL       (update)
    stats: dict = None                  # (B,) float64 sums over the update: each rollout's share of the
                                        # loss, its tokens, clipped tokens, k3 and entropy (update)

    def __post_init__(self):
        B = len(self.completions)
        self.resampled = torch.zeros(B, dtype=torch.bool) if self.resampled is None else self.resampled
        self.trained = ~self.resampled if self.trained is None else self.trained
        self.stats = {k: torch.zeros(B, dtype=torch.float64) for k in STATS} if self.stats is None else self.stats

    def __len__(self):
        return len(self.completions)

    @property
    def train_prefixes(self):
        """The prefix each rollout is trained under: its own, or none where its credit rule says so."""
        return [p if rule.with_prefix else None for p, rule in zip(self.prefixes, self.credit)]

    def batch(self, model, idx, sampled=False):
        """Rollouts idx in the training layout (completion_batch), in the context they are trained
        in, or (sampled=True) the one they were sampled in."""
        prefixes = self.prefixes if sampled else self.train_prefixes
        return completion_batch(model, [self.problems[i]["prompt_ids"] for i in idx],
                                [self.completions[i] for i in idx], [prefixes[i] for i in idx])

    def at_loss_positions(self, per_rollout, idx, loss_mask):
        """Per-rollout token values (B tensors (|o_i|,)) at the loss positions of micro-batch idx (b, T)."""
        out = torch.zeros(loss_mask.shape, dtype=per_rollout[idx[0]].dtype, device=loss_mask.device)
        out[loss_mask] = torch.cat([per_rollout[i] for i in idx]).to(out.device)
        return out

    def trained_in_groups(self, G):
        """Indices of the trained rollouts, group by group (G each; within a group in record order)."""
        rows = self.trained.nonzero()[:, 0]
        return rows[torch.argsort(self.group[rows], stable=True)]


@torch.no_grad()
def sample(sampler, problems, prefixes, groups, keys, rule, source_name, args, eos):
    """One completion of each of `problems` under prefixes[i] (None: no prefix), with the sampling
    noise of keys[i] (model.keyed_uniform); a prefixed rollout is credited by `rule`."""
    out = generate(sampler, [p["prompt_ids"] for p in problems], prefixes, args.max_new_tokens, args.temperature,
                   top_p=args.top_p, stop_tokens=[eos], keys=keys)
    return Rollouts(problems, prefixes, out.token_lists(), truncated=~out.stopped.cpu(),
                    sources=[source_name if p is not None else "none" for p in prefixes],
                    credit=[rule if p is not None else credit.PLAIN for p in prefixes], group=torch.tensor(groups))


def rollout(sampler, source, problems, first_group, n_prefixed, L, step, args, eos):
    """G completions of each problem, n_prefixed of each group under a prefix of its own; group j
    (first_group + its place here) draws from seeds derived from (--seed, step, j) alone."""
    G = args.group_size
    prefixes, groups, keys = [], [], []
    for j in range(first_group, first_group + len(problems)):
        g = torch.Generator().manual_seed(derived_seed(args.seed, step, j, "prefix"))
        drawn = iter(source.sample(n_prefixed, L, g) if n_prefixed else ())          # (n, rows, d)
        prefixes += [next(drawn) if chosen else None for chosen in choose_prefixed(G, n_prefixed, g).tolist()]
        groups += [j] * G
        keys += [derived_seed(args.seed, step, j, "sample", k) for k in range(G)]
    return sample(sampler, [p for p in problems for _ in range(G)], prefixes, groups, keys,
                  credit.CREDIT_RULES[args.credit], source.name if source else "none", args, eos)


def score(rollouts, tokenizer, args):
    """Rewards and the keep mask, in place (the record is returned). A cut-off answer is worth 0 under both --truncated rules
    (where the cut fell would decide its grade); mask also takes it out of the loss."""
    r = rollouts
    r.texts = tokenizer.batch_decode(r.completions, skip_special_tokens=True)
    r.correct = torch.tensor([grade(t, p["answer"], p["grading_kind"]) for t, p in zip(r.texts, r.problems)])
    r.rewards = r.correct.masked_fill(r.truncated, 0.0)                                 # (B,)
    r.keep = ~r.truncated if args.truncated == "mask" else torch.ones_like(r.truncated)
    return r


def set_advantages(r, args):
    """Group advantages on the groups as they will be trained, in place; the estimator reads each
    rollout's reward as its credit rule credits it (credit.credited_rewards)."""
    G, rows = args.group_size, r.trained_in_groups(args.group_size)
    prefixed = torch.tensor([r.prefixes[i] is not None for i in rows.tolist()]).view(-1, G)
    inter = torch.tensor([r.credit[i].inter_weight for i in rows.tolist()], dtype=torch.float64).view(-1, G)
    r.advantages = torch.zeros(len(r))
    r.advantages[rows] = group_advantages(credit.credited_rewards(r.rewards[rows].view(-1, G), prefixed, inter),
                                          args.estimator).flatten().float()


# -----------------------------------------------------------------------------
# The policy update

def compute_dtype(args, device):
    """bf16 compute for a DDP policy with fp32 master weights; FSDP casts its parameters itself."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16" and not args.fsdp)


@torch.no_grad()
def completion_logprobs(model, rollouts, rows, args, sampled=False):
    """log model(o_it | context) for the rollouts `rows`: B entries, a tensor (|o_i|,) at each of
    `rows`. The context is the one each rollout is trained in, or (sampled) the one it was sampled
    in; `model` embeds tokens with its own embeddings (the reference model with its initial ones)."""
    out, device = [None] * len(rollouts), model.embed_tokens.weight.device
    for start in range(0, len(rows), args.micro_batch_size):
        idx = rows[start:start + args.micro_batch_size]
        with compute_dtype(args, device):
            embeds, targets, loss_mask = rollouts.batch(model, idx, sampled)
            logprobs, _ = token_logprobs(model, embeds, targets, loss_mask, args.temperature)
        for i, lp in zip(idx, logprobs[loss_mask].split([len(rollouts.completions[i]) for i in idx])):
            out[i] = lp
    return out


def minibatches(r, G, M):
    """The rollouts of each of M minibatches: the trained rollout at place k of group j goes to
    minibatch (j G + k) mod M, so minibatch m holds the same rollouts on any number of ranks."""
    rows = r.trained_in_groups(G)
    place = r.group[rows] * G + torch.arange(len(rows)) % G
    return [rows[place % M == m].tolist() for m in range(M)]


def minibatch_backward(model, r, rows, args):
    """Accumulate into .grad the gradient of this rank's share of -J on one minibatch, micro-batch by
    micro-batch over its kept rollouts `rows`, and each rollout's share of the loss and its token
    counts into r.stats. The normalisers B' and the token count are means over ranks, because
    sync_gradients averages: after it, .grad is the gradient of -J on the whole minibatch. Returns
    (the minibatch's kept rollouts, its loss), over all ranks."""
    device = model.embed_tokens.weight.device
    world = dist.get_world_size() if dist.is_initialized() else 1
    n_seq, n_tok = all_reduce_mean([len(rows), sum(len(r.completions[i]) for i in rows)], device)
    for start in range(0, len(rows) if n_seq else 0, args.micro_batch_size):
        idx = rows[start:start + args.micro_batch_size]
        if args.fsdp:
            fsdp.gather_root(model)          # embed_rows and the log-probs read the root's weights
        with compute_dtype(args, device):
            embeds, targets, loss_mask = r.batch(model, idx)
            logprobs, entropy = token_logprobs(model, embeds, targets, loss_mask, args.temperature)  # (b, T)
        old = logprobs.detach() if r.old_logprobs is None else r.at_loss_positions(r.old_logprobs, idx, loss_mask)
        ref = None if r.ref_logprobs is None else r.at_loss_positions(r.ref_logprobs, idx, loss_mask)
        weights = loss_token_weights(loss_mask, args.aggregation, n_seq, n_tok, args.max_new_tokens, logprobs.dtype)
        advantages = r.advantages[idx].to(device)
        loss, stats = policy_loss(logprobs, old, advantages, weights, args.clip_eps_low, args.clip_eps_high, ref,
                                  args.kl_coef, entropy, args.entropy_coef,
                                  shaped=torch.tensor([r.credit[i].shaped for i in idx], device=device))
        distilled = [k for k, i in enumerate(idx) if r.credit[i].distill_coef]   # nudge: into the bare prompt
        if distilled:
            with compute_dtype(args, device):
                extra, per_row = credit.distillation_loss(model, [r.problems[idx[k]]["prompt_ids"] for k in distilled],
                                                          [r.completions[idx[k]] for k in distilled],
                                                          advantages[distilled], [r.credit[idx[k]].distill_coef
                                                                                  for k in distilled], n_seq, args.temperature)
            loss = loss + extra
            stats["loss"][distilled] += per_row.cpu()
        loss.backward()
        for key, value in stats.items():     # each rollout's share: the ranks' losses are averaged
            r.stats[key][idx] += value.cpu() / (world if key == "loss" else 1)
    return n_seq * world, all_reduce_sum([float(r.stats["loss"][rows].sum())], device)[0]


def update_policy(model, sampler, opt, ref_model, rollouts, args):
    """E epochs x M minibatches of optimiser steps on one step's rollouts; returns the update's
    metrics. A non-finite loss or gradient norm raises FloatingPointError before opt.step."""
    r, device = rollouts, model.embed_tokens.weight.device
    model.train()
    trained = (r.trained & r.keep).nonzero()[:, 0].tolist()
    # pi_old: the policy before the first update, in the context each rollout was sampled in. With
    # one update per batch and every rollout trained in its sampling context, it is pi itself.
    retrained = any(t is not p for t, p in zip(r.train_prefixes, r.prefixes))
    if args.epochs * args.minibatches > 1 or retrained:
        r.old_logprobs = completion_logprobs(model, r, trained, args, sampled=True)
    if ref_model is not None:
        r.ref_logprobs = completion_logprobs(ref_model, r, trained, args)
    grad_norms = []
    for _ in range(args.epochs):
        for minibatch in minibatches(r, args.group_size, args.minibatches):
            n_seq, loss = minibatch_backward(model, r, [i for i in minibatch if r.keep[i]], args)
            if n_seq == 0:
                continue                         # nothing kept on any rank: no optimiser step
            if not args.fsdp:                    # FSDP reduce-scatters during backward instead
                sync_gradients(model)            # the one place ranks synchronise
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            grad_norm = float(fsdp.full_value(grad_norm) if args.fsdp else grad_norm)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise FloatingPointError(f"non-finite loss or gradient norm (loss {loss:.4g}, "
                                         f"gradient norm {grad_norm:.4g})")
            opt.step()
            opt.zero_grad(set_to_none=True)
            grad_norms.append(grad_norm)
    if sampler is not model:                     # the bf16 copy that samples the next rollouts
        with torch.no_grad():
            for s, p in zip(sampler.parameters(), model.parameters()):
                s.copy_(p)
    total = dict(zip(r.stats, all_reduce_sum([float(v.sum()) for v in r.stats.values()], device)))
    per_token = lambda key: total[key] / total["tokens"] if total["tokens"] else None
    return {"loss": total["loss"] / max(len(grad_norms), 1),            # -J, mean over the optimiser steps
            "grad_norm": sum(grad_norms) / max(len(grad_norms), 1),      # before clipping, mean over them
            "updates": len(grad_norms), "clip_frac": per_token("clipped"), "entropy": per_token("entropy"),
            **({"kl": per_token("kl")} if ref_model is not None else {})}


# -----------------------------------------------------------------------------
# What a user watches: one record per step, decoded samples, checkpoints

def rollout_metrics(r, G, device):
    """Means over every on-policy rollout of every rank, from sums (ranks hold different numbers of
    prefixed rollouts)."""
    prefixed = torch.tensor([p is not None for p in r.prefixes])                       # (B,)
    grouped = r.rewards.view(-1, G)                                                     # (p, G)
    local = {"n": len(r), "reward": r.rewards.sum(), "reward_sq": r.rewards.square().sum(),
             "correct": r.correct.sum(), "truncated": r.truncated.sum(),
             "tokens": sum(len(c) for c in r.completions), "groups": len(grouped),
             "zero_variance": (grouped == grouped[:, :1]).all(1).sum(), "prefixed": prefixed.sum(),
             "reward_prefixed": r.rewards[prefixed].sum()}
    s = dict(zip(local, all_reduce_sum([float(v) for v in local.values()], device)))
    n, n_pre, mean = s["n"], s["prefixed"], s["reward"] / s["n"]
    return {"reward_mean": mean, "reward_std": math.sqrt(max(s["reward_sq"] - n * mean ** 2, 0.0) / max(n - 1, 1)),
            "accuracy": s["correct"] / n, "zero_variance_frac": s["zero_variance"] / s["groups"],
            "completion_len": s["tokens"] / n, "truncated_frac": s["truncated"] / n,
            "reward_prefixed": s["reward_prefixed"] / n_pre if n_pre else None,
            "reward_plain": (s["reward"] - s["reward_prefixed"]) / (n - n_pre) if n > n_pre else None,
            "rollouts_generated": round(n), "gen_tokens": s["tokens"]}


def log_samples(run, step, r, args):
    """Decoded rollouts of every rank as generated and trained, each with what it added to the
    update (update_*: sums over its updates): --samples-per-step of them spread over the step's
    rollouts, or every one (0), so that metrics.jsonl can be recomputed from them."""
    mine = [{"step": step, "group": int(r.group[i]), "problem": r.problems[i]["problem"], "completion": r.texts[i],
             "tokens": len(r.completions[i]), "reward": r.rewards[i].item(), "correct": r.correct[i].item(),
             "truncated": bool(r.truncated[i]), "kept": bool(r.keep[i]), "prefix_source": r.sources[i],
             "prefix_rows": 0 if r.prefixes[i] is None else len(r.prefixes[i]),
             "credit": None if r.prefixes[i] is None else r.credit[i].name,
             "trained_with_prefix": r.train_prefixes[i] is not None, "resampled": bool(r.resampled[i]),
             "trained": bool(r.trained[i]), "advantage": r.advantages[i].item(),
             **{f"update_{k}": float(v[i]) for k, v in r.stats.items()}} for i in range(len(r))]
    records = gather_objects(mine)
    n = len(records) if not args.samples_per_step else min(args.samples_per_step, len(records))
    for k in range(n if run.master else 0):
        run.log(records[k * len(records) // n], name="samples.jsonl")


def checkpoint(run, step, model, opt, args):
    """checkpoint-{step}: weights and optimiser state (every random draw is a function of --seed and
    the step, so no RNG state is needed). Non-finite weights are never written: the run stops, and
    the checkpoints already there are kept. Returns the whole model (under --fsdp gathered on rank 0)."""
    finite = all(fsdp.local(p.detach()).isfinite().all() for p in model.parameters())
    if all_reduce_mean([float(finite)], model.embed_tokens.weight.device)[0] < 1.0:
        raise UserError(f"non-finite weights after step {step - 1}, so no checkpoint is written; "
                        f"{kept_note(run.path)}; lower --lr or use --dtype float32")
    whole, opt_state = fsdp.whole(model, opt) if args.fsdp else (model, opt.state_dict())
    if run.master:
        save_checkpoint(run.path, step, whole, opt_state, keep=args.keep_checkpoints)
    if dist.is_initialized():
        dist.barrier()
    return whole


def resume(run, opt, model, args):
    """Load the newest checkpoint's optimiser state; returns its step."""
    trainer, opt_state = load_checkpoint(run.checkpoint, key=str if args.fsdp else int)
    try:
        fsdp.load_optimizer_state(model, opt, opt_state) if args.fsdp else opt.load_state_dict(opt_state)
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"{run.checkpoint}: its optimiser state does not fit this model ({e}); resume "
                        "with the flags that wrote it") from None
    print0(f"resumed from {run.checkpoint} at step {trainer['step']}")
    return trainer["step"]


class Stopwatch:
    """Seconds spent in each phase of a step: lap("generate") ends the phase begun by the last lap."""

    def __init__(self):
        self.t, self.laps = time.perf_counter(), {}

    def lap(self, name):
        now = time.perf_counter()
        self.laps[f"time_{name}"], self.t = now - self.t, now


def main(argv=None):
    args = parser.parse_args(argv)
    ddp, rank, world_size, device = compute_init()
    check_args(args, world_size)
    if args.fsdp and not ddp:
        raise UserError("--fsdp shards over ranks: launch with torchrun --nproc_per_node N, or leave --fsdp out")
    seed_everything(args.seed)

    # -- the tokenizer, the data and the memory plan, checked before anything is written or loaded
    path = resolve_checkpoint(args.model)
    config, bf16 = load_config(path), args.dtype == "bfloat16"
    tokenizer = load_tokenizer(path, config.vocab_size)
    eos = tokenizer.eos_token_id
    for line in diagnostics.warmup_notes(config.warmup, args.prefix_source if args.schedule != "none" else "none", args.L):
        print0(line)
    E = load_embedding_matrix(path)            # prefixes at the starting policy's scale, also on resume
    build = lambda name: make_prefix_source(name, E, tokenizer, args.vae, args.region, args.tie, args.seed)
    source = build(args.prefix_source) if args.schedule != "none" else None
    extra = build(args.resample_source) if args.resample else None
    rows = load_problems(args.data, "--data", tokenizer, args.template, args.seed, args.per_domain_cap)
    prefix_rows, extra_rows = source.rows(args.L) if source else 0, extra.rows(args.resample_L) if extra else 0
    context = config.max_position_embeddings
    longest = check_fits_context(rows, max(prefix_rows, extra_rows) + args.max_new_tokens,
                                 f"prompt + {max(prefix_rows, extra_rows)}-row prefix + --max-new-tokens", "--data", context)
    eval_rows = []
    if args.eval_data:       # the same held-out problems whatever --seed
        eval_rows = load_problems(args.eval_data, "--eval-data", tokenizer, args.template, HELD_OUT_SEED,
                                  limit=args.eval_problems)
        check_fits_context(eval_rows, args.max_new_tokens, "prompt + --max-new-tokens", "--eval-data", context)
    per_rank, new = args.prompts_per_step // world_size, args.max_new_tokens
    args.micro_batch_size, checkpointing = memory_plan(args, config, world_size, longest + max(prefix_rows, extra_rows) + new, [
        (per_rank * args.group_size, longest + prefix_rows + new), (per_rank * args.resample, longest + extra_rows + new),
        (-(-len(eval_rows) // world_size), max([len(r["prompt_ids"]) for r in eval_rows], default=0) + new)], device)
    run = RunDir(args.out, args, resume=args.resume)       # lock, the newest checkpoint, args.json

    # -- the policy (fp32 master weights), its bf16 sampler, the reference
    model = Transformer.from_pretrained(f"{run.checkpoint}/model" if run.checkpoint else path, device)
    model.source_dir = path              # tokenizer files are copied from --model, also on resume
    model.gradient_checkpointing = checkpointing
    # the initial checkpoint as loaded, in fp32 like the policy, so that both take the same path (autocast,
    # fp32 logits) and k3 is 0 before the first update; under --fsdp the policy computes with bf16 weights
    ref_model = Transformer.from_pretrained(args.model, device, torch.bfloat16 if bf16 and args.fsdp else torch.float32) \
        .eval().requires_grad_(False) if args.kl_coef > 0 else None
    if args.fsdp:
        fsdp.shard(model, bf16)          # the optimiser below then holds only this rank's shards
    sampler = model
    if bf16 and not args.fsdp:           # rollouts read a bf16 copy, refreshed after each update
        sampler = copy.deepcopy(model).to(torch.bfloat16).requires_grad_(False)
        sampler.inv_freq = model.inv_freq                                # RoPE's frequencies stay fp32
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            betas=(0.9, 0.99), fused=device.type == "cuda")
    start = resume(run, opt, model, args) if run.checkpoint else 0
    run.begin(start)                     # args.json, and the logs of the steps before `start`
    evaluate = lambda: evaluate_greedy(sampler, tokenizer, eval_rows[rank::world_size], args, device)

    # -- the loop: rollout -> score -> update -> log
    history = []
    bar = progress(range(start, args.steps), "rl", total=args.steps, initial=start)
    for step in bar:
        if args.fsdp:
            fsdp.gather_all(model)           # rollouts (and evaluation) read whole weights
        n_prefixed, L = prefix_plan(args.schedule, step / args.steps, args.group_size, args.rho, args.L)
        lr = args.lr * min(1.0, (step + 1) / max(args.warmup_steps, 1))
        for group in opt.param_groups:
            group["lr"] = lr
        record = {"step": step, "tau": step / args.steps, "lr": lr, "rho": n_prefixed / args.group_size, "L": L}
        if eval_rows and args.eval_every and step % args.eval_every == 0:
            record["eval_pass1"] = evaluate()
        clock = Stopwatch()
        problems = step_prompts(rows, step, args.prompts_per_step, args.seed)[rank * per_rank:(rank + 1) * per_rank]
        rollouts = rollout(sampler, source, problems, rank * per_rank, n_prefixed, L, step, args, eos)
        clock.lap("generate")
        score(rollouts, tokenizer, args)
        record.update(rollout_metrics(rollouts, args.group_size, device))       # the on-policy rollouts
        if args.resample:                                                       # LoPE's regrouping
            rollouts = resample.regroup_failed(rollouts, extra, record, step, args, device, lambda *a: score(
                sample(sampler, *a, args, eos), tokenizer, args))
        set_advantages(rollouts, args)
        clock.lap("score")
        try:
            record.update(update_policy(model, sampler, opt, ref_model, rollouts, args))
        except FloatingPointError as e:
            raise UserError(f"{e} at step {step}; stopped before the optimiser step; {kept_note(run.path)}; "
                            "lower --lr or check the data") from None
        clock.lap("update")
        log_step(run, record, clock.laps, rollouts, history, bar, args)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            checkpoint(run, step + 1, model, opt, args)

    if eval_rows:
        if args.fsdp:
            fsdp.gather_all(model)
        final = evaluate()
        run.log({"step": args.steps, "eval_pass1": final})
        print0(f"held-out greedy pass@1 after RL: {final:.3f}")
    if not args.fsdp:                    # sharded ranks hold different parts by design
        check_ranks_in_sync(model)
    whole = checkpoint(run, args.steps, model, opt, args)
    if run.master:
        whole.save_pretrained(run.file("model"))
        print0(f"saved {run.file('model')}")


def log_step(run, record, laps, rollouts, history, bar, args):
    """One record in metrics.jsonl, decoded samples now and then, warnings, the progress bar."""
    record.update(laps, gen_tokens_per_s=record.pop("gen_tokens") / max(laps["time_generate"], 1e-9))
    run.log(record)
    history.append(record)
    for line in diagnostics.training_warnings(history):
        print0(line)
    bar.set_postfix(reward=f"{record['reward_mean']:.3f}", rho=f"{record['rho']:.2f}")
    if args.sample_every and record["step"] % args.sample_every == 0:
        log_samples(run, record["step"], rollouts, args)


@torch.no_grad()
def evaluate_greedy(model, tokenizer, mine, args, device):
    """Held-out greedy pass@1 without prefix (a cut-off answer counts 0), problems sharded over
    ranks."""
    correct = 0.0
    if mine:
        out = generate(model, [r["prompt_ids"] for r in mine], None, args.max_new_tokens, temperature=0,
                       stop_tokens=[tokenizer.eos_token_id])
        texts = tokenizer.batch_decode(out.token_lists(), skip_special_tokens=True)
        correct = sum(grade(t, r["answer"], r["grading_kind"]) * done
                      for t, r, done in zip(texts, mine, out.stopped.tolist()))
    total, n = all_reduce_sum([correct, len(mine)], device)
    return total / max(n, 1e-9)


if __name__ == "__main__":
    run_main(main)
