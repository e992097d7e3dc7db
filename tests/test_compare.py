"""toy/compare.py, the exploration comparison's second protocol, without its RL runs: the 95% t and
Welch intervals against hand computations, every arm's rl.py command accepted by rl.py, the seeded
warm-up data, the protocol written before the first run and another one refused in one line, the
follow-up's runs (plain GRPO from the prefix warm-ups) after the arms with its protocol written first,
a failed run's output kept, the report's cells, contrasts and words, the failed control's plain words
counted from its rollouts, and the results writer touching only its own section.

Run:  python -m pytest tests/test_compare.py -q        (a few seconds)
"""
import json
import math

import pytest
import torch

import credit
import rl
from common import UserError
from toy import compare, publish_results


def test_mean_ci_and_welch_are_the_t_intervals():
    m, half = compare.mean_ci([0.1, 0.2, 0.3, 0.4, 0.5])
    sd = math.sqrt(sum((v - 0.3) ** 2 for v in (0.1, 0.2, 0.3, 0.4, 0.5)) / 4)   # 0.158
    assert m == pytest.approx(0.3) and half == pytest.approx(2.776 * sd / math.sqrt(5))   # t(0.975, 4 df)
    assert compare.mean_ci([0.7]) == (0.7, 0.0) and compare.mean_ci([]) == (None, None)
    # equal variances and sizes: Welch's df is 2(n - 1) = 8, t 2.306
    d, half = compare.welch([0.1, 0.2, 0.3, 0.4, 0.5], [0.0, 0.1, 0.2, 0.3, 0.4])
    assert d == pytest.approx(0.1) and half == pytest.approx(2.306 * math.sqrt(2 * sd ** 2 / 5))


@pytest.mark.parametrize("arm", list(compare.ARMS))
def test_every_arm_is_a_valid_rl_command(arm):
    p = {"temperature": 0.5, "steps": 60, "lr": 5e-5, "data": "W/data/math_train.jsonl"}
    args = rl.parser.parse_args(compare.rl_argv("W", "W/run", "W/start", compare.ARMS[arm][1], 3, p))
    rl.check_args(args, 1)
    assert (args.seed, args.steps, args.lr) == (3, 60, 5e-5)
    assert args.vae == ("W/vae" if "vae" in compare.ARMS[arm][1] else None)      # only an arm that reads it
    assert args.temperature == (1.0 if arm == "grpo higher T" else 0.5)          # T + 0.5 for that arm


def test_seeded_warmup_data_resolves_a_fraction_of_ripple_rows_correctly(tmp_path):
    from toy.task import generate_premise_math, verify_solution, write_jsonl
    (tmp_path / "data").mkdir()
    rows = generate_premise_math(200, seed=1, slip=True)
    write_jsonl(rows, str(tmp_path / "data" / "math_train.jsonl"))
    out = json.loads("[" + ",".join(open(compare.seeded_data(str(tmp_path), str(tmp_path), 0.1))) + "]")
    seeded = [r for r in out if r.get("seeded")]
    assert len(out) == 200 and len(seeded) == 20 and all(r["family"] == "ripple" for r in seeded)
    assert {r["strategy"] for r in seeded} == {"round", "split"}
    for r in seeded:
        verify_solution(r)                                    # a correct trace of its strategy
    assert [r for r in out if not r.get("seeded")] == [r for r in rows if r["id"] not in {s["id"] for s in seeded}]


def world(tmp_path):
    from safetensors.torch import save_file
    w = tmp_path / "world"
    for name in ("base/config.json", "data/math_train.jsonl", "vae/vae.json"):
        (w / name).parent.mkdir(parents=True, exist_ok=True)
        (w / name).write_text("{}")
    save_file({"w": torch.zeros(2)}, str(w / "base" / "model.safetensors"))   # weights for state.json's provenance
    (w / "premise").mkdir()
    (w / "premise" / "premise.json").write_text(json.dumps({"temperatures": {"rollout_temperature": 0.5}}))
    return w


