"""Does a run fit: the bytes one rank holds at its peak, by part, against 90% of the device's free memory before the
model loads (on CUDA only); tests/test_memory.py checks the parts against what the code really allocates."""

import torch

import model
from common import UserError, gather_objects, print0
from model import Transformer, decode_buckets

GiB, _SIZES = 2**30, {}
HEADROOM = 0.9    # of the free memory a plan may take: the allocator's reserve and fragmentation, cuBLAS and NCCL workspaces

def parameter_sizes(c):   # of each parameter of a ModelConfig c, in the model's order (tied ones once): built once, on no memory
    with torch.device("meta"):
        return _SIZES.get(repr(c)) or _SIZES.setdefault(repr(c), [p.numel() for p in Transformer(c).parameters()])

def activation_bytes(c, bf16):
    """Bytes autograd keeps per token and layer in a training forward (model.Block), as saved_tensors_hooks count them: the
    residual and norms in fp32; projection inputs (bf16 copies under autocast), q, k, v, attention out, the MLP's four."""
    b = 2 if bf16 else 4
    d, q, kv, heads = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.num_attention_heads
    saved = 16 * d + 8 + (10 if bf16 else 8) * d + b * (2 * q + 2 * kv) + 4 * heads + 4 * b * c.intermediate_size
    return saved + ((4 + b) * (q + kv) + 4 * (heads + c.num_key_value_heads)) * (c.model_type == "qwen3")   # q/k norms

def sync_bucket_bytes(c, bucket_numel=2**26):
    """The peak of common.sync_gradients' flat fp32 buckets, formed as it forms them from the parameters in order:
    each torch.cat runs while the last bucket is still bound, and the embedding (V, d) alone is one bucket."""
    flats = [0]
    for size in parameter_sizes(c):
        flats += [0] if flats[-1] >= bucket_numel else []
        flats[-1] += size
    return 4 * max(a + b for a, b in zip(flats, flats[1:] + [0]))

