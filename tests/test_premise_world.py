"""Tests for the premise setting of the toy world (toy.task "The premise setting",
toy/build_world.py --setting premise) and the premise checks (toy/premise.py).

Run: python -m pytest tests/test_premise_world.py -q      (CPU, about a minute)
"""

import hashlib
import json
import os
from collections import Counter

import pytest

from common import read_jsonl
from toy.build_world import DATA_FILES, build, encode_examples, parse_args, prompt_text, write_data
from toy.task import (MATH_FAMILIES, PREAMBLE_MATCH, PREAMBLE_SHARE, PREMISE_STRATEGY_WEIGHTS, STRATEGIES,
                      detect_strategy, math_family, preamble_strategy, slipped_column_solution, solve,
                      verify_solution)
from toy.tokenizer import build_tokenizer

MATH = STRATEGIES["math"]

# sha256 of the default setting's files for these flags, written by the build before the premise
# setting existed: the default world must not change by a byte.
DEFAULT_FLAGS = ["--n-pretrain", "40", "--n-math-train", "20", "--n-math-test", "10", "--n-vae", "5",
                 "--n-eval", "5", "--seed", "3"]
DEFAULT_SHA256 = {
    "math_test.jsonl": "cfbf48629f659d1be2909c0f7c55cce8c4e562dd339f5668b6e117a708d99ef4",
    "math_train.jsonl": "349f435b6eacfc738837e4bb56fee9795310cfa2adf435e055be30bda04b8d33",
    "train.jsonl": "a60bae65bd720f337e11f377e99be13f4e4161c05e672796c540ce2f32dd797b",
    "vae_code.jsonl": "79a3fb08463d752aaafe5da4beb486da56ab7fbcfeef1f2f43589ef5de4651aa",
    "vae_math.jsonl": "45e7dbae90778e5532ba92f8912a4db60037283d8b8a0d88d0af0f967e9e9e6d",
    "vae_qa.jsonl": "20dc654b5b3cceb9cbd3e86825e13625b4ae404e242637cfc4f604d2fcdf7c76",
}


@pytest.fixture(scope="module")
def premise_data(tmp_path_factory):
    """The premise setting's data files at a size where shares are measurable: {name: rows}."""
    out = str(tmp_path_factory.mktemp("premise_data"))
    args = parse_args(["--out", out, "--setting", "premise", "--n-pretrain", "3000",
                       "--n-math-train", "400", "--n-math-test", "200", "--n-vae", "100", "--n-eval", "10"])
    write_data(os.path.join(out, "data"), args)
    return {name: read_jsonl(os.path.join(out, "data", name)) for name in DATA_FILES}


def test_math_family():
    assert math_family({"domain": "math", "a": 45, "b": 55}) == "ripple"    # 5+5 carries into 4+5=9
    assert math_family({"problem": "199+1=?", "domain": "math"}) == "ripple"
    assert math_family({"domain": "math", "a": 47, "b": 38}) == "plain"     # carry into 4+3=7
    assert math_family({"domain": "math", "a": 45, "b": 54}) == "plain"     # 9 with no carry into it


def test_slipped_column_is_wrong_exactly_on_ripple():
    for a in range(10, 400, 7):
        for b in range(10, 400, 11):
            row = {"problem": f"{a}+{b}=?", "domain": "math", "answer": str(a + b)}
            slipped = dict(row, solution=slipped_column_solution(row))
            assert detect_strategy(slipped["solution"]) == "column"
            if math_family(row) == "plain":
                assert slipped["solution"] == solve(row, "column")
            else:
                assert not verify_solution(slipped)
                assert verify_solution(dict(row, solution=solve(row, "round")))
                assert verify_solution(dict(row, solution=solve(row, "split")))


