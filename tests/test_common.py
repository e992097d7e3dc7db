"""The plumbing under every stage: the run directory (lock, refusals, resume checks, logs), checkpoints
as new step-numbered directories under kills and Ctrl-C at every point of a save, one-line errors
and interrupts from run_main (also under torchrun), progress bars, JSON readers; resumes that are
refused in one line (no checkpoint, changed flags) without touching args.json, damaged checkpoints
passed over, a full disk, stray temporary files, permissions that follow the umask.

Run:  python -m pytest tests/test_common.py -q        (about half a minute on two cores)
"""
import argparse
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
from common import RunDir, atomic_dir, latest_checkpoint, load_checkpoint, progress, save_checkpoint
from common import ArgumentParser, UserError, ranged, read_json, read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flags(**values):
    """An argparse namespace as a stage with --resume would produce it."""
    base = dict(lr=1e-3, steps=10, seed=0, eval_every=5, resume=False)
    return argparse.Namespace(**{**base, **values})


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


class Weights:
    """Stands in for a model: save_pretrained writes the files a checkpoint's model/ must hold."""
    def __init__(self, text):
        self.text = text

    def save_pretrained(self, path):
        write(os.path.join(path, "weights.txt"), self.text)
        write(os.path.join(path, "config.json"), "{}")
        write(os.path.join(path, "model.safetensors"), self.text)


def checkpoint(out, step, text="w"):
    opt_state = {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.ones(3) * step}},
                 "param_groups": [{"lr": 0.1, "params": [0]}]}
    return save_checkpoint(str(out), step, Weights(text), opt_state, {"rng": [step]})


# -- the run directory ------------------------------------------------------------------------

def test_a_rerun_is_refused_and_resume_continues_from_the_newest_checkpoint(tmp_path):
    run = RunDir(str(tmp_path), flags())
    assert run.checkpoint is None and read_json(run.file("args.json"))["lr"] == 1e-3
    for step in range(4):
        run.log({"step": step})
    checkpoint(tmp_path, 2)
    with pytest.raises(UserError, match=r"already holds a run \(checkpoint-000002, metrics.jsonl\): add --resume"):
        RunDir(str(tmp_path), flags())                       # a new run into the same directory
    resumed = RunDir(str(tmp_path), flags(resume=True), resume=True)
    assert resumed.checkpoint == str(tmp_path / "checkpoint-000002")
    resumed.begin(2)                                         # steps 2 and 3 are run again
    assert [r["step"] for r in read_jsonl(run.file("metrics.jsonl"))] == [0, 1]
    trainer, opt_state = load_checkpoint(resumed.checkpoint)
    assert trainer["step"] == 2 and trainer["rng"] == [2]
    assert torch.equal(opt_state["state"][0]["exp_avg"], torch.ones(3) * 2)
    assert opt_state["param_groups"] == [{"lr": 0.1, "params": [0]}]


def test_resume_without_a_checkpoint_is_refused_and_a_stage_without_resume_is_pointed_elsewhere(tmp_path):
    RunDir(str(tmp_path / "a"), flags()).log({"step": 0})                  # killed before any checkpoint
    with pytest.raises(UserError, match="holds no complete checkpoint to continue from"):
        RunDir(str(tmp_path / "a"), flags(resume=True), resume=True)
    with pytest.raises(UserError, match="holds no complete checkpoint"):
        RunDir(str(tmp_path / "new"), flags(resume=True), resume=True)    # nothing there at all
    RunDir(str(tmp_path / "b"), argparse.Namespace(steps=3)).log({"step": 0})
    with pytest.raises(UserError, match="choose a new --out, or delete it"):
        RunDir(str(tmp_path / "b"), argparse.Namespace(steps=3))


def test_a_damaged_newest_checkpoint_is_passed_over_for_the_last_complete_one(tmp_path, capsys):
    RunDir(str(tmp_path), flags()).log({"step": 0})
    checkpoint(tmp_path, 2)
    os.makedirs(tmp_path / "checkpoint-000099")                              # left empty by hand
    write(str(tmp_path / "checkpoint-000098" / "trainer_state.json"), "{}")  # no weights
    run = RunDir(str(tmp_path), flags(resume=True), resume=True)
    assert run.checkpoint == str(tmp_path / "checkpoint-000002")
    assert capsys.readouterr().out.count("is not a complete checkpoint") == 2
    write(str(tmp_path / "checkpoint-000002" / "trainer_state.json"), json.dumps({"step": 2}))   # no layout
    with pytest.raises(UserError, match="checkpoint-000002: the checkpoint is incomplete or damaged .*'state_layout'"):
        load_checkpoint(run.checkpoint)


