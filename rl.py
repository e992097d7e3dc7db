r"""Stage 3: GRPO / RLOO with latent-guided exploration (Reasoning Palette).

One step reads rollout -> score -> update -> log:

    rollout  P prompts (sharded over ranks; a group never spans ranks), G completions of each.
             The schedule decides how many rollouts of each group carry a prefix, and
             choose_prefixed which ones: each of those draws its OWN latent z, decoded into L
             prefix embeddings placed before the prompt; the rest get none. The prefix is stored
             with its rollout, so every later log-prob is computed in the context it was sampled in.
    score    rewards from the grader (a cut-off answer is worth 0), group advantages.
    update   update_policy: E epochs x M minibatches of optimiser steps on the batch.
    log      one record per step in metrics.jsonl.

The objective, per minibatch (sum over completion tokens t of the kept rollouts i):

    J = sum_it w_it * [ min(r_it * A_i, clip(r_it, 1 - eps_low, 1 + eps_high) * A_i)
                        - kl_coef * k3_it + entropy_coef * H_it ]
    r_it  = pi(o_it | p_i, q, o_i<t) / pi_old(o_it | p_i, q, o_i<t), both from training forward
            passes at the sampling temperature; pi_old is the policy before the batch's first
            update (so r = 1 with one update per batch); the sampler's own log-probs are never used
    A_i   = grpo:   (R_i - mean_g R) / (std_g R + 1e-6), std with Bessel's correction
            rloo:   R_i - mean of the other G - 1 rewards of the group
            drgrpo: R_i - mean_g R
            (a group with equal rewards has A = 0 and is counted as zero-variance)
    k3_it = exp(ref - logp) - (ref - logp) - 1, ref = log pi_ref(o_it | p_i, q, o_i<t) under the
            checkpoint --model as loaded (its own embeddings, the same prefix vectors p_i);
            kl_coef = 0 by default, and then no reference model is loaded at all
    H_it  = the entropy of the policy's next-token distribution at the sampling temperature
    w_it  = token-mean: 1 / (kept completion tokens of the minibatch); seq-mean: 1 / (B' |o_i|);
            constant: 1 / (B' * max_new_tokens) (Dr. GRPO); B' = kept rollouts of the minibatch.
            Every rollout is kept, except cut-off ones under --truncated mask.
Each rank splits its rollouts into M contiguous minibatches (minibatch m of a step is the union
over ranks, and the counts above are over all ranks) and each minibatch into micro-batches of
--micro-batch-size kept rollouts; the gradient accumulated over micro-batches and ranks is the
gradient of -J on the whole minibatch (tests/test_rl_losses.py checks this in float64).

GRPO here is DeepSeekMath's with asymmetric clipping (DAPO), no KL by default and token-mean
aggregation; RLOO is used with the same clipped surrogate (RLOO proper is plain REINFORCE:
--epochs 1 --minibatches 1). docs/trl_differences.md lists where the conventions differ from
TRL's GRPOTrainer. Schedules, rho(tau) over progress tau = step / steps (the table SCHEDULES):
none (baseline); two-stage (every rollout prefixed while tau < 0.5, none after); linear
(rho = 1 - tau); constant (--rho). round(rho * G) rollouts of each group, halves rounded up, get
an L-token prefix. Zero-advantage resampling (--resample, LoPE's rule with any prefix source) is
off the main path, in resample.py; docs/resampling.md states its rule. Sharding (--fsdp) is in
fsdp.py; docs/fsdp.md gives the memory per GPU.

Toy world:
    python rl.py --model runs/toy/sft/model --vae runs/toy/vae --schedule linear --L 1 \
        --data runs/toy/data/math_train.jsonl --eval-data runs/toy/data/math_test.jsonl --out runs/toy/rl_linear
    python rl.py --model runs/toy/sft_plain/model --schedule none ... --out runs/toy/rl_none
8 GPUs:
    torchrun --nproc_per_node 8 rl.py --model runs/sft-qwen3-4b/model --vae runs/vae-qwen3-4b \
        --schedule linear --L 8 --data math=../shared/data/gsm8k_train.jsonl --template math \
        --prompts-per-step 64 --group-size 8 --max-new-tokens 1024 --dtype bfloat16 --out runs/rl-qwen3-4b
Resume a killed run from its newest checkpoint: the same command with --resume.
"""

