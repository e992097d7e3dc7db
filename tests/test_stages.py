"""The training stages end to end on a tiny toy world built in the test: train_vae.py,
sft_warmup.py and rl.py (schedules, replayed prefixes, learning, resume, torchrun, bad input).

Run:  python -m pytest tests/test_stages.py -q        (about three minutes on two cores)
"""
import json
import math
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_script, tiny_toy_model  # noqa: E402 (conftest is on the path pytest gives tests/)


@pytest.fixture
def world(stages_world):
    """The tiny trained world of conftest.stages_world (built once per session, shared with
    tests/test_fsdp.py)."""
    return stages_world


def rl_args(world, out, *extra):
    """rl.py's flags on the stages' world; --vae where the run's prefixes come from it (the default
    source, unless the run names another or has no schedule)."""
    vae = () if "--prefix-source" in extra or "none" in extra else ("--vae", world / "vae")
    return ("--model", world / "base", *vae, "--data", world / "math_train.jsonl",
            "--out", out, "--prompts-per-step", "16", "--group-size", "8", "--max-new-tokens", "40",
            "--lr", "1e-4", "--temperature", "0.8", *extra)


def metrics(path):
    return [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]


# -- pieces of the stages ------------------------------------------------------------------------

def test_silhouette_by_hand():
    from train_vae import silhouette_score
    x = torch.tensor([[0.0], [1.0], [10.0], [12.0]])
    # point 0: a = 1, b = (10 + 12) / 2 = 11 -> 10/11; point 1: a = 1, b = 10 -> 9/10
    # point 2: a = 2, b = 9.5 -> 7.5/9.5; point 3: a = 2, b = 11.5 -> 9.5/11.5
    expected = (10 / 11 + 9 / 10 + 7.5 / 9.5 + 9.5 / 11.5) / 4
    assert silhouette_score(x, torch.tensor([0, 0, 1, 1])) == pytest.approx(expected)


def test_schedules_give_prefixed_counts_and_L():
    """The paper's schedules (each a named entry of rl.SCHEDULES; a new entry fails nothing here)."""
    import rl

    def plan(schedule, tau, G, L):
        args = rl.parser.parse_args(["--model", "m", "--data", "d", "--out", "o", "--schedule", schedule,
                                     "--group-size", str(G), "--L", str(L)])
        n_prefixed, L = rl.prefix_plan(args, tau, torch.full((2, G), float("nan")))
        return int(n_prefixed[0]), L
    G = 8
    assert [plan("none", t, G, 8) for t in (0, 0.6)] == [(0, 0), (0, 0)]
    assert [plan("two-stage", t, G, 8) for t in (0, 0.49, 0.5, 0.9)] == [(8, 8), (8, 8), (0, 0), (0, 0)]
    assert [plan("linear", t, G, 8)[0] for t in (0, 0.25, 0.5, 0.75, 0.99)] == [8, 6, 4, 2, 0]
    assert [plan("0.25", t, G, 4) for t in (0, 0.9)] == [(2, 4), (2, 4)]
    assert plan("linear", 0.1, G, 0) == (0, 0)


def test_step_problems_are_a_function_of_the_step():
    from rl import step_problems
    first = [i for s in range(5) for i in step_problems(10, s, 4, seed=3)]
    assert first == [i for s in range(5) for i in step_problems(10, s, 4, seed=3)]
    assert sorted(first[:10]) == list(range(10))                  # an epoch visits each once


