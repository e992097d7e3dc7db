r"""Premise checks: does a toy world meet the paper's premise (DESIGN.md, section 1.7)? Measured
before any RL, the same way in every world.

    python -m toy.premise --world runs/toy_premise                   # -> runs/toy_premise/premise/
    python -m toy.premise --world runs/toy                           # the first world -> runs/toy/premise/

On --problems held-out math problems (data/math_test.jsonl, as balanced between the families of
toy.task.math_family as the file allows), with the world's base model:

1. Strategy shares (toy.task.detect_strategy) under greedy decoding and under temperature-1
   sampling (--samples per problem): is the strategy chosen confidently, and does sampling change it?
   And under greedy decoding after the one-token preamble that cues each strategy in the
   premise corpus (toy.task.make_preamble, e.g. "-47+38=?"): does context move the choice?
2. Success of each strategy on each family. "forced": the model is given the opening of the
   strategy's trace (the first line of toy.task.solve up to and including its first "=", e.g.
   "38=" for round) and completes it greedily, so it chooses nothing and only executes the
   strategy. "sampled": success among the temperature-1 samples that chose the strategy (n given).
3. Each prefix source after its warm-up. The VAE is trained once (train_vae.py on the world's
   vae_{math,code,qa}.jsonl) and copied once per prefix form (vae.json "prefix_form": the form
   changes no weight). Each of noise, random_decoder and vae in each form is warmed up by
   sft_warmup.py (L = 1, --warmup-steps steps on math_train.jsonl). Then, per problem, --latents
   prefixes (L = 1, from make_prefix_source; the vae from its prior and from its math region),
   one greedy and one temperature-1 completion each: strategy shares, pass@1 per family, pass@k
   over the latents, the share of problems on which some latent leaves the dominant strategy,
   and the share of completions whose strategy differs from the warmed model's own greedy one.
4. Prefix geometry: mean pairwise cosine of 256 prefixes per source (diagnostics.prefix_health; noise
   is about 0), their cosine to the VAE's corpus mean h, and their norm against a token's.
5. The premise at the rollout temperature: at each of --temperatures, the forced strategies
   completed at that temperature (a minority strategy chosen by sampling is carried out by sampling
   too) and how often sampling leaves the dominant strategy; the rollout temperature is the
   highest that keeps both halves of the premise (temperature_checks says the rule).

Writes <out>/premise.json and <out>/premise.md (default --out: <world>/premise); the VAE and the
warm-ups live under <out>/ too and are reused by a rerun. About 2 minutes per world on one core
(123 s for runs/toy_premise from scratch).
"""

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import time
from collections import Counter

import torch

