"""Plumbing shared by every stage: torchrun / DDP set-up, printing on rank 0, seeding, the run
directory (args.json, metrics.jsonl, a lock), checkpoints as new step-numbered directories, and
gradient sync. Every script works unchanged with or without torchrun:

    python rl.py ...                          # one process, no process group
    torchrun --nproc_per_node 8 rl.py ...     # RANK / LOCAL_RANK / WORLD_SIZE set by torchrun
"""

import contextlib
import datetime
import errno
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import sys
import tempfile
import threading

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tqdm import tqdm

from safetensors import SafetensorError

from guard import UserError, check_same_run, one_line, read_json, read_jsonl, read_safetensors_file, stop

# -----------------------------------------------------------------------------
# Distributed set-up


def compute_init():
    """Initialise the process group under torchrun (nccl on CUDA, gloo elsewhere) and pick the
    device. Returns (ddp, rank, world_size, device); torchrun sets RANK, LOCAL_RANK, WORLD_SIZE."""
    ddp = "RANK" in os.environ
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        # cuDNN's attention backward gives NaN with a mask at some lengths on torch 2.11 (pytorch#196678):
        # training attention is unmasked, and any masked call takes the flash or efficient kernels
        torch.backends.cuda.enable_cudnn_sdp(False)
    else:
        device = torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if ddp and not dist.is_initialized():
        # an hour: ranks wait at a collective while another generates longer completions or rank 0
        # writes a checkpoint of tens of GB (NCCL's default is 10 minutes)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1),
                                device_id=device if device.type == "cuda" else None)
    return ddp, rank, world_size, device


def compute_cleanup(wait_for_all=False):
    """Tear down the process group. After a finished run every rank first waits for the others:
    rank 0 may still be writing the model, and a rank that closes its connections while a peer
    holds the group open can abort at exit. After an error no rank waits: a peer may be gone."""
    if dist.is_available() and dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()


def is_master():
    return int(os.environ.get("RANK", 0)) == 0


def print0(*args, **kwargs):
    if is_master():
        print(*args, **kwargs, flush=True)


def run_main(main):
    """Run a stage's main(): a UserError becomes one line and exit code 2; Ctrl-C (or SIGTERM from a
    scheduler) one line saying where the run stopped and how to continue it, and exit code 130."""
    if threading.current_thread() is threading.main_thread():     # signals reach this thread only
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        main()
        compute_cleanup(wait_for_all=True)
    except UserError as e:
        stop(f"error: {e}")
    except KeyboardInterrupt:
        run = RunDir.current
        stop("interrupted" + (f" ({run.interrupted()})" if run else ""), code=130)
    finally:
        compute_cleanup()


def on_master(fn):
    """fn() on rank 0 only, its result given to every rank; a UserError it raises is raised on
    every rank, so all ranks stop together instead of waiting for rank 0 in the next collective."""
    result, error = None, None
    if is_master():
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    if dist.is_available() and dist.is_initialized():
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise UserError(error)
    return result


def all_reduce_sum(values, device):
    """A list of floats summed over ranks (unchanged without a process group)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_mean(values, device):
    """A list of floats averaged over ranks (unchanged without a process group)."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return [v / world for v in all_reduce_sum(values, device)]


def gather_objects(items):
    """Every rank's list of items (small, picklable records), joined in rank order, on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(items)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


def sync_gradients(model, bucket_numel=2**26):
    """Average gradients over ranks: the one place where data-parallel ranks synchronise. Every rank
    starts from the same weights and applies the same averaged gradient, so they stay equal.
    Gradients travel in flat buckets of one dtype, so a 4B model needs few all-reduce calls."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    grads, bucket = [p.grad for p in model.parameters() if p.requires_grad], []
    for i, g in enumerate(grads):
        bucket.append(g)
        if i + 1 == len(grads) or grads[i + 1].dtype != g.dtype or sum(b.numel() for b in bucket) >= bucket_numel:
            flat = torch.cat([b.flatten() for b in bucket])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            for b, synced in zip(bucket, flat.split([b.numel() for b in bucket])):
                b.copy_(synced.view_as(b))
            bucket = []


