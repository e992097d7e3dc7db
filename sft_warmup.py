r"""Stage 2: the SFT warm-up that teaches the policy to read prefixes.

Each (question q, answer o) pair is trained on as [p; E(q); E(o)] where p is L prefix embeddings
decoded from a PRIOR sample z ~ N(0, I) (never the pair's own posterior: the prefix must not
carry the answer, or the model would learn to copy it). The loss is the language-model loss on o
only (prefix and prompt positions carry none). About 10 optimiser steps on purpose: enough to
make the model read prefixes, too few to learn to ignore them or to memorise answers. The VAE is
frozen. With --prefix-source none this is the plain SFT given to the baselines, so that RL
comparisons start from equally fine-tuned models; the other sources warm a policy up for those
baselines' prefixes (lorem: L tokens of fresh pseudo-Latin text, then a boundary instruction).
The loss is a token mean over the whole batch, however it is split over ranks and micro-batches,
and step s draws the prefixes of its whole batch from a seed derived from (--seed, s), so a run
gives the same model on any number of ranks. --dtype bfloat16 computes under autocast with fp32
master weights and optimiser state. The policy records the prefixes it was taught (source and L,
in config.json), and rl.py says so when it is given others.

Before and after training it measures, on --eval-problems held-out problems: greedy pass@1 with
no prefix (the warm-up must not damage the model) and the fraction of problems whose greedy
answer differs between two prefixes (does the model read them?).

Toy world:
    python sft_warmup.py --model runs/toy/base --vae runs/toy/vae --out runs/toy/sft \
        --data runs/toy/data/math_train.jsonl --eval-data runs/toy/data/math_test.jsonl
    python sft_warmup.py --prefix-source none ... --out runs/toy/sft_plain     # the baseline's SFT
Qwen3-4B on 8 GPUs of 80 GB (sharded: replicated fp32 weights, gradients and AdamW take 64 GB a GPU):
    torchrun --nproc_per_node 8 sft_warmup.py --model Qwen/Qwen3-4B-Base --vae runs/vae-qwen3-4b \
        --data math=meta-math/MetaMathQA --template math --batch-size 64 --lr 1e-5 \
        --dtype bfloat16 --fsdp --out runs/sft-qwen3-4b
"""

import argparse
import math
import random

import torch

import diagnostics
import fsdp
from common import (RunDir, all_reduce_mean, check_ranks_in_sync, compute_init, derived_seed, print0, progress,
                    run_main, seed_everything, sync_gradients)
from data import HELD_OUT_SEED, TEMPLATES, format_prompt, load_mixture
from guard import SEED, ArgumentParser, UserError, check_fits_context, fit_memory, memory_need, ranged, refuse_unused
from model import (Transformer, add_prefix_arguments, check_prefix_sources, completion_batch, load_config,
                   load_embedding_matrix, load_tokenizer, make_prefix_source, resolve_checkpoint, token_logprobs)

parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# Data
parser.add_argument("--data", required=True, help="domain=path_or_hub_id,... or one path (rows' own domain)")
parser.add_argument("--per-domain-cap", type=ranged(int, 1), default=5000)
parser.add_argument("--template", default="plain", choices=TEMPLATES)
parser.add_argument("--max-tokens", type=ranged(int, 1), default=1024, help="drop pairs longer than this")
parser.add_argument("--eval-data", default=None, help="held-out problems for the before/after check")
parser.add_argument("--eval-problems", type=ranged(int, 1), default=200)
parser.add_argument("--eval-max-new-tokens", type=ranged(int, 1), default=128)
# Model
parser.add_argument("--model", required=True, help="hub id or checkpoint directory")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="bfloat16: bf16 compute, fp32 master weights and optimiser state")
parser.add_argument("--activation-checkpointing", default="auto", choices=["auto", "on", "off"],
                    help="recompute layers in backward (auto: when the memory model says it is needed)")
parser.add_argument("--fsdp", action="store_true", help="shard weights, gradients and optimiser state "
                    "over ranks (FSDP2, fsdp.py; docs/fsdp.md gives the memory per GPU)")
# Palette
add_prefix_arguments(parser, L_help="prefix tokens per example")     # --prefix-source --vae --region --L --tie
# Optimisation
parser.add_argument("--steps", type=ranged(int, 1), default=10)
parser.add_argument("--batch-size", type=ranged(int, 1), default=32, help="pairs per step, over all ranks")
parser.add_argument("--micro-batch-size", type=ranged(int, 0), default=0,
                    help="pairs per forward/backward (0: the largest of 32, 16, ..., 1 that fits the memory)")
