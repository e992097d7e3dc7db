r"""Latent-guided generation: complete prompts under N latents, one block per (prompt, latent).

Latent i is one draw of L prefix embeddings from --prefix-source, shared by every prompt. Decoding is
greedy by default, so any difference between latents is the prefix's doing (the paper's Fig. 1).

Toy world:
    python infer.py --model runs/toy/sft/model --vae runs/toy/vae --num-latents 4 --prompt "47+38=?"
    python infer.py --model runs/toy/base --prefix-source none --temperature 1 --num-latents 4 \
        --prompts-file runs/toy/data/math_test.jsonl --out runs/toy/infer.jsonl
    python infer.py --model runs/toy/sft/model --prefix-source lorem --L 8 --num-latents 4 \
        --prompt "47+38=?"                              # text prefixes: 8 lorem tokens + boundary
A real model, Qwen3-4B on one GPU of 80 GB (one process; pick the GPU with CUDA_VISIBLE_DEVICES):
    python infer.py --model runs/rl-qwen3-4b/model --vae runs/vae-qwen3-4b --region math --L 8 \
        --template math --num-latents 8 --max-new-tokens 1024 --dtype bfloat16 \
        --prompt "What is the sum of the first 100 odd numbers?"
"""

import argparse
import json
import os

import torch

from common import SEED, ArgumentParser, UserError, compute_init, derived_seed, ranged, run_main
from data import TEMPLATES, check_fits_context, format_prompt, load_rows
from prefixes import add_prefix_arguments, check_prefix
from model import generate, load_policy, make_prefix_source

def add_arguments(parser, temperature, max_new_tokens, rows, **prefix):
    """The flags infer.py and evaluate.py share: the model, the template, decoding, the seed, the palette."""
    arg = parser.add_argument
    arg("--model", required=True, help="hub id or checkpoint directory")
    arg("--dtype", default="float32", choices=["float32", "bfloat16"])
    arg("--template", default="plain", choices=TEMPLATES)
    arg("--temperature", type=ranged(float, 0), default=temperature, help="0: greedy")
    arg("--top-p", type=ranged(float, high=1, above=0), default=1.0)
    arg("--max-new-tokens", type=ranged(int, 1), default=max_new_tokens)
    arg("--batch-size", type=ranged(int, 1), default=64, help=f"{rows} per generate() call")
    arg("--seed", type=SEED, default=0, help="seeds the latents and the token sampler")
    add_prefix_arguments(parser, **prefix)

def load(args, device):      # the policy in eval mode, its tokenizer, the flags' prefix source
    model, tokenizer = load_policy(args.model, device, getattr(torch, args.dtype))
    return model.eval(), tokenizer, make_prefix_source(args.prefix_source, model.embed_tokens.weight, tokenizer, args.vae,
                                                       args.region, args.tie, args.seed)

def tokenize(rows, args, model, tokenizer, source, flag):
    """rows with their prompt_ids, refused if prompt + prefix + --max-new-tokens exceeds the context; the longest [prefix; prompt]."""
    rows, prefix = [{**r, "prompt_ids": tokenizer(format_prompt(r["problem"], args.template, tokenizer),
                                                  add_special_tokens=False)["input_ids"]} for r in rows], source.rows(args.L)
    return rows, prefix + check_fits_context(rows, prefix + args.max_new_tokens, f"prompt + {prefix}-row prefix (--L {args.L}) "
                                             "+ --max-new-tokens", flag, model.config.max_position_embeddings)

parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
parser.add_argument("--prompts-file", default=None, help="JSON lines, a prompt in each row's 'problem'")
parser.add_argument("--num-latents", type=ranged(int, 1, 10_000), default=4, help="latents (blocks) per prompt")
parser.add_argument("--out", default=None, help="also write one JSON line per (prompt, latent) here")
add_arguments(parser, 0.0, 256, "prompts", L_help="prefix tokens per latent (0: none; lorem: text tokens, then the boundary)")

def check_args(args):     # the rules between flags, before anything is loaded
    check_prefix(args, parser, {} if args.temperature else {"top_p": "--temperature 0 decodes greedily"})
    if args.out and args.prompts_file and os.path.abspath(args.out) == os.path.abspath(args.prompts_file):
        raise UserError(f"--out {args.out} is the --prompts-file: writing would replace the prompts; choose another --out")

def main(argv=None):
    args = parser.parse_args(argv)
    check_args(args)
    texts = args.prompt + ([r["problem"] for r in load_rows(args.prompts_file, "prompts")] if args.prompts_file else [])
    if not texts:
        raise UserError("no prompts: pass --prompt \"...\" (repeatable) or --prompts-file FILE")
    device = compute_init()[3]
    model, tokenizer, source = load(args, device)
    prompts = [r["prompt_ids"] for r in tokenize([{"problem": t} for t in texts], args, model, tokenizer, source, "--prompt")[0]]
    # one seeded draw of every latent, so latent i is the same whatever the prompts: (N, rows, d) or None
    latents = source.sample(args.num_latents, args.L, torch.Generator().manual_seed(args.seed))
    label = "none" if latents is None else f"{source.name}{':' + args.region if args.region else ''}, L={args.L}"
    try:                                        # one JSON line per (prompt, latent), to --out if given, line-buffered
        os.makedirs(os.path.dirname(os.path.abspath(args.out or os.devnull)), exist_ok=True)
        out_file = open(args.out or os.devnull, "w", buffering=1, encoding="utf-8")
    except OSError as e:
        raise UserError(f"--out {args.out}: cannot be written ({e.strerror})") from None
    with out_file:
        for i, s in ((i, s) for i in range(args.num_latents) for s in range(0, len(prompts), args.batch_size)):
            batch = prompts[s:s + args.batch_size]
            out = generate(model, batch, None if latents is None else [latents[i].to(device)] * len(batch), args.max_new_tokens,
                           args.temperature, top_p=args.top_p, stop_tokens=[tokenizer.eos_token_id],
                           keys=[derived_seed(args.seed, s + j, i) for j in range(len(batch))])       # (prompt, latent)
            for j, completion in enumerate(tokenizer.batch_decode(out.token_lists(), skip_special_tokens=True)):
                print(f"=== prompt {s + j} | latent {i} ({label}) ===\n{completion}", flush=True)
                out_file.write(json.dumps({
                    "prompt_index": s + j, "prompt": texts[s + j], "latent": i, "region": args.region,
                    "prefix_source": "none" if latents is None else source.name, "L": 0 if latents is None else args.L,
                    "temperature": args.temperature, "seed": args.seed, "completion": completion,
                    "num_tokens": int(out.lengths[j]), "stopped": bool(out.stopped[j])}) + "\n")

if __name__ == "__main__":
    run_main(main)