def check_ranks_in_sync(model):
    """Compare a checksum of the weights across ranks; raise if any rank drifted apart."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    local = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()[None]
    sums = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(sums, local)
    if any(not torch.equal(s, sums[0]) for s in sums):
        raise RuntimeError(f"ranks hold different weights: checksums {[s.item() for s in sums]}")
    print0(f"weights identical on {len(sums)} ranks (checksum {sums[0].item():.6f})")


class Progress(tqdm):
    """tqdm on rank 0: live in a terminal, an update every 30 s when stderr is a log file.
    set_postfix waits for the next update instead of forcing one (in a log, one per step)."""

    def set_postfix(self, **values):
        super().set_postfix(values, refresh=False)


def progress(iterable, desc, total=None, initial=0):
    return Progress(iterable, desc=desc, total=total, initial=initial, disable=not is_master(),
                    dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30)


# -----------------------------------------------------------------------------
# Seeding: random streams derived from the seed alone (a resumed run continues them exactly)

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def derived_seed(*parts):
    """A 63-bit seed that is a function of `parts` alone (the run's seed, the step, a group's index,
    a name): every rank, batch size and resumed run derives the same random stream for the same draw."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def to_json(obj, **kwargs):
    """JSON text of obj; numpy arrays and scalars (the RNG state holds them) become lists and numbers."""
    return json.dumps(obj, default=lambda x: x.tolist(), **kwargs)


# -----------------------------------------------------------------------------
# Writing: a file or directory appears complete under its name, or not at all

