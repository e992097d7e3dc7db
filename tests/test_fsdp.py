"""--fsdp (FSDP2) against the DDP path, on two CPU ranks over gloo: the same weights from the same
seed (also when only one rank resamples), a killed sharded run that resumes to the same state with
the optimiser state read on rank 0 alone, checkpoints that stay whole Hugging Face directories, and
one-line refusals, in time, of what would hang (ranks running different numbers of collectives).

Run:  OMP_NUM_THREADS=1 python -m pytest tests/test_fsdp.py -q      (a few minutes on one core;
      it builds the tiny world of tests/test_stages.py)
"""
import contextlib
import itertools
import json
import os
import re
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


def kill_ranks(proc):
    """SIGKILL to a torchrun launcher, then to every process under it: torchrun starts each rank in a
    session of its own, so the launcher's process group does not reach the ranks, which run on."""
    parent = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, IndexError, ValueError):      # a process that ended meanwhile
            parent[int(pid)] = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    tree = [proc.pid]
    for pid in tree:                             # grows as it is read: children, then theirs
        tree += [child for child, p in parent.items() if p == pid]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return proc.wait()


def on_two_ranks(script, *args, timeout=120, env=()):
    """script (rl.py, or a runner) under torchrun on 2 gloo ranks, on a free port (--standalone: tests run
    beside each other). After `timeout` s the launcher and both ranks are killed and the test fails: a hang
    (gloo waits an hour) fails instead of blocking."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, **dict(env)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_ranks(proc)
        proc.communicate()
        pytest.fail(f"{os.path.basename(str(script))} on 2 ranks still ran after {timeout} s: ranks hang")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def one_error(result):
    """The one `error: ` line a refused run prints (rank 0's; every rank refuses alike)."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-2000:]
    return errors[0]


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


# rl.py as torchrun runs it, with every safetensors file a rank opens listed in OPENS_DIR/rank{RANK}:
# every reader (common.read_safetensors_file, which model.py and hf.py call too) opens through common.safe_open
RECORD_OPENS = f"""import os, runpy, sys
import common
log = open(os.path.join(os.environ["OPENS_DIR"], "rank" + os.environ["RANK"]), "a")
def recorded(file, *args, **kwargs):
    print(file, file=log, flush=True)
    return safe_open(file, *args, **kwargs)
safe_open, common.safe_open = common.safe_open, recorded
sys.argv[0] = os.path.join({REPO!r}, "rl.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_fsdp_killed_run_resumes_exactly(world, tmp_path, straight_fsdp_run):
    """SIGKILL to the launcher and both ranks of a --fsdp torchrun after its first checkpoint (to the
    launcher alone, the ranks would finish the run and the resume resume nothing); resumed from that
    checkpoint, it ends bit for bit where an uninterrupted --fsdp run ends (weights, and the rewards of
    every step), and only rank 0 reads the optimiser state (8 ranks reading 65.5 GB each is the host
    memory of 8B): rank 1 gets its shards by broadcast. Needs common.load_checkpoint to read no
    optimiser state for key None (until then rank 1 stops: None is no key)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "rl.py"), *[str(a) for a in rl_args(world, tmp_path / "killed", *FSDP_RUN)]]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    killed = tmp_path / "killed"
    while not list(killed.glob("checkpoint-*")) and proc.poll() is None:
        time.sleep(0.02)
    assert kill_ranks(proc) == -9, "the run finished before it could be killed"
    killed_at = json.load(open(sorted(killed.glob("checkpoint-*"))[-1] / "trainer_state.json"))["step"]
    assert killed_at < 8
    (tmp_path / "record_opens.py").write_text(RECORD_OPENS)
    resumed = on_two_ranks(tmp_path / "record_opens.py", *rl_args(world, killed, *FSDP_RUN, "--resume"), timeout=300,
                           env={"OPENS_DIR": str(tmp_path)})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = weights(straight_fsdp_run), weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in metrics(killed)] == list(range(8))
    assert [m["reward_mean"] for m in metrics(killed)] == [m["reward_mean"] for m in metrics(straight_fsdp_run)]
    checkpoint = os.path.realpath(killed / f"checkpoint-{killed_at:06d}")         # the one resumed from
    opened = {rank: [os.path.realpath(f) for f in (tmp_path / f"rank{rank}").read_text().split()] for rank in (0, 1)}
    assert os.path.join(checkpoint, "model", "model.safetensors") in opened[1]    # rank 1's opens are recorded
    assert [f for f in opened[0] if f.endswith("optimizer.safetensors")] == [os.path.join(checkpoint, "optimizer.safetensors")]
    assert not [f for f in opened[1] if f.endswith("optimizer.safetensors")], opened[1]


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


