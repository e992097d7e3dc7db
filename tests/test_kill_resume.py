"""rl.py killed (SIGKILL) at each injection point of a step and of a save, the final checkpoint and
the final model/ included, sometimes killed a second time while it resumes, then resumed with the
same flags and --resume until it finishes: it ends bit for bit where an uninterrupted run ends
(DESIGN.md section 4: "a run killed at any point resumes from its last checkpoint to the same
state"; "a resume never rewrites a checkpoint in place").

How: a driver script, written into tmp_path, imports rl.py once and runs each rl.main in a forked
child (a fresh process image at the cost of a fork, not of an interpreter start; the children run
rl.main through common.run_main as the command line does). In a child that is to be killed, the
n-th call of one point is patched to send SIGKILL to the child itself (os.kill(os.getpid(),
SIGKILL)); the grader gives the parity of the completion's length, so rewards vary. The run: a
tiny 2-layer model (tests/test_rl_flags.py's), 4 steps of 2 prompts x 4 rollouts, linear schedule
with noise prefixes (L = 2), credit naive, a KL to the initial model (--kl-coef), 2 epochs x 2
minibatches (4 optimiser steps a step), held-out greedy evaluation at steps 0 and 2 and at the
end, samples.jsonl at every step, a checkpoint after every step (--save-every 1; rl.py keeps
one): checkpoint-000001..3 on the way, checkpoint-000004 the final one, then model/.

The points (the n-th call in that process; "before" a call: it does not happen; "after": it did):
  step:   after rl.rollout, after rl.score, after an AdamW step inside update_policy (the 2nd of
          step 3's 4), after rl.log_step (a step logged but not checkpointed)
  save:   before the model's weights file (model.save_file, inside save_pretrained), before
          optimizer.safetensors (common.save_file), before trainer_state.json
          (common.atomic_write_json), before and after the rename of the checkpoint into place,
          in the middle of pruning the older checkpoint (once it has lost a file that makes it
          whole: the resumed run must pass it over, saying so), for a checkpoint
          on the way (checkpoint-000002) and for the final one (checkpoint-000004)
  model/: before the final Transformer.save_pretrained (the window where the final checkpoint is
          there and model/ is not), before its weights file (inside model/'s temporary directory),
          after its rename into place (resumed, model/ is written again: atomic_dir's rename of the
          existing directory aside)
  twice:  a second kill while the run resumes: in a checkpoint's save, in the final window, and
          between model/'s rename aside and the rename of the new one into place
  first:  a kill before the first checkpoint: --resume is refused in one line (exit code 2), and
          the command without --resume starts the run again
Each save point is a distinct state on disk: a temporary directory left (before the rename), two
checkpoints (after it), a half-removed older one (the prune), the final checkpoint without model/.
The step points differ in what is in memory and in the logs (a logged step that the resumed run
must log again, once).

Each scenario checks 8 invariants: every injected kill happened (the child died of SIGKILL) where
it was meant to (it left on disk what the scenario says: which checkpoints, whole or not, which
temporary directories, model/ or not, how many records in metrics.jsonl) and the last run exits 0;
the run after a kill resumes from the newest whole checkpoint left (or is refused where there is
none); model/model.safetensors equals the uninterrupted run's (torch.equal, every tensor);
metrics.jsonl's records equal the uninterrupted run's exactly (minus time_* and
gen_tokens_per_s), each step logged once; samples.jsonl equal; no .tmp-* left anywhere in --out;
the kept checkpoints whole and the same as the uninterrupted run's (the same steps, bit-identical
tensors, equal trainer_state.json); no checkpoint rewritten in place by a resumed run (inode and
mtime of every file of a checkpoint that was whole before the run unchanged). 21 scenarios x 8
invariants, and the final window's own test.

Run:  python -m pytest -q tests/test_kill_resume.py      (about half a minute on two cores: some 50
      runs of rl.py, each a forked child of one driver process)
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from common import CHECKPOINT_FILES, is_complete

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRIVER = r'''
"""python kill_driver.py SPEC RESULT: runs each scenario of SPEC (json) in forked children of this
process, killing a child (SIGKILL to itself) at the n-th call of an injection point, then resuming
with --resume until a run exits 0; writes every run's exit status, log and files to RESULT."""
import json, os, re, signal, sys, traceback
import torch
torch.set_num_threads(1)
import common, model, rl
rl.WARMUP_STEPS, rl.EVAL_PROBLEMS = 2, 2          # a short lr warm-up, 2 held-out problems

