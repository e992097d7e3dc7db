"""A fork costs one file (issue 43): rl.py with model.py, data.py and common.py, copied into an
empty folder, runs; and the three ideas a fork makes, each in a temporary copy of the core (every
.py of the repo root), run with no edit to any test:

(a) a reward-aware schedule: one entry added to the copy's rl.SCHEDULES ("stuck": prefix the whole
    group of a problem whose rewards, the last time it was drawn, were all equal, and of a problem
    never drawn before). The logged plan (metrics.jsonl's "prefixed") is what the schedule gives
    from the rewards samples.jsonl holds for each problem's previous draw; a run stopped right
    after its checkpoint and resumed logs what the uninterrupted run logs (the memory of rewards is
    in the checkpoint).
(b) a new loss aggregation: one entry added to the copy's model.LOSS_AGGREGATIONS ("seq-sum": each
    completion's token terms summed, a mean over completions); --aggregation seq-sum runs, and on
    the same rollouts its step-0 loss is token-mean's times the mean completion length.
(c) rl.py copied as my_rl.py: it runs and logs what rl.py logs with the same flags.

Every run is a subprocess with cwd = its folder and a PYTHONPATH that does not reach the repo. The
world: a random 2-layer toy model (tests/test_rl_flags.py's: about one token in five is eos), a
VAE from train_vae.py (5 steps), 3 one-digit additions (so problems come back every other step).
(a) and (b) run rl.main through a driver in the copy whose grader varies (the parity of the
completion's length; always 0 for one problem, so its group is stuck); the bare commands grade as
rl.py does (a random model is never right).

Run:  python -m pytest -q tests/test_fork.py      (about a minute on one core: 10 runs of rl.py)
"""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
G = 4
SIZES = ["--steps", "2", "--prompts-per-step", "2", "--group-size", str(G), "--max-new-tokens", "8"]

