r"""Stage 3: GRPO / RLOO with latent-guided exploration (Reasoning Palette).

One step reads rollout -> score -> update -> log:

    rollout  P prompts (sharded over ranks; a group never spans ranks), G completions of each.
             The schedule decides how many rollouts of each group carry a prefix, and
             choose_prefixed which ones: each of those draws its OWN latent z, decoded into L
             prefix embeddings placed before the prompt; the rest get none. The prefix is stored
             with its rollout, so every later log-prob is computed in the context it was sampled in.
    score    rewards from the grader, group advantages, and which rollouts carry loss.
    update   update_policy: E epochs x M minibatches of optimiser steps on the batch.
    log      one record per step in metrics.jsonl.

The objective, per minibatch (sum over completion tokens t of the kept rollouts i):

    J = sum_it w_it * [ min(r_it * A_i, clip(r_it, 1 - eps_low, 1 + eps_high) * A_i)
                        - kl_coef * k3_it + entropy_coef * H_it ]
    r_it  = pi(o_it | p_i, q, o_i<t) / pi_old(o_it | p_i, q, o_i<t), both from training forward
            passes at the sampling temperature; pi_old is the policy before the batch's first
            update (so r = 1 with one update per batch, naive credit below excepted); the
            sampler's own log-probs are never used
    A_i   = grpo:   (R_i - mean_g R) / (std_g R + 1e-6), std with Bessel's correction
            rloo:   R_i - mean of the other G - 1 rewards of the group
            drgrpo: R_i - mean_g R
            (a group with equal rewards has A = 0 and is counted as zero-variance)
    k3_it = exp(ref - logp) - (ref - logp) - 1, ref = log pi_ref(o_it | p_i, q, o_i<t) under the
            checkpoint --model as loaded, which embeds the tokens with its own embedding matrix
            and reads the same prefix vectors p_i. kl_coef = 0 by default, and then no reference
            model is loaded at all
    H_it  = -sum_v pi(v | p_i, q, o_i<t) log pi(v | p_i, q, o_i<t), the entropy of the policy's
            next-token distribution at the sampling temperature: the standard token-entropy
            bonus, weighted like the policy term (entropy_coef = 0 by default)
    w_it  = token-mean: 1 / (kept completion tokens of the minibatch); seq-mean: 1 / (B' |o_i|);
            constant: 1 / (B' * max_new_tokens) (Dr. GRPO); B' = kept rollouts of the minibatch.
            Every rollout is kept, except truncated ones under --truncated mask.
Each rank splits its rollouts into M contiguous minibatches (minibatch m of a step is the union
over ranks, and the counts above are over all ranks) and each minibatch into micro-batches of
--micro-batch-size kept rollouts; the gradient accumulated over micro-batches and ranks is the
gradient of -J on the whole minibatch (tests/test_rl_losses.py checks this in float64).

How it differs from the textbook algorithms: GRPO as in DeepSeekMath but with asymmetric clipping
(eps_high > eps_low as in DAPO), no KL by default, and token-mean aggregation over the minibatch
rather than a per-sequence mean; RLOO is used with the same clipped surrogate (RLOO proper is
plain REINFORCE: set --epochs 1 --minibatches 1, where the ratio is 1 and the clip inactive).
The policy conditions on the prefix p_i, and the same p_i is replayed in every ratio (except for
resampled rollouts under naive credit, below).

Where the conventions differ from TRL's GRPOTrainer and RLOOTrainer (its main branch, July 2026):
- the group std gets eps 1e-6 here, 1e-4 in TRL (both use Bessel's correction);
- seq-mean / constant with masked truncations (--truncated mask, TRL's
  mask_truncated_completions) divide by the kept rollouts here; TRL's loss_type "grpo" /
  "dr_grpo" divide by all rollouts of the batch, masked ones included. token-mean, the default
  here, is TRL's default loss_type "dapo";
- the k3 term is not multiplied by the ratio here; TRL multiplies it with
  use_bias_correction_kl=True (off by default);
- RLOO here is the token-level clipped surrogate above; TRL's RLOOTrainer clips one ratio per
  sequence (the exponentiated sum of the token log-ratios) and puts its KL into the reward;
- TRL's entropy_coef bonus is always the mean token entropy; here it is weighted by w_it like
  the policy term (the same thing under token-mean).

Zero-advantage resampling (--resample G', off by default): LoPE's rule (arXiv 2605.05566), with
any prefix source in its slot. Group j is all-failed when R_jg = 0 for g = 1..G (0: a wrong or
truncated answer). For each such group, G' more rollouts o'_h ~ pi_old(. | p'_h, q_j), h = 1..G',
are sampled, each with its own prefix p'_h from --resample-source (none: naive resampling, no
prefix; lorem: --resample-L tokens of pseudo-Latin, then a boundary instruction). With S_j the
successes among them (R > 0 and kept), in sampling order,

    k_j = min(|S_j|, G - 1),     group_j  <-  (o_j1, ..., o_j(G - k_j), S_j1, ..., S_jk_j)

so the group keeps G rollouts and at least one failure, and every success comes from the
resample; with no success (k_j = 0) it stays as it was: all failed, A = 0. Advantages are taken
on the regrouped groups, and a resampled rollout is credited by --resample-credit:
    prefixed      like any prefixed rollout above: p_i = p'_h is replayed in pi, pi_old and pi_ref;
    naive         as a pseudo-rollout of the unprefixed prompt (LoPE): pi and pi_ref read
                  (q, o_i<t) with no prefix while pi_old keeps the sampling context,
                      r_it = pi(o_it | q, o_i<t) / pi_old(o_it | p'_h, q, o_i<t),
                  so pi_old is computed before the batch's first update even with one update per
                  batch (r != 1 from the start); the clipped term is as above;
    naive-shaped  the same ratio, and LoPE's training-signal shaping: the clipped term of these
                  rollouts becomes f(r_it) * A_i, f(r) = r / (r + 0.1), unclipped (f < 1 bounds it).
reward_mean, accuracy and zero_variance_frac describe the P x G on-policy rollouts, before any
regrouping; rollouts_generated counts every rollout sampled (P G, plus G' per resampled group),
so that runs can be compared at equal rollouts as well as at equal steps. Resampling is local:
a group and its resample stay on one rank.

Schedules, rho(tau) over progress tau = step / steps (the table SCHEDULES): none (baseline);
two-stage (every rollout prefixed while tau < 0.5, none after); linear (rho = 1 - tau); constant
(--rho). round(rho * G) rollouts of each group, halves rounded up, get an L-token prefix.

Toy world:
    python rl.py --model runs/toy/sft/model --vae runs/toy/vae --schedule linear --L 8 \
        --data runs/toy/data/math_train.jsonl --eval-data runs/toy/data/math_test.jsonl --out runs/toy/rl_linear
    python rl.py --model runs/toy/sft_plain/model --schedule none ... --out runs/toy/rl_none
8 GPUs:
    torchrun --nproc_per_node 8 rl.py --model runs/sft-qwen3-4b/model --vae runs/vae-qwen3-4b \
        --schedule linear --L 8 --data math=../shared/data/gsm8k_train.jsonl --template math \
        --prompts-per-step 64 --group-size 8 --max-new-tokens 1024 --dtype bfloat16 --out runs/rl-qwen3-4b
LoPE against palette resampling (no schedule; 24 extra rollouts for each all-failed group):
    python rl.py --model runs/toy/sft_plain/model --schedule none --resample 24 --resample-source lorem \
        --resample-L 200 --resample-credit naive-shaped ... --out runs/toy/rl_lope
    python rl.py --model runs/toy/sft/model --vae runs/toy/vae --schedule none --resample 24 \
        --resample-source vae --resample-L 8 --resample-credit prefixed ... --out runs/toy/rl_palette_resample
Resume a killed run from its last checkpoint: add --resume (same flags).

Sharded (--fsdp, FSDP2): with plain data parallelism every rank holds the whole model, its
gradients and both AdamW moments, all in --dtype (there is no separate fp32 master copy): 8 bytes
per parameter in bfloat16, 16 in float32. --fsdp keeps 1/ranks of each on every rank (one unit per
decoder layer, plus the root: embedding, final norm, lm_head), gathers the whole model for the
rollouts (generation reads every layer at every token; gathering layer by layer would cost an
all-gather per token) and frees it before the update, which gathers one layer at a time.
Per GPU at 8 ranks, before activations and KV cache (Qwen3 sizes 1.7B, 4.0B, 8.2B parameters):
                         bfloat16                           float32
                  1.7B      4B        8B             1.7B      4B        8B
    DDP           13.6 GB   32 GB     66 GB          27 GB     64 GB     131 GB
    FSDP2 update  1.7 GB    4 GB      8.2 GB         3.4 GB    8 GB      16 GB   (+ the root and
                                         two layers gathered whole: about 3.3 GB at 8B in bfloat16)
    FSDP2 rollout 5.1 GB    12 GB     25 GB          10 GB     24 GB     49 GB   (shards + whole weights)
So 8B trains on 80 GB GPUs only sharded, in bfloat16 (float32 would leave too little for the KV
cache). Checkpoints stay whole Hugging Face directories: the weights and the AdamW state are
gathered to rank 0 and written as with DDP (so a run resumes on any number of ranks, and the
files are the ones `transformers` and the DDP path read; the price is rank 0's CPU memory for
one whole copy while it writes).
    torchrun --nproc_per_node 8 rl.py --fsdp --model runs/sft-qwen3-8b/model ... --dtype bfloat16
"""