def test_stored_prefix_replays_to_identical_logprobs(world):
    from model import Transformer, completion_batch, generate, make_prefix_source, token_logprobs
    model = Transformer.from_pretrained(str(world / "base"))
    E = model.embed_tokens.weight.detach()
    source = make_prefix_source("vae", E, vae=str(world / "vae"))
    prefixes = list(source.sample(3, 4, generator=torch.Generator().manual_seed(0)))
    prefixes[1] = None
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    out = generate(model, prompts, prefixes, max_new_tokens=12, temperature=0)
    completions = out.token_lists()
    with torch.no_grad():
        batch = completion_batch(model, prompts, completions, prefixes)             # right padded
        lp_batch, _ = token_logprobs(model, *batch)
        loss_mask = batch[2]
        hidden_logits = model(inputs_embeds=batch[0])
        for i in range(3):
            alone = completion_batch(model, [prompts[i]], [completions[i]], [prefixes[i]])
            lp_alone, _ = token_logprobs(model, *alone)
            torch.testing.assert_close(lp_batch[i][loss_mask[i]], lp_alone[0][alone[2][0]], atol=1e-5, rtol=0)
        # greedy tokens are the argmax under the replayed context: sampler and trainer agree
        for i, c in enumerate(completions):
            assert hidden_logits[i][loss_mask[i]].argmax(-1).tolist() == c
        # and the prefix matters: another latent gives other log-probs for the same tokens
        other = list(source.sample(3, 4, generator=torch.Generator().manual_seed(1)))
        other_batch = completion_batch(model, prompts, completions, other)
        lp_other, _ = token_logprobs(model, *other_batch)
    assert not torch.allclose(lp_other[0][other_batch[2][0]], lp_batch[0][loss_mask[0]])


def test_sft_loss_covers_only_the_answer():
    from model import ModelConfig, Transformer, completion_batch
    model = Transformer(ModelConfig(vocab_size=20, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, head_dim=8))
    prefix = torch.randn(2, 16)
    embeds, targets, loss_mask = completion_batch(model, [[3, 4, 5], [6]], [[7, 8], [9, 10, 11]],
                                                  [prefix, None])
    # right padded: row 0 is [p p 3 4 5 7 8] (T = 7); row 1 is [6 9 10 11 pad pad pad]
    assert torch.equal(embeds[0, :2], prefix) and torch.equal(embeds[1, 0], model.embed_tokens.weight[6])
    assert loss_mask.tolist() == [[False] * 4 + [True] * 2 + [False],
                                  [True] * 3 + [False] * 4]
    assert targets[loss_mask].tolist() == [7, 8, 9, 10, 11]


# -- the stage scripts -----------------------------------------------------------------------------

def test_train_vae_outputs(world):
    vae_json = json.load(open(world / "vae" / "vae.json"))
    assert set(vae_json["domains"]) == {"math", "code", "qa"}
    assert -1 <= vae_json["silhouette"] <= 1
    assert os.path.getsize(world / "vae" / "latents.png") > 1000
    assert abs(vae_json["norms"]["prefix"] - vae_json["norms"]["token_embedding"]) < 1e-3


def test_sft_uses_prior_samples_and_changes_the_model(world, tmp_path, monkeypatch, capsys):
    import model as model_module
    import sft_warmup

    def no_posterior(*args, **kwargs):
        raise AssertionError("the warm-up must decode prior samples, never a pair's posterior")
    monkeypatch.setattr(model_module.PaletteVAE, "encode", no_posterior)
    drawn = []
    original = model_module.VAEPrefix._draw
    monkeypatch.setattr(model_module.VAEPrefix, "_draw",
                        lambda self, n, L, g: drawn.append((n, L, self.region)) or original(self, n, L, g))
    monkeypatch.setattr(sys, "argv", ["sft_warmup.py", "--model", str(world / "base"), "--vae",
                                      str(world / "vae"), "--data", str(world / "math_train.jsonl"),
                                      "--out", str(tmp_path), "--steps", "3", "--batch-size", "8",
                                      "--micro-batch-size", "4", "--lr", "1e-3"])
    sft_warmup.main()
    # every draw is from the prior with L = 1: each step's whole batch (8 rows, whatever the
    # ranks and micro-batches), then the prefix-health check's after training
    assert drawn and all(L == 1 and region is None for n, L, region in drawn)
    assert [n for n, L, region in drawn][:3] == [8, 8, 8]
    before = load_file(str(world / "base" / "model.safetensors"))
    after = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert len(metrics(tmp_path)) == 3
    # the warm-up is recorded in the checkpoint, and rl.py's start-up note reads it
    warmup = json.load(open(tmp_path / "model" / "config.json"))["nanopalette_warmup"]
    assert warmup == {"prefix_source": "vae", "L": 1, "steps": 3}
    assert model_module.Transformer.from_pretrained(str(tmp_path / "model")).config.warmup == warmup
    import rl
    capsys.readouterr()
    rl.main(["--model", str(tmp_path / "model"), "--vae", str(world / "vae"), "--data", str(world / "math_train.jsonl"),
             "--out", str(tmp_path / "rl"), "--steps", "1", "--L", "2", "--prompts-per-step", "4", "--group-size", "4",
             "--max-new-tokens", "8", "--save-every", "0"])
    assert "note: the policy's warm-up taught vae prefixes of L = 1; this run gives it vae prefixes of L = 2" \
        in capsys.readouterr().out.splitlines()


