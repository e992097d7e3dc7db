"""The code paths a CUDA device takes, checked on the CPU: which attention call each path makes, the KV
caches generate() keeps, what the compiled decode step may write, where sampling runs, and the float
settings a GPU run starts with. (tests/test_gpu_commands.py runs the documented GPU commands whole.)"""
import types

import pytest
import torch
import torch.nn.functional as F

import model as model_module
from conftest import tiny_toy_model
from model import _decode_step, completion_batch, decode_buckets, generate, token_logprobs


@pytest.fixture
def gqa_model():
    """The toy-shaped model: two query heads sharing one KV head, as Qwen3's grouped-query attention."""
    model, _ = tiny_toy_model(layers=2, context=256, std=0.3)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    model_module._CACHES.clear()
    yield model
    model_module._CACHES.clear()


def recorded_attention(monkeypatch):
    """Every scaled_dot_product_attention call: (query heads, key heads, a mask was passed, enable_gqa)."""
    calls, real = [], F.scaled_dot_product_attention

    def record(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kw):
        calls.append((q.shape[1], k.shape[1], attn_mask is not None, enable_gqa))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa, **kw)
    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", record)
    return calls


def test_no_attention_call_passes_a_mask_with_grouped_heads(gqa_model, monkeypatch):
    """No fast CUDA kernel takes a mask together with fewer K/V heads than query heads (the math kernel
    serves it: fp32, 4x a score tensor). Prefill and decode pass a mask, so K/V come repeated to every
    head; training passes no mask (is_causal) and keeps the grouped heads."""
    calls = recorded_attention(monkeypatch)
    prompts, prefixes = [[5, 6, 7], [8, 9], [10]], [torch.randn(2, 32), None, torch.randn(1, 32)]
    generate(gqa_model, prompts, prefixes, max_new_tokens=5, temperature=1.0, keys=[1, 2, 3])
    generate(gqa_model, prompts, None, max_new_tokens=5, temperature=0)
    masked = [c for c in calls if c[2]]
    assert len(masked) == 2 * 2 * 5                      # 2 calls x 2 layers x (prefill + 4 decode steps)
    assert all(q == k and not gqa for q, k, _, gqa in masked), set(masked)
    calls.clear()
    embeds, targets, loss_mask = completion_batch(gqa_model, prompts, [[3, 4], [5], [6, 7, 8]], prefixes)
    token_logprobs(gqa_model, embeds, targets, loss_mask)
    assert calls and all(not masked and gqa and k < q for q, k, masked, gqa in calls)


def test_one_cache_per_batch_bucket_sized_to_what_it_served(gqa_model):
    """Batches of one bucket share one cache; a longer call replaces it with a longer one, a shorter
    call reuses it: the caches held are one per batch bucket, as memory.py counts them."""
    caches = model_module._CACHES
    run = lambda batch, new: generate(gqa_model, [[5, 6, 7]] * batch, max_new_tokens=new, temperature=0,
                                      compile=True)
    with torch.compiler.set_stance("force_eager"):       # the cache logic alone, no Inductor build
        run(3, 10)
        first = next(iter(caches.values()))
        assert len(caches) == 1 and first.key_valid.shape == (4, 256)
        run(4, 300)                                      # same batch bucket (4), a longer length bucket
        assert len(caches) == 1 and next(iter(caches.values())).key_valid.shape == (4, 512)
        longer = next(iter(caches.values()))
        run(3, 20)                                       # shorter: the longer cache serves it
        assert len(caches) == 1 and next(iter(caches.values())) is longer
        run(7, 20)                                       # another batch bucket: a cache of its own
        assert sorted(c.key_valid.shape for c in caches.values()) == [(4, 512), (8, 256)]
    model_module.free_caches()
    assert not caches


def test_every_tensor_the_decode_step_writes_is_static(gqa_model):
    """A compiled step that writes to an input that is not marked static makes torch skip CUDA graphs
    ("mutated inputs"). Find what one decode step writes by running it, then check each is static."""
    cache = model_module.bucketed_cache(gqa_model.config, 2, 16, "cpu", torch.float32)   # the compiled path's cache
    from model import embed_rows
    embeds, mask = embed_rows(gqa_model, [[5, 6, 7], [8, 9]])
    with torch.no_grad():
        gqa_model.hidden_states(embeds, mask, kv_cache=cache)
        tensors = {name: t for name, t in vars(cache).items() if isinstance(t, torch.Tensor)}
        tensors |= {f"{n}{i}": t for n in "kv" for i, t in enumerate(getattr(cache, n))}
        before = {name: t.clone() for name, t in tensors.items()}
        t_next = torch.ones((), dtype=torch.long)
        _decode_step(gqa_model, torch.tensor([3, 4]), cache, torch.tensor([1, 2]), t_next, 1.0, 1.0)
    written = [name for name, t in tensors.items() if not torch.equal(t, before[name])]
    assert {"key_valid", "seen", "slot", "k0", "v1"} <= set(written)
    assert [name for name in written if not hasattr(tensors[name], "_dynamo_static_input_type")] == []


def test_sampling_runs_inside_the_compiled_step(gqa_model, monkeypatch):
    """The compiled step returns the next tokens, not logits: sample_next is part of its graph (traced,
    never run as Python again), not called from the loop at every token; the tokens are the eager loop's.
    Dynamo's graph is what is checked, so it runs with the eager backend here (no Inductor build)."""
    import sys
    monkeypatch.setattr(model_module, "compiled_decode_step", lambda device_type: torch.compile(
        _decode_step, fullgraph=True, dynamic=True, backend="eager"))
    calls = []
    profile = lambda frame, event, arg: event == "call" and frame.f_code is model_module.sample_next.__code__ \
        and calls.append(1)
    prompts, keys = [[5, 6, 7], [8, 9], [10, 11, 12, 13]], [7, 8, 9]
    torch._dynamo.reset()
    runs = {}
    for compiled in (False, True):
        calls.clear()
        sys.setprofile(profile)
        try:
            runs[compiled] = generate(gqa_model, prompts, max_new_tokens=24, temperature=1.0, keys=keys, compile=compiled)
        finally:
            sys.setprofile(None)
        runs[compiled, "calls"] = len(calls)
    assert runs[False, "calls"] == 24                    # eager: the prefill's token, then one per step
    assert runs[True, "calls"] == 1                      # compiled: the prefill's token alone
    assert runs[True].token_lists() == runs[False].token_lists()


def test_a_gpu_run_keeps_fp32_matmuls_in_fp32(monkeypatch):
    """common.compute_init on a (pretended) CUDA device: TF32 stays off, so the fp32 lm_head logits and
    log-probs are fp32, not TF32 (10 bits of mantissa)."""
    import common
    fake_cuda = types.SimpleNamespace(is_available=lambda: True, set_device=lambda device: None)
    monkeypatch.setattr(common.torch, "cuda", fake_cuda)
    monkeypatch.delenv("RANK", raising=False)
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", lambda enabled: None)
        _, _, _, device = common.compute_init()
        assert device.type == "cuda"
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def test_decode_buckets_round_batches_to_powers_of_two():
    assert [decode_buckets(b, 1)[0] for b in (1, 2, 3, 5, 64, 65)] == [2, 2, 4, 8, 64, 128]
    assert [decode_buckets(2, n)[1] for n in (1, 256, 257)] == [256, 256, 512]
