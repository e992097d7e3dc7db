"""Pairwise sweep of the training stages' behavioural flags: rl.py and sft_warmup.py, each run
in-process for two steps on a tiny model. Every pair of values of two flags (booleans, every
choice, the numeric flags at their edges: 1, the default, and a value that forces several
micro-batches or minibatches) appears in at least one row of a covering array built here, and
every row either finishes or is refused at start-up in one line. A sweep that varies one flag at
a time never runs two flags together; bugs live in such pairs (activation checkpointing with a
held-out evaluation crashed at its first evaluation).

The array is a greedy construction (in the spirit of AETG, Cohen et al. 1997), written here
rather than taken from allpairspy because it must respect which combinations the stage refuses:
each row starts from an uncovered pair and sets the other flags one at a time, each to the value
that covers the most uncovered pairs while the stage's own argument check still accepts the row.
A pair that no accepted row can hold (--tie with lorem text, say) gets a row of its own, which
must then be refused in one line. Seeded, so the rows are the same on every run.

Run:  python -m pytest tests/test_pairwise.py -q -s     (-s prints the array's size; about two
      minutes on two cores)
"""
import contextlib
import io
import itertools
import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

import rl
import sft_warmup
from guard import UserError

# -- the factors: flag -> values (None: flag left out; True / False: a switch). The first value of
# each list is the base row's, which every stage accepts; choices are read from the parser, so a
# new schedule, prefix source or credit rule joins the sweep without a line here.

def choices(parser, flag):
    action = next(a for a in parser._actions if flag in a.option_strings)
    return list(action.choices)


RL_FACTORS = {
    "--schedule": ["constant"] + [c for c in choices(rl.parser, "--schedule") if c != "constant"],
    "--prefix-source": ["noise"] + [c for c in choices(rl.parser, "--prefix-source") if c != "noise"],
    "--credit": choices(rl.parser, "--credit"),
    "--L": ["2", "1", "8"],
    "--rho": ["0.5", "0", "1"],
    "--tie": [False, True],
    "--region": [None, "math"],
    "--resample": ["0", "1", "3"],
    "--resample-source": [None] + choices(rl.parser, "--resample-source"),
    "--resample-L": [None, "1", "2"],
    "--resample-credit": [None] + choices(rl.parser, "--resample-credit"),
    "--prompts-per-step": ["2", "1"],
    "--group-size": ["5", "2"],
    "--max-new-tokens": ["6", "1"],
    "--temperature": ["1.0", "0.7"],
    "--top-p": ["1.0", "0.9"],
    "--truncated": choices(rl.parser, "--truncated"),
    "--estimator": choices(rl.parser, "--estimator"),
    "--aggregation": choices(rl.parser, "--aggregation"),
    "--kl-coef": ["0", "0.05"],
    "--entropy-coef": ["0", "0.01"],
    "--epochs": ["1", "2"],
    "--minibatches": ["1", "3"],
    "--micro-batch-size": ["3", "1", "32"],
    "--activation-checkpointing": choices(rl.parser, "--activation-checkpointing"),
    "--dtype": choices(rl.parser, "--dtype"),
    "--template": choices(rl.parser, "--template"),
    "--eval-data": [None, "test"],
    "--eval-every": [None, "0", "1"],
    "--eval-problems": [None, "2"],
    "--per-domain-cap": [None, "5"],
    "--warmup-steps": ["0", "5"],
    "--weight-decay": ["0", "0.1"],
    "--save-every": ["0", "1"],
    "--keep-checkpoints": ["1", "2"],
    "--sample-every": ["0", "1"],
    "--samples-per-step": ["4", "0"],
    "--tensorboard": [False, True],
    "--seed": ["0", "1"],
}
# Not swept: paths and sizes fixed by the harness; --resume and --fsdp have tests of their own
# (tests/test_stages.py, tests/test_fsdp.py: --fsdp needs torchrun); the optimiser's coefficients
# change numbers, not code paths.
RL_FIXED = {"--model", "--data", "--out", "--vae", "--steps", "--lr", "--resume",
            "--fsdp", "--clip-eps-low", "--clip-eps-high", "--grad-clip", "--help"}

