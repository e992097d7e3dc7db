"""The model side of nanopalette: 1. a Qwen2 / Qwen3 / Llama decoder with Hugging Face's parameter names,
2. prefixed inputs, 3. generation with a KV cache, 4. the palette (a VAE, the prefix sources), 5. the RL losses.
Rows are LEFT padded for generation (the newest token of every row in the last column), RIGHT padded for
training. `attention_mask` (B, T) is True on real positions (prefix or token); a row's positions count its
real positions from 0, so padding never shifts RoPE and a row gives the logits it gives alone."""

import functools
import hashlib
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from common import UserError, atomic_dir, atomic_write_json, read_json, read_safetensors_file

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "added_tokens.json")

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

    def to_hf(self, dtype):   # transformers keeps unknown keys of config.json (nanopalette_warmup) as they are
        skip = ("rope_scaling", "warmup", "attention_bias" if self.model_type == "qwen2" else None)
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        warmup = {} if self.warmup is None else {"nanopalette_warmup": self.warmup}
        rope = {"rope_theta": self.rope_theta, "rope_type": "default", **(self.rope_scaling or {})}
        arch = {"qwen2": "Qwen2", "qwen3": "Qwen3", "llama": "Llama"}[self.model_type] + "ForCausalLM"
        return {**d, **warmup, "rope_parameters": rope, "architectures": [arch], "hidden_act": "silu", "torch_dtype": dtype}

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):   # normalised in fp32 like the reference implementation, cast back before scaling
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

def rope_inv_freq(config):   # (head_dim/2,)
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return inv_freq if config.rope_scaling is None else llama3_inv_freq(inv_freq, config.rope_scaling)

def llama3_inv_freq(inv_freq, s):
    # Llama 3: low frequencies (long wavelengths) divided by `factor`, high ones kept, the band between interpolated
    factor, low, high, old_len = (s[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                 "original_max_position_embeddings"))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)

def apply_rope(x, cos, sin):
    # x: (B, H, T, D); cos/sin: (B, 1, T, D). Halves rotated as in the HF checkpoints' layout.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin

class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        d, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, n * hd, bias=bias) for n in
                                                 (self.n_heads, self.n_kv_heads, self.n_kv_heads))
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=bias and config.model_type != "qwen2")
        if config.model_type == "qwen3":   # Qwen3 normalises queries and keys per head
            self.q_norm, self.k_norm = RMSNorm(hd, config.rms_norm_eps), RMSNorm(hd, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv_cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k, v = (proj(x).view(B, T, self.n_kv_heads, self.head_dim) for proj in (self.k_proj, self.v_proj))
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)   # (B, Hkv, S, hd): every slot of the cache
        # mask None: right-padded training rows, causal with no mask to build or save; else (B, 1, T, S) bool, True =
        # may attend (left-padded rows, a KV cache). GQA: each kv head serves n_heads / n_kv_heads queries; with a mask,
        # K and V are repeated to every query head (no fast CUDA kernel takes both: fp32 math kernel, 4x a score tensor)
        if mask is not None and self.n_kv_heads != self.n_heads:
            k, v = (t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1) for t in (k, v))   # (B, H, S, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=k.shape[1] != q.shape[1])
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        d, f = config.hidden_size, config.intermediate_size      # the SwiGLU MLP
        self.mlp = nn.ModuleDict(dict(gate_proj=nn.Linear(d, f, bias=False), up_proj=nn.Linear(d, f, bias=False),
                                      down_proj=nn.Linear(f, d, bias=False)))

    def forward(self, x, cos, sin, mask, kv_cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        h, mlp = self.post_attention_layernorm(x), self.mlp
        return x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))