import argparse
import math
import os
import random
import time
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from common import (ArgumentParser, RunDir, UserError, all_reduce_mean, at_least, at_most,
                    atomic_save_dir, atomic_write_json, check_out_dir, check_ranks_in_sync,
                    check_seed, compute_init, ddp_info, finite, positive, print0, progress,
                    read_json, rng_state, run_main, seed_everything, set_rng_state, sync_gradients,
                    fsdp_before_backward, fsdp_full_state, fsdp_load_optimizer_state, fsdp_shard,
                    fsdp_unshard_for_generation, fsdp_whole_model, full_value, local_shard)
from data import (GRADER, TEMPLATES, check_gold_answers, format_prompt, grade, grading_kind_for,
                  load_mixture)
from model import (ADVANTAGE_ESTIMATORS, LOSS_AGGREGATIONS, PREFIX_SOURCES, Transformer,
                   completion_batch, generate, group_advantages, load_embedding_matrix,
                   load_policy, loss_token_weights, make_prefix_source, policy_loss,
                   read_safetensors_file, resolve_checkpoint, token_logprobs_and_entropy)

# name -> rho(tau, rho flag): the fraction of each group's rollouts that carry a prefix at
# progress tau in [0, 1). argparse takes its choices from here.
SCHEDULES = {
    "none": lambda tau, rho: 0.0,
    "two-stage": lambda tau, rho: 1.0 if tau < 0.5 else 0.0,
    "linear": lambda tau, rho: 1.0 - tau,
    "constant": lambda tau, rho: rho,
}

# How a resampled rollout is trained (the docstring gives each rule's ratio).
CREDIT_RULES = ("prefixed", "naive", "naive-shaped")
SHAPING_GAMMA = 0.1       # f(r) = r / (r + 0.1): LoPE's training-signal shaping
FAILURE_REWARD = 0.0      # a wrong or truncated answer; a group of only these is resampled
LOREM_TOKENS = 200        # default --resample-L for lorem: the middle of LoPE's 100-300 tokens

parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# Data
parser.add_argument("--data", required=True, help="training problems: domain=path_or_id,... or a path")
parser.add_argument("--per-domain-cap", type=int, default=None)
parser.add_argument("--template", default="plain", choices=TEMPLATES)
parser.add_argument("--eval-data", default=None, help="held-out problems for greedy pass@1")
parser.add_argument("--eval-problems", type=int, default=200)
parser.add_argument("--eval-every", type=int, default=10, help="steps between held-out evaluations (0: only at the end)")
# Model
parser.add_argument("--model", required=True, help="hub id or checkpoint directory (after sft_warmup.py)")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
parser.add_argument("--activation-checkpointing", action="store_true", help="recompute layers in backward")
parser.add_argument("--fsdp", action="store_true", help="shard weights, gradients and optimiser state "
                    "over ranks (FSDP2) instead of replicating them (DDP)")
# Palette
parser.add_argument("--schedule", default="linear", choices=list(SCHEDULES))
parser.add_argument("--rho", type=float, default=0.5, help="prefixed fraction of each group (constant)")
parser.add_argument("--L", type=int, default=8, help="prefix tokens of a prefixed rollout")
parser.add_argument("--prefix-source", default="vae", choices=PREFIX_SOURCES)
parser.add_argument("--vae", default=None, help="directory written by train_vae.py")
parser.add_argument("--region", default=None, help="sample z from this domain's region instead of the prior")
parser.add_argument("--tie", action="store_true", help="one draw repeated L times instead of L draws")
# Zero-advantage resampling (LoPE's rule; see the docstring)
parser.add_argument("--resample", type=int, default=0,
                    help="G': extra rollouts for each group whose G rollouts all fail (0: off)")
parser.add_argument("--resample-source", default="lorem", choices=PREFIX_SOURCES,
                    help="prefix of the extra rollouts (none: naive resampling)")
parser.add_argument("--resample-L", type=int, default=None,
                    help=f"prefix length of the extra rollouts, in tokens (default: {LOREM_TOKENS} "
                         "for lorem, the middle of LoPE's 100-300; --L for vae, noise, random_decoder)")
parser.add_argument("--resample-credit", default="naive", choices=CREDIT_RULES,
                    help="how a resampled rollout is trained: with its prefix replayed (prefixed) "
                         "or as a rollout of the unprefixed prompt (naive, naive-shaped)")
# Rollouts
parser.add_argument("--prompts-per-step", type=int, default=16, help="P, over all ranks")
parser.add_argument("--group-size", type=int, default=8, help="G completions per prompt")
parser.add_argument("--max-new-tokens", type=int, default=128)
parser.add_argument("--temperature", type=float, default=1.0)
parser.add_argument("--top-p", type=float, default=1.0)
parser.add_argument("--truncated", default="zero", choices=["zero", "mask"],
                    help="a completion cut at --max-new-tokens: reward 0 (teaches the model to "
                         "finish) or left out of the loss (DAPO's overlong filtering)")
