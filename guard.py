"""What guards the user, kept out of the method's way: one-line errors instead of stack traces,
ranges on the flags, checks of the files a run reads (safetensors and JSON only), and whether a
run fits the model's context and the device's memory. A reader of the method can skip this file:
each stage calls it once or twice, and nothing here changes what a run computes.

Every refusal is a UserError with one line that names the problem and what to do; common.run_main
prints it (on rank 0 only) and exits with code 2, on every rank together.
"""

import argparse
import json
import math
import os
import sys
import time

from safetensors import SafetensorError, safe_open


class UserError(Exception):
    """A problem with the user's input: reported as one clear line, never a stack trace."""


def one_line(text):
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def stop(line, code=2):
    """Print one line on rank 0 and exit with `code`. Under torchrun the line also goes into the
    elastic error file, so that torchrun's failure summary ends with it and not with a trace."""
    line = one_line(line)
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        try:
            with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
                json.dump({"message": {"message": line, "extraInfo": {
                    "py_callstack": line, "timestamp": str(int(time.time()))}}}, f)
        except OSError:
            pass
    raise SystemExit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose refusals are one line (not the usage block), printed once under torchrun."""

    def error(self, message):
        message = message.replace("argument ", "", 1).replace(": ", " ", 1) if message.startswith("argument --") \
            else message                                    # "--L must be >= 0, got -1"
        stop(f"error: {message} (see python {self.prog} --help)")


def ranged(kind=int, low=None, high=None, above=None, below=None, inf=False):
    """An argparse `type=` for a number in [low, high] and (above, below), finite unless inf=True
    allows +inf: the flag's range stands where the flag is defined. NaN is always refused."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value) and not (inf and value == math.inf):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        for bound, ok, word in ((low, lambda b: value >= b, ">="), (high, lambda b: value <= b, "<="),
                                (above, lambda b: value > b, ">"), (below, lambda b: value < b, "<")):
            if bound is not None and not ok(bound):
                raise argparse.ArgumentTypeError(f"must be {word} {bound}, got {text}")
        return value
    parse.__name__ = kind.__name__      # argparse names the type in its own messages
    return parse


SEED = ranged(int, 0, 2**32 - 1)        # numpy's seeds are 32-bit


# -----------------------------------------------------------------------------
# Files a run reads: JSON and safetensors only, each refused in one line when unreadable

def read_json(path, what="file", kind=dict):
    """A JSON file as a Python value; missing, corrupt, cut short or of the wrong kind is a UserError."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{what} {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{what} {path} is corrupt or cut short, or cannot be read ({one_line(e)}); "
                        "restore it, or start again without it") from None
    if kind is not None and not isinstance(value, kind):
        raise UserError(f"{what} {path}: expected a JSON {'object' if kind is dict else kind.__name__}, "
                        f"found {type(value).__name__}")
    return value


def read_jsonl(path):
    """Records of a JSON-lines file. A last line cut short by a kill is left out; a corrupt line
    elsewhere is a UserError naming the file and line."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for lineno, line in enumerate(lines, 1):
        try:
            if line.strip():
                records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if lineno < len(lines):           # not the unterminated last line
                raise UserError(f"{path}:{lineno}: corrupt line ({e.msg})") from None
    return records


def read_safetensors_file(file, names=None):
    """The tensors of one safetensors file (all, or those in `names`), on the CPU."""
    try:
        with safe_open(file, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys() if names is None or key in names}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{file}: not a readable safetensors file ({type(e).__name__}: {one_line(e)}); "
                        "it is truncated or corrupt: restore or re-create it") from None


def _positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _numbers(value, length=None):
    return isinstance(value, list) and (length is None or len(value) == length) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)


def check_config(d, path, families):
    """config.json is of a family we run, with default or Llama 3 RoPE; its sizes are positive
    integers and its floats positive, before a model is built from it (a string "64" would fail
    deep inside torch)."""
    if d.get("model_type") not in families:
        raise UserError(f"{path}: model_type {d.get('model_type')!r} is not supported; nanopalette runs "
                        f"{', '.join(families)}")
    if d.get("use_sliding_window") or d.get("mlp_bias"):
        raise UserError(f"{path}: sliding-window attention and MLP biases are not supported")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "llama3"):
        raise UserError(f"{path}: rope_type {rope.get('rope_type', rope.get('type'))!r} is not supported "
                        "(default, llama3)")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
        if d.get(key) is not None and not _positive_int(d[key]):   # None: derived (kv heads, head_dim)
            raise UserError(f"{path}: {key} is {d[key]!r}; sizes must be positive integers")
    for key in ("rms_norm_eps", "rope_theta"):
        value = d.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise UserError(f"{path}: {key} is {value!r}; expected a positive number")


