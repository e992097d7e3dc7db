"""The toy reasoning world: the embedded default task (task.py) and its character-level
tokenizer (tokenizer.py), small enough that the whole pipeline runs on a CPU in minutes; the
premise checks, the exploration comparison and the reports. publish_results, below, is the one
way a report (this package's or real/report.py) writes docs/results/ and the README's headlines;
provenance is how each toy result says which world and which CPU settings it came from."""

import glob
import hashlib
import os
import shutil
import subprocess
from typing import NamedTuple

from common import atomic_write_text
from common import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Provenance(NamedTuple):
    """Where a toy result came from: the world's base weights, and the two CPU settings that change
    how its sums round (another instruction set, or another split of a sum over threads; RL in a toy
    world amplifies that: one seed of one arm of the published toy table moved by a problem when its
    run had one thread instead of two)."""
    cpu_capability: str      # torch.backends.cpu.get_cpu_capability(), e.g. AVX2 or AVX512
    threads: int             # torch.get_num_threads() of the runs
    weights_sha256: str      # the world's base model (provenance below)
    mkl_cbwr: str = ""       # MKL's reproducibility mode (runs/toy.sh: COMPATIBLE; "": MKL's own choice)

    def __str__(self):
        return (f"base weights sha256 {self.weights_sha256}, CPU capability {self.cpu_capability}, "
                f"MKL_CBWR {self.mkl_cbwr or 'unset'}, threads {self.threads}")


def provenance(model_dir, threads=None):
    """The Provenance of a result computed here from the world whose base model is model_dir (threads:
    the runs' own count when it is not this process's). The fingerprint is the first 12 hex digits of
    the sha256 of the safetensors tensors' bytes in sorted key order: file layout and metadata are
    left out, so a copy or a re-save matches and a changed weight does not."""
    import torch
    from safetensors.torch import load_file
    tensors = {}
    for path in glob.glob(os.path.join(model_dir, "*.safetensors")):
        tensors.update(load_file(path))
    if not tensors:
        raise UserError(f"{model_dir}: no *.safetensors weights to fingerprint")
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(tensors[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return Provenance(torch.backends.cpu.get_cpu_capability(), threads or torch.get_num_threads(),
                      digest.hexdigest()[:12], os.environ.get("MKL_CBWR", ""))


def publish_results(name, full, headline, command, pictures=(), repo=REPO):
    """A maintainer's step, never part of a user's run: docs/results/{name}.md gets the full tables,
    the pictures ((source path, file name) pairs) go beside it, and README.md gets the headline
    (between its <!-- {name}:start --> and <!-- {name}:end --> markers), each saying where its
    numbers came from (the command and the commit)."""
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=repo).stdout.strip()
    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    source = f"`{command}` at commit {git('rev-parse', '--short', 'HEAD') or 'unknown'}{dirty}"
    atomic_write_text(os.path.join(repo, "docs", "results", f"{name}.md"),
                      f"<!-- written by {source} -->\n{full.strip()}\n")
    readme, start, end = os.path.join(repo, "README.md"), f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = open(readme).read()
    if start not in text or end not in text:
        raise UserError(f"{readme} has no {start} ... {end} markers: add them where the headline belongs")
    before, rest = text.split(start, 1)
    atomic_write_text(readme, f"{before}{start}\n{headline.strip()}\n\nFull tables: [docs/results/{name}.md]"
                              f"(docs/results/{name}.md), from {source}.\n{end}{rest.split(end, 1)[1]}")
    for source_path, file_name in pictures:
        shutil.copy(source_path, os.path.join(repo, "docs", "results", file_name))
    print(f"wrote docs/results/{name}.md{', its pictures' if pictures else ''} and the README's headline")