class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(          # `model.*`, so state-dict keys match Hugging Face's
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps)))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.source_dir, self.gradient_checkpointing = None, False     # source_dir: tokenizer files copied on save

    def init_weights(self, std=0.02):   # models trained from scratch (the toy world); checkpoints skip this
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def embed_tokens(self):
        return self.model.embed_tokens

    def tie_weights(self):
        if self.config.tie_word_embeddings:         # one matrix for the embedding and lm_head
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(self, x, attention_mask=None, kv_cache=None):
        """inputs_embeds x (B, T, d) -> final-norm hidden (B, T, d): right-padded rows (training, causal
        attention without a mask), or left-padded ones whose real positions attention_mask (B, T) marks."""
        (B, T, _), device, mask = x.shape, x.device, None
        if attention_mask is None:
            positions = torch.arange(T, device=device).expand(B, T)                     # (B, T)
        else:   # positions (B, T), key_valid (B, S), query_slots (T,)
            positions, key_valid, query_slots = kv_cache.prepare(attention_mask) if kv_cache is not None else (
                (attention_mask.cumsum(1) - 1).clamp(min=0), attention_mask, torch.arange(T, device=device))
            # A query may see real keys at or before its own slot. Padded queries also see their own
            # slot, only so that no softmax row is empty (NaN); their outputs are never used.
            key_slots = torch.arange(key_valid.shape[1], device=device)
            causal = key_slots[None, :] <= query_slots[:, None]                          # (T, S)
            own = key_slots[None, :] == query_slots[:, None]                             # (T, S)
            mask = ((causal[None] & key_valid[:, None, :]) | own[None])[:, None]         # (B,1,T,S)
        freqs = positions[..., None].float() * self.inv_freq                          # (B, T, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]                           # (B,1,T,D)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        # recompute layers in backward only on a training forward (a forward filling a KV cache runs the blocks with it)
        checkpointed = self.gradient_checkpointing and self.training and kv_cache is None
        for block in self.model.layers:
            x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, None, use_reentrant=False) \
                if checkpointed else block(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:   # the cache moves past this forward's slots and real positions
            kv_cache.seen += attention_mask.sum(1)
            kv_cache.slot += attention_mask.shape[1]
        return self.model.norm(x)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None):   # -> (B, T, V)
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        return self.lm_head(self.hidden_states(x, attention_mask))

    @classmethod
    def from_pretrained(cls, path_or_id, device="cpu", dtype=torch.float32):   # a checkpoint directory or hub id
        path = resolve_checkpoint(path_or_id)
        config = load_config(path)
        with torch.device("meta"):
            model = cls(config)
        tensors, tied = read_safetensors(path), config.tie_word_embeddings
        expected = {k: v.shape for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        try:   # a tied lm_head is the embedding matrix (tie_weights), not a tensor of the file
            model.load_state_dict({k: tensors[k].to(device, dtype) for k in expected}, strict=not tied, assign=True)
        except Exception as e:
            import hf  # names the tensor that is missing or of another shape, in one line
            raise hf.tensors_error(expected, tensors, path, e) from None
        model.tie_weights()
        model.inv_freq, model.source_dir = rope_inv_freq(config).to(device), path
        return model

    def save_pretrained(self, out_dir, tokenizer_dir=None):   # + tokenizer_dir's (else source_dir's) tokenizer files
        c, tokenizer_dir = self.config, tokenizer_dir or self.source_dir
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()   # safetensors refuses shared
                 if not (c.tie_word_embeddings and k == "lm_head.weight")}               # storage; HF re-ties on load
        with atomic_dir(out_dir) as tmp:
            save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            hf = c.to_hf(str(next(iter(state.values())).dtype).removeprefix("torch."))
            ids = {k: getattr(c, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
            atomic_write_json(os.path.join(tmp, "generation_config.json"), {**ids, "do_sample": False})
            for name in TOKENIZER_FILES if tokenizer_dir else ():
                if os.path.exists(os.path.join(tokenizer_dir, name)):
                    shutil.copy(os.path.join(tokenizer_dir, name), tmp)
            if os.path.exists(os.path.join(tmp, "tokenizer_config.json")):   # the ids these weights were trained on
                from transformers import AutoTokenizer
                hf["nanopalette_vocab"] = vocab_hash(AutoTokenizer.from_pretrained(tmp))
            atomic_write_json(os.path.join(tmp, "config.json"), hf)

def load_tokenizer(path, vocab_size):   # checked: it loads, fits the model's vocabulary, has an eos token to stop at
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        probe = tokenizer("Question: 12 + 30 = ?\nAnswer:", add_special_tokens=False)["input_ids"]
    except Exception as e:  # a corrupt file surfaces as a JSON, tokenizers or OS error
        tokenizer, probe = e, []
    fits = probe and tokenizer.eos_token_id is not None and max(probe + [tokenizer.eos_token_id]) < vocab_size
    config = os.path.join(path, "config.json")   # the hash of the vocabulary the weights were saved with (hub: none)
    if not fits or os.path.exists(config) and read_json(config, "config").get("nanopalette_vocab") not in (
            None, vocab_hash(tokenizer)):
        import hf  # which check failed, in one line
        raise hf.tokenizer_error(tokenizer, probe, path, vocab_size)
    return tokenizer

def vocab_hash(tokenizer):   # of the (token, id) pairs: a tokenizer whose ids moved reads other embeddings
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:12]

def load_policy(path_or_id, device="cpu", dtype=torch.float32):   # the policy and its tokenizer
    model = Transformer.from_pretrained(path_or_id, device=device, dtype=dtype)
    return model, load_tokenizer(model.source_dir, model.config.vocab_size)

def resolve_checkpoint(path_or_id):   # a local checkpoint directory, or a hub id fetched into the local cache
    if os.path.isdir(path_or_id):
        return path_or_id
    import hf  # a hub id (or no such directory)
    return hf.download(path_or_id)

def load_config(path):   # path/config.json (transformers 4.x or 5.x RoPE) -> ModelConfig, or one line (hf.config_error)
    try:
        d = read_json(os.path.join(path, "config.json"), "config")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_type, heads = rope.get("rope_type", rope.get("type", "default")), d["num_attention_heads"]
        c = ModelConfig(**{f.name: d[f.name] for f in fields(ModelConfig)[:6]},     # model_type .. heads: required
                        **{k: d[k] for k in ("rms_norm_eps", "tie_word_embeddings", "max_position_embeddings",
                                             "bos_token_id", "eos_token_id", "pad_token_id") if k in d},
                        num_key_value_heads=d.get("num_key_value_heads") or heads,
                        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
                        attention_bias=d["model_type"] == "qwen2" or d.get("attention_bias", False),  # Qwen2: always
                        rope_theta=rope.pop("rope_theta", d.get("rope_theta", 10000.0)),
                        rope_scaling=rope if rope_type == "llama3" else None, warmup=d.get("nanopalette_warmup"))
        numbers = [getattr(c, f.name) for f in fields(c) if f.type in (int, float)]     # sizes, eps, theta
        if (c.model_type not in SUPPORTED_MODEL_TYPES or rope_type not in ("default", "llama3") or d.get("mlp_bias")
                or d.get("use_sliding_window") or not all(type(v) in (int, float) and v > 0 for v in numbers)
                or heads % c.num_key_value_heads):
            raise ValueError("a config.json nanopalette does not run")
        return c
    except Exception:
        import hf  # says in one line what is wrong with config.json
        raise hf.config_error(path) from None

def read_safetensors(path, names=None):   # the tensors of a checkpoint directory (all, or those in `names`)
    if os.path.exists(file := os.path.join(path, "model.safetensors")):
        return read_safetensors_file(file, names)
    import hf  # sharded (model.safetensors.index.json), or no weights at all
    return hf.read_shards(path, names)

def load_embedding_matrix(path_or_id):   # E (V, d) alone, all the VAE needs (1 GB of an 8B model's 16)
    path, name = resolve_checkpoint(path_or_id), "model.embed_tokens.weight"
    if name not in (tensors := read_safetensors(path, names={name})):
        raise UserError(f"{path}: checkpoint has no {name!r}")
    return tensors[name].float()

def _chunk_logprobs(hidden, targets, weight, temperature):
    # logits in float32 (float64 for a float64 model) outside autocast: bf16 logits keep ~3 digits, so pi and
    # pi_old of one token, from micro-batches padded differently, would differ and the ratio clip on noise
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    with torch.autocast(hidden.device.type, enabled=False):
        logits = hidden.to(dtype) @ weight.to(dtype).t()                                   # (n, V)
    logp = (logits / temperature).log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)                                                # (n,)
    return logp.gather(-1, targets[:, None]).squeeze(-1), entropy

