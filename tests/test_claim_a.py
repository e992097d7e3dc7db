"""bench/claim_a.py (the engine of every claim (a) row) on the tiny stages world, and real/report.py's
selection rule, paired differences and prefixes-on-top-of-sampling tables by hand.
    OMP_NUM_THREADS=1 python -m pytest -q tests/test_claim_a.py"""
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
        numbers, candidates = measure(*args)
        (out / "results.json").write_text(json.dumps({"other | toy | greedy": numbers}))
        return numbers, candidates
    monkeypatch.setattr(claim_a, "measure", other_run_writes_first)
    results = run_claim_a(stages_world, out, "--rows", "greedy")
    assert set(results) == {"other | toy | greedy", "base | toy | greedy"}


def samples(out, row):
    """A row's candidates (bench/claim_a.py's samples file), grouped by problem in candidate order."""
    lines = (out / "samples" / "base" / "toy" / f"{row}.jsonl").read_text().splitlines()
    by_problem = {}
    for c in map(json.loads, lines):
        by_problem.setdefault(c["index"], []).append(c)
    assert all([c["candidate"] for c in cands] == list(range(len(cands))) for cands in by_problem.values())
    return [by_problem[i] for i in sorted(by_problem)]


def test_sampling_under_a_prefix_is_keyed_paired_and_recomputable(stages_world, tmp_path, one_thread):
    rows = "none@T=1,vae@T=1"
    results = run_claim_a(stages_world, tmp_path / "a", "--rows", rows)
    none, vae = results["base | toy | none@T=1"], results["base | toy | vae@T=1"]
    # none@T=1's numbers, recomputed from its samples by hand
    cands = samples(tmp_path / "a", "none@T=1")
    assert len(cands) == 6 and all(len(c) == 4 for c in cands)
    shares = [sum(c["right"] for c in cs) / 4 for cs in cands]
    distinct = [len({c["answer"] for c in cs if c["answer"] is not None}) for cs in cands]
    assert none["per_problem_pass@1"] == shares and none["per_problem_distinct"] == distinct
    assert none["pass@1"][0] == pytest.approx(100 * sum(shares) / 6)
    assert none["pass@4"][0] == pytest.approx(100 * sum(s > 0 for s in shares) / 6)
    assert none["distinct_answers"] == pytest.approx(sum(distinct) / 6)
    assert none["cut_off"] == pytest.approx(100 * sum(c["cut_off"] for cs in cands for c in cs) / 24)
    assert all(c["answer"] is None and c["right"] == 0 for cs in cands for c in cs if c["cut_off"])   # no answer, wrong
    # a prefix (L 1) changes the samples; under vae with L 0 (no prefix) every candidate samples
    # none@T=1's tokens: the noise is keyed by (problem, candidate), the same in both rows
    prefixed = samples(tmp_path / "a", "vae@T=1")
    assert [c["text"] for cs in prefixed for c in cs] != [c["text"] for cs in cands for c in cs]
    no_prefix = run_claim_a(stages_world, tmp_path / "b", "--rows", "vae@T=1", "--L", "0")
    assert [c["text"] for cs in samples(tmp_path / "b", "vae@T=1") for c in cs] == [c["text"] for cs in cands for c in cs]
    assert no_prefix["base | toy | vae@T=1"]["per_problem_pass@1"] == shares
    # seeded and resumable: a rerun skips both rows and leaves their samples as they were
    written = (tmp_path / "a" / "samples" / "base" / "toy" / "vae@T=1.jsonl").stat().st_mtime_ns
    again = run_claim_a(stages_world, tmp_path / "a", "--rows", rows)
    assert again == results
    assert (tmp_path / "a" / "samples" / "base" / "toy" / "vae@T=1.jsonl").stat().st_mtime_ns == written
    # the paired differences, vae@T=1 minus none@T=1, by hand from the two samples files
    d_distinct = [len({c["answer"] for c in p} - {None}) - n for p, n in zip(prefixed, distinct)]
    d_at_4 = [any(c["right"] for c in p) - any(c["right"] for c in n) for p, n in zip(prefixed, cands)]
    assert report.paired_distinct(vae, none) == pytest.approx(report.mean_ci(d_distinct, scale=1))
    assert report.paired_distinct(vae, none)[0] == pytest.approx(sum(d_distinct) / 6)
    assert report.paired(vae, none, k=4)[0] == pytest.approx(100 * sum(d_at_4) / 6)
    # an unknown row is refused at start-up, before anything is loaded
    for bad in ("none", "vae@T=0", "noise:math@T=1", "top@T=1"):
        with pytest.raises(SystemExit):
            claim_a.parser.parse_args(["--model", "m", "--label", "l", "--vae", "v", "--tasks", "t", "--out", "o",
                                       "--rows", bad])


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
    # the sampling rows' two temperatures run side by side too
    assert report.wall_minutes(times + [("sampled-T=0.7", "300"), ("sampled-T=1", "360")]) == (60 + 240 + 660 + 360) / 60