parser.add_argument("--lr", type=ranged(float, above=0), default=1e-5)
parser.add_argument("--warmup-steps", type=ranged(int, 0), default=2)
parser.add_argument("--weight-decay", type=ranged(float, 0), default=0.0)
parser.add_argument("--grad-clip", type=ranged(float, above=0, inf=True), default=1.0, help="inf: no clipping")
parser.add_argument("--seed", type=SEED, default=0)
# Output
parser.add_argument("--out", required=True)
parser.add_argument("--tensorboard", action="store_true", help="also log metrics.jsonl's records to --out/tensorboard "
                    "(TensorBoard event files, which W&B can import); needs the tensorboard package")


def check_args(args, world_size=1):
    """The rules between flags, before anything is loaded (each flag's own range is on the flag)."""
    if args.lr * args.weight_decay >= 1:
        raise UserError(f"--lr {args.lr} x --weight-decay {args.weight_decay} >= 1 would flip every "
                        "weight's sign at each step; lower them")
    if args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} must split over the {world_size} ranks")
    unused = {} if args.eval_data else dict.fromkeys(("eval_problems", "eval_max_new_tokens"), "there is no --eval-data")
    if args.prefix_source == "none":
        unused.update(dict.fromkeys(("L", "tie", "vae", "region"), "--prefix-source none draws no prefix"))
    refuse_unused(args, parser, unused)
    check_prefix_sources([("--prefix-source", args.prefix_source)], args.vae, args.region, args.tie, args.L)


