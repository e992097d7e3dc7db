"""GRPO / RLOO / Dr.GRPO advantages, the clipped policy loss and the entropy bonus against
hand-computed values; rl.py's policy update on a tiny float64 model: the gradient accumulated
over micro-batches and over 2 gloo ranks equals one full-batch loss's gradient, the KL is k3
against the initial checkpoint as loaded, masked truncations carry nothing; every credit rule
(credit.py) against a float64 hand computation, and the update's logged metrics (clip_frac,
entropy, kl, loss) recomputed by hand over several epochs and minibatches.

Run:  python -m pytest tests/test_rl_losses.py -q        (about 20 s on two cores)
"""
import contextlib
import copy
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import credit
import rl
from conftest import tiny_float64_model
from model import (ADVANTAGE_ESTIMATORS, Transformer, completion_batch, embed_rows, group_advantages,
                   loss_token_weights, policy_loss, token_logprobs)

frac = lambda stats, key: (stats[key].sum() / stats["tokens"].sum()).item()


def test_grpo_by_hand():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), "grpo")
    std = math.sqrt(((0.5 ** 2) * 4) / 3)            # Bessel-corrected std of {1, 0, 0, 1}
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5]]) / (std + 1e-6)
    torch.testing.assert_close(adv, expected)


def test_rloo_by_hand():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0]]), "rloo")
    # r_i minus the mean of the others: 1 - 0, 0 - 0.5, 0 - 0.5
    torch.testing.assert_close(adv, torch.tensor([[1.0, -0.5, -0.5]]))


def test_drgrpo_by_hand():
    adv = group_advantages(torch.tensor([[3.0, 1.0], [0.0, 0.0]]), "drgrpo")
    torch.testing.assert_close(adv, torch.tensor([[1.0, -1.0], [0.0, 0.0]]))


@pytest.mark.parametrize("estimator", list(ADVANTAGE_ESTIMATORS))
def test_equal_groups_and_group_of_one_get_zero(estimator):
    assert torch.equal(group_advantages(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]), estimator),
                       torch.zeros(2, 3))
    assert torch.equal(group_advantages(torch.tensor([[1.0], [0.0]]), estimator), torch.zeros(2, 1))


def test_clipped_loss_by_hand_on_both_sides_of_the_clip():
    # four tokens of one sequence; ratios 1.5, 0.5, 1.1, 0.9; eps low 0.2, high 0.28
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.9]]))
    weights = torch.full((1, 4), 0.25)               # token-mean over 4 tokens
    loss_pos, stats = policy_loss(new, old, torch.tensor([2.0]), weights, 0.2, 0.28)
    # A > 0: min(r A, clip(r) A) = 1.28*2, 0.5*2, 1.1*2, 0.9*2 -> mean of negatives
    expected = -(1.28 * 2 + 0.5 * 2 + 1.1 * 2 + 0.9 * 2) / 4
    assert loss_pos.item() == pytest.approx(expected, abs=1e-6)
    assert frac(stats, "clipped") == pytest.approx(0.25)  # only 1.5 is clipped
    assert stats["loss"].sum().item() == pytest.approx(expected, abs=1e-6)
    loss_neg, stats = policy_loss(new, old, torch.tensor([-1.0]), weights, 0.2, 0.28)
    # A < 0: min(-r, -clip(r)) = -1.5, -0.8, -1.1, -0.9
    expected = (1.5 + 0.8 + 1.1 + 0.9) / 4
    assert loss_neg.item() == pytest.approx(expected, abs=1e-6)
    assert frac(stats, "clipped") == pytest.approx(0.25)  # only 0.5 is clipped


def test_k3_kl_by_hand():
    lp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    w = torch.full((1, 2), 0.5)
    loss, stats = policy_loss(lp, lp.detach(), torch.tensor([0.0]), w, ref_logprobs=ref, kl_coef=0.1)
    k3 = (0.5 - math.log(0.5) - 1 + 0.0) / 2          # exp(log .5) - log .5 - 1, and 0
    assert frac(stats, "kl") == pytest.approx(k3, abs=1e-6)
    assert loss.item() == pytest.approx(0.1 * k3, abs=1e-6)


