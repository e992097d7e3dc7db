"""Zero-advantage resampling (resample.py) and the lorem prefix source: the regrouping rule (size G,
at least one failure, successes only from the resample, only kept ones), every rollout drawn kept in
the record; naive credit's pi_old over several updates; a resample without a success; `prefixed`
credit with no prefix is plain GRPO; the lorem source's text, length and embeddings. (Each credit
rule's loss and gradient against a hand computation: tests/test_rl_losses.py.)

Run:  python -m pytest tests/test_resample.py -q        (about 30 s on one core)
"""
import contextlib
import copy
import io
import json

import pytest
import torch
from safetensors.torch import load_file

import resample
import rl
from credit import CREDIT_RULES, PLAIN
from common import UserError
from model import make_prefix_source
from prefixes import LOREM_BOUNDARY, LOREM_WORDS, check_prefix_sources
from conftest import tiny_float64_model
from test_rl_flags import records, tiny, tiny_args   # noqa: F401 (fixtures)


def tiny_model():
    return tiny_float64_model(vocab_size=24)


def update_args(**overrides):
    """rl.py's arguments for a unit call: a minimal command line parsed by rl.py's parser, then the
    few fields a test sets."""
    args = rl.parser.parse_args(["--model", "m", "--data", "d", "--out", "o", "--group-size", "2",
                                 "--max-new-tokens", "6", "--micro-batch-size", "2", "--temperature", "0.8"])
    for key, value in overrides.items():
        assert hasattr(args, key), key
        setattr(args, key, value)
    return args


@pytest.fixture
def no_grad_clip(monkeypatch):
    monkeypatch.setattr(rl, "GRAD_CLIP", float("inf"))


