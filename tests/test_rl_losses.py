"""GRPO / RLOO / Dr.GRPO advantages and the clipped policy loss against hand-computed values.

Run:  python -m pytest tests/test_rl_losses.py -q
"""
import math

import pytest
import torch

from common import UserError
from model import group_advantages, loss_token_weights, policy_loss


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


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "drgrpo"])
def test_equal_groups_and_group_of_one_get_zero(estimator):
    assert torch.equal(group_advantages(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]), estimator),
                       torch.zeros(2, 3))
    assert torch.equal(group_advantages(torch.tensor([[1.0], [0.0]]), estimator), torch.zeros(2, 1))


def test_unknown_estimator():
    with pytest.raises(UserError, match="unknown advantage estimator 'ppo'"):
        group_advantages(torch.ones(1, 2), "ppo")


def test_clipped_loss_by_hand_on_both_sides_of_the_clip():
    # four tokens of one sequence; ratios 1.5, 0.5, 1.1, 0.9; eps low 0.2, high 0.28
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.9]]))
    weights = torch.full((1, 4), 0.25)               # token-mean over 4 tokens
    loss_pos, stats = policy_loss(new, old, torch.tensor([2.0]), weights, 0.2, 0.28)
    # A > 0: min(r A, clip(r) A) = 1.28*2, 0.5*2, 1.1*2, 0.9*2 -> mean of negatives
    expected = -(1.28 * 2 + 0.5 * 2 + 1.1 * 2 + 0.9 * 2) / 4
    assert loss_pos.item() == pytest.approx(expected, abs=1e-6)
    assert stats["clip_frac"] == pytest.approx(0.25)  # only 1.5 is clipped
    loss_neg, stats = policy_loss(new, old, torch.tensor([-1.0]), weights, 0.2, 0.28)
    # A < 0: min(-r, -clip(r)) = -1.5, -0.8, -1.1, -0.9
    expected = (1.5 + 0.8 + 1.1 + 0.9) / 4
    assert loss_neg.item() == pytest.approx(expected, abs=1e-6)
    assert stats["clip_frac"] == pytest.approx(0.25)  # only 0.5 is clipped


def test_k3_kl_by_hand():
    lp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    w = torch.full((1, 2), 0.5)
    loss, stats = policy_loss(lp, lp.detach(), torch.tensor([0.0]), w, ref_logprobs=ref, kl_coef=0.1)
    k3 = (0.5 - math.log(0.5) - 1 + 0.0) / 2          # exp(log .5) - log .5 - 1, and 0
    assert stats["kl"] == pytest.approx(k3, abs=1e-6)
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