# Objective
parser.add_argument("--estimator", default="grpo", choices=ADVANTAGE_ESTIMATORS)
parser.add_argument("--clip-eps-low", type=float, default=0.2)
parser.add_argument("--clip-eps-high", type=float, default=0.28)
parser.add_argument("--kl-coef", type=float, default=0.0, help="k3 KL to the initial policy (0: no reference model)")
parser.add_argument("--entropy-coef", type=float, default=0.0, help="token-entropy bonus (0: none)")
parser.add_argument("--aggregation", default="token-mean", choices=LOSS_AGGREGATIONS)
parser.add_argument("--epochs", type=int, default=1, help="optimisation passes over each rollout batch")
parser.add_argument("--minibatches", type=int, default=1, help="optimiser steps per pass")
parser.add_argument("--micro-batch-size", type=int, default=32, help="rollouts per forward/backward")
# Optimisation
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--lr", type=float, default=1e-6)
parser.add_argument("--warmup-steps", type=int, default=5)
parser.add_argument("--weight-decay", type=float, default=0.0)
parser.add_argument("--grad-clip", type=float, default=1.0)
parser.add_argument("--seed", type=int, default=0)
# Checkpoints and logs
parser.add_argument("--out", required=True)
parser.add_argument("--save-every", type=int, default=25, help="steps between checkpoints (0: only at the end)")
parser.add_argument("--resume", action="store_true", help="continue from --out/checkpoint")
parser.add_argument("--sample-every", type=int, default=10, help="steps between decoded rollouts in samples.jsonl")
parser.add_argument("--samples-per-step", type=int, default=4,
                    help="rollouts written at such a step, spread over the batch (0: every rollout)")


MAX_EPOCHS = 100   # passes over one batch of rollouts; PPO-style training uses a few


def check_args(args, world_size):
    """Every flag's range and the combinations that cannot work, refused in one line each before
    anything is loaded (the limits that need the model are in check_fits_device)."""
    at_least(1, steps=args.steps, prompts_per_step=args.prompts_per_step,
             max_new_tokens=args.max_new_tokens, epochs=args.epochs, minibatches=args.minibatches,
             micro_batch_size=args.micro_batch_size, eval_problems=args.eval_problems,
             per_domain_cap=args.per_domain_cap)
    at_least(0, L=args.L, eval_every=args.eval_every, save_every=args.save_every,
             sample_every=args.sample_every, samples_per_step=args.samples_per_step,
             warmup_steps=args.warmup_steps)
    at_most(MAX_EPOCHS, epochs=args.epochs)
    if args.group_size < 2:
        raise UserError(f"--group-size must be >= 2, got {args.group_size}: advantages compare the "
                        "rollouts of a group, so a group of one has advantage 0 and nothing is learned")
    finite(temperature=args.temperature, top_p=args.top_p, rho=args.rho, lr=args.lr,
           weight_decay=args.weight_decay, clip_eps_low=args.clip_eps_low,
           clip_eps_high=args.clip_eps_high, kl_coef=args.kl_coef, entropy_coef=args.entropy_coef)
    if not args.temperature > 0:
        raise UserError(f"--temperature must be > 0, got {args.temperature}: the loss needs log-probs "
                        "at the sampling temperature, which are undefined at 0 (greedy)")
    at_least(0, lr=args.lr, weight_decay=args.weight_decay, clip_eps_low=args.clip_eps_low,
             clip_eps_high=args.clip_eps_high, kl_coef=args.kl_coef, entropy_coef=args.entropy_coef,
             rho=args.rho)
    at_most(1, top_p=args.top_p, rho=args.rho)
    positive(top_p=args.top_p, grad_clip=args.grad_clip)     # --grad-clip inf: no clipping
    if not args.clip_eps_low < 1:
        raise UserError(f"--clip-eps-low must be < 1, got {args.clip_eps_low}: the ratio is clipped "
                        "to [1 - eps_low, 1 + eps_high]")
    if args.lr * args.weight_decay >= 1:
        raise UserError(f"--lr {args.lr} x --weight-decay {args.weight_decay} >= 1 would flip every "
                        "weight's sign at each step; lower them")
    check_seed(args.seed)
    check_out_dir(args.out)
    if args.prompts_per_step % world_size:
        raise UserError(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the "
                        f"{world_size} ranks")
    per_rank = args.prompts_per_step // world_size * args.group_size
    if args.minibatches > per_rank:
        raise UserError(f"--minibatches {args.minibatches} is more than the {per_rank} rollouts each "
                        f"rank holds (prompts-per-step / ranks x group-size); use at most {per_rank}")
    if args.schedule != "none" and args.prefix_source == "none":
        raise UserError(f"--schedule {args.schedule} needs a --prefix-source (vae, noise, "
                        "random_decoder, lorem)")
    if args.schedule != "none" and args.L == 0:
        raise UserError(f"--schedule {args.schedule} with --L 0 gives no prefix; use --schedule none "
                        "for the baseline")
    if args.schedule != "none" and args.prefix_source == "vae" and args.vae is None:
        raise UserError("--prefix-source vae needs --vae DIR (a directory written by train_vae.py)")
    at_least(0, resample=args.resample)
    resample_flags = ("resample_source", "resample_L", "resample_credit")
    changed = [k for k in resample_flags if getattr(args, k) != parser.get_default(k)]
    if not args.resample and changed:
        raise UserError(f"--{changed[0].replace('_', '-')} has no effect without --resample G' "
                        "(the number of extra rollouts for an all-failed group)")
    if args.resample:
        at_least(0, resample_L=args.resample_L)
        if args.resample_source == "none" and resample_length(args):
            raise UserError("--resample-L has no effect with --resample-source none (no prefix); "
                            "leave it out")
        if args.resample_source != "none" and resample_length(args) == 0:
            raise UserError("--resample-L 0 gives the extra rollouts no prefix; use --resample-source "
                            "none for naive resampling")
        if args.resample_source == "vae" and args.vae is None:
            raise UserError("--resample-source vae needs --vae DIR (a directory written by train_vae.py)")
    used = prefix_sources_in_use(args)
    if args.fsdp and args.truncated == "mask":
        raise UserError("--fsdp needs the same number of micro-batches on every rank (each is a "
                        "collective), which --truncated mask does not give; use --truncated zero")
    if args.fsdp and "lorem" in used:
        raise UserError("--fsdp cannot read lorem text through the sharded embedding; use another "
                        "prefix source, or leave out --fsdp")
    if args.region is not None and "vae" not in used:
        raise UserError("--region needs --prefix-source vae (or --resample-source vae): regions are "
                        "areas of the VAE's latent space")
    if args.tie and "lorem" in used:
        raise UserError("--tie has no meaning for the lorem source (its prefix is text, not repeated "
                        "draws); leave --tie out")


def prefix_sources_in_use(args):
    """The prefix sources a run draws from: the schedule's and the resample's."""
    used = set()
    if args.schedule != "none":
        used.add(args.prefix_source)
    if args.resample:
        used.add(args.resample_source)
    return used


def resample_length(args):
    """--resample-L, or its default: 0 without a prefix, LOREM_TOKENS for lorem, --L otherwise."""
    if args.resample_L is not None:
        return args.resample_L
    return {"none": 0, "lorem": LOREM_TOKENS}.get(args.resample_source, args.L)


def check_fits_device(model, args, world_size, longest_prompt, device, prefix_rows=None,
                      resample_rows=0):
    """The KV cache of one rank's rollouts must fit in the device's memory: refused at start-up,
    not found out of memory at the first step. prefix_rows: embedding rows of a schedule prefix
    (--L by default); resample_rows: of a resample prefix. The resample is sampled after the
    step's rollouts, so the larger of the two batches must fit (every group failing, at worst)."""
    c = model.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim \
        * model.embed_tokens.weight.element_size()                      # keys and values, bytes
    my_prompts = args.prompts_per_step // world_size
    batches = [(my_prompts * args.group_size, args.L if prefix_rows is None else prefix_rows,
                "--prompts-per-step / ranks x --group-size", "--group-size")]
    if args.resample:
        batches.append((my_prompts * args.resample, resample_rows,
                        "--prompts-per-step / ranks x --resample", "--resample"))
    have = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else \
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for rollouts, rows, how, flag in batches:
        length = longest_prompt + rows + args.max_new_tokens
        need = rollouts * length * per_token
        if need > have:
            raise UserError(f"{rollouts} rollouts per rank ({how}) of up to {length} tokens need "
                            f"{need / 2**30:.3g} GiB of KV cache, more than the {have / 2**30:.3g} GiB "
                            f"of the {device.type} device; lower --prompts-per-step, {flag} or "
                            "--max-new-tokens, or use more ranks")