def rollouts_of(prompts, completions, prefixes, rewards, resampled=False, credit="prefixed", groups=None):
    """A scored record made by hand (no sampling), every rollout trained; resampled ones carry
    their credit rule. groups: each rollout's group (default: rollout i is in group i // 2)."""
    B = len(prompts)
    r = rl.Rollouts(problems=[{"problem": str(p), "prompt_ids": p} for p in prompts], prefixes=prefixes,
                    completions=completions, truncated=torch.zeros(B, dtype=torch.bool),
                    sources=["none" if p is None else "noise" for p in prefixes],
                    credit=[CREDIT_RULES[credit] if p is not None else PLAIN for p in prefixes],
                    group=torch.tensor(groups if groups is not None else [i // 2 for i in range(B)]),
                    resampled=torch.full((B,), resampled), trained=torch.ones(B, dtype=torch.bool))
    r.texts = [""] * B
    r.rewards = torch.tensor(rewards, dtype=torch.float64)
    r.correct = r.rewards.clone()
    return r


def failed_groups(r, G):
    return (r.rewards.view(-1, G) == 0).all(1).nonzero()[:, 0].tolist()


def hand_logprobs(model, prompt, completion, prefix=None, temperature=0.8, grad=False):
    """log pi(o_t | prefix, q, o_<t) for one rollout alone, from the model's plain forward."""
    ids = torch.tensor(prompt + completion)
    embeds = model.embed_tokens.weight[ids]
    if prefix is not None:
        embeds = torch.cat([prefix, embeds])
    with torch.set_grad_enabled(grad):
        logits = model(inputs_embeds=embeds[None])[0] / temperature                  # (T, V)
    n = len(completion)
    return logits[-n - 1:-1].log_softmax(-1).gather(-1, ids[-n:, None])[:, 0]           # (n,)


# -- the naive-credit ratio -------------------------------------------------------------------------

def test_naive_credit_keeps_the_sampling_time_pi_old_over_several_updates(monkeypatch, no_grad_clip):
    model = tiny_model()
    initial = copy.deepcopy(model)
    prefix = torch.randn(2, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = resample.cat(rollouts_of([[3, 4]], [[5, 6, 7]], [None], [0.0], groups=[0]),
                     rollouts_of([[3, 4]], [[8, 9]], [prefix], [1.0], resampled=True, credit="naive", groups=[0]))
    r.trained[:] = True
    args = update_args(epochs=3)
    rl.set_advantages(r, args)
    olds, backward = [], rl.minibatch_backward

    def recording(policy, r, rows, old, ref, args):          # pi_old as each update reads it
        olds.append(old)
        return backward(policy, r, rows, old, ref, args)
    monkeypatch.setattr(rl, "minibatch_backward", recording)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    metrics = rl.update_policy(rl.Replicated(model, bf16=False), opt, None, r, args)
    assert metrics["updates"] == 3 == len(olds)
    assert any(not torch.equal(a, b) for a, b in zip(initial.parameters(), model.parameters()))
    for old in olds:
        torch.testing.assert_close(old[1], hand_logprobs(initial, [3, 4], [8, 9], prefix), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(old[0], hand_logprobs(initial, [3, 4], [5, 6, 7]), rtol=1e-10, atol=1e-12)


# -- the regrouping rule ----------------------------------------------------------------------------

def test_regrouping_keeps_size_and_a_failure_and_takes_successes_only_from_the_resample():
    G, G_extra = 4, 5
    # three groups; completions name their rollout: [100 + i] originals, [200 + i] resampled
    original = rollouts_of([[1]] * 4 + [[2]] * 4 + [[3]] * 4, [[100 + i] for i in range(12)],
                           [None] * 12, [0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0], groups=[i // 4 for i in range(12)])
    assert failed_groups(original, G) == [0, 2]
    extra = rollouts_of([[1]] * 5 + [[3]] * 5, [[200 + i] for i in range(10)],
                        [torch.zeros(2, 4)] * 10,
                        [0, 1, 1, 1, 1,           # group 0: four successes, more than G - 1
                         0, 0, 1, 0, 0],          # group 2: one success
                        resampled=True, credit="naive", groups=[0] * 5 + [2] * 5)
    extra.trained[:] = False
    regrouped, rescued = resample.regroup(original, extra, [0, 2], G, G_extra)
    assert len(regrouped) == 22 and rescued == 2                   # every rollout drawn stays in the record
    trained = regrouped.in_groups().tolist()
    names = [regrouped.completions[i][0] for i in trained]
    assert names[0:4] == [100, 201, 202, 203]           # first G - 3 originals, first 3 successes
    assert names[4:8] == [104, 105, 106, 107]           # a mixed group is left alone
    assert names[8:12] == [108, 109, 110, 207]          # G - 1 originals, the one success
    groups = regrouped.rewards[trained].view(3, G)
    assert ((groups == 0).sum(1) >= 1).all()            # every group keeps a failure
    for k, i in enumerate(trained):                     # successes of failed groups: resampled
        assert regrouped.group[i] == k // G
        if k // G in (0, 2) and regrouped.rewards[i] > 0:
            assert regrouped.resampled[i] and regrouped.train_prefixes()[i] is None    # naive credit
            assert regrouped.prefixes[i] is not None and regrouped.sources[i] == "noise"
        if not regrouped.resampled[i]:
            assert regrouped.train_prefixes()[i] is None and regrouped.prefixes[i] is None
    assert [regrouped.problems[i]["problem"] for i in trained] == [str([k // G + 1]) for k in range(12)]


def resample_args(tiny, out, spec):
    """rl.py's arguments as its check reads them (--resample's parts into args.resample_*)."""
    args = rl.parser.parse_args(tiny_args(tiny, out, "--resample", spec))
    with contextlib.redirect_stdout(io.StringIO()):
        rl.check_args(args, 1)
    return args


def tiny_policy(tiny):
    from model import load_policy
    model, tokenizer = load_policy(str(tiny / "model"))
    return model, tokenizer, rl.load_problems(str(tiny / "train.jsonl"), "--data", tokenizer, "plain", 0, 0,
                                              model.config.max_position_embeddings)


def test_a_sampled_resample_is_regrouped_and_recorded(tiny, tmp_path, monkeypatch, one_thread):
    """Sampled for real on the tiny model: every original fails, the resample's rollouts succeed
    when their completion has odd length; lorem prefixes of 4 tokens plus the boundary."""
    model, tokenizer, rows = tiny_policy(tiny)
    args = resample_args(tiny, tmp_path, "3,source=lorem,L=4")
    eos = tokenizer.eos_token_id
    r = rl.rollout(model, None, rows[:2], 0, torch.zeros(2, dtype=torch.long), 0, 0, args, eos)
    monkeypatch.setattr(rl, "grade", lambda text, answer, kind: 0.0)
    rl.score(r, tokenizer, args)
    monkeypatch.setattr(rl, "grade", lambda text, answer, kind: float(len(text) % 2))
    source = make_prefix_source("lorem", model.embed_tokens.weight, tokenizer=tokenizer)
    record = {"rollouts_generated": len(r)}
    out = resample.regroup_failed(r, source, record, 0, args, "cpu", lambda *a: rl.score(
        rl.sample(model, *a, args, eos), tokenizer, args))
    assert record["rollouts_generated"] == 10 + 6 and record["resampled_groups"] == 2
    assert len(out) == 16 and int(out.trained.sum()) == 10 and int(out.resampled.sum()) == 6
    boundary = len(tokenizer(LOREM_BOUNDARY, add_special_tokens=False)["input_ids"])
    trained = out.in_groups().tolist()
    for j in range(2):
        group = trained[5 * j:5 * j + 5]
        assert any(out.rewards[i] == 0 for i in group)
        assert all(out.problems[i] is rows[j] and out.group[i] == j for i in group)
        wins = [i for i in group if out.rewards[i] > 0]
        assert all(out.resampled[i] and out.prefixes[i].shape == (4 + boundary,) and out.sources[i] == "lorem"
                   and out.train_prefixes()[i] is None for i in wins)                     # naive credit
    assert record["rescued_groups"] == sum(bool(out.rewards[trained[5 * j:5 * j + 5]].sum()) for j in range(2))
    successes = int(out.rewards[out.resampled].gt(0).sum())
    assert record["resample_accuracy"] == successes / 6


def test_a_resample_without_success_leaves_zero_advantage(tiny, tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(rl, "grade", lambda text, answer, kind: 0.0)       # nothing ever succeeds
    rl.main(tiny_args(tiny, tmp_path, "--resample", "3,L=4"))
    steps = records(tmp_path)
    assert [r["step"] for r in steps] == [0, 1]
    for r in steps:
        assert r["rollouts_generated"] == 2 * 5 + 2 * 3       # P G + G' for each failed group
        assert r["resampled_groups"] == 2 and r["rescued_groups"] == 0
        assert r["resample_accuracy"] == 0.0 and r["zero_variance_frac"] == 1.0
        assert r["loss"] == 0.0 and r["grad_norm"] == 0.0
    samples = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    assert len(samples) == 2 * (2 * 5 + 2 * 3)            # every rollout drawn
    assert not any(s["trained"] for s in samples if s["resampled"])       # nothing was taken in
    weights = load_file(str(tmp_path / "model" / "model.safetensors"))
    before = load_file(str(tiny / "model" / "model.safetensors"))
    assert all(torch.equal(weights[k], before[k]) for k in before)  # zero advantage: no change


# -- prefixed credit without a prefix is plain GRPO ------------------------------------------------

@pytest.mark.parametrize("credit,exact", [("prefixed", True), ("naive", False)])
def test_credit_without_a_prefix_is_plain_grpo_on_the_same_rollouts(credit, exact, no_grad_clip):
    """Regrouped rollouts of a prefix-free resample trained under `credit`, against the same
    rollouts as ordinary GRPO rollouts on rl.py's default path (no credit list, all trained):
    prefixed credit gives the same bits, naive credit the same numbers up to rounding (its pi_old
    comes from a separate forward pass)."""
    g = torch.Generator().manual_seed(0)
    tokens = lambda n: torch.randint(3, 23, (n,), generator=g).tolist()
    G, G_extra = 3, 4
    prompts = [tokens(3) for _ in range(2) for _ in range(G)]
    original = rollouts_of(prompts, [tokens(2 + i % 4) for i in range(6)], [None] * 6,
                           [0, 0, 0, 0, 1, 0], groups=[i // G for i in range(6)])
    extra = rollouts_of([prompts[0]] * G_extra, [tokens(1 + i) for i in range(G_extra)],
                        [None] * G_extra, [1, 0, 1, 1], resampled=True, credit=credit, groups=[0] * G_extra)
    extra.trained[:] = False
    regrouped, _ = resample.regroup(original, extra, failed_groups(original, G), G, G_extra)
    trained = regrouped.in_groups().tolist()
    plain = rollouts_of([regrouped.problems[i]["prompt_ids"] for i in trained], [regrouped.completions[i] for i in trained],
                        [None] * 6, regrouped.rewards[trained].tolist(), groups=[i // G for i in range(6)])
    plain.credit = plain.resampled = plain.trained = None                  # rl.py's default path
    assert regrouped.resampled[trained].sum() == 2
    results, args = [], update_args(micro_batch_size=4, group_size=G)
    for r in (regrouped, plain):
        rl.set_advantages(r, args)
        model = tiny_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        metrics = rl.update_policy(rl.Replicated(model, bf16=False), opt, None, r, args)
        results.append((metrics, [p.detach().clone() for p in model.parameters()]))
    (m1, w1), (m2, w2) = results
    assert m1["loss"] != 0.0                              # the regrouped group carries signal
    if exact:
        assert m1["loss"] == m2["loss"] and m1["grad_norm"] == m2["grad_norm"]
        assert all(torch.equal(a, b) for a, b in zip(w1, w2))
    else:
        assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-9)
        for a, b in zip(w1, w2):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


# -- the lorem source -------------------------------------------------------------------------------

def test_lorem_prefixes_are_fresh_text_of_L_tokens_then_the_boundary(tiny, capsys):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(tiny / "tokenizer"))
    E = torch.randn(len(tokenizer), 8)
    source = make_prefix_source("lorem", E, tokenizer=tokenizer)
    boundary = tokenizer(LOREM_BOUNDARY, add_special_tokens=False)["input_ids"]
    ids = source.sample(6, 20, torch.Generator().manual_seed(0))                        # (6, 20 + b)
    assert ids.shape == (6, 20 + len(boundary)) and source.rows(20) == 20 + len(boundary)
    assert all(row[20:].tolist() == boundary for row in ids)
    assert len({tuple(row[:20].tolist()) for row in ids}) == 6                          # fresh text
    assert tokenizer.unk_token_id not in ids                                            # real tokens
    words = tokenizer.decode(ids[0, :20]).replace(".", " ").replace(",", " ").split()
    assert len(words) >= 2 and all(w in LOREM_WORDS for w in words[:-1])   # the last may be cut
    assert torch.equal(source.sample(6, 20, torch.Generator().manual_seed(0)), ids)        # seeded
    assert source.sample(3, 0) is None and source.rows(0) == 0
    with pytest.raises(UserError, match="needs the policy's tokenizer"):
        make_prefix_source("lorem", E)
    capsys.readouterr()
    check_prefix_sources([("--prefix-source", "lorem")], None, None, tie=True)     # no vectors to tie: a note
    note = capsys.readouterr().out.splitlines()
    assert len(note) == 1 and note[0].startswith("note: ") and "tie" in note[0], note


def test_a_text_prefix_is_embedded_like_the_prompt(tiny):
    """Lorem ids before a prompt give the batch a prompt of those tokens would give: the model's
    own embeddings, so the reference model reads them through its initial ones."""
    from model import embed_rows, load_policy
    model, tokenizer = load_policy(str(tiny / "model"))
    source = make_prefix_source("lorem", model.embed_tokens.weight, tokenizer=tokenizer)
    ids = source.sample(2, 5, torch.Generator().manual_seed(0))
    prompts = [[5, 6, 7], [8, 9]]
    with_text, mask = embed_rows(model, prompts, list(ids))
    as_tokens, mask2 = embed_rows(model, [row.tolist() + p for row, p in zip(ids, prompts)])
    assert torch.equal(with_text, as_tokens) and torch.equal(mask, mask2)
