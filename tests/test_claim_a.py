"""bench/claim_a.py (the engine of every claim (a) row) on the tiny stages world, and real/report.py's
selection rule and paired differences by hand."""
import json
import math
import os
import sys

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "bench"))
import claim_a  # noqa: E402
from real import report  # noqa: E402


def run_claim_a(world, out, *extra):
    claim_a.main(["--model", str(world / "base"), "--label", "base", "--vae", str(world / "vae"),
                  "--tasks", f"toy={world}/math_test.jsonl", "--template", "plain", "--problems", "6",
                  "--candidates", "4", "--max-new-tokens", "8", "--batch-size", "10", "--out", str(out), *extra])
    return json.loads((out / "results.json").read_text())


def test_claim_a_rows_are_consistent_seeded_and_resumable(stages_world, tmp_path, one_thread):
    rows = "greedy,T=1,noise,vae,vae:math"
    results = run_claim_a(stages_world, tmp_path / "a", "--rows", rows)
    assert list(results) == [f"base | toy | {row}" for row in rows.split(",")]
    for key, r in results.items():
        n = 1 if key.endswith("greedy") else 4
        assert r["candidates"] == n and len(r["per_problem_pass@1"]) == 6
        assert r["pass@1"][0] == pytest.approx(100 * sum(r["per_problem_pass@1"]) / 6)
        assert all(round(p * n) == pytest.approx(p * n) for p in r["per_problem_pass@1"])   # c right of n
        if n > 1:   # pass@4 of 4 candidates: the share of problems with at least one right
            assert r["pass@4"][0] == pytest.approx(100 * sum(p > 0 for p in r["per_problem_pass@1"]) / 6)
            assert r["pass@4"][0] >= r["pass@1"][0]
    # a rerun skips what is measured; another directory draws the same latents and samples
    seconds = {k: r["seconds"] for k, r in results.items()}
    again = run_claim_a(stages_world, tmp_path / "a", "--rows", rows)
    assert {k: r["seconds"] for k, r in again.items()} == seconds
    other = run_claim_a(stages_world, tmp_path / "b", "--rows", "T=1,vae")
    for row in ("T=1", "vae"):
        assert other[f"base | toy | {row}"]["per_problem_pass@1"] == results[f"base | toy | {row}"]["per_problem_pass@1"]
    # another slice of the problems is other problems (tuning and final never share one)
    first = claim_a.problems_of(f"{stages_world}/math_test.jsonl", 0, 10, 0)
    second = claim_a.problems_of(f"{stages_world}/math_test.jsonl", 10, 10, 0)
    assert not {r["problem"] for r in first} & {r["problem"] for r in second}
    assert (tmp_path / "a" / "results.md").read_text().count("| base |") == 5


def test_rows_written_meanwhile_by_another_run_are_kept(stages_world, tmp_path, monkeypatch, one_thread):
    """Two models measured side by side share one --out: each row is merged into what is on disk."""
    out = tmp_path / "shared"
    measure = claim_a.measure

    def other_run_writes_first(*args):   # while this row is measured, another run saves its own
        row = measure(*args)
        (out / "results.json").write_text(json.dumps({"other | toy | greedy": row}))
        return row
    monkeypatch.setattr(claim_a, "measure", other_run_writes_first)
    results = run_claim_a(stages_world, out, "--rows", "greedy")
    assert set(results) == {"other | toy | greedy", "base | toy | greedy"}


def test_pass_at_k_by_hand():
    assert claim_a.pass_at_k(4, 0, 2) == 0 and claim_a.pass_at_k(4, 4, 1) == 1
    assert claim_a.pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))   # 0.5
    assert claim_a.mean_ci([0, 1]) == pytest.approx((50, 1.96 * 100 * math.sqrt(0.5) / math.sqrt(2)))


def row(per_problem, n=8):
    return {"pass@1": (100 * sum(per_problem) / len(per_problem), 0), "per_problem_pass@1": per_problem,
            "candidates": n}


def test_selection_rule_and_paired_differences():
    # per problem: vae minus greedy is (0.5 - 1, 0.25 - 0) = (-0.5, 0.25): mean -12.5 points
    diff = report.paired(row([0.5, 0.25]), row([1, 0], n=1))
    assert diff[0] == pytest.approx(-12.5)
    assert diff[1] == pytest.approx(100 * 1.96 * math.sqrt(2 * 0.375 ** 2) / math.sqrt(2))
    # pass@2 of 8 candidates with 4 right: 1 - C(4,2)/C(8,2) = 1 - 6/28
    assert report.paired(row([0.5]), row([0.0]), k=2)[0] == pytest.approx(100 * (1 - 6 / 28))

    def tuning(gaps):   # setting -> its gap on each of two tasks (greedy 50, vae 50 - gap)
        return {f"{name} | {task} | {r}": row([0.5 - (gap / 100 if r == "vae" else 0)], n=1 if r == "greedy" else 8)
                for name, task_gaps in gaps.items() for task, gap in zip(("t1", "t2"), task_gaps)
                for r in ("greedy", "vae")}
    # the worst task counts: scale-0.5's worst gap (3) beats the standard's (8)
    chosen, costs = report.choose(tuning({"standard": (8, 0), "scale-0.5": (3, 1), "steps-30": (5, -5)}))
    assert chosen[0] == "scale-0.5" and costs["standard"] == pytest.approx(8)
    # within a point of the best, the standard wins; then the fewest warm-up steps
    assert report.choose(tuning({"standard": (2.5, 0), "scale-0.25": (1.8, 0)}))[0][0] == "standard"
    assert report.choose(tuning({"steps-50": (1, 0), "lr-3e-5": (1.5, 0)}))[0][0] == "lr-3e-5"


def test_wall_time_counts_the_side_by_side_finals_once():
    times = [("vae", "60"), ("warmup-standard", "240"), ("final-converted", "600"), ("final-standard", "660")]
    assert report.wall_minutes(times) == (60 + 240 + 660) / 60
    assert report.wall_minutes([]) == 0


def test_in_words_gives_the_spans_of_the_paired_differences():
    row = lambda shares, n=4: {"per_problem_pass@1": shares, "candidates": n}
    final = {"w | t | greedy": row([1.0, 0.0], 1), "w | t | vae": row([1.0, 0.5]), "w | t | noise": row([1.0, 0.0]),
             "w | t | T=0.7": row([0.75, 0.25])}
    words = report.in_words(final, "w", 4)
    # vae - greedy pass@1: (0 + 0.5) / 2; pass@4: vae (1, 1), noise (1, 0), T=0.7 (1, 1)
    assert "prefix minus plain greedy is +25.0 to +25.0 points of pass@1 over the 1 tasks" in words
    assert "pass@4 minus noise's is +50.0 to +50.0 points" in words and "T = 0.7 sampling's +0.0 to +0.0" in words
    assert "Untrained prefixes (noise, RSP, lorem) minus plain greedy: +0.0 to +0.0 points" in words
