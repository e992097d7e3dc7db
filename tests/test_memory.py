"""The memory model (memory.memory_need) against what the code really holds: the bytes autograd
saves per token and layer, counted tensor by tensor, for every family in fp32 and under bf16
autocast; the logits chunk's peak and common.sync_gradients' buckets, measured tensor by tensor;
FSDP's root; a training step's measured peak memory on the CPU for three shapes, with and without
activation checkpointing (within 25%), and a generation's; every KV cache a run keeps counted, one
per batch bucket; the start-up choice of micro-batch and checkpointing, a plan refused above 90% of
the free memory, the one-line refusal; and every GPU command of the README and the stages'
docstrings fits the hardware it names (bench/plan_commands.py prints the table in docs/gpu.md).

Run:  python -m pytest tests/test_memory.py -q        (about two minutes on two cores)
"""
import json
import os
import re
import subprocess
import sys
import weakref
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import common
import memory
import model as model_module
import rl
from common import UserError
from memory import activation_bytes, memory_need, parameter_sizes
from model import ModelConfig, Transformer, generate, token_logprobs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
import plan_commands  # noqa: E402

FAMILIES = {"qwen3": {}, "qwen2": {}, "llama": {"attention_bias": True}}


def small(model_type, **sizes):
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=24, max_position_embeddings=1024)
    return ModelConfig(model_type=model_type, **{**base, **FAMILIES[model_type], **sizes})


def saved_bytes(config, T, bf16):
    """Bytes of every distinct tensor autograd saves in a training forward of one row of T tokens."""
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights()
    embeds = torch.randn(1, T, config.hidden_size, requires_grad=True)
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model.hidden_states(embeds)
    return sum(seen.values())


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_activation_bytes_are_what_autograd_saves(family, bf16):
    """The growth of the saved bytes from 64 to 192 tokens (the weights autograd also keeps do not
    grow) per token and layer equals memory.activation_bytes, the count the memory model uses."""
    config = small(family)
    per_token_layer = (saved_bytes(config, 192, bf16) - saved_bytes(config, 64, bf16)) / 128 / config.num_hidden_layers
    predicted = activation_bytes(config, bf16)
    # the final norm (two d-vectors and a scalar per token, once) and RoPE's cos and sin (two head_dims)
    extra = (8 * config.hidden_size + 4 + 2 * 4 * config.head_dim) / config.num_hidden_layers
    assert predicted + extra == pytest.approx(per_token_layer, rel=0.03), (predicted, per_token_layer)


def test_parameter_sizes_are_the_models():
    """Built on the meta device once per config: the same sizes, in the same order, as a model with memory."""
    for family in FAMILIES:
        for tied in (False, True):
            config = small(family, tie_word_embeddings=tied)
            assert parameter_sizes(config) == [p.numel() for p in Transformer(config).parameters()], (family, tied)


def test_the_reference_model_is_counted_in_the_dtype_rl_loads_it_in():
    """rl.py's KL reference is fp32 (the policy's path under autocast), bf16 only under --fsdp."""
    config = small("qwen3")
    for bf16, fsdp, nbytes in ((False, False, 4), (True, False, 4), (True, True, 2)):
        assert memory_need(config, bf16, 2, fsdp, ref=True)["reference model"] == nbytes * sum(parameter_sizes(config))