def test_protocol_is_written_first_and_a_different_one_is_refused(tmp_path, monkeypatch):
    w = world(tmp_path)
    monkeypatch.setattr(compare, "warmup", lambda *a: (_ for _ in ()).throw(RuntimeError("ran")))
    args = compare.parse_args(["--world", str(w), "--seeds", "2", "--arms", "grpo", "--jobs", "1"])
    with pytest.raises(RuntimeError, match="ran"):      # the protocol is on disk before any run
        compare.compare(args)
    written = json.loads((w / "compare" / "protocol.json").read_text())
    assert written["seeds"] == [0, 1] and list(written["arms"]) == ["grpo"] and written["rollout_temperature"] == 0.5
    assert "| grpo | plain warm-up |" in (w / "compare" / "protocol.md").read_text()
    other = compare.parse_args(["--world", str(w), "--seeds", "3", "--arms", "grpo"])
    with pytest.raises(UserError, match="another protocol"):
        compare.compare(other)


def test_the_control_climbs_its_ladder_and_the_arms_run_at_the_first_rung_that_passes(tmp_path, monkeypatch):
    """Rungs in order (the world's problems at 1x and 2x --steps, then its ripple problems alone); a
    stand-in RL run gains 25 points only on ripple problems at 2x, so the arms run there, at the
    sweep's best lr (the highest ripple pass@1; ties: the smaller lr)."""
    from toy.task import generate_premise_math, write_jsonl
    w = world(tmp_path)
    write_jsonl(generate_premise_math(40, seed=3), str(w / "data" / "math_train.jsonl"))
    monkeypatch.setattr(compare, "warmup", lambda world, out, name, fraction, steps: f"{name}-{fraction}-{steps}")
    monkeypatch.setattr(compare, "score_model", lambda world, model: {"pass1": 0.5, "pass1_ripple": 0.05, "pass1_plain": 0.95})
    calls = []

    def rl_run(world, out, name, start, flags, seed, p):
        calls.append((name, start, seed, p))
        assert name not in compare.FOLLOW_UP or (w / "compare" / "follow_up.md").exists()   # fixed before its runs
        passing = p["data"].endswith("rl_data_ripple.jsonl") and p["steps"] == 20 and p.get("lr", 1) >= 5e-5
        return {"name": name, "seed": seed, "pass1_ripple": 0.30 if passing else 0.05, "pass1": 0.5, "pass1_plain": 0.7,
                "pass8_ripple": 0.5, "minority_curve": [0.1], "ripple_solved_in_training": 0.1, "ripple_solved_by_minority": 0.1, "rollouts": 8}
    monkeypatch.setattr(compare, "rl_run", rl_run)
    args = compare.parse_args(["--world", str(w), "--seeds", "2", "--steps", "10", "--arms", "grpo,palette linear",
                               "--jobs", "1"])
    state = compare.compare(args)
    sweeps = [(p["data"].rsplit("/", 1)[1], p["steps"], p["lr"]) for name, _, _, p in calls if name.startswith("sweep")]
    assert sweeps == [(d, n, lr) for d, n in [("math_train.jsonl", 10), ("math_train.jsonl", 20),
                                              ("rl_data_ripple.jsonl", 10), ("rl_data_ripple.jsonl", 20)]
                      for lr in compare.LRS]
    assert state["control"] == {"lr": 5e-5, "steps": 20, "problems": "ripple", "gain": pytest.approx(0.25), "passed": True}
    assert state["provenance"]["threads"] == 1 and len(state["provenance"]["weights_sha256"]) == 12   # one thread a run
    arms = [(name, start, seed, p["steps"], p["lr"], p["data"].rsplit("/", 1)[1]) for name, start, seed, p in calls
            if not name.startswith("sweep")]
    assert arms == [("grpo", "plain-0.05-10", 0, 20, 5e-5, "rl_data_ripple.jsonl"),
                    ("grpo", "plain-0.05-10", 1, 20, 5e-5, "rl_data_ripple.jsonl"),
                    ("palette linear", "vae-0.05-10", 0, 20, 5e-5, "rl_data_ripple.jsonl"),
                    ("palette linear", "vae-0.05-10", 1, 20, 5e-5, "rl_data_ripple.jsonl"),
                    # the follow-up: plain GRPO from each prefix warm-up, at the arms' settings and seeds
                    ("grpo from the vae warm-up", "vae-0.05-10", 0, 20, 5e-5, "rl_data_ripple.jsonl"),
                    ("grpo from the vae warm-up", "vae-0.05-10", 1, 20, 5e-5, "rl_data_ripple.jsonl"),
                    ("grpo from the rsp warm-up", "rsp-0.05-10", 0, 20, 5e-5, "rl_data_ripple.jsonl"),
                    ("grpo from the rsp warm-up", "rsp-0.05-10", 1, 20, 5e-5, "rl_data_ripple.jsonl")]
    assert "| grpo from the vae warm-up | vae warm-up | `--schedule none --prefix-source none` |" in \
        (w / "compare" / "follow_up.md").read_text()
    assert [r["name"] for r in state["follow_up"]] == [a[0] for a in arms[4:]]
    ripple = [json.loads(line) for line in open(w / "compare" / "rl_data_ripple.jsonl")]
    assert ripple and all(r["family"] == "ripple" for r in ripple)