def test_aggregations_and_padding_carry_no_weight():
    mask = torch.tensor([[False, True, True, True], [False, False, True, False]])
    w = loss_token_weights(mask, "token-mean", n_sequences=2, n_tokens=4, max_new_tokens=8)
    assert torch.equal(w, mask.float() / 4)
    w = loss_token_weights(mask, "seq-mean", n_sequences=2, n_tokens=4, max_new_tokens=8)
    torch.testing.assert_close(w.sum(1), torch.tensor([0.5, 0.5]))
    w = loss_token_weights(mask, "constant", n_sequences=2, n_tokens=4, max_new_tokens=8)
    assert torch.equal(w, mask.float() / 16)
    # gradient reaches only weighted (completion) positions, whatever the padded log-probs hold
    lp = torch.randn(2, 4, requires_grad=True)
    loss, _ = policy_loss(lp, lp.detach(), torch.tensor([1.0, -2.0]), w)
    loss.backward()
    assert (lp.grad[~mask] == 0).all() and (lp.grad[mask] != 0).all()


def test_micro_batches_add_up_to_the_batch_loss():
    torch.manual_seed(0)
    mask = torch.rand(6, 5) > 0.3
    lp, old, adv = torch.randn(6, 5), torch.randn(6, 5) * 0.1, torch.randn(6)
    for agg in ["token-mean", "seq-mean", "constant"]:
        w = loss_token_weights(mask, agg, 6, int(mask.sum()), 5)
        full, _ = policy_loss(lp, old, adv, w)
        parts = sum(policy_loss(lp[i:i + 2], old[i:i + 2], adv[i:i + 2], w[i:i + 2])[0]
                    for i in range(0, 6, 2))
        torch.testing.assert_close(full, parts)


# -- the entropy, logged -----------------------------------------------------------------------

def test_the_logged_entropy_is_the_weighted_token_mean_and_adds_nothing_to_the_loss():
    # two tokens whose next-token distributions are (1/2, 1/2) and (1/4, 1/4, 1/4, 1/4)
    entropy = torch.tensor([[math.log(2), math.log(4)]])
    lp = torch.zeros(1, 2)
    w = torch.full((1, 2), 0.5)                       # token-mean over 2 tokens
    loss, stats = policy_loss(lp, lp, torch.tensor([0.0]), w, entropy=entropy)
    assert loss.item() == 0.0
    assert frac(stats, "entropy") == pytest.approx((math.log(2) + math.log(4)) / 2)


def test_token_entropy_is_that_of_the_tempered_distribution():
    model = tiny_model()
    batch = completion_batch(model, [[3, 4], [5, 6, 7]], [[8, 9, 10], [11]])
    with torch.no_grad():               # an lm_head of zeros predicts uniformly: H = log V
        saved = model.lm_head.weight.clone()
        model.lm_head.weight.zero_()
        _, entropy = token_logprobs(model, *batch, temperature=0.7)
        model.lm_head.weight.copy_(saved)
    torch.testing.assert_close(entropy[batch[2]], torch.full((4,), math.log(23), dtype=torch.float64))
    # against the entropy written out from the full logits
    embeds, targets, loss_mask = batch
    _, entropy = token_logprobs(model, embeds, targets, loss_mask, 0.7)
    logp = (model(inputs_embeds=embeds)[loss_mask] / 0.7).log_softmax(-1)
    torch.testing.assert_close(entropy[loss_mask], -(logp.exp() * logp).sum(-1), rtol=1e-12, atol=1e-12)


# -- the policy update: micro-batches, ranks, the reference model --------------------------------

def tiny_model(tied=False):
    return tiny_float64_model(vocab_size=23, tied=tied)


def update_args(*argv, **overrides):
    """rl.py's arguments for a unit call: a minimal command line parsed by rl.py's parser (clip
    0.2 / 0.28, grpo, token-mean, one epoch of one minibatch), then the few fields a test sets."""
    args = rl.parser.parse_args(["--model", "m", "--data", "d", "--out", "o", "--group-size", "4",
                                 "--max-new-tokens", "6", "--micro-batch-size", "3", "--temperature", "0.8",
                                 "--kl-coef", "0.1", *argv])
    for key, value in overrides.items():
        assert hasattr(args, key), key
        setattr(args, key, value)
    return args


def fresh_stats(r):
    """Zero per-rollout sums, as update_policy starts them (any key policy_loss gives)."""
    r.stats = defaultdict(lambda: torch.zeros(len(r), dtype=torch.float64))


def policy_of(model):
    """The policy as rl.py wraps it on one rank, in the model's own precision."""
    return rl.Replicated(model, bf16=False)