def token_logprobs(model, inputs_embeds, targets, loss_mask, temperature=1.0, chunk=2048):
    """log p(target_t | context) at temperature and the next-token entropy (on the graph, for an entropy bonus),
    (B, T) each, zero off loss_mask. Logits only at loss positions, in chunks: never a (B, T, V) tensor."""
    hidden = model.hidden_states(inputs_embeds)                                  # (B, T, d)
    picked, picked_targets = hidden[loss_mask], targets[loss_mask]                # (N, d), (N,)
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    chunks = [torch.utils.checkpoint.checkpoint(_chunk_logprobs, picked[i:i + chunk], picked_targets[i:i + chunk],
                                                model.lm_head.weight, temperature, use_reentrant=False)
              for i in range(0, picked.shape[0], chunk)]           # recomputed in backward: no (N, V) kept
    # (N,) each, on the graph even when N == 0
    logprobs, entropy = (torch.cat(x) for x in zip(*chunks)) if chunks else [picked.sum(-1).to(dtype)] * 2
    zeros = hidden.new_zeros(targets.shape, dtype=dtype)                         # (B, T)
    return zeros.masked_scatter(loss_mask, logprobs), zeros.masked_scatter(loss_mask, entropy)

# -----------------------------------------------------------------------------
# 2. Prefixed inputs: left padded for generation, right padded for training

def embed_rows(model, token_rows, prefixes=None, left_pad=True):
    """The batch [prefix_i; E(tokens_i)] (B, T, d) and its attention_mask (B, T), left or right padded.
    prefixes: None or B entries, each None, embeddings (L_i, d) or the token ids (L_i,) of a text prefix."""
    prefixes = prefixes if prefixes is not None else [None] * len(token_rows)
    lengths = [len(t) + (0 if p is None else len(p)) for t, p in zip(token_rows, prefixes)]
    B, T, device = len(token_rows), max(lengths), model.embed_tokens.weight.device
    ids, mask = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.bool)       # (B, T) each
    starts = [T - n if left_pad else 0 for n in lengths]                  # each row's first real slot
    for i, (tokens, p, start, n) in enumerate(zip(token_rows, prefixes, starts, lengths)):
        ids[i, start + n - len(tokens):start + n] = torch.as_tensor(tokens, dtype=torch.long)
        mask[i, start:start + n] = True
        if p is not None and not p.is_floating_point():
            ids[i, start:start + len(p)] = p.cpu()                          # text: tokens like the prompt's
    embeds = model.embed_tokens(ids.to(device))                                                  # (B, T, d)
    for i, (p, start) in enumerate(zip(prefixes, starts)):
        if p is not None and p.is_floating_point():                         # vectors: in place of embeddings
            embeds[i, start:start + len(p)] = p.to(embeds)
    return embeds, mask.to(device)

def completion_batch(model, prompts, completions, prefixes=None):
    """Rows [prefix_i; prompt_i; completion_i], right padded: inputs_embeds (B, T, d), targets (B, T)
    (position t predicts targets[:, t]) and loss_mask (B, T), True where a completion token is predicted."""
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    embeds, mask = embed_rows(model, rows, prefixes, left_pad=False)
    targets, loss_mask = torch.zeros(mask.shape, dtype=torch.long), torch.zeros(mask.shape, dtype=torch.bool)
    for i, (c, n) in enumerate(zip(completions, mask.sum(1).tolist())):
        if c:   # row i is real at 0 .. n - 1; positions n - |c| - 1 .. n - 2 predict its completion
            targets[i, n - len(c) - 1:n - 1] = torch.as_tensor(c, dtype=torch.long)
            loss_mask[i, n - len(c) - 1:n - 1] = True
    return embeds, targets.to(mask.device), loss_mask.to(mask.device)

# -----------------------------------------------------------------------------
# 3. KV cache and generation

class KVCache:
    """Keys and values of every layer, preallocated, updated in place at slot `slot` (a tensor: a decode step's shapes
    never change). key_valid (B, S): slots holding a real position; seen (B,): each row's next RoPE position."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k, self.v = ([torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
                          for _ in "kv")
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.seen, self.slot = (torch.zeros(n, dtype=torch.long, device=device) for n in (batch_size, 1))

    def prepare(self, attention_mask):   # -> positions (B, T), key_valid (B, S), query_slots (T,)
        slots = self.slot + torch.arange(attention_mask.shape[1], device=self.slot.device)          # (T,)
        self.key_valid.index_copy_(1, slots, attention_mask)
        return (self.seen[:, None] + attention_mask.cumsum(1) - 1).clamp(min=0), self.key_valid, slots

    def update(self, layer, k, v):   # k, v (B, Hkv, T, hd) -> every slot's keys and values (B, Hkv, S, hd)
        slots = self.slot + torch.arange(k.shape[2], device=self.slot.device)
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)
        return self.k[layer], self.v[layer]

def keyed_uniform(keys, t, V):
    """Uniform noise inside (0, 1), (B, V) float64, a hash of (keys[b], t, v) alone (keys (B,) int64, below 2^32;
    t an int or a 0-dim tensor): a row's noise does not depend on the batch, the rank or the process that draws it."""
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

