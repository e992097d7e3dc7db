"""The model side of nanopalette, in one file:

1. Transformer   decoder for the Qwen2 / Qwen3 / Llama families, parameter names identical to
                 Hugging Face's, so checkpoints load and save with short loops over safetensors.
2. Prefixes      every forward takes inputs_embeds, so a row can be [prefix (L x d); E(prompt)].
3. Generation    a preallocated KV cache, batched left-padded prefill + decode, sampling.
4. Palette       the VAE over mean-pooled trace embeddings and the prefix sources.
5. RL losses     GRPO / RLOO advantages and the clipped policy-gradient loss.

Layout of a batch everywhere in this file: rows are LEFT padded, so the newest token of every
row sits in the last column. `attention_mask` (B, T) is True on real positions (prefix or token);
a row's positions count its real positions from 0, so padding never shifts RoPE and every row
gives the logits it would give alone.
"""

import functools
import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from common import atomic_dir, atomic_write_json
from guard import (UserError, check_config, check_state, check_tokenizer, check_vae_json, check_weights, ranged,
                   read_json, read_safetensors_file)

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
                   "added_tokens.json")

# -----------------------------------------------------------------------------
# 1. Config and Transformer


@dataclass
class ModelConfig:
    model_type: str = "qwen3"
    vocab_size: int = 64
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None      # {"rope_type": "llama3", "factor": ..., ...} or None
    attention_bias: bool = False          # q/k/v (and o for Llama/Qwen3) biases; Qwen2 always True
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    warmup: dict | None = None            # the prefixes sft_warmup.py taught: {"prefix_source", "L", "steps"}

    @classmethod
    def from_hf(cls, d, source="config.json"):
        """Read a Hugging Face config.json dict (transformers 4.x or 5.x spelling of RoPE)."""
        check_config(d, source, SUPPORTED_MODEL_TYPES)          # families and RoPE types we run
        model_type = d["model_type"]
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        n_heads = d["num_attention_heads"]
        return cls(
            model_type=model_type, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=rope_theta,
            rope_scaling=rope if rope_type == "llama3" else None,
            attention_bias=True if model_type == "qwen2" else d.get("attention_bias", False),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"), warmup=d.get("nanopalette_warmup"))

    def to_hf(self):
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        rope_scaling = d.pop("rope_scaling")
        if d.pop("warmup") is not None:       # transformers keeps unknown keys of config.json as they are
            d["nanopalette_warmup"] = self.warmup
        d["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "default",
                                **(rope_scaling or {})}
        d["architectures"] = [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                               "llama": "LlamaForCausalLM"}[self.model_type]]
        d["hidden_act"] = "silu"
        d["torch_dtype"] = "float32"
        if self.model_type == "qwen2":
            d.pop("attention_bias")   # Qwen2 has q/k/v biases by construction
        return d


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalise in fp32 like the reference implementation, then cast back before scaling
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config):
    """Inverse frequencies (head_dim/2,), with Llama 3's frequency-dependent scaling if set."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    # Llama 3: low frequencies (long wavelengths) are divided by `factor`, high ones kept,
    # and the band in between interpolated smoothly.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x, cos, sin):
    # x: (B, H, T, D); cos/sin: (B, 1, T, D). Halves rotated as in the HF checkpoints' layout.
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        qkv_bias = config.attention_bias
        o_bias = config.attention_bias and config.model_type != "qwen2"
        d, hd = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=o_bias)
        if config.model_type == "qwen3":   # Qwen3 normalises queries and keys per head
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv_cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)   # (B, Hkv, S, hd): every slot of the cache
        gqa = self.n_kv_heads != self.n_heads                # each kv head serves n_heads / n_kv heads
        if mask is None:   # right-padded training rows: plain causal attention, no mask to build or save
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:              # (B, 1, T, S) bool, True = may attend: left-padded rows, a KV cache
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, kv_cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Holds the `model.*` parameters, so state-dict keys match Hugging Face's."""

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.source_dir = None          # where tokenizer files are copied from on save
        self.gradient_checkpointing = False

    def init_weights(self, std=0.02):
        """Random init for models trained from scratch (the toy world); checkpoints skip this."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    @property
    def embed_tokens(self):
        return self.model.embed_tokens

    def tie_weights(self):
        if self.config.tie_word_embeddings:         # one matrix for the embedding and lm_head
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(self, inputs_embeds, attention_mask=None, kv_cache=None):
        """inputs_embeds (B, T, d) -> final-norm hidden (B, T, d). Without attention_mask the rows are
        right padded (training: padding follows every real position, so causal attention is exact and
        needs no mask); with it, (B, T) bool marks the real positions of left-padded rows, which a
        KV cache (generation) records."""
        B, T, _ = inputs_embeds.shape
        device = inputs_embeds.device
        mask = None
        if attention_mask is None:
            positions = torch.arange(T, device=device).expand(B, T)                     # (B, T)
        else:
            if kv_cache is None:
                positions = (attention_mask.cumsum(1) - 1).clamp(min=0)                  # (B, T)
                key_valid, query_slots = attention_mask, torch.arange(T, device=device)   # (B, S=T)
            else:
                positions, key_valid, query_slots = kv_cache.prepare(attention_mask)
            # A query may see real keys at or before its own slot. Padded queries also see their own
            # slot, only so that no softmax row is empty (NaN); their outputs are never used.
            key_slots = torch.arange(key_valid.shape[1], device=device)
            causal = key_slots[None, :] <= query_slots[:, None]                          # (T, S)
            own = key_slots[None, :] == query_slots[:, None]                             # (T, S)
            mask = ((causal[None] & key_valid[:, None, :]) | own[None])[:, None]         # (B,1,T,S)
        freqs = positions[..., None].float() * self.inv_freq                          # (B, T, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]                           # (B,1,T,D)
        cos, sin = angles.cos().to(inputs_embeds.dtype), angles.sin().to(inputs_embeds.dtype)
        x = inputs_embeds
        # recompute layers in backward only on a training forward: a forward that fills a KV cache
        # (generation, in either mode) must run the blocks with it
        checkpointed = self.gradient_checkpointing and self.training and kv_cache is None
        for block in self.model.layers:
            if checkpointed:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, None,
                                                      use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(attention_mask)
        return self.model.norm(x)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, kv_cache=None):
        """Token ids (B, T) or embeddings (B, T, d) -> logits (B, T, V)."""
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        return self.lm_head(self.hidden_states(inputs_embeds, attention_mask, kv_cache))

    # -- checkpoints ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_id, device="cpu", dtype=torch.float32):
        """Load a Hugging Face checkpoint directory (or hub id) of a supported family."""
        path = resolve_checkpoint(path_or_id)
        config = load_config(path)
        with torch.device("meta"):
            model = cls(config)
        tensors = read_safetensors(path)
        expected = dict(model.state_dict())
        if config.tie_word_embeddings:
            expected.pop("lm_head.weight")
            tensors.pop("lm_head.weight", None)
        check_weights(expected, tensors, path, config.model_type)
        state = {k: tensors[k].to(device=device, dtype=dtype) for k in expected}
        if config.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        model.tie_weights()
        model.inv_freq = rope_inv_freq(config).to(device)
        model.source_dir = path
        return model

    def save_pretrained(self, out_dir, tokenizer_dir=None):
        """Write config.json, model.safetensors, generation_config.json and the tokenizer files (of
        tokenizer_dir, else of the checkpoint it was loaded from) under a temporary name, renamed
        into place when whole."""
        tokenizer_dir = tokenizer_dir or self.source_dir
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight")   # safetensors refuses shared storage; HF re-ties on load
        c = self.config

        with atomic_dir(out_dir) as tmp:
            save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            hf = c.to_hf()
            hf["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
            gen = {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
                   "pad_token_id": c.pad_token_id, "do_sample": False}
            atomic_write_json(os.path.join(tmp, "generation_config.json"), gen)
            for name in TOKENIZER_FILES if tokenizer_dir else ():
                src = os.path.join(tokenizer_dir, name)
                if os.path.exists(src):
                    shutil.copy(src, os.path.join(tmp, name))
            if os.path.exists(os.path.join(tmp, "tokenizer_config.json")):   # the ids these weights were trained on
                from transformers import AutoTokenizer
                hf["nanopalette_vocab"] = vocab_hash(AutoTokenizer.from_pretrained(tmp))
            atomic_write_json(os.path.join(tmp, "config.json"), hf)


def load_tokenizer(path, vocab_size):
    """The tokenizer of a checkpoint directory, checked: it loads, encodes text into this model's
    vocabulary and has an eos token (generation stops at it; the warm-up ends every answer with it)."""
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # a corrupt file surfaces as a JSON, tokenizers or OS error
        tokenizer = e
    check_tokenizer(tokenizer, path, TOKENIZER_FILES, vocab_size)
    config = os.path.join(path, "config.json")        # a hub model has no record: taken as it is
    recorded = read_json(config, "config").get("nanopalette_vocab") if os.path.exists(config) else None
    if recorded not in (None, vocab_hash(tokenizer)):
        raise UserError(f"{path}: the tokenizer's vocabulary (hash {vocab_hash(tokenizer)}) is not the one the "
                        f"weights were saved with ({recorded}); copy back the tokenizer files they were saved with")
    return tokenizer


def vocab_hash(tokenizer):
    """A short hash of the (token, id) pairs: a tokenizer whose ids moved reads other embeddings."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:12]


