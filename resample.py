"""Zero-advantage resampling (rl.py --resample G'[,source=S,L=N,credit=C], off by default): LoPE's
rule (arXiv 2605.05566), with any prefix source in its slot and any credit rule of credit.py for the
resampled rollouts. Off the method's path: rl.py imports it only under --resample and calls it once
per step; docs/resampling.md states the rule in full.

Group j is all-failed when every one of its G rewards is 0 (a wrong or cut-off answer). Each such
group gets G' more rollouts, each under its own prefix from the resample's source (none: naive
resampling; lorem: L tokens of pseudo-Latin, then a boundary instruction), drawn from seeds derived
from (--seed, step, j) like the group's own rollouts. With S_j the successes among them (reward > 0
and kept), in sampling order,

    k_j = min(|S_j|, G - 1),     group_j  <-  (o_j1, ..., o_j(G - k_j), S_j1, ..., S_jk_j)

so the group keeps G rollouts and at least one failure; with no success it stays all-failed
(A = 0). Advantages are then taken on the regrouped groups. Every rollout drawn stays in the step's
record (Rollouts.trained marks the G of each group that are trained), so samples.jsonl shows them all.
"""

from dataclasses import fields

import torch

import credit
from common import all_reduce_sum, derived_seed

class Resampler:
    """The resample of one run: its prefix source (build(name) makes one, as rl.py makes its own)."""

    def __init__(self, args, build, device):
        self.args, self.source, self.device = args, build(args.resample_source), device

    def rows(self):
        """The prefix rows a resampled rollout carries."""
        return self.source.rows(self.args.resample_L)

    def regroup_failed(self, rollouts, record, step, sample_and_score):
        return regroup_failed(rollouts, self.source, record, step, self.args, self.device, sample_and_score)

def cat(a, b):
    """a's rollouts then b's: every per-rollout field joined (both scored, neither updated)."""
    for r in (a, b):                     # every rollout of the joined record carries its rule
        if r.credit is None:
            credit.assign(r, "prefixed")
        if r.trained is None:
            r.trained = torch.ones(len(r), dtype=torch.bool)
        if r.resampled is None:
            r.resampled = torch.zeros(len(r), dtype=torch.bool)
    join = lambda x, y: None if x is None or isinstance(x, dict) else torch.cat([x, y]) if torch.is_tensor(x) else x + y
    return type(a)(**{f.name: join(getattr(a, f.name), getattr(b, f.name)) for f in fields(a)})

def regroup(rollouts, extra, groups, G, G_extra):
    """rollouts: B = n G, scored; extra: G_extra scored rollouts for each group whose place (on this
    rank) is in `groups`, in that order. Group j keeps its first G - k_j rollouts and takes the first
    k_j = min(|S_j|, G - 1) successes S_j of its resample. Returns (both records joined, `trained`
    marking each group's G rollouts; the number of groups that took a success)."""
    B, joined = len(rollouts), cat(rollouts, extra)
    success = (extra.rewards > 0).tolist()
    rescued = 0
    for h, j in enumerate(groups):
        wins = [B + h * G_extra + s for s in range(G_extra) if success[h * G_extra + s]][:G - 1]
        joined.trained[(j + 1) * G - len(wins):(j + 1) * G] = False
        joined.trained[wins] = True
        rescued += bool(wins)
    return joined, rescued

def regroup_failed(rollouts, source, record, step, args, device, sample_and_score):
    """Resample this rank's all-failed groups (G' rollouts each, each under its own prefix from
    `source`), credit them by the resample's rule, and regroup; the counts, summed over ranks, go into
    `record`. sample_and_score(problems, prefixes, groups, keys, source name) -> scored Rollouts."""
    G, G_extra = args.group_size, args.resample_size
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
        extra = sample_and_score(problems, prefixes, ids, keys, source.name)
        extra.resampled = torch.ones(len(extra), dtype=torch.bool)
        credit.assign(extra, args.resample_credit)
        extra.trained = torch.zeros(len(extra), dtype=torch.bool)
        regrouped, rescued = regroup(rollouts, extra, groups, G, G_extra)
    n_extra = len(extra) if extra else 0
    successes = int((extra.rewards > 0).sum()) if extra else 0
    groups_all, rescued_all, successes_all, extra_all = (round(v) for v in all_reduce_sum(
        [len(groups), rescued, successes, n_extra], device))
    record.update(rollouts_generated=record["rollouts_generated"] + extra_all, resampled_groups=groups_all,
                  rescued_groups=rescued_all, resample_accuracy=successes_all / extra_all if extra_all else None)
    return regrouped