import argparse
import math
import random
import time
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

import diagnostics
import fsdp
import resample
from common import (RunDir, all_reduce_mean, check_ranks_in_sync, compute_init, latest_checkpoint,
                    load_checkpoint, print0, progress, rng_state, run_main, save_checkpoint,
                    seed_everything, set_rng_state, sync_gradients)
from data import TEMPLATES, check_gold_answers, format_prompt, grade, load_mixture
from guard import SEED, ArgumentParser, UserError, check_fits_context, check_fits_memory, ranged
from model import (ADVANTAGE_ESTIMATORS, LOSS_AGGREGATIONS, Transformer, add_prefix_arguments,
                   check_prefix_sources, completion_batch, generate, group_advantages,
                   load_embedding_matrix, load_policy, loss_token_weights, make_prefix_source,
                   policy_loss, token_logprobs)

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
parser.add_argument("--eval-problems", type=ranged(int, 1), default=200)
parser.add_argument("--eval-every", type=ranged(int, 0), default=10, help="steps between evaluations (0: at the end)")
# Model
parser.add_argument("--model", required=True, help="hub id or checkpoint directory (after sft_warmup.py)")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
parser.add_argument("--activation-checkpointing", action="store_true", help="recompute layers in backward")
parser.add_argument("--fsdp", action="store_true", help="shard weights, gradients and optimiser state "
                    "over ranks (FSDP2, fsdp.py) instead of replicating them (DDP)")
# Palette
parser.add_argument("--schedule", default="linear", choices=list(SCHEDULES))
parser.add_argument("--rho", type=ranged(float, 0, 1), default=0.5, help="prefixed fraction of each group (constant)")
add_prefix_arguments(parser, L=8, L_help="prefix tokens of a prefixed rollout")   # --prefix-source --vae --region --L --tie
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
parser.add_argument("--micro-batch-size", type=ranged(int, 1), default=32, help="rollouts per forward/backward")
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
                    help="rollouts written at such a step, spread over the batch (0: every rollout)")
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
    if args.fsdp and args.truncated == "mask":
        raise UserError("--fsdp needs the same number of micro-batches on every rank (each is a collective), "
                        "which --truncated mask does not give; use --truncated zero")
    used = [("--prefix-source", args.prefix_source)] if args.schedule != "none" else []
    check_prefix_sources(used + resample.check_args(args, parser), args.vae, args.region, args.tie)


def prefix_plan(schedule, tau, G, rho, L):
    """(rollouts of each group that carry a prefix, prefix length) at progress tau in [0, 1)."""
    n_prefixed = math.floor(SCHEDULES[schedule](tau, rho) * G + 0.5) if L > 0 else 0   # halves round up
    return n_prefixed, L if n_prefixed else 0


def choose_prefixed(n_groups, G, n_prefixed, generator):
    """Which rollouts carry a prefix: n_prefixed of each group of G, chosen uniformly at random so
    that a rollout's place in its group says nothing. Returns a bool tensor (n_groups * G,)."""
    keys = torch.rand(n_groups, G, generator=generator)                          # (n_groups, G)
    return (keys.argsort(dim=1).argsort(dim=1) < n_prefixed).flatten()           # rank in group


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


# -----------------------------------------------------------------------------
# Rollouts: one record per step, every per-rollout quantity sliced by the same indices

