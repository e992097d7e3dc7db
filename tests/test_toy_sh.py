"""runs/toy.sh, the main job, end to end as a user runs it: `TINY=1 bash runs/toy.sh` in a copy of
the working tree (tracked and untracked files, nothing ignored, no ../shared beside it), made a git
repository of its own so that `git status` can say what the job changed. Then what each stage
wrote is checked for what it is: the world's fingerprint against one recomputed from its weights,
one metrics record per RL step under each arm's schedule, the report's rows and pictures, and the
five-line summary against the stage outputs its numbers come from. A second run (QUICK=1) must
skip every stage and redo none. In a session that collects this file, conftest.py starts the job
as soon as the tests are collected, so that its 90 s on one thread overlap the tests before it.

Run:  python -m pytest tests/test_toy_sh.py -q        (about 2 minutes on 2 cores)
"""
import hashlib
import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W = "runs/toy_tiny"
STAGES = ("base", "vae", "sft", "sft_plain", "rl_none", "rl_linear")
ARMS = ("baseline", "linear L=1", "two-stage L=1", "linear L=8")      # toy/report.py's, in its order
THREADS = int(os.environ.get("OMP_NUM_THREADS", 1))                  # TINY=1's one thread unless set
PNG = b"\x89PNG\r\n\x1a\n"
# runs/toy.sh's CPU settings (the reproducible mode) unless the caller's environment sets them
MKL_CBWR = os.environ.get("MKL_CBWR", "COMPATIBLE")
CAPABILITY = subprocess.run(
    ["python", "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"], capture_output=True, text=True,
    env={**os.environ, "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY", "avx2")}).stdout.strip()


