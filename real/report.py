r"""SmolLM2-135M-Instruct's report on claim (a), by the protocol of docs/smollm2_protocol.md, and on
claim (c) (the VAE's latent space by domain).

Reads what runs/smollm2.sh made: DIR/tuning/results.json and DIR/final/results.json
(bench/claim_a.py's), DIR/vae/vae.json, DIR/times.tsv.
    python -m real.report --dir runs/smollm2 --choose     # the selection rule: prints the chosen setting
    python -m real.report --dir runs/smollm2              # writes runs/smollm2/report/report.md
    python -m real.report --dir runs/smollm2 --publish    # maintainers: docs/results/smollm2.md, README
"""

import argparse
import json
import math
import os

from common import atomic_write_json, atomic_write_text, run_main
from evaluate import pass_at_k
from common import UserError
from toy import publish_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the tuning settings (name, scale, warm-up steps, lr, L) in runs/smollm2.sh's order; the first is
# the standard one
SETTINGS = [("standard", 1, 10, 1e-5, 1), ("scale-0.5", 0.5, 10, 1e-5, 1), ("scale-0.25", 0.25, 10, 1e-5, 1),
            ("steps-30", 1, 30, 1e-5, 1), ("steps-50", 1, 50, 1e-5, 1), ("lr-3e-5", 1, 10, 3e-5, 1),
            ("L-2", 1, 10, 1e-5, 2)]
TIE_POINTS, BAR_POINTS = 1.0, 2.0
# prefixes on top of sampling (the protocol's section of that name): each SOURCE@T=t row of
# bench/claim_a.py against none@T=t, the same temperature and sampling noise without a prefix
ON_TOP_TEMPERATURES, ON_TOP_SOURCES = ("0.7", "1"), ("vae", "noise", "rsp")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--dir", default="runs/smollm2", help="the directory runs/smollm2.sh fills")
parser.add_argument("--choose", action="store_true", help="apply the selection rule to the tuning rows, "
                    "write DIR/tuning/choice.json and print the chosen setting's line")
parser.add_argument("--publish", action="store_true",
                    help="also write docs/results/smollm2.md and the README's headline (a maintainer's step)")


def load(path):
    if not os.path.exists(path):
        raise UserError(f"{path} is missing: run runs/smollm2.sh (it makes it) first")
    with open(path) as f:
        return json.load(f)


def rows_by(results):
    """{(label, task): {row: result}} of a claim_a results.json."""
    out = {}
    for key, r in results.items():
        label, task, row = key.split(" | ")
        out.setdefault((label, task), {})[row] = r
    return out


def mean_ci(values, scale=100):
    """(mean, half-width of the normal 95% interval of the mean) of per-problem values, times scale
    (100: shares in points): every claim (a) number (bench/claim_a.py's rows and the paired
    differences here)."""
    n, m = len(values), sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / max(n - 1, 1))
    return scale * m, scale * 1.96 * sd / math.sqrt(n)


def paired(a, b, k=1):
    """(mean, 95% half-width) in points of a - b per problem, for pass@k from the per-problem shares
    of right candidates (pass@k of a greedy row is its pass@1: one answer, k tries of it)."""
    def per_problem(r):
        n = r["candidates"]
        if n == 1 or k == 1:
            return r["per_problem_pass@1"]
        return [pass_at_k(n, round(p * n), k) for p in r["per_problem_pass@1"]]
    return mean_ci([x - y for x, y in zip(per_problem(a), per_problem(b))])


def paired_distinct(a, b):
    """(mean, 95% half-width) of a - b in distinct answers per problem (bench/claim_a.py's
    per_problem_distinct, written for every row measured since the sampling rows were added)."""
    return mean_ci([x - y for x, y in zip(a["per_problem_distinct"], b["per_problem_distinct"])], scale=1)


def choose(tuning):
    """The selection rule: the smallest worst-task gap (greedy minus vae pass@1); within TIE_POINTS
    of the best, the earliest in SETTINGS' order of preference (standard, fewest steps, scale near 1)."""
    by, costs = rows_by(tuning), {}
    for name, *_ in SETTINGS:
        tasks = [rows for (label, _), rows in by.items() if label == name]
        if tasks:
            costs[name] = max(rows["greedy"]["pass@1"][0] - rows["vae"]["pass@1"][0] for rows in tasks)
    if not costs:
        raise UserError("no tuning rows measured: run runs/smollm2.sh first")
    best = min(costs.values())
    preference = sorted(SETTINGS, key=lambda s: (s[0] != "standard", s[2], abs(1 - s[1])))
    chosen = next(s for s in preference if s[0] in costs and costs[s[0]] <= best + TIE_POINTS)
    return chosen, costs