def prefix_plan(schedule, tau, G, rho, L):
    """(rollouts of each group that carry a prefix, prefix length) at progress tau in [0, 1)."""
    if schedule not in SCHEDULES:
        raise UserError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    # halves round up (Python's round() goes to even: 2.5 -> 2)
    n_prefixed = math.floor(SCHEDULES[schedule](tau, rho) * G + 0.5) if L > 0 else 0
    return n_prefixed, L if n_prefixed else 0


def choose_prefixed(n_groups, G, n_prefixed, generator):
    """Which rollouts carry a prefix: n_prefixed of each group of G, chosen uniformly at random so
    that a rollout's place in its group says nothing. Returns a bool tensor (n_groups * G,)."""
    keys = torch.rand(n_groups, G, generator=generator)                          # (n_groups, G)
    rank_in_group = keys.argsort(dim=1).argsort(dim=1)                           # 0 = smallest key
    return (rank_in_group < n_prefixed).flatten()


def step_prompts(rows, step, P, seed):
    """The P problems of a step: consecutive slices of per-epoch shuffles of the data, so the data
    position is a function of the step alone and a resumed run continues exactly."""
    out, orders = [], {}
    for k in range(step * P, (step + 1) * P):
        epoch, i = divmod(k, len(rows))
        if epoch not in orders:
            orders[epoch] = list(range(len(rows)))
            random.Random(seed + epoch).shuffle(orders[epoch])
        out.append(rows[orders[epoch][i]])
    return out


def problem_name(row):
    return repr(row.get("id") or row["problem"][:40])


def load_problems(spec, flag, tokenizer, template, seed, per_domain_cap=None, limit=None):
    """(rows, grading kind): the problems of `spec` that can be rewarded, each with its prompt
    tokenised once, as row["prompt_ids"]. Rows whose gold answer cannot be read are left out."""
    rows = load_mixture(spec, per_domain_cap=per_domain_cap, seed=seed)[:limit]
    kind = grading_kind_for(rows[0])
    bad = set(check_gold_answers(rows, kind))                                  # positions in rows
    if bad:
        print0(f"warning: {flag}: {len(bad)} of {len(rows)} gold answers cannot be read (first: "
               f"problem {problem_name(rows[min(bad)])}); they are left out")
        rows = [r for i, r in enumerate(rows) if i not in bad]
    if not rows:
        raise UserError(f"{flag} {spec}: no problem has a gold answer to reward against")
    texts = [format_prompt(r["problem"], template, tokenizer) for r in rows]
    for r, ids in zip(rows, tokenizer(texts, add_special_tokens=False)["input_ids"]):
        r["prompt_ids"] = ids
    return rows, kind


def check_fits_context(rows, extra, what, flag, context):
    """Every prompt plus `extra` tokens (`what` says which) must fit the model's context.
    Returns the longest prompt's length."""
    longest = max(rows, key=lambda r: len(r["prompt_ids"]))
    n = len(longest["prompt_ids"]) + extra
    if n > context:
        raise UserError(f"{flag}: problem {problem_name(longest)}: {what} = {n} tokens exceeds the "
                        f"model's context of {context}; lower --max-new-tokens or leave it out")
    return len(longest["prompt_ids"])


# -----------------------------------------------------------------------------
# Rollouts: one record per step, every per-rollout quantity sliced by the same indices

@dataclass
class Rollouts:
    """One step's rollouts on this rank: B = problems x G, group j in rows j*G .. j*G + G - 1.
    Token-level quantities are in the rollout layout (B, N): token t of completion i at [i, t],
    N = the longest completion, zero after each completion's end."""
    problems: list                      # B data rows (each problem G times)
    prompts: list                       # B token-id lists
    prefixes: list                      # B tensors (L, d) sampled under, or None (no prefix)
    completions: list                   # B token-id lists, the stop token included
    truncated: torch.Tensor             # (B,) bool: cut at --max-new-tokens
    resampled: torch.Tensor = None      # (B,) bool: drawn by the zero-advantage resample
    prefix_sources: list = None         # B names of the source of each prefix ("none": no prefix)
    credit: list = None                 # B rules from CREDIT_RULES: how each rollout is trained
    texts: list = None                  # B decoded completions                     (score)
    correct: torch.Tensor = None        # (B,) the grader's verdict                 (score)
    rewards: torch.Tensor = None        # (B,) after --truncated zero               (score)
    keep: torch.Tensor = None           # (B,) bool: carries loss                   (score)
    advantages: torch.Tensor = None     # (B,) on the regrouped groups              (set_advantages)
    old_logprobs: torch.Tensor = None   # (B, N) under pi_old, where needed         (update)
    old_known: torch.Tensor = None      # (B,) bool: rows of old_logprobs computed  (update)
    ref_logprobs: torch.Tensor = None   # (B, N) under pi_ref, if --kl-coef > 0     (update)

    def __post_init__(self):            # defaults: sampled once, prefix (if any) replayed
        B = len(self.completions)
        if self.resampled is None:
            self.resampled = torch.zeros(B, dtype=torch.bool)
        if self.prefix_sources is None:
            self.prefix_sources = ["none" if p is None else "given" for p in self.prefixes]
        if self.credit is None:
            self.credit = ["prefixed"] * B

    def __len__(self):
        return len(self.completions)

    @property
    def prefixed(self):
        return torch.tensor([p is not None for p in self.prefixes])            # (B,)

    def training_prefixes(self, idx):
        """The prefix each rollout is trained with: the one it was sampled under, except under
        naive credit (a pseudo-rollout of the unprefixed prompt)."""
        return [self.prefixes[i] if self.credit[i] == "prefixed" else None for i in idx]

    def batch(self, model, idx, sampled=False):
        """Rollouts idx in the training layout (completion_batch), embedded by `model`, in the
        context they are trained in, or (sampled=True) in the one they were sampled in."""
        prefixes = [self.prefixes[i] for i in idx] if sampled else self.training_prefixes(idx)
        return completion_batch(model, [self.prompts[i] for i in idx],
                                [self.completions[i] for i in idx], prefixes)

    def select(self, idx):
        """A new record of rollouts idx, every per-rollout field sliced by the same indices."""
        rows = torch.tensor(idx, dtype=torch.long)
        def pick(v):
            return None if v is None else v[rows] if torch.is_tensor(v) else [v[i] for i in idx]
        return Rollouts(**{f.name: pick(getattr(self, f.name)) for f in fields(self)})

    @staticmethod
    def cat(a, b):
        """a's rollouts then b's (both scored, neither updated yet)."""
        def join(x, y):
            if x is None or y is None:
                assert x is None and y is None, "both records must hold the same fields"
                return None
            return torch.cat([x, y]) if torch.is_tensor(x) else x + y
        return Rollouts(**{f.name: join(getattr(a, f.name), getattr(b, f.name)) for f in fields(a)})

    def _token_mask(self, idx, device):
        lengths = torch.tensor([len(self.completions[i]) for i in idx], device=device)  # (b,)
        N = max(len(c) for c in self.completions)
        return torch.arange(N, device=device) < lengths[:, None]                        # (b, N)

    # The training layout (b, T) holds row i's completion tokens, in order, where loss_mask is
    # True, and the rollout layout (b, N) in its first len(completion) columns: the same boolean
    # indexing order, so a masked assignment moves values from one to the other.
    def to_rollout_layout(self, values, loss_mask, idx):
        mask = self._token_mask(idx, values.device)
        out = values.new_zeros(mask.shape)                                              # (b, N)
        out[mask] = values[loss_mask]
        return out

    def to_training_layout(self, stored, loss_mask, idx):
        out = stored.new_zeros(loss_mask.shape)                                         # (b, T)
        out[loss_mask] = stored[idx][self._token_mask(idx, stored.device)]
        return out


