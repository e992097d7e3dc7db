"""Plumbing shared by every stage, with or without torchrun: one-line errors, ranged flags, reading files,
ranks and seeds, atomic writes, the run directory (a lock, args.json, metrics.jsonl) and checkpoints."""

import argparse
import contextlib
import copy
import datetime
import errno
import functools
import hashlib
import json
import math
import operator
import os
import random
import shlex
import shutil
import signal
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

# -----------------------------------------------------------------------------
# One-line errors, flags, and the files a run reads

class UserError(Exception):
    """A problem with the user's input: reported as one line (exit code 2), never a stack trace."""

def one_line(text):
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())

def stop(line, code=2):
    """Print one line on rank 0 and exit; under torchrun also into its error file, which its summary shows."""
    line = one_line(line)
    if is_master():
        print(line, file=sys.stderr, flush=True)
    if error_file := os.environ.get("TORCHELASTIC_ERROR_FILE"):
        with contextlib.suppress(OSError), open(error_file, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                   "timestamp": str(int(time.time()))}}}, f)
    raise SystemExit(code)

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):          # one line, not the usage block
        if message.startswith("argument --"):                # "--L must be >= 0, got -1"
            message = message.replace("argument ", "", 1).replace(": ", " ", 1)
        stop(f"error: {message} (see python {self.prog} --help)")

def ranged(kind=int, low=None, high=None, above=None, below=None, inf=False):
    """An argparse `type=`: a finite number (+inf too if `inf`) in [low, high] and (above, below)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value) and not (inf and value == math.inf):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        for bound, holds, word in ((low, operator.ge, ">="), (high, operator.le, "<="),
                                   (above, operator.gt, ">"), (below, operator.lt, "<")):
            if bound is not None and not holds(value, bound):
                raise argparse.ArgumentTypeError(f"must be {word} {bound}, got {text}")
        return value
    parse.__name__ = kind.__name__      # the kind of number, for --help and the flag sweeps of the tests
    return parse

SEED = ranged(int, 0, 2**32 - 1)        # numpy's seeds are 32-bit

def note_unused(args, parser, unused):
    """A one-line note for each flag of `unused` ({dest: why it has no effect}) set away from its default."""
    for dest, why in unused.items():
        if (value := getattr(args, dest)) != parser.get_default(dest):
            print0(f"note: --{dest.replace('_', '-')}{'' if isinstance(value, bool) else f' {value}'} has no effect "
                   f"here ({why})")

def read_json(path, what="file"):
    """A JSON object from a file; missing, corrupt, cut short or not an object is a UserError."""
    try:
        with open(path, encoding="utf-8") as f:
            if isinstance(value := json.load(f), dict):
                return value
    except (ValueError, OSError) as e:          # JSONDecodeError and UnicodeDecodeError are ValueErrors
        value = e
    import explain  # which of the three, in one line
    raise explain.bad_json(path, what, value)

def read_jsonl(path):
    """The records of a JSON-lines file; a last line cut short by a kill is left out, a corrupt one elsewhere refused."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for lineno, line in enumerate(lines, 1):
        try:
            records += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as e:
            if lineno < len(lines):           # not the unterminated last line
                raise UserError(f"{path}:{lineno}: corrupt line ({e.msg})") from None
    return records

def read_safetensors_file(file, names=None):
    """The tensors of one safetensors file (all, or those in `names`), on the CPU."""
    try:
        with safe_open(file, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys() if names is None or key in names}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{file}: not a readable safetensors file ({type(e).__name__}: {one_line(e)}); "
                        "it is truncated or corrupt: restore or re-create it") from None

# -----------------------------------------------------------------------------
# Ranks: `python x.py` is one process; torchrun sets RANK, LOCAL_RANK, WORLD_SIZE

