r"""Stage 3: GRPO / RLOO with latent-guided exploration (Reasoning Palette).

Each step takes P prompts (sharded over ranks; a group never spans ranks) and samples G
completions of each. Before sampling, the schedule decides how many rollouts of each group carry
a prefix: those draw their OWN latent z, decoded into L prefix embeddings placed before the
prompt; the rest get none. The prefix is stored with its rollout, so every later log-prob is
computed in exactly the context the rollout was sampled in.

The objective, per rollout batch (sum over completion tokens t of rollout i, with weights w_it):

    J = sum_it w_it * min(r_it * A_i, clip(r_it, 1 - eps_low, 1 + eps_high) * A_i)
        - kl_coef * sum_it w_it * k3_it
    r_it  = pi(o_it | p_i, q, o_i<t) / pi_old(o_it | p_i, q, o_i<t), both from training forward
            passes at the sampling temperature (pi_old: before this batch's first update; the
            sampler's own log-probs are never used)
    A_i   = grpo:   (R_i - mean_g R) / (std_g R + 1e-6), std with Bessel's correction
            rloo:   R_i - mean of the other G - 1 rewards of the group
            drgrpo: R_i - mean_g R
            (a group with equal rewards has A = 0 and is counted as zero-variance)
    k3_it = exp(ref - logp) - (ref - logp) - 1, against the frozen initial policy; kl_coef = 0 by
            default, and then no reference model is loaded at all
    w_it  = token-mean: 1 / (completion tokens in the batch); seq-mean: 1 / (B |o_i|);
            constant: 1 / (B * max_new_tokens) (Dr. GRPO)

How it differs from the textbook algorithms: GRPO as in DeepSeekMath but with asymmetric clipping
(eps_high > eps_low as in DAPO), no KL by default, and token-mean aggregation over the batch
rather than a per-sequence mean; RLOO is used with the same clipped surrogate (RLOO proper is
plain REINFORCE: set --epochs 1 --minibatches 1, where the ratio is 1 and the clip inactive).
The policy conditions on the prefix p_i, and the same p_i is replayed in every ratio.

Schedules over progress tau = step / steps: none (baseline); two-stage (all rollouts prefixed
with L tokens while tau < 0.5, none after); linear (rho = 1 - tau of each group prefixed);
constant (a fixed rho). round(rho * G) rollouts of each group get a prefix, chosen at random.

Toy world:
    python rl.py --model runs/toy/sft/model --vae runs/toy/vae --schedule linear --L 8 \
        --data runs/toy/data/math_train.jsonl --eval-data runs/toy/data/math_test.jsonl --out runs/toy/rl_linear
    python rl.py --model runs/toy/sft_plain/model --schedule none ... --out runs/toy/rl_none
8 GPUs:
    torchrun --nproc_per_node 8 rl.py --model runs/sft-qwen3-4b/model --vae runs/vae-qwen3-4b \
        --schedule linear --L 8 --data math=../shared/data/gsm8k_train.jsonl --template math \
        --prompts-per-step 64 --group-size 8 --max-new-tokens 1024 --dtype bfloat16 --out runs/rl-qwen3-4b
Resume a killed run from its last checkpoint: add --resume (same flags).
"""

import argparse
import json
import math
import os
import random
import time

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from common import (RunDir, UserError, all_reduce_mean, atomic_save_dir, atomic_write_json,
                    compute_init, print0, rng_state, run_main, seed_everything, set_rng_state,
                    sync_gradients, check_ranks_in_sync)
from data import GRADER, check_gold_answers, format_prompt, grade, grading_kind_for, load_mixture
from model import (ADVANTAGE_ESTIMATORS, LOSS_AGGREGATIONS, PREFIX_SOURCES, Transformer,
                   completion_batch, generate, group_advantages, load_embedding_matrix,
                   load_policy, loss_token_weights, make_prefix_source, policy_loss,
                   resolve_checkpoint)

