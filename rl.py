r"""Stage 3: GRPO / RLOO with latent-guided exploration (Reasoning Palette).

One step reads rollout -> score -> advantages -> update -> log. P prompts a step (sharded over
ranks), G completions of each; the schedule says how many rollouts of each group carry a prefix,
and each of those draws its OWN latent z, decoded into L prefix embeddings before the prompt and
stored with its rollout, so every later log-prob is computed in the context it was sampled in.
Every random draw of group j comes from seeds derived from (--seed, step, j): the same rollouts on
any number of ranks, and after a resume.

The objective, per minibatch, summed over the completion tokens t of its rollouts i:

    J = sum_it w_it [min(r_it A_i, clip(r_it, 1 - eps_low, 1 + eps_high) A_i) - kl_coef k3_it]
    r_it: pi / pi_old of token t in rollout i's own context (its prefix p_i or none), at the sampling
          temperature; pi_old is the policy before the batch's first update (r = 1 with one update per batch)
    A_i:  grpo (R_i - mean_g R) / (std_g R + 1e-6); rloo R_i - mean of the other G - 1; drgrpo R_i - mean_g R
    R_i:  1 for a correct answer, 0 otherwise and for one cut off at --max-new-tokens
    k3_it = exp(ref - logp) - (ref - logp) - 1 against --model as loaded
    w_it: token-mean 1 / (tokens of the minibatch); seq-mean 1 / (B' |o_i|); constant 1 / (B' max_new_tokens)
Minibatch m holds the rollouts at place k of group j with (j G + k) mod M = m on any number of ranks.
tests/test_rl_losses.py checks the gradient in float64; docs/trl_differences.md compares with TRL.
Off the method's path, imported only where a flag asks: credit.py, resample.py, fsdp.py, memory.py (GPU).

Toy world:
    python rl.py --model runs/toy/sft/model --vae runs/toy/vae --schedule linear --L 1 \
        --data runs/toy/data/math_train.jsonl --eval-data runs/toy/data/math_test.jsonl --out runs/toy/rl_linear
Qwen3-4B on 8 GPUs of 80 GB (sharded: replicated fp32 weights, gradients and AdamW take 64 GB a GPU):
    torchrun --nproc_per_node 8 rl.py --model runs/sft-qwen3-4b/model --vae runs/vae-qwen3-4b \
        --schedule linear --L 8 --data math=../shared/data/gsm8k_train.jsonl --template math \
        --prompts-per-step 64 --group-size 8 --max-new-tokens 1024 --dtype bfloat16 --fsdp \
        --out runs/rl-qwen3-4b
Resume a killed run from its newest checkpoint: the same command with --resume.
"""

import argparse
import math
import random
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common import (ArgumentParser, Replicated, RunDir, UserError, all_reduce_mean, all_reduce_sum, checkpoint,
                    compute_init, derived_seed, gather_objects, kept_note, note_unused, print0, progress, ranged,
                    resume, run_main, seed_everything, SEED)
from data import HELD_OUT_SEED, TEMPLATES, grade, load_problems
from model import (ADVANTAGE_ESTIMATORS, LOSS_AGGREGATIONS, PREFIX_SOURCES, Transformer, completion_batch, prefix_class,
                   generate, group_advantages, load_config, load_embedding_matrix, load_tokenizer,
                   loss_token_weights, make_prefix_source, policy_loss, resolve_checkpoint, token_logprobs)

# name -> the fraction of a group's rollouts that carry a prefix, from the progress tau in [0, 1) and
# last (P, G): the rewards each of the step's P problems got the last time it was drawn (NaN where
# never). A float for every group, or a (P,) tensor, one per group. --schedule also takes a number.
SCHEDULES = {
    "none": lambda tau, last: 0.0,
    "two-stage": lambda tau, last: 1.0 if tau < 0.5 else 0.0,
    "linear": lambda tau, last: 1.0 - tau,
}

def schedule_arg(text):   # a SCHEDULES name, or a constant fraction rho in [0, 1]
    try:
        return text if text in SCHEDULES else ranged(float, 0, 1)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(SCHEDULES)} or a fraction in [0, 1], "
                                         f"got {text!r}") from None

parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
arg = parser.add_argument
arg("--data", required=True, help="training problems: domain=path_or_id,... or a path")
arg("--template", default="plain", choices=TEMPLATES)
arg("--eval-data", default=None, help="held-out problems: greedy pass@1 on the first 200, whatever --seed")
arg("--eval-every", type=ranged(int, 0), default=10, help="steps between evaluations (0: at the end)")
arg("--model", required=True, help="hub id or checkpoint directory (after sft_warmup.py)")
arg("--dtype", default="float32", choices=["float32", "bfloat16"], help="bfloat16: bf16 compute, fp32 weights")
arg("--fsdp", action="store_true", help="shard weights, gradients and optimiser state over ranks (fsdp.py)")
arg("--micro-batch-size", type=ranged(int, 0), default=0, help="rollouts per forward/backward (0: planned)")
arg("--schedule", type=schedule_arg, default="linear", metavar="{%s} or RHO" % ",".join(SCHEDULES),
    help="the prefixed fraction of each group over training; a number: that fraction at every step")
arg("--prefix-source", default="vae", choices=PREFIX_SOURCES, help="vae: the palette; the rest are baselines")
arg("--vae", default=None, help="directory written by train_vae.py")
arg("--L", type=ranged(int, 0), default=8, help="prefix rows of a prefixed rollout")
arg("--credit", default="prefixed", help="how a prefixed rollout is trained: prefixed, or a rule of credit.py")
arg("--resample", default=None, metavar="G'[,source=S,L=N,credit=C]", help="LoPE's resampling (resample.py)")
arg("--prompts-per-step", type=ranged(int, 1, 2**16), default=16, help="P, over all ranks")
arg("--group-size", type=ranged(int, 2, 2**12), default=8, help="G completions per prompt")
arg("--max-new-tokens", type=ranged(int, 1), default=128, help="a completion cut off here is worth 0")
arg("--temperature", type=ranged(float, above=0), default=1.0)
arg("--estimator", default="grpo", choices=ADVANTAGE_ESTIMATORS)
arg("--clip-eps", type=lambda s: (ranged(float, 0, below=1)(s.split(",")[0]), ranged(float, 0)(s.split(",")[-1])),
    default=(0.2, 0.28), metavar="LOW[,HIGH]", help="the ratio is clipped to [1 - LOW, 1 + HIGH] (DAPO)")
arg("--kl-coef", type=ranged(float, 0), default=0.0, help="k3 KL to the initial policy")
arg("--aggregation", default="token-mean", choices=LOSS_AGGREGATIONS)
arg("--epochs", type=ranged(int, 1, 100), default=1, help="passes over each rollout batch")
arg("--minibatches", type=ranged(int, 1, 2**16), default=1, help="optimiser steps per pass")
arg("--steps", type=ranged(int, 1), default=100)
arg("--lr", type=ranged(float, 0), default=1e-6, help="AdamW's, after a linear warm-up of WARMUP_STEPS")
arg("--seed", type=SEED, default=0)
arg("--out", required=True)
arg("--save-every", type=ranged(int, 0), default=25, help="steps between checkpoints (0: at the end)")
arg("--resume", action="store_true", help="continue from the newest checkpoint in --out")
WARMUP_STEPS, GRAD_CLIP, EVAL_PROBLEMS = 5, 1.0, 200        # constants a copy of this script can edit

