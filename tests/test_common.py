"""The plumbing under every stage: run-directory guards (lock, refusals, resume checks), atomic
saves under kills and Ctrl-C, one-line errors and interrupts from run_main (also under torchrun),
progress lines in log files, JSON readers, RNG state through JSON.

Run:  python -m pytest tests/test_common.py -q        (about half a minute on two cores)
"""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
from common import (RunDir, UserError, _jsonable, acquire_lock, atomic_save_dir, progress, read_json,
                    read_jsonl, recover_leftovers, rng_state, set_rng_state)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flags(**values):
    """An argparse namespace as a stage with --resume would produce it."""
    base = dict(lr=1e-3, steps=10, seed=0, eval_every=5, resume=False)
    return argparse.Namespace(**{**base, **values})


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


# -- the run directory ------------------------------------------------------------------------

def test_resume_keeps_logs_and_a_rerun_without_resume_is_refused(tmp_path):
    run = RunDir(str(tmp_path), flags())
    for step in range(3):
        run.log({"step": step})
    os.makedirs(tmp_path / "checkpoint")
    resumed = RunDir(str(tmp_path), flags(resume=True), resume=True)
    assert resumed.resuming
    resumed.truncate_log(after_step=1)            # checkpoint taken after step 1
    resumed.log({"step": 2})
    assert [r["step"] for r in read_jsonl(run.file("metrics.jsonl"))] == [0, 1, 2]
    with pytest.raises(UserError, match=r"already holds a run \(checkpoint/, metrics.jsonl\): add --resume"):
        RunDir(str(tmp_path), flags())            # a new run into the same directory
    assert len(read_jsonl(run.file("metrics.jsonl"))) == 3        # and nothing was deleted


def test_stage_without_resume_flag_is_pointed_at_a_new_out(tmp_path):
    run = RunDir(str(tmp_path), argparse.Namespace(steps=3))
    run.log({"step": 0})
    with pytest.raises(UserError, match="choose a new --out, or delete"):
        RunDir(str(tmp_path), argparse.Namespace(steps=3))


def test_resume_with_logs_but_no_checkpoint_is_refused(tmp_path):
    RunDir(str(tmp_path), flags()).log({"step": 0})
    with pytest.raises(UserError, match="holds logs of a run .* but no checkpoint"):
        RunDir(str(tmp_path), flags(resume=True), resume=False)   # rl.py's call: resume = checkpoint found
    fresh = RunDir(str(tmp_path / "new"), flags(resume=True), resume=True)
    assert not fresh.resuming                      # nothing there at all: a new run, with a note


def test_resume_after_a_kill_between_the_renames_recovers_the_checkpoint(tmp_path):
    """The kill left .new-checkpoint-* (complete) and no checkpoint/. A caller that decided
    `resume` before RunDir recovered it (rl.py: resume = checkpoint found) is asked to run again;
    one that passes args.resume (and reads run.resuming) resumes at once."""
    RunDir(str(tmp_path), flags()).log({"step": 0})
    write(str(tmp_path / ".new-checkpoint-abc" / "trainer_state.json"), '{"step": 1}')
    with pytest.raises(UserError, match="checkpoint was just recovered from an interrupted save; run "
                                        "the same command again"):
        RunDir(str(tmp_path), flags(resume=True), resume=False)
    assert sorted(os.listdir(tmp_path)) == [".lock", "args.json", "checkpoint", "metrics.jsonl"]
    assert RunDir(str(tmp_path), flags(resume=True), resume=True).resuming
    os.rename(tmp_path / "checkpoint", tmp_path / ".new-checkpoint-def")
    assert RunDir(str(tmp_path), flags(resume=True), resume=True).resuming
    assert read_json(str(tmp_path / "checkpoint" / "trainer_state.json")) == {"step": 1}


def test_an_out_that_is_a_file_is_refused(tmp_path):
    write(str(tmp_path / "f"), "x")
    with pytest.raises(UserError, match="is a file, not a directory"):
        RunDir(str(tmp_path / "f"), flags())


