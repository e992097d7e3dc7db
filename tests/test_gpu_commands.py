"""Every GPU command of the README, the scripts' docstrings and docs/, run as written in miniature on the
CPU with every branch a CUDA device takes forced on: the compiled decode (Inductor on the CPU) with its
bucketed KV cache (tests/gpu_runner.py sets model.COMPILE_DECODE), FSDP2 and bf16 as the command asks,
2 gloo ranks where it says torchrun, on the tiny world's model (grouped-query attention: 4 heads, 2 KV).

Each command is read from its file (a changed doc is tested as written): a line that starts with
`torchrun` or `python <script>.py` and says torchrun, --dtype bfloat16 or GPU (on it or the line
before), backslash continuations joined. Only paths and sizes are rewritten (PATHS and SIZES below); every
other flag must be one that KEEP names, so a doc that gains a flag says here whether it costs time. Commands that
exist only in prose (PROSE) are built from the command they refer to. Each run exits 0, writes what it
should, and its decoding took the path a GPU takes: compiled and bucketed, eager under FSDP, in bf16.
Beside them: a sharded model (fsdp.Sharded) decodes the same greedy tokens as the whole model's
compiled step, on every rank.

Run:  python -m pytest tests/test_gpu_commands.py -q -s   (about two minutes on two idle cores with a
      warm Inductor cache, a minute more with a cold one; it builds the tiny world of tests/test_stages.py;
      -s prints each run's time)
"""
import ast
import dataclasses
import glob
import json
import os
import pathlib
import re
import resource
import shlex
import subprocess
import sys
import time

import pytest

from conftest import REPO

RUNNER = os.path.join(REPO, "tests", "gpu_runner.py")
SCRIPTS = ("sft_warmup.py", "rl.py", "infer.py", "evaluate.py")

# -- reading the commands ------------------------------------------------------------------------

def documents():
    """(path, first line number, text): README.md, docs/*.md, and each top-level script's docstring."""
    for path in ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md"))):
        yield path, 1, open(os.path.join(REPO, path), encoding="utf-8").read()
    for path in sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "*.py"))):
        tree = ast.parse(open(os.path.join(REPO, path), encoding="utf-8").read())
        if (doc := ast.get_docstring(tree, clean=False)) is not None:
            yield path, tree.body[0].lineno, doc


COMMAND = re.compile(r"(torchrun(?: --nproc_per_node \d+)?|python) (\S+\.py)\b")


def gpu_commands():
    """{"file:line": command text} of every GPU command the documents give."""
    found = {}
    for path, first, text in documents():
        lines = text.split("\n")
        i = 0
        while i < len(lines):
            start, line = i, lines[i]
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + " " + lines[i].strip()
            command = line.strip()
            before = lines[start - 1] if start else ""
            if COMMAND.match(command) and ("torchrun" in command or "bfloat16" in command or "GPU" in before + command):
                found[f"{path}:{first + start}"] = command
            i += 1
    return found


COMMANDS = gpu_commands()

# Commands that exist only in prose: name -> (the file that says it, the sentence, the script whose GPU
# command of that file it refers to, the flags it adds).
PROSE = {
    "rl.py: resume": ("rl.py", "Resume a killed run from its newest checkpoint: the same command with --resume.",
                      "rl.py", ["--resume"]),
    "README.md: plain warm-up": ("README.md", "(and the plain one for baselines)", "sft_warmup.py",
                                 ["--prefix-source", "none"]),
}

# -- the miniature: what each flag becomes ------------------------------------------------------------

