"""Zero-advantage resampling (--resample G', off by default): LoPE's rule (arXiv 2605.05566), with
any prefix source in its slot; --resample-credit picks how a resampled rollout is trained, from the
credit rules every prefixed rollout uses (credit.py). rl.py calls this module once per step;
docs/resampling.md states the rule in full.

Group j is all-failed when every one of its G rewards is 0 (a wrong or cut-off answer). Each such
group gets G' more rollouts, each under its own prefix from --resample-source (none: naive
resampling; lorem: --resample-L tokens of pseudo-Latin, then a boundary instruction), drawn from
seeds derived from (--seed, step, j) like the group's own rollouts. With S_j the successes among
them (reward > 0 and kept), in sampling order,

    k_j = min(|S_j|, G - 1),     group_j  <-  (o_j1, ..., o_j(G - k_j), S_j1, ..., S_jk_j)

so the group keeps G rollouts and at least one failure; with no success it stays all-failed
(A = 0). Advantages are then taken on the regrouped groups. Every rollout drawn stays in the step's
record (Rollouts.trained marks the G of each group that are trained), so samples.jsonl shows them all.
"""

from dataclasses import fields

import torch

from common import all_reduce_sum, derived_seed
from credit import CREDIT_RULES
from guard import UserError, ranged, refuse_unused

LOREM_TOKENS = 200        # default --resample-L for lorem: the middle of LoPE's 100-300 tokens


def add_arguments(parser):
    from model import PREFIX_SOURCES
    parser.add_argument("--resample", type=ranged(int, 0), default=0,
                        help="G': extra rollouts for each group whose G rollouts all fail (0: off)")
    parser.add_argument("--resample-source", default="lorem", choices=PREFIX_SOURCES,
                        help="prefix of the extra rollouts (none: naive resampling)")
    parser.add_argument("--resample-L", type=ranged(int, 0), default=None,
                        help=f"prefix length of the extra rollouts (default: {LOREM_TOKENS} for lorem, "
                             "--L for the others)")
    parser.add_argument("--resample-credit", default="naive", choices=CREDIT_RULES,
                        help="how a resampled rollout is trained (credit.py)")


def check_args(args, parser):
    """Refuse resample flags that do nothing; set --resample-L to the length used (it goes to
    args.json). Returns the prefix sources the resample draws from, as (flag, name)."""
    if not args.resample:
        refuse_unused(args, parser, dict.fromkeys(("resample_source", "resample_L", "resample_credit"),
                                                  "--resample G', the extra rollouts of an all-failed group, is 0"))
        return []
    if args.resample_L is None:
        args.resample_L = {"none": 0, "lorem": LOREM_TOKENS}.get(args.resample_source, args.L)
    if (args.resample_source == "none") != (args.resample_L == 0):
        raise UserError("--resample-source none takes no prefix (leave --resample-L out), and any other "
                        "source needs --resample-L >= 1")
    return [("--resample-source", args.resample_source)] if args.resample_source != "none" else []


def cat(a, b):
    """a's rollouts then b's: every per-rollout field joined (both scored, neither updated: the update's
    sums start again at zero)."""
    join = lambda x, y: None if x is None or isinstance(x, dict) else torch.cat([x, y]) if torch.is_tensor(x) else x + y
    return type(a)(**{f.name: join(getattr(a, f.name), getattr(b, f.name)) for f in fields(a)})


def regroup(rollouts, extra, groups, G, G_extra):
    """rollouts: B = n G, scored; extra: G_extra scored rollouts for each group whose place (on this
    rank) is in `groups`, in that order. Group j keeps its first G - k_j rollouts and takes the first
    k_j = min(|S_j|, G - 1) successes S_j of its resample. Returns (both records joined, `trained`
    marking each group's G rollouts; the number of groups that took a success)."""
    B, joined = len(rollouts), cat(rollouts, extra)
    success = ((extra.rewards > 0) & extra.keep).tolist()
    rescued = 0
    for h, j in enumerate(groups):
        wins = [B + h * G_extra + s for s in range(G_extra) if success[h * G_extra + s]][:G - 1]
        joined.trained[(j + 1) * G - len(wins):(j + 1) * G] = False
        joined.trained[wins] = True
        rescued += bool(wins)
    return joined, rescued


def regroup_failed(rollouts, source, record, step, args, device, sample_and_score):
    """Resample this rank's all-failed groups (G' rollouts each, each under its own prefix from
    `source`), credit them by --resample-credit, and regroup; the counts, summed over ranks, go into
    `record`. sample_and_score(problems, prefixes, groups, keys, rule, source name) -> scored Rollouts."""
    G, G_extra = args.group_size, args.resample
    groups = (rollouts.rewards.view(-1, G) == 0).all(1).nonzero()[:, 0].tolist()
    regrouped, rescued, extra = rollouts, 0, None
    if groups:
        problems, prefixes, ids, keys = [], [], [], []
        for j in groups:
            group = int(rollouts.group[j * G])                   # its place in the step, over all ranks
            drawn = source.sample(G_extra, args.resample_L,
                                  torch.Generator().manual_seed(derived_seed(args.seed, step, group, "resample")))
            prefixes += [None] * G_extra if drawn is None else list(drawn)
            problems += [rollouts.problems[j * G]] * G_extra
            ids += [group] * G_extra
            keys += [derived_seed(args.seed, step, group, "resample", k) for k in range(G_extra)]
        extra = sample_and_score(problems, prefixes, ids, keys, CREDIT_RULES[args.resample_credit], source.name)
        extra.resampled = torch.ones(len(extra), dtype=torch.bool)
        extra.trained = torch.zeros(len(extra), dtype=torch.bool)
        regrouped, rescued = regroup(rollouts, extra, groups, G, G_extra)
    n_extra = len(extra) if extra else 0
    successes = int(((extra.rewards > 0) & extra.keep).sum()) if extra else 0
    groups_all, rescued_all, successes_all, extra_all = (round(v) for v in all_reduce_sum(
        [len(groups), rescued, successes, n_extra], device))
    record.update(rollouts_generated=record["rollouts_generated"] + extra_all, resampled_groups=groups_all,
                  rescued_groups=rescued_all, resample_accuracy=successes_all / extra_all if extra_all else None)
    return regrouped