SCHEDULES = ("none", "two-stage", "linear", "constant")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# Data
parser.add_argument("--data", required=True, help="training problems: domain=path_or_id,... or a path")
parser.add_argument("--per-domain-cap", type=int, default=None)
parser.add_argument("--template", default="plain", help="plain | math | chat")
parser.add_argument("--eval-data", default=None, help="held-out problems for greedy pass@1")
parser.add_argument("--eval-problems", type=int, default=200)
parser.add_argument("--eval-every", type=int, default=10, help="steps between held-out evaluations (0: only at the end)")
# Model
parser.add_argument("--model", required=True, help="hub id or checkpoint directory (after sft_warmup.py)")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
parser.add_argument("--activation-checkpointing", action="store_true", help="recompute layers in backward")
# Palette
parser.add_argument("--schedule", default="linear", choices=SCHEDULES)
parser.add_argument("--rho", type=float, default=0.5, help="prefixed fraction of each group (constant)")
parser.add_argument("--L", type=int, default=8, help="prefix tokens of a prefixed rollout")
parser.add_argument("--prefix-source", default="vae", choices=PREFIX_SOURCES)
parser.add_argument("--vae", default=None, help="directory written by train_vae.py")
parser.add_argument("--region", default=None, help="sample z from this domain's region instead of the prior")
parser.add_argument("--tie", action="store_true", help="one draw repeated L times instead of L draws")
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


def prefix_plan(schedule, tau, G, rho, L):
    """(rollouts of a group that carry a prefix, prefix length) at progress tau in [0, 1)."""
    if schedule == "none" or L == 0:
        return 0, 0
    if schedule == "two-stage":
        return (G, L) if tau < 0.5 else (0, 0)
    fraction = 1.0 - tau if schedule == "linear" else rho
    return round(fraction * G), L


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


# -----------------------------------------------------------------------------
# Checkpoints: weights as a Hugging Face directory, optimiser tensors as safetensors, the rest JSON

def save_checkpoint(path, model, opt, step, rng_states):
    def write(tmp):
        model.save_pretrained(os.path.join(tmp, "model"))
        tensors, meta = {}, {"param_groups": opt.state_dict()["param_groups"], "state": {}}
        for idx, state in opt.state_dict()["state"].items():
            meta["state"][idx] = sorted(state)
            for key, value in state.items():
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous() \
                    if torch.is_tensor(value) else torch.tensor(value)
        save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
        atomic_write_json(os.path.join(tmp, "trainer_state.json"),
                          {"step": step, "optimizer": meta, "rng": rng_states})
    atomic_save_dir(path, write)


def load_checkpoint(path, opt, device):
    with open(os.path.join(path, "trainer_state.json")) as f:
        trainer = json.load(f)
    state = {}
    with safe_open(os.path.join(path, "optimizer.safetensors"), framework="pt") as f:
        for idx, keys in trainer["optimizer"]["state"].items():
            state[int(idx)] = {k: f.get_tensor(f"{idx}.{k}").to(device if k != "step" else "cpu")
                               for k in keys}
    opt.load_state_dict({"state": state, "param_groups": trainer["optimizer"]["param_groups"]})
    return trainer["step"], trainer["rng"]


def generator_state(g):
    return g.get_state().tolist()


