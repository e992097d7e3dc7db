"""Does a run fit: the bytes one rank holds at its peak, by part, against the device's free memory before the
model loads (on CUDA only); tests/test_memory.py checks the model against what autograd really saves."""

import torch

from common import UserError, print0
from model import decode_buckets

GiB = 2**30

def parameter_count(c):
    """Parameters of a ModelConfig c (tied embeddings counted once)."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layer = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
    layer += (q + 2 * kv + (c.hidden_size if c.model_type != "qwen2" else 0)) * bool(c.attention_bias)   # as model.Attention
    layer += 2 * c.head_dim * (c.model_type == "qwen3")                                  # q_norm, k_norm
    return c.num_hidden_layers * layer + c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2) + c.hidden_size

def activation_bytes(c, bf16):
    """Bytes autograd keeps per token and layer in a training forward (model.Block), as saved_tensors_hooks
    count them (tests/test_memory.py): the residual stream and the norms in fp32; the projections' inputs (a
    bf16 copy each under autocast), q, k, v, the attention output and the MLP's four intermediates in the
    compute dtype; Qwen3's q/k norms keep fp32 copies too."""
    b = 2 if bf16 else 4
    d, q, kv, heads = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.num_attention_heads
    saved = 16 * d + 8 + (10 if bf16 else 8) * d + b * (2 * q + 2 * kv) + 4 * heads + 4 * b * c.intermediate_size
    return saved + ((4 + b) * (q + kv) + 4 * (heads + c.num_key_value_heads)) * (c.model_type == "qwen3")   # q/k norms

def memory_need(c, bf16=False, ranks=1, fsdp=False, sampler_copy=False, ref=False, train_rows=0, train_len=0,
                loss_len=None, checkpointing=False, gen_rows=0, gen_len=0, prompt_len=None, chunk=2048, kv_held=()):
    """Bytes one rank holds at its peak, by part; "total" is the peak, the larger of generation and training. c:
    ModelConfig; bf16: fp32 master weights, bf16 compute; ranks, fsdp: replicated or sharded weights, gradients and
    AdamW moments; sampler_copy: a bf16 copy for generation; ref: a frozen reference model. Training: train_rows rows
    of train_len tokens (without: inference alone, weights in their own dtype), loss_len of them carrying loss
    (default all), their logits chunk by chunk. Generation: gen_rows rows of gen_len tokens, prompt_len prefilled
    (default all); kv_held: (rows, tokens) of the KV caches kept between calls (model.bucketed_cache)."""
    P, b, layers, V = parameter_count(c), 2 if bf16 else 4, c.num_hidden_layers, c.vocab_size
    shard, tokens, layer_bytes = ranks if fsdp else 1, train_rows * train_len, activation_bytes(c, bf16)
    kv_bytes = 2 * layers * c.num_key_value_heads * c.head_dim * b
    held = {"weights": (4 if train_rows else b) * P / shard, "optimizer": 8 * P / shard if train_rows else 0,  # AdamW's moments
            "sampler copy": 2 * P if sampler_copy and bf16 else 0,
            "reference model": (2 if bf16 and fsdp else 4) * P if ref else 0,     # as rl.py loads it
            "KV caches held": kv_bytes * sum(rows * tokens for rows, tokens in kv_held)}
    # checkpointing: each layer's input kept, one layer's activations alive again in the backward
    saved = 4 * c.hidden_size * layers + layer_bytes if checkpointing else layer_bytes * layers
    loss_tokens = train_rows * (train_len if loss_len is None else loss_len)
    bucket = 4 * min(P, 2**26) if ranks > 1 and not fsdp else 0              # the replicated ranks' sync bucket
    training = {"gradients": 4 * P / shard + bucket if train_rows else 0,
                "activations": tokens * (saved + 12 * c.hidden_size * b),             # + the gradients in flight
                "logits chunk": 4 * 4 * min(chunk, loss_tokens) * V,                # about four fp32 (n, V) alive at once
                "autocast weights": (2 * P / (layers if fsdp else 1)) if bf16 and train_rows else 0}
    prefill = gen_len if prompt_len is None else prompt_len
    generation = {"KV cache": kv_bytes * gen_rows * gen_len if not kv_held else 0,
                  "decoding": gen_rows * (5 * 4 * V + prefill * (gen_len + (3 * c.intermediate_size + 6 * c.hidden_size) * b)),
                  "gathered weights": (2 if bf16 else 4) * P if fsdp and gen_rows else 0}
    total = sum(held.values()) + max(sum(training.values()), sum(generation.values()))
    return {**held, **training, **generation, "total": total}

