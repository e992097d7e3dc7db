r"""Benchmarks: pass@1 and unbiased pass@k, with and without the palette, per prefix source.

Each problem gets --n candidates, decoded in one of three modes:
    sample          token sampling at --temperature, no prefix
    greedy-latent   each candidate greedy under its OWN latent: diversity from the prefix alone
                    (the paper's Fig. 1: GSM8K pass@32 52.9% -> 85.3% with one noise token)
    latent-sample   each candidate under its own latent AND token sampling at --temperature
A candidate's prefix comes from --prefix-source: vae (prior, or --region), noise, random_decoder,
or lorem (--L tokens of fresh pseudo-Latin text, then a boundary instruction: LoPE's text
perturbation in the same slot, L + b embedding rows that count against the context).
pass@1 is the mean accuracy over all candidates; pass@k is the unbiased estimator of Chen et al.
(2021), 1 - C(n - c, k) / C(n, k) for c correct of n, averaged over problems. A candidate cut off
at --max-new-tokens (no eos) counts as wrong, as in rl.py's default. Beside them, the mean number
of distinct answers the n candidates of a problem state (data.answer_of; a cut-off candidate
states none): diversity, whether or not it is right. The latents and the sampling noise of a
problem's candidates come from seeds derived from (--seed, problem id), so a candidate is the same
whatever the batch, the number of ranks or a resume; --limit takes the same problems for every --seed.

Outputs in --out (several invocations with different --config-name build one table):
    <benchmark>.jsonl  one line per (configuration, problem): every completion and its verdict;
                       written as each batch finishes, so a killed run resumes: problems already
                       there for the same configuration (and settings) are reused, not rerun
    results.json       {"configs": {name: {"settings", "k", "benchmarks": {b: {"n_problems",
                       "pass@1", "pass@k", ...}}}}}, merged with the configurations already there
    results.md         per k, a table in the paper's layout: rows = configurations, columns =
                       benchmarks and their average (in %)

Toy world:
    python evaluate.py --model runs/toy/sft/model --benchmarks runs/toy/data/math_test.jsonl \
        --mode sample --n 8 --k 1,8 --max-new-tokens 96 --out runs/toy/eval
    python evaluate.py --model runs/toy/sft/model --vae runs/toy/vae --prefix-source vae \
        --mode greedy-latent --benchmarks runs/toy/data/math_test.jsonl --n 8 --k 1,8 \
        --max-new-tokens 96 --out runs/toy/eval                    # adds a row to the same table
    python evaluate.py --model runs/toy/sft/model --prefix-source lorem --L 8 \
        --mode greedy-latent --benchmarks runs/toy/data/math_test.jsonl --n 8 --k 1,8 \
        --max-new-tokens 96 --out runs/toy/eval                    # text prefixes, same table
8 GPUs of 80 GB (problems shard over ranks; rank 0 merges and writes the tables; 128 rows of
2,048 new tokens hold 48 GB of KV cache a GPU, 256 would not fit):
    torchrun --nproc_per_node 8 evaluate.py --model runs/rl-qwen3-4b/model --template math \
        --benchmarks gsm8k,math500,minerva_math,olympiadbench,amc23 --mode greedy-latent \
        --prefix-source noise --L 1 -n 32 --k 1,8,32 --max-new-tokens 2048 --dtype bfloat16 \
        --batch-size 128 --out runs/eval-qwen3-4b
"""

import argparse
import glob
import hashlib
import json
import os

import torch
import torch.distributed as dist

from common import (atomic_write_json, atomic_write_text, compute_init, derived_seed, on_master, print0, progress,
                    run_main)
from data import (BENCHMARKS, GRADER, HELD_OUT_SEED, TEMPLATES, answer_of, format_prompt, grade, load_benchmark,
                  load_rows, resolve_benchmark)
from guard import (GiB, SEED, ArgumentParser, UserError, check_fits_context, describe_need, free_memory, memory_need,
                   read_json, ranged, refuse_unused)
from model import add_prefix_arguments, check_prefix_sources, decode_buckets, generate, load_policy, make_prefix_source

