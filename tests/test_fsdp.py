"""--fsdp (FSDP2) against the DDP path, on two CPU ranks over gloo: the same weights from the same
seed, a killed sharded run that resumes to the same state, and checkpoints that stay whole
Hugging Face directories.

Run:  OMP_NUM_THREADS=1 python -m pytest tests/test_fsdp.py -q      (a few minutes on one core;
      it builds the tiny world of tests/test_stages.py)
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from test_stages import REPO, metrics, rl_args, run_script, world  # noqa: F401 (world: a fixture)

# Prefixed rollouts (noise source), so the sharded embedding also carries prefix rows; a high
# learning rate, so that a gradient the sharded path got wrong shows in the weights.
RL = ("--schedule", "linear", "--prefix-source", "noise", "--L", "2", "--prompts-per-step", "4",
      "--group-size", "4", "--lr", "1e-3", "--micro-batch-size", "4")


def weights(run_dir):
    return load_file(os.path.join(run_dir, "model", "model.safetensors"))


def base_weights(world):
    return load_file(os.path.join(world, "base", "model.safetensors"))


def test_fsdp_rl_matches_ddp(world, tmp_path):
    """Two epochs of two minibatches per batch: the sharded optimiser steps several times on one
    batch of rollouts, whose old log-probs were taken with whole weights."""
    several = ("--steps", "3", "--epochs", "2", "--minibatches", "2")
    ddp_run = run_script("rl.py", *rl_args(world, tmp_path / "ddp", *RL, *several), nproc=2)
    assert "weights identical on 2 ranks" in ddp_run.stdout      # DDP ranks stayed in sync
    run_script("rl.py", *rl_args(world, tmp_path / "fsdp", *RL, *several, "--fsdp"), nproc=2)
    ddp, fsdp, base = weights(tmp_path / "ddp"), weights(tmp_path / "fsdp"), base_weights(world)
    assert ddp.keys() == fsdp.keys()
    moved = max((ddp[k] - base[k]).abs().max().item() for k in ddp)
    assert moved > 1e-4, "the runs did not train, so the comparison would say nothing"
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-4, atol=1e-5, msg=k)
    a, b = metrics(tmp_path / "ddp"), metrics(tmp_path / "fsdp")
    assert [m["reward_mean"] for m in a] == [m["reward_mean"] for m in b]
    assert all(abs(x["grad_norm"] - y["grad_norm"]) < 1e-4 * max(1.0, x["grad_norm"])
               for x, y in zip(a, b))


def test_fsdp_sft_matches_ddp(world, tmp_path):
    """With lorem text prefixes: their token ids go through the sharded embedding like a prompt's."""
    args = ("--model", world / "base", "--prefix-source", "lorem", "--L", "4", "--data",
            world / "math_train.jsonl", "--steps", "2", "--batch-size", "8",
            "--micro-batch-size", "2", "--lr", "1e-3")
    ddp_run = run_script("sft_warmup.py", *args, "--out", tmp_path / "ddp", nproc=2)
    assert "weights identical on 2 ranks" in ddp_run.stdout
    run_script("sft_warmup.py", *args, "--out", tmp_path / "fsdp", "--fsdp", nproc=2)
    ddp, fsdp = weights(tmp_path / "ddp"), weights(tmp_path / "fsdp")
    assert any(not torch.equal(ddp[k], v) for k, v in base_weights(world).items())
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-4, atol=1e-5, msg=k)


FSDP_RUN = (*RL, "--steps", "8", "--save-every", "2", "--fsdp")


@pytest.fixture(scope="module")
def straight_fsdp_run(stages_world, tmp_path_factory):
    """An uninterrupted 8-step --fsdp run with a checkpoint every 2 steps (two tests read it)."""
    out = tmp_path_factory.mktemp("fsdp") / "straight"
    run_script("rl.py", *rl_args(stages_world, out, *FSDP_RUN), nproc=2)
    return out