def test_resume_refuses_changed_run_flags_and_records_safe_changes(tmp_path, capsys):
    RunDir(str(tmp_path), flags(steps=10)).log({"step": 0})
    os.makedirs(tmp_path / "checkpoint")
    with pytest.raises(UserError, match=r"--lr 0.001 -> 0.01, --seed 0 -> 1;"):
        RunDir(str(tmp_path), flags(resume=True, lr=1e-2, seed=1), resume=True)
    with pytest.raises(UserError, match=r"--steps 10 -> 2 \(may only grow\)"):
        RunDir(str(tmp_path), flags(resume=True, steps=2), resume=True)
    assert not os.path.exists(tmp_path / "resumes.jsonl")
    RunDir(str(tmp_path), flags(resume=True, steps=20, eval_every=1), resume=True)
    assert "resuming with --eval-every 5 -> 1, --steps 10 -> 20" in capsys.readouterr().out
    record = read_jsonl(str(tmp_path / "resumes.jsonl"))[0]
    assert record["changed"] == {"eval_every": [5, 1], "steps": [10, 20]}
    assert read_json(str(tmp_path / "args.json"))["steps"] == 20   # the next resume compares with 20
    with pytest.raises(UserError, match=r"--steps 20 -> 10"):
        RunDir(str(tmp_path), flags(resume=True, steps=10, eval_every=1), resume=True)


def test_a_cut_short_last_log_line_does_not_block_resume(tmp_path, capsys):
    write(str(tmp_path / "args.json"), json.dumps(vars(flags())))
    write(str(tmp_path / "metrics.jsonl"), '{"step": 0}\n{"step": 1}\n{"step": 2, "lo')
    os.makedirs(tmp_path / "checkpoint")
    run = RunDir(str(tmp_path), flags(resume=True), resume=True)
    assert "dropped the cut-short last line" in capsys.readouterr().out
    run.truncate_log(after_step=5)
    run.log({"step": 2})
    assert [r["step"] for r in read_jsonl(run.file("metrics.jsonl"))] == [0, 1, 2]
    write(str(tmp_path / "metrics.jsonl"), '{"step": 0}\n{"st\n{"step": 2}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: corrupt line"):
        run.truncate_log(after_step=5)


def test_read_json_names_the_corrupt_file(tmp_path):
    path = str(tmp_path / "trainer_state.json")
    for text, message in (('{"step": 3', "is corrupt or cut short"), ("", "is corrupt or cut short"),
                          ("[1, 2]", "expected a JSON object, found list"), ("\xff\xfe", "corrupt")):
        write(path, text)
        with pytest.raises(UserError, match=message) as e:
            read_json(path, "trainer state")
        assert path in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="no such file"):
        read_json(str(tmp_path / "missing.json"), "results")


# -- the lock ---------------------------------------------------------------------------------

def test_a_second_process_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, common; common.acquire_lock(sys.argv[1]); "
         "print('locked', flush=True); time.sleep(60)", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    assert holder.stdout.readline().strip() == "locked"
    lock = read_json(str(tmp_path / ".lock"))
    assert lock["pid"] == holder.pid and lock["command"].startswith("python -c") and lock["host"]
    with pytest.raises(UserError, match=f"is in use by pid {holder.pid} since .*; wait for it"):
        RunDir(str(tmp_path), flags())
    holder.kill()
    holder.wait()
    notes = acquire_lock(str(tmp_path))           # the holder is gone: its lock is stale
    assert notes and f"from pid {holder.pid}, which is no longer running" in notes[0]
    assert read_json(str(tmp_path / ".lock"))["pid"] == os.getpid()
    common.release_locks()
    assert not os.path.exists(tmp_path / ".lock")


# -- atomic saves: kills and Ctrl-C at every point ---------------------------------------------

