r"""Stage 2: the SFT warm-up that teaches the policy to read prefixes.

Each (question q, answer o) pair is trained on as [p; E(q); E(o)] where p is L prefix embeddings
decoded from a PRIOR sample z ~ N(0, I) (never the pair's own posterior: the prefix must not
carry the answer, or the model would learn to copy it). The loss is the language-model loss on o
only (prefix and prompt positions carry none). About 10 optimiser steps on purpose: enough to
make the model read prefixes, too few to learn to ignore them or to memorise answers. The VAE is
frozen. With --prefix-source none this is the plain SFT given to the baselines, so that RL
comparisons start from equally fine-tuned models.

Before and after training it measures, on --eval-problems held-out problems: greedy pass@1 with
no prefix (the warm-up must not damage the model) and the fraction of problems whose greedy
answer differs between two prefixes (does the model read them?).

Toy world:
    python sft_warmup.py --model runs/toy/base --vae runs/toy/vae --out runs/toy/sft \
        --data runs/toy/data/math_train.jsonl --eval-data runs/toy/data/math_test.jsonl
    python sft_warmup.py --prefix-source none ... --out runs/toy/sft_plain     # the baseline's SFT
A real model, 8 GPUs:
    torchrun --nproc_per_node 8 sft_warmup.py --model Qwen/Qwen3-4B-Base --vae runs/vae-qwen3-4b \
        --data math=meta-math/MetaMathQA --template math --batch-size 64 --lr 1e-5 \
        --dtype bfloat16 --out runs/sft-qwen3-4b
"""

import argparse
import math
import random

import torch
from tqdm import tqdm

from common import (RunDir, UserError, compute_init, print0, run_main, seed_everything,
                    sync_gradients, check_ranks_in_sync)
from data import format_prompt, grade, grading_kind_for, load_mixture
from model import PREFIX_SOURCES, completion_batch, generate, load_policy, make_prefix_source

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# Data
parser.add_argument("--data", required=True, help="domain=path_or_hub_id,... or one path (rows' own domain)")
parser.add_argument("--per-domain-cap", type=int, default=5000)
parser.add_argument("--template", default="plain", help="plain | math | chat")
parser.add_argument("--max-tokens", type=int, default=1024, help="drop pairs longer than this")
parser.add_argument("--eval-data", default=None, help="held-out problems for the before/after check")
parser.add_argument("--eval-problems", type=int, default=200)
parser.add_argument("--eval-max-new-tokens", type=int, default=128)
# Model
parser.add_argument("--model", required=True, help="hub id or checkpoint directory")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
# Palette
parser.add_argument("--prefix-source", default="vae", choices=PREFIX_SOURCES)
parser.add_argument("--vae", default=None, help="directory written by train_vae.py")
parser.add_argument("--region", default=None, help="sample z from this domain's region, not the prior")
parser.add_argument("--L", type=int, default=1, help="prefix tokens per example")
parser.add_argument("--tie", action="store_true", help="one draw repeated L times instead of L draws")
# Optimisation
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--batch-size", type=int, default=32, help="pairs per step, over all ranks")
parser.add_argument("--micro-batch-size", type=int, default=8, help="pairs per forward/backward")
parser.add_argument("--lr", type=float, default=1e-5)
parser.add_argument("--warmup-steps", type=int, default=2)
parser.add_argument("--weight-decay", type=float, default=0.0)
parser.add_argument("--grad-clip", type=float, default=1.0)
parser.add_argument("--seed", type=int, default=0)
# Output
parser.add_argument("--out", required=True)


@torch.no_grad()
def prefix_sensitivity(model, tokenizer, rows, source, L, template, max_new_tokens, kind):
    """Greedy pass@1 without prefix, and the fraction of problems whose greedy answer differs
    between two different prefixes (the same two draws before and after training)."""
    model.eval()
    prompts = [tokenizer(format_prompt(r["problem"], template, tokenizer),
                         add_special_tokens=False)["input_ids"] for r in rows]
    stop = [tokenizer.eos_token_id]
    decode = lambda out: tokenizer.batch_decode(out.token_lists(), skip_special_tokens=True)
    plain = decode(generate(model, prompts, None, max_new_tokens, temperature=0, stop_tokens=stop))
    pass1 = sum(grade(c, r["answer"], kind) for c, r in zip(plain, rows)) / len(rows)
    result = {"pass1_no_prefix": pass1}
    if source.name != "none" and L > 0:
        g = torch.Generator().manual_seed(12345)
        answers = []
        for _ in range(2):
            prefixes = list(source.sample(len(rows), L, generator=g))
            outs = decode(generate(model, prompts, prefixes, max_new_tokens, temperature=0, stop_tokens=stop))
            answers.append(outs)
        result["pass1_with_prefix"] = sum(grade(c, r["answer"], kind) for c, r in zip(answers[0], rows)) / len(rows)
        result["frac_differ_between_prefixes"] = sum(a != b for a, b in zip(*answers)) / len(rows)
    model.train()
    return result


