r"""Benchmarks: pass@1 and unbiased pass@k, with and without the palette, per prefix source.

Each problem gets --n candidates, decoded in one of three modes:
    sample          token sampling at --temperature, no prefix
    greedy-latent   each candidate greedy under its OWN latent: diversity from the prefix alone
                    (the paper's Fig. 1: GSM8K pass@32 52.9% -> 85.3% with one noise token)
    latent-sample   each candidate under its own latent AND token sampling at --temperature
pass@k is Chen et al.'s (2021) unbiased estimator over problems (a candidate cut off at --max-new-tokens
is wrong), beside the distinct answers per problem. A candidate's seeds derive from --seed and the problem
alone (--limit ignores --seed). In --out: <benchmark>.jsonl, a line per (configuration, problem) appended
as each batch ends (a killed run resumes from it); results.json and results.md, a row per --config-name.

Toy world:
    python evaluate.py --model runs/toy/sft/model --vae runs/toy/vae --prefix-source vae \
        --mode greedy-latent --benchmarks runs/toy/data/math_test.jsonl --n 8 --k 1,8 \
        --max-new-tokens 96 --out runs/toy/eval
8 GPUs of 80 GB (problems shard over ranks; rank 0 merges and writes the tables; 64 rows of
2,048 new tokens hold 25 GB of KV cache a GPU, 128 would pass 90% of the free memory):
    torchrun --nproc_per_node 8 evaluate.py --model runs/rl-qwen3-4b/model --template math \
        --benchmarks gsm8k,math500,minerva_math,olympiadbench,amc23 --mode greedy-latent \
        --prefix-source vae --vae runs/vae-qwen3-4b -n 32 --k 1,8,32 --max-new-tokens 2048 \
        --dtype bfloat16 --batch-size 64 --out runs/eval-qwen3-4b
"""

import argparse
import contextlib
import glob
import hashlib
import json
import math
import os

import torch
import torch.distributed as dist

import memory
from common import (ArgumentParser, UserError, atomic_write_json, atomic_write_text, compute_init, derived_seed, on_master,
                    print0, progress, ranged, read_json, run_main)
from data import GRADER, HELD_OUT_SEED, SHARED_DATA_DIR, DataError, answer_of, grade, load_rows
from infer import add_arguments, load, tokenize
from model import decode_buckets, free_caches, generate
from prefixes import check_prefix

# The paper's evaluation sets: name -> (hub id, split, file in ../shared/data).
BENCHMARKS = {
    "gsm8k": ("openai/gsm8k", "test", "gsm8k_test.jsonl"),
    "math500": ("HuggingFaceH4/MATH-500", "test", "math500.jsonl"),
    "minerva_math": ("math-ai/minervamath", "test", "minerva_math.jsonl"),
    "olympiadbench": ("math-ai/olympiadbench", "test", "olympiadbench.jsonl"),
    "amc23": ("math-ai/amc23", "test", "amc23.jsonl"),
    "aime24": ("HuggingFaceH4/aime_2024", "train", "aime24.jsonl"),
}

def resolve_benchmark(name, data_dir=None):
    """(source, split) of a named benchmark: its file in `data_dir` (../shared/data) if there, else the hub's."""
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    hub_id, split, filename = BENCHMARKS[name]
    local = os.path.join(data_dir or SHARED_DATA_DIR, filename)
    return (local, split) if os.path.isfile(local) else (hub_id, split)

parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
arg = parser.add_argument
arg("--benchmarks", required=True, help=f"comma-separated names ({', '.join(BENCHMARKS)}) or JSON-lines paths")
arg("--limit", type=ranged(int, 1), default=None, help="problems per benchmark (a fixed subset)")
arg("--mode", default="sample", choices=("sample", "greedy-latent", "latent-sample"))
arg("-n", "--num-samples", dest="n", type=ranged(int, 1, 100_000), default=8,
    help="candidates per problem (under torchrun spell it -n or --num-samples: torchrun takes --n as its own)")