def check_args(args, world_size):
    """A refusal where the run would crash, hang or compute something else; a note where a flag does nothing."""
    if args.prompts_per_step % world_size:
        raise UserError(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the {world_size} ranks")
    if args.fsdp:                              # fsdp.py: every rank must run the same forward passes
        import fsdp
        fsdp.check_args(args, world_size)
    if args.credit != "prefixed" or args.resample:
        import credit                          # credit.py: the other credit rules and LoPE's resampling
        credit.check_args(args, parser)
    if args.schedule != "none" and (args.prefix_source == "none" or args.L == 0):
        print0(f"note: --schedule {args.schedule} with no prefix (--prefix-source none or --L 0) is the baseline")
        args.schedule = "none"
    sources = ([f"--prefix-source {args.prefix_source}"] if args.schedule != "none" else []) + \
        ([f"--resample source={args.resample_source}"] if args.resample else [])
    needs_vae = [flag for flag in sources if prefix_class(flag.split()[-1].split("=")[-1]).needs_vae]
    if needs_vae and not args.vae:
        raise UserError(f"{needs_vae[0]} needs --vae DIR (a directory written by train_vae.py)")
    no_prefix = args.schedule == "none" and "--schedule none draws no prefix" or isinstance(args.schedule, float) and \
        prefix_plan(args, 0.0, torch.zeros(1, 1))[1] == 0 and \
        f"--schedule {args.schedule} prefixes round({args.schedule} x {args.group_size}) = 0 rollouts of a group"
    one_update = args.epochs * args.minibatches == 1 and args.credit in ("prefixed", "nudge") and not args.resample
    note_unused(args, parser, {dest: why for dest, why in {
        "eval_every": not args.eval_data and "there is no --eval-data",
        "clip_eps": one_update and "one update per batch in the sampling context: the ratio is 1",
        "credit": no_prefix, "L": no_prefix, "prefix_source": args.schedule == "none" and no_prefix,
        "vae": not needs_vae and "no prefix source reads a VAE"}.items() if why})

def prefix_plan(args, tau, last):
    """(rollouts of each group that carry a prefix (P,) long, prefix length) at progress tau."""
    rho = args.schedule if isinstance(args.schedule, float) else SCHEDULES[args.schedule](tau, last)
    n_prefixed = (torch.as_tensor(rho, dtype=torch.float64) * args.group_size + 0.5).floor().long()  # halves round up
    n_prefixed = n_prefixed.expand(len(last)) * (args.L > 0)
    return n_prefixed, args.L if n_prefixed.any() else 0

def step_problems(n, step, P, seed):
    """The P problems of a step: slices of per-epoch shuffles of range(n), a function of the step alone."""
    ks = range(step * P, (step + 1) * P)
    orders = {e: random.Random(seed + e).sample(range(n), n) for e in {k // n for k in ks}}   # epoch -> shuffle
    return [orders[k // n][k % n] for k in ks]

# -----------------------------------------------------------------------------
# Rollouts: one record per step, every per-rollout quantity sliced by the same indices

@dataclass
class Rollouts:                         # one step's rollouts on this rank: G per group, then any resampled ones
    problems: list                      # B data rows (each problem G times), prompt ids in each
    prefixes: list                      # B prefixes sampled under: (rows, d) or token ids (rows,), or None
    completions: list                   # B token-id lists, the stop token included
    truncated: torch.Tensor             # (B,) bool: cut at --max-new-tokens
    group: torch.Tensor                 # (B,) the problem's place in the step, over all ranks
    sources: list                       # B names of the prefix sources ("none": no prefix)
    credit: list = None                 # B credit rules (credit.py) where not every rollout is `prefixed`
    resampled: torch.Tensor = None      # (B,) bool: drawn by resample.py
    trained: torch.Tensor = None        # (B,) bool: one of its group's G trained rollouts (resample.py)
    texts: list = None                  # B decoded completions                          (score)
    correct: torch.Tensor = None        # (B,) the grader's verdict                      (score)
    rewards: torch.Tensor = None        # (B,) 0 for a cut-off answer                    (score)
    advantages: torch.Tensor = None     # (B,)                                           (set_advantages)
    stats: dict = None                  # (B,) float64 sums over the update: each rollout's share of the
                                        # loss, its tokens, clipped tokens, k3 and entropy (update)

    def __len__(self):
        return len(self.completions)

    def train_prefixes(self):           # each rollout's own prefix, unless its credit rule drops it
        return self.prefixes if self.credit is None else \
            [p if rule.with_prefix else None for p, rule in zip(self.prefixes, self.credit)]

    def batch(self, model, idx, sampled=False):  # the training layout, trained (or sampled) context
        prefixes = self.prefixes if sampled else self.train_prefixes()
        return completion_batch(model, [self.problems[i]["prompt_ids"] for i in idx],
                                [self.completions[i] for i in idx], [prefixes[i] for i in idx])

    def in_groups(self):                # indices of the trained rollouts, group by group
        rows = torch.arange(len(self)) if self.trained is None else self.trained.nonzero()[:, 0]
        return rows[torch.argsort(self.group[rows], stable=True)]

@torch.no_grad()
def sample(sampler, problems, prefixes, groups, keys, source_name, args, eos):
    """A completion of each of `problems` under prefixes[i] (or none), with the noise of keys[i]."""
    out = generate(sampler, [p["prompt_ids"] for p in problems], prefixes, args.max_new_tokens, args.temperature,
                   stop_tokens=[eos], keys=keys)
    return Rollouts(problems, prefixes, out.token_lists(), truncated=~out.stopped.cpu(), group=torch.tensor(groups),
                    sources=[source_name if p is not None else "none" for p in prefixes])

def rollout(sampler, source, problems, first_group, n_prefixed, L, step, args, eos):
    """G completions of each problem, n_prefixed[j] of group j under a prefix of its own; group j
    (first_group + its place here) draws from seeds derived from (--seed, step, j) alone."""
    G = args.group_size
    prefixes, groups, keys = [], [], []
    for j in range(first_group, first_group + len(problems)):
        g = torch.Generator().manual_seed(derived_seed(args.seed, step, j, "prefix"))
        n = int(n_prefixed[j])
        drawn = iter(source.sample(n, L, g) if n else ())                                    # (n, rows, d)
        chosen = torch.rand(G, generator=g).argsort().argsort() < n      # n of the G, uniformly at random
        prefixes += [next(drawn) if c else None for c in chosen.tolist()]
        groups += [j] * G
        keys += [derived_seed(args.seed, step, j, "sample", k) for k in range(G)]   # each rollout its own noise
    r = sample(sampler, [p for p in problems for _ in range(G)], prefixes, groups, keys,
               source.name if source else "none", args, eos)
    if args.credit != "prefixed":              # credit.py: the rule each prefixed rollout is trained by
        import credit
        credit.assign(r, args.credit)
    return r

def score(r, tokenizer, args):
    """Rewards, in place. A cut-off answer is worth 0: where the cut fell would decide its grade."""
    r.texts = tokenizer.batch_decode(r.completions, skip_special_tokens=True)
    r.correct = torch.tensor([grade(t, p["answer"], p["grading_kind"]) for t, p in zip(r.texts, r.problems)])
    r.rewards = r.correct.masked_fill(r.truncated, 0.0)                                   # (B,)
    return r

def set_advantages(r, args):           # in place, on the groups as they are trained
    rows = r.in_groups()
    rewards = r.rewards[rows].view(-1, args.group_size).double()                          # (p, G)
    if r.credit is not None:                 # credit.py: nudge reads a prefixed rollout's reward otherwise
        import credit
        rewards = credit.credited(r, rows, args.group_size)
    r.advantages = torch.zeros(len(r))
    r.advantages[rows] = group_advantages(rewards, args.estimator).flatten().float()

# -----------------------------------------------------------------------------
# The policy update

@torch.no_grad()
def completion_logprobs(model, r, rows, args, autocast, sampled=False):
    """log model(o_it | context): a tensor (|o_i|,) at each of `rows` (None elsewhere), in the context
    each rollout is trained (or sampled) in; the reference runs under the policy's autocast too."""
    out = [None] * len(r)
    for start in range(0, len(rows), args.micro_batch_size):
        idx = rows[start:start + args.micro_batch_size]
        with autocast():
            embeds, targets, loss_mask = r.batch(model, idx, sampled)
            logprobs, _ = token_logprobs(model, embeds, targets, loss_mask, args.temperature)    # (b, T)
        for i, lp in zip(idx, logprobs[loss_mask].split([len(r.completions[i]) for i in idx])):
            out[i] = lp
    return out

def minibatches(r, G, M):
    """The trained rollouts of each of M minibatches: the one at place k of group j goes to
    minibatch (j G + k) mod M, so minibatch m holds the same rollouts on any number of ranks."""
    rows = r.in_groups()
    place = r.group[rows] * G + torch.arange(len(rows)) % G
    return [rows[place % M == m].tolist() for m in range(M)]

def minibatch_backward(model, r, rows, old, ref, args):
    """Accumulate into .grad this rank's share of -J's gradient on one minibatch, micro-batch by
    micro-batch, and each rollout's share into r.stats. B' and the token count are means over ranks,
    because the gradient sync averages. Returns the minibatch's rollouts and loss, over all ranks."""
    device, world = model.device, dist.get_world_size() if dist.is_initialized() else 1
    n_seq, n_tok = all_reduce_mean([len(rows), sum(len(r.completions[i]) for i in rows)], device)
    at_loss = lambda per_rollout: None if per_rollout is None else \
        torch.zeros_like(logprobs).masked_scatter(loss_mask, torch.cat([per_rollout[i] for i in idx]).to(device))
    for start in range(0, len(rows) if n_seq else 0, args.micro_batch_size):
        idx = rows[start:start + args.micro_batch_size]
        model.before_microbatch()
        with model.autocast():
            embeds, targets, loss_mask = r.batch(model, idx)
            logprobs, entropy = token_logprobs(model, embeds, targets, loss_mask, args.temperature)  # (b, T)
        weights = loss_token_weights(loss_mask, args.aggregation, n_seq, n_tok, args.max_new_tokens, logprobs.dtype)
        shaped = None if r.credit is None else torch.tensor([r.credit[i].shaped for i in idx], device=device)
        loss, stats = policy_loss(logprobs, logprobs.detach() if old is None else at_loss(old), r.advantages[idx].to(device),
                                  weights, *args.clip_eps, at_loss(ref), args.kl_coef, entropy, shaped)
        if r.credit is not None:                 # credit.py: nudge's distillation into the bare prompt
            import credit
            loss = credit.add_distillation(model, r, idx, loss, stats, n_seq, args)
        loss.backward()
        for key, value in stats.items():     # each rollout's share: the ranks' losses are averaged
            r.stats[key][idx] += value.cpu() / (world if key == "loss" else 1)
    return n_seq * world, all_reduce_sum([float(r.stats["loss"][rows].sum())], device)[0]

def update_policy(model, opt, ref_model, r, args):
    """E epochs x M minibatches of optimiser steps; the update's metrics. A non-finite loss or gradient
    norm raises FloatingPointError before opt.step."""
    model.train()
    r.stats = {k: torch.zeros(len(r), dtype=torch.float64) for k in ("loss", "tokens", "clipped", "kl", "entropy")}
    trained = r.in_groups().tolist()
    # pi_old: the policy before the first update, in the sampling context. With one update per batch
    # and every rollout trained in its sampling context, it is pi itself (detached).
    retrained = any(t is not p for t, p in zip(r.train_prefixes(), r.prefixes))
    old = completion_logprobs(model, r, trained, args, model.autocast, sampled=True) \
        if args.epochs * args.minibatches > 1 or retrained else None
    ref = completion_logprobs(ref_model, r, trained, args, model.autocast) if ref_model is not None else None
    grad_norms = []
    for _ in range(args.epochs):
        for minibatch in minibatches(r, args.group_size, args.minibatches):
            n_seq, loss = minibatch_backward(model, r, minibatch, old, ref, args)
            if n_seq == 0:
                continue                         # an empty minibatch on every rank: no optimiser step
            grad_norm = model.sync_and_clip(GRAD_CLIP)  # the one place ranks synchronise gradients
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise FloatingPointError(f"non-finite loss or gradient norm (loss {loss:.4g}, "
                                         f"gradient norm {grad_norm:.4g})")
            opt.step()
            opt.zero_grad(set_to_none=True)
            grad_norms.append(grad_norm)
    model.refresh_sampler()                      # the bf16 copy that samples the next rollouts
    total = dict(zip(r.stats, all_reduce_sum([float(v.sum()) for v in r.stats.values()], model.device)))
    per_token = lambda key: total[key] / total["tokens"] if total["tokens"] else None
    return {"loss": total["loss"] / max(len(grad_norms), 1),            # -J, mean over the optimiser steps
            "grad_norm": sum(grad_norms) / max(len(grad_norms), 1),      # before clipping, mean over them
            "updates": len(grad_norms), "clip_frac": per_token("clipped"), "entropy": per_token("entropy"),
            **({"kl": per_token("kl")} if ref_model is not None else {})}

# -----------------------------------------------------------------------------
# What a user watches: one record per step, decoded samples

def rollout_metrics(r, G, device):
    """Means over every on-policy rollout of every rank, from sums (ranks hold different numbers of them)."""
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
    """Every rollout of every rank, decoded, with what it added to the update: samples.jsonl."""
    trained, train_prefixes = set(r.in_groups().tolist()), r.train_prefixes()
    mine = [{"step": step, "group": int(r.group[i]), "problem": r.problems[i]["problem"], "completion": r.texts[i],
             "tokens": len(r.completions[i]), "reward": r.rewards[i].item(), "correct": r.correct[i].item(),
             "truncated": bool(r.truncated[i]),
             "prefix_source": r.sources[i], "resampled": r.resampled is not None and bool(r.resampled[i]),
             "prefix_rows": 0 if r.prefixes[i] is None else len(r.prefixes[i]),
             "credit": None if r.prefixes[i] is None else args.credit if r.credit is None else r.credit[i].name,
             "trained_with_prefix": train_prefixes[i] is not None, "trained": i in trained,
             "advantage": r.advantages[i].item(), **{f"update_{k}": float(v[i]) for k, v in r.stats.items()}}
            for i in range(len(r))]
    run.log(*gather_objects(mine), name="samples.jsonl")

def main(argv=None):
    args = parser.parse_args(argv)
    ddp, rank, world_size, device = compute_init()
    check_args(args, world_size)
    seed_everything(args.seed)
    # -- the tokenizer, the data and the memory plan, checked before anything is written or loaded
    path = resolve_checkpoint(args.model)
    config = load_config(path)
    tokenizer = load_tokenizer(path, config.vocab_size)
    E = load_embedding_matrix(path)            # prefixes at the starting policy's scale, also on resume
    build = lambda name: make_prefix_source(name, E, tokenizer, args.vae, seed=args.seed)
    source = build(args.prefix_source) if args.schedule != "none" else None
    taught = config.warmup and (config.warmup["prefix_source"], config.warmup["L"])     # sft_warmup.py's
    if source and taught != (source.name, args.L):
        print0(f"note: the policy's warm-up taught {'%s prefixes of L = %d' % taught if taught else 'no prefix'}; this run "
               f"gives it {source.name} prefixes of L = {args.L}")
    if args.resample:                          # resample.py: LoPE's regrouping of all-failed groups
        import resample
    extra = resample.Resampler(args, build, device) if args.resample else None
    room = max(source.rows(args.L) if source else 0, extra.rows() if extra else 0) + args.max_new_tokens
    rows = load_problems(args.data, "--data", tokenizer, args.template, args.seed, room, config.max_position_embeddings)
    eval_rows = load_problems(args.eval_data, "--eval-data", tokenizer, args.template, HELD_OUT_SEED,  # whatever --seed
                              args.max_new_tokens, config.max_position_embeddings, EVAL_PROBLEMS) if args.eval_data else []
    args.micro_batch_size, checkpointing = plan_memory(args, config, rows, eval_rows, source, extra, world_size, device)
    run = RunDir(args.out, args, resume=args.resume)       # lock, the newest checkpoint, args.json
    # -- the policy (fp32 master weights) wrapped for the ranks, the reference, the optimiser
    model = Transformer.from_pretrained(f"{run.checkpoint}/model" if run.checkpoint else path, device)
    model.source_dir = path                    # tokenizer files are copied from --model, also on resume
    model.gradient_checkpointing = checkpointing
    # the initial checkpoint, fp32 like the policy: one precision path, k3 = 0 before the first update (--fsdp: bf16)
    ref_model = Transformer.from_pretrained(path, device, torch.bfloat16 if args.fsdp and args.dtype == "bfloat16"
                                            else torch.float32).eval().requires_grad_(False) if args.kl_coef > 0 else None
    if args.fsdp:                              # fsdp.py: the optimiser then holds only this rank's shards
        import fsdp
    model = (fsdp.Sharded if args.fsdp else Replicated)(model, args.dtype == "bfloat16")   # Replicated: DDP by hand
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99), fused=device.type == "cuda")
    trainer = resume(run, opt, model) if run.checkpoint else {"step": 0}      # its step, the schedule's memory
    start, last_rewards = trainer["step"], trainer.get("last_rewards", {})
    run.begin(start)                           # args.json, and the logs of the steps before `start`

    # -- the loop: rollout -> score -> advantages -> update -> log
    per_rank, history = args.prompts_per_step // world_size, []
    bar = progress(range(start, args.steps), "rl", total=args.steps, initial=start)
    for step in bar:
        model.before_rollouts()
        chosen = step_problems(len(rows), step, args.prompts_per_step, args.seed)
        record, n_prefixed, L = begin_step(args, step, chosen, last_rewards, opt)
        if eval_rows and args.eval_every and step % args.eval_every == 0:
            record["eval_pass1"] = evaluate_greedy(model.sampler, tokenizer, eval_rows[rank::world_size], args, device)
        t0 = time.perf_counter()
        r = rollout(model.sampler, source, [rows[i] for i in chosen[rank * per_rank:(rank + 1) * per_rank]], rank * per_rank,
                    n_prefixed, L, step, args, tokenizer.eos_token_id)
        t1 = time.perf_counter()
        score(r, tokenizer, args)
        record.update(rollout_metrics(r, args.group_size, device))               # the on-policy rollouts
        last_rewards.update(remember_rewards(r, chosen, args.group_size))
        if extra:
            r = extra.regroup_failed(r, record, step, lambda *a: score(
                sample(model.sampler, *a, args, tokenizer.eos_token_id), tokenizer, args))
        set_advantages(r, args)
        t2 = time.perf_counter()
        try:
            record.update(update_policy(model, opt, ref_model, r, args))
        except FloatingPointError as e:
            raise UserError(f"{e} at step {step}; stopped before the optimiser step; {kept_note(run.path)}; "
                            "lower --lr or check the data") from None
        log_step(run, record, (t0, t1, t2, time.perf_counter()), r, args, bar, history)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            checkpoint(run, step + 1, model, opt, {"last_rewards": last_rewards})

    if eval_rows:
        model.before_rollouts()
        run.log({"step": args.steps, "eval_pass1": (final := evaluate_greedy(model.sampler, tokenizer,
                                                                              eval_rows[rank::world_size], args, device))})
        print0(f"held-out greedy pass@1 after RL: {final:.3f}")
    model.end()
    whole = checkpoint(run, args.steps, model, opt, {"last_rewards": last_rewards})
    if run.master:
        whole.save_pretrained(run.file("model"))
        print0(f"saved {run.file('model')}")

def begin_step(args, step, chosen, last_rewards, opt):    # the record, the prefix plan, the learning rate
    last = torch.tensor([last_rewards.get(str(i), [math.nan] * args.group_size) for i in chosen])   # (P, G)
    n_prefixed, L = prefix_plan(args, step / args.steps, last)
    lr = args.lr * min(1.0, (step + 1) / WARMUP_STEPS)
    for group in opt.param_groups:
        group["lr"] = lr
    return {"step": step, "tau": step / args.steps, "lr": lr, "rho": n_prefixed.sum().item() / (len(chosen) * args.group_size),
            "L": L, "prefixed": n_prefixed.tolist()}, n_prefixed, L

def log_step(run, record, times, r, args, bar, history):   # metrics.jsonl, samples, the bar, a warning
    t0, t1, t2, t3 = times
    record.update(time_generate=t1 - t0, time_score=t2 - t1, time_update=t3 - t2,
                  gen_tokens_per_s=record.pop("gen_tokens") / max(t1 - t0, 1e-9))
    run.log(record)
    log_samples(run, record["step"], r, args)
    bar.set_postfix(reward=f"{record['reward_mean']:.3f}", rho=f"{record['rho']:.2f}")
    history.append(record["grad_norm"])
    if history[-3:] == [0, 0, 0] and history[-4:-3] != [0]:
        print0("warning: the gradient norm has been 0 for 3 steps: every group's rewards are equal (see "
               "zero_variance_frac), so nothing is learned; try a larger --group-size or --temperature")

def remember_rewards(r, chosen, G):       # {problem index (a JSON key): its G rewards}, over all ranks
    mine = [(int(r.group[j * G]), r.rewards[j * G:(j + 1) * G].tolist()) for j in range(len(r) // G)]
    return {str(chosen[j]): rewards for j, rewards in gather_objects(mine)}

def plan_memory(args, config, rows, eval_rows, source, extra, world_size, device):
    """(micro-batch, activation checkpointing): on a GPU the first that fits by memory.py's model (or a one-line
    refusal); elsewhere --micro-batch-size, 0 meaning 32, and no recomputation."""
    if device.type != "cuda":
        return args.micro_batch_size or 32, False
    import memory
    return memory.rl_plan(args, config, rows, eval_rows, source, extra, world_size, device)

@torch.no_grad()
def evaluate_greedy(model, tokenizer, mine, args, device):   # held-out greedy pass@1, no prefix, over ranks
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
