"""Zero-advantage resampling (--resample G', off by default): LoPE's rule (arXiv 2605.05566), with
any prefix source in its slot, and the credit rules that say how a resampled rollout is trained.
rl.py calls this module once per step; docs/resampling.md states the rule in full.

Group j is all-failed when every one of its G rewards is 0 (a wrong or cut-off answer). Each such
group gets G' more rollouts, each under its own prefix from --resample-source (none: naive
resampling; lorem: --resample-L tokens of pseudo-Latin, then a boundary instruction). With S_j
the successes among them (reward > 0 and kept), in sampling order,

    k_j = min(|S_j|, G - 1),     group_j  <-  (o_j1, ..., o_j(G - k_j), S_j1, ..., S_jk_j)

so the group keeps G rollouts and at least one failure; with no success it stays all-failed
(A = 0). Advantages are then taken on the regrouped groups. A credit rule is carried by each
rollout (Rollouts.train_prefixes, Rollouts.shaped), so rl.py's update compares no names:
    prefixed      the prefix is replayed in pi, pi_old and pi_ref, like any prefixed rollout
    naive         a pseudo-rollout of the unprefixed prompt (LoPE): pi and pi_ref read (q, o<t)
                  while pi_old keeps the sampling context: r = pi(o | q) / pi_old(o | p', q)
    naive-shaped  the same ratio, and LoPE's shaping: f(r) A with f(r) = r / (r + 0.1), unclipped
A new rule is one entry of CREDIT_RULES.
"""

from dataclasses import fields

import torch
import torch.distributed as dist

from common import all_reduce_mean
from guard import UserError, ranged

# name -> (is the rollout trained under the prefix it was sampled with?, LoPE's shaped term?)
CREDIT_RULES = {"prefixed": (True, False), "naive": (False, False), "naive-shaped": (False, True)}
LOREM_TOKENS = 200        # default --resample-L for lorem: the middle of LoPE's 100-300 tokens


def add_arguments(parser):
    from model import PREFIX_SOURCES
    parser.add_argument("--resample", type=ranged(int, 0), default=0,
                        help="G': extra rollouts for each group whose G rollouts all fail (0: off)")
    parser.add_argument("--resample-source", default="lorem", choices=list(PREFIX_SOURCES),
                        help="prefix of the extra rollouts (none: naive resampling)")
    parser.add_argument("--resample-L", type=ranged(int, 0), default=None,
                        help=f"prefix length of the extra rollouts (default: {LOREM_TOKENS} for lorem, "
                             "--L for the others)")
    parser.add_argument("--resample-credit", default="naive", choices=list(CREDIT_RULES),
                        help="how a resampled rollout is trained: with its prefix replayed (prefixed) "
                             "or as a rollout of the unprefixed prompt (naive, naive-shaped)")


def check_args(args, parser):
    """Refuse resample flags that do nothing; set --resample-L to the length used (it goes to
    args.json). Returns the prefix sources the resample draws from, as (flag, name)."""
    changed = [k for k in ("resample_source", "resample_L", "resample_credit")
               if getattr(args, k) != parser.get_default(k)]
    if not args.resample:
        if changed:
            raise UserError(f"--{changed[0].replace('_', '-')} has no effect without --resample G' (the "
                            "number of extra rollouts for an all-failed group)")
        return []
    if args.resample_L is None:
        args.resample_L = {"none": 0, "lorem": LOREM_TOKENS}.get(args.resample_source, args.L)
    if (args.resample_source == "none") != (args.resample_L == 0):
        raise UserError("--resample-source none takes no prefix (leave --resample-L out), and any other "
                        "source needs --resample-L >= 1")
    return [("--resample-source", args.resample_source)]


def cat(a, b):
    """a's rollouts then b's: every per-rollout field joined (both scored, neither updated)."""
    join = lambda x, y: None if x is None else torch.cat([x, y]) if torch.is_tensor(x) else x + y
    return type(a)(**{f.name: join(getattr(a, f.name), getattr(b, f.name)) for f in fields(a)})


def regroup(rollouts, extra, groups, G, G_extra):
    """rollouts: B = n G, scored; extra: G_extra scored rollouts for each group in `groups`, in that
    order. Group j keeps its first G - k_j rollouts and takes the first k_j = min(|S_j|, G - 1)
    successes S_j of its resample in the last k_j places. Returns (the regrouped record of B
    rollouts, the number of groups that took a success)."""
    B = len(rollouts)
    success = ((extra.rewards > 0) & extra.keep).tolist()
    order, rescued = list(range(B)), 0
    for h, j in enumerate(groups):
        wins = [B + h * G_extra + s for s in range(G_extra) if success[h * G_extra + s]][:G - 1]
        order[(j + 1) * G - len(wins):(j + 1) * G] = wins
        rescued += bool(wins)
    return cat(rollouts, extra).select(order), rescued


def regroup_failed(rollouts, source, record, args, generators, device, sample_and_score):
    """Resample this rank's all-failed groups (G' rollouts each, each under its own prefix from
    `source`), credit them by --resample-credit, and regroup; the counts, summed over ranks, go into
    `record`. sample_and_score(problems, prefixes, source name) -> scored Rollouts."""
    G, G_extra = args.group_size, args.resample
    groups = (rollouts.rewards.view(-1, G) == 0).all(1).nonzero()[:, 0].tolist()
    regrouped, rescued, extra = rollouts, 0, None
    if groups:
        problems = [rollouts.problems[j * G] for j in groups for _ in range(G_extra)]
        drawn = source.sample(len(problems), args.resample_L, generators["prefix"])   # None: no prefix
        extra = sample_and_score(problems, [None] * len(problems) if drawn is None else list(drawn), source.name)
        with_prefix, shaped = CREDIT_RULES[args.resample_credit]
        extra.train_prefixes = extra.prefixes if with_prefix else [None] * len(extra)
        extra.shaped = torch.full((len(extra),), shaped)
        extra.resampled = torch.ones(len(extra), dtype=torch.bool)
        regrouped, rescued = regroup(rollouts, extra, groups, G, G_extra)
    n_extra = len(extra) if extra else 0
    successes = int(((extra.rewards > 0) & extra.keep).sum()) if extra else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    sums = all_reduce_mean([len(groups), rescued, successes, n_extra], device)     # means over ranks
    groups_all, rescued_all, successes_all, extra_all = (round(v * world) for v in sums)
    record.update(rollouts_generated=record["rollouts_generated"] + extra_all, resampled_groups=groups_all,
                  rescued_groups=rescued_all, resample_accuracy=successes_all / extra_all if extra_all else None)
    return regrouped