def test_the_warmup_check_counts_a_cut_off_answer_zero(world, monkeypatch):
    """diagnostics.prefix_sensitivity (the warm-up's before/after pass@1) scores as rl.py and
    evaluate.py do: a right last line in an answer cut off at max_new_tokens is worth 0."""
    import diagnostics
    import model as model_module
    tokenizer = model_module.load_tokenizer(str(world / "base"), 10**6)
    from data import load_rows
    rows = [{**r, "prompt_ids": [1]} for r in load_rows(str(world / "math_test.jsonl"), limit=4)]
    right = [tokenizer(r["solution"], add_special_tokens=False)["input_ids"] for r in rows]
    policy = model_module.Transformer.from_pretrained(str(world / "base"))
    for stopped, expected in (([True] * 4, 1.0), ([True, False, True, False], 0.5), ([False] * 4, 0.0)):
        monkeypatch.setattr(diagnostics, "greedy_answers", lambda *a, stopped=stopped: (right, stopped))
        result = diagnostics.prefix_sensitivity(policy, tokenizer, rows, model_module.make_prefix_source("none", policy.embed_tokens.weight),
                                                0, 8)
        assert result == {"pass1_no_prefix": expected}


def test_rl_raises_the_reward(world, tmp_path):
    """GRPO learns: the reward of the last 8 steps beats the first 8. (RLOO and Dr. GRPO differ
    only in group_advantages, checked by hand in tests/test_rl_losses.py.)"""
    run_script("rl.py", *rl_args(world, tmp_path, "--steps", "40", "--schedule", "none",
                                 "--prefix-source", "none", "--save-every", "0"))
    rewards = [m["reward_mean"] for m in metrics(tmp_path)]
    start, end = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    assert end > start + 0.08, f"reward {start:.3f} -> {end:.3f}"


def test_rl_several_updates_per_batch_with_kl(world, tmp_path, monkeypatch, capsys):
    """The other objective paths: old log-probs from a first forward pass (2 epochs x 2
    minibatches), k3 KL to a reference model, seq-mean aggregation and activation checkpointing
    (as the memory plan turns it on on a GPU), with a held-out evaluation at every step (it
    generates with the model fresh from training mode). After the first update the ratio leaves 1,
    so the KL is positive."""
    import rl
    monkeypatch.setattr(rl, "plan_memory", lambda *args: (4, True))
    checkpointed, update_policy = [], rl.update_policy
    monkeypatch.setattr(rl, "update_policy", lambda model, *args: checkpointed.append(model.gradient_checkpointing)
                        or update_policy(model, *args))
    rl.main(list(map(str, rl_args(world, tmp_path, "--steps", "2", "--prompts-per-step", "4",
                                  "--group-size", "4", "--schedule", "0.5", "--L", "2", "--epochs", "2",
                                  "--minibatches", "2", "--kl-coef", "0.05", "--aggregation", "seq-mean",
                                  "--eval-data", world / "math_test.jsonl", "--eval-every", "1"))))
    assert checkpointed == [True, True]
    # the base model records no warm-up (sft_warmup.py): rl.py says so once, and runs
    assert "note: the policy's warm-up taught no prefix; this run gives it vae prefixes of L = 2" in \
        capsys.readouterr().out.splitlines()
    records = metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2] and all("eval_pass1" in r for r in records)
    records = records[:2]
    assert all(r["rho"] == 0.5 for r in records)
    assert any(r["kl"] > 0 for r in records)
    assert all(math.isfinite(r["loss"]) for r in records)