# Paths (argparse dest -> the tiny world's file); hub ids and runs/... alike.
PATHS = {
    "model": lambda w, v: w["model"],
    "vae": lambda w, v: w["vae"],
    "data": lambda w, v: ",".join(f"{d}{eq}{w['train']}" for d, eq, _ in (item.rpartition("=") for item in v.split(","))),
    "eval_data": lambda w, v: w["test"],
    "prompts_file": lambda w, v: w["test"],
    "benchmarks": lambda w, v: ",".join(w["benchmark"](b.strip()) for b in v.split(",") if b.strip()),
    "out": lambda w, v: w["out"],
}
# Sizes (dest -> its tiny value or a function of the written one, and whether it is set when the command
# leaves it at its default, which is a GPU run's size).
TINY_N = 2
SIZES = {
    "nproc_per_node": (2, True),
    "steps": (1, True),
    "prompts_per_step": (2, True),
    "group_size": (2, True),
    "max_new_tokens": (4, True),
    "batch_size": (2, True),
    "n": (TINY_N, True),
    "k": (lambda v: ",".join(str(k) for k in sorted({min(int(k), TINY_N) for k in v.split(",")})), False),
    "num_latents": (2, True),
    "eval_max_new_tokens": (4, False),
    "eval_problems": (2, False),
    "per_domain_cap": (200, False),
}
# Flags kept as written: they choose a path, not a size.
KEEP = {"fsdp", "dtype", "template", "mode", "schedule", "L", "lr", "region", "prefix_source", "prompt", "tie", "seed",
        "temperature", "top_p", "credit", "estimator", "clip_eps", "kl_coef",
        "aggregation", "weight_decay", "grad_clip", "warmup_steps", "activation_checkpointing", "micro_batch_size",
        "config_name", "resume", "limit", "save_every", "eval_every"}


def parser_of(script):
    import importlib
    return importlib.import_module(script[:-3]).parser


def dests(parser, argv, where):
    """[(flag as written, dest, value or None)] of argv, by the script's own parser."""
    out, i = [], 0
    while i < len(argv):
        flag, _, inline = argv[i].partition("=")
        action = parser._option_string_actions.get(flag)
        assert action is not None, f"{where}: {argv[i]!r} is not a flag of {parser.prog}"
        if action.nargs == 0:
            out.append((flag, action.dest, None))
        else:
            value = inline if inline else argv[i + 1]
            i += 0 if inline else 1
            out.append((flag, action.dest, value))
        i += 1
    return out


def miniature(where, command, world, out):
    """(nproc or None, script, argv): the command with its paths and sizes rewritten."""
    words = shlex.split(command, comments=True)
    nproc, argv = None, []
    if words[0] == "torchrun":
        launcher = words[1:next(i for i, w in enumerate(words) if w.endswith(".py"))]
        assert launcher[:1] in ([], ["--nproc_per_node"]) and len(launcher) in (0, 2), \
            f"{where}: torchrun flags {launcher} are not known here; teach miniature() to shrink them"
        nproc, words = SIZES["nproc_per_node"][0], words[len(launcher) + 1:]
    else:
        words = words[1:]
    script, rest = words[0], words[1:]
    assert script in SCRIPTS, f"{where}: {script} is a GPU command this test does not run yet"
    parser = parser_of(script)
    paths = dict(world, out=str(out))
    given = set()
    for flag, dest, value in dests(parser, rest, where):
        given.add(dest)
        if dest in PATHS:
            value = PATHS[dest](paths, value)
        elif dest in SIZES:
            tiny = SIZES[dest][0]
            value = tiny(value) if callable(tiny) else str(tiny)
        elif dest not in KEEP:
            raise AssertionError(f"{where}: {flag} is neither a path, a size nor a flag kept as written; add it to "
                                 "tests/test_gpu_commands.py's PATHS, SIZES (with a tiny value) or KEEP")
        argv += [flag] if value is None else [flag, value]
    known = {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings}
    for dest, (tiny, always) in SIZES.items():
        if always and dest in known and dest not in given:
            argv += [known[dest], str(tiny)]
    return nproc, script, argv


def identity(nproc, script, argv):
    """What a run does, --out aside: two documented commands that parse alike run once."""
    args = vars(parser_of(script).parse_args(argv))
    args.pop("out")
    return nproc, script, json.dumps(args, sort_keys=True, default=str)


# -- running them ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    nproc: int | None                          # None: one process
    script: str
    argv: list
    out: pathlib.Path
    seconds: float
    cpu_seconds: float                         # of every process it started
    result: subprocess.CompletedProcess
    reports: list                              # each rank's GPU_RUNNER_REPORT (tests/gpu_runner.py)

    def flag(self, name):
        return self.argv[len(self.argv) - 1 - self.argv[::-1].index(name) + 1]      # the last one given wins


