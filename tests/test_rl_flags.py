"""rl.py's flags on a tiny model built here, in-process for 2 steps (every pair of flags runs in
tests/test_pairwise.py): the values it refuses (one line, exit code 2) and the flags without
effect it notes (one line, and the run goes on); resuming from a checkpoint recovered from an
interrupted swap, and a corrupt checkpoint stopping in one line; the schedule registry, the
rounding of the plan and the choice of prefixed rollouts; rows without ids; the guards around a
step (a non-finite gradient stops the run before the optimiser step, non-finite weights are never
checkpointed) and its warning.

Run:  python -m pytest tests/test_rl_flags.py -q        (about half a minute on two cores)
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import rl
from common import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer, hidden-32 model on the toy tokenizer, 1-digit additions (half the rows without
    an id). Every token embedding has 1.0 in dimension 0 and only the eos row of lm_head reads
    that dimension, so about one token in five is eos: runs hold both stopped and truncated
    completions of at most 6 tokens."""
    from toy.task import generate as toy_rows, write_jsonl
    from conftest import stopping_toy_model
    root = tmp_path_factory.mktemp("tiny_rl")
    model, tokenizer = stopping_toy_model(root)
    rows = toy_rows("math", 20, seed=1, digits=1)
    for row in rows[::2]:
        del row["id"]
    write_jsonl(rows, str(root / "train.jsonl"))
    write_jsonl(toy_rows("math", 4, seed=2, digits=1), str(root / "test.jsonl"))
    return root


def tiny_args(tiny, out, *extra):
    """P x G = 2 x 5 = 10 rollouts per step; micro-batches of 3 divide neither the batch (10)
    nor its minibatches (4, 3, 3 with --minibatches 3)."""
    return ["--model", str(tiny / "model"), "--data", str(tiny / "train.jsonl"), "--out", str(out),
            "--schedule", "0.4", "--prefix-source", "noise", "--L", "2",
            "--prompts-per-step", "2", "--group-size", "5", "--max-new-tokens", "6",
            "--micro-batch-size", "3", "--steps", "2", "--lr", "1e-3", "--save-every", "0",
            *map(str, extra)]