MODES = ("sample", "greedy-latent", "latent-sample")

parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# Benchmarks
parser.add_argument("--benchmarks", required=True,
                    help=f"comma-separated names ({', '.join(BENCHMARKS)}) or JSON-lines paths")
parser.add_argument("--limit", type=ranged(int, 1), default=None, help="problems per benchmark (a fixed subset)")
parser.add_argument("--template", default="plain", choices=TEMPLATES)
# Model
parser.add_argument("--model", required=True, help="hub id or checkpoint directory")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
# Decoding
parser.add_argument("--mode", default="sample", choices=MODES)
parser.add_argument("-n", "--num-samples", dest="n", type=ranged(int, 1, 100_000), default=8,
                    help="candidates per problem (under torchrun spell it -n or --num-samples: torchrun takes --n as its own)")
parser.add_argument("--k", default=None, help="comma-separated k for pass@k (default: 1 and n)")
parser.add_argument("--temperature", type=ranged(float, 0), default=1.0, help="for sample and latent-sample")
parser.add_argument("--top-p", type=ranged(float, high=1, above=0), default=1.0)
parser.add_argument("--max-new-tokens", type=ranged(int, 1), default=512)
parser.add_argument("--batch-size", type=ranged(int, 1), default=64, help="rows (problems x candidates) per generate()")
parser.add_argument("--seed", type=SEED, default=0, help="seeds the latents and the token sampler")
# Palette
add_prefix_arguments(parser, source="none", L_help="prefix tokens per candidate (lorem: text tokens, then the boundary)")
# Output
parser.add_argument("--out", required=True, help="directory for results.json, results.md, <benchmark>.jsonl")
parser.add_argument("--config-name", default=None, help="row label (default: from mode, source, L)")


def pass_at_k(n, c, k):
    """Unbiased pass@k for c correct of n samples: 1 - C(n-c, k) / C(n, k), as a stable product."""
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def problem_keys(rows):
    """Each problem's identity across runs (a --limit subset re-indexes rows; ids stay put): its
    id, else a hash of its text; a repeated key gets #2, #3, ... so that every key is unique."""
    keys, seen = [], {}
    for r in rows:
        key = str(r.get("id") or hashlib.sha1(r["problem"].encode()).hexdigest()[:16])
        seen[key] = seen.get(key, 0) + 1
        keys.append(key if seen[key] == 1 else f"{key}#{seen[key]}")
    return keys


def read_records(paths):
    """Records of per-problem files; a line cut short by a kill is skipped."""
    records = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return records


def merge_records(out_dir, name):
    """Fold every rank's part file into <name>.jsonl: one line per (config, problem), atomically."""
    main_path = os.path.join(out_dir, f"{name}.jsonl")
    parts = sorted(glob.glob(os.path.join(out_dir, f"{name}.rank*.jsonl")))
    merged = {}
    for r in read_records(([main_path] if os.path.exists(main_path) else []) + parts):
        merged.setdefault((r["config"], r["key"]), r)
    order = {c: i for i, c in enumerate(dict.fromkeys(c for c, _ in merged))}   # configs as they came
    records = sorted(merged.values(), key=lambda r: (order[r["config"]], r["index"]))
    atomic_write_text(main_path, "".join(json.dumps(r) + "\n" for r in records))
    for p in parts:
        os.remove(p)
    return records