def load_policy(path_or_id, device="cpu", dtype=torch.float32):
    """The policy and its tokenizer, as the inference stages load them."""
    model = Transformer.from_pretrained(path_or_id, device=device, dtype=dtype)
    return model, load_tokenizer(model.source_dir, model.config.vocab_size)


def _chunk_logprobs(hidden, targets, weight, temperature):
    # logits in float32 (float64 for a float64 model) and outside autocast: bf16 logits are rounded
    # to about 3 significant digits, so pi and pi_old of one token, from micro-batches padded
    # differently, would disagree and the PPO ratio would clip on rounding noise
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    with torch.autocast(hidden.device.type, enabled=False):
        logits = hidden.to(dtype) @ weight.to(dtype).t()                                   # (n, V)
    logp = (logits / temperature).log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)                                                # (n,)
    return logp.gather(-1, targets[:, None]).squeeze(-1), entropy


def token_logprobs(model, inputs_embeds, targets, loss_mask, temperature=1.0, chunk=2048):
    """The training path, for the warm-up's loss and the policy update: log p(target_t | context) at
    temperature, and the entropy of the next-token distribution (its graph kept, so an entropy
    bonus has a gradient), at the positions where loss_mask is True; each (B, T), zero elsewhere.

    inputs_embeds (B, T, d) right padded (completion_batch), targets (B, T) = the token that follows
    each position, loss_mask (B, T) bool. Logits are taken only at loss positions, in chunks
    recomputed in the backward pass, so a 150K vocabulary never materialises (B, T, V). A batch
    without a loss position still returns tensors on the graph (backward() then gives zero
    gradients instead of failing)."""
    hidden = model.hidden_states(inputs_embeds)                                  # (B, T, d)
    picked, picked_targets = hidden[loss_mask], targets[loss_mask]                # (N, d), (N,)
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    logprobs, entropy = [], []
    for i in range(0, picked.shape[0], chunk):   # recomputed in backward: no (N, V) kept
        lp, ent = torch.utils.checkpoint.checkpoint(
            _chunk_logprobs, picked[i:i + chunk], picked_targets[i:i + chunk],
            model.lm_head.weight, temperature, use_reentrant=False)
        logprobs.append(lp)
        entropy.append(ent)
    empty = picked.sum(-1).to(dtype)                        # (0,), on the graph when N == 0
    zeros = hidden.new_zeros(targets.shape, dtype=dtype)                         # (B, T)
    return (zeros.masked_scatter(loss_mask, torch.cat(logprobs) if logprobs else empty),
            zeros.masked_scatter(loss_mask, torch.cat(entropy) if entropy else empty))


# -----------------------------------------------------------------------------
# Checkpoint directories: resolve, read config and tensors (safetensors and JSON only)

def resolve_checkpoint(path_or_id):
    """A local directory, or a hub id fetched into the local cache (config, weights, tokenizer)."""
    if os.path.isdir(path_or_id):
        return path_or_id
    is_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", path_or_id) is not None \
        and not os.path.isdir(path_or_id.split("/")[0])
    if not is_hub_id:
        raise UserError(f"model directory {path_or_id!r} does not exist; "
                        "pass a checkpoint directory or a hub id such as Qwen/Qwen3-4B-Base")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path_or_id, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                             "*.model", "*.jinja"])
    except Exception as e:
        raise UserError(f"could not fetch {path_or_id!r} from the hub ({type(e).__name__}); "
                        "without network access pass a local checkpoint directory") from None