def tuning_table(tuning, costs, chosen):
    by = rows_by(tuning)
    tasks = list(dict.fromkeys(task for _, task in by))
    lines = ["| setting | " + " | ".join(f"{t}: greedy / vae pass@1" for t in tasks) + " | worst gap |",
             "| --- |" + " --- |" * (len(tasks) + 1)]
    for name, *_ in SETTINGS:
        if name not in costs:
            continue
        cells = [f"{by[name, t]['greedy']['pass@1'][0]:.1f} / {by[name, t]['vae']['pass@1'][0]:.1f}" for t in tasks]
        mark = " (chosen)" if name == chosen[0] else ""
        lines.append(f"| {name}{mark} | " + " | ".join(cells) + f" | {costs[name]:.1f} |")
    return "\n".join(lines)


def wall_minutes(times):
    """times.tsv's (step, seconds) as wall time: the two final models run side by side, and so do the
    two temperatures of the sampling rows (sampled-T=...), so only the longer of each pair counts."""
    side_by_side = ("final-", "sampled-")
    alone = sum(int(t) for name, t in times if not name.startswith(side_by_side))
    return (alone + sum(max((int(t) for name, t in times if name.startswith(group)), default=0)
                        for group in side_by_side)) / 60


def table_order(item):
    """The full tables' order: the converted model first; the sampling rows after the others, by
    temperature, none@T=t first; otherwise the order they were measured in."""
    label, _, row = item[0].split(" | ")
    prefix, at, t = row.partition("@T=")
    return label != "converted", bool(at), float(t) if at else 0.0, prefix != "none"


