r"""Stage 2: the SFT warm-up that teaches the policy to read prefixes.

Each (question q, answer o) pair is trained on as [p; E(q); E(o)], p = L prefix embeddings from a PRIOR sample
z ~ N(0, I) (never the posterior: p must not carry the answer), the LM loss on o only (a token mean over the batch).
About 10 steps on purpose: enough to read prefixes, too few to learn to ignore them. The VAE is frozen; --prefix-source
none is plain SFT. Before and after, on --eval-data: greedy pass@1 without a prefix; the answers two prefixes change.

Toy world (runs/toy.sh runs every stage):
    python sft_warmup.py --model runs/toy/base --vae runs/toy/vae --out runs/toy/sft \
        --data runs/toy/data/math_train.jsonl --eval-data runs/toy/data/math_test.jsonl
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
import memory
from common import (SEED, ArgumentParser, Replicated, RunDir, UserError, all_reduce_mean, compute_init, derived_seed,
                    print0, progress, ranged, run_main)
from data import HELD_OUT_SEED, TEMPLATES, check_fits_context, format_prompt, load_mixture
from prefixes import add_prefix_arguments, check_prefix
from model import (Transformer, completion_batch, load_config, load_embedding_matrix, load_tokenizer,
                   make_prefix_source, resolve_checkpoint, token_logprobs)

parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
arg = parser.add_argument
# Data
arg("--data", required=True, help="domain=path_or_hub_id,... or one path (rows' own domain)")
arg("--per-domain-cap", type=ranged(int, 1), default=5000)
arg("--template", default="plain", choices=TEMPLATES)
arg("--max-tokens", type=ranged(int, 1), default=1024, help="drop pairs longer than this")
arg("--eval-data", default=None, help="held-out problems for the before/after check")
arg("--eval-problems", type=ranged(int, 1), default=200)
arg("--eval-max-new-tokens", type=ranged(int, 1), default=128)
# Model
arg("--model", required=True, help="hub id or checkpoint directory")
arg("--dtype", default="float32", choices=["float32", "bfloat16"], help="bfloat16: bf16 compute, fp32 master")
arg("--activation-checkpointing", default="auto", choices=["auto", "on", "off"], help="auto: on a GPU, if memory needs it")
arg("--fsdp", action="store_true", help="shard weights, gradients and AdamW over ranks (fsdp.py)")
add_prefix_arguments(parser, L_help="prefix tokens per example")   # palette: --prefix-source --vae --region --L --tie
# Optimisation
arg("--steps", type=ranged(int, 1), default=10)
arg("--batch-size", type=ranged(int, 1), default=32, help="pairs per step, over all ranks")
arg("--micro-batch-size", type=ranged(int, 0), default=0, help="0: on a GPU the largest of 32, 16, ..., 1 that fits")
arg("--lr", type=ranged(float, above=0), default=1e-5)
arg("--warmup-steps", type=ranged(int, 0), default=2)
arg("--weight-decay", type=ranged(float, 0), default=0.0)
arg("--grad-clip", type=ranged(float, above=0, inf=True), default=1.0, help="inf: no clipping")
arg("--seed", type=SEED, default=0)
arg("--out", required=True)

def check_args(args, world_size=1):     # the rules between flags, before anything is loaded
    if args.lr * args.weight_decay >= 1:
        raise UserError(f"--lr {args.lr} x --weight-decay {args.weight_decay} >= 1 would flip every weight's sign; lower them")
    if args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} must split over the {world_size} ranks")
    check_prefix(args, parser, {} if args.eval_data else
                 dict.fromkeys(("eval_problems", "eval_max_new_tokens"), "there is no --eval-data"))

def main(argv=None):
    args = parser.parse_args(argv)
    ddp, rank, world_size, device = compute_init()
    check_args(args, world_size)
    if args.fsdp and not ddp:
        raise UserError("--fsdp shards over ranks: launch with torchrun --nproc_per_node N, or leave --fsdp out")

    path = resolve_checkpoint(args.model)
    config, bf16 = load_config(path), args.dtype == "bfloat16"
    tokenizer, context = load_tokenizer(path, config.vocab_size), config.max_position_embeddings
    source = make_prefix_source(args.prefix_source, load_embedding_matrix(path), tokenizer, args.vae, args.region,
                                args.tie, args.seed)              # L = 0: it draws no prefix (None)
    L1, prefix_rows = max(args.L, 1), source.rows(args.L)        # the checks draw at least one prefix token
    tokenize = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    # (prompt ids, answer ids + eos) of the rows with a solution that fit, with the prefix, in --max-tokens
    rows = [r for r in load_mixture(args.data, per_domain_cap=args.per_domain_cap, seed=args.seed) if r.get("solution")]
    limit, why = min(args.max_tokens, context), "--max-tokens" if args.max_tokens <= context else "the model's context"
    pairs = [(tokenize(format_prompt(r["problem"], args.template, tokenizer)), tokenize(r["solution"]) + [tokenizer.eos_token_id])
             for r in rows]
    pairs = [(p, a) for p, a in pairs if len(p) + len(a) + prefix_rows <= limit]
    if not pairs:
        raise UserError(f"--data {args.data}: no pairs with a solution within {limit} tokens ({why}) "
                        f"with L = {args.L} ({prefix_rows} prefix rows)")
    if len(pairs) < len(rows):
        print0(f"note: left out {len(rows) - len(pairs)} of {len(rows)} pairs longer than {limit} tokens with the prefix ({why})")
    if args.batch_size > len(pairs):   # ranks would get unequal or empty batches (--fsdp: a hang)
        raise UserError(f"--batch-size {args.batch_size} is more than the {len(pairs)} (question, answer) pairs of --data; "
                        "lower it or add data")
    longest = max(len(p) + len(a) for p, a in pairs) + prefix_rows
    print0(f"{len(pairs)} (question, answer) pairs, at most {longest} tokens; prefix source {source.name}, L = {args.L}")
    args.micro_batch_size, checkpointing = memory.sft_plan(args, config, world_size, longest, device)
    run = RunDir(args.out, args)                       # nothing is written before the checks above
    model = Transformer.from_pretrained(path, device)                      # fp32 master weights
    model.gradient_checkpointing = checkpointing
    eval_rows = [{**r, "prompt_ids": tokenize(format_prompt(r["problem"], args.template, tokenizer))}
                 for r in load_mixture(args.eval_data, seed=HELD_OUT_SEED)[:args.eval_problems]] if args.eval_data else None
    if eval_rows:
        check_fits_context(eval_rows, source.rows(L1) + args.eval_max_new_tokens,
                           f"prompt + {source.rows(L1)}-row prefix (--L {L1}) + --eval-max-new-tokens", "--eval-data", context)
        sensitivity = lambda: diagnostics.prefix_sensitivity(model, tokenizer, eval_rows, source, L1, args.eval_max_new_tokens)
        print0(f"before warm-up: {(before := sensitivity())}")

    # -- train: the LM loss on the answers, under prior-sampled prefixes
    if args.fsdp:                        # fsdp.py: the optimiser below then holds only this rank's shards
        import fsdp
    # common.py's DDP by hand without its bf16 sampler copy (--dtype bfloat16: the autocast below)
    policy = fsdp.Sharded(model, bf16) if args.fsdp else Replicated(model, False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    order = random.Random(args.seed)                   # the same draws on every rank, each taking its share
    mine = slice(rank * args.batch_size // world_size, (rank + 1) * args.batch_size // world_size)
    for step in (bar := progress(range(args.steps), "sft")):
        lr = args.lr * min(1.0, (step + 1) / max(args.warmup_steps, 1))
        opt.param_groups[0]["lr"] = lr                 # (one group)
        batch = order.sample(pairs, args.batch_size)[mine]
        # prior draws for the whole batch from the step's seed, this rank's share taken: any number of ranks
        drawn = source.sample(args.batch_size, args.L, torch.Generator().manual_seed(derived_seed(args.seed, step)))
        prefixes = [None] * len(batch) if drawn is None else list(drawn[mine])        # a prefix (or None) a row
        # the token mean over the whole batch: the count is a mean over ranks, as the gradient is
        n_tokens = all_reduce_mean([sum(len(a) for _, a in batch)], device)[0]
        total_loss = 0.0
        for micro in (slice(i, i + args.micro_batch_size) for i in range(0, len(batch), args.micro_batch_size)):
            prompts, answers = zip(*batch[micro])
            policy.before_microbatch()   # (FSDP: embed_rows and the log-probs read the root's weights)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not args.fsdp):
                logprobs, _ = token_logprobs(model, *completion_batch(model, prompts, answers, prefixes[micro]))
            loss = -logprobs.sum() / n_tokens          # this rank's share of the batch's token mean
            loss.backward()
            total_loss += loss.item()
        if not math.isfinite(total_loss := all_reduce_mean([total_loss], device)[0]):    # the batch's loss, all ranks
            raise UserError(f"non-finite loss at step {step}; nothing was saved; lower --lr")
        grad_norm = policy.sync_and_clip(args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        run.log({"step": step, "loss": total_loss, "grad_norm": grad_norm, "lr": lr, "tokens": round(n_tokens * world_size)})
        bar.set_postfix(loss=f"{total_loss:.4f}")

    whole = policy.whole()[0] if args.fsdp else model     # every rank gathers; rank 0 keeps the whole copy
    policy.before_rollouts()                     # (FSDP: the checks below generate with whole weights)
    if eval_rows:
        print0(f"after warm-up:  {(after := sensitivity())}")
        run.log({"before": before, "after": after}, name="summary.jsonl")
    policy.end()                                 # replicated ranks must hold the same weights
    whole.config.warmup = {"prefix_source": args.prefix_source, "L": args.L, "steps": args.steps}
    if run.master:
        whole.save_pretrained(run.file("model"))
        print0(f"saved {run.file('model')}")
        # can the warmed-up policy read the prefixes? (geometry, changed and broken answers, <= 32 tokens)
        health, lines = diagnostics.prefix_health(source, model, [p for p, _ in pairs[:64]], tokenizer, L1,
                                                  max_new_tokens=min(32, args.eval_max_new_tokens))
        print0(*lines, sep="\n")
        run.log({"prefix_health": health}, name="summary.jsonl")

if __name__ == "__main__":
    run_main(main)