def load_config(path):
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise UserError(f"{path}: no config.json; a checkpoint directory needs config.json and *.safetensors")
    d = read_json(config_path, "config")
    try:
        config = ModelConfig.from_hf(d, source=config_path)
    except KeyError as e:
        raise UserError(f"{config_path}: malformed config (no {e} field)") from None
    if config.num_attention_heads % config.num_key_value_heads:
        raise UserError(f"{config_path}: num_attention_heads {config.num_attention_heads} is not a "
                        f"multiple of num_key_value_heads {config.num_key_value_heads}")
    return config


def _safetensors_files(path, names=None):
    """The safetensors files holding `names` (all files if None), via the shard index if any."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(
                isinstance(f, str) and f and os.path.basename(f) == f for f in weight_map.values()):
            raise UserError(f"{index}: 'weight_map' must map tensor names to shard file names "
                            "in the same directory")
        wanted = weight_map.values() if names is None else \
            [weight_map[n] for n in names if n in weight_map]
        files = sorted(set(wanted))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise UserError(f"{index}: names the shard {missing[0]}, which is not in {path}"
                            + (f" ({len(missing)} shards missing)" if len(missing) > 1 else ""))
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise UserError(f"{path}: no model.safetensors or model.safetensors.index.json "
                        "(only safetensors checkpoints are loaded)")
    return [single]


def read_safetensors(path, names=None):
    """The tensors of a checkpoint directory (all, or those in `names`), across its shards."""
    tensors = {}
    for file in _safetensors_files(path, names):
        tensors.update(read_safetensors_file(file, names))
    return tensors


def load_embedding_matrix(path_or_id):
    """Only the token-embedding matrix E (V, d) of a checkpoint, without building the model:
    the VAE stage needs E and nothing else (1 GB instead of 16 for an 8B model)."""
    path = resolve_checkpoint(path_or_id)
    name = "model.embed_tokens.weight"
    tensors = read_safetensors(path, names={name})
    if name not in tensors:
        raise UserError(f"{path}: checkpoint has no {name!r}")
    return tensors[name].float()


def embedding_fingerprint(E, n_rows=64, n_cols=16):
    """A small signature of an embedding matrix: n_rows evenly spaced rows, first n_cols values.
    Compared by cosine similarity so that fine-tuned descendants (after SFT or RL, whose
    embeddings moved a little) still match, while any other model does not."""
    rows = torch.linspace(0, E.shape[0] - 1, n_rows).long()
    return E[rows, :n_cols].float().flatten().tolist()


def fingerprints_match(a, b, threshold=0.95):
    a, b = torch.tensor(a), torch.tensor(b)
    return a.shape == b.shape and F.cosine_similarity(a, b, dim=0).item() >= threshold


def short_hash(values):
    return hashlib.sha256(json.dumps([round(v, 4) for v in values]).encode()).hexdigest()[:12]


# -----------------------------------------------------------------------------
# 2. Prefixed inputs: left padded for generation, right padded for training

def embed_rows(model, token_rows, prefixes=None, left_pad=True):
    """Build the batch [prefix_i; E(tokens_i)], padded to a common length: on the left for
    generation (the newest token of every row in the last column), on the right for training
    (every row starts at position 0 and causal attention needs no mask).

    token_rows: B lists of token ids; prefixes: None or B entries, each None, embeddings (L_i, d),
    or token ids (L_i,) of a text prefix (embedded by `model` like the prompt). Returns
    inputs_embeds (B, T, d) and attention_mask (B, T) bool. Gradients reach embedding prefixes only
    if the caller passed ones that require grad; a text prefix's rows are the model's embeddings.
    """
    B = len(token_rows)
    prefixes = prefixes if prefixes is not None else [None] * B
    prefix_lens = [0 if p is None else p.shape[0] for p in prefixes]
    lengths = [pl + len(t) for pl, t in zip(prefix_lens, token_rows)]
    T = max(lengths)
    E = model.embed_tokens
    device = E.weight.device
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    vectors = []                                    # (row, first slot, (L, d)) of embedding prefixes
    for i, (tokens, p, pl, n) in enumerate(zip(token_rows, prefixes, prefix_lens, lengths)):
        start = T - n if left_pad else 0
        ids[i, start + pl:start + n] = torch.as_tensor(tokens, dtype=torch.long)
        mask[i, start:start + n] = True
        if p is not None and not p.is_floating_point():
            ids[i, start:start + pl] = p.cpu()                          # text: tokens like the prompt's
        elif p is not None:
            vectors.append((i, start, p))
    embeds = E(ids.to(device))                                                  # (B, T, d)
    if vectors:
        block = torch.zeros_like(embeds)
        is_prefix = torch.zeros(B, T, 1, dtype=torch.bool, device=device)
        for i, start, p in vectors:
            block[i, start:start + len(p)] = p.to(embeds)
            is_prefix[i, start:start + len(p)] = True
        embeds = torch.where(is_prefix, block, embeds)
    return embeds, mask.to(device)


def completion_batch(model, prompts, completions, prefixes=None):
    """The training layout: rows [prefix_i; prompt_i; completion_i], right padded.

    Returns inputs_embeds (B, T, d), targets (B, T) and loss_mask (B, T): position t predicts
    targets[:, t], and loss_mask is True exactly at the positions that predict a completion token,
    so prefix, prompt and padding never carry loss.
    """
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    embeds, mask = embed_rows(model, rows, prefixes, left_pad=False)
    B, T = mask.shape
    targets = torch.zeros(B, T, dtype=torch.long)
    loss_mask = torch.zeros(B, T, dtype=torch.bool)
    for i, (c, n) in enumerate(zip(completions, mask.sum(1).tolist())):
        if c:   # row i is real at 0 .. n - 1; positions n - |c| - 1 .. n - 2 predict its completion
            targets[i, n - len(c) - 1:n - 1] = torch.as_tensor(c, dtype=torch.long)
            loss_mask[i, n - len(c) - 1:n - 1] = True
    return embeds, targets.to(mask.device), loss_mask.to(mask.device)


# -----------------------------------------------------------------------------
# 3. KV cache and generation

class KVCache:
    """Keys and values of every layer, preallocated for the batch and the longest sequence, one
    buffer per layer so that a compiled decode step updates each in place. The prompts fill slots
    [0, T) (the prefill); each decode step writes slot `slot`, a tensor, so the step's shapes never
    change. Attention reads every slot under a mask: `key_valid` marks the slots that hold a real
    position of each row, `seen` counts each row's real positions so far (its next RoPE position)."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        for buffer in self.k + self.v:      # a CUDA graph reads them where they are, without a copy
            torch._dynamo.mark_static_address(buffer)
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)

    def reset(self):
        """Empty, for the next generate() call: the slots are overwritten, only the counters restart."""
        self.key_valid.zero_()
        self.seen.zero_()
        self.slot.zero_()
        return self

    def slots(self, T):
        return self.slot + torch.arange(T, device=self.slot.device)                      # (T,)

    def prepare(self, attention_mask):
        """Record the new positions; returns (positions (B, T), key_valid (B, S), query_slots (T,))."""
        slots = self.slots(attention_mask.shape[1])
        self.key_valid.index_copy_(1, slots, attention_mask)
        positions = self.seen[:, None] + attention_mask.cumsum(1) - 1
        return positions.clamp(min=0), self.key_valid, slots

    def update(self, layer, k, v):
        """Store this step's k, v (B, Hkv, T, hd); returns every slot's keys and values (B, Hkv, S, hd)."""
        slots = self.slots(k.shape[2])
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)
        return self.k[layer], self.v[layer]

    def advance(self, attention_mask):
        self.seen += attention_mask.sum(1)
        self.slot += attention_mask.shape[1]