# -- bad input: one clear message, nothing written is lost --------------------------------------

def _fails_with(result, message):
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_bad_inputs_get_one_clear_message(world, tmp_path):
    """One refusal from the command line (exit code 2, one line, no stack trace); the others in
    this process, as tests/test_bad_input.py runs its probe (a subprocess costs seconds each)."""
    import rl
    import sft_warmup
    from test_bad_input import refusal

    def rl_refusal(out, *flags):           # rl.py for one step, with flags overriding rl_args'
        return refusal(rl, [str(a) for a in rl_args(world, tmp_path / out, "--steps", "1", *flags)])

    _fails_with(run_script("rl.py", *rl_args(world, tmp_path, "--L", "-1"), check=False),
                "--L must be >= 0")
    assert "missing.jsonl" in rl_refusal("m", "--data", tmp_path / "missing.jsonl")
    assert "does not exist" in refusal(sft_warmup, ["--model", str(tmp_path / "nowhere"), "--data",
                                                    "x.jsonl", "--prefix-source", "none",
                                                    "--out", str(tmp_path / "s")])
    # a VAE trained for another model
    from model import ModelConfig, Transformer
    other = Transformer(ModelConfig(vocab_size=52, hidden_size=64, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, tie_word_embeddings=True))
    other.init_weights()
    other.save_pretrained(str(tmp_path / "other"), tokenizer_dir=str(world / "tokenizer"))
    assert "trained for another model" in rl_refusal("o", "--model", tmp_path / "other")
    # a prompt longer than the context
    long_row = {"problem": "1+1=?" * 60, "answer": "2", "domain": "math", "source": "toy"}
    (tmp_path / "long.jsonl").write_text(json.dumps(long_row) + "\n")
    assert "exceeds the model's context" in rl_refusal("l", "--data", tmp_path / "long.jsonl")