@torch.no_grad()
def sample_rollouts(model, rows, prefixes, names, args, generators, eos, resampled=False):
    """One completion for each of the data rows `rows` (prompt ids tokenised once), sampled under
    prefixes[i] (a tensor (L, d) or None), whose source is names[i]."""
    E = model.embed_tokens.weight
    prefixes = [None if p is None else p.to(E.device, E.dtype) for p in prefixes]
    prompts = [r["prompt_ids"] for r in rows]
    model.eval()
    out = generate(model, prompts, prefixes, args.max_new_tokens, args.temperature, top_p=args.top_p,
                   stop_tokens=[eos], generator=generators["sample"])
    return Rollouts(rows, prompts, prefixes, out.token_lists(), truncated=~out.stopped.cpu(),
                    resampled=torch.full((len(rows),), resampled), prefix_sources=names,
                    credit=[args.resample_credit if resampled else "prefixed"] * len(rows))


def rollout(model, source, problems, n_prefixed, L, args, generators, eos):
    """Sample G completions of each problem, n_prefixed of each group with a prefix of its own."""
    G = args.group_size
    rows = [r for r in problems for _ in range(G)]
    prefixes = [None] * len(rows)
    if n_prefixed:
        chosen = choose_prefixed(len(problems), G, n_prefixed, generators["choice"]).nonzero()[:, 0]
        drawn = source.sample(len(chosen), L, generator=generators["prefix"])            # (n, L, d)
        for i, prefix in zip(chosen.tolist(), drawn):
            prefixes[i] = prefix
    names = ["none" if p is None else source.name for p in prefixes]
    return sample_rollouts(model, rows, prefixes, names, args, generators, eos)


def score(rollouts, tokenizer, kind, args):
    """Rewards and the keep mask, filled in place."""
    r = rollouts
    r.texts = tokenizer.batch_decode(r.completions, skip_special_tokens=True)
    r.correct = torch.tensor([grade(t, row["answer"], kind) for t, row in zip(r.texts, r.problems)])
    # a cut-off answer is worth 0 under both rules (where the cut fell decides its grade);
    # --truncated mask also takes it out of the loss
    r.rewards = r.correct.masked_fill(r.truncated, 0.0)                                 # (B,)
    r.keep = ~r.truncated if args.truncated == "mask" else torch.ones_like(r.truncated)


def set_advantages(rollouts, args):
    """Group advantages, in place, on the groups as they will be trained (after regrouping)."""
    rollouts.advantages = group_advantages(rollouts.rewards.view(-1, args.group_size),
                                           args.estimator).flatten()


# -----------------------------------------------------------------------------
# Zero-advantage resampling: the regrouping rule of the docstring

def failed_groups(rollouts, G):
    """The groups (indices) whose G rollouts all failed: every reward is FAILURE_REWARD."""
    return (rollouts.rewards.view(-1, G) == FAILURE_REWARD).all(1).nonzero()[:, 0].tolist()


def regroup(rollouts, extra, groups, G, G_extra):
    """rollouts: B = n G, scored; extra: G_extra scored rollouts for each group in `groups`, in that
    order. Group j keeps its first G - k_j rollouts and takes the first k_j = min(|S_j|, G - 1)
    successes S_j of its resample (reward above FAILURE_REWARD and kept) in the last k_j places.
    Returns (the regrouped record of B rollouts, the number of groups that took a success)."""
    B = len(rollouts)
    both = Rollouts.cat(rollouts, extra)
    success = ((extra.rewards > FAILURE_REWARD) & extra.keep).tolist()
    order, rescued = list(range(B)), 0
    for h, j in enumerate(groups):
        first = h * G_extra
        wins = [B + first + s for s in range(G_extra) if success[first + s]][:G - 1]
        order[(j + 1) * G - len(wins):(j + 1) * G] = wins
        rescued += bool(wins)
    return both.select(order), rescued


def resample_failed_groups(model, source, rollouts, L, args, generators, eos, tokenizer, kind):
    """Sample --resample more rollouts, each under its own prefix from `source` (L tokens), for
    every all-failed group of this rank, score them and regroup. Returns (rollouts, counts)."""
    G, G_extra = args.group_size, args.resample
    groups = failed_groups(rollouts, G)
    counts = {"rollouts_generated": len(rollouts), "resampled_groups": len(groups),
              "rescued_groups": 0, "resample_successes": 0, "resample_rollouts": 0}
    if not groups:
        return rollouts, counts
    rows = [rollouts.problems[j * G] for j in groups for _ in range(G_extra)]
    drawn = source.sample(len(rows), L, generator=generators["prefix"])   # (n G', rows(L), d) or None
    prefixes = [None] * len(rows) if drawn is None else list(drawn)
    extra = sample_rollouts(model, rows, prefixes, [source.name] * len(rows), args, generators, eos,
                            resampled=True)
    score(extra, tokenizer, kind, args)
    regrouped, rescued = regroup(rollouts, extra, groups, G, G_extra)
    counts.update(rollouts_generated=len(rollouts) + len(extra), rescued_groups=rescued,
                  resample_successes=int(((extra.rewards > FAILURE_REWARD) & extra.keep).sum()),
                  resample_rollouts=len(extra))
    return regrouped, counts


def resample_metrics(counts, device, world_size):
    """The resample's counts summed over ranks (ranks resample different numbers of groups)."""
    s = {k: round(v * world_size) for k, v in zip(counts, all_reduce_mean(list(counts.values()), device))}
    return {"rollouts_generated": s["rollouts_generated"], "resampled_groups": s["resampled_groups"],
            "rescued_groups": s["rescued_groups"],
            "resample_accuracy": s["resample_successes"] / s["resample_rollouts"]
            if s["resample_rollouts"] else None}


# -----------------------------------------------------------------------------
# The policy update

@torch.no_grad()
def completion_logprobs(model, rollouts, rows, args, sampled=False):
    """log model(o_it | p_i, q, o_i<t) for the rollouts `rows`, in the rollout layout (B, N),
    zero elsewhere: p_i the prefix the rollout is trained with, or (sampled=True) the one it was
    sampled under (they differ under naive credit). `model` embeds the tokens with its own
    embedding matrix (the reference model with its initial one), and a prefixed rollout gets its
    stored prefix vectors either way."""
    E = model.embed_tokens.weight
    out = torch.zeros(len(rollouts), max(len(c) for c in rollouts.completions), device=E.device,
                      dtype=torch.promote_types(E.dtype, torch.float32))                # (B, N)
    for start in range(0, len(rows), args.micro_batch_size):
        idx = rows[start:start + args.micro_batch_size]
        embeds, mask, targets, loss_mask = rollouts.batch(model, idx, sampled)
        logprobs, _ = token_logprobs_and_entropy(model, embeds, mask, targets, loss_mask,
                                                 args.temperature)
        out[idx] = rollouts.to_rollout_layout(logprobs, loss_mask, idx)
    return out


