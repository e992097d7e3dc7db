"""bench/gpu.sh: what the GPU command reports, checked on the CPU.

- The smoke run (`bash bench/gpu.sh --smoke`: every section's code path at tiny shapes) gives every
  section's figures or a skip with its reason, and the figures are the ones the formulas give:
  ceilings over at least 100 repeats, decode's roofline at the bucketed cache it reads, the rl step's
  split, FLOPs and memory plan, no compilation while timed, and no file left behind.
- The results are written after each section: a section that raises is recorded and the next one
  runs; a run killed mid-section keeps what finished; each section's folder is gone after it; a
  section that outlives --budget is stopped.
- The formulas by hand: the update's attention FLOPs use heads x head_dim (not hidden_size), and a
  decode step reads the whole bucketed KV cache.
The figures themselves mean nothing on a CPU; bench/gpu.sh on a GPU machine measures them.

Run:  python -m pytest tests/test_gpu_bench.py -q        (under a minute on two cores)
"""
import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import gpu  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

TINY_WEIGHTS = 2 * (64 * (2 * 64 + 2 * 32) + 3 * 64 * 128) + 512 * 64      # tiny: 2 layers, 4 x 16 q, 2 x 16 kv
TINY_KV_SLOT = 2 * 2 * 2 * 16 * 2                                            # k and v, 2 layers, 2 heads, bf16


