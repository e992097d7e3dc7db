"""The memory model (memory.memory_need) against what the code really holds: the bytes autograd
saves per token and layer, counted tensor by tensor, for every family in fp32 and under bf16
autocast; a training step's measured peak memory on the CPU for three shapes, with and without
activation checkpointing (within 25%), and a generation's; the start-up choice of micro-batch and
checkpointing and the one-line refusal; and every GPU command of the README and the stages'
docstrings fits the hardware it names.

Run:  python -m pytest tests/test_memory.py -q        (about a minute on two cores)
"""
import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

import evaluate
import memory
import rl
import sft_warmup
from common import UserError
from memory import activation_bytes, memory_need, parameter_count
from model import ModelConfig, Transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def test_parameter_count_is_the_models():
    for family in FAMILIES:
        for tied in (False, True):
            config = small(family, tie_word_embeddings=tied)
            assert parameter_count(config) == sum(p.numel() for p in Transformer(config).parameters()), (family, tied)



def test_the_reference_model_is_counted_in_the_dtype_rl_loads_it_in():
    """rl.py's KL reference is fp32 (the policy's path under autocast), bf16 only under --fsdp."""
    config = small("qwen3")
    for bf16, fsdp, nbytes in ((False, False, 4), (True, False, 4), (True, True, 2)):
        assert memory_need(config, bf16, 2, fsdp, ref=True)["reference model"] == nbytes * parameter_count(config)

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
    print(json.dumps({"measured": measured, "predicted": need["total"] - need["weights"]}))
