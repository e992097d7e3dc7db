"""Build the toy world: its data files and a tiny base model that half-knows the task.

This is the toy world's shakespeare_char: everything the pipeline needs on a CPU, made here
in minutes, so train_vae.py -> sft_warmup.py -> rl.py run end to end with no downloads.

    python -m toy.build_world --out runs/toy                       # CPU (2 cores): ~5 min
    python -m toy.build_world --out runs/toy --force               # rebuild from scratch
    python -m toy.build_world --out runs/toy_big --device cuda --size medium --steps 3000
    python -m toy.build_world --out runs/toy_premise --setting premise    # the premise world

Writes (one process; a second build of the same --out is skipped unless --force):

    <out>/data/train.jsonl        pretraining corpus: all three domains, one random strategy each
    <out>/data/math_train.jsonl   math problems for RL (with solutions), disjoint from math_test
    <out>/data/math_test.jsonl    held-out math problems, disjoint from train and math_train
    <out>/data/vae_{math,code,qa}.jsonl   (problem, solution) traces per domain for the VAE
    <out>/tokenizer/              the character tokenizer (kept outside base/, see save below)
    <out>/base/                   Hugging Face checkpoint (Qwen3 architecture) + tokenizer files,
                                  and world_report.json: held-out pass@1, pass@8, strategy shares,
                                  and its provenance (the weights' fingerprint, CPU capability and
                                  threads it was built with: toy.provenance)
    <out>/base_metrics.jsonl      one JSON object per training step; <out>/args.json

The model is trained on `problem + "\\n" + solution + <eos>` with the loss on the solution and
<eos> only: the problem's digits are uniformly random, so predicting them teaches nothing but
adds noise to every step; what the policy must learn is the reasoning given the prompt.

The default budget (0.8M parameters, 900 steps of 64 examples, ~1.6 epochs) is tuned so that
greedy pass@1 on held-out math lands in the middle (43% measured; pass@8 81%): RL gets reward
from the start and has room to improve. Pretraining and held-out math share one difficulty,
toy.task.DIFFICULTY (operands of 2-3 digits); the held-out set excludes every problem of
train.jsonl and math_train.jsonl, which removes a noticeable share of the small 2+2-digit space,
so it is slightly harder than the pretraining mix.

--setting premise builds the second setting of the world, whose data build the paper's premise
in (toy.task, "The premise setting"; whether the model trained on it meets the premise is what
python -m toy.premise measures): math traces without a preamble are 94% column;
on "ripple" problems (half of every math file) the corpus's column traces drop a carry and are
wrong while round and split are right; half of the math traces follow a one-token preamble ("c",
"-" or "0") that names the strategy the trace then uses (90% of the time). Code and qa keep the
default generator at an eighth of --n-pretrain each, so four fifths of the training steps go to
math, where the minority strategies need the examples. The math rows carry "family" and
"preamble"; the preamble is part of the prompt ("-47+38=?\\n"), never of the loss.
math_train.jsonl (RL and the warm-up) has no preambles and the corpus's traces, slip included;
the held-out and VAE files hold correct traces; math_test is uniform over strategies (only its
answers are used).
The default setting's files are byte for byte what they were before the flag existed.
"""

import argparse
import json
import math
import os
import random
import time
from collections import Counter

import torch
import torch.nn.functional as F

from common import RunDir, atomic_write_json, progress, run_main, seed_everything
from common import SEED, UserError, ranged, read_json
from model import ModelConfig, Transformer, generate
from toy import provenance
from toy.task import (DOMAINS, PREAMBLE_SHARE, PREMISE_STRATEGY_WEIGHTS, STRATEGIES, detect_strategy,
                      generate as generate_rows, generate_premise_math, grade, write_jsonl)
from toy.tokenizer import EOS_ID, PAD_ID, build_tokenizer