def launch(nproc, script, argv, out, report):
    """The command through tests/gpu_runner.py, under torchrun if nproc."""
    cmd = [sys.executable, RUNNER, script] if nproc is None else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), RUNNER, script]
    env = dict(os.environ, OMP_NUM_THREADS="1" if nproc else "2", PYTHONPATH=REPO, GPU_RUNNER_REPORT=str(report))
    t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(cmd + argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    reports = [json.load(open(p)) for p in sorted(glob.glob(f"{report}.rank*.json"))]
    return Run(nproc, script, argv, pathlib.Path(out), time.perf_counter() - t0,
               cpu.ru_utime + cpu.ru_stime - cpu0.ru_utime - cpu0.ru_stime, result, reports)


@pytest.fixture(scope="module")
def tiny(stages_world, tmp_path_factory):
    """run(where, command, extra flags): the command in miniature on the tiny world, run once for every
    command that parses alike; run.world: the world's files."""
    config = json.load(open(stages_world / "base" / "config.json"))
    assert config["num_key_value_heads"] < config["num_attention_heads"], "the commands should run grouped-query attention"
    root = tmp_path_factory.mktemp("gpu_commands")
    rows = open(stages_world / "math_test.jsonl").read().splitlines()

    def benchmark(name):                            # a named benchmark or a file: 2 problems of the toy world
        path = root / "benchmarks" / (os.path.splitext(os.path.basename(name))[0] + ".jsonl")
        path.parent.mkdir(exist_ok=True)
        path.write_text("\n".join(rows[:2]) + "\n")
        return str(path)
    world = {"model": str(stages_world / "base"), "vae": str(stages_world / "vae"),
             "train": str(stages_world / "math_train.jsonl"), "test": str(stages_world / "math_test.jsonl"),
             "benchmark": benchmark}
    runs = {}

    def run(where, command, extra=()):
        out = root / re.sub(r"[^\w.-]+", "_", where)
        nproc, script, argv = miniature(where, command, world, out)
        argv += list(extra)
        if (key := identity(nproc, script, argv)) not in runs:
            runs[key] = launch(nproc, script, argv, out, root / f"{out.name}.report")
            print(f"\n{where}: {runs[key].seconds:.1f} s ({runs[key].cpu_seconds:.1f} s CPU): {script} {shlex.join(argv)}",
                  flush=True)
        return runs[key]
    run.world = world
    return run


def check(run, command):
    """It exited 0, wrote what it should, and decoded as on a GPU."""
    assert run.result.returncode == 0, f"{run.script} exited {run.result.returncode}:\n{run.result.stderr[-4000:]}"
    assert "Traceback" not in run.result.stderr, run.result.stderr[-4000:]
    check_outputs(run)
    check_decoding(run, command)


def check_outputs(run):
    if run.script in ("rl.py", "sft_warmup.py"):
        steps = [json.loads(line)["step"] for line in open(run.out / "metrics.jsonl")]
        assert steps == list(range(int(run.flag("--steps")))), steps
        assert os.path.isfile(run.out / "model" / "model.safetensors") and os.path.isfile(run.out / "model" / "config.json")
    if run.script == "rl.py":
        assert os.path.isfile(run.out / f"checkpoint-{int(run.flag('--steps')):06d}" / "optimizer.safetensors")
    if run.script == "infer.py":
        blocks = re.findall(r"^=== prompt (\d+) \| latent (\d+)", run.result.stdout, re.M)
        expected = [(str(p), str(i)) for i in range(int(run.flag("--num-latents"))) for p in range(run.argv.count("--prompt"))]
        assert blocks == expected, run.result.stdout[-2000:]
    if run.script == "evaluate.py":
        (entry,) = json.load(open(run.out / "results.json"))["configs"].values()
        names = [os.path.splitext(os.path.basename(b))[0] for b in run.flag("--benchmarks").split(",")]
        assert sorted(entry["benchmarks"]) == sorted(names), entry
        assert entry["k"] == [int(k) for k in run.flag("--k").split(",")], entry


def check_decoding(run, command):
    """Every generate() call took a GPU's path: under FSDP eager with the gathered weights, else compiled with
    the bucketed cache; in bf16 where the command asks for it; on every rank."""
    assert len(run.reports) == (run.nproc or 1), f"a rank wrote no report:\n{run.result.stderr[-3000:]}"
    calls = [c for r in run.reports for c in r["calls"]]
    args = vars(parser_of(run.script).parse_args(run.argv))
    if run.script != "sft_warmup.py" or args["prefix_source"] != "none":     # the plain warm-up alone decodes nothing
        assert calls, "the command decoded nothing, so its GPU decode path went untested"
    for c in calls:
        assert c["fsdp"] == args.get("fsdp", False), c
        assert (c["bucket"] is None) == c["fsdp"], f"generate() {'compiled under FSDP' if c['fsdp'] else 'ran eagerly'}: {c}"
        assert c["dtype"] == ("torch.bfloat16" if args["dtype"] == "bfloat16" else "torch.float32"), c
    assert all(r["graphs"] >= 1 for r in run.reports if any(c["bucket"] for c in r["calls"])), "nothing was compiled"


def prose_command(name):
    """(where, command, flags added) of a command given in prose, the sentence read from its file."""
    path, sentence, script, extra = PROSE[name]
    assert sentence in " ".join(open(os.path.join(REPO, path), encoding="utf-8").read().split()), \
        f"{path} no longer says {sentence!r}: update PROSE in tests/test_gpu_commands.py"
    (where,) = [w for w, c in COMMANDS.items() if w.startswith(f"{path}:") and COMMAND.match(c).group(2) == script]
    return where, COMMANDS[where], extra


# -- the tests -------------------------------------------------------------------------------------

def test_the_documents_give_each_stage_a_gpu_command():
    """The reader finds the commands: each stage's docstring gives one, and the README gives several."""
    assert {COMMAND.match(c).group(2) for c in COMMANDS.values()} == set(SCRIPTS), COMMANDS
    for script in SCRIPTS:
        assert any(where.startswith(f"{script}:") for where in COMMANDS), f"{script}'s docstring gives no GPU command"
    assert sum(where.startswith("README.md:") for where in COMMANDS) >= 4, COMMANDS


def test_the_miniature_rewrites_paths_and_sizes_and_refuses_an_unknown_flag():
    world = dict.fromkeys(("model", "vae", "train", "test"), "W") | {"benchmark": lambda name: f"B/{name}"}
    command = ("torchrun --nproc_per_node 8 evaluate.py --model Qwen/Qwen3-4B --benchmarks gsm8k,amc23 -n 32 "
               "--k 1,8,32 --dtype bfloat16 --out runs/eval   # a comment")
    assert miniature("x", command, world, "O") == (2, "evaluate.py", [
        "--model", "W", "--benchmarks", "B/gsm8k,B/amc23", "-n", "2", "--k", "1,2", "--dtype", "bfloat16", "--out", "O",
        "--max-new-tokens", "4", "--batch-size", "2"])
    with pytest.raises(AssertionError, match="--resample is neither a path, a size nor a flag kept"):
        miniature("x", "python rl.py --model m --resample 24,source=lorem --out o", world, "O")


@pytest.mark.parametrize("where", sorted(COMMANDS))
def test_gpu_command_runs_in_miniature(where, tiny):
    check(tiny(where, COMMANDS[where]), COMMANDS[where])


def test_prose_resume_continues_a_sharded_bf16_run(tiny, tmp_path):
    """rl.py: 'the same command with --resume', on its torchrun --fsdp --dtype bfloat16 command: the run
    continues from its checkpoint (the sharded optimiser state loads) with one more step under FSDP2 in bf16.
    The first run is the one test_gpu_command_runs_in_miniature made (it runs before this test), or made here."""
    where, command, extra = prose_command("rl.py: resume")
    first = tiny(where, command)
    check(first, command)
    argv = list(first.argv)
    argv[argv.index("--steps") + 1] = "2"                     # one step past the checkpoint
    resumed = launch(first.nproc, first.script, argv + extra, first.out, tmp_path / "resumed")
    print(f"\n{where} again with --resume: {resumed.seconds:.1f} s ({resumed.cpu_seconds:.1f} s CPU)", flush=True)
    check(resumed, command)
    assert sum(c["rows"] for r in resumed.reports for c in r["calls"]) == 2 * 2, "not one step of 2 x 2 rollouts"


def test_prose_plain_warmup(tiny):
    """README: 'the plain one for baselines': the sharded bf16 warm-up with --prefix-source none."""
    where, command, extra = prose_command("README.md: plain warm-up")
    check(tiny(f"{where} plain", command, extra), command)


def test_sharded_and_whole_models_decode_the_same_greedy_tokens(stages_world):
    """fsdp.Sharded (fp32, gathered by before_rollouts, eager by design) against the whole model's compiled,
    bucketed step, prompts with and without VAE prefixes, each rank with prompts of its own too."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", RUNNER, "--sharded-greedy",
           str(stages_world / "base"), str(stages_world / "vae"), str(stages_world / "math_test.jsonl")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "sharded greedy tokens equal the compiled ones on 2 ranks" in result.stdout