def load_pairs(args, tokenizer, prefix_rows, context):
    """(prompt ids, answer ids + eos) of every row with a solution that fits, with its prefix,
    within --max-tokens and the context; the rest are left out with a note."""
    rows = [r for r in load_mixture(args.data, per_domain_cap=args.per_domain_cap, seed=args.seed) if r.get("solution")]
    limit = min(args.max_tokens, context)
    pairs = [(tokenizer(format_prompt(r["problem"], args.template, tokenizer), add_special_tokens=False)["input_ids"],
              tokenizer(r["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]) for r in rows]
    pairs = [(p, a) for p, a in pairs if len(p) + len(a) + prefix_rows <= limit]
    why = "--max-tokens" if args.max_tokens <= context else "the model's context"
    if not pairs:
        raise UserError(f"--data {args.data}: no pairs with a solution within {limit} tokens ({why}) "
                        f"with L = {args.L} ({prefix_rows} prefix rows)")
    if len(pairs) < len(rows):
        print0(f"note: left out {len(rows) - len(pairs)} of {len(rows)} pairs longer than {limit} tokens with "
               f"the prefix ({why})")
    if args.batch_size > len(pairs):   # ranks would get unequal or empty batches (--fsdp: a hang)
        raise UserError(f"--batch-size {args.batch_size} is more than the {len(pairs)} (question, answer) "
                        "pairs of --data; lower --batch-size or add data")
    return pairs


def memory_plan(args, config, world_size, longest, device):
    """(micro-batch, checkpointing) that fit this rank's free memory (guard.fit_memory); longest:
    the longest [prefix; question; answer] in tokens."""
    return fit_memory(lambda micro, checkpointing: memory_need(
        config, args.dtype == "bfloat16", world_size, args.fsdp, train_rows=min(micro, args.batch_size // world_size),
        train_len=longest, checkpointing=checkpointing), device, args.micro_batch_size, args.activation_checkpointing,
        "--max-tokens")


def main(argv=None):
    args = parser.parse_args(argv)
    ddp, rank, world_size, device = compute_init()
    check_args(args, world_size)
    if args.fsdp and not ddp:
        raise UserError("--fsdp shards over ranks: launch with torchrun --nproc_per_node N, or leave --fsdp out")
    seed_everything(args.seed)

    path = resolve_checkpoint(args.model)
    config, bf16 = load_config(path), args.dtype == "bfloat16"
    tokenizer = load_tokenizer(path, config.vocab_size)
    context = config.max_position_embeddings
    source = make_prefix_source(args.prefix_source, load_embedding_matrix(path), tokenizer, args.vae, args.region,
                                args.tie, args.seed)              # L = 0: it draws no prefix (None)
    pairs = load_pairs(args, tokenizer, source.rows(args.L), context)
    print0(f"{len(pairs)} (question, answer) pairs; prefix source {source.name}, L = {args.L}")
    longest = max(len(p) + len(a) for p, a in pairs) + source.rows(args.L)
    args.micro_batch_size, checkpointing = memory_plan(args, config, world_size, longest, device)
    run = RunDir(args.out, args)                       # nothing is written before the checks above
    model = Transformer.from_pretrained(path, device)                      # fp32 master weights
    model.gradient_checkpointing = checkpointing
    eval_rows = load_mixture(args.eval_data, seed=HELD_OUT_SEED)[:args.eval_problems] if args.eval_data else None
    if eval_rows:                      # the check draws prefixes of max(L, 1) tokens
        for r in eval_rows:
            r["prompt_ids"] = tokenizer(format_prompt(r["problem"], args.template, tokenizer),
                                        add_special_tokens=False)["input_ids"]
        check_fits_context(eval_rows, source.rows(max(args.L, 1)) + args.eval_max_new_tokens,
                           f"prompt + {source.rows(max(args.L, 1))}-row prefix (--L {max(args.L, 1)}) + --eval-max-new-tokens",
                           "--eval-data", context)
        sensitivity = lambda: diagnostics.prefix_sensitivity(model, tokenizer, eval_rows, source,
                                                             max(args.L, 1), args.template, args.eval_max_new_tokens)
        before = sensitivity()
        print0(f"before warm-up: {before}")

    # -- train: the LM loss on the answers, under prior-sampled prefixes
    model.train()
    if args.fsdp:
        fsdp.shard(model, bf16)          # the optimiser below then holds only this rank's shards
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    per_rank = args.batch_size // world_size
    order = random.Random(args.seed)                    # the same permutation on every rank
    bar = progress(range(args.steps), "sft")
    for step in bar:
        lr = args.lr * min(1.0, (step + 1) / max(args.warmup_steps, 1))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = order.sample(pairs, args.batch_size)[rank * per_rank:(rank + 1) * per_rank]
        # prior draws for the whole batch from the step's own seed, this rank's share taken: the
        # same prefixes whatever the number of ranks
        drawn = source.sample(args.batch_size, args.L, torch.Generator().manual_seed(derived_seed(args.seed, step)))
        drawn = None if drawn is None else drawn[rank * per_rank:(rank + 1) * per_rank]           # (b, L, d)
        # the token mean over the whole batch: the count is a mean over ranks, as the gradient is
        n_tokens = all_reduce_mean([sum(len(a) for _, a in batch)], device)[0]
        total_loss = 0.0
        for i in range(0, len(batch), args.micro_batch_size):
            micro = batch[i:i + args.micro_batch_size]
            prefixes = None if drawn is None else list(drawn[i:i + args.micro_batch_size])
            if args.fsdp:
                fsdp.gather_root(model)  # embed_rows and the log-probs read the root's weights
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not args.fsdp):
                embeds, targets, loss_mask = completion_batch(model, [p for p, _ in micro], [a for _, a in micro], prefixes)
                logprobs, _ = token_logprobs(model, embeds, targets, loss_mask)
            loss = -logprobs.sum() / n_tokens          # this rank's share of the batch's token mean
            loss.backward()
            total_loss += loss.item()
        total_loss = all_reduce_mean([total_loss], device)[0]    # the batch's loss, over all ranks
        if not math.isfinite(total_loss):
            raise UserError(f"non-finite loss at step {step}; nothing was saved; lower --lr")
        if not args.fsdp:                # FSDP reduce-scatters during backward instead
            sync_gradients(model)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        grad_norm = float(fsdp.full_value(grad_norm) if args.fsdp else grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        run.log({"step": step, "loss": total_loss, "grad_norm": grad_norm, "lr": lr,
                 "tokens": round(n_tokens * world_size)})
        bar.set_postfix(loss=f"{total_loss:.4f}")

    if args.fsdp:
        whole = fsdp.whole(model)[0]             # every rank gathers; rank 0 keeps the whole copy
        fsdp.gather_all(model)                   # the checks below generate with whole weights
    if eval_rows:
        after = sensitivity()
        print0(f"after warm-up:  {after}")
        run.log({"before": before, "after": after}, name="summary.jsonl")
    if not args.fsdp:                            # sharded ranks hold different parts by design
        check_ranks_in_sync(model)
    (whole if args.fsdp else model).config.warmup = {"prefix_source": args.prefix_source, "L": args.L, "steps": args.steps}
    if run.master:
        (whole if args.fsdp else model).save_pretrained(run.file("model"))
        print0(f"saved {run.file('model')}")
        # can the warmed-up policy read the prefixes? (geometry, changed and broken answers on the
        # first tokens of the answers: at most 32, and no more than the evaluation's budget)
        health, lines = diagnostics.prefix_health(source, model, [p for p, _ in pairs[:64]], tokenizer,
                                                  max(args.L, 1), max_new_tokens=min(32, args.eval_max_new_tokens))
        for line in lines:
            print0(line)
        run.log({"prefix_health": health}, name="summary.jsonl")


if __name__ == "__main__":
    run_main(main)