def parsed(*flags):
    """rl.py's args for --fsdp, read by its own parser (no file is opened before check_args)."""
    import rl
    return rl.parser.parse_args(["--model", "m", "--data", "d.jsonl", "--out", "o", "--fsdp", *map(str, flags)])


class RankRollouts:
    """What rl.minibatches reads of one rank's rollouts: G of each of its groups, all trained."""

    def __init__(self, first_group, n_groups, G):
        self.group = torch.arange(first_group, first_group + n_groups).repeat_interleave(G)     # (n_groups G,)

    def in_groups(self):
        return torch.arange(len(self.group))


def test_fsdp_refuses_exactly_the_minibatches_that_differ_between_ranks(monkeypatch):
    """Each rank's rows in each minibatch, from rl.minibatches itself, over ranks x prompts a rank x G x M:
    fsdp.check_args refuses a run exactly when some minibatch holds more rows on one rank than on another
    (at one rollout a micro-batch, a forward pass more: a hang), the review's case among them (1 prompt a
    rank, G 8, M 3)."""
    import fsdp
    import rl
    from common import UserError
    monkeypatch.setattr(fsdp.dist, "is_initialized", lambda: True)          # as under torchrun
    verdicts = {}
    for ranks, per_rank, G, M in itertools.product((1, 2, 3, 4), (1, 2, 3), (2, 3, 4, 8), range(1, 7)):
        rows = [[len(m) for m in rl.minibatches(RankRollouts(rank * per_rank, per_rank, G), G, M)] for rank in range(ranks)]
        try:
            fsdp.check_args(parsed("--prompts-per-step", ranks * per_rank, "--group-size", G, "--minibatches", M), ranks)
            refused = False
        except UserError as e:
            assert f"--minibatches {M}" in str(e) and "\n" not in str(e), str(e)
            refused = True
        assert refused == any(r != rows[0] for r in rows), (ranks, per_rank, G, M, rows)
        verdicts[ranks, per_rank, G, M] = refused
    # the review's case, and a rank's 6 rollouts in 4 minibatches: uneven, though the step's 12 split evenly
    assert verdicts[2, 1, 8, 3] and not verdicts[2, 1, 8, 4] and verdicts[2, 2, 3, 4]


def test_fsdp_refuses_nudge_and_a_run_without_torchrun(monkeypatch):
    """--fsdp without torchrun, and nudge credit (its distillation pass runs only on micro-batches with
    prefixed rollouts), stop in one line; resampling and the other credit rules keep the forward passes
    equal and run; text prefixes are token ids the sharded embedding reads like the prompt's."""
    import fsdp
    import rl
    import sft_warmup
    from common import UserError
    with pytest.raises(UserError, match="launch with torchrun"):
        fsdp.check_args(parsed(), 1)
    monkeypatch.setattr(fsdp.dist, "is_initialized", lambda: True)          # as under torchrun
    for flags in (("--credit", "nudge"), ("--resample", "2,credit=nudge"), ("--resample", "8,source=vae,L=1,credit=nudge")):
        with pytest.raises(UserError, match="nudge's distillation pass"):
            fsdp.check_args(parsed(*flags), 2)
    for flags in ((), ("--resample", "2"), ("--resample", "2,source=none,credit=prefixed"), ("--credit", "naive-shaped")):
        fsdp.check_args(parsed(*flags), 2)
    rl.check_args(parsed("--schedule", "linear", "--prefix-source", "lorem"), 2)
    sft_warmup.check_args(sft_warmup.parser.parse_args(["--model", "m", "--data", "d.jsonl", "--out", "o", "--fsdp",
                                                        "--prefix-source", "lorem"]), 2)


def test_fsdp_refuses_uneven_minibatches_on_two_ranks(world, tmp_path):
    """The review's hang, as it was run (1 prompt a rank, G 8, M 3, micro-batches of 2: 2 forward passes
    in one minibatch on one rank, 1 on the other): two ranks stop at start-up with one line, in time.
    Needs rl.check_args to call fsdp.check_args; without it the run hangs and is killed after 90 s."""
    result = on_two_ranks(os.path.join(REPO, "rl.py"), *rl_args(
        world, tmp_path / "o", "--schedule", "none", "--prompts-per-step", "2", "--group-size", "8",
        "--minibatches", "3", "--micro-batch-size", "2", "--steps", "2", "--fsdp"), timeout=90)
    error = one_error(result)
    assert error.startswith("error: --fsdp needs the same forward passes on every rank") and "--minibatches 3" in error