def make_rollouts(model, keep, seed=1, rule=credit.PLAIN):
    """Rollouts of random tokens in groups of 4: every third rollout prefixed with its own 2 vectors
    (credited by `rule`; PLAIN: rl.py's default, no credit list), some completions at the 6-token
    limit (truncated); r.chosen: the rows of `keep` that a test trains. Returns (r, old, ref): old and
    reference log-probs are the policy's own,
    shifted so that ratios spread over both sides of the clip."""
    g = torch.Generator().manual_seed(seed)
    B, d = len(keep), model.config.hidden_size
    lengths = [1 + int(torch.randint(0, 6, (1,), generator=g)) for _ in range(B)]
    prefixes = [torch.randn(2, d, generator=g, dtype=torch.float64) if i % 3 == 0 else None for i in range(B)]
    r = rl.Rollouts(
        problems=[{"prompt_ids": torch.randint(3, 23, (int(torch.randint(1, 5, (1,), generator=g)),),
                                               generator=g).tolist()} for _ in range(B)],
        prefixes=prefixes, completions=[torch.randint(3, 23, (n,), generator=g).tolist() for n in lengths],
        truncated=torch.tensor([n == 6 for n in lengths]), sources=["test" if p is not None else "none" for p in prefixes],
        credit=None if rule is credit.PLAIN else [rule if p is not None else credit.PLAIN for p in prefixes],
        group=torch.arange(B) // 4)
    r.chosen = torch.tensor(keep)
    r.advantages = torch.randn(B, generator=g, dtype=torch.float64)
    fresh_stats(r)
    own = rl.completion_logprobs(model, r, list(range(B)), update_args(), contextlib.nullcontext)   # B x (|o_i|,)
    old = [o + 0.3 * torch.randn(o.shape, generator=g, dtype=torch.float64) for o in own]
    ref = [o + 0.5 * torch.randn(o.shape, generator=g, dtype=torch.float64) for o in own]
    return r, old, ref


def full_batch_gradient(model, r, old_logprobs, ref_logprobs, args):
    """The gradient of one loss over every kept rollout at once, old and reference log-probs
    placed into the training layout by hand."""
    rows = r.chosen.nonzero()[:, 0].tolist()
    embeds, targets, loss_mask = r.batch(model, rows)
    old, ref = torch.zeros(loss_mask.shape, dtype=torch.float64), torch.zeros(loss_mask.shape, dtype=torch.float64)
    for j, i in enumerate(rows):                       # row j's completion sits at its loss positions
        old[j, loss_mask[j]], ref[j, loss_mask[j]] = old_logprobs[i], ref_logprobs[i]
    lp, entropy = token_logprobs(model, embeds, targets, loss_mask, args.temperature)
    w = loss_token_weights(loss_mask, args.aggregation, len(rows), int(loss_mask.sum()), args.max_new_tokens,
                           lp.dtype)
    loss, stats = policy_loss(lp, old, r.advantages[rows], w, *args.clip_eps, ref, args.kl_coef, entropy)
    assert 0 < frac(stats, "clipped") < 1              # the clip is active on some tokens, not all
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, loss.item()


KEEP = [False, False, False, True, True, False, True, True, True, True, False, True]  # the rows a minibatch trains (0-2: none of a micro-batch)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean", "constant"])
def test_micro_batches_accumulate_the_full_batch_gradient(aggregation):
    model = tiny_model()
    r, old, ref = make_rollouts(model, KEEP)
    expected, expected_loss = full_batch_gradient(model, r, old, ref, update_args(aggregation=aggregation))
    for micro in (1, 2, 3, 5, 100):                   # 5 divides neither 12 rows nor 8 kept
        model.zero_grad(set_to_none=True)
        rows = r.chosen.nonzero()[:, 0].tolist()
        fresh_stats(r)
        n_seq, loss = rl.minibatch_backward(policy_of(model), r, rows, old, ref,
                                            update_args(aggregation=aggregation, micro_batch_size=micro))
        assert n_seq == len(rows) and loss == pytest.approx(expected_loss, rel=1e-10)
        assert r.stats["loss"].sum().item() == pytest.approx(expected_loss, rel=1e-10)   # each rollout's share
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-12, msg=name)