@dataclass
class Rollouts:
    """One step's rollouts on this rank: B = problems x G, group j in rows j*G .. j*G + G - 1."""
    problems: list                      # B data rows (each problem G times), prompt ids in each
    prefixes: list                      # B prefixes sampled under: (rows, d) or token ids (rows,), or None
    completions: list                   # B token-id lists, the stop token included
    truncated: torch.Tensor             # (B,) bool: cut at --max-new-tokens
    sources: list                       # B names of the prefix sources ("none": no prefix)
    train_prefixes: list = None         # B prefixes trained under (resample.py's credit rules); = prefixes
    shaped: torch.Tensor = None         # (B,) bool: LoPE's shaped term replaces the clipped one
    resampled: torch.Tensor = None      # (B,) bool: drawn by resample.py
    texts: list = None                  # B decoded completions                          (score)
    correct: torch.Tensor = None        # (B,) the grader's verdict                      (score)
    rewards: torch.Tensor = None        # (B,) 0 for a cut-off answer                    (score)
    keep: torch.Tensor = None           # (B,) bool: carries loss                        (score)
    advantages: torch.Tensor = None     # (B,)                                           (set_advantages)
    old_logprobs: list = None           # B tensors (|o_i|,) under pi_old, where needed  (update)
    ref_logprobs: list = None           # B tensors (|o_i|,) under pi_ref, if a KL       (update)

    def __post_init__(self):
        B = len(self.completions)
        self.train_prefixes = list(self.prefixes) if self.train_prefixes is None else self.train_prefixes
        self.shaped = torch.zeros(B, dtype=torch.bool) if self.shaped is None else self.shaped
        self.resampled = torch.zeros(B, dtype=torch.bool) if self.resampled is None else self.resampled

    def __len__(self):
        return len(self.completions)

    def select(self, idx):
        """A new record of rollouts idx: every per-rollout field sliced by the same indices."""
        pick = lambda v: None if v is None else v[torch.tensor(idx, dtype=torch.long)] \
            if torch.is_tensor(v) else [v[i] for i in idx]
        return Rollouts(**{f.name: pick(getattr(self, f.name)) for f in fields(self)})

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


@torch.no_grad()
def sample(model, problems, prefixes, source_name, args, generators, eos):
    """One completion of each of `problems` under prefixes[i] (None: no prefix)."""
    model.eval()
    out = generate(model, [p["prompt_ids"] for p in problems], prefixes, args.max_new_tokens,
                   args.temperature, top_p=args.top_p, stop_tokens=[eos], generator=generators["sample"])
    return Rollouts(problems, prefixes, out.token_lists(), truncated=~out.stopped.cpu(),
                    sources=[source_name if p is not None else "none" for p in prefixes])


def rollout(model, source, problems, n_prefixed, L, args, generators, eos):
    """G completions of each problem, n_prefixed of each group under a prefix of its own."""
    G = args.group_size
    rows = [p for p in problems for _ in range(G)]
    prefixes = [None] * len(rows)
    if n_prefixed:
        chosen = choose_prefixed(len(problems), G, n_prefixed, generators["choice"]).nonzero()[:, 0]
        for i, prefix in zip(chosen.tolist(), source.sample(len(chosen), L, generators["prefix"])):
            prefixes[i] = prefix                                                  # (rows, d)
    return sample(model, rows, prefixes, source.name if source else "none", args, generators, eos)


def score(rollouts, tokenizer, args):
    """Rewards and the keep mask, in place (the record is returned). A cut-off answer is worth 0 under both --truncated rules
    (where the cut fell would decide its grade); mask also takes it out of the loss."""
    r = rollouts
    r.texts = tokenizer.batch_decode(r.completions, skip_special_tokens=True)
    r.correct = torch.tensor([grade(t, p["answer"], p["grading_kind"]) for t, p in zip(r.texts, r.problems)])
    r.rewards = r.correct.masked_fill(r.truncated, 0.0)                                 # (B,)
    r.keep = ~r.truncated if args.truncated == "mask" else torch.ones_like(r.truncated)
    return r


