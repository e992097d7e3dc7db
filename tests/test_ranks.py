"""Every stage gives the same result on 1 process and on 2 gloo ranks for the same global batch
(DESIGN.md section 4, STYLE.md rule 16), with prefixes on: train_vae.py, sft_warmup.py (VAE
prefixes, several micro-batches), rl.py (two rows of flags: schedules linear and constant, 2 epochs
x 2 or 3 minibatches that do not divide a rank's rollouts, credit rules naive-shaped and nudge, a KL
term, zero-advantage resampling, every rollout in samples.jsonl at every step) and evaluate.py
(--mode latent-sample, -n 3). Each stage runs as a command (a driver script in tmp_path that calls
common.run_main, so that a grader with varied rewards can be put in: the parity of the completion's
length), once with python and once under `torch.distributed.run --standalone --nproc_per_node 2`
(gloo on the CPU), on a tiny random model, for 3 or 4 steps; then it compares:

- weights: torch.testing.assert_close(rtol=1e-4, atol=1e-5). One process and two ranks add the
  same per-token terms in another order (other micro-batches, other padding, an all-reduce of two
  partial sums), which moves float32 gradients by about 1e-7 relative; Adam divides by the root of
  the second moment, so a weight moves by about lr = 1e-3 per step whatever the gradient's scale,
  and the float noise reaches the weights as about 1e-6 after 3 steps (measured: 1e-6 for rl.py,
  2e-7 for sft_warmup.py, 2e-8 for train_vae.py). A gradient that is wrong on part of the batch
  (one rank's share normalised by its own token count, a rank that drew other prefixes) moves
  weights by a fair part of the lr, 1e-4 or more; each test also checks that the weights moved by
  far more than the tolerance, so that the comparison says something.
- metrics.jsonl: the same records in the same order; ints, strings, None and the floats that are
  functions of the rollouts alone (rewards, accuracy, counts over ranks, rho, lr, ...) exactly;
  the floats that come out of forward and backward passes (loss, grad_norm, entropy, kl,
  clip_frac, the VAE's recon and kl) within rel 1e-5 or abs 1e-6 (measured: rel 1e-7; the abs
  term is for the KL: k3 = exp(d) - d - 1 cancels near d = 0, so its float32 error is about
  1.2e-7 per token, the epsilon at 1, however small k3 is; a rollout's update_kl of 0.0078 came
  out 1.2e-7 apart); time_* and gen_tokens_per_s (wall-clock) skipped.
- samples.jsonl: the same records as sets (two ranks write rank 0's rollouts, then rank 1's, a
  resampled rollout after its rank's groups): every field exactly, except the update_* sums of
  the passes, within the same tolerance.
- evaluate.py: results.json and every problem's record (completions, verdicts) exactly: the
  latents and the sampling noise of a problem are functions of (--seed, problem), and sampled
  tokens are integers, which float noise in the logits changes only at an exact tie.

Run:  python -m pytest -q tests/test_ranks.py      (about 2 minutes on two cores: 10 stage runs,
      half of them under torchrun)
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRIVER = r'''
"""python drive.py MODULE ARGS...: MODULE.main(ARGS) as its command line runs it (common.run_main),
with a grader whose reward varies within a group: the parity of the completion's length."""
import importlib, sys
import common
stage = importlib.import_module(sys.argv[1])
if hasattr(stage, "grade"):
    stage.grade = lambda text, answer, kind: float(len(text) % 2)