def final_tables(final, k):
    lines = []
    for task in dict.fromkeys(key.split(" | ")[1] for key in final):
        lines += [f"*{task}*", "", f"| model | decoding | pass@1 | pass@{k} | distinct answers | cut off % | broken % |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for key, r in sorted(final.items(), key=table_order):
            label, t, row = key.split(" | ")
            if t == task:
                at_k = f"{r[f'pass@{k}'][0]:.1f} ± {r[f'pass@{k}'][1]:.1f}" if f"pass@{k}" in r else "–"
                lines.append(f"| {label} | {row} | {r['pass@1'][0]:.1f} ± {r['pass@1'][1]:.1f} | {at_k} | "
                             f"{r['distinct_answers']:.2f} | {r['cut_off']:.1f} | {r['broken']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def bar_table(final, label, k):
    """The bar per task (after the warm-up) and vae against T = 0.7 at equal candidates."""
    lines = [f"| task | vae − greedy pass@1 | vae − noise pass@{k} | vae − T=0.7 pass@1 | vae − T=0.7 pass@{k} | bar |",
             "| --- | --- | --- | --- | --- | --- |"]
    met_all = True
    for (lab, task), rows in rows_by(final).items():
        if lab != label:
            continue
        gap, vs_noise = paired(rows["vae"], rows["greedy"]), paired(rows["vae"], rows["noise"], k)
        met = gap[0] >= -BAR_POINTS and vs_noise[0] >= 0
        met_all &= met
        f = lambda d: f"{d[0]:+.1f} ± {d[1]:.1f}"
        lines.append(f"| {task} | {f(gap)} | {f(vs_noise)} | {f(paired(rows['vae'], rows['T=0.7']))} | "
                     f"{f(paired(rows['vae'], rows['T=0.7'], k))} | {'met' if met else 'missed'} |")
    return "\n".join(lines), met_all


def in_words(final, label, k):
    """The bar table's numbers in words, with the untrained prefixes beside the VAE's."""
    tasks = {task: rows for (lab, task), rows in rows_by(final).items() if lab == label}
    span = lambda ds: f"{min(d[0] for d in ds):+.1f} to {max(d[0] for d in ds):+.1f} points"
    gaps = [paired(rows["vae"], rows["greedy"]) for rows in tasks.values()]
    vs_noise = [paired(rows["vae"], rows["noise"], k) for rows in tasks.values()]
    vs_t = [paired(rows["vae"], rows["T=0.7"], k) for rows in tasks.values()]
    untrained = [paired(rows[src], rows["greedy"]) for rows in tasks.values()
                 for src in ("noise", "rsp", "lorem") if src in rows]
    clear = lambda ds: sum(d[0] - d[1] > 0 or d[0] + d[1] < 0 for d in ds)
    words = (f"In words: after the warm-up, greedy decoding under a VAE-prior prefix minus plain greedy is "
             f"{span(gaps)} of pass@1 over the {len(tasks)} tasks; its pass@{k} minus noise's is {span(vs_noise)} "
             f"(the 95% interval excludes 0 on {clear(vs_noise)} of {len(tasks)}), and minus T = 0.7 sampling's "
             f"{span(vs_t)} (excluding 0 on {clear(vs_t)}).")
    if untrained:
        cost_free = min(d[0] for d in untrained) >= -BAR_POINTS
        words += (f" Untrained prefixes (noise, RSP, lorem) minus plain greedy: {span(untrained)} of pass@1"
                  + (", so after the warm-up any prefix is about free at pass@1, and what sets the VAE's "
                     f"apart is the pass@{k} difference above." if cost_free else "."))
    return words


def on_top(final, label, k):
    """Prefixes on top of sampling: {(task, t, source): (pass@1, pass@k, distinct answers)}, each the
    paired difference SOURCE@T=t minus none@T=t over problems, for every pair measured for label."""
    out = {}
    for (lab, task), rows in rows_by(final).items():
        for t in ON_TOP_TEMPERATURES:
            base = rows.get(f"none@T={t}")
            for source in ON_TOP_SOURCES:
                r = rows.get(f"{source}@T={t}")
                if lab == label and base and r:
                    out[task, t, source] = (paired(r, base), paired(r, base, k), paired_distinct(r, base))
    return out


def adds_exploration(differences):
    """The protocol's test: distinct answers and pass@k both up, both 95% intervals above 0."""
    _, at_k, distinct = differences
    return at_k[0] - at_k[1] > 0 and distinct[0] - distinct[1] > 0


def on_top_tables(final, label, k):
    """One table per task: none@T=t's numbers, then each prefix's paired difference from them."""
    diffs, by, lines = on_top(final, label, k), rows_by(final), []
    f = lambda d, digits=1: f"{d[0]:+.{digits}f} ± {d[1]:.{digits}f}"
    for task in dict.fromkeys(task for task, _, _ in diffs):
        lines += [f"*{task}*", "", f"| T | prefix | pass@1 | pass@{k} | distinct answers | adds exploration |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for t in ON_TOP_TEMPERATURES:
            base = by[label, task].get(f"none@T={t}")
            if base is None:
                continue
            at_k = f"{base[f'pass@{k}'][0]:.1f} ± {base[f'pass@{k}'][1]:.1f}" if f"pass@{k}" in base else "–"
            lines.append(f"| {t} | none | {base['pass@1'][0]:.1f} ± {base['pass@1'][1]:.1f} | {at_k} | "
                         f"{base['distinct_answers']:.2f} | |")
            for source in ON_TOP_SOURCES:
                if (task, t, source) in diffs:
                    d = diffs[task, t, source]
                    lines.append(f"| {t} | {source} − none | {f(d[0])} | {f(d[1])} | {f(d[2], 2)} | "
                                 f"{'yes' if adds_exploration(d) else 'no'} |")
        lines.append("")
    return "\n".join(lines)


def on_top_in_words(final, label, k):
    """The on-top tables' numbers in words: per prefix and temperature, on how many tasks the prefix
    adds exploration; the protocol's answer (yes where it does on at least 2 of the 3 tasks)."""
    diffs = on_top(final, label, k)
    if not diffs:
        return "Not measured in this run."
    n_tasks = len({task for task, _, _ in diffs})
    span = lambda ds, digits=1: f"{min(d[0] for d in ds):+.{digits}f} to {max(d[0] for d in ds):+.{digits}f}"
    pass1, at_k, distinct = ([d[m] for d in diffs.values()] for m in range(3))
    counts = {(source, t): sum(adds_exploration(d) for (_, t2, s2), d in diffs.items() if (s2, t2) == (source, t))
              for t in ON_TOP_TEMPERATURES for source in ON_TOP_SOURCES
              if any((s2, t2) == (source, t) for _, t2, s2 in diffs)}
    each = "; ".join(f"{source} at T = {t} on {c} of {n_tasks}" for (source, t), c in counts.items())
    yes = [f"{source} at T = {t}" for (source, t), c in counts.items() if c >= 2]
    answer = (f"So on this model a prefix does add exploration on top of sampling: {', '.join(yes)} "
              f"(on at least 2 of the {n_tasks} tasks)." if yes else
              f"So on this model no prefix adds exploration on top of sampling (none does so on at least 2 of the "
              f"{n_tasks} tasks).")
    return (f"In words: against the same temperature without a prefix, a prefix changes distinct answers per "
            f"problem by {span(distinct, 2)}, pass@{k} by {span(at_k)} points and pass@1 by {span(pass1)} points "
            f"(over prefixes, temperatures and tasks). It adds exploration (distinct answers and pass@{k} "
            f"both up, both 95% intervals above 0) for {each}. {answer}")


def main():
    args = parser.parse_args()
    world = args.dir
    tuning = load(f"{world}/tuning/results.json")
    chosen, costs = choose(tuning)
    if args.choose:
        atomic_write_json(f"{world}/tuning/choice.json", {"setting": chosen, "costs": costs})
        print(" ".join(str(v) for v in chosen))
        return
    final, vae = load(f"{world}/final/results.json"), load(f"{world}/vae/vae.json")
    k = max(r["candidates"] for r in final.values())
    settings, tune = next(iter(final.values()))["settings"], next(iter(tuning.values()))["settings"]
    bars, met = bar_table(final, chosen[0], k)
    words = in_words(final, chosen[0], k)
    times = [line.split("\t") for line in open(f"{world}/times.tsv")] if os.path.exists(f"{world}/times.tsv") else []
    minutes = wall_minutes(times)
    side_by_side = ", and the sampling rows' two temperatures" if any(n.startswith("sampled-") for n, _ in times) else ""
    name, scale, steps, lr, L = chosen
    verdict = (f"**The bar is met on every task** with the {name} setting." if met else
               f"**The bar is not met on every task** with the {name} setting, the best of the tuning by the rule.")
    intro = (f"SmolLM2-135M-Instruct on three arithmetic task forms, {settings['problems']} held-out problems each, "
             f"{k} candidates per problem. {verdict}")
    warmup = f"After the warm-up (scale {scale}, {steps} steps, lr {lr:g}, L {L})"
    headline = f"""{intro} {warmup},
greedy decoding under a VAE-prior prefix against plain greedy, noise prefixes and T = 0.7 sampling
(paired differences in points, 95% intervals over problems):

{bars}

{words}"""
    readme = [intro, f"{warmup}, {words.removeprefix('In words: after the warm-up, ')}"]   # the README's lines
    sampling_words = on_top_in_words(final, name, k)
    if on_top(final, name, k):  # the sampling rows' answer, in the README's words too
        readme.append(f"Prefixes on top of sampling (problems {settings['offset']}-"
                      f"{settings['offset'] + settings['problems'] - 1}): {sampling_words.removeprefix('In words: ')}")
        headline += "\n\n" + readme[-1]
    full = f"""# Claim (a) on SmolLM2-135M-Instruct

By the protocol written before the runs, [docs/smollm2_protocol.md](../smollm2_protocol.md);
`runs/smollm2.sh` makes every number here ({minutes:.0f} minutes of wall time on the 2-core CPU
machine, the two final models side by side{side_by_side}; per step in `{world}/times.tsv`). Numbers are what came out, whatever their sign.

## Tuning (problems {tune['offset']}-{tune['offset'] + tune['problems'] - 1})

Greedy and VAE-prior pass@1 after each setting's warm-up ({tune['candidates']} candidates); the rule picks the
smallest worst-task gap, ties within {TIE_POINTS:g} point to the standard setting:

{tuning_table(tuning, costs, chosen)}

## Final (problems {settings['offset']}-{settings['offset'] + settings['problems'] - 1}, not used to choose)

{headline}

## Prefixes on top of sampling (problems {settings['offset']}-{settings['offset'] + settings['problems'] - 1}, after the chosen warm-up)

RL samples at a temperature under a prefix. Each candidate sampled at T under its own prefix
(vae prior, noise, RSP), against the same temperature without one, candidate j of a problem drawing the same
sampling noise in every row: the none row's numbers, then each prefix minus none, paired by problem
(points; distinct answers per problem; 95% intervals over problems):

{on_top_tables(final, name, k)}
{sampling_words}

Every row, on the converted model (no warm-up) and after the chosen warm-up (± is a 95% interval
over problems; a cut-off answer is wrong; broken: empty or one repeated token):

{final_tables(final, k)}
## (c) Domains in latent space

Silhouette of the math / code / qa posterior means: {vae['silhouette']:.3f} over {vae['n_pairs']} pairs
(PCA picture below). Norms: token embedding {vae['norms']['token_embedding']:.3f}, mean-pooled h
{vae['norms']['mean_pooled_h']:.3f}, decoded prefix {vae['norms']['prefix']:.3f}.

![SmolLM2 latent space](smollm2_latents.png)
"""
    atomic_write_text(f"{world}/report/report.md", full)
    print(full)
    if args.publish:
        publish_results("smollm2", full, "\n".join(readme),
                        f"bash runs/smollm2.sh; python -m real.report --dir {world} --publish",
                        pictures=[(f"{world}/vae/latents.png", "smollm2_latents.png")])
    else:
        print(f"wrote {world}/report/report.md (docs/ and README.md untouched; --publish writes them)")


if __name__ == "__main__":
    run_main(main)