def _umask_mode(mode):
    """`mode` as the user's umask lets a new file have it (mkstemp and mkdtemp make 0600 and 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _write_failed(path, e):
    """A write that failed (a full disk, no permission) as one line; what was at `path` is kept."""
    reason = e.strerror if isinstance(e, OSError) and e.strerror else one_line(e)
    return UserError(f"could not write {path} ({reason}); what was there before is kept")


def atomic_write_text(path, text):
    """Write a file under a temporary name, then rename it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        os.fchmod(fd, _umask_mode(0o666))
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise _write_failed(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path, obj):
    atomic_write_text(path, to_json(obj, indent=2) + "\n")


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary sibling directory to fill; it is fsynced and renamed to `path` when the
    block ends, and removed if the block fails (a failed write is one line, a UserError). A
    directory already at `path` is first renamed to a temporary name, removed once the new one is in."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=f".tmp-{os.path.basename(path)}-")
    old = f"{tmp}-old"
    try:
        os.chmod(tmp, _umask_mode(0o777))
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        if os.path.exists(path):
            os.rename(path, old)
        os.rename(tmp, path)
    except (OSError, SafetensorError) as e:
        raise _write_failed(path, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def command_line(resume=False):
    """The command that started this process, as a user would type it (with --resume added)."""
    argv = list(sys.argv) + (["--resume"] if resume and "--resume" not in sys.argv else [])
    script = shlex.join([os.path.relpath(argv[0]) if os.path.isabs(argv[0]) else argv[0], *argv[1:]])
    launcher = f"torchrun --nproc_per_node {os.environ['LOCAL_WORLD_SIZE']}" if "LOCAL_WORLD_SIZE" in os.environ else "python"
    return f"{launcher} {script}"


# -----------------------------------------------------------------------------
# The run directory: a lock, args.json, metrics.jsonl (one JSON object per step), checkpoints

class RunDir:
    """A stage's output directory. Rank 0 takes its lock (filelock: the OS releases it when the
    process dies, so a killed run never blocks the next); a run without --resume is refused where a
    run has already written, and a resumed run must have the flags in args.json (guard.check_same_run).
    self.checkpoint: the newest complete checkpoint to resume from, or None."""
    current = None          # the run of this process, for the interrupt message

    def __init__(self, path, args, resume=False):
        self.path, self.args, self.master = path, args, is_master()
        self.checkpoint = on_master(lambda: self._open(resume))
        RunDir.current, self.board = self, None
        if getattr(args, "tensorboard", False) and self.master:     # --tensorboard: imported only then
            from torch.utils.tensorboard import SummaryWriter
            self.board = SummaryWriter(self.file("tensorboard"))

    def _open(self, resume):
        from filelock import FileLock, Timeout
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UserError(f"--out {self.path} is a file, not a directory; choose another --out")
        os.makedirs(self.path, exist_ok=True)
        self.lock = FileLock(self.file(".lock"), is_singleton=True)   # one process may reopen its run
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            raise UserError(f"{self.path} is in use by another run; wait for it to finish or choose "
                            "another --out") from None
        for leftover in os.listdir(self.path):          # what a killed write left: never complete
            if leftover.startswith(".tmp-"):
                remove(self.file(leftover))
        written = [n for n in os.listdir(self.path) if n in ("metrics.jsonl", "model") or n.startswith("checkpoint-")]
        if written and not resume:
            raise UserError(f"{self.path} already holds a run ({', '.join(sorted(written))}): "
                            + ("add --resume to continue it, or choose a new --out" if hasattr(self.args, "resume")
                               else "choose a new --out, or delete it to start over"))
        if not resume:
            atomic_write_json(self.file("args.json"), vars(self.args))
            return None
        if os.path.exists(self.file("args.json")):
            check_same_run(read_json(self.file("args.json"), "the run's flags"), json.loads(to_json(vars(self.args))),
                           self.file("args.json"))
        damaged = {n: lacks for n in checkpoint_names(self.path) if (lacks := missing(self.file(n)))}
        for name, lacks in damaged.items():
            print(f"warning: {self.file(name)} is not a complete checkpoint; it is not resumed from (it lacks "
                  f"{', '.join(lacks)})", flush=True)
        last = latest_checkpoint(self.path)
        if last is None:
            why = f"{self.file(max(damaged))} lacks {', '.join(damaged[max(damaged)])}" if damaged else \
                "the run stopped before its first one"
            raise UserError(f"--resume: {self.path} holds no complete checkpoint to continue from ({why}); delete it "
                            "or choose a new --out, and start without --resume")
        return last

    def begin(self, step):
        """A resumed run, its checkpoint loaded: args.json takes the flags it runs with (a resume that
        was refused leaves it alone), and the logs keep only the steps before `step`."""
        if self.master:
            atomic_write_json(self.file("args.json"), vars(self.args))
        for name in ("metrics.jsonl", "samples.jsonl"):
            if self.master and os.path.exists(self.file(name)):
                kept = [r for r in read_jsonl(self.file(name)) if r.get("step", -1) < step]
                atomic_write_text(self.file(name), "".join(json.dumps(r) + "\n" for r in kept))

    def file(self, name):
        return os.path.join(self.path, name)

    def log(self, record, name="metrics.jsonl"):
        """Append one record; with --tensorboard, metrics.jsonl's numbers go to TensorBoard too. A
        failed append (a full disk) is cut back to the lines before it and stops in one line."""
        if self.master:
            line = (to_json(record) + "\n").encode()
            with open(self.file(name), "ab", buffering=0) as f:     # unbuffered: the write fails here
                size = f.tell()
                try:
                    if f.write(line) != len(line):              # a short write is a full disk too
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                except OSError as e:
                    f.truncate(size)
                    raise UserError(f"{_write_failed(self.file(name), e)}; {kept_note(self.path)}") from None
        if self.board is not None and name == "metrics.jsonl":
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.board.add_scalar(key, value, record["step"])
            self.board.flush()

    def interrupted(self):
        last = latest_checkpoint(self.path)
        return f"{self.path}: last checkpoint {last}; continue with: {command_line(resume=True)}" if last else \
            f"{self.path}: no checkpoint was written yet; start again with: {command_line()}"


def remove(path):
    """A file or a directory tree, if there."""
    shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.path.exists(path) and os.remove(path)


CHECKPOINT_FILES = ("trainer_state.json", "optimizer.safetensors", "model/config.json", "model/model.safetensors")


def missing(path):
    """What a checkpoint lacks of CHECKPOINT_FILES; [] for a complete one."""
    return [name for name in CHECKPOINT_FILES if not os.path.isfile(os.path.join(path, name))]


def is_complete(path):
    return not missing(path)


def checkpoint_names(out):
    """The checkpoint-NNNNNN entries in `out`, whole or not, oldest first (other names are not ours)."""
    names = [n for n in os.listdir(out) if n[:11] == "checkpoint-" and n[11:].isdecimal()] if os.path.isdir(out) else []
    return sorted(names, key=lambda n: int(n.removeprefix("checkpoint-")))


def latest_checkpoint(out):
    """The newest complete checkpoint-NNNNNN directory in `out`, or None. Checkpoints are renamed in
    only once whole; one damaged later (an empty directory left by hand) is passed over."""
    complete = [n for n in checkpoint_names(out) if is_complete(os.path.join(out, n))]
    return os.path.join(out, complete[-1]) if complete else None


def kept_note(out):
    last = latest_checkpoint(out)
    return f"the last checkpoint, {last}, is kept" if last else "no checkpoint had been written yet"


def save_checkpoint(out, step, model, opt_state, trainer_state=None, keep=1):
    """Write out/checkpoint-{step:06d}/: model/ (a Hugging Face directory), optimizer.safetensors
    (the optimiser's tensors, keyed "param.name") and trainer_state.json (the step, the optimiser's
    other entries, `trainer_state`). Written under a temporary name and renamed into place, so a kill
    at any moment leaves the previous checkpoints whole; then the directories older than the newest
    `keep` complete ones up to `step` are removed (a half-removed one too). A newer entry, or a file, is
    not this run's: it is left alone and never counted among the `keep`.
    A complete checkpoint of that step already there (a resumed run reaching it again) is kept as it
    is, nothing is rewritten in place, and the older ones are pruned as after a write. A failed write
    is one line naming the checkpoint kept."""
    path = os.path.join(out, f"checkpoint-{step:06d}")
    if not is_complete(path):          # one already there (a resumed run reaching it again) stays
        try:
            with atomic_dir(path) as tmp:
                model.save_pretrained(os.path.join(tmp, "model"))
                tensors, layout = {}, {}
                for param, state in opt_state["state"].items():
                    layout[param] = sorted(state)
                    for key, value in state.items():
                        tensors[f"{param}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
                save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
                atomic_write_json(os.path.join(tmp, "trainer_state.json"), {
                    "step": step, "param_groups": opt_state["param_groups"], "state_layout": layout, **(trainer_state or {})})
        except UserError as e:
            raise UserError(f"{e}; {kept_note(out)}") from None
    mine = [n for n in checkpoint_names(out) if int(n.removeprefix("checkpoint-")) <= step]
    oldest_kept = [n for n in mine if is_complete(os.path.join(out, n))][-keep:][0]
    for old in mine[:mine.index(oldest_kept)]:
        if os.path.isdir(os.path.join(out, old)):
            remove(os.path.join(out, old))
    return path


def load_checkpoint(path, key=int):
    """(trainer_state, optimiser state dict) of a checkpoint; parameters keyed by key(name)."""
    trainer = read_json(os.path.join(path, "trainer_state.json"), "checkpoint state")
    tensors = read_safetensors_file(os.path.join(path, "optimizer.safetensors"))
    try:
        trainer["step"] = int(trainer["step"])
        state = {key(p): {k: tensors[f"{p}.{k}"] for k in keys} for p, keys in trainer["state_layout"].items()}
        return trainer, {"state": state, "param_groups": trainer["param_groups"]}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: the checkpoint is incomplete or damaged ({type(e).__name__}: {e}); resume from "
                        "an older checkpoint (move this one away) or start again in a new --out") from None
