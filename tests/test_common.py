"""The plumbing under every stage: run-directory logs, atomic writes, RNG state through JSON.

Run:  python -m pytest tests/test_common.py -q
"""
import json
import os
import random

import numpy as np
import pytest
import torch

from common import RunDir, _jsonable, atomic_save_dir, read_jsonl, rng_state, set_rng_state


def test_fresh_run_starts_new_logs_and_resume_keeps_them(tmp_path):
    run = RunDir(str(tmp_path))
    for step in range(3):
        run.log({"step": step})
    assert [r["step"] for r in read_jsonl(run.file("metrics.jsonl"))] == [0, 1, 2]
    resumed = RunDir(str(tmp_path), resume=True)
    resumed.truncate_log(after_step=1)            # checkpoint taken after step 1
    resumed.log({"step": 2})
    assert [r["step"] for r in read_jsonl(run.file("metrics.jsonl"))] == [0, 1, 2]
    RunDir(str(tmp_path))                         # a new run into the same directory
    assert not os.path.exists(run.file("metrics.jsonl"))


def test_atomic_save_dir_keeps_the_old_directory_when_writing_fails(tmp_path):
    target = tmp_path / "ckpt"
    atomic_save_dir(str(target), lambda d: open(os.path.join(d, "a.txt"), "w").write("old"))

    def crash(d):
        open(os.path.join(d, "a.txt"), "w").write("half")
        raise KeyboardInterrupt                    # killed in the middle of writing
    with pytest.raises(KeyboardInterrupt):
        atomic_save_dir(str(target), crash)
    assert (target / "a.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["ckpt"]        # no temporary directory left behind
    atomic_save_dir(str(target), lambda d: open(os.path.join(d, "a.txt"), "w").write("new"))
    assert (target / "a.txt").read_text() == "new"


def test_rng_state_round_trips_through_json():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    state = json.loads(json.dumps(_jsonable(rng_state())))   # as a checkpoint stores it
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected

