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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from common import UserError, atomic_save_dir, atomic_save_file, atomic_write_json, one_line, read_json

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

    @classmethod
    def from_hf(cls, d, source="config.json"):
        """Read a Hugging Face config.json dict (transformers 4.x or 5.x spelling of RoPE)."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(f"{source}: model_type {model_type!r} is not supported; "
                            f"nanopalette runs {', '.join(SUPPORTED_MODEL_TYPES)}")
        if d.get("use_sliding_window") or d.get("mlp_bias"):
            raise UserError(f"{source}: sliding-window attention and MLP biases are not supported")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise UserError(f"{source}: rope_type {rope_type!r} is not supported (default, llama3)")
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
            pad_token_id=d.get("pad_token_id"))

    def to_hf(self):
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        rope_scaling = d.pop("rope_scaling")
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
            k, v = kv_cache.update(self.layer_idx, k, v)   # (B, Hkv, S, hd): all cached keys
        # mask: (B, 1, T, S) bool, True = may attend. GQA shares each kv head over n_heads/n_kv.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
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
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
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

    def hidden_states(self, inputs_embeds, attention_mask=None, kv_cache=None):
        """inputs_embeds (B, T, d), attention_mask (B, T) bool -> final-norm hidden (B, T, d)."""
        B, T, _ = inputs_embeds.shape
        device = inputs_embeds.device
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=device)
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
        mask = (causal[None] & key_valid[:, None, :]) | own[None]                    # (B, T, S)
        mask = mask[:, None]                                                         # (B,1,T,S)
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

    def token_logprobs(self, inputs_embeds, attention_mask, targets, loss_mask,
                       temperature=1.0, chunk=2048):
        """The training path: log p(target_t | context) at the positions where loss_mask is True.

        inputs_embeds (B, T, d), targets (B, T) = the token that follows each position,
        loss_mask (B, T) bool. Returns (logprobs, entropy), each (B, T), zero where masked.
        Logits are computed only at loss positions and in chunks that are recomputed in the
        backward pass, so a 150K vocabulary never materialises (B, T, V) at once.
        """
        hidden = self.hidden_states(inputs_embeds, attention_mask)
        picked = hidden[loss_mask]                                            # (N, d)
        picked_targets = targets[loss_mask]                                   # (N,)
        out_lp, out_ent = [], []
        for i in range(0, picked.shape[0], chunk):
            lp, ent = torch.utils.checkpoint.checkpoint(
                _chunk_logprobs, picked[i:i + chunk], picked_targets[i:i + chunk],
                self.lm_head.weight, temperature, use_reentrant=False)
            out_lp.append(lp)
            out_ent.append(ent)
        logprobs = hidden.new_zeros(targets.shape, dtype=torch.float32)
        entropy = hidden.new_zeros(targets.shape, dtype=torch.float32)
        if out_lp:
            logprobs = logprobs.masked_scatter(loss_mask, torch.cat(out_lp))
            entropy = entropy.masked_scatter(loss_mask, torch.cat(out_ent).detach())
        return logprobs, entropy

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
        missing = [k for k in expected if k not in tensors]
        if missing:
            raise UserError(f"{path}: checkpoint lacks {len(missing)} tensors, first {missing[0]!r}; "
                            f"is it a complete {config.model_type} checkpoint?")
        for name, param in expected.items():
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise UserError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                                f"config.json implies {tuple(param.shape)}")
        state = {k: tensors[k].to(device=device, dtype=dtype) for k in expected}
        if config.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.inv_freq = rope_inv_freq(config).to(device)
        model.source_dir = path
        return model

    def save_pretrained(self, out_dir, tokenizer_dir=None):
        """Write config.json, model.safetensors, generation_config.json and tokenizer files,
        atomically: a crash leaves the previous directory, never half a new one."""
        tokenizer_dir = tokenizer_dir or self.source_dir
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight")   # safetensors refuses shared storage; HF re-ties on load
        c = self.config

        def write(tmp):
            save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            hf = c.to_hf()
            hf["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
            atomic_write_json(os.path.join(tmp, "config.json"), hf)
            gen = {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
                   "pad_token_id": c.pad_token_id, "do_sample": False}
            atomic_write_json(os.path.join(tmp, "generation_config.json"), gen)
            for name in TOKENIZER_FILES if tokenizer_dir else ():
                src = os.path.join(tokenizer_dir, name)
                if os.path.exists(src):
                    shutil.copy(src, os.path.join(tmp, name))

        atomic_save_dir(out_dir, write)


def load_policy(path_or_id, device="cpu", dtype=torch.float32):
    """The policy and its tokenizer, as every stage loads them. The tokenizer must have an eos
    token: generation stops at it and the warm-up ends every answer with it."""
    from transformers import AutoTokenizer
    model = Transformer.from_pretrained(path_or_id, device=device, dtype=dtype)
    path = model.source_dir
    found = [name for name in TOKENIZER_FILES if os.path.exists(os.path.join(path, name))]
    where = f"{path} (tokenizer files: {', '.join(found) or 'none'})"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # a corrupt file surfaces as a JSON, tokenizers or OS error
        raise UserError(f"{where}: the tokenizer does not load ({type(e).__name__}: {one_line(e)}); "
                        "copy the tokenizer files of the base model into the directory") from None
    # Without usable files transformers can still build a tokenizer, one that encodes every text
    # to [] (the run would then fail deep in attention): encode a probe to be sure.
    probe = tokenizer("Question: 12 + 30 = ?\nAnswer:", add_special_tokens=False)["input_ids"]
    if not probe:
        raise UserError(f"{where}: the tokenizer encodes text to no tokens; its files are missing "
                        "or corrupt: copy the tokenizer files of the base model into the directory")
    if tokenizer.eos_token_id is None:
        raise UserError(f"{path_or_id}: the tokenizer has no eos token to end completions with")
    largest = max(probe + [tokenizer.eos_token_id])
    if largest >= model.config.vocab_size:
        raise UserError(f"{where}: the tokenizer gives token id {largest}, but the model has only "
                        f"{model.config.vocab_size} embeddings; the tokenizer belongs to another model")
    return model, tokenizer


def _chunk_logprobs(hidden, targets, weight, temperature):
    logits = (hidden @ weight.t()).float() / temperature                     # (n, V)
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, targets[:, None]).squeeze(-1), entropy


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


def _is_positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def read_safetensors_file(file, names=None):
    """The tensors of one safetensors file (all of them, or those in `names`), on the CPU.
    A file that is missing, truncated or corrupt stops with one line that names it (UserError)."""
    try:
        with safe_open(file, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys() if names is None or key in names}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{file}: not a readable safetensors file ({type(e).__name__}: {one_line(e)}); "
                        "it is truncated or corrupt: restore or re-create it") from None


# config.json sizes that must be positive integers (a string "64" would fail deep in torch)
CONFIG_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")


def load_config(path):
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise UserError(f"{path}: no config.json; a checkpoint directory needs config.json "
                        "and *.safetensors")
    d = read_json(config_path, "config")
    for key in CONFIG_SIZES:  # None means "derive it" for num_key_value_heads and head_dim
        if d.get(key) is not None and not _is_positive_int(d[key]):
            raise UserError(f"{config_path}: {key} is {d[key]!r}; sizes must be positive integers")
    try:
        config = ModelConfig.from_hf(d, source=config_path)
    except KeyError as e:
        raise UserError(f"{config_path}: malformed config (no {e} field)") from None
    for key in ("rms_norm_eps", "rope_theta"):
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise UserError(f"{config_path}: {key} is {value!r}; expected a positive number")
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


def load_state_file(module, file):
    """Load a module's whole state from one safetensors file; a file whose tensor names or shapes
    do not match the module stops with one line naming the first difference (UserError)."""
    state = read_safetensors_file(file)
    for name, tensor in module.state_dict().items():
        if name not in state:
            raise UserError(f"{file}: has no tensor {name!r}; it belongs to another model or version")
        if state[name].shape != tensor.shape:
            raise UserError(f"{file}: tensor {name!r} has shape {tuple(state[name].shape)}, the "
                            f"sizes in its config imply {tuple(tensor.shape)}; the files do not "
                            "belong together")
    extra = sorted(set(state) - set(module.state_dict()))
    if extra:
        raise UserError(f"{file}: unexpected tensor {extra[0]!r}; it belongs to another model or "
                        "version")
    module.load_state_dict(state)


def _is_number_list(value, length=None):
    return isinstance(value, list) and (length is None or len(value) == length) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)


def read_vae_json(path):
    """vae.json, checked before anything is built from it: integer sizes, the embedding
    fingerprint (a list of numbers) and each domain's latent mean (k) and covariance (k x k)."""
    meta = read_json(path, "VAE settings")
    missing = [k for k in ("dim", "latent_dim", "hidden_dim", "depth", "fingerprint") if k not in meta]
    if missing:
        raise UserError(f"{path}: no {', '.join(missing)} field; re-create the VAE with train_vae.py")
    for key in ("dim", "latent_dim", "hidden_dim", "depth"):
        least = 0 if key == "depth" else 1  # depth 0: encoder and decoder are single linear maps
        if type(meta[key]) is not int or meta[key] < least:
            raise UserError(f"{path}: {key} is {meta[key]!r}; expected an integer >= {least}")
    if not _is_number_list(meta["fingerprint"]):
        raise UserError(f"{path}: 'fingerprint' is not a list of numbers; re-create the VAE with "
                        "train_vae.py")
    k, domains = meta["latent_dim"], meta.get("domains", {})
    if not isinstance(domains, dict):
        raise UserError(f"{path}: 'domains' must map domain names to latent statistics")
    for name, stats in domains.items():
        if not (isinstance(stats, dict) and _is_number_list(stats.get("mean"), k)
                and isinstance(stats.get("cov"), list) and len(stats["cov"]) == k
                and all(_is_number_list(row, k) for row in stats["cov"])):
            raise UserError(f"{path}: domain {name!r} needs 'mean' ({k} numbers) and 'cov' "
                            f"({k} x {k} numbers)")
    return meta


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
# 2. Prefixed, left-padded inputs

def embed_rows(model, token_rows, prefixes=None):
    """Build the batch [prefix_i (L_i x d); E(tokens_i)], left padded to a common length.

    token_rows: list of B lists of token ids; prefixes: None or a list of B tensors (L_i, d) or
    None. Returns inputs_embeds (B, T, d) and attention_mask (B, T) bool. Gradients reach the
    prefixes only if the caller passed prefixes that require grad.
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
    for i, (tokens, n) in enumerate(zip(token_rows, lengths)):
        ids[i, T - len(tokens):] = torch.as_tensor(tokens, dtype=torch.long)
        mask[i, T - n:] = True
    ids, mask = ids.to(device), mask.to(device)
    embeds = E(ids)                                                            # (B, T, d)
    if any(prefix_lens):
        block = torch.zeros_like(embeds)
        is_prefix = torch.zeros(B, T, 1, dtype=torch.bool, device=device)
        for i, (p, pl, n) in enumerate(zip(prefixes, prefix_lens, lengths)):
            if pl:
                block[i, T - n:T - n + pl] = p.to(embeds.dtype)
                is_prefix[i, T - n:T - n + pl] = True
        embeds = torch.where(is_prefix, block, embeds)
    return embeds, mask


def completion_batch(model, prompts, completions, prefixes=None):
    """The training layout: rows [prefix_i; prompt_i; completion_i], left padded.

    Returns inputs_embeds (B, T, d), attention_mask (B, T), targets (B, T) and loss_mask (B, T):
    position t predicts targets[:, t], and loss_mask is True exactly at the positions that predict
    a completion token, so prefix, prompt and padding never carry loss.
    """
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    embeds, mask = embed_rows(model, rows, prefixes)
    B, T = mask.shape
    targets = torch.zeros(B, T, dtype=torch.long)
    loss_mask = torch.zeros(B, T, dtype=torch.bool)
    for i, c in enumerate(completions):
        n = len(c)
        if n:
            targets[i, T - n - 1:T - 1] = torch.as_tensor(c, dtype=torch.long)
            loss_mask[i, T - n - 1:T - 1] = True
    return embeds, mask, targets.to(mask.device), loss_mask.to(mask.device)


# -----------------------------------------------------------------------------
# 3. KV cache and generation

class KVCache(nn.Module):
    """Keys and values for every layer, preallocated for the batch and the maximum length.

    Slots fill left to right for all rows at once (rows are left padded, so they stay aligned);
    `key_valid` marks which slots hold a real position of each row, `seen` counts each row's
    real positions so far (its next RoPE position). Two modes:
      dynamic  slot counter `length` is a Python int and attention reads slots [0, length);
      static   the counter is a tensor and attention reads all slots under a mask, so the decode
               step has fixed shapes and can be captured in a CUDA graph.
    An nn.Module only so that torch.compile treats the buffers as static addresses.
    """

    def __init__(self, config, batch_size, max_len, device, dtype):
        super().__init__()
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len,
                 config.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype))
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype))
        self.register_buffer("key_valid", torch.zeros(batch_size, max_len, dtype=torch.bool,
                                                      device=device))
        self.register_buffer("seen", torch.zeros(batch_size, dtype=torch.long, device=device))
        self.register_buffer("slot", torch.zeros(1, dtype=torch.long, device=device))
        self.length = 0
        self.static = False
        self.max_len = max_len

    def prepare(self, attention_mask):
        """Record the new positions; returns (positions (B,T), key_valid (B,S), query_slots (T,))."""
        T = attention_mask.shape[1]
        positions = self.seen[:, None] + attention_mask.cumsum(1) - 1
        if self.static:                                   # T == 1, write at tensor slot
            self.key_valid.index_copy_(1, self.slot, attention_mask)
            return positions.clamp(min=0), self.key_valid, self.slot
        if self.length + T > self.max_len:
            raise RuntimeError(f"KV cache overflow: {self.length} + {T} > {self.max_len}")
        self.key_valid[:, self.length:self.length + T] = attention_mask
        query_slots = torch.arange(self.length, self.length + T, device=attention_mask.device)
        return positions.clamp(min=0), self.key_valid[:, :self.length + T], query_slots

    def update(self, layer, k, v):
        """Store this step's k, v (B, Hkv, T, hd) and return all keys and values attended to."""
        if self.static:
            self.k[layer].index_copy_(2, self.slot, k)
            self.v[layer].index_copy_(2, self.slot, v)
            return self.k[layer], self.v[layer]
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, attention_mask):
        self.seen += attention_mask.sum(1)
        if self.static:
            self.slot += 1
        else:
            self.length += attention_mask.shape[1]
            self.slot.fill_(self.length)

    def keep_rows(self, rows):
        """Drop finished rows (dynamic mode): later steps cost only what is still running."""
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)
        self.key_valid = self.key_valid.index_select(0, rows)
        self.seen = self.seen.index_select(0, rows)


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """logits (B, V) -> next tokens (B,). temperature 0 is greedy. No host synchronisation:
    the exponential-race trick, argmax(p / q) with q ~ Exp(1), draws from p on the device."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]                        # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token once the mass before it already reaches top_p (the top token always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / q).argmax(-1)


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
    return model(inputs_embeds=embeds, attention_mask=mask, kv_cache=cache)[:, -1]


_compiled_decode_step = None


@torch.inference_mode()
def generate(model, prompts, prefixes=None, max_new_tokens=128, temperature=1.0, top_k=0,
             top_p=1.0, stop_tokens=(), generator=None, pad_id=0, static=False):
    """Batched sampling with a KV cache.

    prompts: B lists of token ids; prefixes: None or B tensors (L_i, d) or None, placed before the
    prompt's embeddings. temperature 0 = greedy. A row stops at its first token in stop_tokens or
    after max_new_tokens. generator: a torch.Generator on the model's device, for reproducible
    sampling. static=True decodes with fixed shapes and torch.compile(mode="reduce-overhead")
    (CUDA graphs) on a GPU; finished rows are then masked instead of dropped.
    """
    global _compiled_decode_step
    device = model.embed_tokens.weight.device
    B = len(prompts)
    embeds, mask = embed_rows(model, prompts, prefixes)                          # (B, T, d)
    cache = KVCache(model.config, B, embeds.shape[1] + max_new_tokens, device, embeds.dtype)
    # The prefill needs the next-token logits of the last position only: the full (B, T, V) would
    # be 4 GB for 64 prompts of 300 tokens with a 49K vocabulary, and a fifth of the prefill's work.
    hidden = model.hidden_states(embeds, mask, kv_cache=cache)                  # (B, T, d)
    logits = model.lm_head(hidden[:, -1])                                        # (B, V)

    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)   # per original row
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    active = torch.arange(B, device=device)      # original index of each row still in the cache
    step_fn = _decode_step
    if static:
        cache.static = True
        if device.type == "cuda":
            if _compiled_decode_step is None:
                _compiled_decode_step = torch.compile(_decode_step, mode="reduce-overhead",
                                                      fullgraph=True)
            step_fn = _compiled_decode_step
    for t in range(max_new_tokens):
        tokens = sample_next(logits, temperature, top_k, top_p, generator)       # (b,)
        live = ~finished[active]
        out[active, t] = torch.where(live, tokens, pad_id)
        lengths[active] += live.long()
        hit_stop = live & torch.isin(tokens, stop)
        stopped[active] |= hit_stop
        finished[active] |= hit_stop
        if t == max_new_tokens - 1:
            break
        if static:
            if t % 16 == 15 and bool(finished.all()):   # sync only now and then
                break
        else:
            n_live = int((~finished[active]).sum())
            if n_live == 0:
                break
            if n_live <= active.numel() // 2:             # drop finished rows from the batch
                keep = (~finished[active]).nonzero().squeeze(1)
                active, tokens = active[keep], tokens[keep]
                cache.keep_rows(keep)
        logits = step_fn(model, tokens, cache)
    return Generation(tokens=out, lengths=lengths, stopped=stopped)


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
# The default is set by the measurements in README's "Prefix forms" (bench/prefix_forms.py).
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

    def __init__(self, dim, latent_dim=16, hidden_dim=256, depth=2, prefix_form=DEFAULT_PREFIX_FORM):
        super().__init__()
        if prefix_form not in PREFIX_FORMS:
            raise UserError(f"unknown prefix form {prefix_form!r}; choose one of {', '.join(PREFIX_FORMS)}")
        self.dim, self.latent_dim, self.hidden_dim, self.depth = dim, latent_dim, hidden_dim, depth
        self.prefix_form = prefix_form
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

    def forward(self, h, beta, generator=None):
        """The training loss: negative ELBO pieces, averaged over the batch: recon + beta * KL.
        recon = ||h_hat - h||^2 in standardised units; KL(N(mu, sigma^2) || N(0, I)) closed form."""
        mu, logvar = self.encode(h)                                              # (N, k) each
        eps = torch.randn(mu.shape, generator=generator, device=mu.device)
        z = mu + (0.5 * logvar).exp() * eps                                      # reparameterised
        recon = ((self.decoder(z) - (h - self.h_mean) / self.h_std) ** 2).sum(-1).mean()
        kl = (-0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(-1)).mean()
        return recon + beta * kl, recon, kl

    def prefix(self, z):
        """z (..., k) -> prefix embeddings (..., d), in the form self.prefix_form names."""
        h_hat = self.decode(z)                                                   # (..., d)
        if self.prefix_form == "paper":
            return h_hat
        # rescaled keeps h_hat's direction, which is mostly h_mean's; centred keeps only what
        # the latent changes, the deviation from the corpus mean
        direction = h_hat if self.prefix_form == "rescaled" else h_hat - self.h_mean
        return direction / direction.norm(dim=-1, keepdim=True).clamp(min=1e-6) * self.token_norm


def save_vae(vae, out_dir, meta):
    """vae.safetensors (weights and statistics) + vae.json (dimensions, the prefix form, beta,
    the model it belongs to with its embedding fingerprint, per-domain latent statistics), each
    written atomically into out_dir (which may also hold the run's logs)."""
    state = {k: v.detach().contiguous().cpu() for k, v in vae.state_dict().items()}
    atomic_save_file(os.path.join(out_dir, "vae.safetensors"), lambda tmp: save_file(state, tmp))
    atomic_write_json(os.path.join(out_dir, "vae.json"), {
        "dim": vae.dim, "latent_dim": vae.latent_dim, "hidden_dim": vae.hidden_dim,
        "depth": vae.depth, "prefix_form": vae.prefix_form, **meta})


def load_vae(vae_dir, E=None):
    """Load a VAE; if the policy's embedding matrix E is given, refuse one trained for another
    model (different embedding size, or a fingerprint that does not match)."""
    json_path = os.path.join(vae_dir, "vae.json")
    if not os.path.exists(json_path) or not os.path.exists(os.path.join(vae_dir, "vae.safetensors")):
        raise UserError(f"{vae_dir}: no vae.json / vae.safetensors; train one with train_vae.py")
    meta = read_vae_json(json_path)
    if E is not None:
        if E.shape[1] != meta["dim"]:
            raise UserError(f"{vae_dir}: the VAE was trained for embeddings of size {meta['dim']} "
                            f"({meta.get('model')}), this model's are {E.shape[1]}; "
                            "train a VAE for this model with train_vae.py")
        if not fingerprints_match(embedding_fingerprint(E), meta["fingerprint"]):
            raise UserError(f"{vae_dir}: the VAE was trained for another model ({meta.get('model')}, "
                            f"fingerprint {short_hash(meta['fingerprint'])}); its embedding matrix "
                            "differs from this model's; train a VAE for this model with train_vae.py")
    vae = PaletteVAE(meta["dim"], meta["latent_dim"], meta["hidden_dim"], meta["depth"],
                     meta.get("prefix_form", "rescaled"))   # older vae.json: the form it had then
    load_state_file(vae, os.path.join(vae_dir, "vae.safetensors"))
    return vae.eval().requires_grad_(False), meta


class PrefixSource:
    """One interface for every source: sample(n, L) -> prefixes (n, L, d), or None when L == 0.

    Each of the L prefix tokens is an independent draw unless tie=True, in which case one draw
    is repeated L times. All sources output vectors at the mean token-embedding norm, except a
    VAE whose prefix form is "paper".
    """
    name = "none"

    def __init__(self, dim, token_norm, tie=False):
        self.dim, self.token_norm, self.tie = dim, float(token_norm), tie

    def _noise(self, n, L, width, generator):
        shape = (n, 1 if self.tie else L, width)
        return torch.randn(shape, generator=generator).expand(n, L, width)

    def _draw(self, n, L, generator):
        raise NotImplementedError

    def rows(self, L):
        """Embedding rows of one prefix of length L (L itself, except for the lorem source)."""
        return 0 if self.name == "none" else L

    @torch.no_grad()
    def sample(self, n, L, generator=None):
        if L < 0:
            raise UserError(f"prefix length L must be >= 0, got {L}")
        if L == 0 or self.name == "none":
            return None
        return self._draw(n, L, generator).float()


class NoisePrefix(PrefixSource):
    """A raw Gaussian vector scaled to the mean token-embedding norm: the paper's noise baseline."""
    name = "noise"

    def _draw(self, n, L, generator):
        x = self._noise(n, L, self.dim, generator)
        return x / x.norm(dim=-1, keepdim=True) * self.token_norm


class RandomDecoderPrefix(PrefixSource):
    """An untrained, randomly initialised small GPT-style decoder that maps L noise vectors to L
    embeddings (the paper's VLM variant). Its weights come from a fixed seed, so every rank and
    every later stage that names the same seed gets the same decoder."""
    name = "random_decoder"

    def __init__(self, dim, token_norm, tie=False, width=64, layers=2, seed=0):
        super().__init__(dim, token_norm, tie)
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
            block = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=4 * width,
                                               dropout=0.0, batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False).eval()
            self.out = nn.Linear(width, dim)
        self.width = width

    def _draw(self, n, L, generator):
        causal = nn.Transformer.generate_square_subsequent_mask(L)
        x = self.out(self.blocks(self._noise(n, L, self.width, generator), mask=causal,
                                 is_causal=True))
        return x / x.norm(dim=-1, keepdim=True) * self.token_norm


class VAEPrefix(PrefixSource):
    """z ~ N(0, I) (the prior) or z ~ N(mean_d, cov_d) (domain d's region), decoded by the VAE."""
    name = "vae"

    def __init__(self, vae, meta, region=None, tie=False):
        super().__init__(vae.dim, vae.token_norm, tie)
        self.vae, self.region = vae, region
        if region is not None:
            stats = meta.get("domains", {})
            if region not in stats:
                raise UserError(f"the VAE has no latent region {region!r}; it knows {sorted(stats)}")
            mean = torch.tensor(stats[region]["mean"])
            cov = torch.tensor(stats[region]["cov"])
            self.region_mean = mean
            self.region_chol = torch.linalg.cholesky(cov + 1e-5 * torch.eye(len(mean)))

    def _draw(self, n, L, generator):
        z = self._noise(n, L, self.vae.latent_dim, generator)                   # (n, L, k)
        if self.region is not None:
            z = self.region_mean + z @ self.region_chol.T
        return self.vae.prefix(z)


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
    """Real text as a prefix: L tokens of pseudo-Latin, drawn fresh for every prefix, then the
    boundary instruction LOREM_BOUNDARY, as the policy's own token embeddings (L + b rows, b the
    boundary's tokens): the text perturbation of LoPE (arXiv 2605.05566) in the palette's slot.

    Where it sits: before the whole prompt, so before the chat template's first token (with
    --template chat, ahead of the system/user turn markers), exactly where the latent prefixes go.
    That way the sources differ in what the prefix holds and nothing else, and the prompt's tokens
    are the same ids with or without it, so pi(o | q) of the unprefixed prompt (the naive credit
    rule in rl.py) is a forward pass over the very tokens that followed the text.

    Text: words drawn uniformly from LOREM_WORDS with the caller's torch generator, a period after
    about one word in eight and a comma after one in twelve, tokenised, and cut to exactly L tokens
    (the cut may fall inside a word). The word list lives here rather than in the python-lorem
    package: that package draws from Python's global `random`, so its text would not follow the
    seeded generator that a resumed run restores, and its capitalised sentences would be unknown
    tokens to the toy tokenizer.

    E is the embedding matrix read at each draw (a live parameter gives the current policy's
    embeddings, as a text prompt would); the rows are a copy, so a prefix stored with a rollout
    never changes. tie has no meaning for text.
    """
    name = "lorem"

    def __init__(self, E, tokenizer):
        self.E = E.detach()                                        # (V, d), shares E's storage
        super().__init__(E.shape[1], self.E.float().norm(dim=-1).mean())
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
        self.encode = encode
        self.boundary_ids = encode(LOREM_BOUNDARY)

    def rows(self, L):
        return L + len(self.boundary_ids) if L else 0

    def text(self, n, L, generator=None):
        """n strings of L words (each word is one token or more, so at least L tokens)."""
        words = torch.randint(len(LOREM_WORDS), (n, L), generator=generator)      # (n, L)
        marks = torch.rand(n, L, generator=generator)                              # (n, L)
        ends = [". " if m < 1 / 8 else ", " if m < 1 / 8 + 1 / 12 else " " for m in marks.flatten().tolist()]
        ends = [ends[i * L:(i + 1) * L] for i in range(n)]
        return ["".join(LOREM_WORDS[w] + e for w, e in zip(row, end)).rstrip()
                for row, end in zip(words.tolist(), ends)]

    def token_ids(self, n, L, generator=None):
        """(n, L + b) token ids: L tokens of fresh text, then the boundary instruction."""
        ids = [self.encode(t)[:L] + self.boundary_ids for t in self.text(n, L, generator)]
        return torch.tensor(ids, dtype=torch.long)

    def _draw(self, n, L, generator):
        return self.E[self.token_ids(n, L, generator).to(self.E.device)].clone()   # (n, L + b, d)