def write_tables(path_json, path_md, name, entry):
    """Merge this configuration into results.json and rewrite results.md from it."""
    results = read_results(path_json)
    old = results["configs"].get(name)
    if old and old["settings"] == entry["settings"]:
        entry["benchmarks"] = {**old["benchmarks"], **entry["benchmarks"]}
    results["configs"][name] = entry
    atomic_write_json(path_json, results)
    configs = results["configs"]
    columns = list(dict.fromkeys(b for c in configs.values() for b in c["benchmarks"]))
    ks = sorted({k for c in configs.values() for k in c["k"]})
    lines = []
    for k in ks:
        lines += [f"### pass@{k} (%)", "", "| Config | " + " | ".join(columns) + " | Avg |",
                  "|---" * (len(columns) + 2) + "|"]
        for cname, c in configs.items():
            vals = [c["benchmarks"].get(b, {}).get(f"pass@{k}") for b in columns]
            avg = None if None in vals else sum(vals) / len(vals)
            cells = ["–" if v is None else f"{100 * v:.2f}" for v in vals + [avg]]
            lines.append(f"| {cname} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### distinct answers per problem", "", "| Config | " + " | ".join(columns) + " |",
              "|---" * (len(columns) + 1) + "|"]
    for cname, c in configs.items():
        vals = [c["benchmarks"].get(b, {}).get("distinct_answers") for b in columns]
        lines.append(f"| {cname} | " + " | ".join("–" if v is None else f"{v:.2f}" for v in vals) + " |")
    atomic_write_text(path_md, "\n".join(lines) + "\n")
    return "\n".join(lines)


def read_results(path):
    """results.json as written by an earlier configuration (or empty); a corrupt one is one line."""
    if not os.path.exists(path):
        return {"configs": {}}
    results = read_json(path, "results file")
    if not isinstance(results.get("configs"), dict):
        raise UserError(f"results file {path}: no 'configs' object in it; restore it, or move it away")
    return results


def check_args(args):
    """The rules between flags, before anything is loaded. Returns the sorted k of pass@k."""
    try:
        ks = sorted({1, args.n} if args.k is None else {int(k) for k in args.k.split(",") if k.strip()})
    except ValueError:
        raise UserError(f"--k {args.k!r}: expected comma-separated integers such as 1,8,32") from None
    if not ks or min(ks) < 1:
        raise UserError(f"every --k must be >= 1, got {args.k}")
    if max(ks) > args.n:
        raise UserError(f"--k {max(ks)} exceeds --n {args.n}: pass@k needs at least k candidates per problem")
    if args.mode != "sample" and (args.prefix_source == "none" or args.L == 0):
        raise UserError(f"--mode {args.mode} gives each candidate its own latent: it needs a --prefix-source "
                        "and --L >= 1")
    unused = {} if args.mode != "greedy-latent" else dict.fromkeys(("temperature", "top_p"), "greedy-latent decodes greedily")
    if args.prefix_source == "none":
        unused.update(dict.fromkeys(("L", "tie", "vae", "region"), "--prefix-source none draws no prefix"))
    refuse_unused(args, parser, unused)
    if args.mode == "sample" and args.prefix_source != "none":
        raise UserError(f"--mode sample decodes without a prefix; --mode latent-sample samples under one ({args.prefix_source})")
    check_prefix_sources([("--prefix-source", args.prefix_source)], args.vae, args.region, args.tie, args.L)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file, not a directory; choose another --out")
    return ks


def check_memory(args, config, longest, device, loaded=False):
    """Refuse a --batch-size whose KV cache (bucketed and kept between calls on a GPU, as the
    compiled decode keeps it) does not fit the free memory; longest: the longest [prefix; prompt]."""
    rows, tokens = args.batch_size, longest + args.max_new_tokens
    held = [decode_buckets(rows, tokens)] if device.type == "cuda" else ()
    need = memory_need(config, args.dtype == "bfloat16", gen_rows=rows, gen_len=tokens, prompt_len=longest, kv_held=held)
    free = free_memory(device) + (need["weights"] if loaded else 0)         # the weights may be loaded already
    if need["total"] > free:
        raise UserError(f"--batch-size {rows} rows of up to {tokens} tokens need {need['total'] / GiB:.3g} GiB "
                        f"({describe_need(need)} GiB), more than the {free / GiB:.3g} GiB free; lower --batch-size")


