"""toy/compare.py, the exploration comparison, without its RL runs: the 95% t interval against a
hand computation, every arm's rl.py flags accepted by rl.py's parser, the protocol written before
the first run and a rerun under another one refused in one line, a failed run's output kept, the
table's cells, and the README writer touching only its own section.

Run:  python -m pytest tests/test_compare.py -q        (a few seconds)
"""
import json
import math

import pytest

import rl
from toy import publish_results
from guard import UserError
from toy import compare


def test_mean_ci_is_the_t_interval():
    m, half = compare.mean_ci([0.1, 0.2, 0.3, 0.4, 0.5])
    sd = math.sqrt(sum((v - 0.3) ** 2 for v in (0.1, 0.2, 0.3, 0.4, 0.5)) / 4)   # 0.158
    assert m == pytest.approx(0.3)
    assert half == pytest.approx(2.776 * sd / math.sqrt(5))                      # t(0.975, 4 df)
    assert compare.mean_ci([0.7]) == (0.7, 0.0)
    assert compare.mean_ci([]) == (None, None)


@pytest.mark.parametrize("arm", list(compare.ARMS))
def test_every_arm_is_a_valid_rl_command(arm, tmp_path):
    argv = compare.rl_argv("W", str(tmp_path / "run"), arm, seed=3, steps=20)
    args = rl.parser.parse_args(argv)
    assert args.seed == 3 and args.steps == 20 and args.samples_per_step == 0
    assert args.model == f"W/{compare.ARMS[arm][0]}/model"
    assert (args.vae == "W/vae") == ("vae" in (args.prefix_source, args.resample_source) and
                                     (args.schedule != "none" or args.resample > 0))


def world(tmp_path):
    w = tmp_path / "world"
    for name in ("data/math_train.jsonl", "vae/vae.json", "sft/model/config.json",
                 "sft_plain/model/config.json"):
        (w / name).parent.mkdir(parents=True, exist_ok=True)
        (w / name).write_text("{}")
    return w


def test_protocol_is_written_first_and_a_different_one_is_refused(tmp_path, monkeypatch):
    w = world(tmp_path)
    monkeypatch.setattr(compare, "run_one", lambda *a: (_ for _ in ()).throw(RuntimeError("ran")))
    args = compare.parse_args(["--world", str(w), "--seeds", "2", "--arms", "grpo", "--jobs", "1"])
    with pytest.raises(RuntimeError, match="ran"):      # the protocol is on disk before any run
        compare.compare(args)
    written = json.loads((w / "compare" / "protocol.json").read_text())
    assert written["seeds"] == [0, 1] and list(written["arms"]) == ["grpo"]
    assert "| grpo | sft_plain |" in (w / "compare" / "protocol.md").read_text()
    other = compare.parse_args(["--world", str(w), "--seeds", "3", "--arms", "grpo"])
    with pytest.raises(UserError, match="another protocol"):
        compare.compare(other)


def test_bad_arms_and_missing_stages_are_one_line(tmp_path):
    with pytest.raises(UserError, match="unknown arm 'gpro'"):
        compare.parse_args(["--world", str(world(tmp_path)), "--arms", "gpro"])
    with pytest.raises(UserError, match="no sft/model/config.json"):
        (tmp_path / "bare" / "data").mkdir(parents=True)
        (tmp_path / "bare" / "data" / "math_train.jsonl").write_text("")
        (tmp_path / "bare" / "vae").mkdir()
        (tmp_path / "bare" / "vae" / "vae.json").write_text("{}")
        compare.parse_args(["--world", str(tmp_path / "bare")])


def test_summary_cells_are_mean_and_interval_over_seeds():
    def result(arm, seed, pass1):
        return {"arm": arm, "seed": seed, "pass1": pass1, "pass1_ripple": 0.0, "pass8": 1.0,
                "pass8_ripple": None, "minority_curve": [0.0, 0.5], "greedy_minority": 0.25,
                "rollouts": 100 + seed}
    table = compare.summary_rows([result("grpo", 0, 0.5), result("grpo", 1, 0.7),
                                  result("palette linear", 0, 0.9)],
                                 {"sft_plain": (0.4, 0.25), "sft": (0.5, None)})
    rows = table.splitlines()[2:]
    half = 12.706 * math.sqrt(0.02) / math.sqrt(2)                 # t(0.975, 1 df), sd 0.141
    assert rows[0] == (f"| grpo | 2 | 40.0 (25.0) | 60.0 ± {100 * half:.1f} | 0.0 ± 0.0 | 100.0 ± 0.0 | – | "
                       f"25.0 ± 0.0 | 25.0 ± 0.0 | 100 ± 6 |")
    assert rows[1].startswith("| palette linear | 1 | 50.0 (–) | 90.0 ± 0.0 |")


def test_results_go_to_docs_and_the_headline_replaces_only_its_readme_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("top\n<!-- x:start -->\nold\n<!-- x:end -->\nbottom\n")
    publish_results("x", "full\ntables\n", "new\ntable\n", "python -m toy.report --publish", repo=str(tmp_path))
    assert readme.read_text() == ("top\n<!-- x:start -->\nnew\ntable\n\nFull tables: [docs/results/x.md](docs/results/x.md), "
                                  "from `python -m toy.report --publish` at commit unknown.\n<!-- x:end -->\nbottom\n")
    assert (tmp_path / "docs" / "results" / "x.md").read_text() == \
        "<!-- written by `python -m toy.report --publish` at commit unknown -->\nfull\ntables\n"
    with pytest.raises(UserError, match="no <!-- y:start --> ... <!-- y:end --> markers"):
        publish_results("y", "z", "z", "cmd", repo=str(tmp_path))


def test_a_failed_run_keeps_its_output_and_says_where(tmp_path):
    """rl.py refuses (its model is missing): one line naming the arm, the seed and the log, and
    the log holds what rl.py printed."""
    with pytest.raises(UserError, match=r"grpo, seed 3: rl.py failed \(error: .*\); its output is in "
                                        r".*grpo_seed3/rl.log") as refused:
        compare.run_one(str(tmp_path / "world"), str(tmp_path / "out"), "grpo", 3, 1)
    log = str(refused.value).rsplit("its output is in ", 1)[1]
    assert "error:" in open(log).read()
