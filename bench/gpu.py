r"""Every GPU figure of the project in one command, within about 8 minutes on one H100 (80 GB) or H200 (141 GB):

    bash bench/gpu.sh                # -> docs/results/gpu.md and gpu.json (needs CUDA)
    bash bench/gpu.sh --smoke        # the same code paths at tiny shapes on the CPU (under a minute;
                                     # tests/test_gpu_bench.py runs it)
    python bench/gpu.py --only decode --shapes qwen3-1.7b --batches 1,64    # one figure alone

The sections, in order of importance, each timed against what is left of --budget seconds (one
that would not fit is recorded as skipped, never started; one that runs past the budget is stopped
and recorded as failed). gpu.json and gpu.md are rewritten after every section, so a run cut short
keeps what it finished, and each section's files (checkpoints, runs) are deleted when it ends, and the
KV caches generate() keeps and the allocator's unused blocks freed. Shapes fit the card found (told
apart by its memory; its datasheet figures beside the measured ones): a decode row the memory model
says does not fit is skipped, rl steps run at the largest P of 32, 16, 8 it accepts, and a row that
fails anyway (torch.cuda.OutOfMemoryError included) is recorded as failed with the rows before it
kept. A broken check (no CUDA graph recorded by the compiled decode on a GPU; any compilation or
recording while a figure is timed) is a failed row, not a figure; any failed row makes the exit
status 1, after every section has run:
  ceilings    device-to-device copy bandwidth and a bf16 matrix product's rate, measured here after
              about a second of warm-up (an idle GPU runs at a fraction of its clock) over at least
              100 repeats: the roofline and MFU below use these, beside the datasheet's figures
  compile     generate()'s compiled decode step from cold: the first call's time, then graphs,
              compilations and CUDA-graph recordings over calls at several batches and lengths,
              and again over the same calls repeated (which must compile and record nothing)
  decode      the sampling path rl.py uses: generate() compiled, keyed sampling at temperature 1,
              the bf16 weights of a --dtype bfloat16 run's sampler; random weights of the Qwen3-1.7B
              and -4B shapes, 512-token prompts, 512 new tokens, batch 1, 64 and 256 (a batch whose
              caches and temporaries memory.check_generation refuses on this card is skipped). Decode
              tokens/s from two lengths in one cache bucket (so the prefill cancels), and the
              fraction of the memory-bandwidth roofline: each step reads every weight once and
              every slot of the KV cache it runs with, the bucketed one (model.decode_buckets)
  rl_step     one rl.py step (after one warm-up step) on the Qwen3-1.7B shape, P = 32 (or the
              largest of 16, 8 whose memory plan fits the card: 16 on an H100), G = 8, 512
              new tokens, --dtype bfloat16, micro-batch and activation checkpointing chosen by the
              memory model: generation / scoring / update split, update MFU, and the memory model's
              predicted peak and its parts beside torch.cuda.max_memory_allocated
  rl_step_4b  the same on the Qwen3-4B shape (full-parameter, one GPU): whatever setting the memory
              model finds that fits, or its refusal as the reason for a skip
  versus_hf   ours against transformers' generate() (static cache, which it compiles itself), batch
              64, the same bf16 weights and sampling settings, alternated in one run
  fsdp        rl.py --fsdp against DDP under torchrun (one rank per GPU): weights after two steps
  trl         bench/bench_rl_step.py against TRL's GRPOTrainer on the 1.7B shape, if trl imports

Random weights decode random tokens, so rewards are 0 and completions run to the token limit: the
worst case for time, which is what these figures are about. Nothing here is needed but torch,
transformers, safetensors, tokenizers and tqdm (the GPU image has them); docs/gpu.md says which
wheels to carry for the trl figure, and on which versions it has run.
"""

import argparse
import contextlib
import functools
import gc
import inspect
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import model as model_module  # noqa: E402
from model import ModelConfig, Transformer, _decode_step, decode_buckets, generate  # noqa: E402

SHAPES = {   # Qwen3's published sizes; "tiny" is the smoke test's, "small" a check-sized one
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64, vocab_size=4096),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936),
}
# The cards bench/gpu.sh runs on: memory (10^9 bytes), datasheet bandwidth and bf16 dense rate (SXM). The measured
# ceilings come first; these are beside them.
CARDS = {"H100 SXM 80 GB": {"memory": 80e9, "bandwidth": 3.35e12, "bf16_flops": 989e12},
         "H200 SXM 141 GB": {"memory": 141e9, "bandwidth": 4.8e12, "bf16_flops": 989e12}}
GiB = 2**30


def card_of(total_memory):
    """(name, datasheet figures) of the card whose memory is nearest a device's total bytes: torch reports about
    79 GiB for an H100's 80 GB and 140 GiB for an H200's 141 GB."""
    name = min(CARDS, key=lambda n: abs(CARDS[n]["memory"] - total_memory))
    return name, CARDS[name]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t0 = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - t0, result