def memory_need(c, bf16=False, ranks=1, fsdp=False, sampler_copy=False, ref=False, train_rows=0, train_len=0, loss_len=None,
                checkpointing=False, gen_rows=0, gen_len=0, prompt_len=None, chunk=2048, kv_held=()):
    """Bytes one rank holds at its peak, by part; "total": what is held plus the larger of training and generation. bf16: fp32
    master weights, bf16 compute. Training: train_rows rows of train_len tokens (none: inference), loss_len with loss (default
    all). Generation: gen_rows rows in gen_len cache slots, prompt_len prefilled; kv_held: (rows, slots) of every cache kept."""
    P, b, layers, V, d = sum(parameter_sizes(c)), 2 if bf16 else 4, c.num_hidden_layers, c.vocab_size, c.hidden_size
    shard, heads, layer_bytes = ranks if fsdp else 1, c.num_attention_heads * c.head_dim, activation_bytes(c, bf16)
    kv_bytes, expanded_kv = 2 * layers * c.num_key_value_heads * c.head_dim * b, 2 * heads * gen_len * b   # (one layer)
    held = {"weights": (4 if train_rows else b) * P / shard, "optimizer": 8 * P / shard if train_rows else 0,  # AdamW's moments
            "sampler copy": 2 * P if sampler_copy and bf16 else 0, "reference model": (2 if bf16 and fsdp else 4) * P if ref else 0,
            "KV caches held": kv_bytes * sum(rows * slots for rows, slots in kv_held),
            # in the CUDA graph's pool between calls: logits, 3 fp32 (B, V), keyed noise (8 + 8 + 8 bytes), expanded K and V
            "decode step": gen_rows * ((b + 36) * V + expanded_kv)}
    tokens, n = train_rows * train_len, min(chunk, train_rows * (train_len if loss_len is None else loss_len))
    # measured (tests/test_memory.py): 4 fp32 (n, V) alive at once, or 3 beside lm_head's fp32 gradient (V, d) made
    # whole; with an fp32 copy of the hidden states and under FSDP of lm_head's weight
    logits = 4 * (max(4 * n * V, 3 * n * V + V * d) + (fsdp and bf16) * V * d + n * d) if n else 0
    # then, the chunk freed, the gradients in flight and under checkpointing (layer inputs kept) one layer's activations
    in_flight = tokens * (12 * d * b + (layer_bytes if checkpointing else 0))
    training = {"gradients": (4 * P / shard + (sync_bucket_bytes(c) if ranks > 1 and not fsdp else 0)) if train_rows else 0,
                "activations": tokens * (4 * d * layers if checkpointing else layer_bytes * layers),
                "logits chunk": logits, "backward beyond the chunk": max(0, in_flight - logits),
                "autocast weights": (2 * P / (layers if fsdp else 1)) if bf16 and train_rows else 0,
                # fsdp.py gathers the root (embedding, lm_head, final norm) for a whole micro-batch; its unsharded gradient
                "FSDP root": 2 * b * (V * d * (1 if c.tie_word_embeddings else 2) + d) if fsdp and train_rows else 0}
    # A prefill layer's temporaries peak in its attention or in its MLP, never in both (inference frees each as it
    # goes): per prompt token, the attention's q and its RoPE products, the output and o_proj's (5 heads + 2 d) and
    # the mask as the kernel's bias, per row the K and V repeated per query head; or the MLP's SiLU(gate), up and
    # their product (3 f). Beside either: the residual and its norm, RoPE's cos and sin, the bool mask (measured
    # tensor by tensor on the CPU: tests/test_memory.py)
    tokens = gen_len if prompt_len is None else prompt_len
    attention = tokens * ((5 * heads + 2 * d) * b + b * gen_len) + expanded_kv
    beside = tokens * ((2 * d + 2 * c.head_dim) * b + gen_len)
    prefill = gen_rows * (beside + max(attention, tokens * 3 * c.intermediate_size * b))
    generation = {"KV cache": kv_bytes * gen_rows * gen_len if not kv_held else 0, "prefill": prefill,
                  "gathered weights": (2 if bf16 else 4) * P if fsdp and gen_rows else 0}
    return {**held, **training, **generation, "total": sum(held.values()) + max(sum(training.values()), sum(generation.values()))}

def free_memory(device):   # bytes free on the device (CUDA's and what its caching allocator holds unused), else the host's
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    with open("/proc/meminfo") as f:                   # "MemAvailable:  123 kB"
        return int(next(line for line in f if line.startswith("MemAvailable:")).split()[1]) * 1024

def describe_need(part):
    parts = ", ".join(f"{k} {v / GiB:.3g}" for k, v in part.items() if v and k != "total")
    return f"{part['total'] / GiB:.3g} GiB ({parts} GiB)"

def fit_memory(need, device, micro_batch_size, activation_checkpointing, lower):
    """Resolve --micro-batch-size 0 (the largest of 32, 16, ..., 1) and activation checkpointing "auto" (rl.py's, always)
    to the first setting whose need(micro, checkpointing) fits, and say so; refuse a run that cannot, naming the flags
    (lower: the stage's own)."""
    free = min(gather_objects([free_memory(device)]))   # the tightest rank's: one plan on all (--fsdp: a hang otherwise)
    for micro in [micro_batch_size] if micro_batch_size else [32, 16, 8, 4, 2, 1]:
        for checkpointing in {"auto": (False, True), "on": (True,), "off": (False,)}[activation_checkpointing]:
            if (part := need(micro, checkpointing))["total"] <= HEADROOM * free:
                print0(f"memory per rank: {describe_need(part)} of the {HEADROOM * free / GiB:.3g} GiB a plan may take "
                       f"({HEADROOM:.0%} of free); micro-batch {micro}, activation checkpointing {'on' if checkpointing else 'off'}")
                return micro, checkpointing
    raise UserError(f"a rank needs {describe_need(part)} at --micro-batch-size {micro}, more than {HEADROOM:.0%} of the "
                    f"{free / GiB:.3g} GiB free; lower --micro-batch-size or {lower}, or use "
                    f"{'--activation-checkpointing on, ' if activation_checkpointing == 'off' else ''}more ranks or --fsdp")

