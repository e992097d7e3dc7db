"""Credit rules: how a rollout sampled under a prefix is trained. One registry serves the schedule's
prefixed rollouts (rl.py --credit) and the resampled ones (--resample-credit); each rollout carries
its rule, so rl.py's update compares no names. docs/resampling.md and rl.py's docstring state the
objective; tests/test_rl_losses.py checks each rule against a float64 hand computation.

    prefixed      (the paper's reading) the prefix is replayed in pi, pi_old and pi_ref:
                      r_it = pi(o_it | p_i, q, o_i<t) / pi_old(o_it | p_i, q, o_i<t)
    naive         LoPE's pseudo-rollout: trained as a rollout of the unprefixed prompt; pi and pi_ref
                  read (q, o_i<t) while pi_old keeps the sampling context:
                      r_it = pi(o_it | q, o_i<t) / pi_old(o_it | p_i, q, o_i<t)
    naive-shaped  the same ratio, and LoPE's shaped term -f(r_it) A_i, f(r) = r / (r + 0.1),
                  unclipped (f < 1 bounds it), in place of the clipped one
    nudge         NudgeRL (arXiv 2605.15726), with "under a prefix" as the one context: trained
                  under its prefix like `prefixed`, plus
                  - inter/intra-context advantages: the estimator reads, in place of each prefixed
                    rollout's reward, r_i + (lambda - 1)(mean_P r - mean_G r), where P are the
                    group's rollouts under a prefix. That is NudgeRL's (r_i - mean_P r) +
                    lambda (mean_P r - mean_G r) before the group's normalisation; lambda = 1.1,
                    and a group all or none of whose rollouts carry a prefix is left as it was. The
                    grpo estimator divides by the Bessel std + 1e-6, NudgeRL by the population std
                    + 1e-5, so these advantages are sqrt((G - 1) / G) times NudgeRL's (0.935 at G 8,
                    0.707 at G 2);
                  - distillation into the prefix-free context: minus distill_coef A_i times the mean
                    over its tokens of log pi(o_it | q, o_i<t), without the prefix, no ratio, no
                    clip, weighted 1 / B' like every rollout of the minibatch (distill_coef 0.1).
                    NudgeRL adds this term for every rollout; here only for those under a prefix,
                    since for the others it would repeat the policy-gradient term, so that a step
                    without prefixes is plain GRPO / RLOO.
A new rule is one entry of CREDIT_RULES.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CreditRule:
    name: str
    with_prefix: bool = True      # pi and pi_ref read the prefix the rollout was sampled under
    shaped: bool = False          # LoPE's shaped term replaces the clipped one
    inter_weight: float = 1.0     # lambda of the inter-context advantage (1: the plain estimator)
    distill_coef: float = 0.0     # weight of the distillation term into the prefix-free context


CREDIT_RULES = {rule.name: rule for rule in (
    CreditRule("prefixed"),
    CreditRule("naive", with_prefix=False),
    CreditRule("naive-shaped", with_prefix=False, shaped=True),
    CreditRule("nudge", inter_weight=1.1, distill_coef=0.1),
)}
PLAIN = CREDIT_RULES["prefixed"]      # the rule a rollout without a prefix carries: it changes nothing


def credited_rewards(rewards, prefixed, inter_weight):
    """rewards, inter_weight (P, G) float and prefixed (P, G) bool -> the rewards the estimator reads:
    a prefixed rollout's reward plus (lambda - 1)(mean over the group's prefixed rollouts - the group's
    mean). Equal to `rewards` where lambda = 1 and in groups all or none of whose rollouts are prefixed."""
    rewards = rewards.double()
    n_prefixed = prefixed.sum(1, keepdim=True)
    prefixed_mean = (rewards * prefixed).sum(1, keepdim=True) / n_prefixed.clamp(min=1)          # (P, 1)
    shift = (prefixed_mean - rewards.mean(1, keepdim=True)) * (n_prefixed > 0)
    return rewards + (inter_weight.double() - 1) * prefixed * shift


def distillation_loss(model, prompts, completions, advantages, coefs, n_sequences, temperature):
    """The nudge rule's distillation term for b rollouts, read in the prefix-free context (prompt ids
    without the prefix, positions from 0): -sum_i d_i A_i mean_t log pi(o_it | q, o_i<t) / n_sequences,
    with d_i = coefs[i] and A_i = advantages[i]. Returns (the loss, each rollout's share (b,) float64)."""
    from model import completion_batch, token_logprobs
    embeds, targets, loss_mask = completion_batch(model, prompts, completions)
    logprobs, _ = token_logprobs(model, embeds, targets, loss_mask, temperature)                # (b, T)
    mean_logprob = logprobs.sum(1) / loss_mask.sum(1).clamp(min=1)                              # (b,)
    weight = torch.tensor(coefs, dtype=logprobs.dtype, device=logprobs.device) * advantages.to(logprobs.dtype)
    per_row = -weight * mean_logprob / n_sequences
    return per_row.sum(), per_row.detach().double()