import sft_warmup
import train_vae
from common import atomic_write_json, atomic_write_text, run_main
from diagnostics import prefix_health
from common import SEED, UserError, ranged, read_jsonl
from data import format_prompt
from model import PREFIX_FORMS, generate, load_policy, make_prefix_source
from toy import Provenance, provenance
from toy.task import MATH_FAMILIES, STRATEGIES, detect_strategy, grade, make_preamble, math_family, solve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATH = STRATEGIES["math"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # World and output
    p.add_argument("--world", required=True, help="a world from toy.build_world (base/, data/)")
    p.add_argument("--out", default=None, help="default: <world>/premise")
    # Measurement
    p.add_argument("--problems", type=ranged(int, 1), default=200, help="held-out math problems")
    p.add_argument("--samples", type=ranged(int, 1), default=8, help="temperature-1 samples per problem")
    p.add_argument("--latents", type=ranged(int, 1), default=4, help="prefixes per problem and source")
    p.add_argument("--max-new-tokens", type=ranged(int, 1), default=64)
    p.add_argument("--forms", default=",".join(PREFIX_FORMS), help="VAE prefix forms to compare")
    p.add_argument("--temperatures", default="1.0,0.7,0.5,0.3",
                   help="rollout temperatures at which the premise is measured (section 5)")
    # The stages the checks run (the project's own scripts)
    p.add_argument("--vae-steps", type=ranged(int, 1), default=2000, help="train_vae.py --steps")
    p.add_argument("--warmup-steps", type=ranged(int, 1), default=10, help="sft_warmup.py --steps")
    p.add_argument("--warmup-lr", type=ranged(float, above=0), default=3e-5, help="sft_warmup.py --lr (runs/toy.sh's)")
    p.add_argument("--seed", type=SEED, default=0)
    args = p.parse_args(argv)
    args.out = args.out or os.path.join(args.world, "premise")
    args.forms = [f for f in args.forms.split(",") if f]
    args.temperatures = [float(t) for t in args.temperatures.split(",") if t]
    for form in args.forms:
        if form not in PREFIX_FORMS:
            raise UserError(f"--forms: unknown prefix form {form!r}; choose from {', '.join(PREFIX_FORMS)}")
    for name in ("base/config.json", "data/math_test.jsonl", "data/math_train.jsonl", "data/vae_math.jsonl"):
        if not os.path.exists(os.path.join(args.world, name)):
            raise UserError(f"--world {args.world}: no {name}; build it with python -m toy.build_world")
    if min(args.problems, args.samples, args.latents) < 1:
        raise UserError("--problems, --samples and --latents must be at least 1")
    return args

# -----------------------------------------------------------------------------
# Problems and completions


def pick_problems(world, n, seed):
    """Up to n/2 problems of each family from math_test (the rest from the other family when
    one is short), each row annotated with its family."""
    rows = read_jsonl(os.path.join(world, "data", "math_test.jsonl"))
    random.Random(seed).shuffle(rows)
    by_family = {f: [dict(r, family=math_family(r)) for r in rows if math_family(r) == f] for f in MATH_FAMILIES}
    take = {f: min(len(by_family[f]), n // len(MATH_FAMILIES)) for f in MATH_FAMILIES}
    for f in MATH_FAMILIES:   # fill up from whichever family has rows left
        take[f] += min(len(by_family[f]) - take[f], n - sum(take.values()))
    return [r for f in MATH_FAMILIES for r in by_family[f][:take[f]]]


def opening(row, strategy):
    """The first line of the strategy's trace up to and including its first "=": what the
    strategy does first, none of what it computes ("7+8=", "38=", "47+30=")."""
    first = solve(row, strategy).split("\n", 1)[0]
    return first[:first.index("=") + 1]


def complete(model, tokenizer, prompts, args, temperature, prefixes=None, generator=None):
    """Decoded completions of prompt texts (each prefix (L, d) goes before its prompt)."""
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    texts = []
    for i in range(0, len(ids), 512):
        chunk = None if prefixes is None else list(prefixes[i:i + 512])
        out = generate(model, ids[i:i + 512], chunk, max_new_tokens=args.max_new_tokens,
                       temperature=temperature, stop_tokens=[eos], generator=generator)
        texts += [tokenizer.decode([t for t in row if t != eos]) for row in out.token_lists()]
    return texts


def shares(strategies):
    """Fraction of completions per strategy; "none": no strategy's opening line."""
    counts = Counter(s or "none" for s in strategies)
    return {s: counts[s] / max(1, len(strategies)) for s in MATH + ("none",)}


def rate(values):
    return sum(values) / len(values) if values else None


def per_family(rows, correct):
    """pass@1 overall and per family; rows and correct side by side."""
    out = {"all": rate(correct)}
    for f in MATH_FAMILIES:
        out[f] = rate([c for r, c in zip(rows, correct) if r["family"] == f])
    return out

# -----------------------------------------------------------------------------
# 1-2. The base model


@torch.no_grad()
def base_checks(args, rows):
    """Sections 1 and 2: the base model's strategy shares and each strategy's success."""
    model, tokenizer = load_policy(os.path.join(args.world, "base"))
    model.eval()
    prompts = [format_prompt(r["problem"], "plain") for r in rows]
    greedy = complete(model, tokenizer, prompts, args, 0.0)
    g = torch.Generator().manual_seed(args.seed)
    repeated = [r for r in rows for _ in range(args.samples)]       # a problem's samples side by side
    sampled = complete(model, tokenizer, [p for p in prompts for _ in range(args.samples)], args, 1.0, generator=g)
    sampled_strategy = [detect_strategy(t) for t in sampled]
    sampled_correct = [grade(t, r["answer"]) for t, r in zip(sampled, repeated)]
    greedy_strategy = [detect_strategy(t) for t in greedy]
    # how often does sampling leave the problem's greedy strategy?
    leaves = [s != greedy_strategy[i // args.samples] for i, s in enumerate(sampled_strategy)]
    report = {
        "n_problems": len(rows), "families": dict(Counter(r["family"] for r in rows)),
        "greedy_shares": shares(greedy_strategy), "sampled_shares": shares(sampled_strategy),
        "sampled_leaves_greedy_strategy": rate(leaves),
        "greedy_pass@1": per_family(rows, [grade(t, r["answer"]) for t, r in zip(greedy, rows)]),
        "sampled_pass@1": per_family(repeated, sampled_correct),
        "examples": [{"problem": r["problem"], "family": r["family"], "greedy": t}
                     for r, t in list(zip(rows, greedy))[::max(1, len(rows) // 4)][:4]],
    }
    # context in text: the one-token preamble that cues each strategy in the premise corpus
    # (toy.task.make_preamble) right before the problem; greedy decoding
    report["preamble_shares"] = {}
    for s in MATH:
        texts = complete(model, tokenizer, [make_preamble(s) + p for p in prompts], args, 0.0)
        report["preamble_shares"][s] = shares([detect_strategy(t) for t in texts])
    # each strategy on each family, forced to open with it
    forced, success = {}, {}
    for s in MATH:
        heads = [opening(r, s) for r in rows]
        texts = [h + t for h, t in zip(heads, complete(model, tokenizer, [p + h for p, h in zip(prompts, heads)],
                                                         args, 0.0))]
        correct = [grade(t, r["answer"]) for t, r in zip(texts, rows)]
        forced[s] = per_family(rows, correct)
        forced[s]["followed"] = rate([detect_strategy(t) == s for t in texts])
        success[s] = {}
        for f in MATH_FAMILIES + ("all",):
            picked = [c for r, st, c in zip(repeated, sampled_strategy, sampled_correct)
                      if st == s and f in ("all", r["family"])]
            success[s][f] = {"rate": rate(picked), "n": len(picked)}
    # the dominant strategy, and (comparable with the prefix rows) the share of problems on which
    # one of the first --latents samples leaves it
    dominant = max(MATH, key=lambda s: report["sampled_shares"][s])
    k = min(args.samples, args.latents)
    report["dominant"] = dominant
    report["sampled_problems_leaving_dominant"] = {"k": k, "rate": rate(
        [any(s != dominant for s in sampled_strategy[i * args.samples:i * args.samples + k])
         for i in range(len(rows))])}
    report["forced_success"] = forced
    report["sampled_success"] = success
    return report

# -----------------------------------------------------------------------------
# 5. The premise at the rollout temperature

# A rollout temperature serves the premise when a minority strategy, once chosen, is carried out
# well enough to be rewarded (forced round and forced split, completed at that temperature, solve
# at least EXECUTES of ripple problems) while token sampling still rarely changes the strategy
# (fewer than LEAVES of the problems have one of --latents samples leave the dominant one).
EXECUTES, LEAVES = 0.30, 0.10


@torch.no_grad()
def temperature_checks(args, rows, dominant):
    """Section 5: at each --temperatures T, forced strategies completed at T (their success per
    family) and the T samples' strategies (how often one of --latents samples leaves the dominant
    one); then the rollout temperature the rule above picks: the highest T that meets both."""
    model, tokenizer = load_policy(os.path.join(args.world, "base"))
    model.eval()
    prompts = [format_prompt(r["problem"], "plain") for r in rows]
    k, report = args.latents, {}
    for T in args.temperatures:
        g = torch.Generator().manual_seed(args.seed)
        forced = {}
        for s in MATH:
            heads = [opening(r, s) for r in rows]
            texts = complete(model, tokenizer, [p + h for p, h in zip(prompts, heads)], args, T, generator=g)
            forced[s] = per_family(rows, [grade(h + t, r["answer"]) for h, t, r in zip(heads, texts, rows)])
        sampled = complete(model, tokenizer, [p for p in prompts for _ in range(k)], args, T, generator=g)
        strategies = [detect_strategy(t) for t in sampled]
        report[str(T)] = {
            "forced_success": forced, "sampled_shares": shares(strategies),
            "problems_leaving_dominant": rate([any(st != dominant for st in strategies[i * k:(i + 1) * k])
                                               for i in range(len(rows))]),
            "samples_leaving_dominant": rate([st != dominant for st in strategies])}
    meets = [T for T in args.temperatures
             if min(report[str(T)]["forced_success"][s]["ripple"] for s in MATH if s != dominant) >= EXECUTES
             and report[str(T)]["problems_leaving_dominant"] < LEAVES]
    return {"by_temperature": report, "rule": f"the highest T at which forced round and split solve >= "
            f"{EXECUTES:.0%} of ripple problems and < {LEAVES:.0%} of problems have one of {k} T samples leave "
            f"{dominant}; none meeting it: the lowest T", "rollout_temperature": max(meets, default=min(args.temperatures))}

# -----------------------------------------------------------------------------
# 3-4. Prefix sources after their warm-ups


def run_stage(script, argv, done, log):
    """Run one of the project's stage scripts (its main(argv), in this process: importing torch
    once instead of once per stage) unless its output `done` exists; its output goes to `log`."""
    if os.path.exists(done):
        return
    name = f"{script.__name__}.py"
    print(f"== {name} {' '.join(argv[:2])} ... -> {os.path.dirname(done)}", flush=True)
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f), \
            torch.enable_grad():           # the stages train, whatever the caller's grad mode
        try:
            script.main(argv)
        except UserError as e:
            raise UserError(f"{name}: {e} (its output is in {log})") from None
        except SystemExit as e:            # a refused flag: its one line went to the log
            raise UserError(f"{name} stopped (exit {e.code}); its output is in {log}") from None


def prepare_sources(args):
    """Train the VAE, copy it per form, warm up every source. Returns {name: (warmed model dir,
    source, vae dir or None)}."""
    os.makedirs(args.out, exist_ok=True)
    data, base = os.path.join(args.world, "data"), os.path.join(args.world, "base")
    vae = os.path.join(args.out, "vae")
    corpus = ",".join(f"{d}={data}/vae_{d}.jsonl" for d in ("math", "code", "qa"))
    run_stage(train_vae, ["--model", base, "--out", vae, "--steps", str(args.vae_steps),
                          "--seed", str(args.seed), "--data", corpus],
              os.path.join(vae, "vae.json"), os.path.join(args.out, "vae.log"))
    sources = {"noise": ("noise", None), "random_decoder": ("random_decoder", None)}
    for form in args.forms:
        copy = os.path.join(args.out, f"vae_{form}")
        if not os.path.exists(os.path.join(copy, "vae.json")):
            os.makedirs(copy, exist_ok=True)
            shutil.copy(os.path.join(vae, "vae.safetensors"), copy)
            with open(os.path.join(vae, "vae.json")) as f:
                meta = json.load(f)
            atomic_write_json(os.path.join(copy, "vae.json"), dict(meta, prefix_form=form))
        sources[f"vae_{form}"] = ("vae", copy)
    warmed = {}
    for name, (source, vae_dir) in sources.items():
        out = os.path.join(args.out, "warmup", name)
        argv = ["--model", base, "--prefix-source", source, "--out", out,
                "--data", f"{data}/math_train.jsonl", "--lr", str(args.warmup_lr),
                "--steps", str(args.warmup_steps), "--seed", str(args.seed)]
        run_stage(sft_warmup, argv + (["--vae", vae_dir] if vae_dir else []),
                  os.path.join(out, "model", "config.json"),
                  os.path.join(args.out, f"warmup_{name}.log"))
        warmed[name] = (os.path.join(out, "model"), source, vae_dir)
    return warmed


@torch.no_grad()
def prefix_checks(args, rows, dominant):
    """Sections 3 and 4, one row per source (and per region of a VAE): {label: metrics}."""
    report = {}
    prompts = [format_prompt(r["problem"], "plain") for r in rows]
    repeated = [r for r in rows for _ in range(args.latents)]
    for name, (model_dir, source_name, vae_dir) in prepare_sources(args).items():
        model, tokenizer = load_policy(model_dir)
        model.eval()
        own = [detect_strategy(t) for t in complete(model, tokenizer, prompts, args, 0.0)]
        for region in ([None, "math"] if source_name == "vae" else [None]):
            label = name + (f" ({region} region)" if region else "")
            t0 = time.time()
            source = make_prefix_source(source_name, model.embed_tokens.weight, vae=vae_dir, region=region, seed=args.seed)
            g = torch.Generator().manual_seed(args.seed)
            prefixes = source.sample(len(repeated), 1, generator=g)                 # (n * latents, 1, d)
            row = {"source": source_name, "form": vae_dir and os.path.basename(vae_dir)[4:],
                   "region": region, "model": model_dir}
            for mode, temperature in (("greedy", 0.0), ("sampled", 1.0)):
                texts = complete(model, tokenizer, [p for p in prompts for _ in range(args.latents)], args,
                                 temperature, prefixes, torch.Generator().manual_seed(args.seed + 1))
                strategies = [detect_strategy(t) for t in texts]
                correct = [grade(t, r["answer"]) for t, r in zip(texts, repeated)]
                k = args.latents
                row[mode] = {
                    "shares": shares(strategies),
                    "pass@1": per_family(repeated, correct),
                    f"pass@{k}": per_family(rows, [max(correct[i * k:(i + 1) * k]) for i in range(len(rows))]),
                    "problems_leaving_dominant": rate([any(s != dominant for s in strategies[i * k:(i + 1) * k])
                                                       for i in range(len(rows))]),
                    "changed_vs_no_prefix": rate([s != own[i // k] for i, s in enumerate(strategies)]),
                }
            health, _ = prefix_health(source, n_prefixes=256, seed=args.seed)
            row.update(health, prefix_norm=prefixes.norm(dim=-1).mean().item(), token_norm=source.token_norm,
                       no_prefix_shares=shares(own), seconds=round(time.time() - t0, 1))
            report[label] = row
            print(f"{label}: greedy shares {fmt_shares(row['greedy']['shares'])}, "
                  f"pairwise cos {row['prefix_pairwise_cos']:.3f}", flush=True)
    return report

# -----------------------------------------------------------------------------
# Report


def pct(x):
    return "–" if x is None else f"{100 * x:.1f}"


def fmt_shares(s):
    return " / ".join(f"{100 * s[k]:.0f}" for k in MATH + ("none",))


def table_row(*cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(report):
    b, k, dominant = report["base"], report["args"]["latents"], report["dominant"]
    families = ", ".join(f"{n} {f}" for f, n in b["families"].items())
    lines = [f"# Premise checks: {report['world']}", "",
             f"`{report['command']}` ({report['seconds']:.0f} s). {b['n_problems']} held-out math "
             f"problems ({families}); shares are column / round / split / none, in %.", "",
             *([f"Provenance: {Provenance(**report['provenance'])}.", ""] if "provenance" in report else []),
             "## 1. Strategy shares of the base model", "",
             table_row("decoding", "column / round / split / none", "pass@1 all", "plain", "ripple"),
             table_row(*["---"] * 5)]
    samples = f"T=1 ({report['args']['samples']} per problem)"
    for label, mode in (("greedy", "greedy"), (samples, "sampled")):
        p = b[f"{mode}_pass@1"]
        lines.append(table_row(label, fmt_shares(b[f"{mode}_shares"]), pct(p["all"]), pct(p["plain"]),
                               pct(p["ripple"])))
    for s in MATH:
        lines.append(table_row(f"greedy after the {s} preamble {make_preamble(s)!r}", fmt_shares(b["preamble_shares"][s]), "", "", ""))
    leave = b["sampled_problems_leaving_dominant"]
    lines += ["", f"T=1 samples whose strategy differs from the problem's greedy one: "
              f"{pct(b['sampled_leaves_greedy_strategy'])}%. Problems on which one of {leave['k']} T=1 "
              f"samples leaves the dominant strategy ({dominant}): {pct(leave['rate'])}%.", "",
              "## 2. Success of each strategy on each family (%)", "",
              table_row("strategy", "forced: plain", "forced: ripple", "forced: follows",
                        "sampled: plain (n)", "sampled: ripple (n)"),
              table_row(*["---"] * 6)]
    for s in MATH:
        fo, sa = b["forced_success"][s], b["sampled_success"][s]
        lines.append(table_row(s, pct(fo["plain"]), pct(fo["ripple"]), pct(fo["followed"]),
                               f"{pct(sa['plain']['rate'])} ({sa['plain']['n']})",
                               f"{pct(sa['ripple']['rate'])} ({sa['ripple']['n']})"))
    lines += ["", "forced: greedy completion after the strategy's opening; sampled: among the T=1 "
              "samples that chose the strategy.", "",
              f"## 3. Strategy shares under each prefix source after its warm-up (L = 1, {k} latents "
              "per problem, one completion each)", "",
              table_row("source", "decoding", "column / round / split / none", "changed vs no prefix",
                        f"problems leaving {dominant}", "pass@1 plain", "pass@1 ripple",
                        f"pass@{k} plain", f"pass@{k} ripple"),
              table_row(*["---"] * 9)]
    for label, row in report["prefixes"].items():
        lines.append(table_row(label, "no prefix (warmed model)", fmt_shares(row["no_prefix_shares"]),
                               *[""] * 6))
        for mode in ("greedy", "sampled"):
            m = row[mode]
            lines.append(table_row(label, f"{mode} per latent", fmt_shares(m["shares"]),
                                   pct(m["changed_vs_no_prefix"]), pct(m["problems_leaving_dominant"]),
                                   pct(m["pass@1"]["plain"]), pct(m["pass@1"]["ripple"]),
                                   pct(m[f"pass@{k}"]["plain"]), pct(m[f"pass@{k}"]["ripple"])))
    lines += ["", "## 4. Prefix geometry (256 prefixes per source)", "",
              table_row("source", "mean pairwise cosine", "cosine to the VAE's corpus mean h",
                        "prefix norm", "token norm"),
              table_row(*["---"] * 5)]
    for label, row in report["prefixes"].items():
        to_mean = row.get("prefix_cos_to_corpus_mean")
        lines.append(table_row(label, f"{row['prefix_pairwise_cos']:.3f}",
                               "–" if to_mean is None else f"{to_mean:.3f}",
                               f"{row['prefix_norm']:.3f}", f"{row['token_norm']:.3f}"))
    t = report["temperatures"]
    lines += ["", f"## 5. The premise at the rollout temperature ({k} samples per problem)", "",
              table_row("T", "forced round: plain / ripple", "forced split: plain / ripple",
                        "forced column: plain / ripple", "T samples: column / round / split / none",
                        f"problems leaving {dominant}", "samples leaving it"),
              table_row(*["---"] * 7)]
    for T, row in t["by_temperature"].items():
        f = row["forced_success"]
        lines.append(table_row(T, *[f"{pct(f[s]['plain'])} / {pct(f[s]['ripple'])}" for s in ("round", "split", "column")],
                               fmt_shares(row["sampled_shares"]), pct(row["problems_leaving_dominant"]),
                               pct(row["samples_leaving_dominant"])))
    lines += ["", f"Rule: {t['rule']}. Rollout temperature: **{t['rollout_temperature']}**."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    t0 = time.time()
    torch.manual_seed(args.seed)
    rows = pick_problems(args.world, args.problems, args.seed)
    base = base_checks(args, rows)
    dominant = base["dominant"]
    print(f"base: greedy {fmt_shares(base['greedy_shares'])}, T=1 {fmt_shares(base['sampled_shares'])}", flush=True)
    temperatures = temperature_checks(args, rows, dominant)
    print(f"rollout temperature: {temperatures['rollout_temperature']}", flush=True)
    prefixes = prefix_checks(args, rows, dominant)
    report = {"world": args.world, "command": "python -m toy.premise " + " ".join(argv),
              "provenance": provenance(os.path.join(args.world, "base"))._asdict(),
              "args": vars(args), "dominant": dominant, "base": base, "prefixes": prefixes,
              "temperatures": temperatures, "seconds": round(time.time() - t0, 1)}
    atomic_write_json(os.path.join(args.out, "premise.json"), report)
    atomic_write_text(os.path.join(args.out, "premise.md"), markdown(report))
    print(f"wrote {args.out}/premise.json and premise.md ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    run_main(main)