def keyed_uniform(keys, t, V):
    """Uniform noise strictly inside (0, 1), (B, V) float64, a function of (keys[b], t, v) alone: a
    counter-based generator (a 32-bit integer hash, computed in int64 without overflow), so that a
    row's sampling noise does not depend on the batch, the rank or the process that draws it. keys (B,)
    int64, below 2^32."""
    def mix(x):                      # avalanche hash of 32-bit values (products stay below 2^59)
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
        return x ^ (x >> 16)
    row = mix(mix(keys) ^ t)                                                             # (B,)
    x = mix((row[:, None] + 0x9E3779B9 * torch.arange(V, device=keys.device)) & 0xFFFFFFFF)  # (B, V)
    # All 32 bits, in float64 (exact, from 2^-33 to 1 - 2^-33): the hash is a bijection of the key, so
    # for each (t, v) the 2^32 keys meet every value once, and q = -log u resolves a draw of a token
    # at 1e-9 of the top one; 24 bits in float32 rounded the top value to 1 and tail tokens away
    return (x.double() + 0.5) / 2**32


def sample_next(logits, temperature=1.0, top_p=1.0, generator=None, keys=None, t=0):
    """logits (B, V) -> next tokens (B,). temperature 0 is greedy. No host synchronisation:
    the exponential-race trick, argmax(p / q) with q = -log u ~ Exp(1), draws from p on the device. u
    comes from keyed_uniform(keys, t) when keys are given, else from generator."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token once the mass before it already reaches top_p (the top token always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    logp = logits.log_softmax(-1).double()                                                # (B, V)
    u = keyed_uniform(keys, t, logp.shape[1]) if keys is not None else torch.rand(
        logp.shape, dtype=torch.float64, device=logp.device, generator=generator).clamp_(2**-53, 1 - 2**-53)
    # in log space, with u strictly inside (0, 1): 0 < q < inf, so every token of probability 0
    # (outside top-p, or a logit of -inf) scores -inf, below any other, and is never drawn, not even by a tie
    return (logp - (-u.log()).log()).argmax(-1)


@dataclass
class Generation:
    tokens: torch.Tensor    # (B, N) new tokens, the stop token included, pad_id after it
    lengths: torch.Tensor   # (B,) number of new tokens of each row
    stopped: torch.Tensor   # (B,) True: ended on a stop token; False: hit max_new_tokens

    def token_lists(self):
        return [row[:n].tolist() for row, n in zip(self.tokens.cpu(), self.lengths.tolist())]


def _decode_step(model, tokens, cache):
    """One decode step for every row: tokens (B,) -> logits (B, V)."""
    embeds = model.embed_tokens(tokens[:, None])                                 # (B, 1, d)
    mask = torch.ones(tokens.shape[0], 1, dtype=torch.bool, device=tokens.device)
    return model.lm_head(model.hidden_states(embeds, mask, kv_cache=cache)[:, -1])


@functools.cache
def compiled_decode_step(device_type):
    """_decode_step under torch.compile, built once per process: symbolic batch and cache sizes, so
    that one graph serves every call; on a GPU captured in CUDA graphs (one recording per bucket)."""
    return torch.compile(_decode_step, fullgraph=True, dynamic=True,
                         mode="reduce-overhead" if device_type == "cuda" else None)


def decode_buckets(batch, length):
    """The shapes a compiled step runs at: the batch rounded up to a power of two (at least 2: a batch
    of 1 would compile a graph of its own), the cache length to a multiple of 256, so that a run's
    varied batches share a few graphs."""
    return max(2, 1 << (batch - 1).bit_length()), -(-length // 256) * 256


_CACHES = {}      # bucketed shape -> the KVCache a compiled step reuses (CUDA graphs keep its address)


def bucketed_cache(config, batch, length, device, dtype):
    """The KV cache of one bucketed shape, made once and reused by every later call of that shape:
    a CUDA graph recorded on its buffers replays without a copy and without recording again (torch
    stops using graphs for a function recorded too often). It stays allocated between calls;
    guard.memory_need counts it as held throughout a run."""
    key = (config.num_hidden_layers, config.num_key_value_heads, config.head_dim, batch, length, dtype, str(device))
    if key not in _CACHES:
        _CACHES[key] = KVCache(config, batch, length, device, dtype)
    return _CACHES[key].reset()


@torch.inference_mode()
def generate(model, prompts, prefixes=None, max_new_tokens=128, temperature=1.0, top_p=1.0, stop_tokens=(),
             keys=None, generator=None, pad_id=0, compile=None, check_every=16):
    """Batched sampling with a KV cache: the one decode path of every script and of the benchmarks.

    prompts: B lists of token ids; prefixes: None or B prefixes (embed_rows), each placed before its
    prompt. temperature 0 = greedy. A row stops at its first token in stop_tokens or after
    max_new_tokens. Sampling noise: with keys (B ints), row b's noise at its t-th new token is
    keyed_uniform(keys[b], t), so a row samples the same tokens in any batch, on any rank, in any
    run; without keys it comes from generator (a torch.Generator on the model's device).
    Decoding keeps fixed shapes: a finished row stays in the batch (masked), and whether every row
    has finished is read only every check_every tokens, the one host synchronisation. compile
    (default: on CUDA) runs the decode step compiled (compiled_decode_step), at bucketed shapes
    (decode_buckets) on a cache kept for its shape (bucketed_cache): the batch is padded with copies
    of row 0 that count as finished from the start.
    """
    device = model.embed_tokens.weight.device
    compile = device.type == "cuda" if compile is None else compile
    B = len(prompts)
    padded_batch = decode_buckets(B, 0)[0] if compile else B
    if compile:
        pad = padded_batch - B
        prompts = list(prompts) + [prompts[0]] * pad
        prefixes = None if prefixes is None else list(prefixes) + [prefixes[0]] * pad
        keys = None if keys is None else list(keys) + [0] * pad
    embeds, mask = embed_rows(model, prompts, prefixes)                          # (B', T, d)
    length = embeds.shape[1] + max_new_tokens
    cache = bucketed_cache(model.config, padded_batch, decode_buckets(B, length)[1], device, embeds.dtype) \
        if compile else KVCache(model.config, B, length, device, embeds.dtype)
    # The prefill needs the next-token logits of the last position only: the full (B, T, V) would
    # be 4 GB for 64 prompts of 300 tokens with a 49K vocabulary, and a fifth of the prefill's work.
    logits = model.lm_head(model.hidden_states(embeds, mask, kv_cache=cache)[:, -1])    # (B', V)

    key_tensor = None if keys is None else torch.tensor([k % 2**32 for k in keys], device=device)
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    out = torch.full((padded_batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    finished = torch.arange(padded_batch, device=device) >= B      # the bucket's padding rows
    stopped = torch.zeros(padded_batch, dtype=torch.bool, device=device)
    lengths = torch.zeros(padded_batch, dtype=torch.long, device=device)
    step = compiled_decode_step(device.type) if compile else _decode_step
    for t in range(max_new_tokens):
        tokens = sample_next(logits, temperature, top_p, generator, key_tensor, t)  # (B',)
        live = ~finished
        out[:, t] = torch.where(live, tokens, pad_id)
        lengths += live.long()
        hit_stop = live & torch.isin(tokens, stop)
        stopped |= hit_stop
        finished |= hit_stop
        if t == max_new_tokens - 1 or (t % check_every == check_every - 1 and bool(finished.all())):
            break
        logits = step(model, tokens, cache)
    return Generation(tokens=out[:B], lengths=lengths[:B], stopped=stopped[:B])


# -----------------------------------------------------------------------------
# 4. The palette: a VAE over mean-pooled trace embeddings, and the prefix sources

def mean_pooled_embeddings(E, token_rows):
    """h = mean over tokens of E([q; o]) for each row: (N, d). E is the frozen (V, d) matrix."""
    out = torch.empty(len(token_rows), E.shape[1], dtype=torch.float32)
    for i, ids in enumerate(token_rows):
        out[i] = E[torch.as_tensor(ids, dtype=torch.long)].float().mean(0)
    return out


def mlp(sizes):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.GELU()]
    return nn.Sequential(*layers[:-1])   # no activation after the last layer


# How a decoded h_hat becomes a prefix embedding. h_hat = decoder(z) * h_std + h_mean is dominated
# by h_mean, the corpus mean of mean-pooled embeddings: on SmolLM2-135M every prior h_hat points
# within a few degrees of it (pairwise cosine 0.94 to 0.99).
#   paper     h_hat as it comes out (the paper's D(z)); far shorter than a token embedding, since
#             averaging n embeddings shrinks the norm
#   rescaled  h_hat's direction at the mean token-embedding norm: every latent becomes nearly the
#             same vector, h_mean blown up to token size, which no real token resembles
#   centred   (h_hat - h_mean) at the mean token-embedding norm: only what the latent changes
# The default is set by the measurements of docs/results/smollm2_prefix_forms.md. vae.json's
# prefix_scale multiplies the prefix (docs/results/smollm2.md measures it on SmolLM2).
# VAE directories written before vae.json recorded the form load as "rescaled", their old form.
PREFIX_FORMS = ("centred", "rescaled", "paper")
DEFAULT_PREFIX_FORM = "centred"


class PaletteVAE(nn.Module):
    """Encoder h -> (mu, log sigma^2) in R^k, decoder z -> h_hat in R^d.

    Two choices, both made so that the latent space is about reasoning content, not scale:
    - h is standardised per dimension (statistics of the training corpus, kept as buffers)
      before encoding, and the reconstruction error is measured there, so every embedding
      dimension counts equally however small its spread.
    - A decoded h_hat is a mean of token embeddings, not a token embedding, so `prefix()` turns
      it into one in the way `prefix_form` names (see PREFIX_FORMS below).
    """

    def __init__(self, dim, latent_dim=16, hidden_dim=256, depth=2, prefix_form=DEFAULT_PREFIX_FORM,
                 prefix_scale=1.0):
        super().__init__()
        if prefix_form not in PREFIX_FORMS:
            raise UserError(f"unknown prefix form {prefix_form!r}; choose one of {', '.join(PREFIX_FORMS)}")
        self.dim, self.latent_dim, self.hidden_dim, self.depth = dim, latent_dim, hidden_dim, depth
        self.prefix_form, self.prefix_scale = prefix_form, prefix_scale   # scale: the prefix's norm over a token's
        self.encoder = mlp([dim] + [hidden_dim] * depth + [2 * latent_dim])
        self.decoder = mlp([latent_dim] + [hidden_dim] * depth + [dim])
        self.register_buffer("h_mean", torch.zeros(dim))
        self.register_buffer("h_std", torch.ones(dim))
        self.register_buffer("token_norm", torch.ones(()))

    def set_statistics(self, h, E):
        self.h_mean.copy_(h.mean(0))
        self.h_std.copy_(h.std(0).clamp(min=1e-6))
        self.token_norm.copy_(E.float().norm(dim=-1).mean())

    def encode(self, h):
        mu, logvar = self.encoder((h - self.h_mean) / self.h_std).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z):
        """z (..., k) -> h_hat (..., d) in the (unstandardised) space of h."""
        return self.decoder(z) * self.h_std + self.h_mean

    def forward(self, h, beta, eps):
        """The training loss: negative ELBO pieces, averaged over the batch: recon + beta * KL.
        recon = ||h_hat - h||^2 in standardised units; KL(N(mu, sigma^2) || N(0, I)) closed form.
        eps (N, k): the standard normal noise of the reparameterisation."""
        mu, logvar = self.encode(h)                                              # (N, k) each
        z = mu + (0.5 * logvar).exp() * eps                                      # reparameterised
        recon = ((self.decoder(z) - (h - self.h_mean) / self.h_std) ** 2).sum(-1).mean()
        kl = (-0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(-1)).mean()
        return recon + beta * kl, recon, kl

    def prefix(self, z):
        """z (..., k) -> prefix embeddings (..., d), in the form self.prefix_form names."""
        h_hat = self.decode(z)                                                   # (..., d)
        if self.prefix_form == "paper":
            return h_hat * self.prefix_scale
        # rescaled keeps h_hat's direction, which is mostly h_mean's; centred keeps only what
        # the latent changes, the deviation from the corpus mean
        direction = h_hat if self.prefix_form == "rescaled" else h_hat - self.h_mean
        return direction / direction.norm(dim=-1, keepdim=True).clamp(min=1e-6) * self.token_norm * self.prefix_scale


def save_vae(vae, out_dir, meta):
    """vae.safetensors (weights and statistics) + vae.json (dimensions, the prefix form, beta,
    the model it belongs to with its embedding fingerprint, per-domain latent statistics), each
    written under a temporary name and renamed into out_dir (which also holds the run's logs)."""
    state = {k: v.detach().contiguous().cpu() for k, v in vae.state_dict().items()}
    os.makedirs(out_dir, exist_ok=True)
    save_file(state, os.path.join(out_dir, ".tmp-vae.safetensors"))       # renamed in when whole
    os.replace(os.path.join(out_dir, ".tmp-vae.safetensors"), os.path.join(out_dir, "vae.safetensors"))
    atomic_write_json(os.path.join(out_dir, "vae.json"), {
        "dim": vae.dim, "latent_dim": vae.latent_dim, "hidden_dim": vae.hidden_dim,
        "depth": vae.depth, "prefix_form": vae.prefix_form, "prefix_scale": vae.prefix_scale, **meta})


def load_vae(vae_dir, E=None):
    """Load a VAE; if the policy's embedding matrix E is given, refuse one trained for another
    model (another embedding size, or a fingerprint that does not match)."""
    json_path = os.path.join(str(vae_dir), "vae.json")
    if vae_dir is None or not os.path.exists(json_path) or not os.path.exists(os.path.join(vae_dir, "vae.safetensors")):
        raise UserError(f"--vae {vae_dir}: no vae.json / vae.safetensors; train one with train_vae.py")
    meta = read_json(json_path, "VAE settings")
    check_vae_json(meta, json_path)
    if E is not None and (E.shape[1] != meta["dim"] or not fingerprints_match(embedding_fingerprint(E),
                                                                                  meta["fingerprint"])):
        raise UserError(f"{vae_dir}: the VAE was trained for another model ({meta.get('model')}, embeddings of "
                        f"size {meta['dim']}, fingerprint {short_hash(meta['fingerprint'])}); this model's "
                        f"are of size {E.shape[1]} and differ; train a VAE for this model with train_vae.py")
    vae = PaletteVAE(meta["dim"], meta["latent_dim"], meta["hidden_dim"], meta["depth"],    # an older vae.json:
                     meta.get("prefix_form", "rescaled"), meta.get("prefix_scale", 1.0))  # the form it had then
    state = read_safetensors_file(os.path.join(vae_dir, "vae.safetensors"))
    check_state(vae, state, os.path.join(vae_dir, "vae.safetensors"))
    vae.load_state_dict(state)
    return vae.eval().requires_grad_(False), meta


class PrefixSource:
    """The interface of every prefix source: sample(n, L, generator) -> n prefixes, as embeddings
    (n, L, d) or, for a text source, token ids (n, rows); None when L == 0. Each source class says
    what it needs and allows (the class attributes below), so that check_prefix_sources refuses a
    misuse before anything is loaded and no other file tests names, and what it is (`summary`, which
    --prefix-source --help prints). A new source is one class here and one entry in PREFIX_SOURCES
    (argparse's choices come from it). Each of the L prefix vectors is an independent draw unless
    tie=True repeats one draw L times. The norms differ by design: vae (centred, rescaled), noise and
    random_decoder give vectors at the mean token-embedding norm (vae times its prefix_scale); vae's
    paper form keeps the decoder's own norm, far shorter; rsp's entries are drawn like the table's,
    so its norm is sqrt(d (var + mean^2)) of the table's entries, that of a typical row rather than
    the mean of the rows' norms; lorem's rows are real token embeddings."""
    name = "none"
    summary = "no prefix"
    norm = None             # "token": vectors at the mean token-embedding norm; "table": a typical row's
    needs_vae = False       # built from --vae (and --region: the VAE's latent regions)
    tieable = True          # --tie has a meaning

    def __init__(self, E, tie=False, **context):
        self.dim, self.token_norm, self.tie = E.shape[1], E.float().norm(dim=-1).mean().item(), tie

    def rows(self, L):
        """Rows one prefix of length L takes in the context."""
        return L

    def _noise(self, n, L, width, generator):
        return torch.randn((n, 1 if self.tie else L, width), generator=generator).expand(n, L, width)

    def _to_token_norm(self, x):
        return x / x.norm(dim=-1, keepdim=True) * self.token_norm

    @torch.no_grad()
    def sample(self, n, L, generator=None):
        if L == 0:
            return None
        x = self._draw(n, L, generator)
        return x.float() if x.is_floating_point() else x


class NoPrefix(PrefixSource):
    """No prefix at all (the baselines)."""

    def rows(self, L):
        return 0

    def sample(self, n, L, generator=None):
        return None


class VAEPrefix(PrefixSource):
    """The method: z ~ N(0, I) (the prior) or z ~ N(mean_d, cov_d) (domain d's region), decoded by
    the VAE into a prefix embedding (PaletteVAE.prefix)."""
    name, needs_vae = "vae", True
    summary = "the method: z from the VAE's prior (or --region's), decoded into a prefix vector"
    norm = "token"          # times the VAE's prefix_scale (the paper form: the decoder's own)

    def __init__(self, E, vae=None, region=None, tie=False, **context):
        super().__init__(E, tie)
        self.vae, meta = (vae, {}) if isinstance(vae, PaletteVAE) else load_vae(vae, E)
        self.region = region
        if region is not None:
            stats = meta.get("domains", {})
            if region not in stats:
                raise UserError(f"the VAE has no latent region {region!r}; it knows {sorted(stats)}")
            self.region_mean = torch.tensor(stats[region]["mean"])
            cov = torch.tensor(stats[region]["cov"])
            self.region_chol = torch.linalg.cholesky(cov + 1e-5 * torch.eye(len(cov)))

    def _draw(self, n, L, generator):
        z = self._noise(n, L, self.vae.latent_dim, generator)                  # (n, L, k)
        if self.region is not None:
            z = self.region_mean + z @ self.region_chol.T
        return self.vae.prefix(z)                                              # (n, L, d)


class NoisePrefix(PrefixSource):
    """A raw Gaussian vector scaled to the mean token-embedding norm: the paper's noise baseline."""
    name = "noise"
    summary = "a Gaussian vector at the mean token-embedding norm (the paper's noise baseline)"
    norm = "token"

    def _draw(self, n, L, generator):
        return self._to_token_norm(self._noise(n, L, self.dim, generator))


class RandomDecoderPrefix(PrefixSource):
    """An untrained, randomly initialised small GPT-style decoder that maps L noise vectors to L
    embeddings (the paper's VLM variant). Its weights come from the seed, so every rank and every
    later stage that names the same seed gets the same decoder."""
    name = "random_decoder"
    summary = "noise through an untrained small decoder (the paper's VLM variant)"
    norm = "token"

    def __init__(self, E, tie=False, seed=0, width=64, layers=2, **context):
        super().__init__(E, tie)
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=torch.Generator().manual_seed(seed))))
            block = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=4 * width, dropout=0.0,
                                               batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False).eval()
            self.out = nn.Linear(width, self.dim)
        self.width = width

    def _draw(self, n, L, generator):
        causal = nn.Transformer.generate_square_subsequent_mask(L)
        return self._to_token_norm(self.out(self.blocks(self._noise(n, L, self.width, generator),
                                                        mask=causal, is_causal=True)))