def shaped_policy_loss(logprobs, old_logprobs, advantages, weights):
    """LoPE's training-signal shaping, for naive-credit rollouts: sum_t w_t * -f(r_t) * A with
    f(r) = r / (r + SHAPING_GAMMA), r = exp(logprobs - old_logprobs), unclipped (f < 1). Rows with
    A = 0 add nothing. logprobs, old_logprobs, weights: (b, T); advantages: (b,)."""
    ratio = (logprobs - old_logprobs).exp()                                             # (b, T)
    shaped = ratio / (ratio + SHAPING_GAMMA)
    return -(weights * shaped * advantages[:, None]).sum()


def minibatch_backward(model, rollouts, rows, args):
    """Accumulate into .grad the gradient of this rank's share of -J on one minibatch, micro-batch
    by micro-batch over its kept rollouts `rows`. The normalisers B' and the token count are means
    over ranks, because sync_gradients averages: after it, .grad is the gradient of -J on the whole
    minibatch. Returns sums for the metrics; sequences == 0 means no rank kept a rollout."""
    device = model.embed_tokens.weight.device
    n_seq, n_tok = all_reduce_mean([len(rows), sum(len(rollouts.completions[i]) for i in rows)], device)
    sums = {"sequences": n_seq, "loss": 0.0, "tokens": 0, "clipped": 0.0, "kl": 0.0, "entropy": 0.0}
    if n_seq == 0:
        return sums
    for start in range(0, len(rows), args.micro_batch_size):
        idx = rows[start:start + args.micro_batch_size]
        fsdp_before_backward(model)      # --fsdp: gather the root, whose weights embed_rows reads
        embeds, mask, targets, loss_mask = rollouts.batch(model, idx)
        logprobs, entropy = token_logprobs_and_entropy(model, embeds, mask, targets, loss_mask,
                                                       args.temperature)              # (b, T)
        old = logprobs.detach()          # pi_old = pi: one update per batch, prefix replayed
        if rollouts.old_logprobs is not None:
            stored = rollouts.to_training_layout(rollouts.old_logprobs, loss_mask, idx)  # (b, T)
            known = torch.ones(len(idx), dtype=torch.bool) if rollouts.old_known is None \
                else rollouts.old_known[idx]                                          # (b,)
            old = torch.where(known[:, None].to(device), stored, old)
        ref = None if rollouts.ref_logprobs is None else \
            rollouts.to_training_layout(rollouts.ref_logprobs, loss_mask, idx)
        weights = loss_token_weights(loss_mask, args.aggregation, n_seq, n_tok, args.max_new_tokens,
                                     logprobs.dtype)
        advantages = rollouts.advantages[idx].to(device)                                 # (b,)
        shaped = torch.tensor([rollouts.credit[i] == "naive-shaped" for i in idx], device=device)
        # shaped rollouts leave the clipped term (A = 0 there) for f(r) A; KL and entropy as usual
        loss, stats = policy_loss(logprobs, old, advantages.masked_fill(shaped, 0.0), weights,
                                  args.clip_eps_low, args.clip_eps_high, ref, args.kl_coef,
                                  entropy, args.entropy_coef)
        if shaped.any():
            loss = loss + shaped_policy_loss(logprobs, old, advantages * shaped, weights)
        loss.backward()
        n = stats["tokens"]
        sums["loss"] += loss.item()
        sums["tokens"] += n
        sums["clipped"] += stats["clip_frac"] * n
        sums["kl"] += stats.get("kl", 0.0) * n
        sums["entropy"] += stats["entropy"] * n
    return sums


def update_policy(model, opt, ref_model, rollouts, args):
    """E epochs x M minibatches of optimiser steps on one step's rollouts; returns the update's
    metrics. A non-finite loss or gradient norm raises FloatingPointError before opt.step."""
    device = model.embed_tokens.weight.device
    model.train()
    kept = rollouts.keep.nonzero()[:, 0].tolist()
    # pi_old: the policy before the first update, in the context each rollout was sampled in.
    # Needed for every rollout when there are several updates; with one, only where the training
    # context differs from the sampling one (naive credit), elsewhere it is the policy itself.
    several = args.epochs * args.minibatches > 1
    need_old = [i for i in kept if several or rollouts.credit[i] != "prefixed"]
    if need_old:
        rollouts.old_logprobs = completion_logprobs(model, rollouts, need_old, args, sampled=True)
        rollouts.old_known = torch.zeros(len(rollouts), dtype=torch.bool)
        rollouts.old_known[need_old] = True
    if ref_model is not None:
        rollouts.ref_logprobs = completion_logprobs(ref_model, rollouts, kept, args)
    keep = rollouts.keep.tolist()
    totals = {"loss": 0.0, "grad_norm": 0.0, "updates": 0, "tokens": 0, "clipped": 0.0, "kl": 0.0,
              "entropy": 0.0}
    for _ in range(args.epochs):
        for minibatch in torch.arange(len(rollouts)).tensor_split(args.minibatches):
            rows = [i for i in minibatch.tolist() if keep[i]]
            sums = minibatch_backward(model, rollouts, rows, args)
            if sums["sequences"] == 0:
                continue                         # nothing kept on any rank: no optimiser step
            if not args.fsdp:                    # FSDP reduce-scatters during backward instead
                sync_gradients(model)            # the one place ranks synchronise
            grad_norm = full_value(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)).item()
            loss = all_reduce_mean([sums["loss"]], device)[0]
            if not math.isfinite(loss) or not math.isfinite(grad_norm):
                what = "gradient norm" if math.isfinite(loss) else "loss"
                raise FloatingPointError(f"non-finite {what} (loss {loss:.4g}, gradient norm {grad_norm:.4g})")
            opt.step()
            opt.zero_grad(set_to_none=True)
            sums.update(loss=loss, grad_norm=grad_norm, updates=1)   # the loss over all ranks
            for k in totals:
                totals[k] += sums[k]
    tokens, clipped, kl, entropy = all_reduce_mean(
        [totals[k] for k in ("tokens", "clipped", "kl", "entropy")], device)
    per_token = lambda s: s / tokens if tokens else None
    updates = max(totals["updates"], 1)
    metrics = {"loss": totals["loss"] / updates,              # -J, mean over the optimiser steps
               "grad_norm": totals["grad_norm"] / updates,    # before clipping, mean over them
               "updates": totals["updates"], "clip_frac": per_token(clipped),
               "entropy": per_token(entropy)}
    if ref_model is not None:
        metrics["kl"] = per_token(kl)
    return metrics


# -----------------------------------------------------------------------------
# What a user watches