def test_non_finite_loss_stops_and_keeps_the_checkpoint(world, tmp_path, monkeypatch):
    """The loss turns NaN in step 3 (as a bf16 overflow would): the run stops with a message and
    the checkpoint written after steps 0-2 stays intact."""
    import rl
    from common import UserError
    calls = {"step": 0}
    real_loss = rl.policy_loss

    def loss_that_breaks(*args, **kwargs):
        loss, stats = real_loss(*args, **kwargs)
        return (loss * float("nan") if calls["step"] >= 4 else loss), stats

    real_plan = rl.prefix_plan
    monkeypatch.setattr(rl, "prefix_plan", lambda *a: calls.update(step=calls["step"] + 1) or real_plan(*a))
    monkeypatch.setattr(rl, "policy_loss", loss_that_breaks)
    monkeypatch.setattr(sys, "argv", ["rl.py", *[str(a) for a in rl_args(
        world, tmp_path, "--steps", "8", "--save-every", "3", "--prompts-per-step", "4",
        "--group-size", "4", "--schedule", "none", "--prefix-source", "none")]])
    with pytest.raises(UserError, match=r"non-finite loss .* at step 3; stopped before the optimiser "
                                        r"step; the last checkpoint, .*checkpoint-000003, is kept"):
        rl.main()
    state = json.load(open(tmp_path / "checkpoint-000003" / "trainer_state.json"))
    assert state["step"] == 3
    tensors = load_file(str(tmp_path / "checkpoint-000003" / "model" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in tensors.values())


# -- sft_warmup.py with lorem prefixes (a tiny random model of its own, context 128) ---------------

def tiny_lorem_world(root):
    """A random 1-layer model over the toy tokenizer (context 128) and a few 2-digit toy problems:
    enough for sft_warmup.py to run two steps, far quicker than the pretrained `world`."""
    from toy.task import generate as toy_rows, write_jsonl
    model, tokenizer = tiny_toy_model(root / "tokenizer")
    model.save_pretrained(str(root / "model"), tokenizer_dir=str(root / "tokenizer"))
    write_jsonl(toy_rows("math", 16, seed=1, digits=2), str(root / "train.jsonl"))
    write_jsonl(toy_rows("math", 4, seed=2, digits=2), str(root / "test.jsonl"))
    return tokenizer, ["--model", str(root / "model"), "--data", str(root / "train.jsonl"),
                       "--eval-data", str(root / "test.jsonl"), "--eval-problems", "4",
                       "--prefix-source", "lorem", "--steps", "2", "--batch-size", "4",
                       "--micro-batch-size", "2", "--lr", "1e-3"]


def test_sft_warms_up_with_lorem_prefixes(tmp_path, monkeypatch):
    import prefixes
    import sft_warmup
    tokenizer, argv = tiny_lorem_world(tmp_path)
    drawn = []           # (prefixes asked for, L, embedding rows of each) of every lorem draw
    original = prefixes.LoremPrefix._draw

    def recorded(self, n, L, generator):
        prefixes = original(self, n, L, generator)                  # (n, L + b, d)
        drawn.append((n, L, prefixes.shape[1]))
        return prefixes
    monkeypatch.setattr(prefixes.LoremPrefix, "_draw", recorded)
    sft_warmup.main(argv + ["--L", "4", "--eval-max-new-tokens", "8", "--out", str(tmp_path / "sft")])
    boundary = len(tokenizer(prefixes.LOREM_BOUNDARY, add_special_tokens=False)["input_ids"])
    assert (4, 4, 4 + boundary) in drawn                          # each training step's whole batch
    assert all(rows == L + boundary for _, L, rows in drawn)
    assert len(metrics(tmp_path / "sft")) == 2
    before = load_file(str(tmp_path / "model" / "model.safetensors"))
    after = load_file(str(tmp_path / "sft" / "model" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("flags, message", [
    # 80 + b rows (b, the boundary instruction, is 51 toy tokens) leave no room in 128 positions;
    # 80 + 2 would
    (["--L", "80"], lambda b: f"no pairs with a solution within 128 tokens (the model's context) with "
     f"L = 80 ({80 + b} prefix rows)"),
    # a held-out prompt (8 tokens) + 8 + b rows + 64 new tokens > 128; 8 + 8 + 64 would fit
    (["--L", "8", "--eval-max-new-tokens", "64"], lambda b: f"prompt + {8 + b}-row prefix (--L 8) + --eval-max-new-tokens = "
     f"{8 + 8 + b + 64} tokens exceeds the model's context of 128"),
])
def test_sft_refuses_a_lorem_prefix_too_long_for_the_context(tmp_path, flags, message):
    import re
    import sft_warmup
    from common import UserError
    from prefixes import LOREM_BOUNDARY
    tokenizer, argv = tiny_lorem_world(tmp_path)
    b = len(tokenizer(LOREM_BOUNDARY, add_special_tokens=False)["input_ids"])
    with pytest.raises(UserError, match=re.escape(message(b))) as refusal:
        sft_warmup.main(argv + flags + ["--out", str(tmp_path / "sft")])
    assert "\n" not in str(refusal.value)
    assert not os.path.exists(tmp_path / "sft" / "model")


def test_sft_notes_a_flag_without_effect(capsys):
    """--eval-problems without --eval-data and --L with --prefix-source none: one note each, no refusal."""
    import sft_warmup
    args = sft_warmup.parser.parse_args(["--model", "m", "--data", "d.jsonl", "--out", "o", "--prefix-source", "none",
                                         "--L", "3", "--eval-problems", "5"])
    capsys.readouterr()
    sft_warmup.check_args(args)
    assert capsys.readouterr().out.splitlines() == [
        "note: --eval-problems 5 has no effect here (there is no --eval-data)",
        "note: --L 3 has no effect here (--prefix-source none draws no prefix)"]
