"""Run a stage script the way it runs on a GPU, on the CPU: model.COMPILE_DECODE = True, so generate()
takes the CUDA path (the decode step compiled, by Inductor here; the bucketed KV cache kept between
calls; sampling inside the compiled step). Then the script runs as `python script.py args...` would.
tests/test_gpu_commands.py runs every documented GPU command through it.

    python tests/gpu_runner.py rl.py --dtype bfloat16 ...
    python -m torch.distributed.run --nproc_per_node 2 tests/gpu_runner.py rl.py --fsdp ...

GPU_RUNNER_REPORT=PREFIX: each rank writes PREFIX.rank<r>.json at exit, what its decoding did: one
record per generate() call (sharded or not, the weights' dtype, whether it took the bucketed cache,
that is the compiled step) and the graphs dynamo compiled.

    python -m torch.distributed.run --nproc_per_node 2 tests/gpu_runner.py --sharded-greedy MODEL VAE PROMPTS

checks that a sharded model (fsdp.Sharded, fp32, after before_rollouts) decodes greedily the same tokens
as the whole model through the compiled step, on every rank; each rank has prompts of its own too.
"""
import json
import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import model  # noqa: E402

model.COMPILE_DECODE = True
CALLS = []          # one record per generate() call of this process


def record_decoding():
    """Wrap model.generate and model.bucketed_cache (the compiled path's cache; generate looks it up at
    each call) so that each call says which path it took. The scripts import generate after this."""
    generate, bucketed_cache = model.generate, model.bucketed_cache

    def recorded_cache(config, batch, length, device, dtype):
        CALLS[-1]["bucket"] = [batch, length]
        return bucketed_cache(config, batch, length, device, dtype)

    def recorded_generate(m, prompts, *args, **kwargs):
        CALLS.append({"fsdp": isinstance(m, FSDPModule), "dtype": str(m.embed_tokens.weight.dtype),
                      "rows": len(prompts), "bucket": None})
        return generate(m, prompts, *args, **kwargs)
    model.bucketed_cache, model.generate = recorded_cache, recorded_generate


def write_report():
    if prefix := os.environ.get("GPU_RUNNER_REPORT"):
        with open(f"{prefix}.rank{os.environ.get('RANK', '0')}.json", "w") as f:
            json.dump({"calls": CALLS, "graphs": counters["stats"]["unique_graphs"],
                       "inductor": dict(counters["inductor"])}, f)


def run(script, args):
    record_decoding()
    sys.argv = [script, *args]
    try:
        runpy.run_path(script if os.path.isabs(script) else os.path.join(REPO, script), run_name="__main__")
    finally:
        write_report()


def sharded_greedy(model_dir, vae_dir, prompts_file):
    import torch.distributed as dist
    import fsdp
    from common import compute_cleanup, compute_init
    from data import load_rows
    from model import Transformer, free_caches, generate, load_tokenizer, make_prefix_source
    ddp, rank, world_size, _ = compute_init()
    assert ddp and world_size > 1, "run it under torchrun"
    whole = Transformer.from_pretrained(model_dir).eval()
    config = whole.config
    assert config.num_key_value_heads < config.num_attention_heads, "the check wants grouped-query attention"
    tokenizer = load_tokenizer(model_dir, config.vocab_size)
    problems = [r["problem"] for r in load_rows(prompts_file)]
    encode = lambda texts: [tokenizer(t + "\n", add_special_tokens=False)["input_ids"] for t in texts]
    source = make_prefix_source("vae", whole.embed_tokens.weight, tokenizer, vae_dir)
    drawn = source.sample(8, 2, torch.Generator().manual_seed(0))                          # (8, 2, d)
    # every rank: 3 prompts of different lengths, the second without a prefix; rank r: r + 2 of its own
    batches = [(encode(problems[:3]), [drawn[0], None, drawn[1]]),
               (encode(problems[3 + 3 * rank:5 + 4 * rank]), list(drawn[2:4 + rank]))]
    eos = [tokenizer.eos_token_id]
    compiled = [generate(whole, p, q, max_new_tokens=12, temperature=0, stop_tokens=eos) for p, q in batches]
    assert model._CACHES, "the whole model did not take the compiled, bucketed decode"
    free_caches()
    sharded = fsdp.Sharded(Transformer.from_pretrained(model_dir).eval(), bf16=False)
    sharded.before_rollouts()
    eager = [generate(sharded.sampler, p, q, max_new_tokens=12, temperature=0, stop_tokens=eos) for p, q in batches]
    assert not model._CACHES, "a sharded model decodes eagerly"
    for a, b in zip(compiled, eager):
        assert a.token_lists() == b.token_lists() and torch.equal(a.stopped, b.stopped), \
            f"rank {rank}: compiled {a.token_lists()} != sharded {b.token_lists()}"
    assert any(len(set(row)) > 1 for out in compiled for row in out.token_lists()), "nothing was decoded"
    everyone = [None] * world_size
    dist.all_gather_object(everyone, compiled[0].token_lists())
    assert all(tokens == everyone[0] for tokens in everyone), f"ranks decode the shared prompts differently: {everyone}"
    if rank == 0:
        print(f"sharded greedy tokens equal the compiled ones on {world_size} ranks", flush=True)
    compute_cleanup(wait_for_all=True)


if __name__ == "__main__":
    if sys.argv[1] == "--sharded-greedy":
        sharded_greedy(*sys.argv[2:5])
    else:
        run(sys.argv[1], sys.argv[2:])