def records(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture
def parity_reward(monkeypatch):
    """A reward that varies within groups (the tiny model never answers right): the parity of
    the completion's length, so advantages are not all zero and the clip has work to do."""
    monkeypatch.setattr(rl, "grade", lambda text, answer, kind: float(len(text) % 2))




@pytest.fixture
def failing_then_parity(monkeypatch):
    """Each step's 10 on-policy rollouts fail, so both groups are resampled (3 more rollouts each,
    graded right after them); a resampled rollout succeeds when its completion's length is odd."""
    calls = {"n": 0}

    def grade(text, answer, kind):
        i = calls["n"] % 16
        calls["n"] += 1
        return 0.0 if i < 10 else float(len(text) % 2)
    monkeypatch.setattr(rl, "grade", grade)


def test_a_resample_prefix_must_fit_the_context(tiny, tmp_path):
    # lorem's default length, 200 tokens, does not fit the tiny model's context of 128
    with pytest.raises(UserError, match=r"prompt \+ prefix \+ --max-new-tokens = \d+ tokens exceeds the "
                                        "model's context of 128"):
        rl.main(tiny_args(tiny, tmp_path / "run", "--resample", 3))


# -- refused at start-up: one line, exit code 2, nothing written -------------------------------------

REFUSED = [
    (["--group-size", "1"], "--group-size must be >= 2"),
    (["--group-size", "0"], "--group-size must be >= 2"),
    (["--prompts-per-step", "0"], "--prompts-per-step must be >= 1"),
    (["--micro-batch-size", "-1"], "--micro-batch-size must be >= 0"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--minibatches", "0"], "--minibatches must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--temperature", "0"], "--temperature must be > 0, got 0"),
    (["--temperature", "-0.5"], "--temperature must be > 0"),
    (["--temperature", "nan"], "--temperature must be a finite number, got nan"),
    (["--lr", "-0.001"], "--lr must be >= 0"),
    (["--kl-coef", "-0.1"], "--kl-coef must be >= 0"),
    (["--clip-eps", "-0.1"], "--clip-eps must be >= 0"),
    (["--clip-eps", "0.2,-0.1"], "--clip-eps must be >= 0"),
    (["--clip-eps", "low"], "--clip-eps expected a number"),
    (["--schedule", "1.5"], "--schedule expected one of none, two-stage, linear or a fraction in [0, 1], got '1.5'"),
    (["--L", "-1"], "--L must be >= 0"),
    (["--prefix-source", "vae"], "--prefix-source vae needs --vae DIR"),
    (["--save-every", "-1"], "--save-every must be >= 0"),
    (["--epochs", "1000"], "--epochs must be <= 100"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--seed", str(2**32)], "--seed must be <= 4294967295"),
    (["--schedule", "sometimes"], "got 'sometimes'"),
    (["--no-such-flag", "1"], "unrecognized arguments: --no-such-flag"),
    (["--credit", "sometimes"], "--credit sometimes: no such rule"),
    (["--fsdp"], "--fsdp shards over ranks: launch with torchrun"),
    (["--resample", "-1"], "--resample -1: expected G'"),
    (["--resample", "three"], "--resample three: expected G'"),
    (["--resample", "3,colour=red"], "--resample 3,colour=red: expected G'"),
    (["--resample", "3,L=-1"], "--resample 3,L=-1: expected G'"),
    (["--resample", "3,source=vae"], "vae needs --vae DIR"),
    (["--resample", "3,source=noise,L=0"], "any other source needs L >= 1"),
    (["--resample", "3,source=none,L=4"], "source=none takes no prefix"),
    (["--resample", "3,source=sometimes"], "source is one of"),
    (["--resample", "3,credit=sometimes"], "credit one of"),
]


@pytest.mark.parametrize("flags,message", REFUSED, ids=[" ".join(f) for f, _ in REFUSED])
def test_impossible_flags_are_refused_in_one_line(tiny, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        rl.run_main(lambda: rl.main(tiny_args(tiny, out, *flags)))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()                                    # refused before anything is written


FSDP_REFUSED = [["--credit", "nudge"], ["--resample", "3,credit=nudge"]]


@pytest.mark.parametrize("flags", FSDP_REFUSED, ids=" ".join)
def test_fsdp_refuses_passes_that_differ_between_ranks(tiny, tmp_path, monkeypatch, flags):
    """Under torchrun (here: as if launched so), --fsdp refuses what would run a different number of
    collective forward passes on each rank."""
    args = rl.parser.parse_args(tiny_args(tiny, tmp_path, "--fsdp", *flags))
    monkeypatch.setattr(rl.dist, "is_initialized", lambda: True)
    with pytest.raises(UserError, match="--fsdp needs the same forward passes on every rank"):
        rl.check_args(args, 1)


# -- accepted: a flag without effect prints one note and the run goes on (each was refused once) ------

BASELINE = "is the baseline"          # --schedule X with no prefix runs schedule none
NOTED = [
    (["--eval-every", "1"], "--eval-every 1 has no effect here (there is no --eval-data)"),
    (["--clip-eps", "0.1"], "has no effect here (one update per batch in the sampling context"),
    (["--schedule", "none", "--credit", "naive"],
     "--credit naive has no effect here (--schedule none draws no prefix)"),
    (["--vae", "somewhere"], "--vae somewhere has no effect here (no prefix source reads a VAE)"),
    (["--L", "0"], BASELINE),
    (["--prefix-source", "none"], BASELINE),
    (["--schedule", "0.05"], "--L 2 has no effect here (--schedule 0.05 prefixes round(0.05 x 5) = 0"),  # none prefixed
    (["--minibatches", "11"], None),      # more minibatches than the 10 rollouts: the empty ones are skipped
]


@pytest.mark.parametrize("flags,note", NOTED, ids=[" ".join(f) for f, _ in NOTED])
def test_flags_without_effect_are_noted_and_the_run_goes_on(tiny, tmp_path, capsys, parity_reward, one_thread,
                                                            flags, note):
    rl.main(tiny_args(tiny, tmp_path, "--steps", 1, *flags))
    notes = [line for line in capsys.readouterr().out.splitlines()      # (not the warm-up's notes)
             if line.startswith("note: ") and ("has no effect here" in line or BASELINE in line)]
    assert (notes == []) if note is None else sum(note in line for line in notes) == 1, notes
    (record,) = records(tmp_path)
    args = rl.parser.parse_args(tiny_args(tiny, tmp_path, *flags))
    assert len(record["prefixed"]) == args.prompts_per_step and record["updates"] <= args.minibatches
    if note == BASELINE or flags == ["--schedule", "0.05"]:
        assert record["prefixed"] == [0] * args.prompts_per_step and record["rho"] == 0 and record["L"] == 0


def test_a_refused_flag_exits_2_without_a_traceback(tiny, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, "rl.py"),
                             *tiny_args(tiny, tmp_path / "run", "--group-size", "1")],
                            capture_output=True, text=True, cwd=REPO, timeout=300,
                            env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --group-size must be >= 2, got 1 (see python rl.py --help)"]


@pytest.mark.parametrize("flags", [["--prompts-per-step", 2**16, "--group-size", 2**12],
                                   ["--prompts-per-step", 2**16, "--resample", f"{2**12},source=noise,L=2"]])
def test_a_batch_that_cannot_fit_the_device_is_refused(tiny, tmp_path, flags):
    """On a GPU, rl.py asks memory.rl_plan before anything is loaded; here the same plan is made
    against this machine's free memory, and refused in one line."""
    import memory
    from model import load_config, load_embedding_matrix, make_prefix_source
    args = rl.parser.parse_args(tiny_args(tiny, tmp_path / "run", *flags))
    rl.check_args(args, 1)
    build = lambda name: make_prefix_source(name, load_embedding_matrix(str(tiny / "model")))
    extra = None
    if args.resample:
        import resample
        extra = resample.Resampler(args, build, torch.device("cpu"))
    with pytest.raises(UserError, match=r"a rank needs .* GiB \(.*KV cache.* GiB\) at --micro-batch-size 3, "
                                         r"more than 90% of the .* GiB free; lower"):
        memory.rl_plan(args, load_config(str(tiny / "model")), [{"prompt_ids": [1, 2, 3]}], [], build("noise"),
                       extra, 1, torch.device("cpu"))


def test_eval_prompts_must_fit_the_context(tiny, tmp_path):
    row = {"problem": "1+1=?" * 30, "answer": "2", "domain": "math", "source": "toy"}
    (tmp_path / "long.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(UserError, match="--eval-data: problem .* exceeds the model's context of 128"):
        rl.main(tiny_args(tiny, tmp_path / "run", "--eval-data", tmp_path / "long.jsonl"))


# -- resume: after a kill in the middle of writing a checkpoint; a corrupt checkpoint ----------------

def test_resume_after_a_kill_while_a_checkpoint_was_written(tiny, tmp_path, parity_reward, one_thread, capsys):
    """A kill while checkpoint-000003 was being written leaves it under its temporary name, half
    full: the run resumes from checkpoint-000002, the newest complete one (the only one kept), and
    the leftover goes."""
    rl.main(tiny_args(tiny, tmp_path, "--save-every", 1))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-000002"]
    half = tmp_path / ".tmp-checkpoint-000003-abc"
    (half / "model").mkdir(parents=True)
    (half / "trainer_state.json").write_text('{"step": 3, "rng"')
    rl.main(tiny_args(tiny, tmp_path, "--save-every", 1, "--steps", 4, "--resume"))
    assert "checkpoint-000002 at step 2" in capsys.readouterr().out and not half.exists()
    assert [r["step"] for r in records(tmp_path)] == [0, 1, 2, 3]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-000004"]
    assert json.load(open(tmp_path / "checkpoint-000004" / "trainer_state.json"))["step"] == 4


def test_a_resampled_run_resumes_to_the_same_state(tiny, tmp_path, failing_then_parity, one_thread):
    """Resampling draws its lorem text and completions from seeds derived from (--seed, step, group),
    and the schedule's memory of rewards is checkpointed: a run stopped after 2 steps and resumed to
    4 ends where a straight 4-step run ends."""
    flags = ("--resample", "3,L=4,credit=naive-shaped")
    rl.main(tiny_args(tiny, tmp_path / "straight", *flags, "--steps", 4))
    rl.main(tiny_args(tiny, tmp_path / "resumed", *flags))
    rl.main(tiny_args(tiny, tmp_path / "resumed", *flags, "--steps", 4, "--resume"))
    a, b = records(tmp_path / "straight"), records(tmp_path / "resumed")
    keys = ("reward_mean", "rollouts_generated", "rescued_groups", "resample_accuracy", "loss", "prefixed")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert sum(r["rescued_groups"] for r in a) > 0
    wa = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("name", ["optimizer.safetensors", "trainer_state.json"])
def test_a_corrupt_checkpoint_stops_in_one_line(tiny, tmp_path, capsys, one_thread, name):
    rl.main(tiny_args(tiny, tmp_path, "--save-every", 1))
    path = tmp_path / "checkpoint-000002" / name
    path.write_bytes(path.read_bytes()[:40])                 # cut short
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        rl.run_main(lambda: rl.main(tiny_args(tiny, tmp_path, "--steps", 3, "--resume")))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and name in err[0], err


# -- pieces: schedules, who gets a prefix, rows without ids -------------------------------------------

def test_schedules_are_one_table_that_argparse_uses():
    """Every schedule of the registry is a --schedule value and gives each group a fraction in [0, 1], from
    the progress and the rewards of each problem's last draw (NaN where never drawn); a number is a
    constant fraction."""
    parse = lambda value: rl.parser.parse_args(["--model", "m", "--data", "d", "--out", "o", "--schedule", value]).schedule
    last = torch.tensor([[float("nan")] * 4, [0.0, 1.0, 0.0, 0.0], [1.0] * 4])                  # (P, G)
    for name, schedule in rl.SCHEDULES.items():
        assert parse(name) == name                            # a schedule added to the table is a value
        for tau in (0.0, 0.25, 0.5, 0.99):
            fraction = torch.as_tensor(schedule(tau, last), dtype=torch.float64)
            assert fraction.shape in ((), (3,)) and ((0 <= fraction) & (fraction <= 1)).all(), (name, tau)
    assert [rl.SCHEDULES["linear"](t, last) for t in (0, 0.25)] == [1.0, 0.75]
    assert (parse("0.3"), parse("0"), parse("1")) == (0.3, 0.0, 1.0)


def test_each_group_prefixes_its_planned_rollouts_at_random(monkeypatch):
    """rollout() prefixes n_prefixed[j] of group j's G rollouts, each place in a group equally often,
    from seeds derived from (--seed, step, group): the same at the same step, others at another."""
    class Source:
        name = "test"

        def sample(self, n, L, generator):
            return torch.randn(n, L, 2, generator=generator)
    monkeypatch.setattr(rl, "sample", lambda sampler, problems, prefixes, *a: prefixes)
    args = rl.parser.parse_args(["--model", "m", "--data", "d", "--out", "o", "--group-size", "8"])
    P, problems = 2000, [{"prompt_ids": [1]}] * 2000
    n_prefixed = torch.tensor([3] * (P - 2) + [0, 8])
    chosen = lambda step, first=0: torch.tensor([p is not None for p in rl.rollout(
        None, Source(), problems[first:], first, n_prefixed, 1, step, args, 0)]).view(-1, 8)    # (P, 8)
    at_0 = chosen(0)
    assert torch.equal(at_0.sum(1), n_prefixed)                                     # the plan, group by group
    per_slot = at_0[:-2].float().mean(0)                       # each place in a group equally often
    assert ((per_slot - 3 / 8).abs() < 0.04).all(), per_slot
    assert not torch.equal(at_0[0], at_0[1])
    assert torch.equal(chosen(0), at_0) and not torch.equal(chosen(1), at_0)          # seeded by the step
    assert torch.equal(chosen(0, first=1000), at_0[1000:])     # a group's draws: its place, not the rank's


def test_rows_without_ids_and_unreadable_answers_are_left_out(tiny, tmp_path, capsys):
    from data import check_gold_answers
    from transformers import AutoTokenizer
    rows = [{"problem": "1+2=?", "answer": "3"}, {"problem": "2+2=?", "answer": " "},
            {"problem": "3+3=?", "answer": "6"}, {"problem": "4+4=?", "answer": None}]
    assert check_gold_answers(rows) == [1, 3]                  # positions: no row has an id
    with open(tmp_path / "rows.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps({**row, "domain": "math", "source": "toy"}) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny / "tokenizer"))
    kept = rl.load_problems(str(tmp_path / "rows.jsonl"), "--data", tokenizer, "plain", 0, 6, 128)
    assert {r["grading_kind"] for r in kept} == {"toy"} and sorted(r["problem"] for r in kept) == ["1+2=?", "3+3=?"]
    assert all(r["prompt_ids"] == tokenizer(r["problem"] + "\n")["input_ids"] for r in kept)
    assert "2 of 4 gold answers cannot be read" in capsys.readouterr().out


# -- guards around a step ----------------------------------------------------------------------------

class InfiniteGradient(torch.autograd.Function):
    """The identity whose gradient is infinite: a finite loss with an overflowing backward."""
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def break_gradient_at(monkeypatch, call):
    """policy_loss gives an infinite gradient from its `call`-th call (0-based) on, and every
    optimiser step is counted."""
    calls, steps = {"loss": 0}, {"opt": 0}
    real_loss, real_step = rl.policy_loss, torch.optim.AdamW.step

    def loss(*args, **kwargs):
        value, stats = real_loss(*args, **kwargs)
        calls["loss"] += 1
        return (InfiniteGradient.apply(value) if calls["loss"] > call else value), stats

    def step(self, *args, **kwargs):
        steps["opt"] += 1
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(rl, "policy_loss", loss)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return steps


def test_non_finite_gradient_stops_before_the_optimiser_step(tiny, tmp_path, monkeypatch, one_thread):
    # one micro-batch per step (micro-batch size >= 10), so call k is step k
    steps = break_gradient_at(monkeypatch, call=2)
    with pytest.raises(UserError, match=r"non-finite loss or gradient norm \(loss .*\) at step 2; stopped "
                                        r"before the optimiser step; the last checkpoint, .*checkpoint-000002, is kept"):
        rl.main(tiny_args(tiny, tmp_path, "--steps", 6, "--save-every", 1, "--micro-batch-size", 16))
    assert steps["opt"] == 2
    state = json.load(open(tmp_path / "checkpoint-000002" / "trainer_state.json"))
    assert state["step"] == 2 and not (tmp_path / "model").exists()
    tensors = load_file(str(tmp_path / "checkpoint-000002" / "model" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_non_finite_gradient_before_any_checkpoint_says_so(tiny, tmp_path, monkeypatch, one_thread):
    break_gradient_at(monkeypatch, call=0)
    with pytest.raises(UserError, match="at step 0; .*no checkpoint had been written yet"):
        rl.main(tiny_args(tiny, tmp_path, "--micro-batch-size", 16))
    assert not list(tmp_path.glob("checkpoint-*"))


def test_non_finite_weights_are_never_checkpointed(tiny, tmp_path, monkeypatch, one_thread):
    real_update, calls = rl.update_policy, {"n": 0}

    def update_that_overflows(model, *args, **kwargs):
        metrics = real_update(model, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:          # step 2's optimiser step overflowed a weight
            with torch.no_grad():
                model.lm_head.weight[0, 0] = float("inf")
        return metrics
    monkeypatch.setattr(rl, "update_policy", update_that_overflows)
    with pytest.raises(UserError, match=r"non-finite weights after step 2, so no checkpoint is "
                                        r"written; the last checkpoint, .*checkpoint-000002, is kept"):
        rl.main(tiny_args(tiny, tmp_path, "--steps", 6, "--save-every", 1))
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-000002"]
    tensors = load_file(str(tmp_path / "checkpoint-000002" / "model" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_a_run_with_equal_rewards_warns_of_the_zero_gradient(tiny, tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setattr(rl, "grade", lambda text, answer, kind: 0.0)
    rl.main(tiny_args(tiny, tmp_path, "--steps", 4))                           # all rewards 0
    assert [r["grad_norm"] for r in records(tmp_path)] == [0.0] * 4            # warned once, at the third
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and re.match(r"warning: the gradient norm has been (exactly )?0 for 3 steps", warnings[0])


def test_prefixed_counts_round_half_up():
    """round(rho G) with halves rounded up, not to even: rho 0.5 of 5 rollouts is 3, and the
    linear schedule at tau 0.75 prefixes 1 of 2 (Python's round would give 2 and 0)."""
    def plan(schedule, tau, G, L, P=3):
        args = rl.parser.parse_args(["--model", "m", "--data", "d", "--out", "o", "--schedule", schedule,
                                     "--group-size", str(G), "--L", str(L)])
        n_prefixed, L = rl.prefix_plan(args, tau, torch.full((P, G), float("nan")))
        assert n_prefixed.shape == (P,) and len(set(n_prefixed.tolist())) == 1
        return int(n_prefixed[0]), L
    assert plan("0.5", 0.0, 5, 1) == (3, 1)
    assert plan("linear", 0.75, 2, 4) == (1, 4)
    assert plan("0.5", 0.0, 8, 2) == (4, 2)
    assert plan("0", 0.0, 8, 2) == (0, 0)
    assert plan("0.5", 0.0, 8, 0) == (0, 0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kl_to_the_reference_is_exactly_0_before_the_first_update(tiny, tmp_path, dtype, one_thread):
    """The reference is the initial checkpoint on the policy's own path (fp32 weights, the same
    autocast, fp32 logits): at step 0 the weights are equal, so every k3 is exactly 0, in bf16 too."""
    rl.main(tiny_args(tiny, tmp_path, "--steps", "1", "--kl-coef", "0.5", "--dtype", dtype))
    assert records(tmp_path)[0]["kl"] == 0.0


def test_the_bf16_sampler_holds_the_updated_policy_after_every_step(tiny, tmp_path, monkeypatch, parity_reward,
                                                                    one_thread):
    """Under --dtype bfloat16 rollouts read a bf16 copy of the policy: after each update it must equal
    the policy's new fp32 weights rounded to bf16, or the next rollouts come from a stale policy."""
    update, seen = rl.update_policy, []

    def update_then_compare(policy, *args):
        before = [p.detach().clone() for p in policy.parameters()]
        metrics = update(policy, *args)
        assert any(not torch.equal(b, p) for b, p in zip(before, policy.parameters()))       # it moved
        seen.append(policy.sampler is not policy.module and all(torch.equal(s, p.to(torch.bfloat16))
                    for s, p in zip(policy.sampler.parameters(), policy.parameters())))
        return metrics
    monkeypatch.setattr(rl, "update_policy", update_then_compare)
    rl.main(tiny_args(tiny, tmp_path, "--dtype", "bfloat16", "--steps", "3"))
    assert seen == [True] * 3