spec = json.load(open(sys.argv[1]))
# the imports rl.py makes lazily (transformers' tokenizer classes, torch's dynamo under the model's
# initialisation) done once here, so that each forked child starts as an interpreter that has
# imported rl.py, at the cost of a fork, and not of those imports again
model.load_tokenizer(spec["model"], model.Transformer.from_pretrained(spec["model"]).config.vocab_size)


def kill():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point, n, out):
    """Patch this process so that the n-th call of `point` (those `match` accepts) sends SIGKILL."""
    count = [0]

    def counts(*a, **k):
        count[0] += 1
        return count[0] == n

    def before(owner, name, match=lambda *a, **k: True):
        real = getattr(owner, name)
        def wrapped(*a, **k):
            if match(*a, **k) and counts():
                kill()
            return real(*a, **k)
        setattr(owner, name, wrapped)

    def after(owner, name, match=lambda *a, **k: True):
        real = getattr(owner, name)
        def wrapped(*a, **k):
            result = real(*a, **k)
            if match(*a, **k) and counts():
                kill()
            return result
        setattr(owner, name, wrapped)

    def prune():    # the n-th removal of an older checkpoint, killed once it has removed one of the
        real_remove, real_unlink = common.remove, os.unlink       # files that make a checkpoint whole
        def remove(path):
            if os.path.basename(path).startswith("checkpoint-") and counts():
                def unlink(name, *a, **k):
                    real_unlink(name, *a, **k)
                    if os.path.basename(name) in ("trainer_state.json", "optimizer.safetensors", "model.safetensors"):
                        kill()
                os.unlink = unlink
            return real_remove(path)
        common.remove = remove

    out = os.path.abspath(out)
    to_checkpoint = lambda src, dst: os.path.dirname(os.path.abspath(dst)) == out and \
        os.path.basename(dst).startswith("checkpoint-")
    to_model = lambda src, dst: os.path.abspath(dst) == os.path.join(out, "model")
    {
        "rollout": lambda: after(rl, "rollout"),
        "score": lambda: after(rl, "score"),
        "optimiser step": lambda: after(torch.optim.AdamW, "step"),
        "log_step": lambda: after(rl, "log_step"),
        "weights file": lambda: before(model, "save_file"),
        "optimizer.safetensors": lambda: before(common, "save_file"),
        "trainer_state.json": lambda: before(common, "atomic_write_json",
                                             lambda path, obj: os.path.basename(path) == "trainer_state.json"),
        "checkpoint rename": lambda: before(os, "rename", to_checkpoint),
        "checkpoint renamed": lambda: after(os, "rename", to_checkpoint),
        "prune": prune,
        "model save": lambda: before(model.Transformer, "save_pretrained"),
        "model rename": lambda: before(os, "rename", to_model),
        "model renamed": lambda: after(os, "rename", to_model),
    }[point]()


def snapshot(out):
    """{path under out: [inode, mtime_ns, size]} of every file, and of every directory (path/)."""
    files = {}
    for root, dirs, names in os.walk(out):
        for name in names + [d + "/" for d in dirs]:
            path = os.path.join(root, name)
            st = os.stat(path)
            key = os.path.relpath(path, out) + ("/" if name.endswith("/") else "")
            files[key] = [st.st_ino, st.st_mtime_ns, st.st_size]
    return files


def logged(out):
    """The steps of metrics.jsonl's records."""
    path = os.path.join(out, "metrics.jsonl")
    return [json.loads(line)["step"] for line in open(path)] if os.path.exists(path) else []