def test_fsdp_killed_run_resumes_exactly(world, tmp_path, straight_fsdp_run):
    """SIGKILL to every process of a --fsdp torchrun after its first checkpoint; resumed, it ends
    bit for bit where an uninterrupted --fsdp run ends (weights, and the rewards of every step)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           os.path.join(REPO, "rl.py"), *[str(a) for a in rl_args(world, tmp_path / "killed", *FSDP_RUN)]]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    killed = tmp_path / "killed"
    while not list(killed.glob("checkpoint-*")) and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)          # the launcher and both ranks
    assert proc.wait() == -9, "the run finished before it could be killed"
    killed_at = json.load(open(sorted(killed.glob("checkpoint-*"))[-1] / "trainer_state.json"))["step"]
    assert killed_at < 8
    run_script("rl.py", *rl_args(world, tmp_path / "killed", *FSDP_RUN, "--resume"), nproc=2)
    a, b = weights(straight_fsdp_run), weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in metrics(tmp_path / "killed")] == list(range(8))
    assert [m["reward_mean"] for m in metrics(tmp_path / "killed")] == \
        [m["reward_mean"] for m in metrics(straight_fsdp_run)]


def test_fsdp_checkpoint_is_a_whole_hf_directory(straight_fsdp_run):
    """The sharded run's checkpoint holds whole tensors: transformers loads the weights and gives
    our model's logits; the optimiser state covers every parameter, by name, at full size."""
    from transformers import AutoModelForCausalLM
    from model import Transformer
    ckpt = straight_fsdp_run / "checkpoint-000008"
    ours = Transformer.from_pretrained(str(ckpt / "model")).eval()
    theirs = AutoModelForCausalLM.from_pretrained(str(ckpt / "model")).eval()
    ids = torch.tensor([[3, 7, 11, 5, 9, 4]])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids), theirs(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    opt = load_file(str(ckpt / "optimizer.safetensors"))
    params = dict(ours.named_parameters())       # a tied lm_head appears once
    for name, p in params.items():
        assert opt[f"{name}.exp_avg"].shape == p.shape and opt[f"{name}.exp_avg_sq"].shape == p.shape
    assert json.load(open(ckpt / "trainer_state.json"))["step"] == 8


def test_fsdp_refuses_what_it_cannot_shard(monkeypatch):
    """--fsdp with uneven micro-batch counts over ranks (masked truncations) stops at start-up in
    one line, as --fsdp without torchrun does; text prefixes are token ids the sharded embedding
    reads like the prompt's."""
    import rl
    import sft_warmup
    from common import UserError
    base = ["--model", "m", "--data", "d.jsonl", "--out", "o", "--fsdp"]
    with pytest.raises(UserError, match="launch with torchrun"):
        rl.check_args(rl.parser.parse_args(base + ["--schedule", "none"]), 1)
    monkeypatch.setattr(rl.dist, "is_initialized", lambda: True)          # as under torchrun
    with pytest.raises(UserError, match="--truncated zero"):
        rl.check_args(rl.parser.parse_args(base + ["--schedule", "none", "--truncated", "mask"]), 2)
    rl.check_args(rl.parser.parse_args(base + ["--schedule", "linear", "--prefix-source", "lorem"]), 2)
    sft_warmup.check_args(sft_warmup.parser.parse_args(base + ["--prefix-source", "lorem"]), 2)
    rl.check_args(rl.parser.parse_args(base + ["--schedule", "none"]), 2)     # the plain case runs


def test_fsdp_refuses_nudge_resampling_on_two_ranks(tmp_path):
    """--resample credit=nudge: its distillation pass runs only on a rank holding a rescued rollout, so
    under --fsdp its collectives would hang: two ranks stop at start-up with one line, in time."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", os.path.join(REPO, "rl.py"),
           "--model", "m", "--data", "d.jsonl", "--out", str(tmp_path / "o"), "--schedule", "none",
           "--fsdp", "--resample", "2,credit=nudge"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-2000:]
    assert errors[0].startswith("error: --fsdp needs the same forward passes on every rank"), errors


def test_sft_step_is_the_same_on_one_process_and_two_ranks(world, tmp_path):
    """The warm-up's loss is a token mean over the whole batch, so one step from the same model,
    data and seed gives the same weights whether the batch is split over ranks or not (no prefix,
    so no per-rank random draws). Micro-batches of 1 and 3 pairs: the token counts differ."""
    args = ("--model", world / "base", "--prefix-source", "none", "--data", world / "math_train.jsonl",
            "--steps", "1", "--batch-size", "6", "--lr", "1e-2", "--warmup-steps", "0")
    run_script("sft_warmup.py", *args, "--micro-batch-size", "1", "--out", tmp_path / "one")
    run_script("sft_warmup.py", *args, "--micro-batch-size", "3", "--out", tmp_path / "two", nproc=2)
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert any(not torch.equal(one[k], v) for k, v in base_weights(world).items())
    for k in one:
        # Adam's first step is lr * g / |g|: float noise in a near-zero g moves it by a fraction of the
        # lr; a gradient normalised per rank (the bug this catches) moves entries by about the lr
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-3, msg=k)


def test_fsdp_in_bf16_keeps_fp32_shards_and_moves_every_weight_as_ddp_does(world, tmp_path):
    """--dtype bfloat16 under --fsdp is FSDP2's MixedPrecisionPolicy (bf16 parameters for compute,
    fp32 gradient reduction into fp32 shards): at lr 1e-5 every kind of weight, norms included,
    moves about as far as under DDP's autocast (within 1.5x), and the written weights are fp32."""
    import re
    args = ("--model", world / "base", "--prefix-source", "noise", "--L", "1", "--data", world / "math_train.jsonl",
            "--steps", "2", "--warmup-steps", "0", "--batch-size", "8", "--micro-batch-size", "2", "--lr", "1e-5",
            "--dtype", "bfloat16")
    run_script("sft_warmup.py", *args, "--out", tmp_path / "ddp", nproc=2)
    run_script("sft_warmup.py", *args, "--fsdp", "--out", tmp_path / "fsdp", nproc=2)
    base = base_weights(world)
    moved = {}
    for name in ("ddp", "fsdp"):
        w = weights(tmp_path / name)
        assert all(t.dtype == torch.float32 for t in w.values())
        kinds = {}
        for k, t in w.items():
            kinds.setdefault(re.sub(r"layers\.\d+\.", "", k), []).append((t - base[k]).flatten())
        moved[name] = {k: torch.cat(v).norm().item() for k, v in kinds.items()}
    assert any("norm" in k for k in moved["ddp"])
    for k, d in moved["ddp"].items():
        assert d > 0 and 1 / 1.5 <= moved["fsdp"][k] / d <= 1.5, (k, moved["fsdp"][k], d)
