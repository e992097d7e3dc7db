"""infer.py and evaluate.py on a tiny world built here: a random Qwen3 model over the toy character
tokenizer, a few toy math problems and a tiny VAE. Covers the pass@k estimator by hand, greedy
decoding per latent, the three outputs of evaluate.py, resuming an interrupted evaluation, the
merged results table, and the messages for bad input.

Run:  python -m pytest tests/test_infer_evaluate.py -q      (CPU, well under a minute)
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import evaluate
import infer
from common import UserError, read_jsonl
from model import PaletteVAE, embedding_fingerprint, save_vae
from toy.task import extract_answer, generate as toy_problems, write_jsonl
from toy.tokenizer import EOS_ID, PAD_ID

from conftest import tiny_toy_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """{"model", "vae", "data"}: paths of a tiny checkpoint, a VAE for it and 5 toy problems."""
    root = tmp_path_factory.mktemp("infer_eval")
    # large weights, so that a prefix visibly changes the output
    model, tokenizer = tiny_toy_model(root / "tokenizer", std=0.3)
    model.save_pretrained(str(root / "model"), tokenizer_dir=str(root / "tokenizer"))
    E = model.embed_tokens.weight.detach()
    vae = PaletteVAE(32, latent_dim=4, hidden_dim=16, depth=1)
    vae.set_statistics(torch.randn(64, 32) * 0.1, E)
    save_vae(vae, str(root / "vae"), {"beta": 0.1, "model": "tiny", "fingerprint": embedding_fingerprint(E),
                                      "domains": {"math": {"mean": [0.5] * 4,
                                                           "cov": torch.eye(4).mul(0.1).tolist()}}})
    write_jsonl(toy_problems("math", 5, seed=0), str(root / "toy_math.jsonl"))
    return {"model": str(root / "model"), "vae": str(root / "vae"), "data": str(root / "toy_math.jsonl")}


# -----------------------------------------------------------------------------
# pass@k


def test_pass_at_k_by_hand():
    assert evaluate.pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))   # 0.7
    assert evaluate.pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert evaluate.pass_at_k(10, 3, 1) == pytest.approx(0.3)           # pass@1 = c / n
    assert evaluate.pass_at_k(4, 1, 4) == 1.0                           # k = n: any correct counts
    assert evaluate.pass_at_k(4, 0, 4) == 0.0
    assert evaluate.pass_at_k(8, 0, 3) == 0.0                           # none correct
    assert evaluate.pass_at_k(8, 8, 3) == 1.0                           # all correct
    assert evaluate.pass_at_k(8, 6, 3) == 1.0                           # n - c < k: every draw hits
    for n, c, k in [(32, 5, 8), (200, 17, 50), (7, 3, 1)]:
        assert evaluate.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


# -----------------------------------------------------------------------------
# infer.py


def run_infer(world, tmp_path, *flags):
    out = tmp_path / f"infer{len(list(tmp_path.iterdir()))}.jsonl"
    infer.main(["--model", world["model"], "--max-new-tokens", "12", "--out", str(out), *flags])
    return read_jsonl(out)


def test_infer_prints_one_block_per_latent(world, tmp_path, capsys):
    rows = run_infer(world, tmp_path, "--prefix-source", "noise", "--num-latents", "3",
                     "--prompt", "47+38=?", "--prompt", "12+5=?")
    printed = capsys.readouterr().out
    for p in range(2):
        for i in range(3):
            assert printed.count(f"=== prompt {p} | latent {i} (noise, L=1) ===") == 1
    assert printed.count("=== prompt") == 6
    assert [(r["latent"], r["prompt_index"]) for r in rows] == [(i, p) for i in range(3) for p in range(2)]
    assert all(r["prefix_source"] == "noise" and r["L"] == 1 for r in rows)


def test_greedy_per_latent_is_deterministic_and_latents_differ(world, tmp_path):
    flags = ("--prefix-source", "vae", "--vae", world["vae"], "--region", "math", "--num-latents", "6",
             "--prompts-file", world["data"], "--seed", "3")
    first, again = run_infer(world, tmp_path, *flags), run_infer(world, tmp_path, *flags)
    assert [r["completion"] for r in first] == [r["completion"] for r in again]
    by_prompt = {}
    for r in first:
        by_prompt.setdefault(r["prompt_index"], set()).add(r["completion"])
    assert max(len(v) for v in by_prompt.values()) > 1, "every latent gave the same completion"
    # without a prefix, greedy decoding gives N identical completions
    plain = run_infer(world, tmp_path, "--prefix-source", "none", "--num-latents", "3", "--prompt", "47+38=?")
    assert len({r["completion"] for r in plain}) == 1 and all(r["L"] == 0 for r in plain)


# -----------------------------------------------------------------------------
# evaluate.py


def run_eval(world, out, *flags):
    evaluate.main(["--model", world["model"], "--benchmarks", world["data"], "--max-new-tokens", "8",
                   "--out", str(out), *flags])
    return os.path.join(out, "toy_math.jsonl")


def test_evaluate_writes_results_and_resumes(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval"
    flags = ("--mode", "greedy-latent", "--prefix-source", "noise", "--n", "4", "--k", "1,2,4",
             "--batch-size", "8")
    per_problem = run_eval(world, out, *flags)
    records = read_jsonl(per_problem)
    assert len(records) == 5 and not any(n.startswith("toy_math.rank") for n in os.listdir(out))
    for r in records:
        assert r["config"] == "greedy-latent noise L=1"
        assert len(r["completions"]) == len(r["verdicts"]) == 4
        assert set(r["verdicts"]) <= {0.0, 1.0} and r["correct"] == sum(r["verdicts"])
    with open(out / "results.json") as f:
        results = json.load(f)
    row = results["configs"]["greedy-latent noise L=1"]
    assert row["k"] == [1, 2, 4] and row["benchmarks"]["toy_math"]["n_problems"] == 5
    for k in (1, 2, 4):
        expected = sum(evaluate.pass_at_k(4, r["correct"], k) for r in records) / 5
        assert row["benchmarks"]["toy_math"][f"pass@{k}"] == pytest.approx(expected)
    distinct = [len({extract_answer(t) for t, done in zip(r["completions"], r["stopped"]) if done} - {None})
                for r in records]
    assert row["benchmarks"]["toy_math"]["distinct_answers"] == pytest.approx(sum(distinct) / 5)
    table = (out / "results.md").read_text()
    assert "| Config | toy_math | Avg |" in table and "| greedy-latent noise L=1 |" in table
    assert "### pass@4" in table and "### distinct answers per problem" in table

    # interrupt: drop two problems' records and the tables, then rerun; count generated rows
    lines = open(per_problem).readlines()
    with open(per_problem, "w") as f:
        f.writelines(lines[:3])
    os.remove(out / "results.json")
    os.remove(out / "results.md")
    generated = []
    real_generate = evaluate.generate
    monkeypatch.setattr(evaluate, "generate",
                        lambda model, prompts, *a, **kw: generated.append(len(prompts)) or
                        real_generate(model, prompts, *a, **kw))
    capsys.readouterr()
    run_eval(world, out, *flags)
    assert "3 reused, 2 to run" in capsys.readouterr().out
    assert sum(generated) == 2 * 4                                   # only the missing problems
    after = open(per_problem).readlines()
    assert after[:3] == lines[:3]                                     # untouched records, byte for byte
    assert sorted(after) == sorted(lines)                             # greedy latents: same results
    with open(out / "results.json") as f:
        assert json.load(f)["configs"]["greedy-latent noise L=1"] == row

    # a second configuration adds a row to the same table; its settings are kept apart
    run_eval(world, out, "--mode", "sample", "--n", "2", "--batch-size", "8")
    table = (out / "results.md").read_text()
    assert "| greedy-latent noise L=1 |" in table and "| sample T=1 |" in table
    assert len(read_jsonl(per_problem)) == 10
    with pytest.raises(UserError, match="other settings \\(n\\)"):
        run_eval(world, out, "--mode", "sample", "--n", "3", "--batch-size", "8")


def test_verdicts_and_pass_at_k_from_the_real_grader(world, tmp_path, monkeypatch):
    """A stand-in model that writes the true solution in every other row: c = 1 of n = 2."""
    from transformers import AutoTokenizer
    from model import Generation
    tokenizer = AutoTokenizer.from_pretrained(world["model"])
    solutions = {r["problem"]: r["solution"] for r in read_jsonl(world["data"])}

    def fake_generate(model, prompts, prefixes=None, max_new_tokens=8, *a, **kw):
        rows = []
        for j, p in enumerate(prompts):
            text = solutions[tokenizer.decode(p).strip()] if j % 2 == 0 else "answer: -1"
            rows.append(tokenizer(text, add_special_tokens=False)["input_ids"] + [EOS_ID])
        width = max(map(len, rows))
        tokens = torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows])
        return Generation(tokens, torch.tensor([len(r) for r in rows]), torch.ones(len(rows), dtype=torch.bool))

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    out = tmp_path / "eval"
    per_problem = run_eval(world, out, "--mode", "sample", "--n", "2", "--batch-size", "4")
    assert [r["verdicts"] for r in read_jsonl(per_problem)] == [[1.0, 0.0]] * 5
    with open(out / "results.json") as f:
        scores = json.load(f)["configs"]["sample T=1"]["benchmarks"]["toy_math"]
    # two different answers per problem: the true one and -1
    assert scores == {"n_problems": 5, "pass@1": 0.5, "pass@2": 1.0, "distinct_answers": 2.0}
    assert "| sample T=1 | 50.00 | 50.00 |" in (out / "results.md").read_text()


def test_latent_sample_and_vae_region(world, tmp_path):
    out = tmp_path / "eval"
    run_eval(world, out, "--mode", "latent-sample", "--prefix-source", "vae", "--vae", world["vae"],
             "--region", "math", "--L", "2", "--n", "3", "--limit", "3", "--batch-size", "4")
    with open(out / "results.json") as f:
        row = json.load(f)["configs"]["latent-sample vae:math L=2 T=1"]
    assert row["benchmarks"]["toy_math"]["n_problems"] == 3 and row["k"] == [1, 3]


# -----------------------------------------------------------------------------
# bad input: one clear message


@pytest.mark.parametrize("flags, message", [
    (["--benchmarks", "gsm9k"], "unknown benchmark 'gsm9k'; known: gsm8k, math500"),
    (["--n", "4", "--k", "1,8"], "--k 1,8: expected comma-separated integers from 1 to --n 4"),
    (["--mode", "latent-sample", "--prefix-source", "vae"], "--prefix-source vae needs --vae DIR"),
    (["--prefix-source", "noise"], "--mode sample decodes without a prefix; --mode latent-sample samples under one"),
    (["--batch-size", str(10**9), "--max-new-tokens", "8"], "--batch-size 1000000000 rows of up to"),
    (["--L", "-1"], "--L must be >= 0, got -1"),
    (["--mode", "greedy-latent"], "--mode greedy-latent gives each candidate its own latent"),
])
def test_evaluate_bad_input(world, tmp_path, capsys, flags, message):
    argv = ["--model", world["model"], "--benchmarks", world["data"], "--out", str(tmp_path), *flags]
    assert message in refused(evaluate, argv, capsys)


@pytest.mark.parametrize("module, flags, note", [
    ("evaluate", ["--mode", "greedy-latent", "--prefix-source", "noise", "--L", "1", "--temperature", "0.5"],
     "note: --temperature 0.5 has no effect here (greedy-latent decodes greedily)"),
    ("evaluate", ["--L", "3"], "note: --L 3 has no effect here (--prefix-source none draws no prefix)"),
    ("infer", ["--prefix-source", "none", "--top-p", "0.5"], "note: --top-p 0.5 has no effect here (--temperature 0"),
])
def test_a_flag_without_effect_is_a_note(world, tmp_path, capsys, module, flags, note):
    """A flag that has no effect here is one line on stdout, never a refusal: the checks go on."""
    module = {"evaluate": evaluate, "infer": infer}[module]
    extra = ["--benchmarks", world["data"], "--out", str(tmp_path)] if module is evaluate else []
    capsys.readouterr()
    module.check_args(module.parser.parse_args(["--model", world["model"], *extra, *flags]))
    notes = capsys.readouterr().out.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith(note), notes


def refused(module, argv, capsys):
    """The one line a stage prints when it refuses argv (exit code 2), as run_main gives it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        module.run_main(lambda: module.main(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("flags, message", [
    (["--prompt", "1+1=?"], "--prefix-source vae needs --vae DIR"),
    (["--prompt", "1+1=?", "--prefix-source", "noise", "--L", "-2"], "--L must be >= 0, got -2"),
    (["--prefix-source", "none"], "no prompts"),
    (["--prompt", "1+1=?", "--prefix-source", "vae", "--vae", "/nonexistent"], "no vae.json"),
    (["--prompt", "1+1=?", "--prefix-source", "noise", "--max-new-tokens", "500"], "exceeds the model's context"),
])
def test_infer_bad_input(world, capsys, flags, message):
    assert message in refused(infer, ["--model", world["model"], *flags], capsys)


def test_bad_input_exits_with_one_line(world, tmp_path):
    """Through the real entry point: exit code 2, 'error: ...' on stderr, no traceback."""
    for script, flags, message in [
        ("evaluate.py", ["--benchmarks", "gsm9k", "--out", str(tmp_path)], "unknown benchmark 'gsm9k'"),
        ("infer.py", ["--prompt", "1+1=?", "--L", "-1"], "--L must be >= 0"),
    ]:
        proc = subprocess.run([sys.executable, script, "--model", world["model"], *flags], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "error: " in proc.stderr and message in proc.stderr
        assert "Traceback" not in proc.stderr


# -----------------------------------------------------------------------------
# the lorem source: text prefixes of L tokens and the boundary instruction, L + b embedding rows


def lorem_rows(world, L):
    """Embedding rows of one lorem prefix of L tokens for the tiny world's tokenizer: L + b."""
    from transformers import AutoTokenizer
    from model import make_prefix_source
    tokenizer = AutoTokenizer.from_pretrained(world["model"])
    return make_prefix_source("lorem", torch.zeros(len(tokenizer), 32), tokenizer=tokenizer).rows(L)


def test_infer_and_evaluate_run_with_lorem_prefixes(world, tmp_path, monkeypatch):
    shapes = []          # rows of every prefix handed to generate()
    for module in (infer, evaluate):
        real = module.generate
        monkeypatch.setattr(module, "generate", lambda model, prompts, prefixes=None, *a, real=real, **kw:
                            shapes.extend(p.shape[0] for p in prefixes or [] if p is not None) or
                            real(model, prompts, prefixes, *a, **kw))
    rows = run_infer(world, tmp_path, "--prefix-source", "lorem", "--L", "4", "--num-latents", "3",
                     "--prompts-file", world["data"])
    assert len(rows) == 15 and all(r["prefix_source"] == "lorem" and r["L"] == 4 for r in rows)
    assert shapes and set(shapes) == {lorem_rows(world, 4)} and lorem_rows(world, 4) > 4
    # the text reaches the policy: some greedy completion differs from the unprefixed one
    plain = run_infer(world, tmp_path, "--prefix-source", "none", "--num-latents", "1",
                      "--prompts-file", world["data"])
    assert any(r["completion"] != plain[r["prompt_index"]]["completion"] for r in rows)

    shapes.clear()
    out = tmp_path / "eval"
    records = read_jsonl(run_eval(world, out, "--mode", "greedy-latent", "--prefix-source", "lorem",
                                  "--L", "4", "--n", "3", "--limit", "3", "--batch-size", "8"))
    assert len(records) == 3 and all(r["config"] == "greedy-latent lorem L=4" and
                                     len(r["completions"]) == 3 for r in records)
    assert len(shapes) == 9 and set(shapes) == {lorem_rows(world, 4)}
    with open(out / "results.json") as f:
        assert json.load(f)["configs"]["greedy-latent lorem L=4"]["benchmarks"]["toy_math"]["n_problems"] == 3


@pytest.mark.parametrize("script", ["infer", "evaluate"])
def test_a_lorem_prefix_too_long_for_the_context_is_refused_in_one_line(world, tmp_path, script):
    """Prompt + 70 prefix rows + new tokens fit the context of 128, so a noise prefix of L = 70
    runs; lorem's L = 70 is 70 + b rows (b, its boundary, about 50 tokens) and must be refused."""
    def run(*flags):
        if script == "infer":
            return run_infer(world, tmp_path, "--prompt", "47+38=?", "--num-latents", "1", *flags)
        return run_eval(world, tmp_path / f"eval{len(list(tmp_path.iterdir()))}", "--mode", "greedy-latent",
                        "--n", "1", "--limit", "1", *flags)
    run("--prefix-source", "noise", "--L", "70")
    assert lorem_rows(world, 70) + 8 + 12 > 128
    with pytest.raises(UserError, match="exceeds the model's context of 128") as refusal:
        run("--prefix-source", "lorem", "--L", "70")
    message = str(refusal.value)
    assert f"{lorem_rows(world, 70)}-row prefix (--L 70)" in message          # 70 tokens + the boundary
    assert "\n" not in message


def test_evaluate_grades_each_row_by_its_own_grading_kind(world, tmp_path, monkeypatch):
    """Rows of a local file that say `grading_kind: gsm8k` (and have no `source`) are graded as
    GSM8K, whatever the file is called: "the answer is 4." states 4."""
    from transformers import AutoTokenizer
    from model import Generation
    rows = [{"problem": "2+2=?", "answer": "4", "domain": "math", "grading_kind": "gsm8k"}]
    write_jsonl(rows, str(tmp_path / "rows.jsonl"))
    tokenizer = AutoTokenizer.from_pretrained(world["model"])
    ids = tokenizer("the answer is 4.", add_special_tokens=False)["input_ids"] + [EOS_ID]

    def answer(model, prompts, *args, **kwargs):
        return Generation(tokens=torch.tensor([ids] * len(prompts)),
                          lengths=torch.full((len(prompts),), len(ids)),
                          stopped=torch.ones(len(prompts), dtype=torch.bool))
    monkeypatch.setattr(evaluate, "generate", answer)
    evaluate.main(["--model", world["model"], "--benchmarks", str(tmp_path / "rows.jsonl"),
                   "--mode", "sample", "-n", "1", "--max-new-tokens", "20", "--out", str(tmp_path / "eval")])
    results = json.load(open(tmp_path / "eval" / "results.json"))
    assert results["configs"]["sample T=1"]["benchmarks"]["rows"]["pass@1"] == 1.0