def config_of(shape):
    return ModelConfig(model_type="qwen3", tie_word_embeddings=True, max_position_embeddings=40960,
                       eos_token_id=1, pad_token_id=0, **SHAPES[shape])


def random_model(shape, device):
    """Random fp32 weights, as rl.py's master copy holds them."""
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(config_of(shape))
    model.init_weights()
    return model.eval()


def bf16_sampler(model):
    """What rl.py samples with under --dtype bfloat16: the policy cast to bf16, RoPE's frequencies
    kept fp32 (rl.main builds its copy the same way). Casts `model` in place."""
    inv_freq = model.inv_freq
    model.to(torch.bfloat16).requires_grad_(False)
    model.inv_freq = inv_freq
    return model


def free_device_memory():
    """What a section or a row made: the KV caches generate() keeps (one per batch bucket, otherwise for the process's
    life: the 1.7B decode's would crowd out the 4B's), then the garbage, then the caching allocator's unused blocks."""
    getattr(model_module, "free_caches", model_module._CACHES.clear)()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -----------------------------------------------------------------------------
# The formulas the figures rest on (tests/test_gpu_bench.py checks each by hand)

def weight_bytes(c, dtype_bytes):
    """Bytes of every weight one decode step reads: the projections of each layer and the (tied)
    embedding matrix once, as lm_head. The norms' few thousand weights are left out."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    return (c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size) * dtype_bytes


def kv_bytes_per_slot(c, dtype_bytes):
    """One cache slot of one row: a key and a value vector per KV head, in every layer."""
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * dtype_bytes


def decode_step_bytes(c, batch, length, dtype_bytes):
    """Bytes one compiled decode step reads: every weight, and every slot of the KV cache it runs
    with, which is the bucketed one (model.decode_buckets: the batch rounded up to a power of two,
    the length to a multiple of 256), since attention reads all slots under a mask. Returns
    (bytes, padded batch, slots)."""
    padded, slots = decode_buckets(batch, length)
    return weight_bytes(c, dtype_bytes) + padded * slots * kv_bytes_per_slot(c, dtype_bytes), padded, slots


def update_flops(c, rows):
    """Model FLOPs of the policy update's forward and backward over training rows, rows = [(T, n)]:
    T positions in the row (prefix, prompt, completion), n of them with a log-prob (the completion).
      dense layers  6 per weight per position (2 forward, 4 backward)
      lm_head       6 V d at the n positions only (model.token_logprobs takes logits there alone)
      attention     QK^T and AV, causal: 2 T^2 (H hd) / 2 each forward, x3 with the backward, per
                    layer. H hd = num_attention_heads x head_dim, the width of the queries, which
                    is not hidden_size in every model (Qwen3-4B: 32 x 128 = 4096 against 2560)
    Recomputation under activation checkpointing is not counted: model FLOPs, as MFU is defined."""
    dense = weight_bytes(c, 1) - c.vocab_size * c.hidden_size            # non-embedding weights
    width = c.num_attention_heads * c.head_dim
    return sum(6 * dense * T + 6 * c.vocab_size * c.hidden_size * n + 6 * c.num_hidden_layers * width * T * T
               for T, n in rows)


def rate(fn, work, warmup_s, min_repeats=100, window_s=0.2, windows=3):
    """work / second of fn(), after fn has run for warmup_s seconds (clocks up, caches warm):
    the median over `windows` timed windows of at least min_repeats calls and about window_s each.
    Returns (rate, repeats per window)."""
    t0, calls = time.perf_counter(), 0
    while time.perf_counter() - t0 < warmup_s or calls < 3:
        fn()
        sync()
        calls += 1
    per_call = (time.perf_counter() - t0) / calls
    repeats = max(min_repeats, int(window_s / per_call))

    def window():
        for _ in range(repeats):
            fn()
    rates = [work * repeats / timed(window)[0] for _ in range(windows)]
    return statistics.median(rates), repeats


class Events:
    """torch.compile's compilations and CUDA-graph recordings so far in this process, from torch's
    compile callbacks (the counts stay None on a torch without them). A timed call that compiled or
    recorded measured that, not the steady state, so the timed sections report these counts."""

    def __init__(self):
        self.counts = None
        try:
            from torch._dynamo.callback import CallbackTrigger, callback_handler
        except ImportError:
            return
        self.counts = {"compiles": 0, "cuda_graph_recordings": 0}
        kinds = {CallbackTrigger.DYNAMO: "compiles", CallbackTrigger.CUDAGRAPH_RECORDING: "cuda_graph_recordings"}

        def on_start(args=None):     # called inside torch.compile: must never raise
            kind = kinds.get(getattr(args, "callback_trigger", None))
            if kind:
                self.counts[kind] += 1
        callback_handler.register_start_callback(on_start)

    def now(self):
        return dict(self.counts) if self.counts is not None else None

    def since(self, before):
        return None if before is None else {k: v - before[k] for k, v in self.counts.items()}


EVENTS = Events()


class OverBudget(Exception):
    """Raised in a section (by SIGALRM) when the run reaches --budget."""


def on_alarm(signum, frame):
    raise OverBudget("ran past --budget and was stopped")


def graphs():
    """Dynamo graphs compiled in this process (a recompilation adds one)."""
    import torch._dynamo
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


# -----------------------------------------------------------------------------
# The sections: each takes (args, ceilings, a work directory of its own) and returns its figures

def ceilings(a, ceil, work):
    n = (1 << 28) if a.cuda else (1 << 22)                     # 512 MiB of bf16 on the GPU
    x = torch.randn(n, device=a.device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    size = 8192 if a.cuda else 256
    m = torch.randn(size, size, device=a.device, dtype=torch.bfloat16)
    # the matrix product first: its warm-up is the one that brings an idle GPU to its clock
    flops, matmul_repeats = rate(lambda: m @ m, 2 * size ** 3, a.warmup_s)
    bandwidth, copy_repeats = rate(lambda: y.copy_(x), 2 * x.numel() * x.element_size(), a.warmup_s)
    return {"copy_bytes_per_s": bandwidth, "matmul_flops_per_s": flops, "copy_repeats": copy_repeats,
            "matmul_repeats": matmul_repeats, "warmup_s": a.warmup_s,
            "card": a.card_name, "copy_of_datasheet": bandwidth / a.card["bandwidth"],
            "matmul_of_datasheet": flops / a.card["bf16_flops"], "command": "python bench/gpu.py --only ceilings"}


def sampling(model, prompts, new_tokens):
    """One generate() call as rl.py's rollouts make it (rl.sample): compiled, keyed noise at
    temperature 1. No stop token, so every call decodes all new_tokens: random weights would stop a
    row now and then, which keeps its place in the batch anyway and only ends the call early once
    every row has stopped."""
    out = generate(model, prompts, max_new_tokens=new_tokens, temperature=1.0, top_p=1.0,
                   keys=list(range(len(prompts))), compile=True)
    assert int(out.lengths.min()) == new_tokens
    return out


def compile_once(a, ceil, work):
    """generate()'s compiled step from cold (run this section first in a process): the first call's
    time, then dynamo graphs, compilations and CUDA-graph recordings over calls at several batches
    and cache buckets, and over the same calls again, which must add none. Batch 1 gets a graph of
    its own (torch specialises a size-1 dimension); every other batch and length shares one."""
    model = bf16_sampler(random_model(a.shapes[0], a.device))
    V, new = model.config.vocab_size, 16
    calls = [(3, 100), (4, 100), (3, 300), (17, 100), (1, 100)]      # buckets (4|32|1, 256|512)
    prompts = {(b, n): torch.randint(3, V, (b, n)).tolist() for b, n in calls}
    graphs0, events0, t0 = graphs(), EVENTS.now(), time.perf_counter()
    first_s = timed(lambda: sampling(model, prompts[calls[0]], new))[0]
    for shape in calls[1:]:
        sampling(model, prompts[shape], new)
    sync()
    first_pass_s, graphs1, events1 = time.perf_counter() - t0, graphs(), EVENTS.now()
    for shape in calls:
        sampling(model, prompts[shape], new)
    result = {"shape": a.shapes[0], "calls": [f"{b}x{n}" for b, n in calls], "first_call_s": first_s,
              "first_pass_s": first_pass_s, "graphs": graphs1 - graphs0, "first_pass": EVENTS.since(events0),
              "repeat_graphs": graphs() - graphs1, "repeat": EVENTS.since(events1),
              "compiled_by": "torch.compile, mode reduce-overhead" if a.cuda else "dynamo with the eager backend (CPU)",
              "command": "python bench/gpu.py --only compile"}
    if broken := graph_failures(result["first_pass"], result["repeat"], a.cuda):
        result["failed"] = "; ".join(broken)
    return result


def graph_failures(first_pass, repeat, cuda):
    """What the compile section checks, as a failure each (a failed row and exit status 1, never a figure): on a GPU
    the first pass records CUDA graphs (none: the decode step runs without them, each kernel launched from the host,
    and every decode figure measures that), and the same calls again compile and record nothing (else every rl.py
    step pays for it). counts None: this torch gives no compile callbacks, so nothing could be checked."""
    if first_pass is None:
        return ["torch gives no compile callbacks: CUDA graphs and recompilations unchecked"] if cuda else []
    broken = []
    if cuda and first_pass["cuda_graph_recordings"] == 0:
        broken.append("no CUDA graph recorded on the first pass: the compiled decode step runs without CUDA graphs")
    if any(repeat.values()):
        broken.append(f"the same calls again compiled {repeat['compiles']} and recorded {repeat['cuda_graph_recordings']} "
                      "CUDA graphs: they must reuse the first pass's")
    return broken


def decode(a, ceil, work):
    rows = []
    try:
        decode_rows(a, ceil, rows)
    except OverBudget as e:      # the rows measured so far are figures: keep them
        rows.append({"stopped": str(e)})
    return rows


def decode_rows(a, ceil, rows):
    """A row per (shape, batch); one the memory model refuses on this card is skipped, and one that fails all the
    same (out of memory, say) says so and frees what it made: the rows measured before it stay, the next ones run."""
    import memory
    from common import UserError
    for shape in a.shapes:
        model = bf16_sampler(random_model(shape, a.device))
        for batch in a.batches:
            command = f"python bench/gpu.py --only decode --shapes {shape} --batches {batch}"
            try:
                # the caches of the batches before this one stay (one per batch bucket) and count
                memory.check_generation(model.config, True, batch, a.prompt_len, a.new_tokens, torch.device(a.device),
                                        loaded=True)
                rows.append(decode_row(a, ceil, model, shape, batch, command))
            except OverBudget:
                raise
            except UserError as e:
                rows.append({"shape": shape, "batch": batch, "skipped": f"does not fit this card: {e}", "command": command})
            except Exception as e:       # torch.cuda.OutOfMemoryError included
                rows.append({"shape": shape, "batch": batch, "failed": f"{type(e).__name__}: {e}"[:1000], "command": command})
                free_device_memory()
        del model
        free_device_memory()


def decode_row(a, ceil, model, shape, batch, command):
    """One batch's decode figures; any compilation or CUDA-graph recording while timed fails the row (it would be
    in the figure)."""
    c = model.config
    prompts = torch.randint(3, c.vocab_size, (batch, a.prompt_len)).tolist()
    # two lengths in one cache bucket: the same prefill, the same step, (long - short) more steps
    long, short = a.new_tokens, a.new_tokens // 2 + 1
    assert decode_buckets(batch, a.prompt_len + long) == decode_buckets(batch, a.prompt_len + short)
    sampling(model, prompts, long), sampling(model, prompts, short)   # compile and record this bucket
    before, times = EVENTS.now(), {long: [], short: []}
    for _ in range(a.repeats):                                        # alternated, so drift cancels
        for n in (long, short):
            times[n].append(timed(lambda: sampling(model, prompts, n))[0])
    t_long, t_short = statistics.median(times[long]), statistics.median(times[short])
    step_s = (t_long - t_short) / (long - short)
    step_bytes, padded, slots = decode_step_bytes(c, batch, a.prompt_len + long, 2)
    tokens_per_s = batch / step_s
    roofline = batch * ceil["copy_bytes_per_s"] / step_bytes
    row = {"shape": shape, "batch": batch, "prompt_len": a.prompt_len, "new_tokens": long,
           "call_s": t_long, "prefill_s": t_long - (long - 1) * step_s, "step_ms": 1e3 * step_s,
           "decode_tokens_per_s": tokens_per_s, "padded_batch": padded, "kv_slots_read": slots,
           "step_bytes": step_bytes, "live_kv_fraction": (a.prompt_len + long / 2) / slots,
           "roofline_tokens_per_s": roofline, "roofline_fraction": tokens_per_s / roofline,
           "datasheet_roofline_fraction": tokens_per_s * step_bytes / batch / a.card["bandwidth"],
           "while_timed": EVENTS.since(before), "command": command}
    if row["while_timed"] and any(row["while_timed"].values()):
        row["failed"] = f"compiled or recorded CUDA graphs while timed ({fmt(row['while_timed'])}): the figure includes it"
    return row


def versus_hf(a, ceil, work):
    from transformers import AutoConfig, AutoModelForCausalLM
    shape, batch = a.shapes[0], a.hf_batch
    ours = bf16_sampler(random_model(shape, a.device))
    hf_config = AutoConfig.for_model(**{k: v for k, v in ours.config.to_hf("float32").items()
                                        if k not in ("architectures", "torch_dtype")})
    hf = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16).to(a.device).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)   # lm_head: tied
    prompts = torch.randint(3, ours.config.vocab_size, (batch, a.prompt_len), device=a.device)
    mask = torch.ones_like(prompts)

    def run_hf():   # transformers compiles its forward itself for a static cache on a GPU
        with torch.inference_mode():
            return hf.generate(prompts, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                               max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                               cache_implementation="static", pad_token_id=0)
    run_ours = lambda: sampling(ours, prompts.tolist(), a.new_tokens)
    run_ours(), run_hf()                                        # compile both
    times = {"ours": [], "transformers": []}
    for _ in range(a.repeats):                                  # alternate the two
        times["ours"].append(timed(run_ours)[0])
        times["transformers"].append(timed(run_hf)[0])
    tok = lambda side: batch * a.new_tokens / statistics.median(times[side])
    return {"shape": shape, "batch": batch, "ours_tokens_per_s": tok("ours"),
            "transformers_tokens_per_s": tok("transformers"), "ratio": tok("ours") / tok("transformers"),
            "sampling": "temperature 1, top_p 1, no top_k, prefill included on both sides",
            "command": f"python bench/gpu.py --only versus_hf --shapes {shape}"}


def write_checkpoint(shape, out, device):
    """A random checkpoint of `shape` in bf16 (rl.py loads it into fp32 master weights) and a
    word-level tokenizer of its vocabulary ("t0 t1 ..."), so that rl.py loads and decodes it like any model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    config = config_of(shape)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="t2"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="t1", pad_token="t0", unk_token="t2")
    tokenizer.save_pretrained(out)
    model = random_model(shape, device).to(torch.bfloat16)
    model.save_pretrained(out, tokenizer_dir=out)
    del model
    free_device_memory()
    return out