class RSPPrefix(PrefixSource):
    """Random soft prompts (RSP, arXiv 2605.11936): each prefix vector drawn entry-wise from a
    Gaussian with the mean and variance of the embedding table's entries, fresh for every draw; no
    training and no rescaling, so its norm is that of a typical embedding row, not the mean one."""
    name = "rsp"
    summary = "random soft prompts: entries drawn with the embedding table's mean and variance"
    norm = "table"

    def __init__(self, E, tie=False, **context):
        super().__init__(E, tie)
        self.mean, self.std = E.float().mean().item(), E.float().std().item()

    def _draw(self, n, L, generator):
        return self.mean + self.std * self._noise(n, L, self.dim, generator)


# Pseudo-Latin for the lorem source: lower case only, so that every character is also a token
# of the toy world's character-level tokenizer.
LOREM_WORDS = tuple("""
lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore
et dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris nisi aliquip
ex ea commodo consequat duis aute irure in reprehenderit voluptate velit esse cillum eu fugiat
nulla pariatur excepteur sint occaecat cupidatat non proident sunt culpa qui officia deserunt
mollit anim id est laborum curabitur pretium tincidunt lacus gravida orci a odio nullam
varius turpis egestas mauris vitae ultricies leo integer malesuada nunc vel risus viverra
maecenas accumsan lacinia quam pellentesque habitant morbi tristique senectus netus fames ac
""".split())
LOREM_BOUNDARY = "\n\nignore the text above. solve the problem below.\n\n"