def run(argv, kill_at, out, log):
    """rl.main(argv) in a forked child, as the command line runs it; its exit code, or minus the
    signal that ended it."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            rl.grade = lambda text, answer, kind: float(len(text) % 2)
            if kill_at:
                arm(*kill_at, out)
            common.run_main(lambda: rl.main(argv))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


results = {}
for name, kills in spec["scenarios"].items():
    kills = [kill_at[:2] for kill_at in kills]
    out = os.path.join(spec["root"], re.sub(r"[^a-z0-9]+", "-", name.lower()))
    runs, resume = [], False
    for i, kill_at in enumerate(kills + [None] * 3):
        log = f"{out}.{i}.log"
        before = snapshot(out)
        status = run(spec["argv"] + ["--out", out] + (["--resume"] if resume else []), kill_at, out, log)
        text = open(log).read()
        runs.append({"kill": kill_at, "resume": resume, "status": status, "log": text[-3000:],
                     "before": before, "after": snapshot(out), "logged": logged(out)})
        # as a user would: the same command with --resume; without it where --resume was refused
        # because no checkpoint had been written
        resume = not (status == 2 and "holds no complete checkpoint" in text)
        if kill_at is None and status == 0:
            break
    results[name] = {"out": out, "runs": runs}
json.dump(results, open(sys.argv[2], "w"))
'''

ARGV = ["--schedule", "linear", "--prefix-source", "noise", "--L", "2", "--credit", "naive", "--kl-coef", "0.05",
        "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "6", "--micro-batch-size", "3",
        "--epochs", "2", "--minibatches", "2", "--steps", "4", "--lr", "1e-3",
        "--save-every", "1", "--eval-every", "2", "--seed", "3"]
STEPS = 4

# name -> the kills, one per killed run: (point, n-th call of it in that process, what the kill
# leaves on disk, as left_on_disk() writes it). Checkpoint k is written after step k - 1, so the
# n-th call of a once-a-step point is in step n - 1, the n-th save is of checkpoint-00000n, and
# the 5th Transformer.save_pretrained or model.save_file is model/'s. The run after a kill resumes
# from the newest whole checkpoint left.
SCENARIOS = {
    "uninterrupted": [],
    # -- inside a step: the steps after the checkpoint run again
    "after rollout, step 2": [("rollout", 3, "2 log:2")],
    "after score, step 1": [("score", 2, "1 log:1")],
    "after the 2nd optimiser step of step 3": [("optimiser step", 14, "3 log:3")],
    "after log_step, step 3 (logged, not saved)": [("log_step", 4, "3 log:4")],
    # -- inside the save of checkpoint-000002, checkpoint-000001 there
    "checkpoint 2, before its weights": [("weights file", 2, "1 .tmp-checkpoint log:2")],
    "checkpoint 2, before optimizer.safetensors": [("optimizer.safetensors", 2, "1 .tmp-checkpoint log:2")],
    "checkpoint 2, before trainer_state.json": [("trainer_state.json", 2, "1 .tmp-checkpoint log:2")],
    "checkpoint 2, before its rename": [("checkpoint rename", 2, "1 .tmp-checkpoint log:2")],
    "checkpoint 2, after its rename": [("checkpoint renamed", 2, "1 2 log:2")],
    "checkpoint 2, pruning checkpoint 1": [("prune", 1, "~1 2 log:2")],
    # -- inside the save of the final checkpoint-000004 (after the final evaluation's record)
    "final checkpoint, before optimizer.safetensors": [("optimizer.safetensors", 4, "3 .tmp-checkpoint log:5")],
    "final checkpoint, before its rename": [("checkpoint rename", 4, "3 .tmp-checkpoint log:5")],
    "final checkpoint, after its rename": [("checkpoint renamed", 4, "3 4 log:5")],
    "final checkpoint, pruning checkpoint 3": [("prune", 3, "~3 4 log:5")],
    # -- the final model/
    "final checkpoint there, model/ not": [("model save", 5, "4 log:5")],
    "model/, before its weights": [("weights file", 5, "4 .tmp-model log:5")],
    "model/, after its rename": [("model renamed", 1, "4 model/ log:5")],
    # -- a second kill while the run resumes
    "score step 1, then checkpoint 3 of the resumed run": [("score", 2, "1 log:1"),
                                                           ("trainer_state.json", 2, "2 .tmp-checkpoint log:3")],
    "final rename, then the resumed run's final window": [("checkpoint rename", 4, "3 .tmp-checkpoint log:5"),
                                                          ("model save", 2, "4 log:5")],
    "model/ renamed, then between the resumed run's renames": [("model renamed", 1, "4 model/ log:5"),
                                                               ("model rename", 1, "4 .tmp-model log:5")],
    # -- before the first checkpoint: --resume is refused in one line, the plain command starts again
    "after rollout, step 0": [("rollout", 1, "log:0")],
}


def left_on_disk(run):
    """What a run left in --out, in a few words: its checkpoints by step (~k: checkpoint-k without
    every file that makes it whole), temporary directories by kind, model/, and log:N for the
    records in metrics.jsonl."""
    files = run["after"]
    tops = {p.split("/")[0] for p in files}
    words = [(str if all(f"{c}/{f}" in files for f in CHECKPOINT_FILES) else "~{}".format)(int(c[-6:]))
             for c in sorted(t for t in tops if t.startswith("checkpoint-"))]
    kind = lambda t: next((k for k in ("checkpoint", "model") if t.startswith(f".tmp-{k}-")), "file")
    words += sorted({".tmp-" + kind(t) for t in tops if t.startswith(".tmp-")})
    return " ".join(words + (["model/"] if "model" in tops else []) + [f"log:{len(run['logged'])}"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny model and data of tests/test_rl_flags.py, and every scenario run by the driver."""
    from conftest import stopping_toy_model
    from toy.task import generate as toy_rows, write_jsonl
    root = tmp_path_factory.mktemp("kill_resume")
    model, _ = stopping_toy_model(root)
    write_jsonl(toy_rows("math", 20, seed=1, digits=1), str(root / "train.jsonl"))
    write_jsonl(toy_rows("math", 4, seed=2, digits=1), str(root / "test.jsonl"))
    (root / "kill_driver.py").write_text(DRIVER)
    spec = {"root": str(root / "runs"), "model": str(root / "model"), "scenarios": SCENARIOS,
            "argv": ["--model", str(root / "model"), "--data", str(root / "train.jsonl"),
                     "--eval-data", str(root / "test.jsonl"), *ARGV]}
    os.makedirs(spec["root"])
    (root / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, str(root / "kill_driver.py"), str(root / "spec.json"),
                           str(root / "result.json")], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, HF_HUB_OFFLINE="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.load(open(root / "result.json"))