def sample_next(logits, temperature=1.0, top_p=1.0, keys=None, t=0):
    """logits (B, V) -> next tokens (B,), greedy at temperature 0. The exponential race, argmax(p / q) with q = -log u
    ~ Exp(1) and u = keyed_uniform(keys, t), draws from p with no host sync."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    logits = top_p_filter(logits, top_p) if top_p < 1.0 else logits
    logp = logits.log_softmax(-1).double()                                                # (B, V)
    u = keyed_uniform(keys, t, logp.shape[1])
    # in log space, with u strictly inside (0, 1): 0 < q < inf, so every token of probability 0
    # (outside top-p, or a logit of -inf) scores -inf, below any other, and is never drawn, not even by a tie
    return (logp - (-u.log()).log()).argmax(-1)

def top_p_filter(logits, top_p):   # (B, V): -inf on each token once the mass before it reaches top_p (the top stays)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(-1)
    drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))   # order: a permutation

@dataclass
class Generation:
    tokens: torch.Tensor    # (B, N) new tokens, the stop token included, 0 after it
    lengths: torch.Tensor   # (B,) number of new tokens of each row
    stopped: torch.Tensor   # (B,) True: ended on a stop token; False: hit max_new_tokens

    def token_lists(self):
        return [row[:n].tolist() for row, n in zip(self.tokens.cpu(), self.lengths.tolist())]

def _decode_step(model, tokens, cache, keys, t, temperature, top_p):
    """One decode step for every row, sampling included (compiled, it is one graph): the tokens (B,) at t - 1
    -> the tokens (B,) at t (t a 0-dim tensor, so that every step replays the same graph)."""
    embeds = model.embed_tokens(tokens[:, None])                                 # (B, 1, d)
    mask = torch.ones(tokens.shape[0], 1, dtype=torch.bool, device=tokens.device)
    logits = model.lm_head(model.hidden_states(embeds, mask, kv_cache=cache)[:, -1])   # (B, V)
    return sample_next(logits, temperature, top_p, keys, t)

@torch.inference_mode()
def generate(model, prompts, prefixes=None, max_new_tokens=128, temperature=1.0, top_p=1.0, stop_tokens=(),
             keys=None, generator=None, compile=None, check_every=16):
    """Batched sampling with a KV cache: B prompts (token ids) after B prefixes (embed_rows), each row until its first
    stop token or max_new_tokens; row b's noise at its t-th token is keyed_uniform(keys[b], t) (keys drawn from
    `generator` if not given). Shapes stay fixed (a finished row stays, masked); one host sync every check_every
    tokens; compile (default: COMPILE_DECODE, else on CUDA): the compiled decode of bucketed_decode."""
    device, B = model.embed_tokens.weight.device, len(prompts)
    compile = (device.type == "cuda" if COMPILE_DECODE is None else COMPILE_DECODE) if compile is None else compile
    if keys is None and temperature > 0:
        keys = torch.randint(0, 2**32, (B,), generator=generator, device=generator.device if generator else "cpu").tolist()
    keys = None if keys is None else torch.tensor([k % 2**32 for k in keys], device=device)           # (B,)
    if compile and not sharded(model):
        embeds, mask, keys, cache, step = bucketed_decode(model, prompts, prefixes, keys, max_new_tokens)
    else:
        embeds, mask = embed_rows(model, prompts, prefixes)                                    # (B, T, d)
        cache, step = KVCache(model.config, B, embeds.shape[1] + max_new_tokens, device, embeds.dtype), _decode_step
    # The prefill needs the next-token logits of the last position only: the full (B, T, V) would
    # be 4 GB for 64 prompts of 300 tokens with a 49K vocabulary, and a fifth of the prefill's work.
    logits = model.lm_head(model.hidden_states(embeds, mask, kv_cache=cache)[:, -1])    # (B', V)
    tokens = sample_next(logits, temperature, top_p, keys, 0)                       # (B',)
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    out = torch.zeros((len(embeds), max_new_tokens), dtype=torch.long, device=device)
    finished = torch.arange(len(embeds), device=device) >= B      # the bucket's padding rows, then stopped ones
    lengths = torch.zeros(len(embeds), dtype=torch.long, device=device)
    t_next = torch.zeros((), dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        live = ~finished
        out[:, t] = torch.where(live, tokens, 0)
        lengths += live.long()
        finished |= live & torch.isin(tokens, stop)
        if t == max_new_tokens - 1 or (t % check_every == check_every - 1 and bool(finished.all())):
            break
        t_next.fill_(t + 1)
        tokens = step(model, tokens, cache, keys, t_next, temperature, top_p)
    return Generation(tokens=out[:B], lengths=lengths[:B], stopped=finished[:B])

# The compiled decode: one graph for every batch bucket, sampling included; on a GPU, CUDA graphs. COMPILE_DECODE None:
# on CUDA only. tests/test_gpu_commands.py sets True to run a GPU's code path on the CPU (Inductor compiles it there)
COMPILE_DECODE = None

def sharded(model):   # FSDP2's hooks cannot be traced: a sharded model decodes eagerly
    fsdp = sys.modules.get("torch.distributed.fsdp")        # loaded where fsdp.py sharded a model (0.5 s otherwise)
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)

def bucketed_decode(model, prompts, prefixes, keys, max_new_tokens):   # generate's inputs, cache and step, compiled
    """The batch padded to its bucket with copies of row 0 (finished from the start), the bucket's cache, the step."""
    pad = decode_buckets(len(prompts), 0)[0] - len(prompts)
    prompts, keys = list(prompts) + [prompts[0]] * pad, None if keys is None else torch.cat([keys, keys.new_zeros(pad)])
    prefixes = None if prefixes is None else list(prefixes) + [prefixes[0]] * pad
    embeds, mask = embed_rows(model, prompts, prefixes)                          # (B', T, d)
    length = decode_buckets(len(prompts), embeds.shape[1] + max_new_tokens)[1]
    cache = bucketed_cache(model.config, len(prompts), length, embeds.device, embeds.dtype)
    step = compiled_decode_step(embeds.device.type)
    # cloned: a CUDA graph's next replay overwrites its output, which the step's tokens are (the next step's input)
    return embeds, mask, keys, cache, lambda *args: step(*args).clone()

@functools.cache   # once per process, symbolic sizes: one graph for every call; on a GPU, CUDA graphs per bucket
def compiled_decode_step(device_type):
    return torch.compile(_decode_step, fullgraph=True, dynamic=True,
                         mode="reduce-overhead" if device_type == "cuda" else None)