PREFIX_SOURCES = ("none", "vae", "noise", "random_decoder", "lorem")


def make_prefix_source(name, E, vae_dir=None, region=None, tie=False, seed=0, tokenizer=None):
    """Build a prefix source for the policy whose embedding matrix is E (V, d). A source keeps
    only E's mean row norm (and the VAE checks E's fingerprint), so E may be a live parameter;
    the lorem source reads E's rows at each draw and needs the policy's tokenizer."""
    if name == "lorem":
        if tokenizer is None:
            raise UserError("prefix source 'lorem' needs the policy's tokenizer (its prefixes are text)")
        if tie:
            raise UserError("--tie has no meaning for prefix source 'lorem' (its prefix is text, "
                            "not repeated draws); leave --tie out")
        return LoremPrefix(E, tokenizer)
    E = E.detach().float().cpu()
    token_norm = E.norm(dim=-1).mean()
    if name == "none":
        return PrefixSource(E.shape[1], token_norm)
    if name == "noise":
        return NoisePrefix(E.shape[1], token_norm, tie)
    if name == "random_decoder":
        return RandomDecoderPrefix(E.shape[1], token_norm, tie, seed=seed)
    if name == "vae":
        if vae_dir is None:
            raise UserError("prefix source 'vae' needs --vae DIR (a directory from train_vae.py)")
        vae, meta = load_vae(vae_dir, E)
        return VAEPrefix(vae, meta, region, tie)
    raise UserError(f"unknown prefix source {name!r}; choose one of {', '.join(PREFIX_SOURCES)}")


