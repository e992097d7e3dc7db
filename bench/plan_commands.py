"""The memory model's plan for every GPU command the project documents (README.md, docs/fsdp.md and the
stages' docstrings), on an 80 GB card (H100) and a 141 GB card (H200), one GPU or per GPU of 8 as the
command names: the planned peak per GPU of the setting the model chooses (or, where it refuses, of the
last one it tried) and whether it fits. docs/gpu.md's table is this script's output:

    python bench/plan_commands.py            # a markdown table, one row per command and card

It calls what the stages call at start-up (memory.rl_plan, sft_plan, check_generation) with the free
memory of the card, so the same code decides here and in a run. Free memory is taken as the card's
nominal GB (10^9 bytes) less 2 GiB for CUDA's context and NCCL, below the ~79.1 and ~139.8 GiB torch
reports, so a "fits" here leaves that much more room. Prompts are taken as 512 tokens (longer than
GSM8K's and most MATH prompts under the math template); no --eval-data, as in the commands.
tests/test_memory.py runs every command through the same functions.
"""

import contextlib
import io
import os
import re
import shlex
import sys
from types import SimpleNamespace

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import evaluate  # noqa: E402
import infer  # noqa: E402
import memory  # noqa: E402
import rl  # noqa: E402
import sft_warmup  # noqa: E402
from common import UserError  # noqa: E402
from model import ModelConfig  # noqa: E402

QWEN3 = {"1.7": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
         "4": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
         "8": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)}     # Qwen3's published sizes
CARDS = {"H100 80 GB": 80, "H200 141 GB": 141}
PROMPT = 512
HARDWARE = re.compile(r"(one|\d+) GPUs? of (\d+) GB")
GiB = 2**30


def documented_commands():
    """(source, hardware line, command) of every command in the README, docs/fsdp.md and the stages'
    docstrings that names the GPUs it runs on (in the text just before it) and a stage script."""
    read = lambda *path: open(os.path.join(REPO, *path)).read()
    texts = {"README.md": read("README.md"), "docs/fsdp.md": read("docs", "fsdp.md")}
    texts.update({f"{m.__name__}.py": m.__doc__ for m in (rl, sft_warmup, evaluate)})
    texts["infer.py"] = read("infer.py").split('"""')[1]
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


def world_of(hardware):
    gpus = HARDWARE.search(hardware).group(1)
    return 1 if gpus == "one" else int(gpus)


def config_of(hardware, command):
    size = re.search(r"qwen3-?(1\.7|4|8)b", hardware + command, re.IGNORECASE).group(1)
    return size, ModelConfig(model_type="qwen3", vocab_size=151936, max_position_embeddings=40960, **QWEN3[size])


def check(command, config, world, free):
    """What the command's stage checks at start-up, on a GPU with `free` bytes: raises UserError where
    the memory model refuses it."""
    saved = memory.free_memory
    memory.free_memory = lambda device: free
    try:
        argv, device = shlex.split(command.split(".py", 1)[1]), torch.device("cuda")
        script = re.search(r"(\w+)\.py", command).group(1)
        if script == "rl":
            args = rl.parser.parse_args(argv)
            source = SimpleNamespace(rows=lambda L: L)                       # a prefix of L rows
            memory.rl_plan(args, config, [{"prompt_ids": [0] * PROMPT}], [], source, None, world, device)
        elif script == "sft_warmup":
            args = sft_warmup.parser.parse_args(argv)
            memory.sft_plan(args, config, world, args.max_tokens + args.L, device)
        else:
            module = evaluate if script == "evaluate" else infer
            args = module.parser.parse_args(argv)
            rows = args.batch_size if script == "evaluate" else min(args.batch_size, args.num_latents)
            memory.check_generation(config, args.dtype == "bfloat16", rows, PROMPT + args.L, args.max_new_tokens, device)
    finally:
        memory.free_memory = saved


def plan(command, config, world, free):
    """(the planned peak in bytes of the setting chosen, or of the last one tried where none fits; the
    setting (micro-batch, activation checkpointing) or None; fits)."""
    plans, need = [], memory.memory_need

    def recorded(*args, **kwargs):
        plans.append((kwargs.get("train_rows"), kwargs.get("checkpointing"), need(*args, **kwargs)))
        return plans[-1][2]
    memory.memory_need = recorded
    try:
        with contextlib.redirect_stdout(io.StringIO()):          # the stage's own line about its plan
            check(command, config, world, free)
        fits = True
    except UserError:
        fits = False
    finally:
        memory.memory_need = need
    rows, checkpointing, part = plans[-1]
    return part["total"], (rows, checkpointing) if rows else None, fits


def table():
    lines = ["| command | GPUs | card | planned peak per GPU (GiB) | free (GiB) | fits | setting |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for source, hardware, command in documented_commands():
        size, config = config_of(hardware, command)
        world = world_of(hardware)
        script = re.search(r"(\w+\.py)", command).group(1)
        for card, gb in CARDS.items():
            free = gb * 10**9 - 2 * GiB
            peak, setting, fits = plan(command, config, world, free)
            chosen = "" if setting is None else f"{setting[0]} rows a micro-batch, checkpointing {'on' if setting[1] else 'off'}"
            lines.append(f"| {source}: {script} Qwen3-{size}B | {world} | {card} | {peak / GiB:.1f} | "
                         f"{free / GiB:.1f} | {'yes' if fits else 'no'} | {chosen if fits else ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