def test_in_words_gives_the_spans_of_the_paired_differences():
    row = lambda shares, n=4: {"per_problem_pass@1": shares, "candidates": n}
    final = {"w | t | greedy": row([1.0, 0.0], 1), "w | t | vae": row([1.0, 0.5]), "w | t | noise": row([1.0, 0.0]),
             "w | t | T=0.7": row([0.75, 0.25])}
    words = report.in_words(final, "w", 4)
    # vae - greedy pass@1: (0 + 0.5) / 2; pass@4: vae (1, 1), noise (1, 0), T=0.7 (1, 1)
    assert "prefix minus plain greedy is +25.0 to +25.0 points of pass@1 over the 1 tasks" in words
    assert "pass@4 minus noise's is +50.0 to +50.0 points" in words and "T = 0.7 sampling's +0.0 to +0.0" in words
    assert "Untrained prefixes (noise, RSP, lorem) minus plain greedy: +0.0 to +0.0 points" in words


def test_prefixes_on_top_of_sampling_tables_and_words_by_hand():
    row = lambda shares, distinct: {"per_problem_pass@1": shares, "per_problem_distinct": distinct, "candidates": 4,
                                    "pass@1": report.mean_ci(shares), "pass@4": report.mean_ci([s > 0 for s in shares]),
                                    "distinct_answers": sum(distinct) / len(distinct)}
    base = row([0.25, 0.0, 0.5, 0.0], [2, 1, 2, 1])
    final = {"w | t1 | greedy": row([1.0, 0.0, 1.0, 0.0], [1, 1, 1, 1]), "w | t1 | none@T=0.7": base,
             # vae: every problem one more distinct answer and a right one among 4 -> adds exploration
             "w | t1 | vae@T=0.7": row([0.25, 0.25, 0.5, 0.25], [3, 2, 3, 2]),
             # noise: more distinct answers, pass@4 the same -> does not
             "w | t1 | noise@T=0.7": row([0.25, 0.0, 0.25, 0.0], [3, 2, 3, 2]),
             "w | t2 | none@T=0.7": base, "w | t2 | vae@T=0.7": row([0.25, 0.25, 0.5, 0.25], [3, 2, 3, 2]),
             "other | t1 | none@T=1": base, "other | t1 | vae@T=1": base}
    diffs = report.on_top(final, "w", 4)
    assert set(diffs) == {("t1", "0.7", "vae"), ("t1", "0.7", "noise"), ("t2", "0.7", "vae")}
    pass1, at_4, distinct = diffs["t1", "0.7", "vae"]
    assert pass1 == pytest.approx(report.mean_ci([0, 0.25, 0, 0.25])) and at_4[0] == pytest.approx(50)
    assert distinct == (1, 0)      # one more distinct answer on every problem: no spread
    assert report.adds_exploration(diffs["t1", "0.7", "vae"]) is False   # pass@4: +50 ± 56.6 reaches below 0
    assert not report.adds_exploration(diffs["t1", "0.7", "noise"])
    assert report.adds_exploration(((0, 0), (10, 9), (0.5, 0.4))) and not report.adds_exploration(((0, 0), (10, 11), (0.5, 0.4)))
    tables = report.on_top_tables(final, "w", 4)
    assert tables.count("| 0.7 | none |") == 2 and "| 0.7 | vae − none | +12.5 ± " in tables
    assert "| +1.00 ± 0.00 | no |" in tables
    words = report.on_top_in_words(final, "w", 4)
    assert "changes distinct answers per problem by +1.00 to +1.00" in words
    assert "vae at T = 0.7 on 0 of 2; noise at T = 0.7 on 0 of 2" in words and "no prefix adds exploration" in words
    assert report.on_top_in_words(final, "nobody", 4) == "Not measured in this run."
    # with a wider set of problems the same vae gain clears 0 on both tasks: the answer is yes
    wide = {key: row(r["per_problem_pass@1"] * 4, r["per_problem_distinct"] * 4) for key, r in final.items()}
    words = report.on_top_in_words(wide, "w", 4)
    assert "vae at T = 0.7 on 2 of 2" in words and "a prefix does add exploration on top of sampling: vae at T = 0.7" in words


