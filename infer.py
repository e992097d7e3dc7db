r"""Latent-guided generation: complete prompts under N latents, one block per (prompt, latent).

Latent i is one draw of L prefix embeddings (from the VAE's prior or a domain region, or a
baseline source: noise, random_decoder, or lorem, whose prefix is L tokens of fresh pseudo-Latin
text and then a boundary instruction, L + b rows), shared by every prompt, so block i of each
prompt shows what "strategy i" does with it. Decoding is greedy by default: any difference
between latents is then the prefix's doing, not token randomness (the paper's Fig. 1). With
--prefix-source none, N latents are N identical greedy completions, or N samples with
--temperature > 0. Generation stops at the tokenizer's eos. Prompts are decoded latent by
latent (all prompts of latent i in batches of --batch-size rows) and printed as each batch
finishes; --out also writes one JSON line per (prompt, latent): {"prompt_index", "prompt",
"latent", "prefix_source", "region", "L", "temperature", "seed", "completion", "num_tokens",
"stopped"}.

Toy world:
    python infer.py --model runs/toy/sft/model --vae runs/toy/vae --num-latents 4 --prompt "47+38=?"
    python infer.py --model runs/toy/base --prefix-source none --temperature 1 --num-latents 4 \
        --prompts-file runs/toy/data/math_test.jsonl --out runs/toy/infer.jsonl
    python infer.py --model runs/toy/sft/model --prefix-source lorem --L 8 --num-latents 4 \
        --prompt "47+38=?"                              # text prefixes: 8 lorem tokens + boundary
A real model, Qwen3-4B on one GPU of 80 GB (one process; pick the GPU with CUDA_VISIBLE_DEVICES):
    python infer.py --model runs/rl-qwen3-4b/model --vae runs/vae-qwen3-4b --region math --L 1 \
        --template math --num-latents 8 --max-new-tokens 1024 --dtype bfloat16 \
        --prompt "What is the sum of the first 100 odd numbers?"
"""

import argparse
import json
import os

import torch

from common import compute_init, derived_seed, run_main
from data import TEMPLATES, format_prompt, load_rows
from guard import SEED, ArgumentParser, UserError, check_fits_context, ranged, refuse_unused
from model import add_prefix_arguments, check_prefix_sources, generate, load_policy, make_prefix_source

parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# Prompts
parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
parser.add_argument("--prompts-file", default=None, help="one prompt per line, or JSON lines with a 'problem' field")
parser.add_argument("--template", default="plain", choices=TEMPLATES)
# Model
parser.add_argument("--model", required=True, help="hub id or checkpoint directory")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
# Palette
add_prefix_arguments(parser, L_help="prefix tokens per latent (0: none; lorem: text tokens, then the boundary)")
parser.add_argument("--num-latents", type=ranged(int, 1, 10_000), default=4, help="latents (blocks) per prompt, "
                    "all drawn up front")
# Decoding
parser.add_argument("--temperature", type=ranged(float, 0), default=0.0, help="0: greedy per latent")
parser.add_argument("--top-p", type=ranged(float, high=1, above=0), default=1.0)
parser.add_argument("--max-new-tokens", type=ranged(int, 1), default=256)
parser.add_argument("--batch-size", type=ranged(int, 1), default=64, help="prompts per generate() call")
parser.add_argument("--seed", type=SEED, default=0, help="seeds the latents and the token sampler")
# Output
parser.add_argument("--out", default=None, help="also write one JSON line per (prompt, latent) here")


def read_prompts(path):
    """Prompts of a file: the 'problem' field of each row of a JSON-lines file (.jsonl), else one
    prompt per non-empty line."""
    if path.endswith(".jsonl"):
        return [r["problem"] for r in load_rows(path, domain="prompts")]
    if not os.path.isfile(path):
        raise UserError(f"--prompts-file {path}: no such file")
    prompts = [line.rstrip("\n") for line in open(path, encoding="utf-8") if line.strip()]
    if not prompts:
        raise UserError(f"--prompts-file {path}: no prompts in it")
    return prompts