SFT_FACTORS = {
    "--prefix-source": ["noise"] + [c for c in choices(sft_warmup.parser, "--prefix-source") if c != "noise"],
    "--activation-checkpointing": choices(sft_warmup.parser, "--activation-checkpointing"),
    "--L": ["1", "0", "2"],
    "--tie": [False, True],
    "--region": [None, "math"],
    "--template": choices(sft_warmup.parser, "--template"),
    "--steps": ["2", "1"],
    "--batch-size": ["4", "1", "8"],
    "--micro-batch-size": ["2", "1", "8"],
    "--warmup-steps": ["0", "2"],
    "--weight-decay": ["0", "0.1"],
    "--per-domain-cap": [None, "10"],
    "--eval-data": [None, "test"],
    "--eval-problems": [None, "1"],
    "--eval-max-new-tokens": [None, "6", "1"],
    "--dtype": choices(sft_warmup.parser, "--dtype"),
    "--tensorboard": [False, True],
    "--seed": ["0", "1"],
}
# --max-tokens filters data (tests/test_bad_input.py shows what it leaves out), no code path
SFT_FIXED = {"--model", "--data", "--out", "--vae", "--lr", "--fsdp", "--grad-clip", "--max-tokens", "--help"}


def argv_of(row, factors, fixed_argv, world):
    """The row's command line; --vae is added where a prefix source of the row reads it (the stages
    refuse a --vae that nothing reads)."""
    argv = list(fixed_argv)
    for flag, index in row.items():
        value = factors[flag][index]
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(world / "test.jsonl") if value == "test" else value]
    return argv + (["--vae", str(world / "vae")] if reads_vae(row, factors) else [])


def reads_vae(row, factors):
    value = lambda flag, default=None: factors[flag][row[flag]] if flag in row else default
    if "--schedule" not in factors:                                           # sft_warmup.py
        return value("--prefix-source") == "vae"
    return (value("--schedule") != "none" and value("--prefix-source") == "vae") or \
        (value("--resample") not in (None, "0") and value("--resample-source") == "vae")


def covering_array(factors, accepts, seed=0, candidates=6):
    """(rows, refused, total): rows as {flag: value index}. Every pair of values of two flags is in
    an accepted row, or, if no accepted row can hold it, in a row of `refused` (one such pair each);
    total is the number of pairs."""
    rng = random.Random(seed)
    names = list(factors)
    order = {n: k for k, n in enumerate(names)}
    pair = lambda a, i, b, j: ((a, i), (b, j)) if order[a] < order[b] else ((b, j), (a, i))
    uncovered = {pair(a, i, b, j) for a, b in itertools.combinations(names, 2)
                 for i in range(len(factors[a])) for j in range(len(factors[b]))}
    total = len(uncovered)

    def pairs(row):
        return {pair(a, row[a], b, row[b]) for a, b in itertools.combinations(names, 2)}

    def gain(row, name, v):        # uncovered pairs that name = v makes with the rest of the row
        return sum(pair(name, v, n, row[n]) in uncovered for n in names if n != name)

    def fill(row, fixed):
        """Set every other flag, in random order, to the value that keeps the row accepted (when
        one does) and covers the most new pairs."""
        row = dict(row)
        for name in rng.sample(names, len(names)):
            if name not in fixed:
                row[name] = max(range(len(factors[name])),
                                key=lambda v: (accepts(row | {name: v}), gain(row, name, v), -v))
        return row

    rows, refused = [], []
    while uncovered:
        (a, i), (b, j) = min(uncovered)
        seeded = {a: i, b: j}
        tries = [fill({n: 0 for n in names} | seeded, seeded) for _ in range(candidates)]
        tries = [row for row in tries if accepts(row)]
        if not tries:   # a pair may need several other flags changed at once: start from a row that ran
            tries = [fill(row | seeded, seeded) for row in rows if accepts(row | seeded)][:candidates]
        if tries:
            best = max(tries, key=lambda row: len(pairs(row) & uncovered))
            rows.append(best)
            uncovered -= pairs(best)
        else:                      # no accepted row holds this pair: it must be refused
            refused.append((pair(a, i, b, j), {n: 0 for n in names} | seeded))
            uncovered.discard(pair(a, i, b, j))
    covered = set().union(*map(pairs, rows))
    refused = [row for p, row in refused if p not in covered]     # a later row held it after all
    assert len(covered) + len(refused) == total
    return rows, refused, total