KILL_PROBE = r'''
"""Save a directory again and again, killed (SIGKILL) or interrupted (SIGINT) before each step of
the swap in a forked child; the parent then recovers the leftovers and reports what it found."""
import json, os, shutil, signal, sys
import common

def fill(version):
    def write(d):
        for name in ("a.txt", "b.txt"):
            with open(os.path.join(d, name), "w") as f:
                f.write(version)
    return write

def content(path):
    if not os.path.isdir(path):
        return None
    texts = {open(os.path.join(path, n)).read() for n in os.listdir(path)}
    return texts.pop() if len(texts) == 1 and len(os.listdir(path)) == 2 else "mixed"

def scenario(root, first_save, hit, sig):
    """hit: the n-th os.replace / shutil.rmtree call of the save (or 0: inside write_fn)."""
    parent = os.path.join(root, f"{first_save}-{hit}-{sig}")
    os.makedirs(parent)
    target = os.path.join(parent, "checkpoint")
    if not first_save:
        common.atomic_save_dir(target, fill("old"))
    pid = os.fork()
    if pid == 0:
        calls = [0]
        def hook(real):
            def wrapped(*a, **k):
                calls[0] += 1
                if calls[0] == hit:
                    os.kill(os.getpid(), sig)
                return real(*a, **k)
            return wrapped
        os.replace, shutil.rmtree = hook(os.replace), hook(shutil.rmtree)
        def write(d):
            fill("new")(d)
            if hit == 0:
                os.kill(os.getpid(), sig)
        try:
            common.atomic_save_dir(target, write)
        except KeyboardInterrupt:
            os._exit(130)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    how = "killed" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
    left = sorted(os.listdir(parent))
    notes = common.recover_leftovers(parent)
    return {"first_save": first_save, "hit": hit, "signal": sig, "how": how, "left": left,
            "after": sorted(os.listdir(parent)), "content": content(target), "notes": notes}

root = sys.argv[1]
results = []
for sig in (signal.SIGKILL, signal.SIGINT):
    for first_save in (False, True):
        for hit in range(0, 5 if not first_save else 3):
            results.append(scenario(root, first_save, hit, sig))
print(json.dumps(results))
'''