def write_problems(path, n, prompt_len, vocab):
    g = torch.Generator().manual_seed(0)
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(f"t{t}" for t in torch.randint(3, vocab, (prompt_len - 1,), generator=g).tolist())
            f.write(json.dumps({"id": f"gpu-{i}", "problem": words, "answer": "t3", "domain": "math",
                                "grading_kind": "toy"}) + "\n")
    return path


@contextlib.contextmanager
def patched(module, name, wrap):
    """module.name replaced by wrap(original) inside the block."""
    original = getattr(module, name)
    setattr(module, name, wrap(original))
    try:
        yield
    finally:
        setattr(module, name, original)


class Unsaved:
    """Stands in for the model rl.main saves at its end: the bench measures steps, and a 4B run's
    final checkpoint (fp32 weights and AdamW state, 48 GB) and model (16 GB) would fill the GPU
    machine's 64 GiB disk and take minutes to write. (rl.main still prints "saved".)"""

    def save_pretrained(self, path):
        pass


def rl_step(a, ceil, work, shape, name):
    """One measured step of rl.py (after one warm-up step) on a random checkpoint of `shape`, at the largest P
    the card holds, with the memory plan rl.py chose (its last memory.memory_need call is the setting it runs
    with) and the rows it trained (for the update's FLOPs)."""
    import rl
    from common import UserError
    ckpt, data = os.path.join(work, "checkpoint"), os.path.join(work, "problems.jsonl")
    argv = lambda P: ["--model", ckpt, "--data", data, "--out", os.path.join(work, "run"), "--schedule", "linear",
                      "--prefix-source", "noise", "--L", "8", "--prompts-per-step", str(P), "--group-size", str(a.group),
                      "--max-new-tokens", str(a.new_tokens), "--dtype", "bfloat16", "--steps", "2", "--lr", "1e-6",
                      "--micro-batch-size", "0", "--save-every", "0"]
    P, refusal = prompts_that_fit(a, shape, argv)
    if P is None:
        return {"shape": shape, "skipped": f"rl.py would refuse P = {a.prompts} to {max(a.prompts // 4, 1)}: {refusal}",
                "command": f"python bench/gpu.py --only {name}"}
    write_checkpoint(shape, ckpt, a.device)
    write_problems(data, 4 * P, a.prompt_len, config_of(shape).vocab_size)
    plans, updates = [], []

    def record_plan(memory_need):
        def wrapper(*args, **kwargs):
            settings = inspect.signature(memory_need).bind(*args, **kwargs)
            settings.apply_defaults()
            plans.append((settings.arguments, memory_need(*args, **kwargs)))
            return plans[-1][1]
        return wrapper

    def record_update(update_policy):
        def wrapper(model, opt, ref_model, r, args):
            trained = r.in_groups().tolist()
            prefix = [0 if p is None else p.shape[0] for p in r.train_prefixes()]
            updates.append({"rows": [(prefix[i] + len(r.problems[i]["prompt_ids"]) + len(r.completions[i]),
                                      len(r.completions[i])) for i in trained], "events": EVENTS.now()})
            return update_policy(model, opt, ref_model, r, args)
        return wrapper

    held = torch.cuda.memory_allocated() if a.cuda else None
    if a.cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        import memory

        def plan_on_any_device(plan_memory):       # rl.py plans on a GPU only; the smoke run plans on the CPU too
            def wrapper(args, config, rows, eval_rows, source, extra, world_size, device):
                return memory.rl_plan(args, config, rows, eval_rows, source, extra, world_size, device)
            return wrapper
        with patched(memory, "memory_need", record_plan), patched(rl, "update_policy", record_update), \
                patched(rl, "plan_memory", plan_on_any_device), \
                patched(rl, "checkpoint", lambda _: lambda *args, **kwargs: Unsaved()):
            rl.main(argv(P))
    except UserError as e:       # the memory model's refusal: no setting fits this GPU
        return {"shape": shape, "skipped": f"rl.py refused: {e}", "command": f"python bench/gpu.py --only {name}"}
    r = [json.loads(line) for line in open(os.path.join(work, "run", "metrics.jsonl"))][-1]
    c = config_of(shape)
    flops = update_flops(c, updates[-1]["rows"])
    step_s = r["time_generate"] + r["time_score"] + r["time_update"]
    settings, plan = plans[-1]
    padded, slots = decode_buckets(settings["gen_rows"], settings["gen_len"])
    peak = torch.cuda.max_memory_allocated() if a.cuda else None
    return {"shape": shape, "P": P, "G": a.group, "new_tokens": a.new_tokens, "step_s": step_s,
            "generate_s": r["time_generate"], "score_s": r["time_score"], "update_s": r["time_update"],
            "generate_share": r["time_generate"] / step_s, "gen_tokens_per_s": r["gen_tokens_per_s"],
            "trained_rows": len(updates[-1]["rows"]), "trained_positions": sum(T for T, _ in updates[-1]["rows"]),
            "update_tflop": flops / 1e12, "update_mfu": flops / r["time_update"] / ceil["matmul_flops_per_s"],
            "update_mfu_datasheet": flops / r["time_update"] / a.card["bf16_flops"],
            "micro_batch": settings["train_rows"], "activation_checkpointing": settings["checkpointing"],
            "predicted_peak_gib": plan["total"] / GiB, "measured_peak_gib": None if peak is None else peak / GiB,
            "measured_over_predicted": None if peak is None else peak / plan["total"],
            "reserved_peak_gib": torch.cuda.max_memory_reserved() / GiB if a.cuda else None,
            "held_before_gib": None if held is None else held / GiB,
            "memory_plan_gib": {k: v / GiB for k, v in plan.items() if k != "total"},
            # what generate() allocates on the compiled path for the rollouts, beside the plan's "KV caches held"
            "compiled_kv_cache_gib": padded * slots * kv_bytes_per_slot(c, 2) / GiB,
            # compilations or CUDA-graph recordings from the warm-up step's update on: the measured
            # step's time includes any of them
            "events_after_warmup_step": EVENTS.since(updates[-2]["events"]),
            "command": f"python bench/gpu.py --only {name}"}