def test_a_refused_resume_leaves_args_json_and_a_spelling_of_the_same_path_is_the_same_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    RunDir("out", flags(out="out", data="math=data.jsonl")).log({"step": 0})
    write(str(tmp_path / "data.jsonl"), "")
    checkpoint(tmp_path / "out", 2)
    before = (tmp_path / "out" / "args.json").read_text()
    with pytest.raises(UserError, match="--lr 0.001 -> 0.5"):
        RunDir("out", flags(out="out", data="math=data.jsonl", lr=0.5, resume=True), resume=True)
    same = RunDir(str(tmp_path / "out"), flags(out=str(tmp_path / "out"), data=f"math={tmp_path}/data.jsonl",
                                               resume=True, steps=20), resume=True)
    assert (tmp_path / "out" / "args.json").read_text() == before      # written only once the run begins
    same.begin(2)
    assert read_json(str(tmp_path / "out" / "args.json"))["steps"] == 20


def test_a_checkpoint_already_there_is_never_rewritten(tmp_path):
    path = checkpoint(tmp_path, 5, text="first")
    inode = os.stat(os.path.join(path, "trainer_state.json")).st_ino
    assert checkpoint(tmp_path, 5, text="second") == path               # a resumed run reaching step 5 again
    assert os.stat(os.path.join(path, "trainer_state.json")).st_ino == inode
    assert (tmp_path / "checkpoint-000005" / "model" / "weights.txt").read_text() == "first"


@pytest.mark.parametrize("failing", ["save_file", "atomic_write_json", "save_pretrained"])
def test_a_full_disk_is_one_line_naming_the_checkpoint_kept(tmp_path, monkeypatch, failing):
    checkpoint(tmp_path, 1)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if failing == "save_pretrained":
        monkeypatch.setattr(Weights, "save_pretrained", full)
    else:
        monkeypatch.setattr(common, failing, full)
    with pytest.raises(UserError) as e:
        checkpoint(tmp_path, 2)
    message = str(e.value)
    assert "checkpoint-000002" in message and "No space left on device" in message and "\n" not in message
    assert message.endswith(f"the last checkpoint, {tmp_path}/checkpoint-000001, is kept")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-000001"]        # nothing half-written is left


def test_stray_temporary_files_are_cleared_and_files_follow_the_umask(tmp_path):
    RunDir(str(tmp_path), flags()).log({"step": 0})
    checkpoint(tmp_path, 1)
    write(str(tmp_path / ".tmp-abc123"), "a file a killed atomic_write_text left")
    os.makedirs(tmp_path / ".tmp-checkpoint-000002-x")
    RunDir(str(tmp_path), flags(resume=True), resume=True)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    old = os.umask(0o022)
    try:
        path = checkpoint(tmp_path, 2)
        common.atomic_write_json(str(tmp_path / "x.json"), {})
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o755
    assert os.stat(os.path.join(path, "trainer_state.json")).st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "x.json").st_mode & 0o777 == 0o644


