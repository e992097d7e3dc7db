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
- The run survives itself: a decode row that runs out of memory is a row that says so, the rows
  before it kept and the next ones measured; every section leaves no KV cache behind (nor does a
  shape for the next); a row the memory model refuses on the card is skipped, an rl step runs at
  the largest P the card holds; the datasheet figures are those of the card the device's memory
  names; and a broken check (no CUDA graph recorded on a GPU, a recording while timed) is a failed
  row and exit status 1.
The figures themselves mean nothing on a CPU; bench/gpu.sh on a GPU machine measures them.

Run:  python -m pytest tests/test_gpu_bench.py -q        (about a minute on two cores)
"""
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import gpu  # noqa: E402
import memory  # noqa: E402
import model as model_module  # noqa: E402
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
        assert {"weights", "optimizer", "gradients", "activations", "KV caches held", "sampler copy"} <= set(plan)
        assert step["predicted_peak_gib"] >= plan["weights"] + plan["optimizer"] + plan["activations"] > 0
        assert step["micro_batch"] >= 1 and step["activation_checkpointing"] in (True, False)
        assert step["measured_peak_gib"] is None        # torch.cuda.max_memory_allocated: on a GPU only
        assert step["events_after_warmup_step"]["compiles"] == 0
        # generate() on the compiled path: P G = 4 rows in one 256-slot bucket
        assert step["compiled_kv_cache_gib"] == 4 * 256 * TINY_KV_SLOT / 2**30 == plan["KV caches held"]
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


# -- the run survives itself ----------------------------------------------------------------------------

def run_smoke(tmp_path, *flags):
    (tmp_path / "work").mkdir(exist_ok=True)
    return gpu.main(["--smoke", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), *flags])


def test_a_row_that_runs_out_of_memory_keeps_the_rows_before_it(tmp_path, monkeypatch):
    """Batch 4 of each shape raises torch.cuda.OutOfMemoryError in the middle of its measurement: its row says
    so, batch 1's figures before it stay, the next shape is measured, no cache is left, and the exit status is 1."""
    sampling, calls = gpu.sampling, []

    def out_of_memory_at_batch_4(model, prompts, new_tokens):
        calls.append(len(prompts))
        if calls[-2:] == [4, 4]:                    # batch 4's second call: its cache is made, the figure not
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 94.50 GiB")
        return sampling(model, prompts, new_tokens)
    monkeypatch.setattr(gpu, "sampling", out_of_memory_at_batch_4)
    report = run_smoke(tmp_path, "--only", "decode", "--shapes", "tiny,tiny")
    rows = report["results"]["decode"]
    assert [(row["shape"], row["batch"]) for row in rows] == [("tiny", 1), ("tiny", 4)] * 2
    for measured, failed in (rows[0:2], rows[2:4]):
        assert measured["decode_tokens_per_s"] > 0 and "failed" not in measured
        assert failed["failed"].startswith("OutOfMemoryError: CUDA out of memory") and "decode_tokens_per_s" not in failed
    assert model_module._CACHES == {}
    assert [name for name, _ in gpu.failures(report)] == ["decode", "decode"]
    assert json.load(open(tmp_path / "out" / "gpu.json"))["results"]["decode"] == rows


def test_every_section_and_shape_frees_the_caches_it_made(tmp_path, monkeypatch):
    """generate()'s caches (one per batch bucket, kept for the process's life) are freed after each section
    and before each decode shape: the next starts with none."""
    seen, random_model = {}, gpu.random_model

    def counting(shape, device):
        seen.setdefault("before each shape", []).append(len(model_module._CACHES))
        return random_model(shape, device)

    def next_section(a, ceil, work):
        seen["after decode"] = len(model_module._CACHES)
        return {"checked": True}

    def compile_and_check(a, ceil, work):
        result = gpu.compile_once(a, ceil, work)
        seen["compile made"] = len(model_module._CACHES)
        return result
    monkeypatch.setattr(gpu, "random_model", counting)
    monkeypatch.setattr(gpu, "SECTIONS", {"ceilings": gpu.ceilings, "compile": compile_and_check, "decode": gpu.decode,
                                          "next": next_section})
    report = run_smoke(tmp_path, "--shapes", "tiny,tiny")
    assert not gpu.failures(report)
    assert seen["compile made"] > 0                             # there was something to free
    assert seen["before each shape"] == [0, 0, 0] and seen["after decode"] == 0 and model_module._CACHES == {}