def check_args(args):
    """The rules between flags, before anything is loaded."""
    unused = {} if args.temperature else {"top_p": "--temperature 0 decodes greedily"}
    if args.prefix_source == "none":
        unused.update(dict.fromkeys(("L", "tie", "vae", "region"), "--prefix-source none draws no prefix"))
    refuse_unused(args, parser, unused)
    check_prefix_sources([("--prefix-source", args.prefix_source)], args.vae, args.region, args.tie, args.L)
    if args.out and os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a directory; give a file name for the JSON lines")
    if args.out and args.prompts_file and os.path.abspath(args.out) == os.path.abspath(args.prompts_file):
        raise UserError(f"--out {args.out} is the --prompts-file: writing would replace the prompts; "
                        "choose another --out")


def main(argv=None):
    args = parser.parse_args(argv)
    check_args(args)
    texts = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    if not texts:
        raise UserError("no prompts: pass --prompt \"...\" (repeatable) or --prompts-file FILE")
    device = compute_init()[3]

    model, tokenizer = load_policy(args.model, device, getattr(torch, args.dtype))
    model.eval()
    source = make_prefix_source(args.prefix_source, model.embed_tokens.weight, tokenizer, args.vae,
                                args.region, args.tie, args.seed)
    rows = [{"problem": t, "prompt_ids": tokenizer(format_prompt(t, args.template, tokenizer),
                                                   add_special_tokens=False)["input_ids"]} for t in texts]
    check_fits_context(rows, source.rows(args.L) + args.max_new_tokens,
                       f"prompt + {source.rows(args.L)}-row prefix (--L {args.L}) + --max-new-tokens",
                       "--prompt", model.config.max_position_embeddings)
    prompts = [r["prompt_ids"] for r in rows]

    # All latents up front from one seeded generator: latent i is the same whatever the prompts.
    g_latent = torch.Generator().manual_seed(args.seed)
    latents = source.sample(args.num_latents, args.L, generator=g_latent)      # (N, rows, d) or None
    label = "none" if latents is None else \
        f"{source.name}{':' + args.region if args.region else ''}, L={args.L}"
    out_file = None
    if args.out:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            out_file = open(args.out, "w", encoding="utf-8")
        except OSError as e:
            raise UserError(f"--out {args.out}: cannot be written ({e.strerror})") from None
    try:
        for i in range(args.num_latents):
            prefix = None if latents is None else latents[i].to(device)      # (rows, d) or text ids
            for s in range(0, len(prompts), args.batch_size):
                batch = prompts[s:s + args.batch_size]
                out = generate(model, batch, None if prefix is None else [prefix] * len(batch),
                               args.max_new_tokens, args.temperature, top_p=args.top_p, stop_tokens=[tokenizer.eos_token_id],
                               keys=[derived_seed(args.seed, s + j, i) for j in range(len(batch))])  # (prompt, latent)
                completions = tokenizer.batch_decode(out.token_lists(), skip_special_tokens=True)
                for j, completion in enumerate(completions):
                    p = s + j
                    print(f"=== prompt {p} | latent {i} ({label}) ===\n{completion}", flush=True)
                    if out_file:
                        out_file.write(json.dumps({
                            "prompt_index": p, "prompt": texts[p], "latent": i,
                            "prefix_source": source.name if latents is not None else "none",
                            "region": args.region, "L": args.L if latents is not None else 0,
                            "temperature": args.temperature, "seed": args.seed,
                            "completion": completion, "num_tokens": int(out.lengths[j]),
                            "stopped": bool(out.stopped[j])}) + "\n")
                if out_file:
                    out_file.flush()
    finally:
        if out_file:
            out_file.close()
    if args.out:
        print(f"wrote {len(prompts) * args.num_latents} completions to {args.out}")


if __name__ == "__main__":
    run_main(main)