common.run_main(lambda: stage.main(sys.argv[2:]))
'''

WEIGHTS = dict(rtol=1e-4, atol=1e-5)   # weights after 3 steps (the docstring says why)
PASSES = dict(rel=1e-5, abs=1e-6)      # floats from forward and backward passes
FROM_PASSES = {"loss", "grad_norm", "entropy", "kl", "clip_frac", "recon"}   # metrics.jsonl keys


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """tests/test_rl_flags.py's tiny model (2 layers, hidden 32, toy tokenizer; about one token in
    five is eos, so completions of up to 6 tokens both stop and get cut off), 1-digit additions
    with solutions (rl.py and sft_warmup.py), 10 rows of each of three domains (train_vae.py), 7
    held-out problems (evaluate.py), and the driver script."""
    from conftest import stopping_toy_model
    from toy.task import generate as toy_rows, write_jsonl
    root = tmp_path_factory.mktemp("ranks")
    model, tokenizer = stopping_toy_model(root)
    write_jsonl(toy_rows("math", 20, seed=1, digits=1), str(root / "train.jsonl"))
    write_jsonl(toy_rows("math", 7, seed=4, digits=1), str(root / "bench.jsonl"))
    for domain in ("math", "code", "qa"):
        write_jsonl(toy_rows(domain, 10, seed=3), str(root / f"vae_{domain}.jsonl"))
    (root / "drive.py").write_text(DRIVER)
    return root


def launch(world, module, *args, nproc=1):
    """`python drive.py MODULE ARGS` or its torchrun form; asserts exit code 0."""
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, HF_HUB_OFFLINE="1")
    result = subprocess.run([*launcher, str(world / "drive.py"), module, *map(str, args)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{module} on {nproc} process(es) failed:\n{result.stderr[-3000:]}"
    return result


def both(world, tmp_path, module, *args, one=(), two=()):
    """Run on 1 process (extra flags `one`) and on 2 ranks (`two`); returns the two --out dirs.
    The 2-rank run must end with its ranks' weights in sync where the stage checks them."""
    launch(world, module, *args, *one, "--out", tmp_path / "one")
    run = launch(world, module, *args, *two, "--out", tmp_path / "two", nproc=2)
    if module != "evaluate":
        assert "weights identical on 2 ranks" in run.stdout, run.stdout[-2000:]
    return tmp_path / "one", tmp_path / "two"


def jsonl(path):
    return [json.loads(line) for line in open(path)]


def assert_same_weights(a, b, base, moved_at_least=1e-3):
    a, b, base = load_file(str(a)), load_file(str(b)), load_file(str(base))
    assert a.keys() == b.keys() == base.keys()
    moved = max((a[k] - base[k]).abs().max().item() for k in a)
    assert moved > moved_at_least, f"the weights moved by {moved} only: the comparison would say nothing"
    for k in a:
        torch.testing.assert_close(b[k], a[k], **WEIGHTS, msg=lambda m: f"{k}: {m}")


def assert_same_value(key, x, y):
    if isinstance(x, float) and isinstance(y, float) and (key in FROM_PASSES or key.startswith("update_")):
        assert y == pytest.approx(x, **PASSES), key
    else:
        assert type(x) is type(y) and x == y, (key, x, y)


def assert_same_metrics(a, b):
    """metrics.jsonl of two runs: the same records, keys and order (wall-clock times skipped)."""
    a, b = jsonl(a), jsonl(b)
    assert [r.get("step") for r in a] == [r.get("step") for r in b] and a
    for x, y in zip(a, b):
        drop = lambda r: {k: v for k, v in r.items() if not k.startswith("time_") and k != "gen_tokens_per_s"}
        x, y = drop(x), drop(y)
        assert x.keys() == y.keys(), (sorted(x), sorted(y))
        for key in x:
            assert_same_value(key, x[key], y[key])


def assert_same_samples(a, b):
    """samples.jsonl as sets: every record of one run is a record of the other."""
    def ordered(records):
        exact = lambda r: json.dumps({k: v for k, v in r.items() if not k.startswith("update_")}, sort_keys=True)
        passes = lambda r: sorted((k, v) for k, v in r.items() if k.startswith("update_"))
        return sorted(records, key=lambda r: (exact(r), passes(r)))
    a, b = ordered(jsonl(a)), ordered(jsonl(b))
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert_same_value(key, x[key], y[key])


# -- train_vae.py ------------------------------------------------------------------------------------

VAE = ("--latent-dim", "4", "--hidden-dim", "16", "--steps", "4", "--batch-size", "6",
       "--kl-warmup-steps", "2", "--lr", "1e-2")


@pytest.fixture(scope="module")
def vae_runs(world, tmp_path_factory):
    """train_vae.py on 1 process and 2 ranks (each rank takes 3 of every batch of 6); the
    one-process VAE is the prefix source of the other stages' tests."""
    data = ",".join(f"{d}={world}/vae_{d}.jsonl" for d in ("math", "code", "qa"))
    return both(world, tmp_path_factory.mktemp("vae"), "train_vae", "--model", world / "model", "--data", data, *VAE)


def test_train_vae_is_the_same_on_one_and_two_ranks(world, vae_runs):
    from common import seed_everything
    from model import PaletteVAE
    one, two = vae_runs
    a, b = load_file(str(one / "vae.safetensors")), load_file(str(two / "vae.safetensors"))
    assert a.keys() == b.keys()
    # the initial VAE, built as train_vae.py builds it from --seed 0: the networks moved from it by
    # far more than the tolerance (and by no more than 4 Adam steps of lr 1e-2 can)
    seed_everything(0)
    init = PaletteVAE(32, 4, 16, 2).state_dict()
    moved = [(a[k] - init[k]).abs().max().item() for k in a if k.startswith(("encoder", "decoder"))]
    assert len(moved) == 12 and 1e-3 < min(moved) and max(moved) < 4 * 1e-2 * 1.1, moved
    for k in a:
        torch.testing.assert_close(b[k], a[k], **WEIGHTS, msg=lambda m: f"{k}: {m}")
    assert_same_metrics(one / "metrics.jsonl", two / "metrics.jsonl")
    # the latent regions written from the trained VAE, to the same tolerance
    ja, jb = json.load(open(one / "vae.json")), json.load(open(two / "vae.json"))
    assert ja["domains"].keys() == jb["domains"].keys() == {"math", "code", "qa"}
    for name, region in ja["domains"].items():
        assert region["n"] == jb["domains"][name]["n"] == 10
        for stat in ("mean", "cov"):
            torch.testing.assert_close(torch.tensor(jb["domains"][name][stat]), torch.tensor(region[stat]), **WEIGHTS)


# -- sft_warmup.py -----------------------------------------------------------------------------------

def test_sft_warmup_is_the_same_on_one_and_two_ranks(world, vae_runs, tmp_path):
    """VAE prefixes of L = 2; a batch of 8 pairs in 2 micro-batches of 4 on one process, in 2 of 2
    on each of two ranks: other splits, other padding, the same token mean."""
    one, two = both(world, tmp_path, "sft_warmup", "--model", world / "model", "--data", world / "train.jsonl",
                    "--prefix-source", "vae", "--vae", vae_runs[0], "--L", "2", "--steps", "3",
                    "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "2",
                    one=("--micro-batch-size", "4"), two=("--micro-batch-size", "2"))
    assert_same_weights(one / "model" / "model.safetensors", two / "model" / "model.safetensors",
                        world / "model" / "model.safetensors")
    assert_same_metrics(one / "metrics.jsonl", two / "metrics.jsonl")
    assert_same_metrics(one / "summary.jsonl", two / "summary.jsonl")      # prefix health of the result


# -- rl.py -------------------------------------------------------------------------------------------

RL = ("--max-new-tokens", "6", "--micro-batch-size", "3", "--steps", "3", "--lr", "1e-3",
      "--save-every", "0", "--epochs", "2")

# Each row's rank holds a number of rollouts that the minibatches do not divide (9 for 2, 8 for 3),
# so minibatches formed from a rank's own order would differ from one process's.

RL_ROWS = {
    # noise prefixes, shrinking; trained without them under LoPE's shaped term; RLOO; a KL to the
    # initial policy
    "linear-naive-shaped-kl": ("--prompts-per-step", "6", "--group-size", "3", "--minibatches", "2",
                               "--schedule", "linear", "--prefix-source", "noise", "--L", "2",
                               "--credit", "naive-shaped", "--estimator", "rloo", "--kl-coef", "0.05"),
    # VAE prefixes on half of each group; NudgeRL's credit (with its distillation pass); all-failed
    # groups resampled under noise prefixes and trained as naive pseudo-rollouts
    "constant-nudge-resample": ("--prompts-per-step", "4", "--group-size", "4", "--minibatches", "3",
                                "--schedule", "0.5", "--prefix-source", "vae", "--L", "1",
                                "--credit", "nudge", "--resample", "3,source=noise,L=1,credit=naive",
                                "--aggregation", "seq-mean"),
}


@pytest.mark.parametrize("row", list(RL_ROWS))
def test_rl_is_the_same_on_one_and_two_ranks(world, vae_runs, tmp_path, row):
    flags = RL_ROWS[row] + (("--vae", vae_runs[0]) if "vae" in RL_ROWS[row] else ())
    one, two = both(world, tmp_path, "rl", "--model", world / "model", "--data", world / "train.jsonl", *RL, *flags)
    assert_same_weights(one / "model" / "model.safetensors", two / "model" / "model.safetensors",
                        world / "model" / "model.safetensors")
    assert_same_metrics(one / "metrics.jsonl", two / "metrics.jsonl")
    assert_same_samples(one / "samples.jsonl", two / "samples.jsonl")
    # the comparison covers what the row is about: varied rewards, prefixed and plain rollouts in
    # one step, several optimiser steps per batch, and the row's own path
    records, samples = jsonl(one / "metrics.jsonl"), jsonl(one / "samples.jsonl")
    assert len({s["reward"] for s in samples}) == 2 and any(r["updates"] > 2 for r in records)
    assert any(r["reward_prefixed"] is not None and r["reward_plain"] is not None for r in records)
    assert len(samples) == sum(r["rollouts_generated"] for r in records)    # every rollout of every step
    if "--kl-coef" in flags:
        assert any(r["kl"] > 0 for r in records)
    if "--resample" in flags:
        assert sum(r["rescued_groups"] for r in records) > 0
        assert any(s["resampled"] and s["trained"] for s in samples)


# -- evaluate.py -------------------------------------------------------------------------------------

def test_evaluate_is_the_same_on_one_and_two_ranks(world, vae_runs, tmp_path):
    """7 problems x 3 candidates, each under its own VAE latent and sampled at temperature 1; the
    problems are split over ranks (4 and 3), and into generate() batches of 4 rows on one process,
    5 on each rank."""
    one, two = both(world, tmp_path, "evaluate", "--model", world / "model", "--benchmarks", world / "bench.jsonl",
                    "--mode", "latent-sample", "--prefix-source", "vae", "--vae", vae_runs[0], "--L", "1",
                    "-n", "3", "--k", "1,3", "--max-new-tokens", "6",
                    one=("--batch-size", "4"), two=("--batch-size", "5"))
    assert json.load(open(one / "results.json")) == json.load(open(two / "results.json"))
    a, b = jsonl(one / "bench.jsonl"), jsonl(two / "bench.jsonl")
    assert [r["key"] for r in a] == [r["key"] for r in b] and len(a) == 7
    for x, y in zip(a, b):
        assert x == y
    verdicts = [v for r in a for v in r["verdicts"]]
    assert 0 < sum(verdicts) < len(verdicts)                   # pass@k reads varied verdicts
    assert any(len(set(r["completions"])) > 1 for r in a)      # the candidates differ