def _rank_worker(rank, world, store, out):
    import torch.distributed as dist
    from common import compute_cleanup, sync_gradients
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = tiny_model()
    r, old, ref = make_rollouts(model, KEEP)
    rows = [i for i in range(len(KEEP)) if KEEP[i]]
    mine = rows[:3] if rank == 0 else rows[3:]          # 3 and 5 kept rollouts: unequal ranks
    grads = {}
    for aggregation in ("token-mean", "seq-mean", "constant"):
        model.zero_grad(set_to_none=True)
        rl.minibatch_backward(policy_of(model), r, mine, old, ref, update_args(aggregation=aggregation,
                                                                                micro_batch_size=2))
        sync_gradients(model)
        grads[aggregation] = {n: p.grad.clone() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(grads, out)
    compute_cleanup(wait_for_all=True)     # as the stages do: no rank tears gloo down while rank 0 still writes


def test_two_gloo_ranks_accumulate_the_full_batch_gradient(tmp_path):
    import torch.multiprocessing as mp
    out = tmp_path / "grads.pt"
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2)
    got = torch.load(out)
    model = tiny_model()
    r, old, ref = make_rollouts(model, KEEP)
    for aggregation in ("token-mean", "seq-mean", "constant"):
        expected, _ = full_batch_gradient(model, r, old, ref, update_args(aggregation=aggregation))
        for name, e in expected.items():
            torch.testing.assert_close(got[aggregation][name], e, rtol=1e-9, atol=1e-12,
                                       msg=f"{aggregation}: {name}")


def test_kl_is_k3_against_the_initial_checkpoint_after_the_embeddings_moved(tmp_path):
    tiny_model(tied=True).save_pretrained(str(tmp_path / "initial"))
    policy = Transformer.from_pretrained(str(tmp_path / "initial"), dtype=torch.float64)
    with torch.no_grad():                   # as RL at a high lr would move them
        policy.embed_tokens.weight.add_(0.3 * torch.randn_like(policy.embed_tokens.weight))
    r, _, _ = make_rollouts(policy, [True] * 6)
    r.advantages = torch.zeros(6, dtype=torch.float64)
    args = update_args(kl_coef=0.1)
    ref = Transformer.from_pretrained(str(tmp_path / "initial"), dtype=torch.float64)   # as rl.py loads it
    wrapped = policy_of(policy)
    ref_logprobs = rl.completion_logprobs(ref, r, list(range(6)), args, wrapped.autocast)
    rl.minibatch_backward(wrapped, r, list(range(6)), None, ref_logprobs, args)

    initial = Transformer.from_pretrained(str(tmp_path / "initial"), dtype=torch.float64)

    def logprobs(model, i, embedding):
        """Row i alone: [prefix; E(prompt + completion)] with the given embedding matrix."""
        ids = torch.tensor(r.problems[i]["prompt_ids"] + r.completions[i])
        embeds = embedding[ids] if r.prefixes[i] is None else torch.cat([r.prefixes[i], embedding[ids]])
        with torch.no_grad():
            logits = model(inputs_embeds=embeds[None])[0] / args.temperature       # (T, V)
        n = len(r.completions[i])
        return logits[-n - 1:-1].log_softmax(-1).gather(-1, ids[-n:, None])[:, 0]

    def mean_k3(ref_embedding):
        k3 = []
        for i in range(6):
            d = logprobs(initial, i, ref_embedding) - logprobs(policy, i, policy.embed_tokens.weight)
            k3.append(d.exp() - d - 1)
        return torch.cat(k3).mean().item()

    assert frac(r.stats, "kl") == pytest.approx(mean_k3(initial.embed_tokens.weight), rel=1e-9)
    # reading the tokens through the policy's moved embeddings gives another number
    assert abs(mean_k3(policy.embed_tokens.weight.detach()) - frac(r.stats, "kl")) > 1e-3


