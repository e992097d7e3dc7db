r"""Stage 2: the SFT warm-up that teaches the policy to read prefixes.

Each (question q, answer o) pair is trained on as [p; E(q); E(o)] where p is L prefix embeddings
decoded from a PRIOR sample z ~ N(0, I) (never the pair's own posterior: the prefix must not
carry the answer, or the model would learn to copy it). The loss is the language-model loss on o
only (prefix and prompt positions carry none). About 10 optimiser steps on purpose: enough to
make the model read prefixes, too few to learn to ignore them or to memorise answers. The VAE is
frozen. With --prefix-source none this is the plain SFT given to the baselines, so that RL
comparisons start from equally fine-tuned models; noise, random_decoder and lorem warm a policy
up for those baselines' prefixes (lorem: L tokens of fresh pseudo-Latin text, then a boundary
instruction, L + b rows against the context).

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
import os
import random

import torch

from common import (ArgumentParser, RunDir, UserError, all_reduce_mean, at_least, check_out_dir, check_seed,
                    compute_init, finite, positive, print0, progress, run_main, seed_everything,
                    sync_gradients, check_ranks_in_sync, fsdp_before_backward, fsdp_full_state,
                    fsdp_shard, fsdp_unshard_for_generation, fsdp_whole_model, full_value)
from data import TEMPLATES, format_prompt, grade, grading_kind_for, load_mixture
from model import (PREFIX_SOURCES, completion_batch, generate, load_policy, make_prefix_source,
                   prefix_health)

parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# Data
parser.add_argument("--data", required=True, help="domain=path_or_hub_id,... or one path (rows' own domain)")
parser.add_argument("--per-domain-cap", type=int, default=5000)
parser.add_argument("--template", default="plain", choices=TEMPLATES)
parser.add_argument("--max-tokens", type=int, default=1024, help="drop pairs longer than this")
parser.add_argument("--eval-data", default=None, help="held-out problems for the before/after check")
parser.add_argument("--eval-problems", type=int, default=200)
parser.add_argument("--eval-max-new-tokens", type=int, default=128)
# Model
parser.add_argument("--model", required=True, help="hub id or checkpoint directory")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
parser.add_argument("--fsdp", action="store_true", help="shard weights, gradients and optimiser state "
                    "over ranks (FSDP2; rl.py's docstring gives the memory per GPU)")
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


def check_args(args, world_size=1):
    """Every flag's range and the combinations that cannot work, before anything is loaded."""
    at_least(1, per_domain_cap=args.per_domain_cap, max_tokens=args.max_tokens,
             eval_problems=args.eval_problems, eval_max_new_tokens=args.eval_max_new_tokens,
             steps=args.steps, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size)
    at_least(0, L=args.L, warmup_steps=args.warmup_steps)
    finite(lr=args.lr, weight_decay=args.weight_decay, grad_clip=args.grad_clip)
    positive(lr=args.lr, grad_clip=args.grad_clip)
    at_least(0, weight_decay=args.weight_decay)
    if args.lr * args.weight_decay >= 1:
        raise UserError(f"--lr {args.lr} x --weight-decay {args.weight_decay} >= 1 would flip every "
                        "weight's sign at each step; lower them")
    check_seed(args.seed)
    if args.batch_size % (world_size * args.micro_batch_size):
        raise UserError(f"--batch-size {args.batch_size} must split into micro-batches of "
                        f"{args.micro_batch_size} over {world_size} ranks")
    if args.prefix_source == "vae" and args.vae is None:
        raise UserError("--prefix-source vae needs --vae DIR (a directory written by train_vae.py); "
                        "or choose --prefix-source none, noise, random_decoder or lorem")
    if args.tie and args.prefix_source == "lorem":
        raise UserError("--tie has no meaning for the lorem source (its prefix is text, not repeated "
                        "draws); leave --tie out")
    if args.region is not None and args.prefix_source != "vae":
        raise UserError("--region needs --prefix-source vae: regions are areas of the VAE's latent space")
    if args.fsdp and args.prefix_source == "lorem":
        raise UserError("--fsdp cannot read lorem text through the sharded embedding; use another "
                        "prefix source, or leave out --fsdp")
    check_out_dir(args.out)


