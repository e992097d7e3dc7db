"""Reading checkpoints and data files that are damaged: every kind of damage stops with one
line that names the file and what is wrong with it (common.UserError; from a stage script,
`error: ...` and exit code 2), never a stack trace from deep inside safetensors, json,
tokenizers or attention.

Covered: a truncated or garbled model.safetensors, a corrupt shard index or one that names a
missing shard, a config.json that is empty, a list, or has string sizes, a missing or corrupt
tokenizer, a vae.json that is not JSON, a list, empty, lacks fields or has wrong shapes, a
truncated vae.safetensors or one of other sizes, and data files that are not UTF-8 or hold
fields of the wrong type. Also that a sharded checkpoint reads exactly like a single file.

Run:  python -m pytest tests/test_loaders.py -q      (CPU, about two minutes: the stage runs are
      fresh interpreters)
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from common import UserError, read_safetensors_file
from model import PaletteVAE, embedding_fingerprint, load_embedding_matrix, load_policy, load_vae, save_vae

from conftest import tiny_toy_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD = "model-00001-of-00001.safetensors"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """{"model", "vae"}: a tiny checkpoint over the toy tokenizer and a VAE for it."""
    root = tmp_path_factory.mktemp("loaders")
    model, tokenizer = tiny_toy_model(root / "tokenizer", context=64)
    model.save_pretrained(str(root / "model"), tokenizer_dir=str(root / "tokenizer"))
    E = model.embed_tokens.weight.detach()
    vae = PaletteVAE(32, latent_dim=4, hidden_dim=16, depth=1)
    vae.set_statistics(torch.randn(16, 32), E)
    save_vae(vae, str(root / "vae"), {"beta": 0.1, "model": "tiny", "fingerprint": embedding_fingerprint(E),
                                      "domains": {"math": {"mean": [0.0] * 4, "cov": torch.eye(4).tolist()}}})
    return {"model": str(root / "model"), "vae": str(root / "vae"), "E": E}


def shard(directory, weight_map_file=SHARD):
    """Turn a single-file checkpoint into a one-shard one with an index (as large hub models are)."""
    os.rename(os.path.join(directory, "model.safetensors"), os.path.join(directory, SHARD))
    names = read_safetensors_file(os.path.join(directory, SHARD)).keys()
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {n: weight_map_file for n in names}}, f)


def cut(path, keep):
    with open(path, "rb") as f:
        content = f.read()
    with open(path, "wb") as f:
        f.write(content[:keep(len(content))])


def write_text(path, text):
    with open(path, "w") as f:
        f.write(text)


def edit_json(path, change):
    with open(path) as f:
        value = json.load(f)
    with open(path, "w") as f:
        json.dump(change(value), f)


def remove_tokenizer(directory):
    for name in os.listdir(directory):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            os.remove(os.path.join(directory, name))


# name -> (damage done to a copy of the checkpoint directory, the file the message must name,
#          a regex the message must match)
MODEL_DAMAGE = {
    "truncated weights": (lambda d: cut(f"{d}/model.safetensors", lambda n: n // 2),
                          "model.safetensors", "not a readable safetensors file.*incomplete metadata"),
    "garbled weights": (lambda d: cut(f"{d}/model.safetensors", lambda n: 20),
                        "model.safetensors", "not a readable safetensors file.*truncated or corrupt"),
    "index not JSON": (lambda d: (shard(d), write_text(f"{d}/model.safetensors.index.json", '{"weight_map": {'))[-1],
                       "model.safetensors.index.json", "corrupt or cut short"),
    "index names a missing shard": (lambda d: shard(d, "model-00002-of-00002.safetensors"),
                                    "model.safetensors.index.json",
                                    "names the shard model-00002-of-00002.safetensors, which is not in"),
    "index without weight_map": (lambda d: (shard(d), write_text(f"{d}/model.safetensors.index.json", "{}"))[-1],
                                 "model.safetensors.index.json", "'weight_map' must map tensor names"),
    "config empty": (lambda d: write_text(f"{d}/config.json", ""), "config.json", "corrupt or cut short"),
    "config a list": (lambda d: edit_json(f"{d}/config.json", lambda c: [c]),
                      "config.json", "expected a JSON object, found list"),
    "config string size": (lambda d: edit_json(f"{d}/config.json", lambda c: {**c, "hidden_size": "32"}),
                           "config.json", "hidden_size is '32'; sizes must be positive integers"),
    "config string eps": (lambda d: edit_json(f"{d}/config.json", lambda c: {**c, "rms_norm_eps": "1e-6"}),
                          "config.json", "rms_norm_eps is '1e-6'; expected a positive number"),
    "tokenizer missing": (remove_tokenizer, "tokenizer files: none", "encodes text to no tokens"),
    "tokenizer corrupt": (lambda d: write_text(f"{d}/tokenizer.json", '{"model": '),
                          "tokenizer.json", "the tokenizer does not load"),
}


def damaged_copy(world, tmp_path, damage):
    directory = str(tmp_path / "damaged")
    shutil.copytree(world["model"], directory)
    damage(directory)
    return directory


def test_a_sharded_checkpoint_reads_like_one_file(world, tmp_path):
    directory = damaged_copy(world, tmp_path, shard)
    model, _ = load_policy(directory)
    reference, _ = load_policy(world["model"])
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert torch.equal(load_embedding_matrix(directory), world["E"])


@pytest.mark.parametrize("name", list(MODEL_DAMAGE))
def test_damaged_checkpoint_is_one_line_naming_the_file(world, tmp_path, name):
    damage, file, message = MODEL_DAMAGE[name]
    directory = damaged_copy(world, tmp_path, damage)
    with pytest.raises(UserError, match=message) as error:
        load_policy(directory)
    assert file in str(error.value) and "\n" not in str(error.value)


def test_damaged_weights_are_reported_by_the_embedding_reader_too(world, tmp_path):
    directory = damaged_copy(world, tmp_path, MODEL_DAMAGE["truncated weights"][0])
    with pytest.raises(UserError, match=r"model\.safetensors: not a readable safetensors file"):
        load_embedding_matrix(directory)   # train_vae.py reads only E


def test_read_safetensors_file_reads_all_or_some(world, tmp_path):
    file = os.path.join(world["model"], "model.safetensors")
    everything = read_safetensors_file(file)
    some = read_safetensors_file(file, names={"model.embed_tokens.weight"})
    assert list(some) == ["model.embed_tokens.weight"] and len(everything) > 1
    with pytest.raises(UserError, match=r"nope\.safetensors: not a readable safetensors file"):
        read_safetensors_file(str(tmp_path / "nope.safetensors"))


def vae_sizes_of_another_run(d):
    save_vae(PaletteVAE(32, latent_dim=8, hidden_dim=16, depth=1), str(d) + "/other", {})
    shutil.copy(f"{d}/other/vae.safetensors", f"{d}/vae.safetensors")


VAE_DAMAGE = {
    "not JSON": (lambda d: write_text(f"{d}/vae.json", '{"dim": 32,'), "vae.json", "corrupt or cut short"),
    "empty": (lambda d: write_text(f"{d}/vae.json", ""), "vae.json", "corrupt or cut short"),
    "a list": (lambda d: edit_json(f"{d}/vae.json", lambda m: [m]), "vae.json",
               "expected a JSON object, found list"),
    "lacks fields": (lambda d: edit_json(f"{d}/vae.json", lambda m: {"beta": m["beta"]}), "vae.json",
                     "no dim, latent_dim, hidden_dim, depth, fingerprint field"),
    "string size": (lambda d: edit_json(f"{d}/vae.json", lambda m: {**m, "latent_dim": "4"}), "vae.json",
                    "latent_dim is '4'; expected an integer >= 1"),
    "bad region": (lambda d: edit_json(f"{d}/vae.json", lambda m: {**m, "domains": {"math": {"mean": [0]}}}),
                   "vae.json", r"domain 'math' needs 'mean' \(4 numbers\) and 'cov' \(4 x 4 numbers\)"),
    "truncated weights": (lambda d: cut(f"{d}/vae.safetensors", lambda n: n - 100), "vae.safetensors",
                          "not a readable safetensors file.*incomplete metadata"),
    "weights of other sizes": (vae_sizes_of_another_run, "vae.safetensors",
                               "has shape .* the sizes in its config imply"),
}


@pytest.mark.parametrize("name", list(VAE_DAMAGE))
def test_damaged_vae_is_one_line_naming_the_file(world, tmp_path, name):
    damage, file, message = VAE_DAMAGE[name]
    directory = str(tmp_path / "vae")
    shutil.copytree(world["vae"], directory)
    damage(directory)
    with pytest.raises(UserError, match=message) as error:
        load_vae(directory, world["E"])
    assert os.path.join(directory, file) in str(error.value) and "\n" not in str(error.value)


# -----------------------------------------------------------------------------
# Through the stage scripts: exit code 2, one line on stderr, no stack trace


def run_stage(*args):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)


def assert_one_line_error(result, *names):
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for name in names:
        assert name in lines[0]


@pytest.mark.parametrize("name", ["truncated weights", "index names a missing shard", "config a list",
                                  "config string size", "tokenizer missing"])
def test_infer_with_a_damaged_checkpoint_says_one_line(world, tmp_path, name):
    damage, file, _ = MODEL_DAMAGE[name]
    directory = damaged_copy(world, tmp_path, damage)
    result = run_stage("infer.py", "--model", directory, "--prompt", "hi", "--prefix-source", "none")
    assert_one_line_error(result, directory, file)


@pytest.mark.parametrize("name", ["a list", "truncated weights"])
def test_infer_with_a_damaged_vae_says_one_line(world, tmp_path, name):
    damage, file, _ = VAE_DAMAGE[name]
    directory = str(tmp_path / "vae")
    shutil.copytree(world["vae"], directory)
    damage(directory)
    result = run_stage("infer.py", "--model", world["model"], "--prompt", "hi", "--prefix-source", "vae",
                       "--vae", directory)
    assert_one_line_error(result, os.path.join(directory, file))


@pytest.mark.parametrize("content, message", [
    (b'{"problem": "1+1=?", "solution": "caf\xe9", "domain": "math"}\n', "not valid UTF-8"),
    (b'{"problem": "1+1=?", "solution": ["a", "b"], "domain": "math"}\n', "'solution' is a list"),
])
def test_train_vae_with_bad_data_says_one_line(world, tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    result = run_stage("train_vae.py", "--model", world["model"], "--data", f"math={path}",
                       "--out", tmp_path / "out", "--steps", "1")
    assert_one_line_error(result, f"{path}:1", message)