def jsonl(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def without_clock(record):
    return {k: v for k, v in record.items() if not k.startswith("time_") and k != "gen_tokens_per_s"}


def checkpoints(out):
    return sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))


def test_the_uninterrupted_run_is_what_the_scenarios_assume(runs):
    """The reference: each step logged once, rewards that vary, prefixed rollouts, 4 optimiser
    steps a step, a positive KL, evaluations at steps 0, 2 and 4, one checkpoint kept."""
    straight = runs["uninterrupted"]
    assert [r["status"] for r in straight["runs"]] == [0], straight["runs"][-1]["log"]
    out = straight["out"]
    records = jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert [r["step"] for r in records if "eval_pass1" in r] == [0, 2, 4]
    steps = records[:STEPS]
    assert all(r["updates"] == 4 for r in steps) and any(r["kl"] > 0 for r in steps)
    assert 0 < sum(r["reward_mean"] for r in steps) < STEPS and steps[0]["rho"] == 1.0
    samples = jsonl(os.path.join(out, "samples.jsonl"))
    assert [s["step"] for s in samples] == [s for s in range(STEPS) for _ in range(8)]   # every rollout
    assert checkpoints(out) == ["checkpoint-000004"] and os.path.isdir(os.path.join(out, "model"))


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n != "uninterrupted"])
def test_a_killed_run_resumes_to_the_uninterrupted_result(runs, name):
    kills = SCENARIOS[name]
    scenario, straight = runs[name], runs["uninterrupted"]["out"]
    history = scenario["runs"]
    out = scenario["out"]
    logs = "\n".join(f"--- run {i} (kill {r['kill']}, --resume {r['resume']}, status {r['status']}, left "
                     f"{left_on_disk(r)!r}):\n{r['log']}" for i, r in enumerate(history))

    # 1. every kill happened, where it was injected (what it left on disk), and the last run finished
    assert [r["status"] for r in history[:len(kills)]] == [-signal.SIGKILL] * len(kills), logs
    assert [left_on_disk(r) for r in history[:len(kills)]] == [left for _, _, left in kills], logs
    assert history[-1]["status"] == 0 and history[-1]["kill"] is None, logs
    # 2. each run after a kill resumed from the newest whole checkpoint left (passing over a
    #    half-removed one, saying so), or, with none, was refused in one line and the plain command
    #    started the run again
    for killed, after_kill in zip(history[:len(kills)], history[1:]):
        whole = [int(w) for w in left_on_disk(killed).split() if w.isdigit()]
        if not whole:
            assert after_kill["status"] == 2 and after_kill["resume"], logs
            assert after_kill["log"].strip().splitlines()[-1].startswith("error: --resume:"), logs
            assert "holds no complete checkpoint" in after_kill["log"], logs
            assert not history[-1]["resume"], logs
            continue
        assert after_kill["resume"], logs
        assert re.search(rf"resumed from .*checkpoint-{max(whole):06d} at step {max(whole)}\n", after_kill["log"]), logs
        if "~" in left_on_disk(killed):
            assert re.search(r"checkpoint-\d{6} is not a complete checkpoint; it is not resumed from",
                             after_kill["log"]), logs
    # 3. the final weights, bit for bit
    a = load_file(os.path.join(straight, "model", "model.safetensors"))
    b = load_file(os.path.join(out, "model", "model.safetensors"))
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == [], logs
    # 4. metrics.jsonl: the same records, each step logged once
    mine, theirs = jsonl(os.path.join(out, "metrics.jsonl")), jsonl(os.path.join(straight, "metrics.jsonl"))
    assert [r["step"] for r in mine] == list(range(STEPS + 1)), logs
    assert [without_clock(r) for r in mine] == [without_clock(r) for r in theirs]
    # 5. samples.jsonl
    assert jsonl(os.path.join(out, "samples.jsonl")) == jsonl(os.path.join(straight, "samples.jsonl"))
    # 6. nothing half-written left, at any depth
    assert [p for p in history[-1]["after"] if any(part.startswith(".tmp-") for part in p.split("/"))] == []
    # 7. the kept checkpoints: whole, and those of the uninterrupted run (rl.py keeps one)
    assert [n for n in checkpoints(out) if not is_complete(os.path.join(out, n))] == [], logs
    assert checkpoints(out) == checkpoints(straight), logs
    for ckpt in checkpoints(out):
        for name_ in ("model/model.safetensors", "optimizer.safetensors"):
            x, y = load_file(os.path.join(straight, ckpt, name_)), load_file(os.path.join(out, ckpt, name_))
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), (ckpt, name_)
        state = lambda d: json.load(open(os.path.join(d, ckpt, "trainer_state.json")))
        assert state(out) == state(straight)
    # 8. no resumed run rewrote a checkpoint in place: every file of a checkpoint that was complete
    #    before the run, and is still there after it, is the same file, untouched
    for r in history[1:]:
        before, after = r["before"], r["after"]
        whole = {p.split("/")[0] for p in before if p.startswith("checkpoint-")}   # whole before the run
        whole = {c for c in whole if all(f"{c}/{f}" in before for f in CHECKPOINT_FILES)}
        rewritten = [p for p, stat in before.items()
                     if p.split("/")[0] in whole and p in after and after[p][:2] != stat[:2]]
        assert rewritten == [], f"rewritten in place by a resumed run: {rewritten}"