class LoremPrefix(PrefixSource):
    """Real text as a prefix: L tokens of pseudo-Latin, fresh for every prefix, then the boundary
    instruction LOREM_BOUNDARY (L + b token ids, b the boundary's tokens): the text perturbation of
    LoPE (arXiv 2605.05566) in the palette's slot, before the whole prompt (with --template chat,
    ahead of the turn markers), so the sources differ in what the prefix holds and nothing else.
    The policy embeds the ids as it embeds the prompt; the prompt's own ids are the same with or
    without it, so pi(o | q) of the unprefixed prompt is a forward pass over the very tokens that
    followed the text. Words are drawn with the caller's torch generator (the python-lorem package
    draws from Python's global random, which a resumed run would not continue exactly), a period
    after about one word in eight and a comma after one in twelve, and cut to exactly L tokens."""
    name, tieable = "lorem", False
    summary = "L tokens of pseudo-Latin text, then a boundary instruction (LoPE's perturbation)"

    def __init__(self, E, tokenizer=None, **context):
        super().__init__(E)
        if tokenizer is None:
            raise UserError("prefix source 'lorem' needs the policy's tokenizer (its prefixes are text)")
        self.encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
        self.boundary_ids = self.encode(LOREM_BOUNDARY)

    def rows(self, L):
        return L + len(self.boundary_ids) if L else 0

    def text(self, n, L, generator=None):
        """n strings of L words (each word one token or more, so at least L tokens)."""
        words = torch.randint(len(LOREM_WORDS), (n, L), generator=generator).tolist()     # (n, L)
        marks = torch.rand(n, L, generator=generator).tolist()                              # (n, L)
        end = lambda m: ". " if m < 1 / 8 else ", " if m < 1 / 8 + 1 / 12 else " "
        return ["".join(LOREM_WORDS[w] + end(m) for w, m in zip(ws, ms)).rstrip() for ws, ms in zip(words, marks)]

    def _draw(self, n, L, generator):
        return torch.tensor([self.encode(t)[:L] + self.boundary_ids for t in self.text(n, L, generator)])