def set_advantages(rollouts, args):
    """Group advantages, in place, on the groups as they will be trained."""
    rollouts.advantages = group_advantages(rollouts.rewards.view(-1, args.group_size), args.estimator).flatten()


# -----------------------------------------------------------------------------
# The policy update

@torch.no_grad()
def completion_logprobs(model, rollouts, rows, args, sampled=False):
    """log model(o_it | context) for the rollouts `rows`: B entries, a tensor (|o_i|,) at each of
    `rows`. The context is the one each rollout is trained in, or (sampled) the one it was sampled
    in; `model` embeds tokens with its own embeddings (the reference model with its initial ones)."""
    out = [None] * len(rollouts)
    for start in range(0, len(rows), args.micro_batch_size):
        idx = rows[start:start + args.micro_batch_size]
        embeds, mask, targets, loss_mask = rollouts.batch(model, idx, sampled)
        logprobs, _ = token_logprobs(model, embeds, mask, targets, loss_mask, args.temperature)
        for i, lp in zip(idx, logprobs[loss_mask].split([len(rollouts.completions[i]) for i in idx])):
            out[i] = lp
    return out


def minibatch_backward(model, rollouts, rows, args):
    """Accumulate into .grad the gradient of this rank's share of -J on one minibatch, micro-batch
    by micro-batch over its kept rollouts `rows`. The normalisers B' and the token count are means
    over ranks, because sync_gradients averages: after it, .grad is the gradient of -J on the whole
    minibatch. Returns sums for the metrics; sequences == 0 means no rank kept a rollout."""
    device = model.embed_tokens.weight.device
    n_seq, n_tok = all_reduce_mean([len(rows), sum(len(rollouts.completions[i]) for i in rows)], device)
    sums = {"sequences": n_seq, "loss": 0.0, "tokens": 0, "clipped": 0.0, "kl": 0.0, "entropy": 0.0}
    for start in range(0, len(rows) if n_seq else 0, args.micro_batch_size):
        idx = rows[start:start + args.micro_batch_size]
        if args.fsdp:
            fsdp.gather_root(model)          # embed_rows and the log-probs read the root's weights
        embeds, mask, targets, loss_mask = rollouts.batch(model, idx)
        logprobs, entropy = token_logprobs(model, embeds, mask, targets, loss_mask, args.temperature)  # (b, T)
        old = logprobs.detach() if rollouts.old_logprobs is None else \
            rollouts.at_loss_positions(rollouts.old_logprobs, idx, loss_mask)                      # pi_old
        ref = None if rollouts.ref_logprobs is None else \
            rollouts.at_loss_positions(rollouts.ref_logprobs, idx, loss_mask)
        weights = loss_token_weights(loss_mask, args.aggregation, n_seq, n_tok, args.max_new_tokens, logprobs.dtype)
        loss, stats = policy_loss(logprobs, old, rollouts.advantages[idx].to(device), weights, args.clip_eps_low,
                                  args.clip_eps_high, ref, args.kl_coef, entropy, args.entropy_coef,
                                  shaped=rollouts.shaped[idx].to(device))
        loss.backward()
        sums["loss"] += loss.item()
        sums["tokens"] += stats["tokens"]
        for k in ("clipped", "kl", "entropy"):
            sums[k] += stats.get(k, 0.0) * stats["tokens"]
    return sums


