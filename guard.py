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
# Does a run fit: prompts in the context, the KV cache of a rank's rollouts in memory

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


def check_fits_memory(config, bytes_per_value, batches, device):
    """batches: (rollouts, tokens each, which flags to lower). The KV cache of each batch must fit
    the device's memory: refused at start-up, not found out of memory at the first step."""
    import torch
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * bytes_per_value
    have = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else \
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for rollouts, length, flags in batches:
        need = rollouts * length * per_token
        if need > have:
            raise UserError(f"{rollouts} rollouts per rank of up to {length} tokens need {need / 2**30:.3g} "
                            f"GiB of KV cache, more than the {have / 2**30:.3g} GiB of the {device.type} "
                            f"device; lower {flags} or --max-new-tokens, or use more ranks")


# Flags a resumed run may change: how often it logs, evaluates or saves, and --steps upward.
MAY_CHANGE = {"resume", "eval_every", "save_every", "sample_every", "samples_per_step", "keep_checkpoints",
              "tensorboard"}


def check_same_run(saved, now, path):
    """On --resume the flags that define the run must be the ones in args.json."""
    differ = [f"--{k.replace('_', '-')} {saved[k]} -> {now[k]}" for k in sorted(set(saved) & set(now))
              if saved[k] != now[k] and k not in MAY_CHANGE and not (k == "steps" and now[k] >= saved[k])]
    if differ:
        raise UserError(f"--resume: flags that define the run differ from {path}: {', '.join(differ)}; "
                        "resume with the original flags, or choose a new --out")