COLLAPSED_COSINE = 0.8     # prior prefixes this alike (noise: about 0) read as one token
BROKEN_SHARE = 0.2         # more broken greedy answers than this: the policy cannot read them


def is_broken(token_ids, text):
    """A completion that carries nothing: no visible text, or a loop of a few tokens (at least 8
    tokens, at most one distinct token in 8, and never more than 2 in a short one: "Zar\\nZar\\n...",
    "2\\n2\\n2\\n..."). Real answers, even short ones, use far more distinct tokens."""
    return not text.strip() or (len(token_ids) >= 8 and len(set(token_ids)) <= max(2, len(token_ids) // 8))


@torch.no_grad()
def prefix_health(source, model=None, prompts=None, tokenizer=None, L=1, n_prefixes=256,
                  max_new_tokens=32, seed=0):
    """Does the policy get prefixes it can read? Returns (metrics, lines to print).

    Always (no model needed): the mean pairwise cosine of n_prefixes prior prefixes, and for a
    VAE their mean cosine to the corpus-mean direction h_mean. With a model and prompts (token id
    lists): two greedy answers per prompt under two prior prefix draws of L tokens, the share
    of prompts whose answer changes between them, and the share of answers that are broken
    (is_broken). The lines end with a warning when the prefixes collapse to one direction or
    break the policy's answers, saying what to do.
    """
    if source.name == "none":
        return {}, []
    g = torch.Generator().manual_seed(seed)
    unit = F.normalize(source.sample(n_prefixes, 1, generator=g)[:, 0], dim=-1)   # (n, d)
    cos = unit @ unit.T                                                           # (n, n)
    pairwise = cos[~torch.eye(n_prefixes, dtype=torch.bool)]
    health = {"prefix_pairwise_cos": pairwise.mean().item()}
    line = (f"prefix health ({source.name}): mean pairwise cosine of prior prefixes "
            f"{health['prefix_pairwise_cos']:.3f} (noise: about 0)")
    if isinstance(source, VAEPrefix):
        to_mean = unit @ F.normalize(source.vae.h_mean.float(), dim=0)           # (n,)
        health["prefix_cos_to_corpus_mean"] = to_mean.mean().item()
        line += (f" | cosine to the corpus mean {to_mean.mean().item():.3f} "
                 f"({to_mean.min().item():.3f} to {to_mean.max().item():.3f}), "
                 f"form {source.vae.prefix_form}")
    lines = [line]
    if model is not None and prompts:
        was_training, device = model.training, model.embed_tokens.weight.device
        model.eval()
        answers = []
        for _ in range(2):
            prefixes = source.sample(len(prompts), L, generator=g).to(device)   # (n, L, d)
            out = generate(model, prompts, list(prefixes), max_new_tokens, temperature=0,
                           stop_tokens=[tokenizer.eos_token_id]).token_lists()
            answers.append([[t for t in ids if t != tokenizer.eos_token_id] for ids in out])
        model.train(was_training)
        broken = [is_broken(ids, tokenizer.decode(ids, skip_special_tokens=True))
                  for draw in answers for ids in draw]
        health["frac_answers_change"] = sum(a != b for a, b in zip(*answers)) / len(prompts)
        health["frac_broken"] = sum(broken) / len(broken)
        lines.append(f"prefix health ({source.name}, L = {L}, {len(prompts)} prompts, greedy): "
                     f"answers that change between two prefixes {health['frac_answers_change']:.1%}"
                     f" | broken answers (empty or one repeated token) {health['frac_broken']:.1%}")
    fix = (f"train the VAE with `train_vae.py --prefix-form {DEFAULT_PREFIX_FORM}` (or set "
           f"\"prefix_form\": \"{DEFAULT_PREFIX_FORM}\" in its vae.json: the form needs no retraining)")
    other_form = isinstance(source, VAEPrefix) and source.vae.prefix_form != DEFAULT_PREFIX_FORM
    if health["prefix_pairwise_cos"] > COLLAPSED_COSINE:
        lines.append(f"warning: the prior prefixes collapse to one direction (mean pairwise cosine "
                     f"{health['prefix_pairwise_cos']:.2f} > {COLLAPSED_COSINE}): the policy reads "
                     f"every latent as the same token, so the palette cannot steer it; "
                     + (fix if other_form else "retrain the VAE with a smaller --beta, or use "
                        "another prefix source"))
    if health.get("frac_broken", 0.0) > BROKEN_SHARE:
        lines.append(f"warning: {health['frac_broken']:.0%} of greedy answers under prefixes are "
                     f"broken (> {BROKEN_SHARE:.0%}): the policy cannot read these prefixes; "
                     + (fix if other_form else "try a longer warm-up (sft_warmup.py --steps) or L = 1"))
    return health, lines


# -----------------------------------------------------------------------------
# 5. RL: group advantages and the clipped policy-gradient loss

ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "drgrpo")


def group_advantages(rewards, estimator="grpo", eps=1e-6):
    """rewards (P, G): G rollouts of each of P prompts -> advantages (P, G).

    grpo    (r - mean) / (std + eps), std with Bessel's correction (torch's default, as in
            DeepSeekMath's GRPO implementations), eps = 1e-6.
    rloo    r_i - mean of the other G - 1 rewards = G / (G - 1) * (r_i - mean).
    drgrpo  r - mean, no std scaling (Dr. GRPO).
    A group whose rewards are all equal (including a group of one) carries no signal: its
    advantages are exactly zero.
    """
    P, G = rewards.shape
    rewards = rewards.float()
    centred = rewards - rewards.mean(1, keepdim=True)
    if G == 1:
        return torch.zeros_like(rewards)
    if estimator == "grpo":
        adv = centred / (rewards.std(1, keepdim=True) + eps)
    elif estimator == "rloo":
        adv = centred * G / (G - 1)
    elif estimator == "drgrpo":
        adv = centred
    else:
        raise UserError(f"unknown advantage estimator {estimator!r}; "
                        f"choose one of {', '.join(ADVANTAGE_ESTIMATORS)}")
    zero_variance = (rewards == rewards[:, :1]).all(1, keepdim=True)
    return adv.masked_fill(zero_variance, 0.0)


LOSS_AGGREGATIONS = ("token-mean", "seq-mean", "constant")


def loss_token_weights(loss_mask, aggregation, n_sequences, n_tokens, max_new_tokens,
                       dtype=torch.float32):
    """Per-token weights w (B, T) in `dtype` (the log-probs', so a float64 check is exact) such
    that loss = sum(w * per_token_loss) over a micro-batch, and the micro-batches of one rollout
    batch add up to the batch's loss exactly.

    token-mean  every completion token of the batch weighs 1 / n_tokens (total in the batch)
    seq-mean    each sequence weighs 1 / n_sequences, spread over its own tokens
    constant    1 / (n_sequences * max_new_tokens), Dr. GRPO's length-independent normaliser
    """
    mask = loss_mask.to(dtype)
    if aggregation == "token-mean":
        return mask / n_tokens
    if aggregation == "seq-mean":
        return mask / mask.sum(1, keepdim=True).clamp(min=1) / n_sequences
    if aggregation == "constant":
        return mask / (n_sequences * max_new_tokens)
    raise UserError(f"unknown loss aggregation {aggregation!r}; "
                    f"choose one of {', '.join(LOSS_AGGREGATIONS)}")


def policy_loss(logprobs, old_logprobs, advantages, weights, clip_low=0.2, clip_high=0.2,
                ref_logprobs=None, kl_coef=0.0, entropy=None, entropy_coef=0.0):
    """Clipped surrogate (PPO/GRPO) with an optional k3 KL penalty to a reference policy and an
    optional token-entropy bonus.

    logprobs, old_logprobs, ref_logprobs, entropy, weights: (B, T); advantages: (B,).
    per token: -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) + kl_coef * k3
               - entropy_coef * H,
    ratio = exp(logprobs - old_logprobs), k3 = exp(ref - logprobs) - (ref - logprobs) - 1,
    H = -sum_v pi(v) log pi(v), the entropy of the policy's next-token distribution at that
    position (it must keep its graph for the bonus to have a gradient: token_logprobs_and_entropy).
    Returns (loss, stats) with loss = sum(weights * per_token); padding has weight 0. stats: the
    number of weighted tokens and, over those tokens, the clipped fraction, the mean k3 (when a
    reference is given) and the mean entropy (when given), so that callers can combine
    micro-batches by their token counts.
    """
    ratio = (logprobs - old_logprobs).exp()
    A = advantages[:, None]
    unclipped = ratio * A
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * A
    per_token = -torch.minimum(unclipped, clipped)
    mask = weights > 0
    n = int(mask.sum())
    mean = lambda x: (x.detach() * mask).sum().item() / max(n, 1)
    stats = {"tokens": n, "clip_frac": mean((clipped < unclipped).float())}
    if ref_logprobs is not None and kl_coef > 0:
        log_ratio = ref_logprobs - logprobs
        k3 = log_ratio.exp() - log_ratio - 1
        per_token = per_token + kl_coef * k3
        stats["kl"] = mean(k3)
    if entropy is not None:
        if entropy_coef > 0:      # else no gradient through the (N, V) entropy at all
            per_token = per_token - entropy_coef * entropy
        stats["entropy"] = mean(entropy)
    loss = (weights * per_token).sum()
    return loss, stats


def _chunk_logprobs_and_entropy(hidden, targets, weight, temperature):
    # float32 at least (a bf16 model's loss is taken in float32), float64 for a float64 model
    logits = (hidden @ weight.t()).to(torch.promote_types(hidden.dtype, torch.float32))  # (n, V)
    logp = (logits / temperature).log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)                                                # (n,)
    return logp.gather(-1, targets[:, None]).squeeze(-1), entropy