def test_the_gpu_command_reports_every_section_at_tiny_shapes(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run(["bash", "bench/gpu.sh", "--smoke", "--out", str(tmp_path), "--work", str(work)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(tmp_path / "gpu.json"))
    r = report["results"]
    assert report["environment"]["smoke"] and "torch" in report["environment"]
    assert list(r) == list(gpu.SECTIONS)
    for name, value in r.items():                   # figures, or a skip that says why
        for row in value if isinstance(value, list) else [value]:
            assert "failed" not in row and "stopped" not in row, (name, row)
            assert "seconds" in row and "disk_gib" in row
    assert r["trl"].get("skipped", "").startswith("trl does not import") or r["trl"]["trl_over_ours"] > 0
    assert os.listdir(work) == []                   # every section's files deleted

    c = r["ceilings"]
    assert c["copy_repeats"] >= 100 and c["matmul_repeats"] >= 100 and c["warmup_s"] > 0
    assert c["copy_bytes_per_s"] > 0 and c["matmul_flops_per_s"] > 0

    # one graph for every shape (batches are bucketed to 2 or more, so no size-1 dimension is
    # specialised); the same calls again compile and record nothing
    compiled = r["compile"]
    assert compiled["graphs"] == 1 and compiled["first_pass"]["compiles"] == 1
    assert compiled["repeat_graphs"] == 0 and compiled["repeat"] == {"compiles": 0, "cuda_graph_recordings": 0}

    assert [row["batch"] for row in r["decode"]] == [1, 4]
    for row in r["decode"]:
        # 16 + 32 positions in a cache of 256 slots (one bucket); batch 1 decodes as 2 (the smallest
        # bucket), 4 as itself, and the step reads every row of the padded batch
        assert row["kv_slots_read"] == 256 and row["padded_batch"] == max(2, row["batch"])
        assert row["step_bytes"] == TINY_WEIGHTS * 2 + row["padded_batch"] * 256 * TINY_KV_SLOT
        assert row["roofline_tokens_per_s"] == pytest.approx(row["batch"] * c["copy_bytes_per_s"] / row["step_bytes"])
        assert row["roofline_fraction"] == pytest.approx(row["decode_tokens_per_s"] / row["roofline_tokens_per_s"])
        assert row["decode_tokens_per_s"] > 0 and row["while_timed"]["compiles"] == 0

    for name in ("rl_step", "rl_step_4b"):
        step = r[name]
        assert step["generate_s"] + step["score_s"] + step["update_s"] == pytest.approx(step["step_s"])
        assert step["trained_rows"] == step["P"] * step["G"]
        assert step["update_mfu"] == pytest.approx(step["update_tflop"] * 1e12 / step["update_s"] / c["matmul_flops_per_s"])
        plan = step["memory_plan_gib"]
        assert {"weights", "optimizer", "gradients", "activations", "KV cache", "sampler copy"} <= set(plan)
        assert step["predicted_peak_gib"] >= plan["weights"] + plan["optimizer"] + plan["activations"] > 0
        assert step["micro_batch"] >= 1 and step["activation_checkpointing"] in (True, False)
        assert step["measured_peak_gib"] is None        # torch.cuda.max_memory_allocated: on a GPU only
        assert step["events_after_warmup_step"]["compiles"] == 0
        # generate() on the compiled path: P G = 4 rows in one 256-slot bucket
        assert step["compiled_kv_cache_gib"] == 4 * 256 * TINY_KV_SLOT / 2**30
        assert step["disk_gib"] < 0.01                  # neither the final checkpoint nor the model written
    assert r["fsdp"]["same"] and r["fsdp"]["ranks"] == 2

    markdown = (tmp_path / "gpu.md").read_text()
    assert all(f"## {name}" in markdown for name in gpu.SECTIONS)
    assert "python bench/gpu.py --only decode" in markdown            # each figure's own command


def test_results_are_written_after_each_section(tmp_path, monkeypatch):
    out, work, seen = tmp_path / "out", tmp_path / "work", {}
    work.mkdir()

    def written():
        return json.load(open(out / "gpu.json"))["results"]

    def decode(a, ceil, folder):
        seen["decode"] = folder
        with open(os.path.join(folder, "checkpoint"), "wb") as f:
            f.write(b"\0" * 2**20)
        return [{"batch": 1, "copy": ceil["copy_bytes_per_s"]}]

    def compile_once(a, ceil, folder):
        assert not os.path.exists(seen["decode"])                  # the last section's files are gone
        assert list(written()) == ["ceilings", "decode"]           # and its figures are on disk
        raise RuntimeError("boom")

    def rl_step(a, ceil, folder):
        assert written()["compile"]["failed"] == "RuntimeError: boom"
        raise KeyboardInterrupt                                    # the machine taken away mid-section

    sections = {"ceilings": lambda a, ceil, folder: {"copy_bytes_per_s": 2.0}, "decode": decode,
                "compile": compile_once, "rl_step": rl_step, "versus_hf": lambda *_: {"never": "run"}}
    monkeypatch.setattr(gpu, "SECTIONS", sections)
    with pytest.raises(KeyboardInterrupt):
        gpu.main(["--smoke", "--out", str(out), "--work", str(work)])
    r = written()
    assert list(r) == ["ceilings", "decode", "compile"]
    assert r["decode"] == [{"batch": 1, "copy": 2.0, "seconds": r["decode"][0]["seconds"], "disk_gib": 2**-10}]
    assert os.listdir(work) == []
    assert "## decode" in (out / "gpu.md").read_text()

    # a section past --budget is stopped and recorded; the run goes on to write its results
    monkeypatch.setattr(gpu, "SECTIONS", {"decode": lambda *_: time.sleep(30)})
    t0 = time.time()
    report = gpu.main(["--smoke", "--budget", "0.5", "--out", str(out), "--work", str(work)])
    assert time.time() - t0 < 10 and "ran past --budget" in report["results"]["decode"]["failed"]
    assert written() == report["results"]


def test_update_flops_count_attention_at_heads_times_head_dim():
    # hidden_size 64 but 8 heads of 16: queries 128 wide
    c = ModelConfig(model_type="qwen3", tie_word_embeddings=True, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=16, vocab_size=100)
    per_layer = 64 * 128 * 2 + 64 * 32 * 2 + 3 * 64 * 96           # q and o, k and v, the MLP: 38912
    rows = [(10, 4), (7, 3)]                                        # (positions, completion tokens)
    dense = 6 * 3 * per_layer * (10 + 7)
    head = 6 * 100 * 64 * (4 + 3)
    attention = 6 * 3 * (8 * 16) * (10 ** 2 + 7 ** 2)               # causal QK^T and AV, forward and backward
    assert gpu.update_flops(c, rows) == dense + head + attention == 12_519_168
    # the weights counted are the model's own (the norms' few thousand left out)
    model = Transformer(c)
    assert gpu.weight_bytes(c, 1) == sum(p.numel() for n, p in model.named_parameters() if "norm" not in n)


def test_a_decode_step_reads_the_whole_bucketed_cache():
    c = gpu.config_of("tiny")
    # 3 rows of 300 positions run as 4 rows of 512 slots: weights once, the whole cache
    step_bytes, padded, slots = gpu.decode_step_bytes(c, 3, 300, 2)
    assert (padded, slots) == (4, 512)
    assert step_bytes == TINY_WEIGHTS * 2 + 4 * 512 * TINY_KV_SLOT
    assert gpu.decode_step_bytes(c, 64, 1024, 2)[1:] == (64, 1024)   # 512 + 512: exactly one bucket