def compute_init():
    """Join torchrun's process group if any (nccl on CUDA, gloo elsewhere); (ddp, rank, world_size, device)."""
    ddp = "RANK" in os.environ
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.enable_cudnn_sdp(False)   # its masked backward gives NaN on torch 2.11 (pytorch#196678)
    else:
        device = torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if ddp and not dist.is_initialized():
        # an hour (NCCL's default is 10 minutes): ranks wait while one generates longer or rank 0 saves
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1),
                                device_id=device if device.type == "cuda" else None)
    return ddp, rank, world_size, device

def distributed():
    return dist.is_available() and dist.is_initialized()

def compute_cleanup(wait_for_all=False):
    if distributed():
        if wait_for_all:            # a finished run: rank 0 may still be writing (after an error a peer may be gone)
            dist.barrier()
        dist.destroy_process_group()

def is_master():
    return int(os.environ.get("RANK", 0)) == 0

def print0(*args, **kwargs):
    if is_master():
        print(*args, **kwargs, flush=True)

def run_main(main):
    """main(): a UserError is one line (exit code 2); Ctrl-C or SIGTERM, where the run stopped and how to continue (130)."""
    if threading.current_thread() is threading.main_thread():     # signals reach this thread only
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        main()
        compute_cleanup(wait_for_all=True)
    except UserError as e:
        stop(f"error: {e}")
    except KeyboardInterrupt:
        stop("interrupted" + (f" ({RunDir.current.interrupted()})" if RunDir.current else ""), code=130)
    finally:
        compute_cleanup()

def on_master(fn):
    """fn() on rank 0; its result, or the UserError it raised, on every rank (so all ranks stop together)."""
    try:
        box = [fn() if is_master() else None]
    except UserError as e:
        box = [e]
    if distributed():
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], UserError):
        raise box[0]
    return box[0]

def all_reduce_sum(values, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if distributed():
        dist.all_reduce(t)
    return t.tolist()

def all_reduce_mean(values, device):
    return [v / (dist.get_world_size() if distributed() else 1) for v in all_reduce_sum(values, device)]

def gather_objects(items):
    """Every rank's list of small picklable items, joined in rank order, on every rank."""
    if not distributed():
        return list(items)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]

def sync_gradients(model, bucket_numel=2**26):
    """Average the gradients over ranks (no gradient counts as zeros), so that the weights stay equal: the
    one place replicated ranks synchronise. Gradients travel in flat buckets of one dtype (memory.py counts
    one), so a 4B model needs a few all-reduce calls, not one per parameter."""
    if not distributed():
        return
    grads, bucket = [], []
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad
            grads.append(p.grad)
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
    if distributed():
        sums = gather_objects([sum(p.detach().double().sum().item() for p in model.parameters())])
        if len(set(sums)) > 1:
            raise RuntimeError(f"ranks hold different weights: checksums {sums}")
        print0(f"weights identical on {len(sums)} ranks (checksum {sums[0]:.6f})")

def progress(iterable, desc, total=None, initial=0):
    """tqdm on rank 0: live in a terminal, an update every 30 s when stderr is a log file."""
    bar = tqdm(iterable, desc=desc, total=total, initial=initial, disable=not is_master(), dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 30)
    bar.set_postfix = functools.partial(bar.set_postfix, refresh=False)     # shown at the next update, not forced
    return bar

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