def main(argv=None):
    args = parser.parse_args(argv)
    ks = check_args(args)
    prefixed = args.prefix_source != "none" and args.L > 0
    temperature = 0.0 if args.mode == "greedy-latent" else args.temperature
    name = args.config_name or " ".join(
        [args.mode] + ([f"{args.prefix_source}{':' + args.region if args.region else ''}",
                        f"L={args.L}"] if prefixed else []) + ([f"T={temperature:g}"] if temperature else []))
    if "|" in name or "\n" in name:
        raise UserError(f"--config-name {name!r}: no '|' or newlines (it is a Markdown table cell)")
    specs = []   # (benchmark name, local file or None for a named benchmark)
    for item in [b.strip() for b in args.benchmarks.split(",") if b.strip()]:
        if item.endswith(".jsonl") or os.path.isfile(item):
            bench = os.path.splitext(os.path.basename(item))[0]
            if os.path.abspath(item) == os.path.abspath(os.path.join(args.out, f"{bench}.jsonl")):
                raise UserError(f"{item} is where --out would write {bench}'s results; choose another --out")
            specs.append((bench, item))
        else:
            resolve_benchmark(item)                    # an unknown name raises, naming the known ones
            specs.append((item, None))
    if not specs:
        raise UserError("--benchmarks is empty")
    ddp, rank, world_size, device = compute_init()
    master = rank == 0

    def claim_out():
        """One evaluation at a time per --out (the OS frees the lock when the process ends); a
        corrupt results.json is found now, not at the end."""
        from filelock import FileLock, Timeout
        os.makedirs(args.out, exist_ok=True)
        try:
            claim_out.lock = FileLock(os.path.join(args.out, ".lock"), is_singleton=True)   # held to the end
            claim_out.lock.acquire(timeout=0)
        except Timeout:
            raise UserError(f"{args.out} is in use by another evaluation; wait for it or choose another --out") from None
        read_results(os.path.join(args.out, "results.json"))
    on_master(claim_out)

    model, tokenizer = load_policy(args.model, device, getattr(torch, args.dtype))
    model.eval()
    source = make_prefix_source(args.prefix_source, model.embed_tokens.weight, tokenizer, args.vae,
                                args.region, args.tie, args.seed)
    settings = {k: getattr(args, k) for k in ("model", "template", "mode", "n", "top_p", "max_new_tokens",
                                              "seed", "prefix_source", "vae", "region", "L", "tie", "dtype")}
    settings["temperature"] = temperature
    entry = {"settings": settings, "k": ks, "benchmarks": {}}

    for bench, path in specs:
        rows = load_benchmark(bench, limit=args.limit, seed=HELD_OUT_SEED) if path is None else \
            load_rows(path, domain="math", limit=args.limit, seed=HELD_OUT_SEED)
        rows = [r for r in rows if r.get("answer") is not None]
        if not rows:
            raise UserError(f"{path or bench}: no problems with an answer to grade against")
        keys = problem_keys(rows)
        for r in rows:
            r["prompt_ids"] = tokenizer(format_prompt(r["problem"], args.template, tokenizer),
                                        add_special_tokens=False)["input_ids"]
        longest = check_fits_context(rows, source.rows(args.L) + args.max_new_tokens, f"prompt + {source.rows(args.L)}-row "
                                     f"prefix (--L {args.L}) + --max-new-tokens", bench, model.config.max_position_embeddings)
        check_memory(args, model.config, longest + source.rows(args.L), device, loaded=True)

        # -- resume: records of this configuration already written (merged or per-rank parts)
        paths = sorted(glob.glob(os.path.join(args.out, f"{bench}.jsonl")) +
                       glob.glob(os.path.join(args.out, f"{bench}.rank*.jsonl")))
        done = {}
        for r in read_records(paths):
            if r.get("config") == name:
                if r["settings"] != settings:
                    diff = sorted(k for k in settings if r["settings"].get(k) != settings[k])
                    raise UserError(f"{args.out}/{bench}.jsonl holds results for config {name!r} made "
                                    f"with other settings ({', '.join(diff)}); pass another "
                                    "--config-name or --out")
                done[r["key"]] = r
        if ddp:
            dist.barrier()     # every rank has read the files before any rank appends to them
        todo = [i for i, key in enumerate(keys) if key not in done]
        mine = todo[rank::world_size]
        kinds = "/".join(sorted({r["grading_kind"] for r in rows}))
        print0(f"{bench}: {len(rows)} problems ({kinds} grading), {len(rows) - len(todo)} reused, "
               f"{len(todo)} to run, config {name!r}")

        # -- generate: chunks of problems x candidates, appended and flushed as each chunk ends
        per_chunk = max(1, args.batch_size // args.n)
        with open(os.path.join(args.out, f"{bench}.rank{rank}.jsonl"), "a", encoding="utf-8") as part:
            for c in progress(range(0, len(mine), per_chunk), f"{bench} (chunks of {per_chunk} problems)"):
                chunk = mine[c:c + per_chunk]
                prompts, prefixes, noise = [], [], []
                for i in chunk:
                    prompts += [rows[i]["prompt_ids"]] * args.n
                    # a problem's latents and sampling noise depend on (seed, problem) only: not on
                    # the batch, the rank or a resume
                    g_latent = torch.Generator().manual_seed(derived_seed(args.seed, keys[i], "latents"))
                    drawn = source.sample(args.n, args.L, generator=g_latent)      # (n, rows, d) or None
                    prefixes += [None] * args.n if drawn is None else list(drawn.to(device))
                    noise += [derived_seed(args.seed, keys[i], j) for j in range(args.n)]
                texts, stopped = [], []
                for s in range(0, len(prompts), args.batch_size):
                    out = generate(model, prompts[s:s + args.batch_size], prefixes[s:s + args.batch_size],
                                   args.max_new_tokens, temperature, top_p=args.top_p,
                                   stop_tokens=[tokenizer.eos_token_id], keys=noise[s:s + args.batch_size])
                    texts += tokenizer.batch_decode(out.token_lists(), skip_special_tokens=True)
                    stopped += out.stopped.tolist()
                for j, i in enumerate(chunk):
                    completions = texts[j * args.n:(j + 1) * args.n]
                    finished = stopped[j * args.n:(j + 1) * args.n]
                    # a completion cut off at --max-new-tokens is no answer (as in rl.py): its last
                    # number is wherever the cut fell, so a grader reading it would score luck
                    verdicts = [grade(t, rows[i]["answer"], rows[i]["grading_kind"]) if done else 0.0
                                for t, done in zip(completions, finished)]
                    part.write(json.dumps({
                        "config": name, "key": keys[i], "index": i, "problem": rows[i]["problem"],
                        "answer": rows[i]["answer"], "completions": completions, "verdicts": verdicts,
                        "stopped": finished, "correct": int(sum(verdicts)), "settings": settings}) + "\n")
                part.flush()
        if ddp:
            dist.barrier()

        # -- rank 0 gathers every rank's records and scores the benchmark
        if master:
            records = {r["key"]: r for r in merge_records(args.out, bench) if r["config"] == name}
            missing = [k for k in keys if k not in records]
            if missing:
                raise UserError(f"{bench}: no record for {len(missing)} problems (first {missing[0]!r})")
            counts = [records[k]["correct"] for k in keys]
            # diversity beside accuracy: how many different answers the n candidates of a problem
            # state (a cut-off completion states none), the paper's claim (a) in one number
            distinct = [len({answer_of(t, rows[i]["grading_kind"])
                             for t, done in zip(records[k]["completions"], records[k]["stopped"]) if done}
                            - {None}) for i, k in enumerate(keys)]
            entry["benchmarks"][bench] = {"n_problems": len(keys), **{
                f"pass@{k}": sum(pass_at_k(args.n, c, k) for c in counts) / len(counts) for k in ks},
                "distinct_answers": sum(distinct) / len(distinct)}
            print0(f"{bench}: " + ", ".join(f"pass@{k} {100 * entry['benchmarks'][bench][f'pass@{k}']:.2f}"
                                            for k in ks) + f" ({GRADER.failures} grading failures so far)")
        if ddp:
            dist.barrier()

    if master:
        table = write_tables(os.path.join(args.out, "results.json"),
                             os.path.join(args.out, "results.md"), name, entry)
        print0(table)
        print0(f"wrote {args.out}/results.json, results.md and per-problem <benchmark>.jsonl")


if __name__ == "__main__":
    run_main(main)
