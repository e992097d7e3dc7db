"""One RL step of rl.py against TRL's GRPOTrainer: same model, prompts, P x G, max_new_tokens,
temperature, dtype and grader, in one run.

Both sides run GRPO with token-mean aggregation (TRL's loss_type="dapo"), no KL (beta = 0), no
reference model and one optimiser update per batch of P prompts x G completions, in float32 or
bfloat16 on whichever device is there. Step s trains both on the same P prompts: TRL's dataset is
the problems rl.step_problems gives, in order, unshuffled. TRL's reward function calls the project's
grader (data.grade), so both score alike. Each side runs in its own process (this script calls
itself with --side), so that each peak memory is its own; the first --warmup steps of each are
left out of the timings.

Per step: generation (sampling the completions), scoring (rewards and advantages; for TRL, all of
_generate_and_score_completions but _generate: decoding, rewards, advantages, and whatever
log-probs it computes there), update (the rest of the step: forward, backward, optimiser), and
generated tokens per second of generation. Reported: medians over the measured steps, peak
memory (CUDA: max_memory_allocated; CPU: the process's peak resident set), and TRL's time over
ours. The rollouts differ (different samplers and random streams), so lengths differ a little;
tokens/s is the fairer view of generation.

TRL is needed by this benchmark only (it is not in requirements.txt). Install it without letting
pip replace the pinned torch:
    pip install torch==2.13.0                  # the CPU wheel here; the CUDA one on a GPU
    pip install --no-deps trl==1.16.0          # transformers, accelerate, datasets: requirements.txt
(or `pip install --no-deps --target DIR trl==1.16.0` and PYTHONPATH=DIR).

Toy world (CPU):
    python bench/bench_rl_step.py --model runs/toy/sft_plain/model \
        --data runs/toy/data/math_train.jsonl --prompts 8 --group-size 8 --max-new-tokens 64
SmolLM2-135M-Instruct:
    python bench/bench_rl_step.py --model runs/smollm2/model --data runs/smollm2/data/task_train.jsonl \
        --template chat --prompts 4 --group-size 8 --max-new-tokens 128
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", required=True)
parser.add_argument("--data", required=True)
parser.add_argument("--template", default="plain")
parser.add_argument("--prompts", type=int, default=8, help="P prompts per step")
parser.add_argument("--group-size", type=int, default=8, help="G completions per prompt")
parser.add_argument("--max-new-tokens", type=int, default=64)
parser.add_argument("--temperature", type=float, default=1.0)
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
parser.add_argument("--lr", type=float, default=1e-6)
parser.add_argument("--steps", type=int, default=4, help="measured steps")
parser.add_argument("--warmup", type=int, default=1, help="steps left out of the timings")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--side", choices=["ours", "trl"], default=None, help="(internal) run one side")
parser.add_argument("--profile", default=None, help="(with --side ours) write a cProfile here")


def peak_memory_gb():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20      # KiB on Linux


def run_ours(args, out):
    import rl
    rl.WARMUP_STEPS = 1                          # a constant lr, as TRL's
    argv = ["--model", args.model, "--data", args.data, "--template", args.template,
            "--schedule", "none", "--prompts-per-step", str(args.prompts),
            "--group-size", str(args.group_size), "--max-new-tokens", str(args.max_new_tokens),
            "--temperature", str(args.temperature), "--dtype", args.dtype, "--lr", str(args.lr),
            "--steps", str(args.warmup + args.steps), "--save-every", "0", "--micro-batch-size",
            str(args.prompts * args.group_size), "--seed", str(args.seed), "--out", out]
    rl.main(argv)
    steps = []
    for line in open(os.path.join(out, "metrics.jsonl")):
        m = json.loads(line)
        steps.append({"generation": m["time_generate"], "scoring": m["time_score"],
                      "update": m["time_update"],
                      "tokens": m["completion_len"] * args.prompts * args.group_size,
                      "reward": m["reward_mean"]})
    return steps


def run_trl(args, out):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    import rl
    from data import format_prompt, grade

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    rows = rl.load_problems(args.data, "--data", tokenizer, args.template, args.seed, args.max_new_tokens,
                            model.config.max_position_embeddings)
    P, G, n_steps = args.prompts, args.group_size, args.warmup + args.steps
    picked = [rows[i] for s in range(n_steps) for i in rl.step_problems(len(rows), s, P, args.seed)]
    dataset = Dataset.from_list([{"prompt": format_prompt(r["problem"], args.template, tokenizer),
                                  "answer": r["answer"], "kind": r["grading_kind"]} for r in picked])

    def reward(completions, answer, kind, **_):
        return [grade(c, a, k) for c, a, k in zip(completions, answer, kind)]

    config = GRPOConfig(
        output_dir=out, per_device_train_batch_size=P * G, gradient_accumulation_steps=1,
        num_generations=G, steps_per_generation=1, num_iterations=1,
        max_completion_length=args.max_new_tokens, temperature=args.temperature, top_p=1.0,
        loss_type="dapo", beta=0.0, epsilon=0.2, epsilon_high=0.28, scale_rewards="group",
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.0, max_steps=n_steps,
        shuffle_dataset=False, bf16=args.dtype == "bfloat16", use_cpu=not torch.cuda.is_available(),
        logging_steps=1, save_strategy="no", report_to=[], seed=args.seed, disable_dropout=True,
        log_completions=False, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer)

    times = {"generation": 0.0, "generate_and_score": 0.0}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            result = fn(*a, **k)
            times[name] += time.perf_counter() - t0
            return result
        return wrapper
    trainer._generate = timed("generation", trainer._generate)
    trainer._generate_and_score_completions = timed("generate_and_score",
                                                    trainer._generate_and_score_completions)
    steps = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *_, **__):
            for k in times:
                times[k] = 0.0
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            total = time.perf_counter() - self.t0
            steps.append({"generation": times["generation"],
                          "scoring": times["generate_and_score"] - times["generation"],
                          "update": total - times["generate_and_score"]})

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs and len(steps) > 0:
                steps[-1]["tokens"] = logs["completions/mean_length"] * P * G
                steps[-1]["reward"] = logs.get("reward")
    trainer.add_callback(StepTimes())
    trainer.train()
    return steps


def side_main(args):
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as out:
        run = os.path.join(out, "run")
        if args.side == "ours" and args.profile:
            import cProfile
            profile = cProfile.Profile()
            steps = profile.runcall(run_ours, args, run)
            profile.dump_stats(args.profile)
        else:
            steps = (run_ours if args.side == "ours" else run_trl)(args, run)
    print("RESULT " + json.dumps({"steps": steps, "peak_gb": peak_memory_gb()}))


def summarise(steps, warmup):
    measured = steps[warmup:]
    med = lambda k: statistics.median(s[k] for s in measured)
    tokens_per_s = statistics.median(s["tokens"] / s["generation"] for s in measured)
    out = {k: med(k) for k in ("generation", "scoring", "update")}
    out["step"] = statistics.median(s["generation"] + s["scoring"] + s["update"] for s in measured)
    out["tokens_per_s"] = tokens_per_s
    out["tokens"] = med("tokens")
    return out


def main():
    args = parser.parse_args()
    if args.side:
        return side_main(args)
    results = {}
    for side in ("ours", "trl"):
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--side", side]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            sys.exit(f"error: the {side} side failed:\n{proc.stderr[-3000:]}")
        r = json.loads(line[-1][len("RESULT "):])
        results[side] = {**summarise(r["steps"], args.warmup), "peak_gb": r["peak_gb"]}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model}: P={args.prompts} x G={args.group_size}, max_new_tokens={args.max_new_tokens}, "
          f"T={args.temperature}, {args.dtype}, {device}; medians of {args.steps} steps after {args.warmup}")
    print(f"{'':6} {'step s':>8} {'gen s':>8} {'score s':>8} {'update s':>8} {'gen tok/s':>10} "
          f"{'tokens':>7} {'peak GB':>8}")
    for side, r in results.items():
        print(f"{side:6} {r['step']:8.3f} {r['generation']:8.3f} {r['scoring']:8.3f} {r['update']:8.3f} "
              f"{r['tokens_per_s']:10.0f} {r['tokens']:7.0f} {r['peak_gb']:8.2f}")
    o, t = results["ours"], results["trl"]
    print(f"TRL / ours: step {t['step'] / o['step']:.2f}x, generation {t['generation'] / o['generation']:.2f}x, "
          f"scoring {t['scoring'] / o['scoring']:.2f}x, update {t['update'] / o['update']:.2f}x, "
          f"tokens/s {o['tokens_per_s'] / t['tokens_per_s']:.2f}x")
    print("JSON " + json.dumps(results))


if __name__ == "__main__":
    main()