arg("--k", default=None, help="comma-separated k for pass@k (default: 1 and n)")
arg("--out", required=True, help="directory for results.json, results.md, <benchmark>.jsonl")
arg("--config-name", default=None, help="row label (default: from mode, source, L)")
add_arguments(parser, 1.0, 512, "rows (problems x candidates)", source="none",
              L_help="prefix tokens per candidate (lorem: text tokens, then the boundary)")

def pass_at_k(n, c, k):
    """Unbiased pass@k for c correct of n samples: 1 - C(n-c, k) / C(n, k), as a stable product."""
    return 1.0 if n - c < k else 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))

def problem_keys(rows):
    """Each problem's identity across runs: its id, else a hash of its text; a repeat gets #2, #3, ..."""
    keys, seen = [], {}
    for r in rows:
        key = str(r.get("id") or hashlib.sha1(r["problem"].encode()).hexdigest()[:16])
        seen[key] = seen.get(key, 0) + 1
        keys.append(key if seen[key] == 1 else f"{key}#{seen[key]}")
    return keys

def read_records(out_dir, name):
    """Records of <name>.jsonl and the ranks' part files; a line cut short by a kill is skipped."""
    records = []
    for path in sorted(glob.glob(os.path.join(out_dir, f"{name}.jsonl")) + glob.glob(os.path.join(out_dir, f"{name}.rank*.jsonl"))):
        for line in open(path, encoding="utf-8"):
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return records

def check_args(args):     # the rules between flags, before anything is loaded; the sorted k of pass@k
    ks = sorted({1, args.n} if args.k is None else {int(k) if k.strip().isdecimal() else 0 for k in args.k.split(",") if k.strip()})
    if not ks or ks[0] < 1 or ks[-1] > args.n:     # pass@k needs at least k candidates a problem (not a number: 0)
        raise UserError(f"--k {args.k}: expected comma-separated integers from 1 to --n {args.n}, such as 1,8,32")
    if args.mode != "sample" and (args.prefix_source == "none" or args.L == 0):
        raise UserError(f"--mode {args.mode} gives each candidate its own latent: it needs a --prefix-source and --L >= 1")
    if args.mode == "sample" and args.prefix_source != "none":
        raise UserError(f"--mode sample decodes without a prefix; --mode latent-sample samples under one ({args.prefix_source})")
    check_prefix(args, parser, {} if args.mode != "greedy-latent" else
                 dict.fromkeys(("temperature", "top_p"), "greedy-latent decodes greedily"))
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file, not a directory; choose another --out")
    return ks