def rollout_metrics(r, G, device, world_size):
    """Means over every rollout of every rank, from sums (ranks may hold different numbers of
    prefixed rollouts)."""
    prefixed = r.prefixed
    lengths = torch.tensor([len(c) for c in r.completions], dtype=torch.float64)        # (B,)
    grouped = r.rewards.view(-1, G)                                                       # (p, G)
    local = {"rollouts": len(r), "reward": r.rewards.sum(), "reward_sq": r.rewards.square().sum(),
             "correct": r.correct.sum(), "truncated": r.truncated.sum(), "tokens": lengths.sum(),
             "groups": grouped.shape[0], "zero_variance": (grouped == grouped[:, :1]).all(1).sum(),
             "prefixed": prefixed.sum(), "reward_prefixed": r.rewards[prefixed].sum(),
             "reward_plain": r.rewards[~prefixed].sum(), "grading_failures": GRADER.failures}
    means = all_reduce_mean([float(v) for v in local.values()], device)
    s = {k: v * world_size for k, v in zip(local, means)}                        # sums over ranks
    n, n_prefixed = s["rollouts"], s["prefixed"]
    mean = s["reward"] / n
    longest = torch.tensor(float(lengths.max()), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    return {"reward_mean": mean,
            "reward_std": math.sqrt(max(s["reward_sq"] - n * mean ** 2, 0.0) / max(n - 1, 1)),
            "accuracy": s["correct"] / n, "zero_variance_frac": s["zero_variance"] / s["groups"],
            "completion_len": s["tokens"] / n, "completion_len_max": int(longest.item()),
            "truncated_frac": s["truncated"] / n,
            "reward_prefixed": s["reward_prefixed"] / n_prefixed if n_prefixed else None,
            "reward_plain": s["reward_plain"] / (n - n_prefixed) if n > n_prefixed else None,
            "grading_failures": s["grading_failures"], "gen_tokens": s["tokens"]}


WARN_AFTER = 3   # steps in a row before a warning


def training_warnings(history):
    """Cheap checks on the records so far (one per step, oldest first): the warnings to print
    now. Each fires once, on the step where its condition has held WARN_AFTER steps in a row."""
    def streak(holds):
        window = history[-WARN_AFTER:]
        before = history[-WARN_AFTER - 1] if len(history) > WARN_AFTER else None
        return len(window) == WARN_AFTER and all(map(holds, window)) and \
            (before is None or not holds(before))
    out = []
    if streak(lambda r: r["grad_norm"] == 0):
        out.append(f"warning: the gradient norm has been exactly 0 for {WARN_AFTER} steps: every "
                   "group's rewards are equal (see zero_variance_frac) or every rollout is masked, "
                   "so nothing is learned; try a larger --group-size, other data or a higher --temperature")
    start = [r["reward_mean"] for r in history[:WARN_AFTER]]
    if len(history) >= 2 * WARN_AFTER and sum(start) > 0 and streak(lambda r: r["reward_mean"] == 0):
        out.append(f"warning: the reward has collapsed to 0 for {WARN_AFTER} steps, from "
                   f"{sum(start) / len(start):.3f} at the start: the policy may be diverging; look at "
                   "samples.jsonl and truncated_frac, and try a lower --lr or a --kl-coef")
    return out


# -----------------------------------------------------------------------------
# Checkpoints: weights as a Hugging Face directory, optimiser tensors as safetensors, the rest JSON

def save_checkpoint(path, model, opt, step, rng_states, full_state=None):
    """full_state: under --fsdp, (weights, optimiser state) gathered by fsdp_full_state; the
    optimiser's entries are then keyed by parameter name instead of by index."""
    def write(tmp):
        if full_state is None:
            model.save_pretrained(os.path.join(tmp, "model"))
        else:
            fsdp_whole_model(model, full_state[0]).save_pretrained(os.path.join(tmp, "model"))
        opt_state = opt.state_dict() if full_state is None else full_state[1]
        tensors, meta = {}, {"param_groups": opt_state["param_groups"], "state": {}}
        for idx, state in opt_state["state"].items():
            meta["state"][idx] = sorted(state)
            for key, value in state.items():
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous() \
                    if torch.is_tensor(value) else torch.tensor(value)
        save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
        atomic_write_json(os.path.join(tmp, "trainer_state.json"),
                          {"step": step, "optimizer": meta, "rng": rng_states})
    atomic_save_dir(path, write)


def load_checkpoint(path, opt, device, sharded=None):
    """(step, RNG states) of the checkpoint in `path`, its optimiser state loaded into opt
    (sharded: the FSDP model, whose optimiser state was saved by parameter name). A missing,
    corrupt or mismatched file stops with one line naming it."""
    state_file = os.path.join(path, "trainer_state.json")
    trainer = read_json(state_file, "checkpoint state")
    tensors = read_safetensors_file(os.path.join(path, "optimizer.safetensors"))
    try:
        key = str if sharded is not None else int
        state = {key(idx): {k: tensors.pop(f"{idx}.{k}").to(device if k != "step" else "cpu")
                            for k in keys}
                 for idx, keys in trainer["optimizer"]["state"].items()}
        whole = {"state": state, "param_groups": trainer["optimizer"]["param_groups"]}
        if sharded is None:
            opt.load_state_dict(whole)
        else:
            fsdp_load_optimizer_state(sharded, opt, whole)
        return trainer["step"], trainer["rng"]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: the checkpoint's optimiser state does not match this model or is "
                        f"incomplete ({type(e).__name__}: {e}); resume with the flags that wrote it, "
                        "or start again in a new --out") from None


def generator_state(g):
    return g.get_state().tolist()