def test_fsdp_refuses_nudge_resampling_on_two_ranks(tmp_path):
    """--resample credit=nudge: its distillation pass runs only on a rank holding a rescued rollout, so
    under --fsdp its collectives would hang: two ranks stop at start-up with one line, in time."""
    result = on_two_ranks(os.path.join(REPO, "rl.py"), "--model", "m", "--data", "d.jsonl", "--out", tmp_path / "o",
                          "--schedule", "none", "--fsdp", "--resample", "2,credit=nudge")
    assert one_error(result).startswith("error: --fsdp needs the same forward passes on every rank")


def test_fsdp_resampling_on_one_rank_matches_ddp(world, tmp_path):
    """--resample under --fsdp: at one step only rank 0 has an all-failed group, so only it generates the
    resample and (naive credit, one update a batch) recomputes pi_old; neither is a collective (the weights
    are gathered), and every group still trains G rollouts: no hang, and the weights of DDP."""
    flags = (*RL, "--steps", "3", "--resample", "4,source=noise,L=2")
    run_script("rl.py", *rl_args(world, tmp_path / "ddp", *flags), nproc=2)
    fsdp_run = on_two_ranks(os.path.join(REPO, "rl.py"), *rl_args(world, tmp_path / "fsdp", *flags, "--fsdp"), timeout=300)
    assert fsdp_run.returncode == 0, fsdp_run.stderr[-3000:]
    resampled_ranks = {}                         # step -> the ranks that resampled (groups 0, 1: rank 0's)
    for sample in map(json.loads, open(tmp_path / "fsdp" / "samples.jsonl")):
        if sample["resampled"]:
            resampled_ranks.setdefault(sample["step"], set()).add(sample["group"] // 2)
    assert {0, 1} in resampled_ranks.values() and {0} in resampled_ranks.values(), resampled_ranks
    ddp, fsdp = weights(tmp_path / "ddp"), weights(tmp_path / "fsdp")
    assert any(not torch.equal(ddp[k], v) for k, v in base_weights(world).items())
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-4, atol=1e-5, msg=k)
    assert [m["reward_mean"] for m in metrics(tmp_path / "ddp")] == [m["reward_mean"] for m in metrics(tmp_path / "fsdp")]


# The micro-batch size --micro-batch-size 0 plans on a GPU, on two ranks where rank 1 has twice rank 0's free
# memory (a need of 64 MiB a rollout: 16 fit rank 0, 32 rank 1)
PLAN = """import memory
from common import compute_cleanup, compute_init
ddp, rank, world_size, device = compute_init()
memory.free_memory = lambda device: (rank + 1) * 2**30
micro, _ = memory.fit_memory(lambda micro, checkpointing: {"total": micro * 2**26}, device, 0, "off", "")
print(f"rank {rank}: micro-batch {micro}", flush=True)
compute_cleanup(wait_for_all=True)
"""


def test_the_planned_micro_batch_is_the_same_on_every_rank(tmp_path):
    """Ranks with different free memory plan one micro-batch size, the one the tightest rank fits: under
    --fsdp another size on one rank is another number of forward passes (a hang). Needs memory.fit_memory
    to plan from the least free memory over ranks."""
    (tmp_path / "plan.py").write_text(PLAN)
    result = on_two_ranks(tmp_path / "plan.py", timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    # rank 0 has 1 GiB free, of which a plan takes 90%: 8 rows of 64 MiB (16 would be 1 GiB); rank 1 alone would
    # take 16 (the ranks share one pipe, so their lines may interleave)
    assert sorted(re.findall(r"rank \d: micro-batch \d+", result.stdout)) == \
        ["rank 0: micro-batch 8", "rank 1: micro-batch 8"], result.stdout


def test_fsdp_in_bf16_keeps_fp32_shards_and_moves_every_weight_as_ddp_does(world, tmp_path):
    """--dtype bfloat16 under --fsdp is FSDP2's MixedPrecisionPolicy (bf16 parameters for compute,
    fp32 gradient reduction into fp32 shards): at lr 1e-5 every kind of weight, norms included,
    moves about as far as under DDP's autocast (within 1.5x), and the written weights are fp32."""
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