def main():
    args = parser.parse_args()
    P, G = args.prompts_per_step, args.group_size
    if args.L < 0:
        raise UserError(f"--L must be >= 0, got {args.L}")
    if not 0.0 <= args.rho <= 1.0:
        raise UserError(f"--rho must be in [0, 1], got {args.rho}")
    if args.schedule != "none" and args.prefix_source == "none":
        raise UserError(f"--schedule {args.schedule} needs a --prefix-source (vae, noise, random_decoder)")
    ddp, rank, _, world_size, device = compute_init()
    if P % world_size:
        raise UserError(f"--prompts-per-step {P} must be a multiple of the {world_size} ranks")
    master = rank == 0
    seed_everything(args.seed)
    ckpt_dir = os.path.join(args.out, "checkpoint")
    resuming = args.resume and os.path.exists(os.path.join(ckpt_dir, "trainer_state.json"))
    run = RunDir(args.out, args, master, resume=resuming)

    # -- model, optional reference, prefix source ------------------------------------------
    dtype = getattr(torch, args.dtype)
    start_step = 0
    model, tokenizer = load_policy(os.path.join(ckpt_dir, "model") if resuming else args.model,
                                   device, dtype)
    model.gradient_checkpointing = args.activation_checkpointing
    eos = tokenizer.eos_token_id
    ref_model = None
    if args.kl_coef > 0:
        ref_model = Transformer.from_pretrained(args.model, device=device, dtype=dtype).eval().requires_grad_(False)
    # prefixes are scaled to the starting policy's token norm, also when resuming
    E = load_embedding_matrix(resolve_checkpoint(args.model)) if resuming else model.embed_tokens.weight
    source = make_prefix_source(args.prefix_source, E, args.vae, args.region, args.tie, args.seed)

    # -- data ------------------------------------------------------------------------------------
    rows = [r for r in load_mixture(args.data, per_domain_cap=args.per_domain_cap, seed=args.seed)
            if r.get("answer") is not None]
    if not rows:
        raise UserError(f"--data {args.data}: no problems with an answer to reward against")
    kind = grading_kind_for(rows[0])
    bad = check_gold_answers(rows, kind)
    if bad:
        print0(f"warning: {len(bad)} gold answers cannot be parsed (first: {bad[0]}); they are left out")
        bad = set(bad)
        rows = [r for r in rows if r.get("id") not in bad]
    encode = lambda r: tokenizer(format_prompt(r["problem"], args.template, tokenizer),
                                 add_special_tokens=False)["input_ids"]
    context = model.config.max_position_embeddings
    for r in rows:
        n = len(encode(r)) + args.L + args.max_new_tokens
        if n > context:
            raise UserError(f"problem {r.get('id', r['problem'][:40])!r}: prompt + L + max_new_tokens = "
                            f"{n} tokens exceeds the model's context of {context}; lower --max-new-tokens")
    eval_rows = load_mixture(args.eval_data, seed=args.seed)[:args.eval_problems] if args.eval_data else []

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            betas=(0.9, 0.99), fused=device.type == "cuda")
    g_prefix = torch.Generator().manual_seed(args.seed * 7919 + rank)           # latents
    g_sample = torch.Generator(device=device).manual_seed(args.seed * 104729 + rank)  # tokens
    g_choice = torch.Generator().manual_seed(args.seed * 31 + rank)             # who gets a prefix
    if resuming:
        start_step, rngs = load_checkpoint(ckpt_dir, opt, device)
        mine = rngs[rank]
        set_rng_state(mine["global"])
        for g, name in ((g_prefix, "prefix"), (g_sample, "sample"), (g_choice, "choice")):
            g.set_state(torch.tensor(mine[name], dtype=torch.uint8))
        run.truncate_log(start_step - 1)
        run.truncate_log(start_step - 1, "samples.jsonl")
        print0(f"resumed from {ckpt_dir} at step {start_step}")

    def checkpoint(step):
        state = {"global": rng_state(), "prefix": generator_state(g_prefix),
                 "sample": generator_state(g_sample), "choice": generator_state(g_choice)}
        states = [None] * world_size
        if ddp:
            dist.all_gather_object(states, state)
        else:
            states = [state]
        if master:
            save_checkpoint(ckpt_dir, model, opt, step, states)
        if ddp:
            dist.barrier()

    @torch.no_grad()
    def evaluate_greedy():
        """Held-out greedy pass@1 without prefix, problems sharded over ranks."""
        mine = eval_rows[rank::world_size]
        out = generate(model, [encode(r) for r in mine], None, args.max_new_tokens,
                       temperature=0, stop_tokens=[eos])
        texts = tokenizer.batch_decode(out.token_lists(), skip_special_tokens=True)
        correct = sum(grade(t, r["answer"], kind) for t, r in zip(texts, mine))
        total, n = all_reduce_mean([correct, len(mine)], device)
        return total / max(n, 1)

    # -- the loop ----------------------------------------------------------------------------
    my_prompts = P // world_size
    progress = tqdm(range(start_step, args.steps), disable=not master, desc="rl", initial=start_step,
                    total=args.steps)
    for step in progress:
        tau = step / args.steps
        n_prefixed, L = prefix_plan(args.schedule, tau, G, args.rho, args.L)
        lr = args.lr * min(1.0, (step + 1) / max(args.warmup_steps, 1))
        for group in opt.param_groups:
            group["lr"] = lr
        record = {"step": step, "tau": tau, "lr": lr, "rho": n_prefixed / G, "L": L}
        if eval_rows and args.eval_every and step % args.eval_every == 0:
            record["eval_pass1"] = evaluate_greedy()

        # 1. rollouts: G per prompt, each prefixed rollout with its own latent -----------------
        t0 = time.perf_counter()
        problems = step_prompts(rows, step, P, args.seed)[rank * my_prompts:(rank + 1) * my_prompts]
        prompts = [encode(r) for r in problems for _ in range(G)]                 # (B = p * G)
        prefixes = [None] * len(prompts)
        if n_prefixed:
            drawn = source.sample(len(problems) * n_prefixed, L, generator=g_prefix)   # (n, L, d)
            k = 0
            for j in range(len(problems)):
                for i in torch.randperm(G, generator=g_choice)[:n_prefixed].tolist():
                    prefixes[j * G + i] = drawn[k].to(device, dtype)
                    k += 1
        model.eval()
        out = generate(model, prompts, prefixes, args.max_new_tokens, args.temperature,
                       top_p=args.top_p, stop_tokens=[eos], generator=g_sample)
        completions = out.token_lists()
        truncated = ~out.stopped.cpu()
        t1 = time.perf_counter()

        # 2. rewards and advantages -------------------------------------------------------------
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        answers = [r["answer"] for r in problems for _ in range(G)]
        rewards = torch.tensor([grade(t, a, kind) for t, a in zip(texts, answers)])       # (B,)
        correct = rewards.clone()
        if args.truncated == "zero":
            rewards[truncated] = 0.0
        advantages = group_advantages(rewards.view(-1, G), args.estimator).flatten()      # (B,)
        keep = ~truncated if args.truncated == "mask" else torch.ones_like(truncated)
        t2 = time.perf_counter()

        # 3. policy update: old log-probs from a training forward pass, then E x M optimiser steps
        model.train()
        embeds_of = lambda idx: completion_batch(model, [prompts[i] for i in idx],
                                                 [completions[i] for i in idx],
                                                 [prefixes[i] for i in idx])
        B = len(prompts)
        micro = args.micro_batch_size
        n_updates = args.epochs * args.minibatches
        old_logprobs = ref_logprobs = None
        if n_updates > 1 or ref_model is not None:
            old_logprobs, ref_logprobs = {}, {}
            with torch.no_grad():
                for s in range(0, B, micro):
                    idx = list(range(s, min(s + micro, B)))
                    embeds, mask, targets, loss_mask = embeds_of(idx)
                    if n_updates > 1:
                        old_logprobs[s] = model.token_logprobs(embeds, mask, targets, loss_mask,
                                                               args.temperature)[0]
                    if ref_model is not None:
                        ref_logprobs[s] = ref_model.token_logprobs(embeds, mask, targets, loss_mask,
                                                                   args.temperature)[0]
        mb_size = B // args.minibatches
        stats = {"clip_frac": [], "kl": [], "entropy": [], "grad_norm": []}
        loss_value = 0.0
        for _ in range(args.epochs):
            for mb in range(args.minibatches):
                rows_mb = range(mb * mb_size, B if mb == args.minibatches - 1 else (mb + 1) * mb_size)
                lens = [len(completions[i]) * bool(keep[i]) for i in rows_mb]
                n_tok, n_seq = all_reduce_mean([sum(lens), sum(1 for i in rows_mb if keep[i])], device)
                for s in range(rows_mb.start, rows_mb.stop, micro):
                    idx = list(range(s, min(s + micro, rows_mb.stop)))
                    embeds, mask, targets, loss_mask = embeds_of(idx)
                    loss_mask &= keep[idx].to(device)[:, None]
                    logprobs, entropy = model.token_logprobs(embeds, mask, targets, loss_mask,
                                                             args.temperature)
                    old = logprobs.detach() if old_logprobs is None else old_logprobs[s]
                    weights = loss_token_weights(loss_mask, args.aggregation, max(n_seq, 1e-9),
                                                 max(n_tok, 1e-9), args.max_new_tokens)
                    loss, st = policy_loss(logprobs, old, advantages[idx].to(device), weights,
                                           args.clip_eps_low, args.clip_eps_high,
                                           None if ref_logprobs is None else ref_logprobs[s],
                                           args.kl_coef)
                    loss.backward()
                    loss_value += loss.item()
                    stats["clip_frac"].append(st["clip_frac"])
                    stats["kl"].append(st.get("kl", 0.0))
                    stats["entropy"].append((entropy * loss_mask).sum().item() / max(int(loss_mask.sum()), 1))
                if not math.isfinite(loss_value):
                    raise UserError(f"non-finite loss at step {step}; the last good checkpoint in "
                                    f"{ckpt_dir} is kept; lower --lr or check the data")
                sync_gradients(model)                    # the one place ranks synchronise
                stats["grad_norm"].append(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                                         args.grad_clip).item())
                opt.step()
                opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()

        # 4. what a user watches ---------------------------------------------------------------------
        prefixed = torch.tensor([p is not None for p in prefixes])
        zero_var = (rewards.view(-1, G) == rewards.view(-1, G)[:, :1]).all(1).float().mean().item()
        lengths = out.lengths.float().cpu()
        local = [rewards.mean().item(), rewards.std().item() if B > 1 else 0.0, correct.mean().item(),
                 zero_var, lengths.mean().item(), truncated.float().mean().item(),
                 sum(stats["clip_frac"]) / len(stats["clip_frac"]), sum(stats["kl"]) / len(stats["kl"]),
                 sum(stats["entropy"]) / len(stats["entropy"]), loss_value,
                 rewards[prefixed].mean().item() if prefixed.any() else float("nan"),
                 rewards[~prefixed].mean().item() if (~prefixed).any() else float("nan"),
                 float(GRADER.failures)]
        names = ["reward_mean", "reward_std", "accuracy", "zero_variance_frac", "completion_len",
                 "truncated_frac", "clip_frac", "kl", "entropy", "loss", "reward_prefixed",
                 "reward_plain", "grading_failures"]
        record.update(zip(names, all_reduce_mean(local, device)))
        gen_tokens = int(lengths.sum()) * world_size
        record.update({"grad_norm": stats["grad_norm"][-1], "time_generate": t1 - t0,
                       "time_score": t2 - t1, "time_update": t3 - t2,
                       "gen_tokens_per_s": gen_tokens / max(t1 - t0, 1e-9),
                       "completion_len_max": int(lengths.max())})
        run.log(record)
        progress.set_postfix(reward=f"{record['reward_mean']:.3f}", rho=f"{record['rho']:.2f}")
        if master and args.sample_every and step % args.sample_every == 0:
            for i in range(0, B, max(1, B // 4)):
                run.log({"step": step, "problem": problems[i // G]["problem"], "completion": texts[i],
                         "reward": rewards[i].item(), "prefixed": bool(prefixed[i]),
                         "prefix_source": source.name if prefixed[i] else "none", "L": L},
                        name="samples.jsonl")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            checkpoint(step + 1)

    if eval_rows:
        final = evaluate_greedy()
        run.log({"step": args.steps, "eval_pass1": final})
        print0(f"held-out greedy pass@1 after RL: {final:.3f}")
    check_ranks_in_sync(model)
    checkpoint(args.steps)
    if master:
        model.save_pretrained(run.file("model"), tokenizer_dir=model.source_dir)
        print0(f"saved {run.file('model')}")


if __name__ == "__main__":
    run_main(main)
