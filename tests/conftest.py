"""Shared fixtures: tiny randomly initialised Hugging Face checkpoints of every supported family.

Run the whole suite with:  python -m pytest -q
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # tests never reach a hub
torch.set_num_threads(2)

# Each entry: (name, model_type, extra config). GQA ratios 1, 2 and 4; tied and untied
# embeddings; Qwen2's q/k/v biases; Llama 3 RoPE scaling; Llama with attention_bias.
FAMILIES = {
    "qwen3": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            tie_word_embeddings=True)),
    "qwen3_untied_gqa4": ("qwen3", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                                        tie_word_embeddings=False)),
    "qwen2": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=4,
                            tie_word_embeddings=False)),
    "llama3": ("llama", dict(num_attention_heads=4, num_key_value_heads=1,
                             tie_word_embeddings=True, attention_bias=True,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 32})),
}


def make_hf_model(family, seed=0, vocab_size=97, hidden_size=64, layers=2):
    """A tiny transformers model with random weights (non-trivial norms and biases)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    model_type, extra = FAMILIES[family]
    extra = dict(extra)
    rope = extra.pop("rope_scaling", None)
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, hidden_size=hidden_size,
                                  intermediate_size=4 * hidden_size, num_hidden_layers=layers,
                                  max_position_embeddings=256, rms_norm_eps=1e-6,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    if rope is not None:
        config.rope_parameters = {"rope_theta": 500000.0, **rope}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():   # perturb norms and biases so that wrong wiring shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session", params=list(FAMILIES))
def hf_checkpoint(request, tmp_path_factory):
    """(family, directory, transformers model) for each supported family."""
    model = make_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, str(path), model