PEAK_PROBE = r'''
"""Two training steps of one shape, or one generation: the peak resident memory they add, from
/proc (VmHWM), and the memory model's prediction. One measurement per process (memory a previous
one freed would be reused unseen); MALLOC_MMAP_THRESHOLD_ is set by the caller, so that freed
tensors go back to the system and the peak is that of live memory."""
import json, sys
import torch
from memory import memory_need
from model import ModelConfig, Transformer, completion_batch, generate, token_logprobs
torch.set_num_threads(1)

def rss(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

def peak_of(fn):
    base = rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                      # VmHWM := VmRSS
    fn()
    return rss("VmHWM") - base

kind, config, rows, T, option = json.loads(sys.argv[1])
c = ModelConfig(**config)
if kind == "train":
    checkpointing = option
    g = torch.Generator().manual_seed(0)
    def train():
        model = Transformer(c)
        model.init_weights()
        model.gradient_checkpointing = checkpointing
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        prompts = [torch.randint(3, c.vocab_size, (T // 2,), generator=g).tolist() for _ in range(rows)]
        completions = [torch.randint(3, c.vocab_size, (T - T // 2,), generator=g).tolist() for _ in range(rows)]
        for _ in range(2):                                # the second step holds AdamW's moments too
            logprobs, _ = token_logprobs(model, *completion_batch(model, prompts, completions))
            (-logprobs.sum()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    predicted = memory_need(c, train_rows=rows, train_len=T, loss_len=T - T // 2, checkpointing=checkpointing)["total"]
    print(json.dumps({"measured": peak_of(train), "predicted": predicted}))
else:
    new = option
    model = Transformer(c).eval()
    model.init_weights()
    prompts = [torch.randint(3, c.vocab_size, (T,)).tolist() for _ in range(rows)]
    measured = peak_of(lambda: generate(model, prompts, max_new_tokens=new, temperature=1.0, keys=list(range(rows))))
    need = memory_need(c, gen_rows=rows, gen_len=T + new, prompt_len=T)
    # no CUDA graph keeps the decode step's temporaries here: they come after the prefill's, not beside them
    print(json.dumps({"measured": measured, "predicted": need["KV cache"] + max(need["prefill"], need["decode step"])}))
'''


def test_the_memory_model_predicts_measured_peaks_on_the_cpu(tmp_path):
    """Two shapes (two families, vocabularies of 2K and 32K), each with and without activation
    checkpointing: the predicted peak of a training step (weights, gradients, AdamW, activations,
    the logits chunk) within 25% of the measured one; and a generation's KV cache and decoding
    buffers within 25% too."""
    shapes = [(dict(model_type="qwen3", vocab_size=2000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64), 8, 512),
              (dict(model_type="llama", vocab_size=32000, hidden_size=192, intermediate_size=512, num_hidden_layers=3,
                    num_attention_heads=6, num_key_value_heads=2, head_dim=32), 4, 384)]
    runs = [("train", dict(config, max_position_embeddings=2048), rows, T, ckpt) for config, rows, T in shapes
            for ckpt in (False, True)] + [("generate", dict(shapes[0][0], max_position_embeddings=2048), 64, 256, 32)]
    (tmp_path / "probe.py").write_text(PEAK_PROBE)
    def measure(run):                     # one process per measurement, two at a time (a peak is per process)
        result = subprocess.run([sys.executable, str(tmp_path / "probe.py"), json.dumps(run)], capture_output=True,
                                text=True, cwd=REPO, timeout=600,
                                env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536"))
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout)
    with ThreadPoolExecutor(2) as pool:
        peaks = list(pool.map(measure, runs))
    print("\n".join(f"{run[0]} {run[2]} x {run[3]} {run[4]}: measured {p['measured'] / 2**20:.0f} MiB, "
                    f"predicted {p['predicted'] / 2**20:.0f} MiB" for run, p in zip(runs, peaks)))
    for run, peak in zip(runs, peaks):
        assert 0.75 <= peak["predicted"] / peak["measured"] <= 1.25, (run, peak)
    # checkpointing lowers the peak, measured and predicted alike
    for key in ("measured", "predicted"):
        assert all(peaks[2 * i + 1][key] < peaks[2 * i][key] for i in range(2)), key


# -- the parts measured tensor by tensor -------------------------------------------------------------

