"""bench/gpu.sh --smoke: every section of the GPU command runs its code paths at tiny shapes on the
CPU (so the script cannot rot between GPU runs), and what it reports has the right form. The
figures themselves mean nothing on a CPU; bench/gpu.sh on a GPU machine measures them.

Run:  python -m pytest tests/test_gpu_bench.py -q        (under a minute on two cores)
"""
import json
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_gpu_command_runs_every_section_at_tiny_shapes(tmp_path):
    result = subprocess.run(["bash", "bench/gpu.sh", "--smoke", "--out", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(tmp_path / "gpu.json"))
    r = report["results"]
    assert report["environment"]["smoke"] and "torch" in report["environment"]
    failed = {name: v for name, v in r.items() if isinstance(v, dict) and "failed" in v}
    assert not failed, failed
    assert r["ceilings"]["copy_bytes_per_s"] > 0 and r["ceilings"]["matmul_flops_per_s"] > 0
    assert [row["batch"] for row in r["decode"]] == [1, 4]
    assert all(row["decode_tokens_per_s"] > 0 and 0 < row["roofline_fraction"] for row in r["decode"])
    assert r["versus_hf"]["ours_tokens_per_s"] > 0 and r["versus_hf"]["transformers_tokens_per_s"] > 0
    assert r["compile"]["graphs"] == 1 and r["compile"]["recompiles"] == 0    # the static step traces whole, once
    for name in ("rl_step", "rl_step_4b"):
        step = r[name]
        assert abs(step["generate_s"] + step["score_s"] + step["update_s"] - step["step_s"]) < 1e-9
        assert step["update_mfu"] > 0
    assert r["fsdp"]["same"] and r["fsdp"]["ranks"] == 2
    assert "skipped" in r["trl"] or r["trl"]["trl_over_ours"] > 0
    markdown = (tmp_path / "gpu.md").read_text()
    assert all(f"## {name}" in markdown for name in ("decode", "versus_hf", "compile", "rl_step", "fsdp"))
    assert "python bench/gpu.py --only decode" in markdown            # each figure's own command