def test_the_final_window_keeps_the_final_checkpoint_and_writes_model(runs):
    """Killed where the final checkpoint is there and model/ is not: the resumed run leaves
    checkpoint-000004 as it is (every file the same inode and mtime) and writes model/."""
    history = runs["final checkpoint there, model/ not"]["runs"]
    killed, resumed = history[0]["after"], history[1]["after"]
    final = {p: s for p, s in killed.items() if p.startswith("checkpoint-000004/")}
    assert {f"checkpoint-000004/{f}" for f in CHECKPOINT_FILES} <= final.keys()
    assert not any(p.startswith("model/") for p in killed)
    assert {p: resumed[p][:2] for p in final} == {p: s[:2] for p, s in final.items()}
    assert "model/model.safetensors" in resumed and history[1]["status"] == 0


def test_a_checkpoint_without_its_tokenizer_files_resumes_with_those_of_model(tmp_path, monkeypatch):
    """The tokenizer files come from --model, the source of truth: a checkpoint that lost them still
    resumes into a next checkpoint and a model/ that carry them (both used to be written without)."""
    import functools
    import common
    import rl
    from common import save_checkpoint
    from conftest import stopping_toy_model
    from model import load_tokenizer
    from toy.task import generate as toy_rows, write_jsonl
    stopping_toy_model(tmp_path)
    write_jsonl(toy_rows("math", 20, seed=1, digits=1), str(tmp_path / "train.jsonl"))
    argv = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.jsonl"),
            "--out", str(tmp_path / "run"), *ARGV[:ARGV.index("--steps")], "--steps", "2", "--save-every", "1"]
    monkeypatch.setattr(common, "save_checkpoint", functools.partial(save_checkpoint, keep=2))   # both checkpoints kept
    rl.main(argv)
    for name in ("checkpoint-000002", "model"):               # as if killed after checkpoint-000001
        shutil.rmtree(tmp_path / "run" / name)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(tmp_path / "run" / "checkpoint-000001" / "model" / name)
    rl.main(argv + ["--resume"])
    for written in ("checkpoint-000002/model", "model"):
        path = tmp_path / "run" / written
        assert (path / "tokenizer.json").exists() and (path / "tokenizer_config.json").exists(), written
        assert load_tokenizer(str(path), 64).get_vocab() == load_tokenizer(str(tmp_path / "model"), 64).get_vocab()