class LiveBytes(TorchDispatchMode):
    """The peak bytes of the tensors the ops under it make and that are alive at once: each new storage counted
    from the op that makes it until its last reference goes (views and in-place results are not new). What a
    caching allocator hands out for them, exactly, on the CPU."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.seen = 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            storage = t.untyped_storage() if isinstance(t, torch.Tensor) else None
            if storage is not None and storage.nbytes() and storage.data_ptr() not in inputs | self.seen:
                self.seen.add(storage.data_ptr())
                self.live += storage.nbytes()
                weakref.finalize(storage, self.free, storage.data_ptr(), storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out

    def free(self, key, nbytes):
        self.seen.discard(key)
        self.live -= nbytes


@pytest.mark.parametrize("n, V, d", [(1024, 8000, 64), (512, 8000, 512), (256, 8000, 512)])
@pytest.mark.parametrize("fsdp", [False, True])
def test_the_logits_chunk_is_its_measured_peak(n, V, d, fsdp):
    """model.token_logprobs over one chunk of n positions, forward and backward (the entropy only logged, as
    rl.py logs it), measured tensor by tensor: within 15% of memory_need's "logits chunk" (and not below it by more
    than 5%), from d = n / 16 to 2 n. Under FSDP the weight is gathered in bf16 and the chunk casts it to fp32;
    elsewhere it is the fp32 master weight. lm_head's gradient already exists (a later chunk or micro-batch): the
    chunk's is made whole and then added."""
    dtype = torch.bfloat16 if fsdp else torch.float32
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, n, d, generator=g).to(dtype).requires_grad_()
    weight = (0.02 * torch.randn(V, d, generator=g)).to(dtype).requires_grad_()
    weight.grad = torch.zeros_like(weight)
    stand_in = SimpleNamespace(hidden_states=lambda embeds: embeds, lm_head=SimpleNamespace(weight=weight))
    targets, loss_mask = torch.randint(0, V, (1, n), generator=g), torch.ones(1, n, dtype=torch.bool)
    with LiveBytes() as measured:
        logprobs, entropies = token_logprobs(stand_in, hidden, targets, loss_mask, temperature=0.7, chunk=n)
        (-logprobs.sum()).backward()
    config = small("qwen3", vocab_size=V, hidden_size=d)
    predicted = memory_need(config, bf16=fsdp, ranks=8 if fsdp else 1, fsdp=fsdp, train_rows=1, train_len=n, chunk=n)["logits chunk"]
    assert 0.95 <= predicted / measured.peak <= 1.15, (predicted, measured.peak, measured.peak / (4 * n * V))


@pytest.mark.parametrize("bucket_numel", [2**26, 20000, 1])
def test_the_ddp_bucket_is_what_sync_gradients_allocates(monkeypatch, bucket_numel):
    """common.sync_gradients run as two replicated ranks run it (the all-reduce a no-op here), measured tensor by
    tensor: its peak is memory.sync_bucket_bytes, for one bucket of everything, a few, and one per parameter; and
    memory_need counts it with the gradients of replicated ranks only."""
    config = small("qwen3", vocab_size=3000, tie_word_embeddings=False)
    model = Transformer(config)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    monkeypatch.setattr(common, "distributed", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor: None)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    with LiveBytes() as measured:
        common.sync_gradients(model, bucket_numel)
    assert memory.sync_bucket_bytes(config, bucket_numel) == measured.peak
    P = sum(p.numel() for p in model.parameters())
    need = lambda ranks, fsdp: memory_need(config, ranks=ranks, fsdp=fsdp, train_rows=1, train_len=8)["gradients"]
    assert need(2, False) == 4 * P + memory.sync_bucket_bytes(config) and need(1, False) == 4 * P and need(2, True) == 2 * P


def test_the_ddp_bucket_of_a_real_vocabulary_holds_the_embedding_and_the_next_bucket():
    """Qwen3-1.7B: the embedding (V, d) is a bucket alone, made while the next one (2^26 elements or more) exists."""
    config = ModelConfig(model_type="qwen3", vocab_size=151936, max_position_embeddings=40960, **plan_commands.QWEN3["1.7"])
    V, d = config.vocab_size, config.hidden_size
    assert 4 * (V * d + 2**26) <= memory.sync_bucket_bytes(config) <= 4 * (V * d + 2 * 2**26)


@pytest.mark.parametrize("tied", [True, False])
def test_fsdp_counts_its_root_and_the_fp32_copy_of_lm_head(tied):
    """Under --fsdp a micro-batch holds the root fsdp.py gathers by hand (embedding, final norm, lm_head, bf16 under
    --dtype bfloat16) and its unsharded gradient, and the logits chunk an fp32 copy of lm_head's bf16 weight."""
    config = small("qwen3", vocab_size=3000, tie_word_embeddings=tied)
    model = Transformer(config)
    root = {id(p): p.numel() for m in (model.embed_tokens, model.model.norm, model.lm_head) for p in m.parameters()}
    sharded, replicated = (memory_need(config, True, 8, fsdp, train_rows=2, train_len=64) for fsdp in (True, False))
    assert sharded["FSDP root"] == 2 * 2 * sum(root.values()) and replicated["FSDP root"] == 0
    assert sharded["logits chunk"] - replicated["logits chunk"] == 4 * config.vocab_size * config.hidden_size


