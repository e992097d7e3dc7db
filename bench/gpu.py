r"""Every GPU figure of the project in one command, within about 8 minutes on one H200:

    bash bench/gpu.sh                # -> docs/results/gpu.md and gpu.json (needs CUDA)
    bash bench/gpu.sh --smoke        # the same code paths at tiny shapes on the CPU (< 2 minutes;
                                     # tests/test_gpu_bench.py runs it), into a temporary directory
    python bench/gpu.py --only decode --shapes qwen3-1.7b --batches 1,64    # one figure alone

The figures, each section timed against what is left of --budget seconds (a section that would
not fit is recorded as skipped, never half run):
  ceilings    device-to-device copy bandwidth and a bf16 matrix product's rate, measured here:
              the roofline and MFU below use these, beside the datasheet's 4.8 TB/s and 989 TFLOP/s
  decode      generate() with the static decode step compiled once (CUDA graphs), random bf16
              weights of the Qwen3-1.7B and -4B shapes, 512-token prompts, 512 new tokens, batch
              1, 64 and 256: prefill time apart (a 1-token generate), decode tokens/s, and decode
              as a fraction of the memory-bandwidth roofline (every weight and the KV cache read
              once per step)
  versus_hf   ours against transformers' generate() with its static cache and torch.compile, batch
              64, same weights and settings, alternated in one run
  compile     the static decode step: compiled graphs and recompiles over several generate() calls
              (must be 1 and 0)
  rl_step     one rl.py step at P = 32, G = 8, 512 new tokens on the Qwen3-1.7B shape: generation /
              scoring / update split, update MFU, peak memory
  rl_step_4b  one full-parameter rl.py step on the Qwen3-4B shape: time and peak memory
  fsdp        rl.py --fsdp against DDP under torchrun (one rank per GPU here): weights after two steps
  trl         bench/bench_rl_step.py against TRL's GRPOTrainer on the 1.7B shape, if trl imports

Random weights decode random tokens, so rewards are 0 and completions run to the token limit: the
worst case for time, which is what these figures are about. Nothing here is needed but torch,
transformers, safetensors, tokenizers and tqdm (the GPU image has them); docs/gpu.md says which
wheels to carry for the trl figure. It runs on torch 2.11 (the GPU image's) as on 2.13.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from model import ModelConfig, Transformer, _decode_step, generate  # noqa: E402

SHAPES = {   # Qwen3's published sizes; "tiny" is the smoke test's, "small" a CPU-sized one
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64, vocab_size=4096),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936),
}
DATASHEET = {"bandwidth": 4.8e12, "bf16_flops": 989e12}       # H200 SXM; measured ceilings are used
SECTIONS = ("ceilings", "decode", "versus_hf", "compile", "rl_step", "rl_step_4b", "fsdp", "trl")


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


def random_model(shape, device, dtype):
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(config_of(shape))
    model.init_weights()
    return model.to(dtype).eval()


def weight_bytes(config, dtype_bytes):
    """Bytes of every weight one decode step reads (the tied lm_head once)."""
    c = config
    per_layer = c.hidden_size * c.head_dim * 2 * (c.num_attention_heads + c.num_key_value_heads) \
        + 3 * c.hidden_size * c.intermediate_size
    return (c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size) * dtype_bytes


def kv_bytes_per_token(config, dtype_bytes):
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype_bytes


# -----------------------------------------------------------------------------
# The sections: each returns a dict of figures, with the command that gives it alone

def ceilings(a):
    n = (1 << 28) if a.cuda else (1 << 22)                     # 512 MiB of bf16 on the GPU
    x = torch.randn(n, device=a.device, dtype=a.dtype)
    y = torch.empty_like(x)
    y.copy_(x)
    t, _ = timed(lambda: [y.copy_(x) for _ in range(10)])
    size = 8192 if a.cuda else 256
    m = torch.randn(size, size, device=a.device, dtype=a.dtype)
    m @ m
    tm, _ = timed(lambda: [m @ m for _ in range(10)])
    return {"copy_bytes_per_s": 10 * 2 * x.numel() * x.element_size() / t,
            "matmul_flops_per_s": 10 * 2 * size ** 3 / tm}


def decode(a, ceil):
    rows = []
    for shape in a.shapes:
        model = random_model(shape, a.device, a.dtype)
        for batch in a.batches:
            prompts = torch.randint(3, model.config.vocab_size, (batch, a.prompt_len)).tolist()
            run = lambda n: generate(model, prompts, max_new_tokens=n, temperature=0, static=True)
            run(1), run(a.new_tokens)                           # warm up; compile and capture at this shape
            prefill = statistics.median(timed(lambda: run(1))[0] for _ in range(a.repeats))
            total = statistics.median(timed(lambda: run(a.new_tokens))[0] for _ in range(a.repeats))
            decode_s = total - prefill
            tokens_per_s = batch * (a.new_tokens - 1) / decode_s
            context = a.prompt_len + a.new_tokens / 2          # the mean context over the decode
            step_bytes = weight_bytes(model.config, a.dtype_bytes) + batch * context * kv_bytes_per_token(
                model.config, a.dtype_bytes)
            roofline = batch * ceil["copy_bytes_per_s"] / step_bytes
            rows.append({"shape": shape, "batch": batch, "prefill_s": prefill, "decode_s": decode_s,
                         "decode_tokens_per_s": tokens_per_s, "roofline_tokens_per_s": roofline,
                         "roofline_fraction": tokens_per_s / roofline,
                         "datasheet_roofline_fraction": tokens_per_s * step_bytes / batch / DATASHEET["bandwidth"],
                         "command": f"python bench/gpu.py --only decode --shapes {shape} --batches {batch}"})
        del model
        torch.cuda.empty_cache() if a.cuda else None
    return rows


def versus_hf(a, ceil):
    from transformers import AutoConfig, AutoModelForCausalLM
    shape, batch = a.shapes[0], a.hf_batch
    ours = random_model(shape, a.device, a.dtype)
    hf_config = AutoConfig.for_model(**{k: v for k, v in ours.config.to_hf().items()
                                        if k not in ("architectures", "torch_dtype")})
    hf = AutoModelForCausalLM.from_config(hf_config, dtype=a.dtype).to(a.device).eval()
    hf.load_state_dict(ours.state_dict(), strict=False)
    if a.cuda:
        hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
    prompts = torch.randint(3, ours.config.vocab_size, (batch, a.prompt_len), device=a.device)
    mask = torch.ones_like(prompts)

    def run_ours():
        return generate(ours, prompts.tolist(), max_new_tokens=a.new_tokens, temperature=0, static=True)

    def run_hf():
        with torch.inference_mode():
            return hf.generate(prompts, attention_mask=mask, do_sample=False, max_new_tokens=a.new_tokens,
                               min_new_tokens=a.new_tokens, cache_implementation="static", pad_token_id=0)
    run_ours(), run_hf()                                        # compile both
    times = {"ours": [], "transformers": []}
    for _ in range(a.repeats):                                  # alternate the two
        times["ours"].append(timed(run_ours)[0])
        times["transformers"].append(timed(run_hf)[0])
    tok = lambda side: batch * a.new_tokens / statistics.median(times[side])
    return {"shape": shape, "batch": batch, "ours_tokens_per_s": tok("ours"),
            "transformers_tokens_per_s": tok("transformers"), "ratio": tok("ours") / tok("transformers"),
            "command": f"python bench/gpu.py --only versus_hf --shapes {shape}"}


def compile_once(a, ceil):
    """The static decode step over several generate() calls at one shape: one graph, no recompiles.
    On a GPU this is generate()'s own compiled step; elsewhere the same step is compiled here with
    the eager backend (dynamo still traces it whole, so graph breaks and recompiles would show)."""
    import torch._dynamo
    import model as model_module
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model_module._compiled_decode_step = None if a.cuda else \
        torch.compile(_decode_step, backend="eager", fullgraph=True)
    model = random_model(a.shapes[0], a.device, a.dtype)
    prompts = torch.randint(3, model.config.vocab_size, (a.hf_batch, a.prompt_len)).tolist()
    for _ in range(3):
        if a.cuda:
            generate(model, prompts, max_new_tokens=a.new_tokens, temperature=0, static=True)
        else:
            static_decode(model, prompts, a.new_tokens, model_module._compiled_decode_step)
    graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])   # a recompile adds one
    return {"graphs": graphs, "recompiles": graphs - 1, "generate_calls": 3,
            "compiled_by": "generate()" if a.cuda else "this bench (eager backend, CPU)",
            "command": "python bench/gpu.py --only compile"}


@torch.inference_mode()
def static_decode(model, prompts, new_tokens, step):
    """generate()'s static decode loop on the CPU with a given compiled step (see compile_once)."""
    from model import KVCache, embed_rows
    embeds, mask = embed_rows(model, prompts)
    cache = KVCache(model.config, len(prompts), embeds.shape[1] + new_tokens, embeds.device, embeds.dtype)
    logits = model.lm_head(model.hidden_states(embeds, mask, kv_cache=cache)[:, -1])
    cache.static = True
    for _ in range(new_tokens - 1):
        logits = step(model, logits.argmax(-1), cache)