# Model shapes (Qwen3 architecture, tied embeddings). "small" is the CPU default.
SIZES = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=16),   # tests, TINY=1
    "small": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "medium": dict(hidden_size=384, intermediate_size=1152, num_hidden_layers=8,
                   num_attention_heads=6, num_key_value_heads=2, head_dim=64),  # a GPU world
}
SETTINGS = ("default", "premise")
DATA_FILES = ("train.jsonl", "math_train.jsonl", "math_test.jsonl",
              "vae_math.jsonl", "vae_code.jsonl", "vae_qa.jsonl")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # Output
    p.add_argument("--out", default="runs/toy", help="world directory")
    p.add_argument("--force", action="store_true", help="rebuild even if the world exists")
    # Setting
    p.add_argument("--setting", choices=SETTINGS, default="default",
                   help="premise: one dominant strategy, a family it gets wrong, preambles (see above)")
    # Data (problem counts; each file has its own seed)
    p.add_argument("--n-pretrain", type=ranged(int, 1), default=12000, help="problems per domain in train.jsonl")
    p.add_argument("--n-math-train", type=ranged(int, 1), default=4000, help="math problems for RL")
    p.add_argument("--n-math-test", type=ranged(int, 1), default=500, help="held-out math problems")
    p.add_argument("--n-vae", type=ranged(int, 1), default=1000, help="traces per domain for the VAE")
    # Model
    p.add_argument("--size", choices=list(SIZES), default="small")
    # Optimisation
    p.add_argument("--steps", type=ranged(int, 1), default=900)
    p.add_argument("--batch-size", type=ranged(int, 1), default=64)
    p.add_argument("--lr", type=ranged(float, above=0), default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=ranged(int, 0), default=40, help="linear warm-up steps")
    p.add_argument("--min-lr-frac", type=ranged(float, 0, 1), default=0.1, help="cosine decays to lr * this")
    p.add_argument("--weight-decay", type=ranged(float, 0), default=0.1, help="on matrices only")
    p.add_argument("--grad-clip", type=ranged(float, above=0), default=1.0)
    # Evaluation
    p.add_argument("--n-eval", type=ranged(int, 1), default=300, help="math_test problems to evaluate")
    p.add_argument("--k", type=ranged(int, 1), default=8, help="samples per problem for pass@k")
    p.add_argument("--max-new-tokens", type=ranged(int, 1), default=96)
    p.add_argument("--eval-batch", type=ranged(int, 1), default=512, help="rows per generate() call")
    # Runtime
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=SEED, default=0)
    args = p.parse_args(argv)
    if args.warmup >= args.steps:
        p.error(f"--warmup {args.warmup} must be below --steps {args.steps}")
    if args.n_eval > args.n_math_test:
        p.error(f"--n-eval {args.n_eval} is more than the --n-math-test {args.n_math_test} held-out problems")
    return args

# -----------------------------------------------------------------------------
# Data


def write_data(data_dir, args):
    """Write every data file; each file draws from its own seed (seed*10 + file index)."""
    os.makedirs(data_dir, exist_ok=True)
    if args.setting == "premise":
        return write_premise_data(data_dir, args)
    seed = args.seed
    train = [row for i, domain in enumerate(DOMAINS)
             for row in generate_rows(domain, args.n_pretrain, seed=seed * 10 + i)]
    random.Random(seed).shuffle(train)   # mix the domains within every batch
    math_train = generate_rows("math", args.n_math_train, seed=seed * 10 + 3)
    # Held out: no problem the model was pretrained on, none that RL trains on.
    seen = {r["problem"] for r in train + math_train}
    files = {"train.jsonl": train, "math_train.jsonl": math_train,
             "math_test.jsonl": generate_rows("math", args.n_math_test, seed=seed * 10 + 4, exclude=seen)}
    for i, domain in enumerate(DOMAINS):
        files[f"vae_{domain}.jsonl"] = generate_rows(domain, args.n_vae, seed=seed * 10 + 5 + i)
    for name, rows in files.items():
        write_jsonl(rows, os.path.join(data_dir, name))
    return files


def write_premise_data(data_dir, args):
    """The premise setting's files, with the default's names and seeds (seed*10 + file index)."""
    seed, eighth = args.seed, args.n_pretrain // 8
    train = generate_premise_math(args.n_pretrain, seed * 10, weights=PREMISE_STRATEGY_WEIGHTS,
                                  preamble_share=PREAMBLE_SHARE, slip=True)
    train += [row for i, domain in enumerate(DOMAINS) if domain != "math"
              for row in generate_rows(domain, eighth, seed=seed * 10 + i)]
    random.Random(seed).shuffle(train)
    # RL and warm-up problems, no preamble, traces by the corpus's own writer (slip included):
    # RL reads only the answers, and the prefix warm-up should teach reading prefixes, not
    # carrying (with correct column traces here, 10 warm-up steps at lr 3e-5 took column on
    # ripple problems from 0% to about 46%, undoing the family the setting is built on)
    math_train = generate_premise_math(args.n_math_train, seed * 10 + 3, weights=PREMISE_STRATEGY_WEIGHTS,
                                       slip=True)
    seen = {r["problem"] for r in train + math_train}
    files = {"train.jsonl": train, "math_train.jsonl": math_train,
             "math_test.jsonl": generate_premise_math(args.n_math_test, seed * 10 + 4, exclude=seen),
             "vae_math.jsonl": generate_premise_math(args.n_vae, seed * 10 + 5)}
    for i, domain in enumerate(DOMAINS):
        if domain != "math":
            files[f"vae_{domain}.jsonl"] = generate_rows(domain, args.n_vae, seed=seed * 10 + 5 + i)
    for name, rows in files.items():
        write_jsonl(rows, os.path.join(data_dir, name))
    return files