def check_generation(config, bf16, rows, longest, new_tokens, device, loaded=False):
    """Refuse --batch-size rows that do not fit; longest: the longest [prefix; prompt]. On a GPU every KV cache stays, one per
    batch bucket at the longest length it served (model._CACHES): those held count (their bytes are not free), and this."""
    caches, (bucket, slots) = list(model._CACHES.values()), decode_buckets(rows, longest + new_tokens)
    held = {cache.k[0].shape[0]: cache.k[0].shape[2] for cache in caches}     # batch bucket -> slots (none off a GPU)
    held[bucket] = max(held.get(bucket, 0), slots)
    need = memory_need(config, bf16, gen_rows=bucket, gen_len=slots, prompt_len=longest, kv_held=held.items())
    free = free_memory(device) + (need["weights"] if loaded else 0) + sum(t.nbytes for c in caches for t in c.k + c.v)
    if need["total"] > HEADROOM * free:
        raise UserError(f"--batch-size {rows} rows of up to {longest + new_tokens} tokens need {describe_need(need)}, more "
                        f"than {HEADROOM:.0%} of the {free / GiB:.3g} GiB free; lower --batch-size")

def sft_plan(args, config, world_size, longest, device):
    """sft_warmup.py's (micro-batch, checkpointing): on CUDA the first that fits; elsewhere 0 means 32, auto off."""
    if device.type != "cuda":
        return args.micro_batch_size or 32, args.activation_checkpointing == "on"
    return fit_memory(lambda micro, checkpointing: memory_need(
        config, args.dtype == "bfloat16", world_size, args.fsdp, train_rows=min(micro, args.batch_size // world_size),
        train_len=longest, checkpointing=checkpointing), device, args.micro_batch_size, args.activation_checkpointing, "--max-tokens")

def rl_plan(args, config, rows, eval_rows, source, extra, world_size, device):
    """rl.py's (micro-batch, checkpointing): a step trains on its rollouts, [prefix; prompt; completion], and generates
    them, the resampled ones (extra: 1 to all of a rank's groups) and the held-out evaluation (a rank's rows in one call),
    in batch buckets that each keep a KV cache at the longest length they served."""
    new, longest, per_rank = args.max_new_tokens, max(len(r["prompt_ids"]) for r in rows), args.prompts_per_step // world_size
    prefix_rows, extra_rows, held = source.rows(args.L) if source else 0, extra.rows() if extra else 0, {}
    generations = [(per_rank * args.group_size, longest + prefix_rows + new),            # (rows, tokens) of a call
                   (-(-len(eval_rows) // world_size), max([len(r["prompt_ids"]) for r in eval_rows], default=0) + new)]
    resampled = [(g * args.resample_size, longest + extra_rows + new) for g in range(1, per_rank + 1)] if extra else []
    for bucket, slots in (decode_buckets(n, tokens) for n, tokens in generations + resampled if n):
        held[bucket] = max(held.get(bucket, 0), slots)
    gen_rows, gen_len = max(held.items(), key=lambda rows_slots: rows_slots[0] * rows_slots[1])     # the largest generation
    prompt = longest + max(prefix_rows, extra_rows)
    return fit_memory(lambda micro, checkpointing: memory_need(
        config, args.dtype == "bfloat16", world_size, args.fsdp, sampler_copy=not args.fsdp, ref=args.kl_coef > 0,
        train_rows=micro, train_len=prompt + new, loss_len=new, checkpointing=checkpointing, gen_rows=gen_rows,
        gen_len=gen_len, prompt_len=prompt, kv_held=held.items()), device, args.micro_batch_size, "auto",
        "--prompts-per-step x --group-size or --max-new-tokens")