'''


def test_the_memory_model_predicts_measured_peaks_on_the_cpu(tmp_path):
    """Three shapes (two families, vocabularies of 2K to 32K), each with and without activation
    checkpointing: the predicted peak of a training step (weights, gradients, AdamW, activations,
    the logits chunk) within 25% of the measured one; and a generation's KV cache and decoding
    buffers within 25% too."""
    shapes = [(dict(model_type="qwen3", vocab_size=2000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64), 8, 512),
              (dict(model_type="llama", vocab_size=32000, hidden_size=192, intermediate_size=512, num_hidden_layers=3,
                    num_attention_heads=6, num_key_value_heads=2, head_dim=32), 4, 384),
              (dict(model_type="qwen3", vocab_size=8000, hidden_size=384, intermediate_size=1024, num_hidden_layers=2,
                    num_attention_heads=6, num_key_value_heads=3, head_dim=64), 6, 640)]
    runs = [("train", dict(config, max_position_embeddings=2048), rows, T, ckpt) for config, rows, T in shapes
            for ckpt in (False, True)] + [("generate", dict(shapes[0][0], max_position_embeddings=2048), 64, 256, 256)]
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
        assert all(peaks[2 * i + 1][key] < peaks[2 * i][key] for i in range(3)), key


# -- the start-up choice ------------------------------------------------------------------------------

@pytest.mark.parametrize("free_gib, expected", [(64, (32, False)), (6, (32, True)), (2.5, (8, True)), (1.2, None)])
def test_defaults_take_the_first_setting_that_fits(monkeypatch, capsys, free_gib, expected):
    """--micro-batch-size 0 and --activation-checkpointing auto: the first of (32, off), (32, on),
    (16, off), ... whose plan fits is taken, and said; none fitting is one line naming the flags.
    (This model needs 12.1 GiB at (32, off), 4.2 at (32, on), 2.4 at (8, on), 1.35 at (1, on).)"""
    config = small("qwen3", hidden_size=512, intermediate_size=1536, num_hidden_layers=8, vocab_size=32000)
    need = lambda m, c: memory_need(config, train_rows=m, train_len=1024, checkpointing=c)
    free = free_gib * 2**30
    monkeypatch.setattr(memory, "free_memory", lambda device: free)
    order = [(m, c) for m in (32, 16, 8, 4, 2, 1) for c in (False, True)]
    if expected is None:
        assert all(need(*setting)["total"] > free for setting in order)
        with pytest.raises(UserError, match=r"a rank needs .* GiB \(weights .*\) at --micro-batch-size 1, more than the "
                                            r"1.2 GiB free; lower --micro-batch-size or --max-tokens"):
            memory.fit_memory(need, torch.device("cpu"), 0, "auto", "--max-tokens")
        return
    chosen = memory.fit_memory(need, torch.device("cpu"), 0, "auto", "--max-tokens")
    assert chosen == expected
    assert need(*chosen)["total"] <= free
    assert all(need(*earlier)["total"] > free for earlier in order[:order.index(chosen)])
    assert f"micro-batch {chosen[0]}, activation checkpointing {'on' if chosen[1] else 'off'}" in capsys.readouterr().out
    if chosen == (32, False):
        return
    with pytest.raises(UserError, match=r"a rank needs .* GiB \(weights .*\) at --micro-batch-size 32, more than the "
                                        r".* GiB free; lower --micro-batch-size or --max-tokens, or use --activation-checkpointing"):
        memory.fit_memory(need, torch.device("cpu"), 32, "off", "--max-tokens")


# -- every GPU command the project documents fits the hardware it names -------------------------------

QWEN3 = {"1.7": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
         "4": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
         "8": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)}     # Qwen3's published sizes
PROMPT = 512      # tokens: longer than GSM8K's and most MATH prompts under the math template
HARDWARE = re.compile(r"(one|\d+) GPUs? of (\d+) GB")


def documented_commands():
    """(source, hardware line, command) of every command in the README and the docstrings that names
    the GPUs it runs on (in the text just before it) and a stage script."""
    texts = {"README.md": open(os.path.join(REPO, "README.md")).read(),
             "docs/fsdp.md": open(os.path.join(REPO, "docs", "fsdp.md")).read()}
    texts.update({f"{m.__name__}.py": m.__doc__ for m in (rl, sft_warmup, evaluate)})
    texts["infer.py"] = open(os.path.join(REPO, "infer.py")).read().split('"""')[1]
    found = []
    for source, text in texts.items():
        lines, hardware = text.splitlines(), None
        for i, line in enumerate(lines):
            if HARDWARE.search(line) and not re.search(r"^\s*(torchrun|python) ", line):
                hardware = line
            elif re.match(r"\s*(torchrun .*|python )(rl|sft_warmup|evaluate|infer)\.py", line) and hardware:
                command = line
                while command.rstrip().endswith("\\"):
                    i += 1
                    command = command.rstrip()[:-1] + " " + lines[i].strip()
                found.append((source, hardware, command.strip()))
                hardware = None
    return found


def test_the_documented_commands_are_found():
    scripts = {re.search(r"(\w+)\.py", c).group(1) for _, _, c in documented_commands()}
    assert scripts >= {"rl", "sft_warmup", "evaluate", "infer"}
    assert len(documented_commands()) >= 8


@pytest.mark.parametrize("source, hardware, command", documented_commands(), ids=lambda v: str(v)[:60])
def test_every_documented_gpu_command_fits_the_hardware_it_names(monkeypatch, source, hardware, command):
    gpus, gb = HARDWARE.search(hardware).groups()
    world = 1 if gpus == "one" else int(gpus)
    size = re.search(r"qwen3-?(1\.7|4|8)b", hardware + command, re.IGNORECASE).group(1)
    config = ModelConfig(model_type="qwen3", vocab_size=151936, max_position_embeddings=40960, **QWEN3[size])
    # the GPU's memory less CUDA's own, about 2 GiB
    monkeypatch.setattr(memory, "free_memory", lambda device: int(gb) * 10**9 - 2 * 2**30)
    argv = shlex.split(command.split(".py", 1)[1])
    device = torch.device("cuda")
    script = re.search(r"(\w+)\.py", command).group(1)
    if script == "rl":
        args = rl.parser.parse_args(argv)
        source = SimpleNamespace(rows=lambda L: L)                       # a prefix of L rows
        memory.rl_plan(args, config, [{"prompt_ids": [0] * PROMPT}], [], source, None, world, device)
    elif script == "sft_warmup":
        args = sft_warmup.parser.parse_args(argv)
        memory.sft_plan(args, config, world, args.max_tokens + args.L, device)
    else:
        module = evaluate if script == "evaluate" else __import__("infer")
        args = module.parser.parse_args(argv)
        rows = args.batch_size if script == "evaluate" else min(args.batch_size, args.num_latents)
        memory.check_generation(config, args.dtype == "bfloat16", rows, PROMPT + args.L, args.max_new_tokens, device)
