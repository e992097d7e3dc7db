"""Shared plumbing for every stage: torchrun/DDP set-up, printing on rank 0, seeding, the run
directory (args.json, metrics.jsonl), atomic writes and checkpoint save/resume.

Every script works unchanged with or without torchrun:

    python rl.py ...                          # one process, ddp off
    torchrun --nproc_per_node 8 rl.py ...     # RANK / LOCAL_RANK / WORLD_SIZE set by torchrun
"""

import json
import os
import random
import shutil
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem with the user's input: reported as one clear line, never a stack trace."""


def die(message):
    """Stop with one clear message (on every rank, printed once)."""
    print0(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_main(main):
    """Run a script's main(), turning UserError into one clear message and exit code 2."""
    try:
        main()
    except UserError as e:
        die(str(e))
    finally:
        compute_cleanup()


# -----------------------------------------------------------------------------
# Distributed set-up

def ddp_info():
    """(ddp, rank, local_rank, world_size) read from torchrun's environment."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if not ddp:
        return False, 0, 0, 1
    return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])


def autodetect_device():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def compute_init(device_type=None):
    """Initialise the process group under torchrun and pick the device.

    Returns (ddp, rank, local_rank, world_size, device). nccl on CUDA, gloo elsewhere.
    """
    device_type = device_type or autodetect_device()
    ddp, rank, local_rank, world_size = ddp_info()
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device(device_type)
    if ddp and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return ddp, rank, local_rank, world_size, device


def compute_cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_master():
    return ddp_info()[1] == 0


def print0(*args, **kwargs):
    if is_master():
        print(*args, **kwargs, flush=True)


def sync_gradients(model, bucket_numel=2**26):
    """Average gradients over ranks. The one place where data-parallel ranks synchronise: every
    rank starts from the same weights and applies the same averaged gradient, so they stay equal.
    Gradients are flattened into buckets so that a 4B model needs few all-reduce calls."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    grads = []
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    bucket, size = [], 0
    for g in grads + [None]:
        if g is not None and (not bucket or (g.dtype == bucket[0].dtype and size < bucket_numel)):
            bucket.append(g)
            size += g.numel()
            continue
        if bucket:
            flat = torch.cat([b.flatten() for b in bucket])
            dist.all_reduce(flat)
            flat /= world
            for b, synced in zip(bucket, flat.split([b.numel() for b in bucket])):
                b.copy_(synced.view_as(b))
        bucket, size = ([g], g.numel()) if g is not None else ([], 0)


def check_ranks_in_sync(model):
    """Compare a checksum of the weights across ranks; raise if any rank drifted apart."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    local = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()[None]
    all_sums = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(all_sums, local)
    if any(not torch.equal(s, all_sums[0]) for s in all_sums):
        raise RuntimeError(f"ranks hold different weights: checksums {[s.item() for s in all_sums]}")
    print0(f"weights identical on {len(all_sums)} ranks (checksum {all_sums[0].item():.6f})")


def all_reduce_mean(values, device):
    """Average a list of floats over ranks (identity without DDP)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


# -----------------------------------------------------------------------------
# Seeding and RNG state (resume must continue every random stream exactly)

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state):
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _jsonable(x):
    """numpy RNG state holds arrays and numpy scalars; JSON wants lists and ints."""
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    return x


# -----------------------------------------------------------------------------
# Atomic writes: a file or directory is either the old one or the complete new one, never half

def atomic_write_text(path, text):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")


def atomic_save_file(path, write_fn):
    """write_fn(tmp_path) writes a file that then replaces `path` in one rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    os.close(fd)
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save_dir(path, write_fn):
    """Write a whole directory atomically: write_fn(tmp_dir) fills a sibling temp directory,
    which then replaces `path`. The old directory survives until the new one is complete."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(path)}-")
    try:
        write_fn(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(dir=parent, prefix=f".old-{os.path.basename(path)}-")
        os.rmdir(old)
        os.replace(path, old)   # two renames: a crash between them leaves .old-*, never a half dir
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


# -----------------------------------------------------------------------------
# Run directory: args.json, metrics.jsonl (append-only, one JSON object per step)

class RunDir:
    LOGS = ("metrics.jsonl", "samples.jsonl", "summary.jsonl")

    def __init__(self, path, args=None, master=True, resume=False):
        """A run's directory. A fresh run starts its logs anew (a rerun into the same directory
        must not mix two runs' records); a resumed one keeps them (see truncate_log)."""
        self.path = path
        self.master = master
        if master:
            os.makedirs(path, exist_ok=True)
            if args is not None:
                atomic_write_json(os.path.join(path, "args.json"), vars(args))
            for name in () if resume else self.LOGS:
                if os.path.exists(self.file(name)):
                    os.remove(self.file(name))

    def file(self, name):
        return os.path.join(self.path, name)

    def log(self, record, name="metrics.jsonl"):
        if self.master:
            with open(self.file(name), "a") as f:
                f.write(json.dumps(_jsonable(record)) + "\n")

    def truncate_log(self, after_step, name="metrics.jsonl"):
        """On resume, drop records newer than the checkpoint so the log has each step once."""
        path = self.file(name)
        if not (self.master and os.path.exists(path)):
            return
        with open(path) as f:
            lines = [l for l in f if l.strip() and json.loads(l).get("step", -1) <= after_step]
        atomic_write_text(path, "".join(lines))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