def token_logprobs_and_entropy(model, inputs_embeds, attention_mask, targets, loss_mask,
                               temperature=1.0, chunk=2048):
    """Transformer.token_logprobs for the policy update: the same log-probs (B, T), and the
    entropy (B, T) with its graph kept, so that an entropy bonus has a gradient. A batch without
    a single loss position still returns tensors attached to the graph (backward() gives zero
    gradients instead of failing)."""
    hidden = model.hidden_states(inputs_embeds, attention_mask)                  # (B, T, d)
    picked, picked_targets = hidden[loss_mask], targets[loss_mask]                # (N, d), (N,)
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    logprobs, entropy = [], []
    for i in range(0, picked.shape[0], chunk):   # recomputed in backward: no (N, V) kept
        lp, ent = torch.utils.checkpoint.checkpoint(
            _chunk_logprobs_and_entropy, picked[i:i + chunk], picked_targets[i:i + chunk],
            model.lm_head.weight, temperature, use_reentrant=False)
        logprobs.append(lp)
        entropy.append(ent)
    empty = picked.sum(-1).to(dtype)                        # (0,), on the graph when N == 0
    zeros = hidden.new_zeros(targets.shape, dtype=dtype)                         # (B, T)
    return (zeros.masked_scatter(loss_mask, torch.cat(logprobs) if logprobs else empty),
            zeros.masked_scatter(loss_mask, torch.cat(entropy) if entropy else empty))