def accepted_by(module, factors, fixed_argv, world):
    """The stage's own argument check (parsing, ranges, rules between flags): nothing is loaded."""
    def accepts(row):
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                args = module.parser.parse_args(argv_of(row, factors, fixed_argv, world))
            module.check_args(args, 1)
            return True
        except (UserError, SystemExit):
            return False
    return accepts


def refused_in_one_line(module, argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        module.run_main(lambda: module.main(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), (argv, err)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 2-layer hidden-32 model on the toy tokenizer (given a chat template), 1-digit additions
    (train 20, test 4) and an untrained VAE with a math region."""
    from conftest import tiny_toy_model
    from model import PaletteVAE, embedding_fingerprint, save_vae
    from toy.task import generate as toy_rows, write_jsonl
    from toy.tokenizer import EOS_ID
    root = tmp_path_factory.mktemp("pairwise")
    # context 512: the chat template (~100 characters, one token each) and lorem's default 200 tokens
    model, tokenizer = tiny_toy_model(root / "tokenizer", layers=2, tied=False, context=512, std=0.1)
    with torch.no_grad():           # sampled: about one completion in five stops, the rest are cut
        model.embed_tokens.weight[:, 0] = 1.0     # off; greedy: never eos, so evaluations decode
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[EOS_ID, 0] = 0.3
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"   # for --template chat
    tokenizer.save_pretrained(str(root / "tokenizer"))
    model.save_pretrained(str(root / "model"), tokenizer_dir=str(root / "tokenizer"))
    write_jsonl(toy_rows("math", 20, seed=1, digits=1), str(root / "train.jsonl"))
    write_jsonl(toy_rows("math", 4, seed=2, digits=1), str(root / "test.jsonl"))
    E = model.embed_tokens.weight.detach()
    vae = PaletteVAE(E.shape[1], latent_dim=4, hidden_dim=16)
    vae.set_statistics(E[:40].reshape(10, 4, -1).mean(1), E)
    save_vae(vae, str(root / "vae"), {"beta": 0.1, "model": "tiny", "fingerprint": embedding_fingerprint(E),
                                     "domains": {"math": {"mean": [0.3] * 4, "cov": torch.eye(4).tolist()}}})
    return root




def test_every_flag_is_swept_or_named_as_fixed():
    for module, factors, fixed in ((rl, RL_FACTORS, RL_FIXED), (sft_warmup, SFT_FACTORS, SFT_FIXED)):
        flags = {s for a in module.parser._actions for s in a.option_strings if s.startswith("--")}
        assert flags == set(factors) | fixed, (module.__name__, flags ^ (set(factors) | fixed))


def check_rl_run(out, row_argv, before):
    args = rl.parser.parse_args(row_argv)
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [r for r in records if "reward_mean" in r]
    assert [r["step"] for r in steps] == [0, 1]
    G = args.group_size
    for r in steps:
        assert (r.get("resampled_groups", 0) >= 1) == (args.resample > 0)
        n_prefixed, L = rl.prefix_plan(args.schedule, r["tau"], G, args.rho, args.L)
        assert (r["rho"], r["L"]) == (n_prefixed / G, L)
        assert ("kl" in r) == (args.kl_coef > 0)                 # no reference model without a KL
        several = args.epochs * args.minibatches > 1
        if args.truncated == "zero" and not args.resample:       # every minibatch holds kept rollouts
            assert r["updates"] == args.epochs * args.minibatches
        if r["updates"]:
            assert all(math.isfinite(r[k]) for k in ("loss", "grad_norm", "entropy"))
            assert 0 < r["entropy"] <= math.log(52) + 1e-4        # at most log V
            replayed = not (args.schedule == "none" or rl.credit.CREDIT_RULES[args.credit].with_prefix)
            if not several and not args.resample and not replayed:
                assert r["clip_frac"] == 0.0                      # one update in the sampling context: r = 1
    if args.eval_data:
        assert records[-1]["step"] == 2 and "eval_pass1" in records[-1]
    weights = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    if any(r["grad_norm"] > 0 for r in steps):
        assert any(not torch.equal(weights[k], before[k]) for k in before)
    return sum(r.get("rescued_groups", 0) for r in steps)


def parity(text, answer=None, kind=None):
    return float(len(text) % 2)


@pytest.fixture
def pairwise_reward(monkeypatch):
    """A reward that varies within groups (the parity of the completion's length), and the first
    group of every step failing whole, so that --resample always has a group to resample."""
    monkeypatch.setattr(rl, "grade", parity)
    real_score = rl.score

    def score(rollouts, tokenizer, args):
        real_score(rollouts, tokenizer, args)
        if not rollouts.resampled.any() and len(rollouts) == args.prompts_per_step * args.group_size:
            rollouts.correct[:args.group_size] = rollouts.rewards[:args.group_size] = 0.0
        return rollouts
    monkeypatch.setattr(rl, "score", score)


def test_rl_pairwise(world, tmp_path, pairwise_reward, capsys, one_thread):
    fixed = ["--model", str(world / "model"), "--data", str(world / "train.jsonl"), "--steps", "2", "--lr", "1e-3"]
    rows, refused, total = covering_array(RL_FACTORS, accepted_by(rl, RL_FACTORS, fixed + ["--out", "x"], world))
    before, rescued = load_file(str(world / "model" / "model.safetensors")), 0
    for k, row in enumerate(rows):
        out = tmp_path / f"run{k}"
        argv = argv_of(row, RL_FACTORS, fixed + ["--out", str(out)], world)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rl.main(argv)
        rescued += check_rl_run(out, argv, before)
    for k, row in enumerate(refused):
        refused_in_one_line(rl, argv_of(row, RL_FACTORS, fixed + ["--out", str(tmp_path / f"no{k}")], world), capsys)
    with capsys.disabled():
        print(f"\nrl.py pairwise: {len(RL_FACTORS)} flags, {total} value pairs; {len(rows)} rows ran, "
              f"{len(refused)} pairs refused at start-up")
    assert rescued > 0                     # resampled successes did replace failures somewhere


def test_sft_warmup_pairwise(world, tmp_path, capsys, one_thread):
    fixed = ["--model", str(world / "model"), "--data", str(world / "train.jsonl"), "--lr", "1e-3"]
    rows, refused, total = covering_array(SFT_FACTORS, accepted_by(sft_warmup, SFT_FACTORS, fixed + ["--out", "x"], world))
    before = load_file(str(world / "model" / "model.safetensors"))
    for k, row in enumerate(rows):
        out = tmp_path / f"run{k}"
        argv = argv_of(row, SFT_FACTORS, fixed + ["--out", str(out)], world)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            sft_warmup.main(argv)
        args = sft_warmup.parser.parse_args(argv)
        records = [json.loads(line) for line in open(out / "metrics.jsonl")]
        assert [r["step"] for r in records] == list(range(args.steps))
        assert all(math.isfinite(r["loss"]) for r in records)
        weights = load_file(str(out / "model" / "model.safetensors"))
        assert any(not torch.equal(weights[k], before[k]) for k in before)
    for k, row in enumerate(refused):
        refused_in_one_line(sft_warmup, argv_of(row, SFT_FACTORS, fixed + ["--out", str(tmp_path / f"no{k}")], world),
                            capsys)
    with capsys.disabled():
        print(f"\nsft_warmup.py pairwise: {len(SFT_FACTORS)} flags, {total} value pairs; {len(rows)} rows ran, "
              f"{len(refused)} pairs refused at start-up")