def main(argv=None):
    args = parser.parse_args(argv)
    ks = check_args(args)
    args.temperature = 0.0 if args.mode == "greedy-latent" else args.temperature     # whatever the flag
    prefix = [args.prefix_source + (f":{args.region}" if args.region else ""), f"L={args.L}"] * (args.mode != "sample")
    name = args.config_name or " ".join([args.mode, *prefix] + [f"T={args.temperature:g}"] * bool(args.temperature))
    if "|" in name or "\n" in name:
        raise UserError(f"--config-name {name!r}: no '|' or newlines (it is a Markdown table cell)")
    specs = []   # (benchmark name, source, split)
    for item in [b.strip() for b in args.benchmarks.split(",") if b.strip()]:
        local = item.endswith(".jsonl") or os.path.isfile(item)
        bench = os.path.splitext(os.path.basename(item))[0] if local else item
        if local and os.path.abspath(item) == os.path.abspath(os.path.join(args.out, f"{bench}.jsonl")):
            raise UserError(f"{item} is where --out would write {bench}'s results; choose another --out")
        specs.append((bench, item, "train") if local else (item, *resolve_benchmark(item)))   # an unknown name raises
    ddp, rank, world_size, device = compute_init()
    master, barrier = rank == 0, dist.barrier if ddp else lambda: None

    def claim_out():   # one evaluation per --out (the OS frees the lock at exit): results.json read once, now
        from filelock import FileLock, Timeout
        os.makedirs(args.out, exist_ok=True)
        claim_out.lock = FileLock(os.path.join(args.out, ".lock"), is_singleton=True)   # held to the end
        try:
            claim_out.lock.acquire(timeout=0)
        except Timeout:
            raise UserError(f"{args.out} is in use by another evaluation; wait for it or choose another --out") from None
        path = os.path.join(args.out, "results.json")         # as earlier configurations wrote it, or empty
        results = read_json(path, "results file") if os.path.exists(path) else {"configs": {}}
        if not isinstance(results.get("configs"), dict):
            raise UserError(f"results file {path}: no 'configs' object in it; restore it, or move it away")
        return results
    results = on_master(claim_out)

    model, tokenizer, source = load(args, device)
    settings = {k: getattr(args, k) for k in ("model", "template", "mode", "n", "top_p", "max_new_tokens", "seed",
                                              "prefix_source", "vae", "region", "L", "tie", "dtype", "temperature")}
    entry = {"settings": settings, "k": ks, "benchmarks": {}}

    bucket = None                      # the batch bucket whose KV cache generate() holds
    for bench, path, split in specs:
        rows = [r for r in load_rows(path, "math", split, args.limit, HELD_OUT_SEED) if r.get("answer") is not None]
        if not rows:
            raise UserError(f"{path}: no problems with an answer to grade against")
        rows, longest = tokenize(rows, args, model, tokenizer, source, bench)
        keys, n = problem_keys(rows), args.n
        memory.check_generation(model.config, args.dtype == "bfloat16", args.batch_size, longest, args.max_new_tokens,
                                device, loaded=True)      # refuses a --batch-size that cannot fit

        # -- resume: records of this configuration already written (merged or per-rank parts)
        done = {r["key"]: r for r in read_records(args.out, bench) if r.get("config") == name}
        if diff := sorted({k for r in done.values() for k in settings if r["settings"].get(k) != settings[k]}):
            raise UserError(f"{args.out}/{bench}.jsonl holds results for config {name!r} made with other "
                            f"settings ({', '.join(diff)}); pass another --config-name or --out")
        barrier()     # every rank has read the files before any rank appends to them
        todo = [i for i, key in enumerate(keys) if key not in done]
        mine = todo[rank::world_size]
        print0(f"{bench}: {len(rows)} problems ({'/'.join(sorted({r['grading_kind'] for r in rows}))} grading), "
               f"{len(rows) - len(todo)} reused, {len(todo)} to run, config {name!r}")

        # -- generate: chunks of problems x candidates, each record appended as its chunk ends (line-buffered)
        per_chunk = max(1, args.batch_size // n)
        with open(os.path.join(args.out, f"{bench}.rank{rank}.jsonl"), "a", buffering=1, encoding="utf-8") as part:
            for c in progress(range(0, len(mine), per_chunk), f"{bench} (chunks of {per_chunk} problems)"):
                chunk = mine[c:c + per_chunk]
                prompts = [rows[i]["prompt_ids"] for i in chunk for _ in range(n)]
                # a problem's latents and noise depend on (seed, problem) only, not the batch, rank or a resume
                drawn = [source.sample(n, args.L, generator=torch.Generator().manual_seed(derived_seed(args.seed, keys[i], "latents")))
                         for i in chunk]                                                   # (n, rows, d) or None each
                prefixes = [p for d in drawn for p in ([None] * n if d is None else d.to(device))]
                noise = [derived_seed(args.seed, keys[i], j) for i in chunk for j in range(n)]
                texts, stopped = [], []
                for b in (slice(s, s + args.batch_size) for s in range(0, len(prompts), args.batch_size)):
                    if bucket != (bucket := decode_buckets(len(prompts[b]), 1)[0]):   # a shorter last batch: its
                        free_caches()                     # cache replaces the one held, as memory.py plans
                    out = generate(model, prompts[b], prefixes[b], args.max_new_tokens, args.temperature,
                                   top_p=args.top_p, stop_tokens=[tokenizer.eos_token_id], keys=noise[b])
                    texts += tokenizer.batch_decode(out.token_lists(), skip_special_tokens=True)
                    stopped += out.stopped.tolist()
                for j, i in enumerate(chunk):
                    completions, finished = texts[j * n:(j + 1) * n], stopped[j * n:(j + 1) * n]
                    # a completion cut off at --max-new-tokens is no answer (as in rl.py): a grader would score luck
                    verdicts = [grade(t, rows[i]["answer"], rows[i]["grading_kind"]) if done else 0.0
                                for t, done in zip(completions, finished)]
                    part.write(json.dumps({"config": name, "key": keys[i], "index": i, "problem": rows[i]["problem"],
                                           "answer": rows[i]["answer"], "completions": completions, "verdicts": verdicts,
                                           "stopped": finished, "correct": int(sum(verdicts)), "settings": settings}) + "\n")
        barrier()

        if master:
            # -- rank 0 folds every rank's part file into <bench>.jsonl, one line per (config, problem), and scores
            found = read_records(args.out, bench)
            order = list(dict.fromkeys(r["config"] for r in found))                       # configs as they came
            first = {(r["config"], r["key"]): r for r in reversed(found)}                  # a repeat: the first kept
            merged = sorted(first.values(), key=lambda r: (order.index(r["config"]), r["index"]))
            atomic_write_text(os.path.join(args.out, f"{bench}.jsonl"), "".join(json.dumps(r) + "\n" for r in merged))
            for p in glob.glob(os.path.join(args.out, f"{bench}.rank*.jsonl")):
                os.remove(p)
            records = [first[name, k] for k in keys]
            scores = {f"pass@{k}": sum(pass_at_k(n, r["correct"], k) for r in records) / len(keys) for k in ks}
            # diversity beside accuracy: the different answers a problem's candidates state (the paper's claim a)
            distinct = [len({answer_of(t, row["grading_kind"]) for t, done in zip(r["completions"], r["stopped"]) if done} - {None})
                        for r, row in zip(records, rows)]
            entry["benchmarks"][bench] = {"n_problems": len(keys), **scores, "distinct_answers": sum(distinct) / len(distinct)}
            print0(f"{bench}: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in scores.items()) + f" ({GRADER.failures} grading failures so far)")
        barrier()

    if not master:
        return
    # -- merge this configuration into results.json and rewrite results.md from it
    configs, old = results["configs"], results["configs"].get(name)
    if old and old["settings"] == entry["settings"]:
        entry["benchmarks"] = {**old["benchmarks"], **entry["benchmarks"]}
    configs[name] = entry
    atomic_write_json(os.path.join(args.out, "results.json"), results)
    columns = list(dict.fromkeys(b for c in configs.values() for b in c["benchmarks"]))
    metrics = [(f"pass@{k}", f"pass@{k} (%)", 100) for k in sorted({k for c in configs.values() for k in c["k"]})]
    lines = []              # a table per metric: rows = configurations, columns = benchmarks and their mean
    for key, title, scale in metrics + [("distinct_answers", "distinct answers per problem", 1)]:
        lines += ["", f"### {title}", "", "| Config | " + " | ".join(columns) + " | Avg |", "|---" * (len(columns) + 2) + "|"]
        for cname, c in configs.items():
            vals = [c["benchmarks"].get(b, {}).get(key) for b in columns]
            vals.append(None if None in vals else sum(vals) / len(vals))
            lines.append(f"| {cname} | " + " | ".join("–" if v is None else f"{scale * v:.2f}" for v in vals) + " |")
    atomic_write_text(os.path.join(args.out, "results.md"), "\n".join(lines[1:]) + "\n")
    print0("\n".join(lines[1:]))

if __name__ == "__main__":
    run_main(main)