def derived_seed(*parts):
    """A 63-bit seed of `parts` alone (seed, step, name): the same on every rank, batch size and resume."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1

# -----------------------------------------------------------------------------
# Files written whole or not at all; the run directory (a lock, args.json, metrics.jsonl) and its checkpoints

def to_json(obj, **kwargs):
    return json.dumps(obj, default=lambda x: x.tolist(), **kwargs)     # numpy arrays and scalars too

def _write_failed(path, e):
    reason = e.strerror if isinstance(e, OSError) and e.strerror else one_line(e)
    return UserError(f"could not write {path} ({reason}); what was there before is kept")

@contextlib.contextmanager
def atomic_dir(path, file=False):
    """Yield a temporary sibling .tmp-* directory (a file name if `file`) to fill, fsynced and renamed to `path`
    when the block ends; a failed write is a UserError and leaves nothing (RunDir clears what a kill leaves)."""
    path = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}-{os.getpid()}-{threading.get_ident()}")
    try:
        remove(tmp)
        os.makedirs(os.path.dirname(tmp) if file else tmp, exist_ok=file)
        yield tmp
        for name in [tmp] if file else [os.path.join(r, n) for r, _, names in os.walk(tmp) for n in names]:
            with open(name, "rb") as f:
                os.fsync(f.fileno())
        if not file and os.path.exists(path):
            os.rename(path, f"{tmp}-old")           # a directory cannot be renamed over a full one
        (os.replace if file else os.rename)(tmp, path)
    except (OSError, SafetensorError) as e:
        raise _write_failed(path, e) from None
    finally:
        remove(tmp)
        remove(f"{tmp}-old")

def atomic_write_text(path, text):
    with atomic_dir(path, file=True) as tmp, open(tmp, "w") as f:
        f.write(text)

def atomic_write_json(path, obj):
    atomic_write_text(path, to_json(obj, indent=2) + "\n")

def remove(path):                   # a file or a directory tree, if there
    shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.path.exists(path) and os.remove(path)

# Flags a resumed run may change: how often it logs, evaluates or saves, --steps upward, and how the
# memory is used (micro-batches and recomputation change the order of float sums, not the objective).
MAY_CHANGE = {"resume", "eval_every", "save_every", "micro_batch_size", "activation_checkpointing"}

class RunDir:
    """A stage's --out, locked by rank 0 (the OS frees the lock when the process dies); .checkpoint: to resume from."""
    current = None          # this process's run, for the interrupt message

    def __init__(self, path, args, resume=False):
        self.path, self.args, self.master = path, args, is_master()
        self.checkpoint = on_master(lambda: self._open(resume))     # every rank learns what rank 0 found
        RunDir.current = self

    def _open(self, resume):
        if os.path.isfile(self.path):
            raise UserError(f"--out {self.path} is a file, not a directory; choose another --out")
        os.makedirs(self.path, exist_ok=True)
        self.lock = FileLock(self.file(".lock"), is_singleton=True)   # one process may reopen its run
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            raise UserError(f"{self.path} is in use by another run; wait for it to finish or choose another --out") from None
        for name in os.listdir(self.path):
            if name.startswith(".tmp-"):                # what a killed write left: never complete
                remove(self.file(name))
        if resume:
            return self._resumable()
        if written := sorted(n for n in os.listdir(self.path) if n in ("metrics.jsonl", "model") or n[:11] == "checkpoint-"):
            raise UserError(f"{self.path} already holds a run ({', '.join(written)}): " + (
                "add --resume to continue it, or choose a new --out" if hasattr(self.args, "resume")
                else "choose a new --out, or delete it to start over"))
        atomic_write_json(self.file("args.json"), vars(self.args))

    def _resumable(self):
        """The newest complete checkpoint, if the flags that define the run are those of args.json."""
        damaged = {path: lacks for path in checkpoints(self.path) if (lacks := missing(path))}
        for path, lacks in damaged.items():
            print(f"warning: {path} is not a complete checkpoint; it is not resumed from (it lacks "
                  f"{', '.join(lacks)})", flush=True)
        if (last := latest_checkpoint(self.path)) is None:
            why = f"{max(damaged)} lacks {', '.join(damaged[max(damaged)])}" if damaged else \
                "the run stopped before its first one"
            raise UserError(f"--resume: {self.path} holds no complete checkpoint to continue from ({why}); delete it "
                            "or choose a new --out, and start without --resume")
        def same(v):            # paths compared resolved, data specs (domain=path,...) part by part
            return ",".join(f"{d}{eq}{os.path.realpath(p) if os.path.exists(p) else p}"
                            for d, eq, p in (item.rpartition("=") for item in v.split(","))) if isinstance(v, str) else v
        saved, now = read_json(self.file("args.json"), "the run's flags"), json.loads(to_json(vars(self.args)))
        if differ := [f"--{k.replace('_', '-')} {saved[k]} -> {now[k]}" for k in sorted(set(saved) & set(now) - MAY_CHANGE)
                      if same(saved[k]) != same(now[k]) and not (k == "steps" and now[k] >= saved[k])]:
            raise UserError(f"--resume: flags that define the run differ from {self.file('args.json')}: "
                            f"{', '.join(differ)}; resume with the original flags, or choose a new --out")
        return last

    def begin(self, step):          # resumed, its checkpoint loaded: args.json and the logs before `step`
        if self.master and self.checkpoint:
            atomic_write_json(self.file("args.json"), vars(self.args))
            for name in ("metrics.jsonl", "samples.jsonl"):
                if os.path.exists(self.file(name)):
                    kept = [r for r in read_jsonl(self.file(name)) if r.get("step", -1) < step]
                    atomic_write_text(self.file(name), "".join(json.dumps(r) + "\n" for r in kept))

    def file(self, name):
        return os.path.join(self.path, name)

    def log(self, *records, name="metrics.jsonl"):
        """Append one JSON line per record (rank 0) in one write; a failed append is cut back, and is one line."""
        if self.master:
            line = "".join(to_json(record) + "\n" for record in records).encode()
            with open(self.file(name), "ab", buffering=0) as f:     # unbuffered: the write fails here
                size = f.tell()
                try:
                    if f.write(line) != len(line):              # a short write is a full disk too
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                except OSError as e:
                    f.truncate(size)
                    raise UserError(f"{_write_failed(self.file(name), e)}; {kept_note(self.path)}") from None

    def interrupted(self):
        launcher = f"torchrun --nproc_per_node {n}" if (n := os.environ.get("LOCAL_WORLD_SIZE")) else "python"
        if last := latest_checkpoint(self.path):
            argv = sys.argv + ([] if "--resume" in sys.argv else ["--resume"])
            return f"{self.path}: last checkpoint {last}; continue with: {launcher} {shlex.join(argv)}"
        return f"{self.path}: no checkpoint was written yet; start again with: {launcher} {shlex.join(sys.argv)}"

