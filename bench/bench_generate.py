"""Generation throughput: our generate() against transformers' generate() on the same model,
batch, prompt and output lengths and sampling settings, alternated in one run, reported as a ratio.

CPU (the default small config: 8 layers, hidden 512):
    python bench/bench_generate.py --batch-sizes 1,32
GPU, Qwen3-1.7B / 4B shapes with random bf16 weights, and the memory-bandwidth roofline:
    python bench/bench_generate.py --shape qwen3-1.7b --dtype bfloat16 --batch-sizes 1,64,256 \
        --prompt-len 512 --new-tokens 512 --static

Roofline: bytes per decode step = 2 x (linear weights incl. lm_head) + batch x context x
(2 x layers x kv_heads x head_dim x 2); tokens/s bound = batch x bandwidth / bytes (4.3e12 B/s
on an H200 by default; --bandwidth to change).
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelConfig, Transformer, generate  # noqa: E402

SHAPES = {
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=64, vocab_size=4096,
                  tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       vocab_size=151936, tie_word_embeddings=True),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     vocab_size=151936, tie_word_embeddings=True),
}

parser = argparse.ArgumentParser()
parser.add_argument("--shape", default="small", choices=list(SHAPES))
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
parser.add_argument("--batch-sizes", default="1,32")
parser.add_argument("--prompt-len", type=int, default=64)
parser.add_argument("--new-tokens", type=int, default=64)
parser.add_argument("--repeats", type=int, default=3, help="alternating timed rounds per engine")
parser.add_argument("--static", action="store_true", help="our compiled static decode (GPU)")
parser.add_argument("--bandwidth", type=float, default=4.3e12, help="bytes/s for the roofline")
parser.add_argument("--skip-hf", action="store_true", help="only our engine (roofline runs)")
parser.add_argument("--out", default=None, help="append results as JSON lines here")
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = getattr(torch, args.dtype)
torch.manual_seed(0)
config = ModelConfig(model_type="qwen3", max_position_embeddings=8192, **SHAPES[args.shape])


def build_models():
    with torch.device(device):
        ours = Transformer(config).to(dtype)
    ours.init_weights()
    hf = None
    if not args.skip_hf:
        from transformers import AutoConfig, AutoModelForCausalLM
        hf_config = AutoConfig.for_model(**{k: v for k, v in config.to_hf().items()
                                            if k not in ("architectures", "torch_dtype")})
        hf = AutoModelForCausalLM.from_config(hf_config, dtype=dtype).to(device).eval()
        hf.load_state_dict(ours.state_dict(), strict=False)
        hf.generation_config.pad_token_id = 0
    return ours.eval(), hf


def roofline_tokens_per_s(batch):
    c = config
    linear = c.num_hidden_layers * (c.hidden_size * c.head_dim * (c.num_attention_heads * 2 +
                                                                  c.num_key_value_heads * 2)
                                    + 3 * c.hidden_size * c.intermediate_size)
    linear += c.vocab_size * c.hidden_size                    # lm_head
    context = args.prompt_len + args.new_tokens / 2           # average context over the decode
    kv = batch * context * (2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2)
    bytes_per_step = 2 * linear + kv
    return batch * args.bandwidth / bytes_per_step


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def time_ours(model, prompts):
    sync()
    t0 = time.perf_counter()
    out = generate(model, prompts.tolist(), max_new_tokens=args.new_tokens, temperature=1.0,
                   top_p=0.95, generator=torch.Generator(device).manual_seed(0),
                   static=args.static)
    sync()
    assert int(out.lengths.sum()) == prompts.shape[0] * args.new_tokens
    return time.perf_counter() - t0


def time_hf(model, prompts):
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                             temperature=1.0, top_p=0.95,
                             max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    sync()
    assert out.shape[1] == prompts.shape[1] + args.new_tokens
    return time.perf_counter() - t0


ours, hf = build_models()
for batch in [int(b) for b in args.batch_sizes.split(",")]:
    prompts = torch.randint(3, config.vocab_size, (batch, args.prompt_len), device=device)
    time_ours(ours, prompts[:, :8])                            # warm-up (and compile)
    if hf is not None:
        time_hf(hf, prompts[:, :8])
    t_ours, t_hf = [], []
    for _ in range(args.repeats):                              # alternate the two engines
        t_ours.append(time_ours(ours, prompts))
        if hf is not None:
            t_hf.append(time_hf(hf, prompts))
    tokens = batch * args.new_tokens
    result = {"shape": args.shape, "dtype": args.dtype, "device": device, "batch": batch,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "ours_tok_s": tokens / min(t_ours)}
    line = f"batch {batch:4d}: ours {result['ours_tok_s']:9.1f} tok/s"
    if hf is not None:
        result["hf_tok_s"] = tokens / min(t_hf)
        result["speedup"] = result["ours_tok_s"] / result["hf_tok_s"]
        line += f" | transformers {result['hf_tok_s']:9.1f} tok/s | ratio {result['speedup']:.2f}x"
    if device == "cuda":
        result["roofline_fraction"] = result["ours_tok_s"] / roofline_tokens_per_s(batch)
        line += f" | {100 * result['roofline_fraction']:.0f}% of roofline (incl. prefill)"
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