def update_policy(model, opt, ref_model, rollouts, args):
    """E epochs x M minibatches of optimiser steps on one step's rollouts; returns the update's
    metrics. A non-finite loss or gradient norm raises FloatingPointError before opt.step."""
    device = model.embed_tokens.weight.device
    model.train()
    kept = rollouts.keep.nonzero()[:, 0].tolist()
    # pi_old: the policy before the first update, in the context each rollout was sampled in. With
    # one update per batch and every rollout trained in its sampling context, it is pi itself.
    retrained = any(t is not p for t, p in zip(rollouts.train_prefixes, rollouts.prefixes))
    if args.epochs * args.minibatches > 1 or retrained:
        rollouts.old_logprobs = completion_logprobs(model, rollouts, kept, args, sampled=True)
    if ref_model is not None:
        rollouts.ref_logprobs = completion_logprobs(ref_model, rollouts, kept, args)
    totals = dict.fromkeys(("loss", "grad_norm", "updates", "tokens", "clipped", "kl", "entropy"), 0.0)
    for _ in range(args.epochs):
        for minibatch in torch.arange(len(rollouts)).tensor_split(args.minibatches):
            sums = minibatch_backward(model, rollouts, [i for i in minibatch.tolist() if rollouts.keep[i]], args)
            if sums["sequences"] == 0:
                continue                         # nothing kept on any rank: no optimiser step
            if not args.fsdp:                    # FSDP reduce-scatters during backward instead
                sync_gradients(model)            # the one place ranks synchronise
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            grad_norm = float(fsdp.full_value(grad_norm) if args.fsdp else grad_norm)
            loss = all_reduce_mean([sums["loss"]], device)[0]
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise FloatingPointError(f"non-finite loss or gradient norm (loss {loss:.4g}, "
                                         f"gradient norm {grad_norm:.4g})")
            opt.step()
            opt.zero_grad(set_to_none=True)
            for k, v in dict(sums, loss=loss, grad_norm=grad_norm, updates=1).items():
                totals[k] = totals.get(k, 0.0) + v
    tokens, clipped, kl, entropy = all_reduce_mean([totals[k] for k in ("tokens", "clipped", "kl", "entropy")], device)
    per_token = lambda s: s / tokens if tokens else None
    updates = max(totals["updates"], 1)
    return {"loss": totals["loss"] / updates,                  # -J, mean over the optimiser steps
            "grad_norm": totals["grad_norm"] / updates,        # before clipping, mean over them
            "updates": int(totals["updates"]), "clip_frac": per_token(clipped), "entropy": per_token(entropy),
            **({"kl": per_token(kl)} if ref_model is not None else {})}


# -----------------------------------------------------------------------------
# What a user watches: one record per step, decoded samples, checkpoints

def rollout_metrics(r, G, device):
    """Means over every rollout of every rank, from sums (ranks hold different numbers of prefixed
    rollouts)."""
    prefixed = torch.tensor([p is not None for p in r.prefixes])                       # (B,)
    grouped = r.rewards.view(-1, G)                                                     # (p, G)
    local = {"n": len(r), "reward": r.rewards.sum(), "reward_sq": r.rewards.square().sum(),
             "correct": r.correct.sum(), "truncated": r.truncated.sum(),
             "tokens": sum(len(c) for c in r.completions), "groups": len(grouped),
             "zero_variance": (grouped == grouped[:, :1]).all(1).sum(), "prefixed": prefixed.sum(),
             "reward_prefixed": r.rewards[prefixed].sum()}
    world = dist.get_world_size() if dist.is_initialized() else 1
    s = {k: v * world for k, v in zip(local, all_reduce_mean([float(v) for v in local.values()], device))}
    n, n_pre, mean = s["n"], s["prefixed"], s["reward"] / s["n"]
    return {"reward_mean": mean, "reward_std": math.sqrt(max(s["reward_sq"] - n * mean ** 2, 0.0) / max(n - 1, 1)),
            "accuracy": s["correct"] / n, "zero_variance_frac": s["zero_variance"] / s["groups"],
            "completion_len": s["tokens"] / n, "truncated_frac": s["truncated"] / n,
            "reward_prefixed": s["reward_prefixed"] / n_pre if n_pre else None,
            "reward_plain": (s["reward"] - s["reward_prefixed"]) / (n - n_pre) if n > n_pre else None,
            "rollouts_generated": round(n), "gen_tokens": s["tokens"]}