def prompts_that_fit(a, shape, argv):
    """(the largest P of a.prompts, a.prompts / 2, a.prompts / 4 whose step rl.py's memory plan accepts on this card,
    as rl.py checks it before it loads anything; the last refusal): None if it refuses them all. rl_plan reads the
    flags and the prompts' length alone, so the checkpoint and problems need not exist yet."""
    import memory
    import rl
    from common import UserError
    refusal = None
    for P in dict.fromkeys(max(a.prompts // k, 1) for k in (1, 2, 4)):
        try:
            with contextlib.redirect_stdout(io.StringIO()):        # rl.py says its plan itself when it runs
                memory.rl_plan(rl.parser.parse_args(argv(P)), config_of(shape), [{"prompt_ids": [0] * a.prompt_len}], [],
                               SimpleNamespace(rows=lambda L: L), None, 1, torch.device(a.device))
            return P, None
        except UserError as e:
            refusal = str(e)
    return None, refusal


def fsdp(a, ceil, work):
    """The same two steps with --fsdp and without, under torchrun (every GPU here): equal weights.
    A check of the CUDA/NCCL paths, not a speed figure, so on a shape small enough to be quick."""
    from safetensors.torch import load_file
    shape, ranks = a.fsdp_shape, max(torch.cuda.device_count(), 1) if a.cuda else 2
    ckpt = write_checkpoint(shape, os.path.join(work, "checkpoint"), "cpu")
    data = write_problems(os.path.join(work, "problems.jsonl"), 32, 16, config_of(shape).vocab_size)
    weights = {}
    for name, flags in (("ddp", []), ("fsdp", ["--fsdp"])):
        out = os.path.join(work, f"run-{name}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               os.path.join(REPO, "rl.py"), "--model", ckpt, "--data", data, "--out", out, "--schedule", "linear",
               "--prefix-source", "noise", "--L", "2", "--prompts-per-step", str(2 * ranks), "--group-size", "4",
               "--max-new-tokens", "16", "--steps", "2", "--lr", "1e-3", "--save-every", "0", *flags]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                              timeout=a.deadline - time.time())
        if proc.returncode != 0:
            raise RuntimeError(f"{name} run failed: {proc.stderr[-2000:]}")
        weights[name] = load_file(os.path.join(out, "model", "model.safetensors"))
        shutil.rmtree(out)           # its checkpoint too: the next run's files take the room
    diff = max((weights["ddp"][k] - weights["fsdp"][k]).abs().max().item() for k in weights["ddp"])
    return {"shape": shape, "ranks": ranks, "max_abs_weight_difference": diff, "same": diff < 1e-4,
            "command": "python bench/gpu.py --only fsdp"}


def trl(a, ceil, work):
    try:
        import trl as _  # noqa: F401
    except ImportError:
        return {"skipped": "trl does not import (carry its wheels: docs/gpu.md)"}
    shape, P, G, new, prompt_len = a.rl_shape, *a.trl_sizes
    ckpt = write_checkpoint(shape, os.path.join(work, "checkpoint"), a.device)
    data = write_problems(os.path.join(work, "problems.jsonl"), 4 * P, prompt_len, config_of(shape).vocab_size)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench_rl_step.py"), "--model", ckpt,
                           "--data", data, "--prompts", str(P), "--group-size", str(G), "--max-new-tokens", str(new),
                           "--dtype", "bfloat16", "--steps", "1", "--warmup", "1"],
                          capture_output=True, text=True, cwd=REPO, timeout=a.deadline - time.time())
    line = [x for x in proc.stdout.splitlines() if x.startswith("JSON ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(proc.stderr[-1500:])
    r = json.loads(line[-1][5:])
    return {"shape": shape, "P": P, "G": G, "new_tokens": new, "ours_step_s": r["ours"]["step"],
            "trl_step_s": r["trl"]["step"], "trl_over_ours": r["trl"]["step"] / r["ours"]["step"],
            "command": f"python bench/bench_rl_step.py --model CKPT --data DATA --prompts {P} --group-size {G} "
                       f"--max-new-tokens {new} --dtype bfloat16"}


SECTIONS = {   # in the order they run: the figures the project's bars need first
    "ceilings": ceilings,
    "compile": compile_once,
    "decode": decode,
    "rl_step": lambda a, ceil, work: rl_step(a, ceil, work, a.rl_shape, "rl_step"),
    "rl_step_4b": lambda a, ceil, work: rl_step(a, ceil, work, a.rl_4b_shape, "rl_step_4b"),
    "versus_hf": versus_hf,
    "fsdp": fsdp,
    "trl": trl,
}
# Guessed seconds on an H200 (no GPU has run this yet; compile pays the 1.7B step's cold compile,
# decode the 4B one's): each result records the seconds it took, so the first run gives the numbers
# to put here. A section is started only if its guess fits in what is left of --budget.
ESTIMATE_S = {"ceilings": 10, "compile": 90, "decode": 150, "rl_step": 60, "rl_step_4b": 110, "versus_hf": 120,
              "fsdp": 60, "trl": 150}


# -----------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: every code path, no figures")
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    p.add_argument("--shapes", default=None, help="decode shapes (default: qwen3-1.7b,qwen3-4b)")
    p.add_argument("--batches", default=None, help="decode batch sizes (default: 1,64,256)")
    p.add_argument("--budget", type=float, default=450, help="seconds for every section together")
    p.add_argument("--out", default=None, help="directory for gpu.md and gpu.json (default: docs/results when "
                   "every section runs on a GPU; else printed only)")
    p.add_argument("--work", default=None, help="where sections write checkpoints and runs, each in a folder "
                   "deleted when it ends (default: the system's temporary directory)")
    a = p.parse_args(argv)
    unknown = set(a.only.split(",")) - set(SECTIONS) - {""}
    if unknown:
        p.error(f"--only: no section {', '.join(sorted(unknown))} (sections: {', '.join(SECTIONS)})")
    a.cuda = torch.cuda.is_available() and not a.smoke
    a.device = "cuda" if a.cuda else "cpu"
    # the card's datasheet figures, told apart by its memory (the smoke run takes the H100's: nothing there is a figure)
    a.card_name, a.card = card_of(torch.cuda.get_device_properties(0).total_memory if a.cuda else 0)
    tiny = a.smoke or not a.cuda
    a.shapes = (a.shapes or ("tiny" if tiny else "qwen3-1.7b,qwen3-4b")).split(",")
    a.batches = [int(b) for b in (a.batches or ("1,4" if tiny else "1,64,256")).split(",")]
    a.prompt_len, a.new_tokens, a.hf_batch, a.repeats = (16, 32, 4, 2) if tiny else (512, 512, 64, 2)
    a.prompts, a.group = (2, 2) if tiny else (32, 8)
    a.trl_sizes = (2, 2, 8, 16) if tiny else (8, 8, 128, 128)    # P, G, new tokens, prompt: fits both sides whole
    a.rl_shape, a.rl_4b_shape = ("tiny", "tiny") if tiny else ("qwen3-1.7b", "qwen3-4b")
    a.fsdp_shape = "tiny" if tiny else "small"
    a.warmup_s = 0.2 if tiny else 1.0
    # the ceilings always run first: the other figures are fractions of them
    a.only = [s for s in SECTIONS if s in a.only.split(",") or s == "ceilings"]
    a.out = a.out or (os.path.join(REPO, "docs", "results") if a.cuda and a.only == list(SECTIONS) else None)
    return a


def main(argv=None):
    a = parse_args(argv)
    from common import compute_init
    compute_init()           # the CUDA settings rl.py runs under (TF32, no cuDNN attention)
    with cpu_stand_ins(a):
        return run_sections(a)


@contextlib.contextmanager
def cpu_stand_ins(a):
    """Without a GPU: generate()'s compiled path with dynamo's eager backend (dynamo traces the step
    whole, as on a GPU, without a C++ toolchain's minutes of inductor), on one thread (tiny shapes: a
    second only adds synchronisation, and on a shared machine its spinning made each step a hundred
    times slower). Undone afterwards, for a caller in the same process."""
    if a.cuda:
        yield
        return
    step, threads, omp = model_module.compiled_decode_step, torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    model_module.compiled_decode_step = functools.cache(
        lambda device_type: torch.compile(_decode_step, backend="eager", fullgraph=True, dynamic=True))
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"                          # the subprocesses too
    try:
        yield
    finally:
        model_module.compiled_decode_step = step
        torch.set_num_threads(threads)
        os.environ.pop("OMP_NUM_THREADS") if omp is None else os.environ.update(OMP_NUM_THREADS=omp)


def run_sections(a):
    started = time.time()
    a.deadline = started + a.budget
    root = tempfile.mkdtemp(prefix="nanopalette-gpu-", dir=a.work)
    env = {"device": torch.cuda.get_device_name() if a.cuda else f"CPU ({os.cpu_count()} cores)", "card": a.card_name,
           "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": a.smoke, "budget_s": a.budget,
           "disk_free_gib": shutil.disk_usage(root).free / GiB}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    results = {}
    report = {"environment": env, "results": results}
    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        for name in a.only:
            left = a.deadline - time.time()
            if a.cuda and ESTIMATE_S[name] > left:
                results[name] = {"skipped": f"{left:.0f} s of the budget left, the section takes about {ESTIMATE_S[name]} s"}
            else:
                results[name] = run_section(name, a, results.get("ceilings"), os.path.join(root, name))
            env["seconds"] = time.time() - started
            write(report, a.out)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        shutil.rmtree(root, ignore_errors=True)
    print(markdown(report))
    print("JSON " + json.dumps(report, default=str))
    for name, reason in failures(report):
        print(f"FAILED {name}: {reason}", file=sys.stderr)
    return report


def failures(report):
    """(section, reason) of every failed or stopped row: any makes bench/gpu.sh exit with status 1."""
    return [(name, row.get("failed") or row["stopped"]) for name, value in report["results"].items()
            for row in (value if isinstance(value, list) else [value]) if "failed" in row or "stopped" in row]


def run_section(name, a, ceil, work):
    """One section in a folder of its own, deleted after it (the GPU machine has 64 GiB of disk);
    an exception is recorded as the section's failure, so one broken figure costs no other."""
    os.makedirs(work)
    t0 = time.time()
    signal.setitimer(signal.ITIMER_REAL, max(a.deadline - t0, 1e-3))
    try:
        result = SECTIONS[name](a, ceil, work)
    except Exception as e:
        result = {"failed": f"{type(e).__name__}: {e}"[-2000:]}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        written = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(work) for f in files)
        shutil.rmtree(work)
        free_device_memory()
    for row in result if isinstance(result, list) else [result]:
        row.update(seconds=time.time() - t0, disk_gib=written / GiB)
    print(f"{name}: {time.time() - t0:.1f} s", flush=True)
    return result


def write(report, out):
    """gpu.json and gpu.md as they stand, each replaced whole (a run killed mid-write keeps the last)."""
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    for file, text in (("gpu.json", json.dumps(report, indent=2, default=str)), ("gpu.md", markdown(report))):
        with open(os.path.join(out, file + ".tmp"), "w") as f:
            f.write(text)
        os.replace(os.path.join(out, file + ".tmp"), os.path.join(out, file))


def fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {fmt(x)}" for k, x in v.items())
    return str(v)


def markdown(report):
    env, r = report["environment"], report["results"]
    lines = [f"# GPU figures\n\n{env['device']} (datasheet figures: {env.get('card')}), torch {env['torch']} "
             f"(CUDA {env['cuda']}), transformers {env.get('transformers')}; {env.get('seconds', 0):.0f} s so far of a {env['budget_s']:.0f} s budget. "
             "Written by `bash bench/gpu.sh`"
             + (" --smoke (tiny shapes on the CPU: no figure here means anything)" if env["smoke"] else "")
             + f", after each section; sections not listed have not run. {env['disk_free_gib']:.0f} GiB of disk free "
             "at the start.\n"]
    for name, value in r.items():
        rows = value if isinstance(value, list) else [value]
        keys = list(dict.fromkeys(k for row in rows for k in row))
        lines.append(f"## {name}\n")
        lines.append("| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
        lines += ["| " + " | ".join(fmt(row.get(k, "")) for k in keys) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(1 if failures(main()) else 0)