def check_vae_json(meta, path):
    """vae.json's integer sizes, its embedding fingerprint and each domain's latent mean (k) and
    covariance (k x k), checked before anything is built from them."""
    missing = [k for k in ("dim", "latent_dim", "hidden_dim", "depth", "fingerprint") if k not in meta]
    if missing:
        raise UserError(f"{path}: no {', '.join(missing)} field; re-create the VAE with train_vae.py")
    for key in ("dim", "latent_dim", "hidden_dim", "depth"):
        least = 0 if key == "depth" else 1       # depth 0: single linear maps
        if type(meta[key]) is not int or meta[key] < least:
            raise UserError(f"{path}: {key} is {meta[key]!r}; expected an integer >= {least}")
    scale = meta.get("prefix_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise UserError(f"{path}: prefix_scale is {scale!r}; expected a positive number (1: a token's norm)")
    if not _numbers(meta["fingerprint"]):
        raise UserError(f"{path}: 'fingerprint' is not a list of numbers; re-create the VAE with train_vae.py")
    k, domains = meta["latent_dim"], meta.get("domains", {})
    if not isinstance(domains, dict):
        raise UserError(f"{path}: 'domains' must map domain names to latent statistics")
    for name, stats in domains.items():
        if not (isinstance(stats, dict) and _numbers(stats.get("mean"), k) and isinstance(stats.get("cov"), list)
                and len(stats["cov"]) == k and all(_numbers(row, k) for row in stats["cov"])):
            raise UserError(f"{path}: domain {name!r} needs 'mean' ({k} numbers) and 'cov' ({k} x {k} numbers)")


def check_weights(expected, tensors, path, family):
    """A checkpoint holds every tensor its config.json implies, at that shape."""
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise UserError(f"{path}: checkpoint lacks {len(missing)} tensors, first {missing[0]!r}; "
                        f"is it a complete {family} checkpoint?")
    for name, param in expected.items():
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise UserError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                            f"config.json implies {tuple(param.shape)}")


def check_tokenizer(tokenizer, path, files, vocab_size):
    """The tokenizer loaded (else `tokenizer` is the exception), encodes text to tokens of this
    model's vocabulary, and has an eos token (generation stops at it; the warm-up ends answers with it)."""
    found = [name for name in files if os.path.exists(os.path.join(path, name))]
    where = f"{path} (tokenizer files: {', '.join(found) or 'none'})"
    if isinstance(tokenizer, Exception):
        raise UserError(f"{where}: the tokenizer does not load ({type(tokenizer).__name__}: {one_line(tokenizer)}); "
                        "copy the tokenizer files of the base model into the directory")
    # Without usable files transformers can still build a tokenizer, one that encodes every text
    # to [] (the run would then fail deep in attention): encode a probe to be sure.
    probe = tokenizer("Question: 12 + 30 = ?\nAnswer:", add_special_tokens=False)["input_ids"]
    if not probe:
        raise UserError(f"{where}: the tokenizer encodes text to no tokens; its files are missing "
                        "or corrupt: copy the tokenizer files of the base model into the directory")
    if tokenizer.eos_token_id is None:
        raise UserError(f"{path}: the tokenizer has no eos token to end completions with")
    if max(probe + [tokenizer.eos_token_id]) >= vocab_size:
        raise UserError(f"{where}: the tokenizer gives token id {max(probe + [tokenizer.eos_token_id])}, but the "
                        f"model has only {vocab_size} embeddings; the tokenizer belongs to another model")


def check_state(module, state, file):
    """A state dict read from `file` has exactly the module's tensor names and shapes."""
    expected = module.state_dict()
    for name in sorted(set(expected) ^ set(state)):
        which = "has no tensor" if name in expected else "has an unexpected tensor"
        raise UserError(f"{file}: {which} {name!r}; it belongs to another model or version")
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            raise UserError(f"{file}: tensor {name!r} has shape {tuple(state[name].shape)}, the sizes in "
                            f"its config imply {tuple(tensor.shape)}; the files do not belong together")


# -----------------------------------------------------------------------------
# Does a run fit the model's context

def problem_name(row):
    return repr(row.get("id") or row["problem"][:40])


def check_fits_context(rows, extra, what, flag, context):
    """Every prompt (row["prompt_ids"]) plus `extra` tokens must fit the model's context.
    Returns the longest prompt's length."""
    longest = max(rows, key=lambda r: len(r["prompt_ids"]))
    n = len(longest["prompt_ids"]) + extra
    if n > context:
        raise UserError(f"{flag}: problem {problem_name(longest)}: {what} = {n} tokens exceeds the "
                        f"model's context of {context}; lower them")
    return len(longest["prompt_ids"])


# -----------------------------------------------------------------------------
# Does a run fit: one model of the memory a rank holds at its peak, checked before the model loads

GiB = 2**30


def parameter_count(c):
    """Parameters of a ModelConfig c (tied embeddings counted once)."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layer = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
    layer += (q + 2 * kv + (c.hidden_size if c.model_type != "qwen2" else 0)) * bool(c.attention_bias)   # as model.Attention
    layer += 2 * c.head_dim * (c.model_type == "qwen3")                                  # q_norm, k_norm
    return c.num_hidden_layers * layer + c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2) + c.hidden_size


def activation_bytes(c, bf16):
    """Bytes autograd keeps per token and layer in a training forward (model.Block), as counted with
    torch.autograd.graph.saved_tensors_hooks (tests/test_memory.py): the residual stream, the norms'
    inputs and outputs in fp32; the projections' inputs (under autocast, one bf16 copy per
    projection), q, k, v, the attention output and the MLP's four intermediates in the compute
    dtype; Qwen3's q/k norms keep fp32 copies too."""
    b = 2 if bf16 else 4
    d, q, kv, heads = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.num_attention_heads
    saved = 16 * d + 8 + (10 if bf16 else 8) * d + b * (2 * q + 2 * kv) + 4 * heads + 4 * b * c.intermediate_size
    if c.model_type == "qwen3":
        saved += (4 + b) * (q + kv) + 4 * (heads + c.num_key_value_heads)
    return saved