def test_bad_arms_and_a_missing_world_are_one_line(tmp_path, capsys):
    with pytest.raises(UserError, match="unknown arm 'gpro'"):
        compare.parse_args(["--world", str(world(tmp_path)), "--arms", "gpro"])
    with pytest.raises(SystemExit):                         # before ProcessPoolExecutor(0) could refuse it
        compare.parse_args(["--world", str(tmp_path / "world"), "--jobs", "0"])
    assert capsys.readouterr().err.strip().endswith("argument --jobs: must be >= 1, got 0")
    (tmp_path / "bare").mkdir()
    with pytest.raises(UserError, match="no base/config.json; runs/explore.sh builds the premise world"):
        compare.parse_args(["--world", str(tmp_path / "bare")])


def test_summary_cells_and_verdicts(tmp_path):
    def result(name, seed, ripple):
        return {"name": name, "seed": seed, "pass1": 0.5, "pass1_ripple": ripple, "pass1_plain": 0.6, "pass8_ripple": 1.0,
                "minority_curve": [0.0, 0.5], "ripple_solved_in_training": 0.5, "ripple_solved_by_minority": 0.25,
                "rollouts": 100 + seed}
    state = {"protocol": {"arms": {"grpo": 0, "palette linear": 0}, "control_gain": 0.2,
                          "hypothesis": "palette linear beats grpo"},
             "seed_fraction": [{"fraction": 0.05, "steps": 10, "pass1_ripple": 0.06}],
             "start": {"plain": {"pass1": 0.5, "pass1_ripple": 0.06, "pass1_plain": 0.94},
                       "vae": {"pass1": 0.5, "pass1_ripple": 0.0, "pass1_plain": 1.0}},
             "lr_sweep": [{"lr": 5e-5, "steps": 60, "problems": "ripple", "pass1_ripple": 0.4}],
             "control": {"lr": 5e-5, "steps": 60, "problems": "ripple", "gain": 0.34, "passed": True},
             "runs": [result("grpo", 0, 0.3), result("grpo", 1, 0.5), result("palette linear", 0, 0.8),
                      result("palette linear", 1, 0.9)]}
    text = compare.summary(state)
    half = 12.706 * math.sqrt(0.02) / math.sqrt(2)                 # t(0.975, 1 df), sd 0.141
    assert f"| grpo | 2 | 40.0 ± {100 * half:.1f} | 60.0 ± 0.0 | 50.0 ± 0.0 | 100.0 ± 0.0 | 25.0 ± 0.0 | 50.0 ± 0.0 (25.0 ± 0.0) | 100 ± 6 |" in text
    assert "Positive control: ripple problems, lr 5e-05, 60 steps, ripple pass@1 +34.0 points (passed" in text
    d, ci = compare.welch([0.8, 0.9], [0.3, 0.5])
    assert f"- palette linear: ripple pass@1 {100 * d:+.1f} ± {100 * ci:.1f} points against grpo" in text
    assert " grpo (all problems: +0.0 ± 0.0).\n" in text
    assert ("supported" if d - ci > 0 else "not supported") in text.splitlines()[-3]
    assert (f"palette (linear) minus GRPO is {100 * d:+.1f} ± {100 * ci:.1f} points, and no arm beats GRPO: claim (b) "
            "is not supported here. At their first step, before any update, 0% of plain GRPO's rollouts were round or split, "
            "against 0% of the palette's.") in text
    state["runs"][0]["minority_curve"] = [0.4, 0.5]                  # grpo seed 0 left column on 40% at step 1
    assert ("before any update, 20% of plain GRPO's rollouts were round or split, against 0% of the palette's: the seeded plain warm-up (ripple 6% greedily, against 0% for the vae one) already had "
            "token sampling reach the winning strategies, so from that warm-up plain GRPO had no scarcity of strategies to "
            "overcome.") in compare.summary(state)
    assert "the arms' held-out plain pass@1 is 60-60% (the plain warm-up's 94%): training on ripple" in text
    # the follow-up: its own table and contrasts, the first one its hypothesis
    state["follow_up_protocol"] = compare.follow_up_protocol()
    state["follow_up"] = [result("grpo from the vae warm-up", 1, 0.2), result("grpo from the vae warm-up", 0, 0.1)]
    state["follow_up"][1]["minority_curve"] = [0.1, 0.2]           # seed 0 left column on 10% at step 1
    text = compare.summary(state)
    d, ci = compare.welch([0.8, 0.9], [0.1, 0.2])                  # palette linear - grpo from the vae warm-up
    assert f"- palette linear: ripple pass@1 {100 * d:+.1f} ± {100 * ci:.1f} points against grpo from the vae warm-up: " in text
    assert f"| grpo from the vae warm-up | 2 | 15.0 ± {100 * 12.706 * math.sqrt(0.005) / math.sqrt(2):.1f} |" in text
    assert "- grpo from the vae warm-up: ripple pass@1 -25.0 ±" in text and "rsp warm-up: ripple" not in text
    assert f"from the same warm-up, prefixes during RL help): {'supported' if d - ci > 0 else 'not supported'}.\n" in text
    assert text.endswith("From the same warm-up, at the first step, before any update, 5% of plain GRPO's rollouts were "
                         "round or split and 0% of the palette's (palette linear). After 60 steps the palette minus plain "
                         f"GRPO is {100 * d:+.1f} ± {100 * ci:.1f} points of held-out ripple pass@1, "
                         f"{'better' if d - ci > 0 else 'not distinguishable'}; per seed, grpo from the vae warm-up "
                         "ended at 10, 20% and palette linear at 80, 90%.")          # in seed order
    # the README's headline: three lines, each hypothesis after the contrast that tests it
    intro, first, follow = compare.headline(state, 0.7).splitlines()
    assert intro.startswith("Premise world, second protocol (rollout temperature 0.7, chosen by the premise checks")
    assert first.startswith("- palette linear: ripple pass@1 ") and "Hypothesis (palette linear beats grpo): " in first
    assert follow.startswith(f"- palette linear: ripple pass@1 {100 * d:+.1f} ± {100 * ci:.1f} points against grpo from "
                             "the vae warm-up: ") and "Follow-up hypothesis (palette linear beats grpo from" in follow
    state["runs"], state["control"]["passed"] = [], False
    assert compare.summary(state).endswith("No arm ran: the positive control failed.")
    assert compare.headline(state, 0.7).endswith("learnable): no arm ran: the positive control failed.")