def test_empty_minibatches_take_no_optimiser_step():
    """2 rollouts in 5 minibatches: the 3 empty ones take no optimiser step (and no rank would)."""
    model = tiny_model()
    r, _, _ = make_rollouts(model, [True] * 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    steps = []
    opt.register_step_post_hook(lambda *args: steps.append(1))
    metrics = rl.update_policy(policy_of(model), opt, None, r, update_args(epochs=2, minibatches=5, kl_coef=0.0))
    assert metrics["updates"] == len(steps) == 4 and 0 <= metrics["clip_frac"] <= 1
    # and a forward over a batch without a single loss position still backpropagates (zeros)
    batch = completion_batch(model, [[3, 4]], [[5, 6]])
    lp, entropy = token_logprobs(model, batch[0], batch[1], torch.zeros_like(batch[2]))
    (lp.sum() + entropy.sum()).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_a_cut_off_answer_is_worth_zero():
    """Three finished wrong answers and one completion cut at --max-new-tokens just after the right
    number: its grade is luck, so its reward is 0 (the group has failed, and would be resampled)."""
    rows = [{"problem": "2+3=?", "answer": "5", "grading_kind": "toy", "prompt_ids": [1]}] * 4
    texts = ["answer: 4", "answer: 6", "answer: 7", "answer: 5"]
    rollouts = rl.Rollouts(rows, [None] * 4, [[2]] * 4, truncated=torch.tensor([False, False, False, True]),
                           group=torch.zeros(4, dtype=torch.long), sources=["none"] * 4)
    decoder = SimpleNamespace(batch_decode=lambda ids, skip_special_tokens: texts)
    args = update_args()
    rl.score(rollouts, decoder, args)
    assert rollouts.correct.tolist() == [0.0, 0.0, 0.0, 1.0]      # what the grader saw
    assert rollouts.rewards.tolist() == [0.0, 0.0, 0.0, 0.0]      # a failed group: resampled
    rl.set_advantages(rollouts, args)
    assert rollouts.advantages.tolist() == [0.0] * 4


# -- credit rules (credit.py) against float64 hand computations ---------------------------------

def test_nudge_advantages_are_nudgerls_inter_and_intra_context_split_by_hand():
    """NudgeRL's advantage with "under a prefix" as the one context: a prefixed rollout's
    (r - mean_P) + lambda (mean_P - mean), a plain one's r - mean, then the group's centring and
    scaling (here GRPO's Bessel std)."""
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    prefixed = torch.tensor([[True, True, True, False, False, False]])
    lam, mean, mean_p = 1.1, 0.5, 2 / 3
    hat = torch.tensor([[(x - mean_p) + lam * (mean_p - mean) for x in (1, 0, 1)] + [x - mean for x in (0, 0, 1)]],
                       dtype=torch.float64)
    centred = hat - hat.mean()
    expected = centred / (math.sqrt((centred ** 2).sum() / 5) + 1e-6)
    inter = torch.ones(1, 6, dtype=torch.float64).masked_fill(prefixed, lam)
    got = group_advantages(credit.credited_rewards(rewards, prefixed, inter), "grpo")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert got[0, 0] > group_advantages(rewards, "grpo")[0, 0]          # the better context gains
    # lambda = 1, or a group all or none of whose rollouts are prefixed: the plain estimator
    for p, w in ((prefixed, torch.ones(1, 6)), (torch.ones(1, 6, dtype=torch.bool), inter),
                 (torch.zeros(1, 6, dtype=torch.bool), inter)):
        torch.testing.assert_close(group_advantages(credit.credited_rewards(rewards, p, w), "grpo"),
                                   group_advantages(rewards, "grpo"))


def row_logprobs(model, r, i, with_prefix, temperature):
    """Rollout i alone, left unpadded: log-probs (|o_i|,) and entropies of its completion, read with
    or without its prefix (an independent forward pass, not the training layout)."""
    prefix = r.prefixes[i] if with_prefix else None
    embeds, mask = embed_rows(model, [r.problems[i]["prompt_ids"] + r.completions[i]], [prefix])
    n = len(r.completions[i])
    logp = (model(inputs_embeds=embeds, attention_mask=mask)[0, -n - 1:-1] / temperature).log_softmax(-1)
    return logp.gather(-1, torch.tensor(r.completions[i])[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("rule", ["naive", "naive-shaped", "nudge"])
def test_each_credit_rule_gives_the_hand_computed_loss_and_gradient(rule):
    """One minibatch (seq-mean) of rollouts, a third of them prefixed under `rule`: the loss and
    its gradient equal a sum written out row by row: naive reads pi without the prefix against
    pi_old with it, naive-shaped takes -r/(r + 0.1) A, nudge adds -0.1 A mean_t log pi(o | q) / B."""
    model, T = tiny_model(), 0.8
    r, _, _ = make_rollouts(model, [True] * 8, rule=credit.CREDIT_RULES[rule])
    args = update_args(kl_coef=0.0, aggregation="seq-mean", temperature=T)
    rows, policy = list(range(8)), policy_of(model)
    old = rl.completion_logprobs(policy, r, rows, args, policy.autocast, sampled=True)   # as update_policy does
    model.zero_grad(set_to_none=True)
    _, loss = rl.minibatch_backward(policy, r, rows, old, None, args)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    by_hand = 0.0
    for i in rows:
        prefixed, A = r.prefixes[i] is not None, r.advantages[i]
        old, _ = row_logprobs(model, r, i, True, T)                     # the sampling context
        new, _ = row_logprobs(model, r, i, not (prefixed and rule.startswith("naive")), T)
        ratio = (new - old.detach()).exp()
        if prefixed and rule == "naive-shaped":
            term = -ratio / (ratio + 0.1) * A
        else:
            term = -torch.minimum(ratio * A, ratio.clamp(1 - 0.2, 1 + 0.28) * A)
        by_hand = by_hand + term.mean() / 8                                            # seq-mean
        if prefixed and rule == "nudge":
            bare, _ = row_logprobs(model, r, i, False, T)
            by_hand = by_hand - 0.1 * A * bare.mean() / 8
    expected = torch.autograd.grad(by_hand, list(model.parameters()))
    assert loss == pytest.approx(by_hand.item(), rel=1e-10)
    for (name, g), e in zip(got.items(), expected):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-12, msg=name)


@pytest.mark.parametrize("rule", list(credit.CREDIT_RULES))
def test_update_metrics_equal_a_replay_by_hand(rule):
    """Two epochs of two minibatches with a KL: the logged clip_frac, entropy,
    kl and loss equal a replay written out by hand, update by update, from the weights each update
    read (recorded by the optimiser) and pi_old in each rollout's sampling context."""
    model, T = tiny_model(), 0.8
    initial = copy.deepcopy(model)
    r, _, _ = make_rollouts(model, [True] * 12, rule=credit.CREDIT_RULES[rule])
    states = []

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            states.append(copy.deepcopy(model))
            return super().step(closure)
    args = update_args(epochs=2, minibatches=2, temperature=T)
    metrics = rl.update_policy(policy_of(model), Recording(model.parameters(), lr=2.0), initial, r, args)
    assert metrics["updates"] == 4 == len(states)
    kept = list(range(12))                                                         # every rollout trains
    place = {i: int(r.group[i]) * 4 + i % 4 for i in kept}                         # group j, place k
    sums, loss = dict(tokens=0, clipped=0, entropy=0.0, kl=0.0), 0.0
    for u, state in enumerate(states):
        rows = [i for i in kept if place[i] % 2 == u % 2]                          # minibatch (jG + k) mod 2
        n_tok = sum(len(r.completions[i]) for i in rows)
        for i in rows:
            trained_ctx = r.prefixes[i] is not None and not rule.startswith("naive")
            with torch.no_grad():
                old, _ = row_logprobs(initial, r, i, True, T)
                new, entropy = row_logprobs(state, r, i, trained_ctx or r.prefixes[i] is None, T)
                ref, _ = row_logprobs(initial, r, i, trained_ctx or r.prefixes[i] is None, T)
            ratio, A = (new - old).exp(), r.advantages[i]
            clipped_term = ratio.clamp(1 - 0.2, 1 + 0.28) * A
            is_clipped = clipped_term < ratio * A
            term = -torch.minimum(ratio * A, clipped_term)
            if r.prefixes[i] is not None and rule == "naive-shaped":
                term, is_clipped = -ratio / (ratio + 0.1) * A, torch.zeros_like(is_clipped)
            k3 = (ref - new).exp() - (ref - new) - 1
            loss += ((term + 0.1 * k3) / n_tok).sum().item()
            if r.prefixes[i] is not None and rule == "nudge":
                with torch.no_grad():
                    bare, _ = row_logprobs(state, r, i, False, T)
                loss -= 0.1 * A.item() * bare.mean().item() / len(rows)
            sums["tokens"] += len(new)
            sums["clipped"] += int(is_clipped.sum())
            sums["entropy"] += entropy.sum().item()
            sums["kl"] += k3.sum().item()
    assert sums["clipped"] > 0
    assert metrics["clip_frac"] == pytest.approx(sums["clipped"] / sums["tokens"], abs=1e-12)
    assert metrics["entropy"] == pytest.approx(sums["entropy"] / sums["tokens"], rel=1e-9)
    assert metrics["kl"] == pytest.approx(sums["kl"] / sums["tokens"], rel=1e-9)
    assert metrics["loss"] == pytest.approx(loss / 4, rel=1e-9)