def decode_buckets(batch, length):
    # the shapes a compiled step runs at, so that varied batches share a few graphs: the batch rounded up to
    # a power of two (at least 2: a batch of 1 compiles a graph of its own), the cache length to 256s
    return max(2, 1 << (batch - 1).bit_length()), -(-length // 256) * 256

# batch bucket -> its KVCache, kept between calls (a CUDA graph recorded on its buffers replays without a copy
# or a new recording), grown to the longest length it served: one cache per batch bucket, as memory.py counts
_CACHES = {}

def bucketed_cache(config, batch, length, device, dtype):
    key = (config.num_hidden_layers, config.num_key_value_heads, config.head_dim, batch, dtype, str(device))
    if key not in _CACHES or _CACHES[key].key_valid.shape[1] < length:
        _CACHES.pop(key, None)                   # the shorter one is freed before the longer one is made
        _CACHES[key] = cache = KVCache(config, batch, length, device, dtype)
        # every tensor the decode step writes, static: a CUDA graph then reads and writes them where they
        # are (a mutated input that is not static makes torch skip CUDA graphs altogether)
        for buffer in cache.k + cache.v + [cache.key_valid, cache.seen, cache.slot]:
            torch._dynamo.mark_static_address(buffer)
    cache = _CACHES[key]
    for counter in (cache.key_valid, cache.seen, cache.slot):   # slots are overwritten, only the counters restart
        counter.zero_()
    return cache

def free_caches():   # the caches kept between calls (bench/gpu.py between sections, evaluate.py between benchmarks)
    _CACHES.clear()

# -----------------------------------------------------------------------------
# 4. The palette: a VAE over mean-pooled trace embeddings, and the prefix sources

def embedding_fingerprint(E):   # 64 evenly spaced rows of E, their first 16 values
    return E[torch.linspace(0, E.shape[0] - 1, 64).long(), :16].float().flatten().tolist()

def short_hash(values):
    return hashlib.sha256(json.dumps([round(v, 4) for v in values]).encode()).hexdigest()[:12]

def mlp(sizes):   # Linear, GELU, ..., Linear
    return nn.Sequential(*[m for a, b in zip(sizes[:-1], sizes[1:]) for m in (nn.Linear(a, b), nn.GELU())][:-1])

# How h_hat = decoder(z) * h_std + h_mean becomes a prefix, times prefix_scale; h_mean dominates h_hat (within a few
# degrees on SmolLM2-135M: docs/results/smollm2_prefix_forms.md). paper: h_hat as is (D(z)), far shorter than a token;
# rescaled (older VAEs): its direction at the mean token norm, ~h_mean for any z; centred: h_hat - h_mean at that norm
PREFIX_FORMS = ("centred", "rescaled", "paper")
DEFAULT_PREFIX_FORM = "centred"

class PaletteVAE(nn.Module):
    """Encoder h -> (mu, log sigma^2) in R^k, decoder z -> h_hat in R^d. h is standardised per dimension (corpus
    statistics, buffers) and the error measured there, so every dimension counts however small its spread."""

    def __init__(self, dim, latent_dim=16, hidden_dim=256, depth=2, prefix_form=DEFAULT_PREFIX_FORM, prefix_scale=1.0):
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
        return self.encoder((h - self.h_mean) / self.h_std).chunk(2, dim=-1)      # mu, logvar (N, k) each

    def decode(self, z):   # z (..., k) -> h_hat (..., d) in the (unstandardised) space of h
        return self.decoder(z) * self.h_std + self.h_mean

    def forward(self, h, beta, eps):   # -> (recon + beta * KL, recon, KL), batch means; eps (N, k) ~ N(0, I)
        mu, logvar = self.encode(h)                                              # (N, k) each
        z = mu + (0.5 * logvar).exp() * eps                                      # reparameterised
        recon = ((self.decoder(z) - (h - self.h_mean) / self.h_std) ** 2).sum(-1).mean()   # in standardised units
        kl = (-0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(-1)).mean()                 # closed form, to N(0, I)
        return recon + beta * kl, recon, kl

    def prefix(self, z):   # z (..., k) -> prefix embeddings (..., d), in the form self.prefix_form
        h_hat = self.decode(z)                                                   # (..., d)
        if self.prefix_form == "paper":
            return h_hat * self.prefix_scale
        direction = h_hat if self.prefix_form == "rescaled" else h_hat - self.h_mean
        return direction / direction.norm(dim=-1, keepdim=True).clamp(min=1e-6) * self.token_norm * self.prefix_scale

def save_vae(vae, out_dir, meta):   # vae.safetensors and vae.json (sizes, prefix form, `meta`), each renamed when whole
    with atomic_dir(os.path.join(out_dir, "vae.safetensors"), file=True) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in vae.state_dict().items()}, tmp)
    sizes = ("dim", "latent_dim", "hidden_dim", "depth", "prefix_form", "prefix_scale")
    atomic_write_json(os.path.join(out_dir, "vae.json"), {**{k: getattr(vae, k) for k in sizes}, **meta})