def log_samples(run, step, r, args):
    """A few decoded rollouts as trained (after any regrouping), or every one (--samples-per-step 0)."""
    shown = list(range(0, len(r), max(1, len(r) // args.samples_per_step))) if args.samples_per_step else range(len(r))
    for i in shown:
        run.log({"step": step, "problem": r.problems[i]["problem"], "completion": r.texts[i],
                 "reward": r.rewards[i].item(), "prefix_source": r.sources[i], "resampled": bool(r.resampled[i]),
                 "prefix_rows": 0 if r.prefixes[i] is None else len(r.prefixes[i]),
                 "trained_with_prefix": r.train_prefixes[i] is not None}, name="samples.jsonl")


def checkpoint(run, step, model, opt, generators, args):
    """checkpoint-{step}: weights, optimiser, every rank's RNG states. Non-finite weights are never
    written: the run stops, and the checkpoints already there are kept. Returns the whole model
    (under --fsdp gathered on rank 0)."""
    finite = all(fsdp.local(p.detach()).isfinite().all() for p in model.parameters())
    if all_reduce_mean([float(finite)], model.embed_tokens.weight.device)[0] < 1.0:
        raise UserError(f"non-finite weights after step {step - 1}, so no checkpoint is written; "
                        f"{kept_note(run)}; lower --lr or use --dtype float32")
    state = {"global": rng_state(), **{k: g.get_state().tolist() for k, g in generators.items()}}
    states = [state]
    if dist.is_initialized():
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, state)
    whole, opt_state = fsdp.whole(model, opt) if args.fsdp else (model, opt.state_dict())
    if run.master:
        save_checkpoint(run.path, step, whole, opt_state, {"rng": states}, keep=args.keep_checkpoints)
    if dist.is_initialized():
        dist.barrier()
    return whole


def resume(run, opt, model, generators, rank, args):
    """Load the newest checkpoint's optimiser state and RNG states; returns its step."""
    trainer, opt_state = load_checkpoint(run.checkpoint, key=str if args.fsdp else int)
    try:
        fsdp.load_optimizer_state(model, opt, opt_state) if args.fsdp else opt.load_state_dict(opt_state)
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"{run.checkpoint}: its optimiser state does not fit this model ({e}); resume "
                        "with the flags that wrote it") from None
    set_rng_state(trainer["rng"][rank]["global"])
    for name, g in generators.items():
        g.set_state(torch.tensor(trainer["rng"][rank][name], dtype=torch.uint8))
    print0(f"resumed from {run.checkpoint} at step {trainer['step']}")
    return trainer["step"]


def kept_note(run):
    last = latest_checkpoint(run.path)
    return f"the last checkpoint, {last}, is kept" if last else "no checkpoint had been written yet"


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
    seed_everything(args.seed)
    run = RunDir(args.out, args, resume=args.resume)       # lock, args.json, the newest checkpoint

    # -- the policy (from the newest checkpoint when resuming), the reference, the prefix sources
    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_policy(f"{run.checkpoint}/model" if run.checkpoint else args.model, device, dtype)
    model.gradient_checkpointing = args.activation_checkpointing
    eos = tokenizer.eos_token_id
    ref_model = Transformer.from_pretrained(args.model, device, dtype).eval().requires_grad_(False) \
        if args.kl_coef > 0 else None                       # the initial checkpoint as loaded
    E = load_embedding_matrix(args.model)      # prefixes at the starting policy's scale, also on resume
    build = lambda name: make_prefix_source(name, E, tokenizer, args.vae, args.region, args.tie, args.seed)
    source = build(args.prefix_source) if args.schedule != "none" else None
    extra = build(args.resample_source) if args.resample else None

    # -- data: prompts tokenised once, each checked against the context and the memory
    rows = load_problems(args.data, "--data", tokenizer, args.template, args.seed, args.per_domain_cap)
    prefix_rows = source.rows(args.L) if source else 0
    extra_rows = extra.rows(args.resample_L) if extra else 0
    context = model.config.max_position_embeddings
    longest = check_fits_context(rows, max(prefix_rows, extra_rows) + args.max_new_tokens,
                                 f"prompt + {max(prefix_rows, extra_rows)}-row prefix + --max-new-tokens", "--data", context)
    per_rank = args.prompts_per_step // world_size
    check_fits_memory(model.config, dtype.itemsize, [
        (per_rank * args.group_size, longest + prefix_rows + args.max_new_tokens, "--prompts-per-step or --group-size"),
        (per_rank * args.resample, longest + extra_rows + args.max_new_tokens, "--resample")], device)
    eval_rows = []
    if args.eval_data:
        eval_rows = load_problems(args.eval_data, "--eval-data", tokenizer, args.template, args.seed,
                                  limit=args.eval_problems)
        check_fits_context(eval_rows, args.max_new_tokens, "prompt + --max-new-tokens", "--eval-data", context)
    evaluate = lambda: evaluate_greedy(model, tokenizer, eval_rows[rank::world_size], args, device)

    if args.fsdp:
        fsdp.shard(model)                # the optimiser below then holds only this rank's shards
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            betas=(0.9, 0.99), fused=device.type == "cuda")
    generators = {"prefix": torch.Generator().manual_seed(args.seed * 7919 + rank),     # latents
                  "sample": torch.Generator(device=device).manual_seed(args.seed * 104729 + rank),
                  "choice": torch.Generator().manual_seed(args.seed * 31 + rank)}       # who is prefixed
    start = resume(run, opt, model, generators, rank, args) if run.checkpoint else 0
    run.restart_logs_at(start)

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
        rollouts = rollout(model, source, problems, n_prefixed, L, args, generators, eos)
        clock.lap("generate")
        score(rollouts, tokenizer, args)
        record.update(rollout_metrics(rollouts, args.group_size, device))       # the on-policy rollouts
        if args.resample:                                                       # LoPE's regrouping
            rollouts = resample.regroup_failed(rollouts, extra, record, args, generators, device, lambda rows, p, name:
                                               score(sample(model, rows, p, name, args, generators, eos), tokenizer, args))
        set_advantages(rollouts, args)
        clock.lap("score")
        try:
            record.update(update_policy(model, opt, ref_model, rollouts, args))
        except FloatingPointError as e:
            raise UserError(f"{e} at step {step}; stopped before the optimiser step; {kept_note(run)}; "
                            "lower --lr or check the data") from None
        clock.lap("update")
        log_step(run, record, clock.laps, rollouts, history, bar, args)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            checkpoint(run, step + 1, model, opt, generators, args)

    if eval_rows:
        if args.fsdp:
            fsdp.gather_all(model)
        final = evaluate()
        run.log({"step": args.steps, "eval_pass1": final})
        print0(f"held-out greedy pass@1 after RL: {final:.3f}")
    if not args.fsdp:                    # sharded ranks hold different parts by design
        check_ranks_in_sync(model)
    whole = checkpoint(run, args.steps, model, opt, generators, args)
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
    if run.master and args.sample_every and record["step"] % args.sample_every == 0:
        log_samples(run, record["step"], rollouts, args)


@torch.no_grad()
def evaluate_greedy(model, tokenizer, mine, args, device):
    """Held-out greedy pass@1 without prefix (a cut-off answer counts 0), problems sharded over
    ranks, in eval mode."""
    correct, was_training = 0.0, model.training
    if mine:
        model.eval()
        out = generate(model, [r["prompt_ids"] for r in mine], None, args.max_new_tokens, temperature=0,
                       stop_tokens=[tokenizer.eos_token_id])
        model.train(was_training)
        texts = tokenizer.batch_decode(out.token_lists(), skip_special_tokens=True)
        correct = sum(grade(t, r["answer"], r["grading_kind"]) * done
                      for t, r, done in zip(texts, mine, out.stopped.tolist()))
    total, n = all_reduce_mean([correct, len(mine)], device)
    return total / max(n, 1e-9)


if __name__ == "__main__":
    run_main(main)