def git(cwd, *args):
    identity = ["-c", "user.name=test", "-c", "user.email=test@localhost", "-c", "commit.gpgsign=false"]
    return subprocess.run(["git", *identity, *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def copy_of_the_working_tree(root):
    """The working tree (tracked and untracked files, nothing ignored) copied to root and made a git
    repository of its own, so that `git status` there says what the job changed."""
    for name in git(REPO, "ls-files", "--cached", "--others", "--exclude-standard").splitlines():
        if os.path.isfile(os.path.join(REPO, name)):                  # a deleted tracked file stays deleted
            os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
            shutil.copy2(os.path.join(REPO, name), os.path.join(root, name))
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "the working tree")
    assert git(root, "status", "--porcelain") == ""


ENV = {k: v for k, v in os.environ.items() if k not in ("TINY", "QUICK", "SETTING")}


def start_job(root):
    """Start `TINY=1 bash runs/toy.sh` in a copy of the working tree at root. conftest.py calls it
    when the session's tests are collected, so the job (one thread, about 90 s) runs beside the
    tests before this file's, at the lowest priority: it takes the core a one-thread test leaves
    idle, and yields to a test's second thread (the tests slowed 5x beside it at equal priority);
    the fixture below waits for it."""
    copy_of_the_working_tree(root)
    with open(job_log(root, "out"), "w") as out, open(job_log(root, "err"), "w") as err:
        return subprocess.Popen("TINY=1 bash runs/toy.sh", shell=True, cwd=root, env=ENV, stdout=out, stderr=err,
                                start_new_session=True, preexec_fn=lambda: os.nice(19))


def job_log(root, stream):
    """Where the job started at root writes its stdout ("out") or stderr ("err"): beside the copy."""
    return os.path.join(os.path.dirname(root), f"job.{stream}")


@pytest.fixture(scope="module")
def job(request, tmp_path_factory):
    """(the copy's root, the job's output, the second run's stdout)."""
    started = getattr(request.config, "toy_sh_job", None)
    if started is None:                                     # not started at collection: start it now
        root = str(tmp_path_factory.mktemp("clone") / "nanopalette")
        started = (root, start_job(root))
    root, process = started
    returncode = process.wait(timeout=900)
    first = open(job_log(root, "out")).read()
    assert returncode == 0, first[-2000:] + open(job_log(root, "err")).read()[-3000:]
    made = {s: os.path.getmtime(f"{root}/{W}/{s}") for s in STAGES}
    second = subprocess.run("TINY=1 QUICK=1 bash runs/toy.sh", shell=True, cwd=root, env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert {s: os.path.getmtime(f"{root}/{W}/{s}") for s in STAGES} == made      # no stage was redone
    return root, first, second.stdout


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def fingerprint(model_dir):
    """The world's fingerprint as toy.provenance's docstring states it, recomputed here."""
    tensors = load_file(os.path.join(model_dir, "model.safetensors"))
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(tensors[key].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


def final_pass1(root, estimator, arm):
    """Held-out greedy pass@1 after RL of one of the report's runs, from its metrics.jsonl."""
    run = f"{root}/{W}/report/rl/{estimator}_{arm.replace(' ', '_').replace('=', '')}_seed0"
    return read_jsonl(f"{run}/metrics.jsonl")[-1]["eval_pass1"]


def test_the_job_changes_no_tracked_file_and_writes_only_under_its_directory(job):
    root, _, _ = job
    assert git(root, "status", "--porcelain") == ""
    ignored = [line[3:] for line in git(root, "status", "--porcelain", "--ignored").splitlines()]
    assert ignored and all(p.startswith(W + "/") or "__pycache__" in p for p in ignored), ignored


def test_every_stage_wrote_its_output(job):
    root, _, _ = job
    w = f"{root}/{W}"
    world = read_json(f"{w}/base/world_report.json")
    assert world["n_problems"] == 40 and 0 <= world["greedy_pass@1"] <= 1
    assert world["provenance"] == {"cpu_capability": CAPABILITY, "threads": THREADS, "mkl_cbwr": MKL_CBWR,
                                   "weights_sha256": fingerprint(f"{w}/base")}
    assert len(read_jsonl(f"{w}/data/math_test.jsonl")) == 100
    assert -1 <= read_json(f"{w}/vae/vae.json")["silhouette"] <= 1
    for picture in (f"{w}/vae/latents.png", f"{w}/report/rl/reward_curves.png"):
        assert open(picture, "rb").read(8) == PNG, picture
    for warmup in ("sft", "sft_plain"):
        assert read_json(f"{w}/{warmup}/model/config.json")["model_type"] == "qwen3"
    palette = read_jsonl(f"{w}/palette.jsonl")                   # infer.py: 2 prompts x 4 latents
    assert sorted((r["prompt"], r["latent"]) for r in palette) == \
        sorted((p, z) for p in ("47+38=?", "268+157=?") for z in range(4))


@pytest.mark.parametrize("arm, schedule", [("rl_none", "none"), ("rl_linear", "linear")])
def test_each_rl_arm_logged_every_step_under_its_schedule(job, arm, schedule):
    root, _, _ = job
    records = read_jsonl(f"{root}/{W}/{arm}/metrics.jsonl")
    steps = [r for r in records if "reward_mean" in r]
    assert [r["step"] for r in steps] == list(range(6))
    assert read_json(f"{root}/{W}/{arm}/args.json")["schedule"] == schedule
    rho = [r["rho"] for r in steps]
    if schedule == "none":
        assert rho == [0.0] * 6
    else:                                       # every rollout prefixed at first, then fewer and fewer
        assert rho[0] == 1.0 and rho == sorted(rho, reverse=True) and rho[-1] <= 0.25
    assert records[-1]["step"] == 6 and 0 <= records[-1]["eval_pass1"] <= 1


def test_the_report_names_each_arm_with_numbers(job):
    root, _, _ = job
    md = open(f"{root}/{W}/report/report.md").read()
    results = read_json(f"{root}/{W}/report/report.json")
    for estimator in ("grpo", "rloo"):
        for arm in ARMS:
            final = 100 * final_pass1(root, estimator, arm)
            assert results["rl"][estimator][arm] == [final / 100]
            assert f"| {estimator} | {arm} | {final:.1f} ± 0.0 | {final:.1f} |" in md
    configs = read_json(f"{root}/{W}/report/inference/results.json")["configs"]
    assert len(configs) == 6
    assert results["inference"] == {name: next(iter(c["benchmarks"].values())) for name, c in configs.items()}
    assert "This is a tiny world" in md and f"base weights sha256 {fingerprint(f'{root}/{W}/base')}" in md
    assert results["provenance"] == read_json(f"{root}/{W}/base/world_report.json")["provenance"]


def test_the_summary_says_where_each_output_is_and_its_numbers_are_the_stages(job):
    root, out, _ = job
    w = f"{root}/{W}"
    lines = out.rstrip("\n").splitlines()
    where = lines[lines.index("Outputs:") + 1:-6]
    assert len(where) == 7
    for line in where:                          # "  what it is      path, path" (or "path; path")
        for path in line.split("  ")[-1].replace(";", ",").split(", "):
            assert os.path.exists(f"{root}/{path.strip()}"), line
    pct = lambda v: f"{100 * v:.1f}%"
    world, sft = read_json(f"{w}/base/world_report.json"), read_jsonl(f"{w}/sft/summary.jsonl")[0]
    inference = {name: next(iter(c["benchmarks"].values()))
                 for name, c in read_json(f"{w}/report/inference/results.json")["configs"].items()}
    a = ", ".join(f"{label} {pct(inference[name]['pass@4'])} ({inference[name]['distinct_answers']:.1f})"
                  for label, name in (("token sampling T=1", "token sampling T=1"),
                                      ("greedy per vae latent", "greedy per latent, vae L=1"),
                                      ("per noise latent", "greedy per latent, noise L=1")))
    b = []
    for e in ("grpo", "rloo"):
        best = max(ARMS[1:], key=lambda arm: final_pass1(root, e, arm))      # the first of equals
        b.append(f"{e.upper()} baseline {pct(final_pass1(root, e, 'baseline'))}, best palette arm ({best}) "
                 f"{pct(final_pass1(root, e, best))}")
    assert lines[-6].startswith("Summary (a tiny world (TINY=1): its numbers show only that every stage ran")
    assert lines[-5:] == [
        f"  world    base greedy pass@1 {pct(world['greedy_pass@1'])}; base weights sha256 {fingerprint(f'{w}/base')}, "
        f"CPU capability {CAPABILITY}, MKL_CBWR {MKL_CBWR}, threads {THREADS}",
        f"  warm-up  greedy pass@1 without prefix {pct(sft['before']['pass1_no_prefix'])} -> "
        f"{pct(sft['after']['pass1_no_prefix'])}",
        f"  (a)      pass@4 (distinct answers per problem): {a}",
        f"  (b)      held-out greedy pass@1 after 6 RL steps, mean of 1 seed: {'; '.join(b)}",
        f"  (c)      silhouette of math / code / qa in latent space {read_json(f'{w}/vae/vae.json')['silhouette']:.3f}"]


def test_a_second_run_skips_every_stage(job):
    _, _, second = job
    assert f"{W}: world exists, skipping" in second
    for stage in STAGES[1:]:
        assert f"== {W}/{stage} is done: skipping" in second
    assert "Summary" not in second                              # QUICK=1 stops before the report