def test_dominant_strategy_without_preamble(premise_data):
    math = [r for r in premise_data["train.jsonl"] if r["domain"] == "math"]
    plain = [r for r in math if not r["preamble"]]
    assert all(detect_strategy(r["solution"]) == r["strategy"] for r in math)
    shares = Counter(r["strategy"] for r in plain)
    assert shares["column"] / len(plain) >= 0.92, shares
    for s in MATH:
        assert abs(shares[s] / len(plain) - PREMISE_STRATEGY_WEIGHTS[s]) < 0.02, shares
    # four fifths of the corpus is math; code and qa keep the default generator at an eighth each
    assert Counter(r["domain"] for r in premise_data["train.jsonl"]) == {"math": 3000, "code": 375, "qa": 375}


def test_preamble_shows_the_strategy(premise_data):
    math = [r for r in premise_data["train.jsonl"] if r["domain"] == "math"]
    with_preamble = [r for r in math if r["preamble"]]
    assert abs(len(with_preamble) / len(math) - PREAMBLE_SHARE) < 0.03
    shown = [preamble_strategy(r["preamble"]) for r in with_preamble]
    assert all(s in MATH for s in shown)                       # a preamble is one strategy's cue
    assert not any(r["problem"][0] in "c-0" for r in math)     # and no problem starts like one
    match = sum(s == r["strategy"] for s, r in zip(shown, with_preamble)) / len(with_preamble)
    assert abs(match - PREAMBLE_MATCH) < 0.03, match
    # with a preamble the strategy is uniform, so the preamble (not habit) decides it
    shares = Counter(r["strategy"] for r in with_preamble)
    assert all(abs(shares[s] / len(with_preamble) - 1 / 3) < 0.05 for s in MATH), shares
    # the preamble is in the prompt, before the problem, and never in the loss
    tokenizer = build_tokenizer()
    row = with_preamble[0]
    (ids, n_prompt), = encode_examples([row], tokenizer)
    assert len(row["preamble"]) == 1
    assert tokenizer.decode(ids[:n_prompt]) == row["preamble"] + row["problem"] + "\n"
    assert tokenizer.decode(ids[n_prompt:-1]) == row["solution"]


def test_minority_wins_on_ripple_by_the_verifier(premise_data):
    """The corpus's traces, checked by the task's own verifier: column is right on plain problems
    and wrong on every ripple one, round and split are right everywhere."""
    math = [r for r in premise_data["train.jsonl"] if r["domain"] == "math"]
    assert abs(sum(r["family"] == "ripple" for r in math) / len(math) - 0.5) < 0.05
    correct = {(s, f): [] for s in MATH for f in MATH_FAMILIES}
    for r in math:
        assert r["family"] == math_family(r)
        correct[r["strategy"], r["family"]].append(verify_solution(r))
    rate = {key: sum(v) / len(v) for key, v in correct.items()}
    assert rate["column", "plain"] == 1.0 and rate["column", "ripple"] == 0.0, rate
    for s in ("round", "split"):
        assert rate[s, "plain"] == rate[s, "ripple"] == 1.0, rate


def test_other_files(premise_data):
    """Held-out and VAE files hold correct traces; math_train (RL, warm-up) the corpus's own,
    slip included, so a warm-up on it cannot teach the carry the family is built on."""
    for name in DATA_FILES:
        if name not in ("train.jsonl", "math_train.jsonl"):
            assert all(verify_solution(r) for r in premise_data[name]), name
    for r in premise_data["math_train.jsonl"]:
        slipped = r["strategy"] == "column" and r["family"] == "ripple"
        assert verify_solution(r) != slipped, r
    for name in ("math_train.jsonl", "math_test.jsonl", "vae_math.jsonl"):
        rows = premise_data[name]
        assert not any(r["preamble"] for r in rows), name
        assert 0.4 < sum(r["family"] == "ripple" for r in rows) / len(rows) < 0.6, name
    # RL problems follow the base model's habits; the VAE sees every strategy
    assert Counter(r["strategy"] for r in premise_data["math_train.jsonl"])["column"] / 400 > 0.9
    assert min(Counter(r["strategy"] for r in premise_data["vae_math.jsonl"]).values()) > 20
    test = {r["problem"] for r in premise_data["math_test.jsonl"]}
    assert not test & {r["problem"] for r in premise_data["train.jsonl"] + premise_data["math_train.jsonl"]}