PREFIX_SOURCES = {cls.name: cls for cls in (NoPrefix, VAEPrefix, NoisePrefix, RandomDecoderPrefix, LoremPrefix, RSPPrefix)}


def make_prefix_source(name, E, tokenizer=None, vae=None, region=None, tie=False, seed=0):
    """The source `name` for the policy whose embedding matrix is E (V, d) (a source keeps only
    statistics of E; the VAE checks E's fingerprint); vae: a train_vae.py directory."""
    return PREFIX_SOURCES[name](E=E.detach().float().cpu(), tokenizer=tokenizer, vae=vae, region=region,
                                tie=tie, seed=seed)


def add_prefix_arguments(parser, source="vae", L=1, L_help="prefix tokens (lorem: text tokens, then the boundary)"):
    """The palette's flags, the same in every stage that draws prefixes."""
    parser.add_argument("--prefix-source", default=source, choices=PREFIX_SOURCES,
                        help="; ".join(f"{name}: {cls.summary}" for name, cls in PREFIX_SOURCES.items()))
    parser.add_argument("--vae", default=None, help="directory written by train_vae.py")
    parser.add_argument("--region", default=None, help="sample z from this domain's region of the VAE, not the prior")
    parser.add_argument("--L", type=ranged(int, 0), default=L, help=L_help)
    parser.add_argument("--tie", action="store_true", help="one draw repeated L times instead of L draws")