CHECKPOINT_FILES = ("trainer_state.json", "optimizer.safetensors", "model/config.json", "model/model.safetensors")

def missing(path):
    return [name for name in CHECKPOINT_FILES if not os.path.isfile(os.path.join(path, name))]

def is_complete(path):
    return not missing(path)

def checkpoints(out):
    """The paths of the checkpoint-NNNNNN entries of `out`, whole or not, oldest first (other names are not ours)."""
    names = [n for n in os.listdir(out) if n[:11] == "checkpoint-" and n[11:].isdecimal()] if os.path.isdir(out) else []
    return [os.path.join(out, n) for n in sorted(names, key=lambda n: int(n[11:]))]

def latest_checkpoint(out):
    return next((path for path in reversed(checkpoints(out)) if is_complete(path)), None)

def kept_note(out):
    return f"the last checkpoint, {last}, is kept" if (last := latest_checkpoint(out)) else "no checkpoint had been written yet"

def save_checkpoint(out, step, model, opt_state, trainer_state=None, keep=1):
    """Write out/checkpoint-{step:06d}/, then remove those before the newest `keep` complete ones up to it (a file
    is not this run's)."""
    path = os.path.join(out, f"checkpoint-{step:06d}")
    if not is_complete(path):          # one already there (a resumed run reaching it again) is never rewritten
        try:
            with atomic_dir(path) as tmp:
                model.save_pretrained(os.path.join(tmp, "model"))
                state = opt_state["state"]
                save_file({f"{p}.{k}": torch.as_tensor(v).detach().cpu().contiguous() for p, s in state.items()
                           for k, v in s.items()}, os.path.join(tmp, "optimizer.safetensors"))
                atomic_write_json(os.path.join(tmp, "trainer_state.json"), {"step": step, "param_groups": opt_state[
                    "param_groups"], "state_layout": {p: sorted(s) for p, s in state.items()}, **(trainer_state or {})})
        except UserError as e:
            raise UserError(f"{e}; {kept_note(out)}") from None
    mine = checkpoints(out)
    mine = mine[:mine.index(path) + 1]          # a newer entry is not this run's
    for old in mine[:mine.index([p for p in mine if is_complete(p)][-keep:][0])]:
        if os.path.isdir(old):
            remove(old)
    return path