def test_default_setting_data_unchanged(tmp_path):
    args = parse_args(["--out", str(tmp_path)] + DEFAULT_FLAGS)
    assert args.setting == "default"
    files = write_data(str(tmp_path / "data"), args)
    for name, digest in DEFAULT_SHA256.items():
        assert hashlib.sha256((tmp_path / "data" / name).read_bytes()).hexdigest() == digest, name
    # and the default prompt is the problem and a newline, as before
    row = files["train.jsonl"][0]
    assert prompt_text(row) == row["problem"] + "\n"


def test_premise_checks_end_to_end(tmp_path):
    """A miniature premise world, built through the real entry point, then the premise script
    with the project's own VAE and warm-up stages; the report has every section and form."""
    from toy import Provenance, provenance
    from toy.premise import main
    world = str(tmp_path / "world")
    build(parse_args(["--out", world, "--setting", "premise", "--size", "tiny", "--steps", "30",
                      "--warmup", "5", "--batch-size", "16", "--lr", "1e-2", "--n-pretrain", "200",
                      "--n-math-train", "40", "--n-math-test", "40", "--n-vae", "50", "--n-eval", "4",
                      "--k", "2", "--max-new-tokens", "24"]))
    out = str(tmp_path / "checks")
    report = main(["--world", world, "--out", out, "--problems", "8", "--samples", "2", "--latents", "2",
                   "--max-new-tokens", "24", "--vae-steps", "20", "--warmup-steps", "1",
                   "--forms", "centred,paper"])
    with open(os.path.join(out, "premise.json")) as f:
        assert json.load(f)["dominant"] == report["dominant"]
    md = open(os.path.join(out, "premise.md")).read()
    for section in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5."):
        assert section in md
    assert f"Provenance: {Provenance(**report['provenance'])}." in md          # which world, which CPU settings
    assert report["provenance"]["weights_sha256"] == provenance(os.path.join(world, "base")).weights_sha256
    t = report["temperatures"]                   # the premise at each rollout temperature, and the rule
    assert list(t["by_temperature"]) == ["1.0", "0.7", "0.5", "0.3"] and t["rollout_temperature"] in (1.0, 0.7, 0.5, 0.3)
    for T, row in t["by_temperature"].items():
        assert set(row["forced_success"]) == set(MATH) and 0 <= row["problems_leaving_dominant"] <= 1
        meets = min(row["forced_success"][s]["ripple"] for s in MATH if s != report["dominant"]) >= 0.3 \
            and row["problems_leaving_dominant"] < 0.1
        assert not meets or float(T) <= t["rollout_temperature"]     # the highest that meets the rule
    base = report["base"]
    assert base["families"] == {"plain": 4, "ripple": 4}
    for key in ("greedy_shares", "sampled_shares"):
        assert abs(sum(base[key].values()) - 1) < 1e-6
    assert set(base["forced_success"]) == set(MATH)
    assert set(report["prefixes"]) == {"noise", "random_decoder", "vae_centred", "vae_centred (math region)",
                                       "vae_paper", "vae_paper (math region)"}
    for row in report["prefixes"].values():
        assert abs(sum(row["greedy"]["shares"].values()) - 1) < 1e-6
        assert 0.0 <= row["sampled"]["changed_vs_no_prefix"] <= 1.0
    prefixes = report["prefixes"]
    assert abs(prefixes["noise"]["prefix_pairwise_cos"]) < 0.1          # random directions
    assert abs(prefixes["vae_centred"]["prefix_norm"] - prefixes["vae_centred"]["token_norm"]) < 1e-3
    # the paper's form is h_hat as decoded: a mean of embeddings, far shorter than a token
    assert prefixes["vae_paper"]["prefix_norm"] < 0.8 * prefixes["vae_paper"]["token_norm"]