def check_prefix_sources(used, vae, region, tie, L=2):
    """used: (flag, source name) of every source a run draws from; L: the longest prefix they draw.
    Refuses, before anything is loaded, what a source needs and does not get, or gets and cannot use."""
    if tie and L <= 1:
        raise UserError(f"--tie repeats one draw over the L prefix vectors; with --L {L} there is nothing to repeat; "
                        "leave --tie out")
    for flag, name in used:
        if PREFIX_SOURCES[name].needs_vae and vae is None:
            raise UserError(f"{flag} {name} needs --vae DIR (a directory written by train_vae.py)")
        if tie and not PREFIX_SOURCES[name].tieable:
            raise UserError(f"--tie has no meaning for {flag} {name} (it draws no vectors to repeat); leave --tie out")
    if vae is not None and not any(PREFIX_SOURCES[name].needs_vae for _, name in used):
        raise UserError("--vae has no effect here: no prefix source of this run reads a VAE; leave it out")
    if region is not None and not any(PREFIX_SOURCES[name].needs_vae for _, name in used):
        raise UserError("--region needs a VAE source (--prefix-source vae or --resample-source vae): "
                        "regions are areas of the VAE's latent space")


# -----------------------------------------------------------------------------
# 5. RL: group advantages and the clipped policy-gradient loss

# name -> advantages (P, G) of the rewards (P, G) of G rollouts of each of P prompts, before the
# zero-variance rule below. argparse takes its choices from here; a new estimator is one entry.
ADVANTAGE_ESTIMATORS = {
    "grpo": lambda r, eps: (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps),   # Bessel's std
    "rloo": lambda r, eps: (r - r.mean(1, keepdim=True)) * r.shape[1] / (r.shape[1] - 1),     # leave-one-out
    "drgrpo": lambda r, eps: r - r.mean(1, keepdim=True),                                     # Dr. GRPO
}


def group_advantages(rewards, estimator="grpo", eps=1e-6):
    """rewards (P, G): G rollouts of each of P prompts -> advantages (P, G), float32 or wider.
    grpo    (r - mean) / (std + eps), std with Bessel's correction (as in DeepSeekMath's GRPO)
    rloo    r_i - mean of the other G - 1 rewards = G / (G - 1) * (r_i - mean)
    drgrpo  r - mean, no std scaling (Dr. GRPO)
    A group whose rewards are all equal carries no signal: its advantages are exactly zero."""
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    if rewards.shape[1] == 1:
        return torch.zeros_like(rewards)
    adv = ADVANTAGE_ESTIMATORS[estimator](rewards, eps)
    return adv.masked_fill((rewards == rewards[:, :1]).all(1, keepdim=True), 0.0)


LOSS_AGGREGATIONS = ("token-mean", "seq-mean", "constant")


def loss_token_weights(loss_mask, aggregation, n_sequences, n_tokens, max_new_tokens, dtype=torch.float32):
    """Per-token weights w (B, T) in `dtype` (the log-probs', so a float64 check is exact) such
    that loss = sum(w * per_token_loss) over a micro-batch, and the micro-batches of one rollout
    batch add up to the batch's loss exactly.
    token-mean  every completion token of the batch weighs 1 / n_tokens (total in the batch)
    seq-mean    each sequence weighs 1 / n_sequences, spread over its own tokens
    constant    1 / (n_sequences * max_new_tokens), Dr. GRPO's length-independent normaliser"""
    mask = loss_mask.to(dtype)
    per_sequence = {"token-mean": n_tokens / n_sequences, "constant": max_new_tokens,
                    "seq-mean": mask.sum(1, keepdim=True).clamp(min=1)}[aggregation]
    return mask / per_sequence / n_sequences


def policy_loss(logprobs, old_logprobs, advantages, weights, clip_low=0.2, clip_high=0.2,
                ref_logprobs=None, kl_coef=0.0, entropy=None, entropy_coef=0.0, shaped=None):
    """Clipped surrogate (PPO/GRPO) with an optional k3 KL penalty to a reference policy and an
    optional token-entropy bonus.

    logprobs, old_logprobs, ref_logprobs, entropy, weights: (B, T); advantages: (B,).
    per token: -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) + kl_coef * k3
               - entropy_coef * H,
    ratio = exp(logprobs - old_logprobs), k3 = exp(ref - logprobs) - (ref - logprobs) - 1,
    H = -sum_v pi(v) log pi(v), the entropy of the policy's next-token distribution at that
    position (it must keep its graph for the bonus to have a gradient: token_logprobs). Rows where
    shaped (B,) is True take LoPE's shaped term -f(ratio) * A, f(r) = r / (r + 0.1), unclipped (f < 1
    bounds it), in place of the clipped one (credit.py's naive-shaped). Padding has weight 0.
    Returns (loss = sum(weights * per_token), per-row sums (B,) over the weighted tokens: "loss"
    (each row's share of the loss), "tokens", "clipped" (tokens whose clip is active), "kl" (of k3,
    with a reference) and "entropy" (when given)), so that callers can add up micro-batches, ranks
    and updates and divide by the tokens.
    """
    ratio = (logprobs - old_logprobs).exp()
    A = advantages[:, None]
    unclipped = ratio * A
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * A
    per_token = -torch.minimum(unclipped, clipped)
    is_clipped = clipped < unclipped
    if shaped is not None and shaped.any():
        per_token = torch.where(shaped[:, None], -ratio / (ratio + 0.1) * A, per_token)
        is_clipped &= ~shaped[:, None]
    counted = weights > 0
    row_sum = lambda x: (x.detach() * counted).sum(1).double()                               # (B,)
    stats = {"tokens": row_sum(torch.ones_like(weights)), "clipped": row_sum(is_clipped)}
    if ref_logprobs is not None and kl_coef > 0:
        log_ratio = ref_logprobs - logprobs
        k3 = log_ratio.exp() - log_ratio - 1
        per_token = per_token + kl_coef * k3
        stats["kl"] = row_sum(k3)
    if entropy is not None:
        if entropy_coef > 0:      # else no gradient through the (N, V) entropy at all
            per_token = per_token - entropy_coef * entropy
        stats["entropy"] = row_sum(entropy)
    stats["loss"] = (weights * per_token).detach().sum(1).double()
    return (weights * per_token).sum(), stats