def memory_need(c, bf16=False, ranks=1, fsdp=False, sampler_copy=False, ref=False, train_rows=0, train_len=0,
                loss_len=None, checkpointing=False, gen_rows=0, gen_len=0, prompt_len=None, chunk=2048, kv_held=()):
    """Bytes one rank holds at its peak, by part; "total" is the peak. c: ModelConfig; bf16: fp32
    master weights with bf16 compute (autocast, or FSDP's bf16 parameters); ranks and fsdp: replicated
    or sharded weights, gradients and AdamW moments; sampler_copy: a bf16 copy of the policy for
    generation; ref: a frozen reference model (fp32; bf16 under fsdp). A training micro-batch of
    train_rows rows of train_len tokens, with or without activation checkpointing; generation of
    gen_rows rows of gen_len tokens.
    The peak is the larger of generation (no gradients) and training (gradients, saved activations,
    the bf16 weights autocast keeps for the backward, a logits chunk). Without train_rows: inference
    alone, weights in their own dtype. loss_len: the tokens of a row that carry loss (the completion;
    default all of train_len), whose logits are taken chunk by chunk. kv_held: (rows, tokens) of the
    KV caches a compiled decode keeps from one call to the next (model.bucketed_cache), held
    throughout instead. prompt_len: the prefilled part of gen_len (default all of it): one layer's
    activations and the attention mask."""
    P, b, layers, V = parameter_count(c), 2 if bf16 else 4, c.num_hidden_layers, c.vocab_size
    shard = ranks if fsdp else 1
    part = {"weights": (4 if train_rows else b) * P / shard}
    if train_rows:
        part["optimizer"] = 8 * P / shard                                        # AdamW's two moments
        part["gradients"] = 4 * P / shard + (4 * min(P, 2**26) if ranks > 1 and not fsdp else 0)  # + the sync bucket
    part["sampler copy"] = 2 * P if sampler_copy and bf16 else 0
    part["reference model"] = (2 if bf16 and fsdp else 4) * P if ref else 0     # as rl.py loads it
    tokens, layer_bytes = train_rows * train_len, activation_bytes(c, bf16)
    if checkpointing:   # each layer's input kept; one layer's activations alive again in the backward
        part["activations"] = tokens * (4 * c.hidden_size * layers + layer_bytes)
    else:
        part["activations"] = tokens * layer_bytes * layers
    part["activations"] += tokens * 12 * c.hidden_size * b                     # gradients in flight
    loss_tokens = train_rows * (train_len if loss_len is None else loss_len)
    part["logits chunk"] = 4 * 4 * min(chunk, loss_tokens) * V           # about four fp32 (n, V) alive at once
    part["autocast weights"] = (2 * P / (layers if fsdp else 1)) if bf16 and train_rows else 0
    kv_bytes = 2 * layers * c.num_key_value_heads * c.head_dim * b
    part["KV cache"] = kv_bytes * gen_rows * gen_len if not kv_held else 0
    part["KV caches held"] = kv_bytes * sum(rows * tokens for rows, tokens in kv_held)
    prefill = gen_len if prompt_len is None else prompt_len
    part["decoding"] = gen_rows * (5 * 4 * V + prefill * (gen_len + (3 * c.intermediate_size + 6 * c.hidden_size) * b))
    part["gathered weights"] = (2 if bf16 else 4) * P if fsdp and gen_rows else 0
    common = part["weights"] + part.get("optimizer", 0) + part["sampler copy"] + part["reference model"] + part["KV caches held"]
    generation = part["KV cache"] + part["decoding"] + part["gathered weights"]
    training = part.get("gradients", 0) + part["activations"] + part["logits chunk"] + part["autocast weights"]
    part["total"] = common + max(generation, training)
    return part