def prompt_text(row):
    """What the model is conditioned on: the row's preamble if it has one (premise setting),
    the problem and a newline."""
    return row.get("preamble", "") + row["problem"] + "\n"


def encode_examples(rows, tokenizer):
    """(token ids, number of prompt tokens) per row: [preamble] + problem + "\\n" + solution +
    <eos>."""
    prompts = tokenizer([prompt_text(r) for r in rows])["input_ids"]
    solutions = tokenizer([r["solution"] for r in rows])["input_ids"]
    return [(p + s + [EOS_ID], len(p)) for p, s in zip(prompts, solutions)]


def make_batch(examples, device):
    """Right-padded input_ids (B, T) and targets (B, T), targets = -100 where no loss is taken.

    Right padding needs no attention mask: a causal model's real tokens never look ahead at
    the padding, and padded positions get no loss.
    """
    T = max(len(ids) for ids, _ in examples) - 1
    inputs = torch.full((len(examples), T), PAD_ID, dtype=torch.long)
    targets = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(examples):
        ids = torch.tensor(ids)
        inputs[i, :len(ids) - 1] = ids[:-1]
        # loss on the solution and <eos>: position t predicts token t+1
        targets[i, n_prompt - 1:len(ids) - 1] = ids[n_prompt:]
    return inputs.to(device), targets.to(device)

# -----------------------------------------------------------------------------
# Training