# -- the KV caches a run keeps: one per batch bucket, at the longest length it served ------------------

def fake_caches(config, shapes):
    """model._CACHES as a GPU run leaves it: one cache per batch bucket, (batch bucket, slots) each."""
    shape = lambda B, S: (B, config.num_key_value_heads, S, config.head_dim)
    return {B: SimpleNamespace(k=[torch.zeros(shape(B, S)) for _ in range(config.num_hidden_layers)],
                               v=[torch.zeros(shape(B, S)) for _ in range(config.num_hidden_layers)]) for B, S in shapes}


def kv_slot_bytes(config, nbytes=4):
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * nbytes


def test_check_generation_counts_every_cache_already_held(monkeypatch):
    """evaluate.py's check before its second benchmark: the caches the first left (batch buckets 4 and 16) count,
    the one this call uses (bucket 16) at the longer of its slots and the held ones; their bytes are in the need,
    not free memory, so they are given back to the free side."""
    config = small("qwen3")
    caches = fake_caches(config, [(4, 512), (16, 256)])
    monkeypatch.setattr(model_module, "_CACHES", caches)
    needs = []
    monkeypatch.setattr(memory, "memory_need", lambda *a, **k: needs.append(memory_need(*a, **k)) or needs[-1])
    held_bytes = sum(t.nbytes for c in caches.values() for t in c.k + c.v)
    monkeypatch.setattr(memory, "free_memory", lambda device: 2**40)
    memory.check_generation(config, False, 12, 600, 100, torch.device("cuda"))        # 12 rows -> 16, 700 -> 768 slots
    assert needs[-1]["KV caches held"] == kv_slot_bytes(config) * (4 * 512 + 16 * 768)
    # free memory such that the need fits only with the held caches' bytes given back
    free = int(needs[-1]["total"] / memory.HEADROOM) - held_bytes + 1
    monkeypatch.setattr(memory, "free_memory", lambda device: free)
    memory.check_generation(config, False, 12, 600, 100, torch.device("cuda"))
    monkeypatch.setattr(model_module, "_CACHES", {})
    with pytest.raises(UserError, match=r"^--batch-size 12 rows of up to 700 tokens need .* more than 90% of the .* GiB free; "
                                        r"lower --batch-size$"):
        memory.check_generation(config, False, 12, 600, 100, torch.device("cuda"))


def rl_args(*flags):
    return rl.parser.parse_args(["--model", "m", "--data", "d", "--out", "o", *flags])


def test_rl_plan_counts_a_cache_for_every_batch_bucket_a_run_reaches(monkeypatch):
    """rl.py with --resample 4 and a held-out set on 2 ranks: the rollouts (8 problems x 8 = 64 rows), the
    evaluation (200 rows over 2 ranks: 100, one call) and the resample (1 to 8 all-failed groups x 4 = 4 ... 32
    rows) each keep a cache in their batch bucket, at the longest length the bucket served."""
    config = small("qwen3")
    args = rl_args("--prompts-per-step", "16", "--group-size", "8", "--max-new-tokens", "300", "--L", "8",
                   "--micro-batch-size", "4")
    args.resample_size = 4
    rows, eval_rows = [{"prompt_ids": [0] * 100}], [{"prompt_ids": [0] * 500}] * 200
    needs = []
    monkeypatch.setattr(memory, "memory_need", lambda *a, **k: needs.append((k, memory_need(*a, **k))) or needs[-1][1])
    monkeypatch.setattr(memory, "free_memory", lambda device: 2**40)
    memory.rl_plan(args, config, rows, eval_rows, SimpleNamespace(rows=lambda L: L), SimpleNamespace(rows=lambda: 200),
                   2, torch.device("cuda"))
    settings, need = needs[-1]
    # rollouts: 64 rows of 100 + 8 + 300 tokens -> (64, 512); evaluation: 100 rows of 800 -> (128, 1024); the
    # resample's 4, 8, ..., 32 rows of 100 + 200 + 300 -> (4|8|16|32, 768)
    assert dict(settings["kv_held"]) == {64: 512, 128: 1024, 4: 768, 8: 768, 16: 768, 32: 768}
    assert need["KV caches held"] == kv_slot_bytes(config) * (64 * 512 + 128 * 1024 + (4 + 8 + 16 + 32) * 768)
    assert (settings["gen_rows"], settings["gen_len"]) == (128, 1024)                 # the largest generation's temporaries