def test_results_go_to_docs_and_the_headline_replaces_only_its_readme_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("top\n<!-- x:start -->\nold\n<!-- x:end -->\nbottom\n")
    (tmp_path / "curves.png").write_bytes(b"png")
    publish_results("x", "full\ntables\n", "new\ntable\n", "python -m toy.report --publish", repo=str(tmp_path),
                    pictures=[(tmp_path / "curves.png", "x_curves.png")])
    assert (tmp_path / "docs" / "results" / "x_curves.png").read_bytes() == b"png"
    assert readme.read_text() == ("top\n<!-- x:start -->\nnew\ntable\n\nFull tables: [docs/results/x.md](docs/results/x.md), "
                                  "from `python -m toy.report --publish` at commit unknown.\n<!-- x:end -->\nbottom\n")
    assert (tmp_path / "docs" / "results" / "x.md").read_text() == \
        "<!-- written by `python -m toy.report --publish` at commit unknown -->\nfull\ntables\n"
    with pytest.raises(UserError, match="no <!-- y:start --> ... <!-- y:end --> markers"):
        publish_results("y", "z", "z", "cmd", repo=str(tmp_path))


def test_a_failed_run_keeps_its_output_and_says_where(tmp_path):
    """rl.py refuses (its model is missing): one line naming the log, which holds what rl.py printed."""
    p = {"temperature": 0.5, "steps": 1, "lr": 5e-5, "data": "nowhere.jsonl"}
    with pytest.raises(UserError, match=r"rl.py failed \(error: .*\); its output is in .*grpo_seed3/rl.log") as refused:
        compare.rl_run(str(tmp_path / "world"), str(tmp_path / "out"), "grpo", str(tmp_path / "none"),
                       compare.ARMS["grpo"][1], 3, p)
    log = str(refused.value).rsplit("its output is in ", 1)[1]
    assert "error:" in open(log).read()