def main():
    args = parser.parse_args()
    if args.L < 0:
        raise UserError(f"--L must be >= 0, got {args.L}")
    if args.batch_size % args.micro_batch_size:
        raise UserError("--batch-size must be a multiple of --micro-batch-size")
    ddp, rank, _, world_size, device = compute_init()
    if args.batch_size % (world_size * args.micro_batch_size):
        raise UserError(f"--batch-size {args.batch_size} must split into micro-batches of "
                        f"{args.micro_batch_size} over {world_size} ranks")
    master = rank == 0
    seed_everything(args.seed)
    run = RunDir(args.out, args, master)

    model, tokenizer = load_policy(args.model, device, getattr(torch, args.dtype))
    source = make_prefix_source(args.prefix_source, model.embed_tokens.weight, args.vae,
                                args.region, args.tie, args.seed)

    # -- (prompt, answer) token pairs --------------------------------------------------------
    rows = [r for r in load_mixture(args.data, per_domain_cap=args.per_domain_cap, seed=args.seed)
            if r.get("solution")]
    pairs = []
    for r in rows:
        prompt = tokenizer(format_prompt(r["problem"], args.template, tokenizer), add_special_tokens=False)["input_ids"]
        answer = tokenizer(r["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(prompt) + len(answer) + args.L <= args.max_tokens:
            pairs.append((prompt, answer))
    if not pairs:
        raise UserError(f"--data {args.data}: no pairs with a solution within --max-tokens {args.max_tokens}")
    print0(f"{len(pairs)} (question, answer) pairs; prefix source {source.name}, L = {args.L}")

    eval_rows = None
    if args.eval_data:
        eval_rows = load_mixture(args.eval_data, seed=args.seed)[:args.eval_problems]
        kind = grading_kind_for(eval_rows[0])
        before = prefix_sensitivity(model, tokenizer, eval_rows, source, max(args.L, 1),
                                    args.template, args.eval_max_new_tokens, kind)
        print0(f"before warm-up: {before}")

    # -- train ----------------------------------------------------------------------------------
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            betas=(0.9, 0.95))
    per_rank = args.batch_size // world_size
    order = random.Random(args.seed)                    # same permutation on every rank
    g_prefix = torch.Generator().manual_seed(args.seed * 1000 + rank)
    for step in tqdm(range(args.steps), disable=not master, desc="sft"):
        lr = args.lr * min(1.0, (step + 1) / max(args.warmup_steps, 1))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = order.sample(pairs, min(args.batch_size, len(pairs)))[rank * per_rank:(rank + 1) * per_rank]
        n_tokens = sum(len(a) for _, a in batch)
        total_loss = 0.0
        for i in range(0, len(batch), args.micro_batch_size):
            micro = batch[i:i + args.micro_batch_size]
            prefixes = source.sample(len(micro), args.L, generator=g_prefix)   # prior draws
            embeds, mask, targets, loss_mask = completion_batch(
                model, [p for p, _ in micro], [a for _, a in micro],
                None if prefixes is None else list(prefixes.to(device)))
            logprobs, _ = model.token_logprobs(embeds, mask, targets, loss_mask)
            loss = -logprobs.sum() / n_tokens          # token-mean over this rank's batch
            loss.backward()
            total_loss += loss.item()
        if not math.isfinite(total_loss):
            raise UserError(f"non-finite loss at step {step}; nothing was saved; lower --lr")
        sync_gradients(model)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        run.log({"step": step, "loss": total_loss, "grad_norm": grad_norm, "lr": lr, "tokens": n_tokens})

    if eval_rows is not None:
        after = prefix_sensitivity(model, tokenizer, eval_rows, source, max(args.L, 1),
                                   args.template, args.eval_max_new_tokens, kind)
        print0(f"after warm-up:  {after}")
        run.log({"before": before, "after": after}, name="summary.jsonl")
    check_ranks_in_sync(model)
    if master:
        model.save_pretrained(run.file("model"))
        print0(f"saved {run.file('model')}")


if __name__ == "__main__":
    run_main(main)
