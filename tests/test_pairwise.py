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
A pair that no accepted row can hold (--resample source=none with L=2, say) gets a row of its own,
which must then be refused in one line. Seeded, so the rows are the same on every run. Each rl.py
row's logged plan ("prefixed" per group, "rho", "L") is checked against its samples.jsonl.

Run:  python -m pytest tests/test_pairwise.py -q -s     (-s prints the array's size; about two
      minutes on two cores)
"""
import contextlib
import io
import itertools
import json
import math
import random
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

import credit
import model
import rl
import sft_warmup
from common import UserError

# -- the factors: flag -> values (None: flag left out; True / False: a switch), read from the parser.
# Every choice of a flag whose choices are a registry's (and of --credit, whose names credit.py's
# registry checks) is swept, so a new schedule, prefix source, estimator or credit rule joins the
# sweep without a line here; a switch is swept both ways; a flag named in VALUES takes those values
# (the first is the base row's, which every stage accepts: numbers at their edges, 1, the default,
# and a value that forces several micro-batches or minibatches); any other flag (a new one) runs at
# its default. FIXED: flags no row sets (paths and sizes fixed by the harness; --resume and --fsdp
# have tests of their own, tests/test_stages.py and tests/test_fsdp.py: --fsdp needs torchrun).

def factors_of(parser, values, fixed, registries=None):
    out = {}
    for action in parser._actions:
        flag = next((s for s in action.option_strings if s.startswith("--")), None)
        if flag is None or flag in fixed:
            continue
        names = (registries or {}).get(flag, action.choices)
        given = values.get(flag, [])
        if names is not None:                                       # every choice; the base row's first
            base = given[0] if given else action.default
            out[flag] = [base] + [c for c in names if c != base]
        elif action.nargs == 0:
            out[flag] = [False, True]
        else:
            out[flag] = list(given) or [None]
    return out


# --resample G'[,source=S,L=N,credit=C]: each part a factor of its own, joined into one value by argv_of
RESAMPLE_PARTS = {"--resample source": [None, *model.PREFIX_SOURCES], "--resample L": [None, "1", "2"],
                  "--resample credit": [None, *credit.CREDIT_RULES]}
RL_VALUES = {
    "--schedule": ["0.5"], "--prefix-source": ["noise"], "--L": ["2", "1", "8"],
    "--prompts-per-step": ["2", "1"], "--group-size": ["5", "2"], "--max-new-tokens": ["6", "1"],
    "--temperature": ["1.0", "0.7"], "--kl-coef": ["0", "0.05"],
    "--epochs": ["1", "2"], "--minibatches": ["1", "3"],
    "--micro-batch-size": ["3", "1", "32"], "--eval-data": [None, "test"], "--eval-every": [None, "0", "1"],
    "--save-every": ["0", "1"], "--seed": ["0", "1"], "--resample": [None, "1", "3"],
}
RL_FIXED = {"--model", "--data", "--out", "--vae", "--steps", "--lr", "--resume", "--fsdp", "--help"}
# --schedule: every name of rl.SCHEDULES and constant fractions at the edges (its base row's 0.5)
RL_FACTORS = factors_of(rl.parser, RL_VALUES, RL_FIXED, {"--credit": credit.CREDIT_RULES,
                                                         "--schedule": [*rl.SCHEDULES, "0.5", "0", "1"]}) | RESAMPLE_PARTS

SFT_VALUES = {
    "--prefix-source": ["noise"], "--L": ["1", "0", "2"], "--region": [None, "math"], "--steps": ["2", "1"],
    "--batch-size": ["4", "1", "8"], "--micro-batch-size": ["2", "1", "8"], "--warmup-steps": ["0", "2"],
    "--weight-decay": ["0", "0.1"], "--per-domain-cap": [None, "10"], "--eval-data": [None, "test"],
    "--eval-problems": [None, "1"], "--eval-max-new-tokens": [None, "6", "1"], "--seed": ["0", "1"],
}
# --max-tokens filters data (tests/test_bad_input.py shows what it leaves out), no code path
SFT_FIXED = {"--model", "--data", "--out", "--vae", "--lr", "--fsdp", "--grad-clip", "--max-tokens", "--help"}
SFT_FACTORS = factors_of(sft_warmup.parser, SFT_VALUES, SFT_FIXED)


def argv_of(row, factors, fixed_argv, world):
    """The row's command line; --vae is added where a prefix source of the row is the VAE (rl.py
    notes a --vae that nothing reads; sft_warmup.py refuses it)."""
    argv = list(fixed_argv)
    value = lambda flag: factors[flag][row[flag]] if flag in row else None
    for flag in row:
        if flag.startswith("--resample"):
            continue
        if value(flag) is True:
            argv.append(flag)
        elif value(flag) is not None and value(flag) is not False:
            argv += [flag, str(world / "test.jsonl") if value(flag) == "test" else value(flag)]
    if value("--resample") is not None:
        parts = [f"{part.split()[1]}={value(part)}" for part in RESAMPLE_PARTS if value(part) is not None]
        argv += ["--resample", ",".join([value("--resample"), *parts])]
    return argv + (["--vae", str(world / "vae")] if reads_vae(row, factors) else [])


def reads_vae(row, factors):
    value = lambda flag: factors[flag][row[flag]] if flag in row else None
    if "--schedule" not in factors:                                           # sft_warmup.py
        return value("--prefix-source") == "vae"
    return value("--prefix-source") == "vae" or value("--resample") is not None and value("--resample source") == "vae"


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
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                module.check_args(module.parser.parse_args(argv_of(row, factors, fixed_argv, world)), 1)
            return True
        except (UserError, SystemExit):
            return False
    return accepts


def orphan_part(row, factors):
    """A part of --resample set in a row without --resample: not a command line (argv_of drops it)."""
    return row.get("--resample") is not None and factors["--resample"][row["--resample"]] is None and \
        any(factors[part][row[part]] is not None for part in RESAMPLE_PARTS if part in row)


def rl_accepted_by(factors, fixed_argv, world):
    """rl.py's check; a part of --resample goes only into rows that resample, so that its pairs
    with the other flags are run where it acts."""
    accepts = accepted_by(rl, factors, fixed_argv, world)
    return lambda row: not orphan_part(row, factors) and accepts(row)


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
    """The tables name only flags the parsers have, with values they parse; every other flag of a
    parser is swept (every name of its registry) or runs at its default."""
    required = ["--model", "m", "--data", "d", "--out", "o"]
    for module, factors, values, fixed in ((rl, RL_FACTORS, RL_VALUES, RL_FIXED), (sft_warmup, SFT_FACTORS,
                                                                                     SFT_VALUES, SFT_FIXED)):
        actions = {s: a for a in module.parser._actions for s in a.option_strings if s.startswith("--")}
        assert set(values) | fixed <= set(actions), (module.__name__, (set(values) | fixed) - set(actions))
        assert set(actions) - fixed <= set(factors), (module.__name__, set(actions) - fixed - set(factors))
        for flag, values_of_flag in values.items():
            for v in values_of_flag:
                if v is not None:
                    module.parser.parse_args(required + [flag, "path" if v == "test" else v])
            if actions[flag].choices is not None:
                assert set(factors[flag]) == set(actions[flag].choices), flag
    assert set(RL_FACTORS["--credit"]) == set(credit.CREDIT_RULES)
    assert set(RL_FACTORS["--schedule"]) == {*rl.SCHEDULES, "0.5", "0", "1"}
    assert set(RL_FACTORS["--resample source"]) == {None, *model.PREFIX_SOURCES}
    assert set(RL_FACTORS["--resample credit"]) == {None, *credit.CREDIT_RULES}


def check_rl_run(out, row_argv, before):
    """What a run logged, against its flags and its samples.jsonl: the logged plan of each step (each
    group's rollouts under a prefix are exactly its logged count)."""
    args = rl.parser.parse_args(row_argv)
    with contextlib.redirect_stdout(io.StringIO()):
        rl.check_args(args, 1)                   # the run's own reading (notes; --resample's parts)
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    steps = [r for r in records if "reward_mean" in r]
    assert [r["step"] for r in steps] == [0, 1]
    P, G = args.prompts_per_step, args.group_size
    for r in steps:
        assert (r.get("resampled_groups", 0) >= 1) == bool(args.resample)
        plan = r["prefixed"]
        assert len(plan) == P and all(0 <= n <= G for n in plan) and r["rho"] == sum(plan) / (P * G)
        assert r["L"] == (args.L if any(plan) else 0) and (args.schedule != "none" or not any(plan))
        on_policy = [x for x in samples if x["step"] == r["step"] and not x["resampled"]]
        under_prefix = Counter(x["group"] for x in on_policy if x["prefix_rows"] > 0)
        assert len(on_policy) == P * G and [under_prefix[j] for j in range(P)] == plan
        assert ("kl" in r) == (args.kl_coef > 0)                 # no reference model without a KL
        several = args.epochs * args.minibatches > 1
        if not args.resample:                                    # every minibatch holds rollouts
            assert r["updates"] == args.epochs * min(args.minibatches, P * G)
        if r["updates"]:
            assert all(math.isfinite(r[k]) for k in ("loss", "grad_norm", "entropy"))
            assert 0 < r["entropy"] <= math.log(52) + 1e-4        # at most log V
            replayed = not (args.schedule == "none" or credit.CREDIT_RULES[args.credit].with_prefix)
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
    real_rollout, real_score, on_policy = rl.rollout, rl.score, {}

    def rollout(*args, **kwargs):
        on_policy["last"] = real_rollout(*args, **kwargs)
        return on_policy["last"]

    def score(rollouts, tokenizer, args):
        real_score(rollouts, tokenizer, args)
        if rollouts is on_policy.get("last") and int(rollouts.group[0]) == 0:
            rollouts.correct[:args.group_size] = rollouts.rewards[:args.group_size] = 0.0
        return rollouts
    monkeypatch.setattr(rl, "rollout", rollout)
    monkeypatch.setattr(rl, "score", score)


def test_rl_pairwise(world, tmp_path, pairwise_reward, capsys, one_thread):
    fixed = ["--model", str(world / "model"), "--data", str(world / "train.jsonl"), "--steps", "2", "--lr", "1e-3"]
    rows, refused, total = covering_array(RL_FACTORS, rl_accepted_by(RL_FACTORS, fixed + ["--out", "x"], world))
    refused = [row for row in refused if not orphan_part(row, RL_FACTORS)]
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
