"""Credit rules: how a rollout sampled under a prefix is trained (rl.py --credit for the schedule's
prefixed rollouts; the credit= part of --resample for resampled ones). Off the method's path: rl.py
imports this module only when a rule other than `prefixed` is asked for. Each rollout carries its
rule (Rollouts.credit), so the update compares no names. tests/test_rl_losses.py checks each rule
against a float64 hand computation.

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
                    and a group all or none of whose rollouts carry a prefix is left as it was.
                    The normalisation is rl.py's estimator (grpo: Bessel std + 1e-6), so the
                    advantages are sqrt((G - 1) / G) times NudgeRL's (population std + 1e-5):
                    0.935 at G 8, 0.707 at G 2;
                  - distillation into the prefix-free context: minus distill_coef A_i times the mean
                    over its tokens of log pi(o_it | q, o_i<t), without the prefix, no ratio, no
                    clip, weighted 1 / B' like every rollout of the minibatch (distill_coef 0.1).
                    NudgeRL adds this term for every rollout, prefix-free ones included, which gives
                    those an extra unclipped 10% of their policy-gradient weight; here only rollouts
                    under a prefix get it, so that a step without prefixes is plain GRPO / RLOO.
A new rule is one entry of CREDIT_RULES.
"""

from dataclasses import dataclass

import torch

from common import UserError
from model import completion_batch, token_logprobs

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
LOREM_TOKENS = 200                    # --resample's default L for lorem: the middle of LoPE's 100-300 tokens

def check_args(args, parser):
    """--credit names a rule; --resample G'[,source=S,L=N,credit=C] is read into args.resample_size,
    resample_source (lorem), resample_L (200 for lorem, 0 for none, else --L) and resample_credit
    (naive), which go to args.json with the rest."""
    if args.credit not in CREDIT_RULES:
        raise UserError(f"--credit {args.credit}: no such rule; choose one of {', '.join(CREDIT_RULES)}")
    size, *options = (args.resample or "0").split(",")
    try:
        spec = dict(option.split("=", 1) for option in options)
        args.resample_size = int(size)
        args.resample_source, args.resample_credit = spec.pop("source", "lorem"), spec.pop("credit", "naive")
        default_L = {"none": 0, "lorem": LOREM_TOKENS}.get(args.resample_source, args.L)
        args.resample_L = int(spec.pop("L", default_L))
        assert not spec and 0 <= args.resample_size <= 2**12 and args.resample_L >= 0
    except (ValueError, AssertionError):
        raise UserError(f"--resample {args.resample}: expected G'[,source=NAME][,L=N][,credit=RULE], "
                        "e.g. --resample 8,source=vae,L=1,credit=prefixed") from None
    from model import PREFIX_SOURCES
    if args.resample_source not in PREFIX_SOURCES or args.resample_credit not in CREDIT_RULES:
        raise UserError(f"--resample {args.resample}: source is one of {', '.join(PREFIX_SOURCES)} and credit "
                        f"one of {', '.join(CREDIT_RULES)}")
    if (args.resample_source == "none") != (args.resample_L == 0):
        raise UserError("--resample source=none takes no prefix (leave L out), and any other source needs L >= 1")
    args.resample = args.resample if args.resample_size else None

def assign(r, name):
    """Give every rollout of r its rule: `name` under a prefix, PLAIN without one."""
    r.credit = [CREDIT_RULES[name] if p is not None else PLAIN for p in r.prefixes]

def credited_rewards(rewards, prefixed, inter_weight):
    """rewards, inter_weight (P, G) float and prefixed (P, G) bool -> the rewards the estimator reads:
    a prefixed rollout's reward plus (lambda - 1)(mean over the group's prefixed rollouts - the group's
    mean). Equal to `rewards` where lambda = 1 and in groups all or none of whose rollouts are prefixed."""
    rewards = rewards.double()
    n_prefixed = prefixed.sum(1, keepdim=True)
    prefixed_mean = (rewards * prefixed).sum(1, keepdim=True) / n_prefixed.clamp(min=1)          # (P, 1)
    shift = (prefixed_mean - rewards.mean(1, keepdim=True)) * (n_prefixed > 0)
    return rewards + (inter_weight.double() - 1) * prefixed * shift

def credited(r, rows, G):
    """credited_rewards of the trained rollouts `rows` of r, group by group: (p, G) float64."""
    prefixed = torch.tensor([r.prefixes[i] is not None for i in rows.tolist()]).view(-1, G)
    inter = torch.tensor([r.credit[i].inter_weight for i in rows.tolist()], dtype=torch.float64).view(-1, G)
    return credited_rewards(r.rewards[rows].view(-1, G), prefixed, inter)

def distillation_loss(model, prompts, completions, advantages, coefs, n_sequences, temperature):
    """The nudge rule's distillation term for b rollouts, read in the prefix-free context (prompt ids
    without the prefix, positions from 0): -sum_i d_i A_i mean_t log pi(o_it | q, o_i<t) / n_sequences,
    with d_i = coefs[i] and A_i = advantages[i]. Returns (the loss, each rollout's share (b,) float64)."""
    embeds, targets, loss_mask = completion_batch(model, prompts, completions)
    logprobs, _ = token_logprobs(model, embeds, targets, loss_mask, temperature)                # (b, T)
    mean_logprob = logprobs.sum(1) / loss_mask.sum(1).clamp(min=1)                              # (b,)
    weight = torch.tensor(coefs, dtype=logprobs.dtype, device=logprobs.device) * advantages.to(logprobs.dtype)
    per_row = -weight * mean_logprob / n_sequences
    return per_row.sum(), per_row.detach().double()

def add_distillation(model, r, idx, loss, stats, n_sequences, args):
    """The micro-batch idx's loss plus the distillation term of its rollouts whose rule has one; each
    rollout's share goes into stats["loss"]."""
    distilled = [k for k, i in enumerate(idx) if r.credit[i].distill_coef]
    if not distilled:
        return loss
    rows = [idx[k] for k in distilled]
    with model.autocast():
        extra, per_row = distillation_loss(model, [r.problems[i]["prompt_ids"] for i in rows],
                                           [r.completions[i] for i in rows], r.advantages[rows].to(model.device),
                                           [r.credit[i].distill_coef for i in rows], n_sequences, args.temperature)
    stats["loss"][distilled] += per_row.to(stats["loss"].device)
    return loss + extra
