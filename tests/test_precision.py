"""Mixed precision as the field does it: fp32 master weights and optimiser state, bf16 compute. The
same tiny run in fp32 and in bf16 (same seed) moves every kind of weight, norms included, about as
far (within 1.5x) at lr 1e-6 and 1e-5, in rl.py and in the warm-up; the weights written stay fp32.
A bf16 copy of the weights (what --dtype bfloat16 used to train) would not move the norms at all.

Run:  python -m pytest tests/test_precision.py -q        (about half a minute on two cores)
"""
import contextlib
import io
import re

import pytest
import torch
from safetensors.torch import load_file

import rl
import sft_warmup


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from conftest import tiny_toy_model
    from toy.task import generate as toy_rows, write_jsonl
    root = tmp_path_factory.mktemp("precision")
    model, _ = tiny_toy_model(root / "tokenizer", layers=2, tied=False, context=256, std=0.1)
    with torch.no_grad():                       # norms away from 1, so that a bf16 rounding shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.37)
    model.save_pretrained(str(root / "model"), tokenizer_dir=str(root / "tokenizer"))
    write_jsonl(toy_rows("math", 40, seed=1, digits=1), str(root / "train.jsonl"))
    return root


def kind(name):
    """The kind of a weight: its name without the layer number (norms of every layer together)."""
    return re.sub(r"layers\.\d+\.", "", name)


def moved(before, after):
    """How far each kind of weight moved: the norm of the change over all layers."""
    kinds = {}
    for name, w in after.items():
        kinds.setdefault(kind(name), []).append((w.double() - before[name].double()).flatten())
    return {k: torch.cat(v).norm().item() for k, v in kinds.items()}


def run(module, argv):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        module.main(argv)


@pytest.mark.parametrize("lr", ["1e-6", "1e-5"])
@pytest.mark.parametrize("stage", ["rl", "sft"])
def test_bf16_moves_every_kind_of_weight_as_far_as_fp32(world, tmp_path, monkeypatch, one_thread, stage, lr):
    monkeypatch.setattr(rl, "grade", lambda text, answer, kind: float(len(text) % 2))   # rewards that vary
    before = load_file(str(world / "model" / "model.safetensors"))
    distance = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        if stage == "rl":
            monkeypatch.setattr(rl, "WARMUP_STEPS", 1)                                     # a constant lr
            run(rl, ["--model", str(world / "model"), "--data", str(world / "train.jsonl"), "--schedule", "none",
                     "--steps", "3", "--prompts-per-step", "4", "--group-size", "4",
                     "--max-new-tokens", "6", "--lr", lr, "--dtype", dtype, "--out", str(out)])
        else:
            run(sft_warmup, ["--model", str(world / "model"), "--data", str(world / "train.jsonl"), "--prefix-source",
                             "none", "--steps", "3", "--warmup-steps", "0", "--batch-size", "8", "--lr", lr,
                             "--dtype", dtype, "--out", str(out)])
        after = load_file(str(out / "model" / "model.safetensors"))
        assert all(w.dtype == torch.float32 for w in after.values())           # fp32 master weights written
        distance[dtype] = moved(before, after)
    assert {k for k in distance["float32"] if "norm" in k} >= {"model.norm.weight", "model.input_layernorm.weight",
                                                                 "model.self_attn.q_norm.weight"}
    ratios = {k: distance["bfloat16"][k] / fp32 for k, fp32 in distance["float32"].items() if fp32 > 0}
    print(f"\n{stage} lr {lr}: bf16 / fp32 distance moved, per kind of weight: min {min(ratios.values()):.3f}, "
          f"max {max(ratios.values()):.3f} over {len(ratios)} kinds")
    for k, fp32 in distance["float32"].items():
        assert fp32 > 0, k
        assert 1 / 1.5 <= distance["bfloat16"][k] / fp32 <= 1.5, (k, distance["bfloat16"][k], fp32)


def test_a_bf16_weight_cannot_take_a_small_update():
    """Why fp32 master weights: AdamW's first step moves every weight by about lr; on a bf16 weight
    near 1.37 (a norm) an update of 1e-6 or 1e-5 rounds away, in fp32 it is kept."""
    for lr in (1e-6, 1e-5):
        for dtype, survives in ((torch.float32, True), (torch.bfloat16, False)):
            w = torch.nn.Parameter(torch.full((8,), 1.37, dtype=dtype))
            start = w.detach().clone()
            w.grad = torch.ones_like(w)
            torch.optim.AdamW([w], lr=lr, weight_decay=0.0).step()
            assert (not torch.equal(w.detach(), start)) == survives, (lr, dtype)
