"""Hugging Face checkpoints off the reading path: hub downloads, sharded safetensors, and the one-line
UserError that says what is wrong with a checkpoint, a tokenizer or a VAE directory when model.py's load fails."""

import os
import re

from common import UserError, one_line, read_json, read_safetensors_file
from model import SUPPORTED_MODEL_TYPES, TOKENIZER_FILES, PaletteVAE, short_hash, vocab_hash

def download(path_or_id):   # a hub id fetched into the local cache (config, weights, tokenizer): its directory
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", path_or_id) or os.path.isdir(path_or_id.split("/")[0]):
        raise UserError(f"model directory {path_or_id!r} does not exist; "
                        "pass a checkpoint directory or a hub id such as Qwen/Qwen3-4B-Base")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path_or_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    except Exception as e:
        raise UserError(f"could not fetch {path_or_id!r} from the hub ({type(e).__name__}); "
                        "without network access pass a local checkpoint directory") from None

def read_shards(path, names=None):   # the tensors (all, or those in `names`) of a sharded checkpoint
    if not os.path.exists(index := os.path.join(path, "model.safetensors.index.json")):
        raise UserError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors load)")
    weight_map = read_json(index, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(
            isinstance(f, str) and f and os.path.basename(f) == f for f in weight_map.values()):
        raise UserError(f"{index}: 'weight_map' must map tensor names to shard file names in the same directory")
    files = sorted(set(weight_map.values() if names is None else [weight_map[n] for n in names if n in weight_map]))
    if missing := [f for f in files if not os.path.isfile(os.path.join(path, f))]:
        raise UserError(f"{index}: names the shard {missing[0]}, which is not in {path} ({len(missing)} missing)")
    return {k: v for file in files for k, v in read_safetensors_file(os.path.join(path, file), names).items()}

SIZES = ("num_attention_heads", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size",   # required,
         "num_key_value_heads", "head_dim", "max_position_embeddings")                          # else derived or default

def config_error(path):   # what is wrong with path/config.json (model.load_config failed)
    if not os.path.exists(file := os.path.join(path, "config.json")):
        return UserError(f"{path}: no config.json; a checkpoint directory needs config.json and *.safetensors")
    d = read_json(file, "config")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    numbers = {"rms_norm_eps": d.get("rms_norm_eps", 1), "rope_theta": rope.get("rope_theta", d.get("rope_theta", 1))}
    number = next((k for k, v in numbers.items() if not (type(v) in (int, float) and v > 0)), None)
    size = next((k for k in SIZES if (k in SIZES[:5] or d.get(k) is not None) and not (type(d.get(k)) is int and d[k] > 0)),
                None)
    heads, kv = d.get("num_attention_heads"), d.get("num_key_value_heads") or d.get("num_attention_heads")
    head_dim = d.get("head_dim") or not size and d["hidden_size"] // heads   # not size: positive integers
    return UserError(f"{file}: " + next((message for bad, message in [   # the first that holds
        (d.get("model_type") not in SUPPORTED_MODEL_TYPES,
         f"model_type {d.get('model_type')!r} is not supported; nanopalette runs {', '.join(SUPPORTED_MODEL_TYPES)}"),
        (d.get("use_sliding_window") or d.get("mlp_bias"), "sliding-window attention and MLP biases are not supported"),
        (rope_type not in ("default", "llama3"), f"rope_type {rope_type!r} is not supported (default, llama3)"),
        (size, f"{size} is {repr(d[size]) if size in d else 'missing'}; sizes must be positive integers"),
        (number, f"{number} is {numbers.get(number)!r}; expected a positive number"),
        (not size and heads % kv, f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"),
        (not size and head_dim < 1, f"head_dim is {head_dim} (hidden_size // num_attention_heads); "
                                    "sizes must be positive integers")] if bad), "malformed config"))

def tensors_error(expected, tensors, where, error):   # expected: name -> shape, from the sizes in the config
    if missing := [k for k in expected if k not in tensors]:
        return UserError(f"{where}: lacks {len(missing)} tensors, first {missing[0]!r}; incomplete, or of another model")
    for name in (k for k, shape in expected.items() if tuple(tensors[k].shape) != tuple(shape)):
        return UserError(f"{where}: tensor {name!r} has shape {tuple(tensors[name].shape)}, the sizes in its config "
                         f"imply {tuple(expected[name])}; the files do not belong together")
    return UserError(f"{where}: the tensors do not load ({type(error).__name__}: {one_line(error)})")

def tokenizer_error(tokenizer, probe, path, vocab_size):   # `tokenizer` is the exception where it did not load
    if probe and tokenizer.eos_token_id is not None:   # it works, but its ids are not the model's
        if (top := max(probe + [tokenizer.eos_token_id])) >= vocab_size:
            return UserError(f"{path}: the tokenizer gives token id {top}, but the model has only {vocab_size} "
                             "embeddings; the tokenizer belongs to another model")
        recorded = read_json(os.path.join(path, "config.json"), "config").get("nanopalette_vocab")
        return UserError(f"{path}: the tokenizer's vocabulary (hash {vocab_hash(tokenizer)}) is not the one the "
                         f"weights were saved with ({recorded}); copy back the tokenizer files they were saved with")
    found = [name for name in TOKENIZER_FILES if os.path.exists(os.path.join(path, name))]
    # without usable files transformers still builds one, that encodes every text to [] (failing deep in attention)
    return UserError(f"{path} (tokenizer files: {', '.join(found) or 'none'}): " + next((message for bad, message in [
        (isinstance(tokenizer, Exception), f"the tokenizer does not load ({type(tokenizer).__name__}: {one_line(tokenizer)})"),
        (not probe, "the tokenizer encodes text to no tokens; its files are missing or corrupt")] if bad),
        "the tokenizer has no eos token to end completions with") + "; copy the tokenizer files of the base model")

def vae_error(vae_dir, path, file, meta, state, E):   # vae.json's fields, its domains, the tensors, the model
    if missing := [k for k in ("dim", "latent_dim", "hidden_dim", "depth", "fingerprint") if k not in meta]:
        return UserError(f"{path}: no {', '.join(missing)} field; re-create the VAE with train_vae.py")
    k, fp, scale, domains = meta["latent_dim"], meta["fingerprint"], meta.get("prefix_scale", 1.0), meta.get("domains", {})
    size = next((key for key in ("dim", "latent_dim", "hidden_dim", "depth")   # depth 0: linear maps
                 if type(meta[key]) is not int or meta[key] < (key != "depth")), None)
    numbers = lambda v, n: type(v) is list and len(v) == n and all(type(x) in (int, float) for x in v)   # n numbers
    region = next((name for name, s in domains.items() if not (isinstance(s, dict) and numbers(s.get("mean"), k)
                   and type(s.get("cov")) is list and len(s["cov"]) == k and all(numbers(row, k) for row in s["cov"]))),
                  None) if isinstance(domains, dict) else None        # mean (k,), cov (k, k)
    if problem := next((message for bad, message in [
            (size, f"{size} is {meta.get(size)!r}; expected an integer >= {int(size != 'depth')}"),
            (not (type(scale) in (int, float) and scale > 0),
             f"prefix_scale is {scale!r}; expected a positive number (1: a token's norm)"),
            (not (type(fp) is list and numbers(fp, len(fp))), "'fingerprint' is not a list of numbers; re-create the "
                                                              "VAE with train_vae.py"),
            (not isinstance(domains, dict), "'domains' must map domain names to latent statistics"),
            (region, f"domain {region!r} needs 'mean' ({k} numbers) and 'cov' ({k} x {k} numbers)")] if bad), None):
        return UserError(f"{path}: {problem}")
    vae = PaletteVAE(meta["dim"], k, meta["hidden_dim"], meta["depth"], meta.get("prefix_form", "rescaled"), scale)
    try:
        vae.load_state_dict(state)
    except Exception as e:
        return tensors_error({name: t.shape for name, t in vae.state_dict().items()}, state, file, e)
    return UserError(f"{vae_dir}: the VAE was trained for another model ({meta.get('model')}, embeddings of "
                     f"size {meta['dim']}, fingerprint {short_hash(meta['fingerprint'])}); this model's "
                     f"are of size {E.shape[1]} and differ; train a VAE for this model with train_vae.py")