def test_why_no_arm_counts_the_control_runs_rollouts(tmp_path):
    """The failed control's plain words come from its rollouts: success of column and of round/split
    on each family, and the minority share early and late, here set by hand."""
    from toy.task import generate_premise_math, math_family, solve
    rows = generate_premise_math(40, seed=3)
    ripple = next(r for r in rows if math_family(r) == "ripple")
    plain = next(r for r in rows if math_family(r) == "plain")

    def sample(row, strategy, reward, step):
        return {"step": step, "problem": row["problem"], "completion": solve(row, strategy), "reward": reward}
    # early: ripple 1 column (0) + 1 split (1), plain 1 column (1) + 1 round (0); late: column only
    samples = [sample(ripple, "column", 0, 0), sample(ripple, "split", 1, 0), sample(plain, "column", 1, 0),
               sample(plain, "round", 0, 0)] + [sample(r, "column", float(r is plain), 30) for r in (ripple, plain)]
    run = tmp_path / "sweep_lr5e_05_steps60_seed0"
    run.mkdir()
    (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    state = {"control": {"lr": 5e-05, "steps": 60, "problems": "mixed"}}
    text = compare.why_no_arm(state, str(tmp_path))
    assert "column solved 100% of plain problems and 0% of ripple ones" in text
    assert "round or split solved 100% of ripple problems and 0% of plain ones" in text
    assert "fell on ripple problems from 50% (first 10 steps) to 0% (last 10), and on plain ones from 50% to 0%" in text


# -- the credit follow-up (toy/credit_transfer.py) ----------------------------------------------------

def test_every_credit_arm_is_a_valid_rl_command():
    from toy import credit_transfer
    p = {"temperature": 0.7, "steps": 60, "lr": 1e-4, "data": "W/data/rl_data_ripple.jsonl"}
    arms = {**credit_transfer.VAE_ARMS, **credit_transfer.rsp_arms("nudge")}
    assert {f"palette linear ({rule})" for rule in credit.CREDIT_RULES} <= set(arms)      # every rule of the registry
    for name, (start, flags) in arms.items():
        args = rl.parser.parse_args(compare.rl_argv("W", "W/run", "W/start", flags, 2, p))
        rl.check_args(args, 1)
        assert (args.steps, args.lr, args.temperature, args.seed) == (60, 1e-4, 0.7, 2)
        if name.startswith(("palette", "rsp")):
            assert args.schedule == "linear" and args.L == 1 and args.credit == name.split("(")[1][:-1]


def test_the_credit_follow_up_is_fixed_first_and_picks_the_rsp_rule_from_the_palette_arms(tmp_path, monkeypatch):
    """The protocol is on disk before the first run; the vae arms run first; the rsp arm takes the
    rule whose palette arm has the highest mean ripple pass@1; the report tests the hypothesis for
    each transfer rule."""
    from toy import credit_transfer
    w = world(tmp_path)
    monkeypatch.setattr(credit_transfer, "warmup", lambda world, out, name, fraction, steps: f"{name}-{fraction}-{steps}")
    monkeypatch.setattr(credit_transfer, "score_model", lambda world, model: {"pass1": 0.5, "pass1_ripple": 0.0})
    monkeypatch.setattr(credit_transfer, "rl_problems", lambda world, out, problems: f"{problems}.jsonl")
    ripple = {"grpo from the vae warm-up": (0.6, 0.7), "palette linear (prefixed)": (0.6, 0.65),
              "palette linear (naive)": (0.8, 0.85), "palette linear (naive-shaped)": (0.5, 0.6),
              "palette linear (nudge)": (0.7, 0.72), "rsp linear (naive)": (0.6, 0.6), "grpo from the rsp warm-up": (0.5, 0.55)}
    calls = []

    def rl_run(world, out, name, start, flags, seed, p):
        assert (tmp_path / "out" / "protocol.md").exists()                      # fixed before any run
        calls.append((name, start, seed, p["steps"], p["lr"], p["temperature"], p["data"]))
        return {"name": name, "seed": seed, "pass1_ripple": ripple[name][seed], "pass1": 0.5, "pass1_plain": 0.5,
                "pass8_ripple": 0.9, "minority_curve": [0.3 if "linear" in name else 0.05], "ripple_solved_in_training": 0.4,
                "ripple_solved_by_minority": 0.2, "rollouts": 7680, "eval_curve": [[0, 0.4], [60, 0.5]]}
    monkeypatch.setattr(credit_transfer, "rl_run", rl_run)
    credit_transfer.main(["--world", str(w), "--out", str(tmp_path / "out"), "--seeds", "2", "--jobs", "1"])
    assert [c[0] for c in calls[:10:2]] == list(credit_transfer.VAE_ARMS)          # the vae arms first
    assert [c[0] for c in calls[10::2]] == ["rsp linear (naive)", "grpo from the rsp warm-up"]   # naive ended highest
    assert {c[3:] for c in calls} == {(60, 1e-4, 0.7, "ripple.jsonl")} and {c[1] for c in calls} == {"vae-0.4-30", "rsp-0.4-30"}
    state = json.load(open(tmp_path / "out" / "state.json"))
    assert state["rsp_rule"] == "naive"
    text = credit_transfer.summary(state)
    d, ci = compare.welch([0.8, 0.85], [0.6, 0.7])
    assert f"- palette linear (naive): ripple pass@1 {100 * d:+.1f} ± {100 * ci:.1f} points against grpo from the vae warm-up" in text
    assert "for each of naive, naive-shaped, nudge): naive: " + ("supported" if d - ci > 0 else "not supported") in text
    assert "30% of the palette's" in text and "5% of plain GRPO's rollouts" in text
    words, hypothesis = credit_transfer.headline(state).splitlines()            # the README's two lines
    assert words.startswith("Premise world, credit rules (the follow-up fixed in toy/credit_transfer.py). From the vae")
    assert words.endswith(" points.") and f"{text}\n".count(f"\n{hypothesis}\n") == 1
    credit_transfer.summarise(str(tmp_path / "out"), publish=False)
    assert (tmp_path / "out" / "curves.png").stat().st_size > 1000 and "## Results" in (tmp_path / "out" / "report.md").read_text()