def write_checkpoint(shape, out, dtype):
    """A random checkpoint of `shape` and a word-level tokenizer of its vocabulary ("t0 t1 ..."),
    so that rl.py loads and decodes it like any model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    config = config_of(shape)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="t2"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="t1", pad_token="t0", unk_token="t2")
    tokenizer.save_pretrained(out)
    model = random_model(shape, "cpu", dtype)
    model.save_pretrained(out, tokenizer_dir=out)
    return out


def write_problems(path, n, prompt_len, vocab):
    g = torch.Generator().manual_seed(0)
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(f"t{t}" for t in torch.randint(3, vocab, (prompt_len - 1,), generator=g).tolist())
            f.write(json.dumps({"id": f"gpu-{i}", "problem": words, "answer": "t3", "domain": "math",
                                "grading_kind": "toy"}) + "\n")
    return path


def rl_step(a, ceil, shape=None, tmp=None, extra=(), name="rl_step"):
    """One measured step of rl.py (after one warm-up step) on a random checkpoint of `shape`."""
    import rl
    shape = shape or a.rl_shape
    ckpt = write_checkpoint(shape, os.path.join(tmp, f"ckpt-{shape}"), a.dtype)
    data = write_problems(os.path.join(tmp, f"problems-{shape}.jsonl"), 4 * a.prompts, a.prompt_len,
                          config_of(shape).vocab_size)
    out = os.path.join(tmp, f"rl-{shape}-{len(os.listdir(tmp))}")
    torch.cuda.reset_peak_memory_stats() if a.cuda else None
    rl.main(["--model", ckpt, "--data", data, "--out", out, "--schedule", "linear", "--prefix-source", "noise",
             "--L", "8", "--prompts-per-step", str(a.prompts), "--group-size", str(a.group), "--max-new-tokens",
             str(a.new_tokens), "--dtype", a.dtype_name, "--steps", "2", "--lr", "1e-6", "--micro-batch-size",
             str(a.micro), "--save-every", "0", "--eval-every", "0", "--sample-every", "0", *extra])
    r = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][-1]
    c = config_of(shape)
    rollouts = a.prompts * a.group
    tokens = rollouts * (a.prompt_len + 8 * r["rho"] + r["completion_len"])        # every position trained
    params = weight_bytes(c, 1) - c.vocab_size * c.hidden_size                       # non-embedding weights
    flops = 6 * params * tokens + 6 * c.vocab_size * c.hidden_size * rollouts * r["completion_len"] \
        + 6 * c.num_hidden_layers * c.hidden_size * rollouts * (tokens / rollouts) ** 2   # attention, causal
    step_s = r["time_generate"] + r["time_score"] + r["time_update"]
    return {"shape": shape, "P": a.prompts, "G": a.group, "new_tokens": a.new_tokens, "step_s": step_s,
            "generate_s": r["time_generate"], "score_s": r["time_score"], "update_s": r["time_update"],
            "generate_share": r["time_generate"] / step_s,
            "update_mfu": flops / r["time_update"] / ceil["matmul_flops_per_s"],
            "update_mfu_datasheet": flops / r["time_update"] / DATASHEET["bf16_flops"],
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if a.cuda else None,
            "command": f"python bench/gpu.py --only {name}"}


def fsdp(a, ceil, tmp):
    """The same two steps with --fsdp and without, under torchrun (every GPU here): equal weights."""
    from safetensors.torch import load_file
    shape, ranks = a.fsdp_shape, max(torch.cuda.device_count(), 1) if a.cuda else 2
    ckpt = write_checkpoint(shape, os.path.join(tmp, "ckpt-fsdp"), torch.float32)
    data = write_problems(os.path.join(tmp, "problems-fsdp.jsonl"), 32, 16, config_of(shape).vocab_size)
    weights = {}
    for name, flags in (("ddp", []), ("fsdp", ["--fsdp"])):
        out = os.path.join(tmp, f"run-{name}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               os.path.join(REPO, "rl.py"), "--model", ckpt, "--data", data, "--out", out, "--schedule", "linear",
               "--prefix-source", "noise", "--L", "2", "--prompts-per-step", str(2 * ranks), "--group-size", "4",
               "--max-new-tokens", "16", "--steps", "2", "--lr", "1e-3", "--warmup-steps", "0", "--save-every", "0",
               "--eval-every", "0", "--sample-every", "0", *flags]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if proc.returncode != 0:
            raise RuntimeError(f"{name} run failed: {proc.stderr[-2000:]}")
        weights[name] = load_file(os.path.join(out, "model", "model.safetensors"))
    diff = max((weights["ddp"][k] - weights["fsdp"][k]).abs().max().item() for k in weights["ddp"])
    return {"shape": shape, "ranks": ranks, "max_abs_weight_difference": diff, "same": diff < 1e-4,
            "command": "python bench/gpu.py --only fsdp"}


def trl(a, ceil, tmp):
    try:
        import trl as _  # noqa: F401
    except ImportError:
        return {"skipped": "trl does not import (carry its wheels: docs/gpu.md)"}
    shape = a.rl_shape
    ckpt = write_checkpoint(shape, os.path.join(tmp, "ckpt-trl"), a.dtype)
    data = write_problems(os.path.join(tmp, "problems-trl.jsonl"), 4 * a.prompts, a.prompt_len, config_of(shape).vocab_size)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench_rl_step.py"), "--model", ckpt,
                           "--data", data, "--prompts", str(a.prompts), "--group-size", str(a.group),
                           "--max-new-tokens", str(a.new_tokens), "--dtype", a.dtype_name, "--steps", "1",
                           "--warmup", "1"], capture_output=True, text=True, cwd=REPO)
    line = [x for x in proc.stdout.splitlines() if x.startswith("JSON ")]
    if proc.returncode != 0 or not line:
        return {"failed": proc.stderr[-1500:]}
    r = json.loads(line[-1][5:])
    return {"ours_step_s": r["ours"]["step"], "trl_step_s": r["trl"]["step"], "trl_over_ours": r["trl"]["step"] / r["ours"]["step"],
            "command": f"python bench/bench_rl_step.py --model CKPT --data DATA --prompts {a.prompts} --group-size {a.group} "
                       f"--max-new-tokens {a.new_tokens} --dtype {a.dtype_name}"}


# -----------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: every code path, no figures")
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    p.add_argument("--shapes", default=None, help="decode shapes (default: qwen3-1.7b,qwen3-4b)")
    p.add_argument("--batches", default=None, help="decode batch sizes (default: 1,64,256)")
    p.add_argument("--budget", type=float, default=450, help="seconds for every section together")
    p.add_argument("--out", default=None, help="directory for gpu.md and gpu.json (default: docs/results on a "
                   "GPU, a temporary directory otherwise)")
    a = p.parse_args(argv)
    a.cuda = torch.cuda.is_available() and not a.smoke
    a.device = "cuda" if a.cuda else "cpu"
    a.dtype, a.dtype_name, a.dtype_bytes = (torch.bfloat16, "bfloat16", 2) if a.cuda else (torch.float32, "float32", 4)
    tiny = a.smoke or not a.cuda
    a.shapes = (a.shapes or ("tiny" if tiny else "qwen3-1.7b,qwen3-4b")).split(",")
    a.batches = [int(b) for b in (a.batches or ("1,4" if tiny else "1,64,256")).split(",")]
    a.prompt_len, a.new_tokens, a.hf_batch, a.repeats = (16, 8, 4, 2) if tiny else (512, 512, 64, 3)
    a.prompts, a.group, a.micro = (2, 2, 4) if tiny else (32, 8, 32)
    a.rl_shape, a.rl_4b_shape, a.fsdp_shape = ("tiny",) * 3 if tiny else ("qwen3-1.7b", "qwen3-4b", "qwen3-1.7b")
    a.only = [s for s in a.only.split(",") if s]
    a.out = a.out or (os.path.join(REPO, "docs", "results") if a.cuda and a.only == list(SECTIONS) else None)
    return a


ESTIMATE_S = {"ceilings": 5, "decode": 200, "versus_hf": 70, "compile": 40, "rl_step": 60, "rl_step_4b": 60,
              "fsdp": 40, "trl": 90}       # seconds each section took, at most, on an H200 (before: guesses)


def main(argv=None):
    a = parse_args(argv)
    started, results = time.time(), {}
    env = {"device": torch.cuda.get_device_name() if a.cuda else f"CPU ({os.cpu_count()} cores)",
           "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": a.smoke}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        results["ceilings"] = ceil = ceilings(a)
        jobs = {"decode": lambda: decode(a, ceil), "versus_hf": lambda: versus_hf(a, ceil),
                "compile": lambda: compile_once(a, ceil), "rl_step": lambda: rl_step(a, ceil, tmp=tmp),
                "rl_step_4b": lambda: rl_step(a, ceil, a.rl_4b_shape, tmp, ["--micro-batch-size", str(max(a.micro // 2, 1))],
                                              "rl_step_4b"),
                "fsdp": lambda: fsdp(a, ceil, tmp), "trl": lambda: trl(a, ceil, tmp)}
        for name in [s for s in SECTIONS if s in a.only and s != "ceilings"]:
            left = a.budget - (time.time() - started)
            if a.cuda and ESTIMATE_S[name] > left:
                results[name] = {"skipped": f"{left:.0f} s of the budget left, the section takes about {ESTIMATE_S[name]} s"}
                continue
            t0 = time.time()
            try:
                results[name] = jobs[name]()
            except Exception as e:        # one broken figure must not cost the others: say what broke
                results[name] = {"failed": f"{type(e).__name__}: {e}"[-2000:]}
            print(f"{name}: {time.time() - t0:.1f} s", flush=True)
    env["seconds"] = time.time() - started
    report = {"environment": env, "results": results}
    text = markdown(report)
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "gpu.json"), "w") as f:
            json.dump(report, f, indent=2, default=str)
        with open(os.path.join(a.out, "gpu.md"), "w") as f:
            f.write(text)
    print("JSON " + json.dumps(report, default=str))
    return report


def markdown(report):
    env, r = report["environment"], report["results"]
    lines = [f"# GPU figures\n\n{env['device']}, torch {env['torch']} (CUDA {env['cuda']}), transformers "
             f"{env.get('transformers')}; {env['seconds']:.0f} s in all. Written by `bash bench/gpu.sh`"
             + (" --smoke (tiny shapes on the CPU: no figure here means anything)" if env["smoke"] else "") + ".\n"]
    c = r["ceilings"]
    lines.append(f"Ceilings measured here: copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matrix product "
                 f"{c['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s.\n")
    for name in SECTIONS[1:]:
        if name not in r:
            continue
        rows = r[name] if isinstance(r[name], list) else [r[name]]
        lines.append(f"## {name}\n")
        keys = list(dict.fromkeys(k for row in rows for k in row))
        lines.append("| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
        lines += ["| " + " | ".join(fmt(row.get(k, "")) for k in keys) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
