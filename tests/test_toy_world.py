"""Tests for toy/build_world.py on a miniature world (tiny model, a few dozen steps).

Run: python -m pytest tests/test_toy_world.py -q      (CPU, well under a minute)
"""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import read_jsonl
from model import Transformer
from toy.build_world import DATA_FILES, build, parse_args
from toy.task import DOMAINS, verify_solution

SCHEMA = {"id", "problem", "solution", "answer", "domain", "source", "strategy"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A world built through the real entry point with miniature flags: (out dir, report)."""
    out = str(tmp_path_factory.mktemp("toy_world"))
    args = parse_args(["--out", out, "--size", "tiny", "--steps", "60", "--warmup", "5",
                       "--batch-size", "16", "--lr", "1e-2", "--n-pretrain", "300",
                       "--n-math-train", "50", "--n-math-test", "40", "--n-vae", "20",
                       "--n-eval", "8", "--k", "2", "--max-new-tokens", "24"])
    return out, args, build(args)


def test_loss_falls(world):
    out, _, _ = world
    losses = [r["loss"] for r in read_jsonl(os.path.join(out, "base_metrics.jsonl"))]
    assert len(losses) == 60
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)


def test_report(world):
    out, _, report = world
    with open(os.path.join(out, "base", "world_report.json")) as f:
        assert json.load(f)["n_problems"] == report["n_problems"] == 8
    for key in ("greedy_pass@1", "pass@2", "sampled_pass@1"):
        assert 0.0 <= report[key] <= 1.0
    assert abs(sum(report["strategy_shares"].values()) - 1.0) < 1e-6


def test_checkpoint_loads_in_transformers(world):
    out, _, _ = world
    base = os.path.join(out, "base")
    ours = Transformer.from_pretrained(base).eval()
    theirs = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = tokenizer(["47+38=?\n7+8=15 c1", "sum([4,7,2])\ns=4"], padding=True,
                    return_tensors="pt")["input_ids"][:, :12]                    # (2, 12)
    assert tokenizer.decode(ids[0]) == "47+38=?\n7+8="
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=0)


def test_data_schema_and_split(world):
    out, args, _ = world
    data = {name: read_jsonl(os.path.join(out, "data", name)) for name in DATA_FILES}
    for name, rows in data.items():
        assert rows, name
        for row in rows:
            assert set(row) == SCHEMA, (name, row)
            assert verify_solution(row), (name, row)
    assert {r["domain"] for r in data["train.jsonl"]} == set(DOMAINS)
    assert len(data["train.jsonl"]) == 3 * args.n_pretrain
    for domain in DOMAINS:
        assert {r["domain"] for r in data[f"vae_{domain}.jsonl"]} == {domain}
    assert {r["domain"] for r in data["math_test.jsonl"]} == {"math"}
    assert len(data["math_test.jsonl"]) == args.n_math_test
    test = {r["problem"] for r in data["math_test.jsonl"]}
    assert not test & {r["problem"] for r in data["train.jsonl"]}
    assert not test & {r["problem"] for r in data["math_train.jsonl"]}


def test_world_report_has_its_provenance_and_the_fingerprint_follows_the_weights(world, tmp_path):
    """toy.provenance: the same for a copy and for a re-save (another file, the same tensors), another
    when one weight moves by one float step."""
    import shutil
    from toy import Provenance, provenance
    out, _, report = world
    base = os.path.join(out, "base")
    here = provenance(base)
    assert Provenance(**report["provenance"]) == here                  # built in this process, so same threads
    assert here.cpu_capability == torch.backends.cpu.get_cpu_capability() and len(here.weights_sha256) == 12
    shutil.copytree(base, tmp_path / "copy")
    model = Transformer.from_pretrained(base)
    model.save_pretrained(str(tmp_path / "resaved"), tokenizer_dir=os.path.join(out, "tokenizer"))
    assert provenance(str(tmp_path / "copy")) == provenance(str(tmp_path / "resaved")) == here
    with torch.no_grad():
        w = model.model.layers[0].mlp.down_proj.weight
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))
    model.save_pretrained(str(tmp_path / "moved"), tokenizer_dir=os.path.join(out, "tokenizer"))
    assert provenance(str(tmp_path / "moved")).weights_sha256 != here.weights_sha256
    assert here.mkl_cbwr == os.environ.get("MKL_CBWR", "")
    assert str(here) == (f"base weights sha256 {here.weights_sha256}, CPU capability {here.cpu_capability}, "
                         f"MKL_CBWR {here.mkl_cbwr or 'unset'}, threads {here.threads}")


def test_second_build_is_skipped(world):
    out, args, report = world
    before = os.path.getmtime(os.path.join(out, "base", "model.safetensors"))
    assert build(args) == report
    assert os.path.getmtime(os.path.join(out, "base", "model.safetensors")) == before


def test_report_reuses_a_finished_rl_run_only_with_the_same_flags(tmp_path):
    """toy/report.py reuses a finished RL run of its table; asked with other flags it must refuse
    in one line, not mix the old run into the new table."""
    import rl
    from toy.report import check_same_run
    run_dir = str(tmp_path / "grpo_baseline_seed0")
    os.makedirs(run_dir)
    argv = ["--model", "m", "--data", "d.jsonl", "--steps", 40, "--seed", 0, "--out", run_dir,
            "--schedule", "none", "--prefix-source", "none"]
    saved = vars(rl.parser.parse_args([str(a) for a in argv]))
    saved.pop("resample")                     # a flag the run predates: it ran as the default did
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(saved, f)
    check_same_run(run_dir, argv)             # the same flags: reused
    with pytest.raises(SystemExit) as refused:
        check_same_run(run_dir, [*argv[:5], 20, *argv[6:]])
    assert "--steps" in str(refused.value) and "\n" not in str(refused.value)


def test_report_verdict_names_the_best_palette_arm_against_the_baseline():
    from toy.report import verdict
    finals = {("grpo", "baseline"): [0.8, 0.9], ("grpo", "linear L=1"): [0.7, 0.7], ("grpo", "two-stage L=1"): [0.75, 0.75],
              ("rloo", "baseline"): [0.5], ("rloo", "linear L=1"): [0.6]}
    assert verdict(finals) == ("In words: GRPO: the best palette arm (two-stage L=1) ends 10.0 points below the plain "
                               "baseline; RLOO: the best palette arm (linear L=1) ends 10.0 points above the plain "
                               "baseline (held-out greedy pass@1 after RL, means over seeds).")


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["--lr", "nan"], "argument --lr: must be a finite number, got nan"),
    (["--steps", "40"], "--warmup 40 must be below --steps 40"),            # the default warm-up
    (["--n-eval", "600"], "--n-eval 600 is more than the --n-math-test 500 held-out problems"),
])
def test_bad_flags_are_one_line_before_anything_is_built(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as refused:
        parse_args(["--out", str(tmp_path / "w"), *argv])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and err.strip().splitlines()[-1].endswith(message)
    assert "Traceback" not in err and not (tmp_path / "w").exists()


def test_the_headline_over_builds_states_only_what_every_build_shows(tmp_path, capsys, monkeypatch):
    """toy.report --across: one column per build, each (b) cell mean ± std over seeds, and a sign said
    to hold only when every build has it; a build without its report is one line naming the command."""
    import toy.report
    from toy.report import across_builds

    def build(name, base, gaps):
        world = tmp_path / name
        (world / "report").mkdir(parents=True)
        rl = {e: {"baseline": [0.80, 0.84], **{arm: [0.80 + gap, 0.84 + gap] for arm, gap in gaps.items()}}
              for e in ("grpo", "rloo")}
        inference = {"greedy (no prefix)": {"pass@1": 0.4}, "token sampling T=1": {"pass@1": 0.2, "pass@4": 0.5},
                     "greedy per latent, vae L=1": {"pass@1": 0.3, "pass@4": 0.45}}
        report = {"world": str(world), "provenance": {"weights_sha256": name * 3}, "base_greedy_pass@1": base,
                  "warmup_pass1_no_prefix": [0.3, 0.4], "silhouette": 0.5, "inference": inference,
                  "rl_steps": 40, "seeds": 2, "rl": rl}
        (world / "report" / "report.json").write_text(json.dumps(report))
        (world / "report" / "report.md").write_text(f"report of {name} ![latent space](toy_latents.png)")
        return str(world)

    first = build("abc", 0.36, {"linear L=1": -0.10, "linear L=8": -0.20})
    second = build("def", 0.43, {"linear L=1": -0.03, "linear L=8": -0.05})
    across_builds([first, second], publish=False)
    out = capsys.readouterr().out
    assert "| base weights sha256 | abcabcabc | defdefdef |" in out
    assert "| base greedy pass@1 | 36.0 | 43.0 |" in out
    assert "| grpo linear L=1 | 72.0 ± 2.8 | 79.0 ± 2.8 |" in out
    assert "-10.0 points (linear L=1) in build 0, -3.0 points (linear L=1) in build 1: every palette arm ends below" in out
    assert "(a) pass@4 of greedy decoding under a vae latent per candidate minus token sampling at T = 1: -5.0 points " \
           "in build 0, -5.0 points in build 1; lower in every build" in out
    assert "report of abc ![latent space](toy_latents.png)" in out and "report of def ![latent space](toy_latents1.png)" in out
    published = []                                        # --publish: the tables to docs/, three lines to the README
    monkeypatch.setattr(toy.report, "publish_results", lambda name, full, headline, *a, **k: published.append(headline))
    across_builds([first, second], publish=True)
    intro, a, b = published[0].splitlines()
    assert intro.startswith("Over 2 builds of the toy world") and intro.endswith("is stated as holding:")
    assert a.startswith("- (a) pass@4 of greedy") and b.startswith("- (b) GRPO: the best palette arm minus the plain "
                                                                    "baseline is -10.0 points") and "; RLOO: " in b

    across_builds([first, build("ghi", 0.43, {"linear L=1": +0.02, "linear L=8": -0.05})], publish=False)
    assert "the sign differs between builds, so no verdict holds across them" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="report.json is missing; run runs/toy.sh for that build first"):
        across_builds([first, str(tmp_path / "none")], publish=False)