def test_checkpoints_are_new_directories_and_the_old_ones_are_pruned(tmp_path):
    for step in (1, 2, 3):
        checkpoint(tmp_path, step, text=f"w{step}")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-000003"]            # keep=1
    for step in (4, 5):
        save_checkpoint(str(tmp_path), step, Weights("w"), {"state": {}, "param_groups": []}, {}, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-000004", "checkpoint-000005"]
    assert (tmp_path / "checkpoint-000005" / "model" / "weights.txt").read_text() == "w"


@pytest.mark.parametrize("stray", ["an empty folder", "a file"])
def test_a_stray_newer_entry_prunes_no_real_checkpoint(tmp_path, capsys, stray):
    """checkpoint-000099 left by hand beside a run at step 4 (issue 45): the resume names it and
    passes it over, the next save keeps its own newest checkpoint (it used to keep the stray, the last
    name in sort order, and delete every real one), and entries that are not this run's stay."""
    RunDir(str(tmp_path), flags()).log({"step": 0})
    checkpoint(tmp_path, 4)
    stray_path = tmp_path / "checkpoint-000099"
    os.makedirs(stray_path) if stray == "an empty folder" else write(str(stray_path), "x")
    os.makedirs(tmp_path / "checkpoint-000002-backup" / "model")          # a name save_checkpoint never writes
    run = RunDir(str(tmp_path), flags(resume=True), resume=True)
    assert run.checkpoint == str(tmp_path / "checkpoint-000004")
    assert f"{stray_path} is not a complete checkpoint; it is not resumed from" in capsys.readouterr().out
    checkpoint(tmp_path, 6)                                                  # --save-every 2, keep 1
    assert sorted(os.listdir(tmp_path)) == [".lock", "args.json", "checkpoint-000002-backup", "checkpoint-000006",
                                            "checkpoint-000099", "metrics.jsonl"]
    assert RunDir(str(tmp_path), flags(resume=True), resume=True).checkpoint == str(tmp_path / "checkpoint-000006")


@pytest.mark.parametrize("lost", ["optimizer.safetensors", "trainer_state.json", "model/config.json", "model"])
def test_a_damaged_only_checkpoint_is_named_with_what_it_lacks(tmp_path, lost):
    """The only checkpoint lost a file: the one-line refusal names it and what it lacks (it used to say
    that the run stopped before its first checkpoint)."""
    RunDir(str(tmp_path), flags()).log({"step": 0})
    checkpoint(tmp_path, 2)
    common.remove(str(tmp_path / "checkpoint-000002" / lost))
    with pytest.raises(UserError) as e:
        RunDir(str(tmp_path), flags(resume=True), resume=True)
    lacks = "model/config.json, model/model.safetensors" if lost == "model" else lost
    message = str(e.value)
    assert f"holds no complete checkpoint to continue from ({tmp_path}/checkpoint-000002 lacks {lacks})" in message
    assert "first one" not in message and "\n" not in message


class HalfLine:
    """A log file on a disk that fills up in the middle of a line: half of it is written, then ENOSPC."""
    def __init__(self, f):
        self.f = f

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(data[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("name", ["metrics.jsonl", "samples.jsonl"])
def test_a_full_disk_on_a_log_append_is_one_line_and_leaves_no_half_line(tmp_path, monkeypatch, name):
    run = RunDir(str(tmp_path), flags())
    run.log({"step": 0}, name=name)
    checkpoint(tmp_path, 1)
    monkeypatch.setattr(common, "open", lambda *a, **k: HalfLine(open(*a, **k)), raising=False)
    with pytest.raises(UserError) as e:
        run.log({"step": 1, "completion": "x" * 40}, name=name)
    assert str(e.value) == (f"could not write {tmp_path}/{name} (No space left on device); what was there before is "
                            f"kept; the last checkpoint, {tmp_path}/checkpoint-000001, is kept")
    assert (tmp_path / name).read_text() == '{"step": 0}\n'                   # no half line


def test_a_half_written_checkpoint_is_never_taken_and_is_cleared_at_the_next_start(tmp_path):
    RunDir(str(tmp_path), flags()).log({"step": 0})
    checkpoint(tmp_path, 2)
    os.makedirs(tmp_path / ".tmp-checkpoint-000003-x1y2" / "model")          # a kill mid-write
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-000002")
    RunDir(str(tmp_path), flags(resume=True), resume=True)
    assert sorted(os.listdir(tmp_path)) == [".lock", "args.json", "checkpoint-000002", "metrics.jsonl"]
    assert not common.is_complete(str(tmp_path / ".tmp-checkpoint-000003-x1y2"))


def test_an_out_that_is_a_file_is_refused(tmp_path):
    write(str(tmp_path / "f"), "x")
    with pytest.raises(UserError, match="is a file, not a directory"):
        RunDir(str(tmp_path / "f"), flags())


def test_resume_refuses_changed_run_flags_and_allows_the_safe_ones(tmp_path):
    RunDir(str(tmp_path), flags(steps=10)).log({"step": 0})
    checkpoint(tmp_path, 2)
    with pytest.raises(UserError, match=r"--lr 0.001 -> 0.01, --seed 0 -> 1;"):
        RunDir(str(tmp_path), flags(resume=True, lr=1e-2, seed=1), resume=True)
    with pytest.raises(UserError, match=r"--steps 10 -> 2"):
        RunDir(str(tmp_path), flags(resume=True, steps=2), resume=True)
    RunDir(str(tmp_path), flags(resume=True, steps=20, eval_every=1), resume=True).begin(2)
    assert read_json(str(tmp_path / "args.json"))["steps"] == 20   # the next resume compares with 20
    with pytest.raises(UserError, match=r"--steps 20 -> 10"):
        RunDir(str(tmp_path), flags(resume=True, steps=10, eval_every=1), resume=True)


def test_a_cut_short_last_log_line_does_not_block_resume(tmp_path):
    write(str(tmp_path / "args.json"), json.dumps(vars(flags())))
    write(str(tmp_path / "metrics.jsonl"), '{"step": 0}\n{"step": 1}\n{"step": 2, "lo')
    checkpoint(tmp_path, 5)
    run = RunDir(str(tmp_path), flags(resume=True), resume=True)
    run.begin(5)
    run.log({"step": 2})
    assert [r["step"] for r in read_jsonl(run.file("metrics.jsonl"))] == [0, 1, 2]
    write(str(tmp_path / "metrics.jsonl"), '{"step": 0}\n{"st\n{"step": 2}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: corrupt line"):
        run.begin(5)


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


def test_a_second_process_is_refused_and_a_killed_ones_lock_is_free(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, argparse, common; common.RunDir(sys.argv[1], "
         "argparse.Namespace()); print('locked', flush=True); time.sleep(60)", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    assert holder.stdout.readline().strip() == "locked"
    probe = [sys.executable, "-c", "import sys, argparse, common; common.RunDir(sys.argv[1], "
             "argparse.Namespace())", str(tmp_path)]
    refused = subprocess.run(probe, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    assert refused.returncode != 0 and "is in use by another run" in refused.stderr
    holder.kill()
    holder.wait()                                  # the OS released its lock with the process
    taken = subprocess.run(probe, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    assert taken.returncode == 0, taken.stderr


# -- saves under kills and Ctrl-C at every point -------------------------------------------------

KILL_PROBE = r'''
"""Write checkpoint-000002 after a complete checkpoint-000001, killed (SIGKILL) or interrupted
(SIGINT) in a forked child at the n-th file operation of the save; report what is on disk."""
import json, os, shutil, signal, sys
import torch
import common

class Weights:
    def __init__(self, text): self.text = text
    def save_pretrained(self, path):
        os.makedirs(path, exist_ok=True)
        for name in ("weights.txt", "config.json", "model.safetensors"):
            open(os.path.join(path, name), "w").write(self.text)

def save(out, step):
    opt = {"state": {0: {"exp_avg": torch.ones(2) * step}}, "param_groups": []}
    common.save_checkpoint(out, step, Weights(f"w{step}"), opt, {"rng": [step]})

def hooked(hit, sig, calls):
    """Patch the save's file operations so that the hit-th one sends sig first; calls records them."""
    def hook(name, real):
        def wrapped(*a, **k):
            calls.append(name)
            if len(calls) == hit:
                os.kill(os.getpid(), sig)
            return real(*a, **k)
        return wrapped
    os.rename, os.fsync, shutil.rmtree = hook("rename", os.rename), hook("fsync", os.fsync), hook("rmtree", shutil.rmtree)

def scenario(root, hit, sig):
    out = os.path.join(root, f"{hit}-{sig}")
    save(out, 1)
    pid = os.fork()
    if pid == 0:
        hooked(hit, sig, [])
        try:
            save(out, 2)
        except KeyboardInterrupt:
            os._exit(130)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    how = "killed" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
    last = common.latest_checkpoint(out)
    state = json.load(open(os.path.join(last, "trainer_state.json")))
    return {"hit": hit, "signal": sig, "how": how, "left": sorted(os.listdir(out)), "last": os.path.basename(last),
            "step": state["step"], "weights": open(os.path.join(last, "model", "weights.txt")).read()}

root = sys.argv[1]
calls = []                                   # the save's file operations, in order, uninterrupted
save(os.path.join(root, "plain"), 1)
real = os.rename, os.fsync, shutil.rmtree
hooked(0, None, calls)
save(os.path.join(root, "plain"), 2)
os.rename, os.fsync, shutil.rmtree = real
print(json.dumps({"calls": calls, "runs": [scenario(root, hit, sig) for sig in (signal.SIGKILL, signal.SIGINT)
                                           for hit in range(1, len(calls) + 1)]}))
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
                         text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=300, preexec_fn=default_sigint)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_kill_or_ctrl_c_at_any_point_of_a_save_leaves_whole_checkpoints(kill_results):
    """A signal before each file operation of the save (fsyncs of the files written under the
    temporary name, its rename into place, the removal of the older checkpoint): the newest
    complete checkpoint is whole at every point, the old one until the rename, the new one after."""
    calls = kill_results["calls"]
    renamed_at = calls.index("rename") + 1                    # the hit that falls on the rename
    assert calls.count("rename") == 1 and "fsync" in calls[:renamed_at] and "rmtree" in calls[renamed_at:]
    for r in kill_results["runs"]:
        assert r["how"] == ("killed" if r["signal"] == signal.SIGKILL else "exit 130"), r
        assert r["weights"] == f"w{r['step']}" and r["last"] == f"checkpoint-{r['step']:06d}", r
        assert r["step"] == (1 if r["hit"] <= renamed_at else 2), r
        if r["signal"] == signal.SIGINT:        # Ctrl-C: the temporary directory is cleaned up at once
            assert not [n for n in r["left"] if n.startswith(".tmp-")], r
    assert any(n.startswith(".tmp-") for r in kill_results["runs"] if r["signal"] == signal.SIGKILL for n in r["left"])


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(str(tmp_path / "model")) as tmp:
            write(os.path.join(tmp, "a.txt"), "half")
            raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == []


# -- run_main end to end: one-line refusals, Ctrl-C, the lock, resume, torchrun --------------------

STAGE = r'''
"""A minimal stage built the way the real ones are: ranged flags, RunDir, checkpoints, progress."""
import os, time
from common import RunDir, load_checkpoint, progress, run_main, save_checkpoint
from common import ArgumentParser, ranged
parser = ArgumentParser(prog="stage.py")
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=ranged(int, 1), default=10)
parser.add_argument("--save-every", type=ranged(int, 1), default=5)
parser.add_argument("--lr", type=float, default=0.1)
parser.add_argument("--resume", action="store_true")
SLEEP = float(os.environ.get("STAGE_SLEEP", 0))   # seconds per step: slow enough to interrupt

class Weights:
    def save_pretrained(self, path):
        os.makedirs(path)
        for name in ("config.json", "model.safetensors"):
            open(os.path.join(path, name), "w").write("{}")

def main():
    args = parser.parse_args()
    run = RunDir(args.out, args, resume=args.resume)
    start = load_checkpoint(run.checkpoint)[0]["step"] if run.checkpoint else 0
    if run.checkpoint:
        run.begin(start)
    for step in progress(range(start, args.steps), "stage", total=args.steps, initial=start):
        time.sleep(SLEEP)
        run.log({"step": step})
        if (step + 1) % args.save_every == 0:
            save_checkpoint(args.out, step + 1, Weights(), {"state": {}, "param_groups": []}, {})

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
    parser = ArgumentParser(prog="stage.py")
    parser.add_argument("--steps", type=ranged(int, 1), default=10)
    parser.add_argument("--lr", type=ranged(float, above=0), default=0.1)
    for argv, message in ((["--steps", "x"], "--steps expected an integer, got 'x'"),
                          (["--steps", "0"], "--steps must be >= 1, got 0"),
                          (["--lr", "nan"], "--lr must be a finite number, got nan"),
                          (["--lr", "inf"], "--lr must be a finite number, got inf")):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(argv)
        assert e.value.code == 2
        assert capsys.readouterr().err == f"error: {message} (see python stage.py --help)\n"

    def main():
        raise UserError("first line\nsecond line")    # whatever raised it, the user sees one line
    with pytest.raises(SystemExit) as e:
        common.run_main(main)
    assert e.value.code == 2 and capsys.readouterr().err == "error: first line second line\n"


def test_ctrl_c_says_where_the_run_stopped_and_how_to_continue(stage, tmp_path):
    out = tmp_path / "run"
    proc = stage.start("--out", out, "--steps", "400", "--save-every", "5", sleep=0.02)
    wait_for_lines(out / "metrics.jsonl", 7, proc)        # past the checkpoint at step 5
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    last = stderr.strip().splitlines()[-1]
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert last.startswith(f"interrupted ({out}: last checkpoint {out}/checkpoint-0000"), last
    command = last.split("continue with: ")[1].rstrip(")")
    assert command == f"python stage.py --out {out} --steps 400 --save-every 5 --resume", last
    # the printed command continues the run to the end, each step logged once
    rc, _, err = stage(*command.split()[2:])
    assert rc == 0, err
    assert [r["step"] for r in read_jsonl(str(out / "metrics.jsonl"))] == list(range(400))


def test_interrupt_message_of_a_run_without_checkpoints(tmp_path, monkeypatch):
    out = str(tmp_path / "vae")
    monkeypatch.setattr(sys, "argv", ["train_vae.py", "--out", out])
    run = RunDir(out, argparse.Namespace(out=out))
    assert run.interrupted() == f"{out}: no checkpoint was written yet; start again with: python train_vae.py --out {out}"


def test_second_run_refused_then_kill_and_resume(stage, tmp_path):
    out = tmp_path / "run"
    proc = stage.start("--out", out, "--steps", "3000", sleep=0.02)
    wait_for_lines(out / "metrics.jsonl", 7, proc)
    rc, _, err = stage("--out", out, "--steps", "3000", "--resume")
    assert rc == 2 and err.count("\n") == 1 and "is in use by another run" in err, err
    proc.kill()
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    rc, stdout, err = stage("--out", out, "--steps", "3000", "--save-every", "1000", "--resume")
    assert rc == 0, (stdout, err)
    assert [r["step"] for r in read_jsonl(str(out / "metrics.jsonl"))] == list(range(3000))


def test_progress_in_a_log_file_is_a_few_updates_and_silent_off_rank_0(monkeypatch, capsys):
    bar = progress(range(3000), "stage")                         # stderr is not a terminal here
    for _ in bar:
        bar.set_postfix(loss="0.5")                              # never forces an update
    err = capsys.readouterr().err
    assert err.count("\r") <= 3 and "stage: 100%" in err and "3000/3000" in err and "loss=0.5" in err, err
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
    lines = [line for line in (out + err).splitlines() if line.strip()]
    message = "error: --steps must be >= 1, got 0 (see python stage.py --help)"
    assert rc != 0 and lines[0] == message, lines[:3]
    tracebacks = [line.split("traceback : ", 1)[1] for line in lines if "traceback : " in line]
    assert tracebacks and all(t == message or t.startswith("Signal 15 (SIGTERM)") for t in tracebacks), tracebacks
    assert (out + err).count(message) == 1 + tracebacks.count(message)    # no other copy, no trace
    assert lines[-2] == f"  traceback : {message}" and set(lines[-1]) == {"="}, lines[-3:]


def test_nccl_gets_a_timeout_and_a_device_id_and_cudnn_attention_is_off(monkeypatch):
    """Under torchrun on a GPU: NCCL's 10-minute default would stop a run whose ranks wait while one
    generates longer completions or rank 0 writes a checkpoint of tens of GB; the device id binds
    each rank's communicator to its GPU; cuDNN's attention (whose masked backward gives NaN on torch
    2.11, pytorch#196678) is switched off. Checked with the CUDA calls stubbed on this CPU machine."""
    import datetime
    import torch.distributed as dist
    calls = {}
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.setdefault("set_device", device))
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", lambda on: calls.setdefault("cudnn_sdp", on))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.setdefault("init", kw))
    ddp, rank, world, device = common.compute_init()
    assert (ddp, rank, world, device) == (True, 3, 4, torch.device("cuda", 1))
    assert calls["init"]["backend"] == "nccl" and calls["init"]["device_id"] == torch.device("cuda", 1)
    assert calls["init"]["timeout"] >= datetime.timedelta(hours=1)
    assert calls["cudnn_sdp"] is False and calls["set_device"] == torch.device("cuda", 1)