def test_rows_and_steps_fit_the_card(tmp_path, monkeypatch):
    """A decode row whose caches and temporaries memory.check_generation refuses is skipped with its reason; the
    rl step runs at the largest of P, P / 2, P / 4 rl.py's plan accepts: the 1.7B shape at 32 on an H200's memory
    and 16 on an H100's, the 4B at 16 on an H200 and none (rl.py's refusal) on an H100."""
    monkeypatch.setattr(memory, "free_memory", lambda device: 0)               # nothing beyond the weights loaded
    rows = run_smoke(tmp_path, "--only", "decode")["results"]["decode"]
    assert [row["batch"] for row in rows] == [1, 4]
    assert all(row["skipped"].startswith("does not fit this card: --batch-size") for row in rows)

    a = gpu.parse_args([])
    a.prompts, a.group, a.prompt_len, a.new_tokens = 32, 8, 512, 512                # the GPU run's sizes
    argv = lambda P: ["--model", "m", "--data", "d", "--out", "o", "--schedule", "linear", "--prefix-source", "noise",
                      "--L", "8", "--prompts-per-step", str(P), "--group-size", "8", "--max-new-tokens", "512",
                      "--dtype", "bfloat16", "--micro-batch-size", "0"]
    chosen = {}
    for card, free_gib in (("H100", 78.5), ("H200", 139.2)):                      # the cards' memory, CUDA's own out
        monkeypatch.setattr(memory, "free_memory", lambda device: free_gib * 2**30)
        for shape in ("qwen3-1.7b", "qwen3-4b"):
            chosen[card, shape] = gpu.prompts_that_fit(a, shape, argv)
    assert {k: P for k, (P, _) in chosen.items()} == {("H100", "qwen3-1.7b"): 16, ("H100", "qwen3-4b"): None,
                                                      ("H200", "qwen3-1.7b"): 32, ("H200", "qwen3-4b"): 16}
    assert chosen["H100", "qwen3-4b"][1].startswith("a rank needs")


@pytest.mark.parametrize("total_gib, card, bandwidth", [(79.1, "H100 SXM 80 GB", 3.35e12), (80e9 / 2**30, "H100 SXM 80 GB", 3.35e12),
                                                        (139.8, "H200 SXM 141 GB", 4.8e12), (141e9 / 2**30, "H200 SXM 141 GB", 4.8e12)])
def test_the_datasheet_figures_are_the_cards_the_memory_names(tmp_path, monkeypatch, total_gib, card, bandwidth):
    """The device's total memory picks the card (torch reports about 79 and 140 GiB), and the fractions of the
    datasheet the ceilings report are of that card's figures."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=int(total_gib * 2**30)))
    a = gpu.parse_args([])
    assert a.card_name == card and a.card["bandwidth"] == bandwidth and a.card["bf16_flops"] == 989e12
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)             # the measurement itself on the CPU
    a.cuda, a.device = False, "cpu"
    c = gpu.ceilings(a, None, str(tmp_path))
    assert c["card"] == card and c["copy_of_datasheet"] == pytest.approx(c["copy_bytes_per_s"] / bandwidth)


def test_graph_checks_fail_loudly():
    """On a GPU the compiled decode's first pass must record CUDA graphs and its repeat must not: each broken
    check is a failure (on the CPU, where nothing is recorded, the first is not asked)."""
    none, recorded = {"compiles": 0, "cuda_graph_recordings": 0}, {"compiles": 1, "cuda_graph_recordings": 2}
    assert gpu.graph_failures(recorded, none, cuda=True) == []
    assert gpu.graph_failures(none, none, cuda=False) == []
    assert gpu.graph_failures({"compiles": 1, "cuda_graph_recordings": 0}, none, cuda=True)[0].startswith("no CUDA graph recorded")
    assert "recorded 2 CUDA graphs" in gpu.graph_failures(recorded, recorded, cuda=False)[0]
    assert gpu.graph_failures(None, None, cuda=True) and gpu.graph_failures(None, None, cuda=False) == []


def test_a_compiled_decode_without_cuda_graphs_is_a_failed_row_and_exit_status_1(tmp_path, monkeypatch):
    """The compile section where a GPU records no CUDA graph (here: the CPU, told it is a GPU) and decode rows
    that record while timed are failed rows, with their figures; bench/gpu.py then exits with status 1."""
    def as_if_on_a_gpu(a, ceil, work):
        return gpu.compile_once(SimpleNamespace(**{**vars(a), "cuda": True}), ceil, work)
    monkeypatch.setattr(gpu, "SECTIONS", {**gpu.SECTIONS, "compile": as_if_on_a_gpu})
    report = run_smoke(tmp_path, "--only", "compile")
    compiled = report["results"]["compile"]
    assert compiled["failed"].startswith("no CUDA graph recorded") and compiled["first_call_s"] > 0    # figures kept
    assert gpu.failures(report) == [("compile", compiled["failed"])]

    monkeypatch.setattr(gpu, "EVENTS", SimpleNamespace(now=lambda: None, since=lambda before: {"compiles": 0,
                                                                                             "cuda_graph_recordings": 1}))
    rows = run_smoke(tmp_path, "--only", "decode")["results"]["decode"]
    assert all(row["failed"].startswith("compiled or recorded CUDA graphs while timed") and row["step_ms"] for row in rows)

    # the command's exit status: a section stopped by --budget is a failure too
    result = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--only", "ceilings", "--budget", "0.05"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "FAILED ceilings: OverBudget: ran past --budget" in result.stderr