def load_vae(vae_dir, E):   # -> (the VAE of a train_vae.py directory, vae.json's dict), if trained for E's model
    json_path, file = (os.path.join(str(vae_dir), name) for name in ("vae.json", "vae.safetensors"))
    if vae_dir is None or not os.path.exists(json_path) or not os.path.exists(file):
        raise UserError(f"--vae {vae_dir}: no vae.json / vae.safetensors; train one with train_vae.py")
    meta, state = read_json(json_path, "VAE settings"), read_safetensors_file(file)
    try:   # an older vae.json: the prefix form it had then
        k, scale = meta["latent_dim"], meta.get("prefix_scale", 1.0)
        vae = PaletteVAE(meta["dim"], k, meta["hidden_dim"], meta["depth"], meta.get("prefix_form", "rescaled"), scale)
        vae.load_state_dict(state)
        for stats in meta.get("domains", {}).values():              # each region's mean (k,) and cov (k, k)
            torch.tensor([stats["mean"]] + stats["cov"], dtype=torch.float).view(k + 1, k)
        # cosine similarity: fine-tuned descendants (embeddings moved a little) still match, other models do not
        fingerprint, mine = torch.tensor(meta["fingerprint"], dtype=torch.float), torch.tensor(embedding_fingerprint(E))
        if (not (type(scale) in (int, float) and scale > 0 and meta["depth"] >= 0) or E.shape[1] != meta["dim"]
                or mine.shape != fingerprint.shape or F.cosine_similarity(mine, fingerprint, dim=0).item() < 0.95):
            raise ValueError("prefix_scale or depth out of range, or the VAE of another model")
    except Exception:
        import hf  # names the field or tensor that is wrong, or the model the VAE was trained for, in one line
        raise hf.vae_error(vae_dir, json_path, file, meta, state, E) from None
    return vae.eval().requires_grad_(False), meta

class PrefixSource:
    """sample(n, L, generator) -> n prefixes, embeddings (n, L, d) or token ids (n, rows) of a text source; None
    when they take no rows; L independent draws unless tie=True repeats one. A new source: a class and an entry."""
    name, summary = "none", "no prefix"   # summary: --prefix-source --help prints it
    norm = None             # "token": vectors at the mean token-embedding norm; "table": a typical row's
    needs_vae = False       # built from --vae (and --region: the VAE's latent regions)
    tieable = True          # --tie has a meaning (check_prefix_sources)

    def __init__(self, E, tie=False, **context):
        self.dim, self.token_norm, self.tie = E.shape[1], E.float().norm(dim=-1).mean().item(), tie

    def rows(self, L):   # rows one prefix of length L takes in the context
        return L

    def _noise(self, n, L, width, generator):
        return torch.randn((n, 1 if self.tie else L, width), generator=generator).expand(n, L, width)

    def _to_token_norm(self, x):
        return x / x.norm(dim=-1, keepdim=True) * self.token_norm

    @torch.no_grad()
    def sample(self, n, L, generator=None):
        x = self._draw(n, L, generator) if self.rows(L) else None
        return x.float() if x is not None and x.is_floating_point() else x

class NoPrefix(PrefixSource):   # no prefix at all (the baselines): nothing to draw
    def rows(self, L):
        return 0

class VAEPrefix(PrefixSource):
    name, needs_vae = "vae", True
    summary = "the method: z from the VAE's prior (or --region's), decoded into a prefix vector"
    norm = "token"          # times the VAE's prefix_scale (the paper form: the decoder's own)

    def __init__(self, E, vae=None, region=None, tie=False, **context):
        super().__init__(E, tie)
        self.vae, meta = (vae, {}) if isinstance(vae, PaletteVAE) else load_vae(vae, E)
        self.region = region
        if region is not None:
            self.region_mean, self.region_chol = latent_region(meta.get("domains", {}), region)

    def _draw(self, n, L, generator):
        z = self._noise(n, L, self.vae.latent_dim, generator)                  # (n, L, k) ~ N(0, I), the prior
        if self.region is not None:
            z = self.region_mean + z @ self.region_chol.T                      # ~ N(mean_d, cov_d), d's region
        return self.vae.prefix(z)                                              # (n, L, d)

def latent_region(domains, region):   # --region: that domain's latent Gaussian, its mean (k,) and Cholesky factor
    if region not in domains:
        raise UserError(f"the VAE has no latent region {region!r}; it knows {sorted(domains)}")
    mean, cov = (torch.tensor(domains[region][key]) for key in ("mean", "cov"))
    return mean, torch.linalg.cholesky(cov + 1e-5 * torch.eye(len(cov)))

class NoisePrefix(PrefixSource):
    name, norm = "noise", "token"
    summary = "a Gaussian vector at the mean token-embedding norm (the paper's noise baseline)"

    def _draw(self, n, L, generator):
        return self._to_token_norm(self._noise(n, L, self.dim, generator))