def lr_at(step, args):
    """Linear warm-up to args.lr, then cosine decay to args.lr * args.min_lr_frac."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, examples, args, run):
    """Pretrain on examples; one JSON record per step in <out>/base_metrics.jsonl."""
    device = next(model.parameters()).device
    decay = [p for p in model.parameters() if p.dim() >= 2]      # matrices and embeddings
    no_decay = [p for p in model.parameters() if p.dim() < 2]    # norm gains
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    rng = random.Random(args.seed)
    order, pos = list(range(len(examples))), len(examples)
    losses = []
    model.train()
    bar = progress(range(args.steps), "pretrain")     # tqdm in a terminal, a line now and then in a log
    for step in bar:
        if pos + args.batch_size > len(order):    # new epoch: reshuffle
            rng.shuffle(order)
            pos = 0
        inputs, targets = make_batch([examples[i] for i in order[pos:pos + args.batch_size]], device)
        pos += args.batch_size
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = model(inputs)                                                   # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        if not torch.isfinite(loss):
            raise UserError(f"non-finite loss {loss.item()} at step {step}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        run.log({"step": step, "loss": losses[-1], "lr": lr, "grad_norm": grad_norm.item(),
                 "tokens": int((targets != -100).sum())}, name="base_metrics.jsonl")
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.1e}")
    model.eval()
    return losses

# -----------------------------------------------------------------------------
# Evaluation


def complete(model, tokenizer, problems, args, temperature, generator=None):
    """Decoded completions of problem + "\\n", in batches of args.eval_batch rows."""
    prompts = tokenizer([p + "\n" for p in problems])["input_ids"]
    texts = []
    for i in range(0, len(prompts), args.eval_batch):
        out = generate(model, prompts[i:i + args.eval_batch], max_new_tokens=args.max_new_tokens,
                       temperature=temperature, stop_tokens=[EOS_ID], generator=generator)
        texts += [tokenizer.decode([t for t in ids if t != EOS_ID]) for ids in out.token_lists()]
    return texts


def evaluate(model, tokenizer, rows, args):
    """Greedy pass@1, pass@k of temperature-1 samples, and the strategies the samples follow."""
    greedy = complete(model, tokenizer, [r["problem"] for r in rows], args, temperature=0)
    pass1 = sum(grade(t, r["answer"]) for t, r in zip(greedy, rows)) / len(rows)
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(args.seed + 1)
    repeated = [r for r in rows for _ in range(args.k)]      # the k samples of a row side by side
    sampled = complete(model, tokenizer, [r["problem"] for r in repeated], args, 1.0, generator)
    correct = [grade(t, r["answer"]) for t, r in zip(sampled, repeated)]
    passk = sum(max(correct[i:i + args.k]) for i in range(0, len(correct), args.k)) / len(rows)

    def shares(texts):   # fraction of completions per strategy; "none": no strategy's opening
        counts = Counter(detect_strategy(t) or "none" for t in texts)
        return {s: counts[s] / len(texts) for s in STRATEGIES["math"] + ("none",)}
    return {"n_problems": len(rows), "greedy_pass@1": pass1,
            "sampled_pass@1": sum(correct) / len(correct), f"pass@{args.k}": passk,
            "strategy_shares": shares(sampled), "greedy_strategy_shares": shares(greedy),
            "examples": [{"problem": r["problem"], "greedy": t} for r, t in zip(rows[:3], greedy)]}

# -----------------------------------------------------------------------------
# The whole build


def world_exists(out):
    """config.json and world_report.json are written last, so their presence means complete."""
    done = [os.path.join(out, "base", f) for f in ("config.json", "world_report.json")]
    return all(os.path.exists(f) for f in done) and all(
        os.path.exists(os.path.join(out, "data", f)) for f in DATA_FILES)


def build(args):
    """Build the world described by args; returns the world report (a dict)."""
    t0 = time.time()
    if world_exists(args.out) and not args.force:
        saved = read_json(os.path.join(args.out, "args.json"), "the world's args.json")
        if saved.get("setting", "default") != args.setting:
            raise UserError(f"{args.out} holds a world of setting {saved.get('setting', 'default')!r}, "
                            f"not {args.setting!r}; give another --out, or --force to rebuild it")
        print(f"{args.out}: world exists, skipping (use --force to rebuild)")
        with open(os.path.join(args.out, "base", "world_report.json")) as f:
            return json.load(f)
    if args.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:    # a user's OMP_NUM_THREADS wins
        torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores this process may use
    seed_everything(args.seed)
    run = RunDir(args.out, args)
    if os.path.exists(run.file("base_metrics.jsonl")):       # a rebuild starts a fresh log
        os.remove(run.file("base_metrics.jsonl"))

    files = write_data(os.path.join(args.out, "data"), args)
    # save_pretrained replaces base/ atomically, so the tokenizer lives in its own folder
    tokenizer_dir = os.path.join(args.out, "tokenizer")
    tokenizer = build_tokenizer(tokenizer_dir)
    print(f"data: {', '.join(f'{k} {len(v)}' for k, v in files.items())} ({time.time() - t0:.0f}s)")

    config = ModelConfig(model_type="qwen3", vocab_size=len(tokenizer), tie_word_embeddings=True,
                         max_position_embeddings=512, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                         **SIZES[args.size])
    model = Transformer(config)
    model.init_weights()
    model.to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: qwen3 {args.size}, {n_params / 1e6:.2f}M parameters, on {args.device}")
    losses = train(model, encode_examples(files["train.jsonl"], tokenizer), args, run)
    base = os.path.join(args.out, "base")
    model.save_pretrained(base, tokenizer_dir=tokenizer_dir)

    report = evaluate(model, tokenizer, files["math_test.jsonl"][:args.n_eval], args)
    world = provenance(base)
    report.update(final_loss=sum(losses[-10:]) / len(losses[-10:]), n_params=n_params,
                  build_seconds=round(time.time() - t0, 1), provenance=world._asdict())
    atomic_write_json(os.path.join(base, "world_report.json"), report)
    print(f"held-out math ({report['n_problems']}): greedy pass@1 {report['greedy_pass@1']:.1%}, "
          f"pass@{args.k} {report[f'pass@{args.k}']:.1%} (sampled pass@1 {report['sampled_pass@1']:.1%})")
    print("strategies in samples: " + ", ".join(f"{s} {v:.0%}" for s, v in report["strategy_shares"].items()))
    print(f"built {args.out} in {report['build_seconds']:.0f}s: {world}")
    return report


if __name__ == "__main__":
    run_main(lambda: build(parse_args()))