def check_eval_rows(args, rows, prompts, context, source):
    """Held-out problems must have an answer to grade, and fit the context with their prefix (of
    max(L, 1) tokens, as prefix_sensitivity draws it: source.rows of that, L + b for lorem) and the
    tokens generated for them."""
    L = max(args.L, 1)
    prefix_rows = source.rows(L)
    prefix_note = f"prefix {prefix_rows}" + (f" (L {L} + {prefix_rows - L} boundary tokens)"
                                             if prefix_rows > L else "")
    for r, p in zip(rows, prompts):
        name = r.get("id", r["problem"][:40])
        if r.get("answer") is None:
            raise UserError(f"--eval-data {args.eval_data}: problem {name!r} has no answer to grade against")
        if len(p) + prefix_rows + args.eval_max_new_tokens > context:
            raise UserError(f"--eval-data problem {name!r}: {len(p)} prompt tokens + {prefix_note} + "
                            f"--eval-max-new-tokens {args.eval_max_new_tokens} exceeds the model's "
                            f"context of {context}; lower --eval-max-new-tokens or --L")


def main(argv=None):
    args = parser.parse_args(argv)
    check_args(args, world_size=int(os.environ.get("WORLD_SIZE", 1)))
    ddp, rank, _, world_size, device = compute_init()
    master = rank == 0
    seed_everything(args.seed)
    run = RunDir(args.out, args, master)

    model, tokenizer = load_policy(args.model, device, getattr(torch, args.dtype))
    context = model.config.max_position_embeddings
    source = make_prefix_source(args.prefix_source, model.embed_tokens.weight, args.vae,
                                args.region, args.tie, args.seed, tokenizer=tokenizer)
    prefix_rows = source.rows(args.L)       # embedding rows of one prefix: L, or L + b for lorem
    if prefix_rows + 2 > context:
        raise UserError(f"--L {args.L} ({prefix_rows} prefix rows with {source.name}) leaves no room "
                        f"for a question and an answer in the model's context of {context}; lower --L")

    # -- (prompt, answer) token pairs --------------------------------------------------------
    rows = [r for r in load_mixture(args.data, per_domain_cap=args.per_domain_cap, seed=args.seed)
            if r.get("solution")]
    pairs = []
    limit = min(args.max_tokens, context)         # a pair longer than the context cannot be trained on
    for r in rows:
        prompt = tokenizer(format_prompt(r["problem"], args.template, tokenizer), add_special_tokens=False)["input_ids"]
        answer = tokenizer(r["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(prompt) + len(answer) + prefix_rows <= limit:
            pairs.append((prompt, answer))
    why = "--max-tokens" if args.max_tokens <= context else "the model's context"
    if not pairs:
        raise UserError(f"--data {args.data}: no pairs with a solution within {limit} tokens ({why}) "
                        f"with L = {args.L} ({prefix_rows} prefix rows)")
    if len(pairs) < len(rows):
        print0(f"note: left out {len(rows) - len(pairs)} of {len(rows)} pairs longer than {limit} "
               f"tokens with the prefix ({why})")
    if args.batch_size > len(pairs):   # ranks would get unequal or empty batches (--fsdp: a hang)
        raise UserError(f"--batch-size {args.batch_size} is more than the {len(pairs)} (question, "
                        f"answer) pairs of --data; lower --batch-size or add data")
    print0(f"{len(pairs)} (question, answer) pairs; prefix source {source.name}, L = {args.L}")

    eval_rows = None
    if args.eval_data:
        eval_rows = load_mixture(args.eval_data, seed=args.seed)[:args.eval_problems]
        check_eval_rows(args, eval_rows, [tokenizer(format_prompt(r["problem"], args.template, tokenizer),
                                                    add_special_tokens=False)["input_ids"] for r in eval_rows],
                        context, source)
        kind = grading_kind_for(eval_rows[0])
        before = prefix_sensitivity(model, tokenizer, eval_rows, source, max(args.L, 1),
                                    args.template, args.eval_max_new_tokens, kind)
        print0(f"before warm-up: {before}")

    # -- train ----------------------------------------------------------------------------------
    model.train()
    if args.fsdp:
        fsdp_shard(model)                # the optimiser below then holds only this rank's shards
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            betas=(0.9, 0.95))
    per_rank = args.batch_size // world_size
    order = random.Random(args.seed)                    # same permutation on every rank
    g_prefix = torch.Generator().manual_seed(args.seed * 1000 + rank)
    bar = progress(range(args.steps), "sft")
    for step in bar:
        lr = args.lr * min(1.0, (step + 1) / max(args.warmup_steps, 1))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = order.sample(pairs, args.batch_size)[rank * per_rank:(rank + 1) * per_rank]
        # the token mean over the whole batch: the count is a mean over ranks, as the gradient is
        n_tokens = all_reduce_mean([sum(len(a) for _, a in batch)], device)[0]
        total_loss = 0.0
        for i in range(0, len(batch), args.micro_batch_size):
            micro = batch[i:i + args.micro_batch_size]
            prefixes = source.sample(len(micro), args.L, generator=g_prefix)   # prior draws
            fsdp_before_backward(model)  # --fsdp: gather the root, whose weights embed_rows reads
            embeds, mask, targets, loss_mask = completion_batch(
                model, [p for p, _ in micro], [a for _, a in micro],
                None if prefixes is None else list(prefixes.to(device)))
            logprobs, _ = model.token_logprobs(embeds, mask, targets, loss_mask)
            loss = -logprobs.sum() / n_tokens          # this rank's share of the batch's token mean
            loss.backward()
            total_loss += loss.item()
        total_loss = all_reduce_mean([total_loss], device)[0]    # the batch's loss, all ranks
        if not math.isfinite(total_loss):
            raise UserError(f"non-finite loss at step {step}; nothing was saved; lower --lr")
        if not args.fsdp:                # FSDP reduce-scatters during backward instead
            sync_gradients(model)
        grad_norm = full_value(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        run.log({"step": step, "loss": total_loss, "grad_norm": grad_norm, "lr": lr,
                 "tokens": round(n_tokens * world_size)})
        bar.set_postfix(loss=f"{total_loss:.4f}")

    if args.fsdp:
        weights = fsdp_full_state(model)[0]      # every rank gathers; rank 0 keeps the whole copy
        fsdp_unshard_for_generation(model)       # the checks below generate with whole weights
    if eval_rows is not None:
        after = prefix_sensitivity(model, tokenizer, eval_rows, source, max(args.L, 1),
                                   args.template, args.eval_max_new_tokens, kind)
        print0(f"after warm-up:  {after}")
        run.log({"before": before, "after": after}, name="summary.jsonl")
    if not args.fsdp:                            # sharded ranks hold different parts by design
        check_ranks_in_sync(model)
    if master:
        (fsdp_whole_model(model, weights) if args.fsdp else model).save_pretrained(run.file("model"))
        print0(f"saved {run.file('model')}")
        # can the warmed-up policy read the prefixes? (geometry, changed and broken answers; the
        # answers are compared on their first tokens, at most 32 and no more than the eval budget)
        health, health_lines = prefix_health(source, model, [p for p, _ in pairs[:64]], tokenizer,
                                             max(args.L, 1),
                                             max_new_tokens=min(32, args.eval_max_new_tokens))
        for line in health_lines:
            print0(line)
        run.log({"prefix_health": health}, name="summary.jsonl")


if __name__ == "__main__":
    run_main(main)