def test_the_caches_generate_keeps_are_the_ones_rl_plan_counts(monkeypatch):
    """rl.py's generate() calls on the compiled path (the step itself run eagerly), with prompts of varying
    length as steps give them: the caches model._CACHES holds at the end are exactly those rl_plan counts."""
    config = small("qwen3", max_position_embeddings=2048)
    model = Transformer(config).eval()
    model.init_weights()
    monkeypatch.setattr(model_module, "compiled_decode_step", lambda *args, **kwargs: model_module._decode_step)
    model_module.free_caches()
    args = rl_args("--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "40", "--L", "0",
                   "--micro-batch-size", "4")
    args.resample_size = 3
    rows, eval_rows = [{"prompt_ids": [5] * n} for n in (10, 230)], [{"prompt_ids": [5] * n} for n in (20, 600)] * 3
    run = lambda count, length: generate(model, [[5] * length] * count, max_new_tokens=40, temperature=1.0,
                                         keys=list(range(count)), compile=True, check_every=1000)
    for length in (10, 230, 30):                                    # rollouts: 16 rows, the longest prompt once
        run(16, length)
    run(6, 600)                                                     # the evaluation: all 6 rows in one call
    for groups, length in ((1, 230), (2, 230), (3, 10), (4, 230)):  # the resample: 3, 6, 9, 12 rows
        run(3 * groups, length)
    held = {c.k[0].shape[0]: c.k[0].shape[2] for c in model_module._CACHES.values()}
    needs = []
    monkeypatch.setattr(memory, "memory_need", lambda *a, **k: needs.append(k) or memory_need(*a, **k))
    monkeypatch.setattr(memory, "free_memory", lambda device: 2**40)
    memory.rl_plan(args, config, rows, eval_rows, None, SimpleNamespace(rows=lambda: 0), 1, torch.device("cuda"))
    model_module.free_caches()
    assert held == dict(needs[-1]["kv_held"]) == {16: 512, 8: 768, 4: 512}


# -- the start-up choice ------------------------------------------------------------------------------

@pytest.mark.parametrize("free_gib, expected", [(64, (32, False)), (6, (32, True)), (2.2, (8, True)), (1.4, None),
                                                (1.2, None)])
def test_defaults_take_the_first_setting_that_fits(monkeypatch, capsys, free_gib, expected):
    """--micro-batch-size 0 and --activation-checkpointing auto: the first of (32, off), (32, on),
    (16, off), ... whose plan fits 90% of the free memory is taken, and said; none fitting is one line naming
    the flags. (This model needs 11.3 GiB at (32, off), 3.2 at (32, on), 1.9 at (8, on), 1.3 at (1, on): with
    1.4 GiB free the last fits the memory but not 90% of it.)"""
    config = small("qwen3", hidden_size=512, intermediate_size=1536, num_hidden_layers=8, vocab_size=32000)
    need = lambda m, c: memory_need(config, train_rows=m, train_len=1024, checkpointing=c)
    free = free_gib * 2**30
    monkeypatch.setattr(memory, "free_memory", lambda device: free)
    order = [(m, c) for m in (32, 16, 8, 4, 2, 1) for c in (False, True)]
    if expected is None:
        assert all(need(*setting)["total"] > 0.9 * free for setting in order)
        assert (free_gib == 1.4) == (need(1, True)["total"] <= free)           # 1.4: refused for the headroom alone
        with pytest.raises(UserError, match=rf"^a rank needs .* GiB \(weights .*\) at --micro-batch-size 1, more than 90% "
                                            rf"of the {free_gib} GiB free; lower --micro-batch-size or --max-tokens, or use "
                                            r"more ranks or --fsdp$"):
            memory.fit_memory(need, torch.device("cpu"), 0, "auto", "--max-tokens")
        return
    chosen = memory.fit_memory(need, torch.device("cpu"), 0, "auto", "--max-tokens")
    assert chosen == expected
    assert need(*chosen)["total"] <= 0.9 * free
    assert all(need(*earlier)["total"] > 0.9 * free for earlier in order[:order.index(chosen)])
    assert f"micro-batch {chosen[0]}, activation checkpointing {'on' if chosen[1] else 'off'}" in capsys.readouterr().out
    if chosen == (32, False):
        return
    with pytest.raises(UserError, match=r"a rank needs .* GiB \(weights .*\) at --micro-batch-size 32, more than 90% of the "
                                        r".* GiB free; lower --micro-batch-size or --max-tokens, or use --activation-checkpointing on, more ranks or --fsdp$"):
        memory.fit_memory(need, torch.device("cpu"), 32, "off", "--max-tokens")