def test_the_report_headline_answers_the_sampling_question_only_where_it_was_measured(tmp_path, monkeypatch):
    def row(shares, distinct=None, candidates=4):
        return {"per_problem_pass@1": shares, "per_problem_distinct": distinct or [1] * len(shares),
                "candidates": candidates, "pass@1": report.mean_ci(shares),
                "pass@4": report.mean_ci([s > 0 for s in shares]), "distinct_answers": 1.0, "cut_off": 0.0,
                "broken": 0.0, "settings": {"offset": 40, "problems": 40, "candidates": candidates}}
    half, more = [0.5, 0.0] * 20, [0.5, 0.25] * 20   # more: a right answer among 4 on every problem
    tasks = ("t1", "t2")
    tuning = {f"standard | {t} | {r}": row(half) for t in tasks for r in ("greedy", "vae")}
    final = {f"standard | {t} | {r}": row(half) for t in tasks for r in ("greedy", "vae", "noise", "T=0.7")}
    (tmp_path / "tuning").mkdir(), (tmp_path / "final").mkdir(), (tmp_path / "vae").mkdir()
    (tmp_path / "tuning" / "results.json").write_text(json.dumps(tuning))
    (tmp_path / "vae" / "vae.json").write_text(json.dumps({"silhouette": 0.1, "n_pairs": 9, "norms": {
        "token_embedding": 1.0, "mean_pooled_h": 1.0, "prefix": 1.0}}))

    def headline():
        (tmp_path / "final" / "results.json").write_text(json.dumps(final))
        monkeypatch.setattr(sys, "argv", ["report", "--dir", str(tmp_path)])
        report.main()
        text = (tmp_path / "report" / "report.md").read_text()
        return text[text.index("## Final"):text.index("## Prefixes on top of sampling (")]

    assert "**The bar is met on every task**" in headline() and "Prefixes on top of sampling" not in headline()
    for t in tasks:
        final.update({f"standard | {t} | none@T=0.7": row(half, [2] * 40), f"standard | {t} | vae@T=0.7": row(more, [3] * 40)})
    words = headline()
    assert "Prefixes on top of sampling (problems 40-79): against the same temperature" in words
    assert "vae at T = 0.7 on 2 of 2" in words and "a prefix does add exploration on top of sampling: vae" in words
    published = []                       # --publish: the README's three lines, the sampling answer the last
    monkeypatch.setattr(report, "publish_results", lambda name, full, readme, *a, **k: published.append(readme))
    monkeypatch.setattr(sys, "argv", ["report", "--dir", str(tmp_path), "--publish"])
    report.main()
    intro, bar, sampling = published[0].splitlines()
    assert intro.startswith("SmolLM2-135M-Instruct on three") and intro.endswith("**The bar is met on every task** with "
                                                                                 "the standard setting.")
    assert bar.startswith("After the warm-up (scale 1, 10 steps, lr 1e-05, L 1), greedy decoding under a VAE-prior")
    assert sampling.startswith("Prefixes on top of sampling (problems 40-79): against") and sampling in words