def default_sigint():
    """Child processes of the Ctrl-C tests get SIGINT's default action: a shell that starts the
    suite in the background (as CI may) leaves SIGINT ignored, and children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def kill_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("kills")
    script = root / "probe.py"
    script.write_text(KILL_PROBE)
    out = subprocess.run([sys.executable, str(script), str(root)], cwd=REPO, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=300,
                         preexec_fn=default_sigint)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_kill_at_any_point_of_a_save_leaves_one_complete_directory(kill_results):
    killed = [r for r in kill_results if r["signal"] == signal.SIGKILL]
    for r in killed:
        assert r["how"] == "killed", r
        assert r["after"] == ([] if r["content"] is None else ["checkpoint"]), r   # leftovers gone
        if not r["first_save"]:
            # hit 0: in write_fn; 1: before .tmp -> .new; 2: before checkpoint -> .old;
            # 3: before .new -> checkpoint (the name is missing here); 4: before removing .old
            assert r["content"] == ("old" if r["hit"] <= 1 else "new"), r
        else:
            assert r["content"] == (None if r["hit"] <= 1 else "new"), r
    missing = [r for r in killed if not r["first_save"] and r["hit"] == 3][0]
    assert "checkpoint" not in missing["left"]     # the kill really fell between the two renames
    assert "recovered" in missing["notes"][0] and "the save the run was making" in missing["notes"][0]


def test_ctrl_c_during_a_save_keeps_a_complete_directory(kill_results):
    for r in [r for r in kill_results if r["signal"] == signal.SIGINT]:
        assert r["how"] == "exit 130", r                       # KeyboardInterrupt, after the swap
        assert r["left"] == ([] if r["content"] is None else ["checkpoint"]), r   # nothing to recover
        expected = ("old" if not r["first_save"] else None) if r["hit"] == 0 else "new"
        assert r["content"] == expected, r


def test_write_failure_keeps_the_old_directory(tmp_path):
    target = tmp_path / "ckpt"
    atomic_save_dir(str(target), lambda d: open(os.path.join(d, "a.txt"), "w").write("old"))

    def crash(d):
        open(os.path.join(d, "a.txt"), "w").write("half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        atomic_save_dir(str(target), crash)
    assert (target / "a.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["ckpt"]        # no temporary directory left behind


def test_recovery_restores_the_previous_directory_when_no_new_one_is_complete(tmp_path):
    os.makedirs(tmp_path / ".old-checkpoint-abc")
    write(str(tmp_path / ".old-checkpoint-abc" / "a.txt"), "old")
    os.makedirs(tmp_path / ".tmp-checkpoint-def")         # half written: never used
    notes = recover_leftovers(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]
    assert (tmp_path / "checkpoint" / "a.txt").read_text() == "old" and "previous one" in notes[0]


# -- run_main end to end: one-line refusals, Ctrl-C, locks, resume, torchrun ---------------------

STAGE = r'''
"""A minimal stage built the way the real ones are: checks, RunDir, checkpoints, progress."""
import os, time
from common import (ArgumentParser, RunDir, at_least, atomic_save_dir, atomic_write_json, progress,
                    read_json, run_main)
parser = ArgumentParser(prog="stage.py")
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--save-every", type=int, default=5)
parser.add_argument("--lr", type=float, default=0.1)
parser.add_argument("--resume", action="store_true")
SLEEP = float(os.environ.get("STAGE_SLEEP", 0))   # seconds per step: slow enough to interrupt

def main():
    args = parser.parse_args()
    at_least(1, steps=args.steps, save_every=args.save_every)
    run = RunDir(args.out, args, resume=args.resume)
    start = read_json(os.path.join(run.checkpoint, "trainer_state.json"))["step"] if run.resuming else 0
    if run.resuming:
        run.truncate_log(start - 1)
    for step in progress(range(start, args.steps), "stage", total=args.steps, initial=start):
        time.sleep(SLEEP)
        run.log({"step": step})
        if (step + 1) % args.save_every == 0:
            atomic_save_dir(run.checkpoint, lambda d: atomic_write_json(
                os.path.join(d, "trainer_state.json"), {"step": step + 1}))

if __name__ == "__main__":
    run_main(main)
'''


@pytest.fixture
def stage(tmp_path):
    path = tmp_path / "stage.py"
    path.write_text(STAGE)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")

    def start(*args, launcher=(sys.executable,), sleep=0):
        return subprocess.Popen([*launcher, "stage.py", *[str(a) for a in args]], cwd=tmp_path,
                                env=dict(env, STAGE_SLEEP=str(sleep)), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)

    def run(*args, launcher=(sys.executable,)):
        proc = start(*args, launcher=launcher)
        out, err = proc.communicate(timeout=120)
        return proc.returncode, out, err
    run.start = start
    return run


def wait_for_lines(path, n, proc):
    while proc.poll() is None:
        if os.path.exists(path) and open(path).read().count("\n") >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run ended before writing {n} lines to {path}: {proc.stderr.read()}")


def test_bad_flags_and_user_errors_are_one_line(capsys):
    parser = common.ArgumentParser(prog="stage.py")
    parser.add_argument("--steps", type=int, default=10)
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--steps", "x"])
    assert e.value.code == 2
    assert capsys.readouterr().err == \
        "error: argument --steps: invalid int value: 'x' (see python stage.py --help)\n"

    def main():
        common.at_least(1, steps=0)
    with pytest.raises(SystemExit) as e:
        common.run_main(main)
    assert e.value.code == 2 and capsys.readouterr().err == "error: --steps must be >= 1, got 0\n"

    def main():
        raise UserError("first line\nsecond line")    # whatever raised it, the user sees one line
    with pytest.raises(SystemExit):
        common.run_main(main)
    assert capsys.readouterr().err == "error: first line second line\n"


def test_ctrl_c_says_where_the_run_stopped_and_how_to_continue(stage, tmp_path):
    out = tmp_path / "run"
    proc = stage.start("--out", out, "--steps", "400", "--save-every", "5", sleep=0.02)
    wait_for_lines(out / "metrics.jsonl", 7, proc)        # past the checkpoint at step 5
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    last = stderr.strip().splitlines()[-1]
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert last.startswith("interrupted at step ") and f"({out})" in last, last
    assert f"last complete checkpoint: {out}/checkpoint (step " in last, last
    command = last.split("continue with: ")[1]
    assert command == f"python stage.py --out {out} --steps 400 --save-every 5 --resume", last
    assert not os.path.exists(out / ".lock")           # released on the way out
    # the printed command continues the run to the end, each step logged once
    assert read_json(str(out / "checkpoint" / "trainer_state.json"))["step"] >= 5
    rc, _, err = stage(*command.split()[2:])
    assert rc == 0, err
    assert [r["step"] for r in read_jsonl(str(out / "metrics.jsonl"))] == list(range(400))


def test_interrupt_message_of_a_stage_without_checkpoints(tmp_path, monkeypatch):
    out = str(tmp_path / "vae")
    monkeypatch.setattr(sys, "argv", ["train_vae.py", "--out", out])
    run = RunDir(out, argparse.Namespace(out=out))
    assert common.interrupted_message() == (
        f"interrupted before its first step ({out}); this stage saves only at the end, so nothing "
        f"was kept; start again with: python train_vae.py --out {out}")
    run.log({"step": 0})
    run.log({"step": 1})
    assert common.interrupted_message() == (
        f"interrupted at step 2 ({out}); this stage saves only at the end, so nothing was kept; "
        f"start again with a new --out, or delete {out} first")


def test_second_run_refused_then_kill_and_resume_recovers(stage, tmp_path):
    out = tmp_path / "run"
    proc = stage.start("--out", out, "--steps", "3000", sleep=0.02)
    wait_for_lines(out / "metrics.jsonl", 7, proc)
    rc, _, err = stage("--out", out, "--steps", "3000", "--resume")
    assert rc == 2 and err.count("\n") == 1 and f"is in use by pid {proc.pid}" in err, err
    proc.kill()
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    rc, stdout, err = stage("--out", out, "--steps", "3000", "--save-every", "1000", "--resume")
    assert rc == 0 and f"took over the lock of {out} from pid {proc.pid}" in stdout, (stdout, err)
    assert "resuming with --save-every 5 -> 1000" in stdout, stdout
    assert [r["step"] for r in read_jsonl(str(out / "metrics.jsonl"))] == list(range(3000))


def test_progress_in_a_log_file_is_a_few_plain_lines(capsys):
    bar = progress(range(3000), "stage", every_s=3600)          # stderr is not a terminal here
    for _ in bar:
        bar.set_postfix(loss="0.5")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines                   # after the first step, and at the end
    assert lines[0].startswith("stage: 1/3000") and lines[1].startswith("stage: 3000/3000")
    assert lines[1].endswith("loss=0.5")
    bar = progress(range(10, 20), "rl", total=20, initial=10, every_s=0)   # a resumed run
    assert [l.split(" |")[0] for l in (list(bar) and capsys.readouterr().err.splitlines())] == \
        [f"rl: {n}/20" for n in range(11, 21)] + ["rl: 20/20"]


def test_progress_is_tqdm_in_a_terminal_and_silent_off_rank_0(monkeypatch, capsys):
    from tqdm import tqdm
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert isinstance(progress(range(3), "x"), tqdm)
    capsys.readouterr()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert list(progress(range(3), "x")) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_torchrun_bad_flag_message_comes_first_and_last(stage, tmp_path):
    """torchrun adds its own failure report after a worker exits non-zero (a log line, its own
    traceback, and a summary box); the worker's line opens the output, and the box's
    'traceback :' lines, the last words of the report, repeat it. A rank that torchrun stopped
    after the first failure, before it had refused too, is reported by its signal instead."""
    rc, out, err = stage("--out", tmp_path / "o", "--steps", "0", launcher=(
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"))
    lines = [l for l in (out + err).splitlines() if l.strip()]
    message = "error: --steps must be >= 1, got 0"
    assert rc != 0 and lines[0] == message, lines[:3]
    tracebacks = [l.split("traceback : ", 1)[1] for l in lines if "traceback : " in l]
    assert tracebacks and all(t == message or t.startswith("Signal 15 (SIGTERM)")
                              for t in tracebacks), tracebacks
    # no other copy of the message, and no stack trace
    assert (out + err).count(message) == 1 + tracebacks.count(message)
    assert lines[-2] == f"  traceback : {message}" and set(lines[-1]) == {"="}, lines[-3:]


# -- RNG state ----------------------------------------------------------------------------------

def test_rng_state_round_trips_through_json():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    state = json.loads(json.dumps(_jsonable(rng_state())))   # as a checkpoint stores it
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