def free_memory(device):
    """Bytes free on the device: CUDA's free memory, else the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:                   # "MemAvailable:  123 kB"
        return int(next(line for line in f if line.startswith("MemAvailable:")).split()[1]) * 1024

def describe_need(part):
    return ", ".join(f"{k} {v / GiB:.3g}" for k, v in part.items() if v and k != "total")

def fit_memory(need, device, micro_batch_size, activation_checkpointing, lower):
    """Resolve --micro-batch-size 0 (the largest of 32, 16, ..., 1) and --activation-checkpointing auto to the
    first setting whose need(micro, checkpointing) (memory_need's parts) fits the free memory, and say so; refuse
    a run that cannot fit, naming the flags to change (lower: the stage's own, besides these)."""
    free = free_memory(device)
    for micro in [micro_batch_size] if micro_batch_size else [32, 16, 8, 4, 2, 1]:
        for checkpointing in {"auto": (False, True), "on": (True,), "off": (False,)}[activation_checkpointing]:
            part = need(micro, checkpointing)
            if part["total"] <= free:
                print0(f"memory per rank: {part['total'] / GiB:.3g} of {free / GiB:.3g} GiB free ({describe_need(part)} "
                       f"GiB); micro-batch {micro}, activation checkpointing {'on' if checkpointing else 'off'}")
                return micro, checkpointing
    raise UserError(f"a rank needs {part['total'] / GiB:.3g} GiB ({describe_need(part)} GiB) at --micro-batch-size {micro}, "
                    f"more than the {free / GiB:.3g} GiB free; lower --micro-batch-size or {lower}, or use "
                    "--activation-checkpointing, more ranks or --fsdp")

def check_generation(config, bf16, rows, longest, new_tokens, device, loaded=False):
    """Refuse --batch-size rows whose KV cache (on a GPU bucketed and kept between calls, as the
    compiled decode keeps it) does not fit the free memory; longest: the longest [prefix; prompt]."""
    tokens = longest + new_tokens
    held = [decode_buckets(rows, tokens)] if device.type == "cuda" else ()
    need = memory_need(config, bf16, gen_rows=rows, gen_len=tokens, prompt_len=longest, kv_held=held)
    free = free_memory(device) + (need["weights"] if loaded else 0)         # the weights may be loaded already
    if need["total"] > free:
        raise UserError(f"--batch-size {rows} rows of up to {tokens} tokens need {need['total'] / GiB:.3g} GiB "
                        f"({describe_need(need)} GiB), more than the {free / GiB:.3g} GiB free; lower --batch-size")

def sft_plan(args, config, world_size, longest, device):
    """sft_warmup.py's (micro-batch, checkpointing): on CUDA the first that fits; elsewhere 0 means 32, auto off."""
    if device.type != "cuda":
        return args.micro_batch_size or 32, args.activation_checkpointing == "on"
    return fit_memory(lambda micro, checkpointing: memory_need(
        config, args.dtype == "bfloat16", world_size, args.fsdp, train_rows=min(micro, args.batch_size // world_size),
        train_len=longest, checkpointing=checkpointing), device, args.micro_batch_size, args.activation_checkpointing, "--max-tokens")

def rl_plan(args, config, rows, eval_rows, source, extra, world_size, device):
    """rl.py's (micro-batch, checkpointing): a step trains on its rollouts, [prefix; prompt; completion],
    and generates the rollouts, the resampled ones (extra) and the held-out evaluation; a compiled
    decode keeps one KV cache per bucketed shape from step to step."""
    new, longest = args.max_new_tokens, max(len(r["prompt_ids"]) for r in rows)
    prefix_rows, extra_rows = source.rows(args.L) if source else 0, extra.rows() if extra else 0
    per_rank = args.prompts_per_step // world_size
    generations = [(per_rank * args.group_size, longest + prefix_rows + new),
                   (per_rank * args.resample_size if extra else 0, longest + extra_rows + new),
                   (-(-len(eval_rows) // world_size), max([len(r["prompt_ids"]) for r in eval_rows], default=0) + new)]
    gen_rows, gen_len = max(generations, key=lambda rows_len: rows_len[0] * rows_len[1])
    held = {decode_buckets(n, tokens) for n, tokens in generations if n}
    return fit_memory(lambda micro, checkpointing: memory_need(
        config, args.dtype == "bfloat16", world_size, args.fsdp, sampler_copy=not args.fsdp, ref=args.kl_coef > 0,
        train_rows=micro, train_len=longest + max(prefix_rows, extra_rows) + new, loss_len=new, checkpointing=checkpointing,
        gen_rows=gen_rows, gen_len=gen_len, prompt_len=gen_len - new, kv_held=held), device, args.micro_batch_size,
        args.activation_checkpointing, "--prompts-per-step x --group-size or --max-new-tokens")