def main(argv=None):
    args = parser.parse_args(argv)
    check_args(args, ddp_info()[3])
    if args.resample:
        args.resample_L = resample_length(args)          # written to args.json as used
    P, G = args.prompts_per_step, args.group_size
    ddp, rank, _, world_size, device = compute_init()
    master = rank == 0
    seed_everything(args.seed)
    ckpt_dir = os.path.join(args.out, "checkpoint")
    # RunDir recovers a checkpoint left mid-swap by a killed save before it says whether there
    # is one to resume from, so its answer, not a look at the directory beforehand, decides.
    run = RunDir(args.out, args, master, resume=args.resume)
    resuming = run.resuming

    # -- model, optional reference, prefix source ------------------------------------------
    dtype = getattr(torch, args.dtype)
    start_step = 0
    model, tokenizer = load_policy(os.path.join(ckpt_dir, "model") if resuming else args.model,
                                   device, dtype)
    model.gradient_checkpointing = args.activation_checkpointing
    eos = tokenizer.eos_token_id
    ref_model = None
    if args.kl_coef > 0:   # the initial checkpoint as loaded, also when resuming
        ref_model = Transformer.from_pretrained(args.model, device=device, dtype=dtype).eval().requires_grad_(False)

    def prefix_source(name):
        # prefixes are scaled to the starting policy's token norm, also when resuming; lorem text
        # is read through the policy's current embeddings, as a text prompt would be
        E = model.embed_tokens.weight
        if resuming and name != "lorem":
            E = load_embedding_matrix(resolve_checkpoint(args.model))
        return make_prefix_source(name, E, args.vae, args.region, args.tie, args.seed,
                                  tokenizer=tokenizer)
    source = prefix_source(args.prefix_source) if args.schedule != "none" else None
    resample_source = prefix_source(args.resample_source) if args.resample else None
    prefix_rows = source.rows(args.L) if source else 0
    resample_rows = resample_source.rows(args.resample_L) if resample_source else 0

    # -- data: prompts tokenised once, each checked against the context ------------------------
    context = model.config.max_position_embeddings
    rows, kind = load_problems(args.data, "--data", tokenizer, args.template, args.seed,
                               per_domain_cap=args.per_domain_cap)
    longest = check_fits_context(rows, max(prefix_rows, resample_rows) + args.max_new_tokens,
                                 "prompt + prefix + max_new_tokens", "--data", context)
    check_fits_device(model, args, world_size, longest, device, prefix_rows, resample_rows)
    eval_rows, eval_kind = [], None
    if args.eval_data:
        eval_rows, eval_kind = load_problems(args.eval_data, "--eval-data", tokenizer, args.template,
                                             args.seed, limit=args.eval_problems)
        check_fits_context(eval_rows, args.max_new_tokens, "prompt + max_new_tokens", "--eval-data", context)

    if args.fsdp:
        fsdp_shard(model)                # the optimiser below then holds only this rank's shards
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            betas=(0.9, 0.99), fused=device.type == "cuda")
    generators = {"prefix": torch.Generator().manual_seed(args.seed * 7919 + rank),     # latents
                  "sample": torch.Generator(device=device).manual_seed(args.seed * 104729 + rank),
                  "choice": torch.Generator().manual_seed(args.seed * 31 + rank)}       # who is prefixed
    last_checkpoint = None
    if resuming:
        start_step, rngs = load_checkpoint(ckpt_dir, opt, device, model if args.fsdp else None)
        last_checkpoint = start_step
        set_rng_state(rngs[rank]["global"])
        for name, g in generators.items():
            g.set_state(torch.tensor(rngs[rank][name], dtype=torch.uint8))
        run.truncate_log(start_step - 1)
        run.truncate_log(start_step - 1, "samples.jsonl")
        print0(f"resumed from {ckpt_dir} at step {start_step}")

    def checkpoint_note():
        if last_checkpoint is None:
            return "no checkpoint had been written yet"
        return f"the last checkpoint, {ckpt_dir} (step {last_checkpoint}), is kept"

    def checkpoint(step):
        nonlocal last_checkpoint
        all_finite = torch.stack([local_shard(p.detach()).isfinite().all() for p in model.parameters()]).all()
        if args.fsdp:               # each rank holds other shards: all must be finite
            all_finite = torch.tensor(all_reduce_mean([float(all_finite)], device)[0] == 1.0)
        if not all_finite.item():   # every rank reaches the same answer, so every rank stops here
            raise UserError(f"non-finite weights after step {step - 1}, so no checkpoint is written; "
                            f"{checkpoint_note()}; lower --lr or use --dtype float32")
        state = {"global": rng_state(), **{name: generator_state(g) for name, g in generators.items()}}
        states = [None] * world_size
        if ddp:
            dist.all_gather_object(states, state)
        else:
            states = [state]
        full_state = fsdp_full_state(model, opt) if args.fsdp else None   # every rank gathers
        if master:
            save_checkpoint(ckpt_dir, model, opt, step, states, full_state)
        if ddp:
            dist.barrier()
        last_checkpoint = step

    @torch.no_grad()
    def evaluate_greedy():
        """Held-out greedy pass@1 without prefix, problems sharded over ranks."""
        mine = eval_rows[rank::world_size]
        correct = 0.0
        if mine:
            was_training = model.training
            model.eval()
            out = generate(model, [r["prompt_ids"] for r in mine], None, args.max_new_tokens,
                           temperature=0, stop_tokens=[eos])
            model.train(was_training)
            texts = tokenizer.batch_decode(out.token_lists(), skip_special_tokens=True)
            correct = sum(grade(t, r["answer"], eval_kind) for t, r in zip(texts, mine))
        total, n = all_reduce_mean([correct, len(mine)], device)
        return total / max(n, 1)

    # -- the loop: rollout -> score -> update -> log ---------------------------------------------
    my_prompts = P // world_size
    history = []
    bar = progress(range(start_step, args.steps), "rl", total=args.steps, initial=start_step)
    for step in bar:
        if args.fsdp:
            fsdp_unshard_for_generation(model)   # rollouts (and evaluation) read whole weights
        tau = step / args.steps
        n_prefixed, L = prefix_plan(args.schedule, tau, G, args.rho, args.L)
        lr = args.lr * min(1.0, (step + 1) / max(args.warmup_steps, 1))
        for group in opt.param_groups:
            group["lr"] = lr
        record = {"step": step, "tau": tau, "lr": lr, "rho": n_prefixed / G, "L": L}
        if eval_rows and args.eval_every and step % args.eval_every == 0:
            record["eval_pass1"] = evaluate_greedy()

        t0 = time.perf_counter()
        problems = step_prompts(rows, step, P, args.seed)[rank * my_prompts:(rank + 1) * my_prompts]
        rollouts = rollout(model, source, problems, n_prefixed, L, args, generators, eos)
        t1 = time.perf_counter()
        score(rollouts, tokenizer, kind, args)
        record.update(rollout_metrics(rollouts, G, device, world_size))   # the on-policy rollouts
        t2 = time.perf_counter()
        counts = {"rollouts_generated": len(rollouts), "resampled_groups": 0, "rescued_groups": 0,
                  "resample_successes": 0, "resample_rollouts": 0}
        if args.resample:
            rollouts, counts = resample_failed_groups(model, resample_source, rollouts,
                                                      args.resample_L, args, generators, eos,
                                                      tokenizer, kind)
        record.update(resample_metrics(counts, device, world_size))
        set_advantages(rollouts, args)
        t3 = time.perf_counter()
        try:
            update = update_policy(model, opt, ref_model, rollouts, args)
        except FloatingPointError as e:
            raise UserError(f"{e} at step {step}; stopped before the optimiser step; "
                            f"{checkpoint_note()}; lower --lr or check the data") from None
        t4 = time.perf_counter()

        record.update(update)
        record.update(time_generate=t1 - t0, time_score=t2 - t1, time_resample=t3 - t2,
                      time_update=t4 - t3,
                      gen_tokens_per_s=record.pop("gen_tokens") / max(t1 - t0, 1e-9))
        run.log(record)
        history.append(record)
        for line in training_warnings(history):
            print0(line)
        bar.set_postfix(reward=f"{record['reward_mean']:.3f}", rho=f"{record['rho']:.2f}")
        if master and args.sample_every and step % args.sample_every == 0:
            r = rollouts                  # as trained: after regrouping
            if args.samples_per_step:          # a few to read, and up to two rescued by resampling
                shown = list(range(0, len(r), max(1, len(r) // args.samples_per_step)))
                shown += [i for i in r.resampled.nonzero()[:, 0].tolist() if i not in shown][:2]
            else:                              # every rollout: for measuring behaviour over training
                shown = list(range(len(r)))
            for i in shown:
                prefix = r.prefixes[i]
                run.log({"step": step, "problem": r.problems[i]["problem"], "completion": r.texts[i],
                         "reward": r.rewards[i].item(), "prefixed": prefix is not None,
                         "prefix_source": r.prefix_sources[i],
                         "L": 0 if prefix is None else (args.resample_L if r.resampled[i] else L),
                         "resampled": bool(r.resampled[i]), "credit": r.credit[i]},
                        name="samples.jsonl")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            checkpoint(step + 1)

    if eval_rows:
        if args.fsdp:
            fsdp_unshard_for_generation(model)
        final = evaluate_greedy()
        run.log({"step": args.steps, "eval_pass1": final})
        print0(f"held-out greedy pass@1 after RL: {final:.3f}")
    if not args.fsdp:                    # sharded ranks hold different parts by design
        check_ranks_in_sync(model)
    checkpoint(args.steps)
    weights = fsdp_full_state(model)[0] if args.fsdp else None
    if master:
        (fsdp_whole_model(model, weights) if args.fsdp else model).save_pretrained(
            run.file("model"), tokenizer_dir=model.source_dir)
        print0(f"saved {run.file('model')}")


if __name__ == "__main__":
    run_main(main)