def load_checkpoint(path, key=int):
    """(trainer_state, optimiser state dict) of a checkpoint; parameters keyed by key(name). key None: no
    optimiser state is read (fsdp.Sharded's ranks but 0, to which rank 0 broadcasts it)."""
    trainer = read_json(os.path.join(path, "trainer_state.json"), "checkpoint state")
    tensors = read_safetensors_file(os.path.join(path, "optimizer.safetensors")) if key else {}
    try:
        trainer["step"] = int(trainer["step"])
        if key is None:
            return trainer, None
        state = {key(p): {k: tensors[f"{p}.{k}"] for k in keys} for p, keys in trainer["state_layout"].items()}
        return trainer, {"state": state, "param_groups": trainer["param_groups"]}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: the checkpoint is incomplete or damaged ({type(e).__name__}: {e}); resume from "
                        "an older checkpoint (move this one away) or start again in a new --out") from None

def checkpoint(run, step, model, opt, trainer_state):
    """checkpoint-{step} of a training run (model: Replicated or fsdp.Sharded): weights, optimiser state and
    trainer_state; every random draw is a function of --seed and the step, so no RNG state. Non-finite weights
    are never written: the run stops. Returns the whole model (under FSDP, rank 0's copy)."""
    if all_reduce_mean([float(model.all_finite())], model.device)[0] < 1.0:
        raise UserError(f"non-finite weights after step {step - 1}, so no checkpoint is written; "
                        f"{kept_note(run.path)}; lower --lr or use --dtype float32")
    whole, opt_state = model.whole(opt)
    if run.master:
        save_checkpoint(run.path, step, whole, opt_state, trainer_state)
    if distributed():
        dist.barrier()
    return whole

def resume(run, opt, model):
    """The trainer state of the run's newest checkpoint, its optimiser state loaded into opt."""
    trainer, opt_state = load_checkpoint(run.checkpoint, key=model.optimizer_key)
    try:
        model.load_optimizer_state(opt, opt_state)
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"{run.checkpoint}: its optimiser state does not fit this model ({e}); resume "
                        "with the flags that wrote it") from None
    print0(f"resumed from {run.checkpoint} at step {trainer['step']}")
    return trainer

class Replicated:
    """Data parallelism by hand (fsdp.Sharded has the same methods): every rank holds the whole fp32 model;
    --dtype bfloat16 computes under autocast and samples with a bf16 copy refreshed after each update."""
    optimizer_key = int                          # checkpoints key the optimiser state by parameter index
    before_rollouts = before_microbatch = lambda self: None      # (FSDP gathers its shards here)

    def __init__(self, model, bf16):
        self.module, self.device = model, model.embed_tokens.weight.device
        self.autocast = functools.partial(torch.autocast, self.device.type, dtype=torch.bfloat16, enabled=bf16)
        self.sampler = model
        if bf16:
            self.sampler = copy.deepcopy(model).to(torch.bfloat16).requires_grad_(False)
            self.sampler.inv_freq = model.inv_freq                       # RoPE's frequencies stay fp32

    def __getattr__(self, name):                 # the model's own attributes (embed_tokens, lm_head, ...)
        return getattr(self.module, name)

    def sync_and_clip(self, max_norm):
        sync_gradients(self.module)              # the one place replicated ranks synchronise
        return float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm))

    def refresh_sampler(self):
        if self.sampler is not self.module:
            self.sampler.load_state_dict(self.module.state_dict())

    def all_finite(self):
        return all(p.detach().isfinite().all() for p in self.module.parameters())

    def whole(self, opt):                        # what a checkpoint holds: the model, the optimiser state
        return self.module, opt.state_dict()

    load_optimizer_state = staticmethod(torch.optim.Optimizer.load_state_dict)    # (opt, state)

    def end(self):
        check_ranks_in_sync(self.module)