# name -> source class; "prefixes": a class of prefixes.py, imported only when a run names it
PREFIX_SOURCES = {"none": NoPrefix, "vae": VAEPrefix, "noise": NoisePrefix,
                  "random_decoder": "prefixes", "rsp": "prefixes", "lorem": "prefixes"}

def prefix_class(name):
    if isinstance(PREFIX_SOURCES[name], str):
        import prefixes  # random_decoder, rsp, lorem
        return prefixes.SOURCES[name]
    return PREFIX_SOURCES[name]

def make_prefix_source(name, E, tokenizer=None, vae=None, region=None, tie=False, seed=0):   # E (V, d): the policy's
    E = E.detach().float().cpu()    # a source keeps only statistics of E
    return prefix_class(name)(E=E, tokenizer=tokenizer, vae=vae, region=region, tie=tie, seed=seed)

# -----------------------------------------------------------------------------
# 5. RL: group advantages and the clipped policy-gradient loss

# name -> advantages (P, G) of the rewards (P, G) of G rollouts of each of P prompts (argparse's choices)
ADVANTAGE_ESTIMATORS = {
    "grpo": lambda r: (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6),   # Bessel's std
    "rloo": lambda r: (r - r.mean(1, keepdim=True)) * r.shape[1] / (r.shape[1] - 1),      # leave-one-out
    "drgrpo": lambda r: r - r.mean(1, keepdim=True),                                      # Dr. GRPO
}

def group_advantages(rewards, estimator="grpo"):   # rewards (P, G) -> advantages (P, G), float32 or wider
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    # a group whose rewards are all equal (G == 1 included) carries no signal: its advantages are exactly zero
    return ADVANTAGE_ESTIMATORS[estimator](rewards).masked_fill((rewards == rewards[:, :1]).all(1, keepdim=True), 0.0)

# name -> each sequence's token-sum divisor (then / n_sequences for all), of (mask, n_sequences, n_tokens, max_new)
LOSS_AGGREGATIONS = {
    "token-mean": lambda mask, n_sequences, n_tokens, max_new: n_tokens / n_sequences,   # 1 / n_tokens a token
    "seq-mean": lambda mask, n_sequences, n_tokens, max_new: mask.sum(1, keepdim=True).clamp(min=1),
    "constant": lambda mask, n_sequences, n_tokens, max_new: max_new,                    # Dr. GRPO
}

def loss_token_weights(loss_mask, aggregation, n_sequences, n_tokens, max_new_tokens, dtype=torch.float32):
    """Weights w (B, T) in `dtype` (the log-probs', so a float64 check is exact), loss = sum(w * per_token):
    micro-batches add up to their batch's loss exactly (n_sequences and n_tokens are the whole batch's)."""
    mask = loss_mask.to(dtype)
    return mask / LOSS_AGGREGATIONS[aggregation](mask, n_sequences, n_tokens, max_new_tokens) / n_sequences

def policy_loss(logprobs, old_logprobs, advantages, weights, clip_low=0.2, clip_high=0.2,
                ref_logprobs=None, kl_coef=0.0, entropy=None, shaped=None):
    """PPO/GRPO's clipped surrogate per token (LoPE's where shaped (B,) is True), plus kl_coef * k3 (KL to a reference).
    (B, T) inputs, advantages (B,); entropy (B, T) is only summed. Returns (loss, per-row sums (B,) over weighted tokens of
    "loss", "tokens", "clipped", "kl", "entropy"): callers add them over micro-batches, ranks and updates, divide by tokens."""
    ratio, A = (logprobs - old_logprobs).exp(), advantages[:, None]
    unclipped, clipped = ratio * A, ratio.clamp(1 - clip_low, 1 + clip_high) * A
    per_token, is_clipped = -torch.minimum(unclipped, clipped), clipped < unclipped
    if shaped is not None and shaped.any():   # LoPE's unclipped -A r / (r + 0.1) (credit.py's naive-shaped)
        per_token = torch.where(shaped[:, None], -ratio / (ratio + 0.1) * A, per_token)
        is_clipped &= ~shaped[:, None]
    counted = weights > 0
    row_sum = lambda x: (x.detach() * counted).sum(1).double()                               # (B,)
    stats = {"tokens": row_sum(torch.ones_like(weights)), "clipped": row_sum(is_clipped)}
    if ref_logprobs is not None and kl_coef > 0:
        log_ratio = ref_logprobs - logprobs
        k3 = log_ratio.exp() - log_ratio - 1                                     # k3 estimator of KL
        per_token, stats["kl"] = per_token + kl_coef * k3, row_sum(k3)
    if entropy is not None:
        stats["entropy"] = row_sum(entropy)
    stats["loss"] = (weights * per_token).detach().sum(1).double()
    return (weights * per_token).sum(), stats