DRIVER = r'''
"""python drive.py MODULE ARGS...: MODULE.main(ARGS) as its command line runs it, graded by the
parity of the completion's length (always 0 for the answer in STUCK); with STOP=1 the process ends
(exit code 3) right after the first checkpoint it writes."""
import importlib, os, sys
import common
stage = importlib.import_module(sys.argv[1])
stage.grade = lambda text, answer, kind: 0.0 if answer == os.environ["STUCK"] else float(len(text) % 2)
if os.environ.get("STOP"):
    write = stage.checkpoint
    def checkpoint(*args):
        write(*args)
        sys.stdout.flush()
        os._exit(3)
    stage.checkpoint = checkpoint
common.run_main(lambda: stage.main(sys.argv[2:]))
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from conftest import run_script, stopping_toy_model
    from toy.task import generate as toy_rows, write_jsonl
    root = tmp_path_factory.mktemp("fork_world")
    stopping_toy_model(root)                                    # completions that stop and that are cut off
    rows = {}
    for row in toy_rows("math", 20, seed=1, digits=1):          # 3 problems, answers all different
        rows.setdefault(row["answer"], row)
    rows = list(rows.values())[:3]
    write_jsonl(rows, str(root / "train.jsonl"))
    for domain in ("math", "code", "qa"):
        write_jsonl(toy_rows(domain, 12, seed=3), str(root / f"vae_{domain}.jsonl"))
    run_script("train_vae.py", "--model", root / "model", "--out", root / "vae", "--steps", "5", "--latent-dim", "4",
               "--hidden-dim", "16", "--batch-size", "8",
               "--data", ",".join(f"{d}={root}/vae_{d}.jsonl" for d in ("math", "code", "qa")), threads=1)
    return {"root": root, "stuck": rows[0]["answer"], "problems": [r["problem"] for r in rows],
            "flags": ["--model", str(root / "model"), "--data", str(root / "train.jsonl"), "--vae", str(root / "vae")]}


def run(folder, *argv, stuck="", stop=False, expect=0):
    """`python ARGV` in `folder`, as a user of a fork runs it: the repo is on no path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", STUCK=stuck, STOP="1" if stop else "")
    done = subprocess.run([sys.executable, *map(str, argv)], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == expect, f"{argv[:2]}: exit code {done.returncode}\n{done.stderr[-3000:]}"
    return done


def jsonl(path):
    return [json.loads(line) for line in open(path)]


def without_clock(records):
    return [{k: v for k, v in r.items() if not k.startswith("time_") and k != "gen_tokens_per_s"} for r in records]


def core_copy(tmp_path):
    """Every .py of the repo root (the core) and the driver, in a folder of their own."""
    folder = tmp_path / "core"
    folder.mkdir()
    for path in glob.glob(os.path.join(REPO, "*.py")):
        shutil.copy(path, folder)
    (folder / "drive.py").write_text(DRIVER)
    return folder


def edit(path, old, new):
    text = path.read_text()
    assert text.count(old) == 1, f"{path.name}: {old!r} is not there once"
    path.write_text(text.replace(old, new))


@pytest.fixture(scope="module")
def bare(world, tmp_path_factory):
    """rl.py, model.py, data.py and common.py alone in an empty folder: a run with the defaults."""
    folder = tmp_path_factory.mktemp("fork_bare")
    for name in ("rl.py", "model.py", "data.py", "common.py"):
        shutil.copy(os.path.join(REPO, name), folder)
    run(folder, "-c", "import toy", expect=1)                      # the repo is out of reach
    run(folder, "rl.py", *world["flags"], *SIZES, "--out", folder / "run")
    return folder / "run"


def test_rl_runs_from_four_files_in_an_empty_folder(bare):
    assert [r["step"] for r in jsonl(bare / "metrics.jsonl")] == [0, 1]
    assert os.path.isfile(bare / "model" / "model.safetensors")


def test_a_copy_of_rl_under_another_name_logs_the_same(world, tmp_path):
    folder = core_copy(tmp_path)
    shutil.copy(folder / "rl.py", folder / "my_rl.py")
    for script in ("rl.py", "my_rl.py"):
        run(folder, script, *world["flags"], *SIZES, "--out", folder / f"run_{script}")
        assert os.path.isfile(folder / f"run_{script}" / "model" / "model.safetensors")
    mine, theirs = (without_clock(jsonl(folder / f"run_{name}" / "metrics.jsonl")) for name in ("my_rl.py", "rl.py"))
    assert [r["step"] for r in mine] == [0, 1] and mine == theirs


def test_a_reward_aware_schedule_logs_its_plan_and_resumes_exactly(world, tmp_path):
    folder = core_copy(tmp_path)
    edit(folder / "rl.py", 'SCHEDULES = {\n', 'SCHEDULES = {\n    "stuck": lambda tau, last: '
         '((last == last[:, :1]).all(1) | last.isnan().any(1)).double(),\n')
    argv = ["drive.py", "rl", *world["flags"], *SIZES, "--schedule", "stuck",
            "--steps", "4", "--save-every", "2"]
    run(folder, *argv, "--out", folder / "straight", stuck=world["stuck"])
    run(folder, *argv, "--out", folder / "stopped", stuck=world["stuck"], stop=True, expect=3)
    assert [r["step"] for r in jsonl(folder / "stopped" / "metrics.jsonl")] == [0, 1]
    run(folder, *argv, "--out", folder / "stopped", "--resume", stuck=world["stuck"])

    # the plan of each step, from the rewards of each problem's previous draw in samples.jsonl
    records, samples = jsonl(folder / "straight" / "metrics.jsonl"), jsonl(folder / "straight" / "samples.jsonl")
    last, seen = {}, []
    for record in records:
        groups = {}
        for s in samples:
            if s["step"] == record["step"]:
                groups.setdefault(s["group"], (s["problem"], []))[1].append(s["reward"])
        assert sorted(groups) == [0, 1] and all(len(rewards) == G for _, rewards in groups.values())
        plan = []
        for j in (0, 1):
            problem, rewards = groups[j]
            before = last.get(problem)
            plan.append(G if before is None or len(set(before)) == 1 else 0)
            seen += [(before is not None, plan[-1])]
        assert record["prefixed"] == plan, (record["step"], record["prefixed"], plan, last)
        assert record["L"] == (8 if any(plan) else 0)
        last.update(groups.values())
    assert set(world["problems"]) == set(last)
    assert {(True, G), (True, 0)} <= set(seen), seen        # a seen group stuck, and one not
    assert {s["reward"] for s in samples} == {0.0, 1.0}

    # stopped after checkpoint-000002 and resumed: the same logs as the uninterrupted run
    assert without_clock(jsonl(folder / "stopped" / "metrics.jsonl")) == without_clock(records)
    assert jsonl(folder / "stopped" / "samples.jsonl") == samples


def test_a_new_loss_aggregation_runs_and_weighs_otherwise(world, tmp_path):
    folder = core_copy(tmp_path)
    with open(folder / "model.py", "a") as f:          # what a sequence's token sum is divided by: nothing
        f.write('\nLOSS_AGGREGATIONS["seq-sum"] = lambda mask, n_sequences, n_tokens, max_new_tokens: 1.0\n')
    records = {}
    for name in ("token-mean", "seq-sum"):
        run(folder, "drive.py", "rl", *world["flags"], *SIZES, "--steps", "1", "--aggregation", name,
            "--out", folder / name, stuck=world["stuck"])
        assert json.load(open(folder / name / "args.json"))["aggregation"] == name
        (records[name],) = jsonl(folder / name / "metrics.jsonl")
    mean, new = records["token-mean"], records["seq-sum"]
    assert mean["updates"] == new["updates"] == 1 and mean["loss"] != 0 and mean["completion_len"] > 1
    # the same rollouts (step 0), every token weighed 1 / B' instead of 1 / (kept tokens)
    rollouts = lambda r: {k: v for k, v in r.items()
                          if k not in ("loss", "grad_norm") and not k.startswith(("time_", "gen_"))}
    assert rollouts(new) == rollouts(mean)
    assert new["loss"] == pytest.approx(mean["loss"] * mean["completion_len"], rel=1e-4), (mean, new)