def test_rl_plan_refuses_a_plan_above_90_percent_of_free_memory(monkeypatch):
    """rl.py's own plan (--micro-batch-size 8: without recomputation, then with it) between 90% and 100% of the
    free memory is refused in one line that names the flags to change; below 90% it is taken."""
    config = small("qwen3")
    args = rl_args("--prompts-per-step", "4", "--micro-batch-size", "8")
    plan = lambda: memory.rl_plan(args, config, [{"prompt_ids": [0] * 50}], [], None, None, 1, torch.device("cuda"))
    needs = {}
    monkeypatch.setattr(memory, "memory_need", lambda *a, **k: needs.setdefault(k["checkpointing"], memory_need(*a, **k)))
    monkeypatch.setattr(memory, "free_memory", lambda device: 2**40)
    assert plan() == (8, False)
    needs.clear()
    monkeypatch.setattr(memory, "free_memory", lambda device: 0)
    with pytest.raises(UserError):
        plan()
    assert needs[True]["total"] < needs[False]["total"]
    total = needs[True]["total"]
    monkeypatch.setattr(memory, "free_memory", lambda device: total / 0.95)              # fits, but not with 10% to spare
    with pytest.raises(UserError, match=r"^a rank needs .* at --micro-batch-size 8, more than 90% of the .* GiB free; "
                                        r"lower --micro-batch-size or --prompts-per-step x --group-size or --max-new-tokens, "
                                        r"or use more ranks or --fsdp$") as refused:
        plan()
    assert "\n" not in str(refused.value)
    monkeypatch.setattr(memory, "free_memory", lambda device: total / 0.89)
    assert plan() == (8, True)


# -- every GPU command the project documents fits the hardware it names -------------------------------

# What the memory model says does not fit, as {(script, flag): reason} (docs/gpu.md's table): none today. An entry
# is a strict expected refusal, so a command that comes to fit fails until its entry goes.
TOO_BIG = {}


def test_the_documented_commands_are_found():
    commands = plan_commands.documented_commands()
    scripts = {re.search(r"(\w+)\.py", c).group(1) for _, _, c in commands}
    assert scripts >= {"rl", "sft_warmup", "evaluate", "infer"}
    assert len(commands) >= 8


@pytest.mark.parametrize("source, hardware, command", [
    pytest.param(*found, marks=[pytest.mark.xfail(strict=True, raises=UserError, reason=reason)
                                for (where, flag), reason in TOO_BIG.items() if found[0] == where and flag in found[2]])
    for found in plan_commands.documented_commands()], ids=lambda v: str(v)[:60])
def test_every_documented_gpu_command_fits_the_hardware_it_names(source, hardware, command):
    """Through what the stage calls at start-up, with the free memory of the card the text names (its nominal GB
    less 2 GiB for CUDA's context and NCCL): raises UserError where the memory model refuses it."""
    gb = int(plan_commands.HARDWARE.search(hardware).group(2))
    size, config = plan_commands.config_of(hardware, command)
    plan_commands.check(command, config, plan_commands.world_of(hardware), gb * 10**9 - 2 * 2**30)