def free_memory(device):
    """Bytes free on the device: CUDA's free memory, else the host's available memory."""
    if device.type == "cuda":
        import torch
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def describe_need(part):
    return ", ".join(f"{k} {v / GiB:.3g}" for k, v in part.items() if v and k != "total")


def fit_memory(need, device, micro_batch_size, activation_checkpointing, lower):
    """Resolve --micro-batch-size 0 (the largest of 32, 16, ..., 1) and --activation-checkpointing
    auto to the first setting whose plan need(micro, checkpointing) (memory_need's parts) fits the
    device's free memory, and say what the rank will hold; refuse a run that cannot fit, naming the
    flags to change (lower: the stage's own, besides these)."""
    from common import print0
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


# Flags a resumed run may change: how often it logs, evaluates or saves, --steps upward, and how the
# memory is used (micro-batches and recomputation change the order of float sums, not the objective).
MAY_CHANGE = {"resume", "eval_every", "save_every", "sample_every", "samples_per_step", "keep_checkpoints",
              "tensorboard", "micro_batch_size", "activation_checkpointing"}


def same_paths(value):
    """A flag's value with every path in it spelt one way (absolute, links resolved): '--out runs/a'
    and '--out /home/me/runs/a' are the same run. Data specs (domain=path,...) are read part by part."""
    if not isinstance(value, str):
        return value
    parts = [item.rpartition("=") for item in value.split(",")]
    return ",".join(f"{d}{eq}{os.path.realpath(p) if os.path.exists(p) else p}" for d, eq, p in parts)


def check_same_run(saved, now, path):
    """On --resume the flags that define the run must be the ones in args.json."""
    differ = [f"--{k.replace('_', '-')} {saved[k]} -> {now[k]}" for k in sorted(set(saved) & set(now))
              if same_paths(saved[k]) != same_paths(now[k]) and k not in MAY_CHANGE
              and not (k == "steps" and now[k] >= saved[k])]
    if differ:
        raise UserError(f"--resume: flags that define the run differ from {path}: {', '.join(differ)}; "
                        "resume with the original flags, or choose a new --out")


def refuse_unused(args, parser, unused):
    """Refuse in one line a flag set away from its default where this run would ignore it.
    unused: {argparse dest: why it has no effect here}."""
    for dest, why in unused.items():
        value = getattr(args, dest)
        if value != parser.get_default(dest):
            flag = f"--{dest.replace('_', '-')}" + ("" if isinstance(value, bool) else f" {value}")
            raise UserError(f"{flag} has no effect here ({why}); leave it out")
