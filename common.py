"""Shared plumbing for every stage: torchrun/DDP set-up, printing on rank 0, seeding, one-line
errors, progress bars, the run directory (args.json, metrics.jsonl, a lock, resume checks),
atomic writes and checkpoint save/resume.

Every script works unchanged with or without torchrun:

    python rl.py ...                          # one process, ddp off
    torchrun --nproc_per_node 8 rl.py ...     # RANK / LOCAL_RANK / WORLD_SIZE set by torchrun
"""

import argparse
import atexit
import contextlib
import json
import math
import os
import random
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time

import numpy as np
import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem with the user's input: reported as one clear line, never a stack trace."""


def one_line(text):
    """Collapse a message onto one line (the user sees exactly one)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def stop(line, code=2):
    """Print one line on rank 0 and exit every rank with the same code. Under torchrun the line
    also goes into the elastic error file, so torchrun's failure summary ends with it."""
    line = one_line(line)
    print0(line, file=sys.stderr)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with contextlib.suppress(OSError):
            with open(error_file, "w") as f:   # the format torchrun shows as the failure's "traceback"
                json.dump({"message": {"message": line, "extraInfo": {
                    "py_callstack": line, "timestamp": str(int(time.time()))}}}, f)
    raise SystemExit(code)


def die(message):
    """Stop with one clear message (on every rank, printed once)."""
    stop(f"error: {message}")


def run_main(main):
    """Run a script's main(): a UserError becomes one clear line and exit code 2; Ctrl-C (or a
    SIGTERM from a scheduler or torchrun) becomes one line saying where the run stopped and how to
    continue it, and exit code 130."""
    if _in_main_thread():
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        main()
        compute_cleanup(wait_for_all=True)
    except UserError as e:
        die(str(e))
    except KeyboardInterrupt:
        stop(interrupted_message(), code=130)
    finally:
        release_locks()
        compute_cleanup()


def _in_main_thread():
    return threading.current_thread() is threading.main_thread()


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (not the whole usage), printed once under torchrun."""

    def error(self, message):
        stop(f"error: {message} (see python {self.prog} --help)")


# -----------------------------------------------------------------------------
# Checking flags right after parsing. Each helper names the flag and its allowed range; NaN fails
# every comparison, so it is refused along with out-of-range values.

def flag(name):
    return "--" + name.replace("_", "-")


def at_least(minimum, **flags):
    """Refuse any flag (given as name=value) below minimum; None means 'not given' and passes."""
    for name, value in flags.items():
        if value is not None and not value >= minimum:
            raise UserError(f"{flag(name)} must be >= {minimum}, got {value}")


def at_most(maximum, **flags):
    for name, value in flags.items():
        if value is not None and not value <= maximum:
            raise UserError(f"{flag(name)} must be <= {maximum}, got {value}")


def finite(**flags):
    for name, value in flags.items():
        if value is not None and not math.isfinite(value):
            raise UserError(f"{flag(name)} must be a finite number, got {value}")


def positive(**flags):
    for name, value in flags.items():
        if value is not None and not value > 0:
            raise UserError(f"{flag(name)} must be > 0, got {value}")


SEED_MAX = 2**32 - 1   # numpy's seeds are 32-bit


def check_seed(seed):
    if not 0 <= seed <= SEED_MAX:
        raise UserError(f"--seed must be in [0, {SEED_MAX}], got {seed}")


def check_out_dir(path, what="--out"):
    """An output directory must be a directory (or not exist yet)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what} {path} is a file, not a directory; choose another {what}")


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


def compute_cleanup(wait_for_all=False):
    """Tear down the process group. After a finished run every rank first waits for the others
    (wait_for_all): rank 0 may still be writing the final model while the others are done, and a
    rank that shuts down its connections while a peer still holds the group open can abort at
    exit (SIGABRT) although its work is saved. After an error no rank waits: a peer may be gone."""
    if dist.is_available() and dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()


def is_master():
    return ddp_info()[1] == 0


def print0(*args, **kwargs):
    if is_master():
        print(*args, **kwargs, flush=True)


def on_master(fn):
    """Run fn() on rank 0 only and give its result to every rank; a UserError it raises is raised
    on every rank, so all ranks stop together with the same exit code instead of waiting for rank 0
    in the next collective."""
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


# FSDP2 (--fsdp): each rank keeps 1/world of every weight, gradient and optimiser moment. One unit
# per decoder layer plus the root (embedding, final norm, lm_head). The training path reads the
# root's weights outside Transformer.forward (embed_rows, token_logprobs_and_entropy), so FSDP's
# forward hooks cannot gather them: fsdp_before_backward gathers the root by hand before each
# micro-batch; its gradients are reduce-scattered in FSDP's end-of-backward callback, after the
# embedding's gradient has arrived, and it is resharded there. The layers gather themselves.

def fsdp_shard(model):
    """Shard a Transformer in place with FSDP2 over all ranks; returns it (now an FSDPModule).
    Build the optimiser after this, on the sharded parameters."""
    from torch.distributed.fsdp import fully_shard
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    # The first forward decides which unit is the root; make it the whole model, not a layer
    # that generation happens to run first.
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=model.inv_freq.device))
    model.reshard()   # the root stays gathered after a forward; the optimiser must get the shards
    return model


def fsdp_units(model):
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def fsdp_unshard_for_generation(model):
    """Gather every unit and keep it whole until fsdp_before_backward: decoding runs a different
    number of forward passes on each rank, so it must not all-gather layer by layer."""
    for unit in fsdp_units(model):
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()


def fsdp_before_backward(model):
    """Before each training micro-batch: the layers back to their shards (they gather
    themselves in forward and free themselves after), the root gathered by hand (see above).
    A no-op for a model that is not sharded."""
    units = fsdp_units(model)
    for unit in units:
        if unit is not model:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)
    if units:
        model.unshard()


def local_shard(t):
    """This rank's part of a (possibly sharded) tensor."""
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def full_value(t):
    """A scalar or tensor that FSDP may return as a DTensor (a gradient norm), as a plain tensor."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def fsdp_full_state(model, opt=None):
    """(weights, optimiser state or None), gathered to whole tensors on the CPU of rank 0 (empty on
    the others); the optimiser's state is keyed by parameter name. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    for unit in fsdp_units(model):   # the state is read from the shards the optimiser holds
        unit.reshard()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            None if opt is None else get_optimizer_state_dict(model, opt, options=options))


def fsdp_whole_model(sharded, weights):
    """A plain Transformer holding the gathered `weights` (rank 0), to save as an HF directory."""
    from model import Transformer
    with torch.device("meta"):
        model = Transformer(sharded.config)
    if model.config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    model.load_state_dict(weights, strict=True, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.source_dir = sharded.source_dir
    return model


def fsdp_load_optimizer_state(model, opt, state):
    """Load a whole optimiser state (keyed by parameter name, as fsdp_full_state gives it, present
    on every rank) into the sharded optimiser: each rank keeps its part."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))


# -----------------------------------------------------------------------------
# Progress bars: a live tqdm bar in a terminal; in a log file, a plain line now and then

class _LogLines:
    """What a progress bar becomes when stderr is a file: one plain line after the first step,
    then at most one every `every_s` seconds, and one at the end (tqdm would add a line per
    update, hundreds of KB for a few minutes of training)."""

    def __init__(self, iterable, desc, total, initial, every_s):
        self.iterable, self.desc, self.initial, self.every_s = iterable, desc, initial, every_s
        self.total = total if total is not None else \
            (initial + len(iterable) if hasattr(iterable, "__len__") else None)
        self.postfix = {}

    def set_postfix(self, **values):
        self.postfix = values

    def _line(self, n, start):
        elapsed = time.time() - start
        done = n - self.initial
        parts = [f"{self.desc}: {n}" + (f"/{self.total}" if self.total else "")]
        if done and self.total:
            eta = elapsed / done * (self.total - n)
            parts.append(f"{elapsed:.0f}s elapsed, {eta:.0f}s left")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        print(" | ".join(parts), file=sys.stderr, flush=True)

    def __iter__(self):
        start = last = time.time()
        n = self.initial
        for item in self.iterable:
            yield item
            n += 1
            now = time.time()
            if n == self.initial + 1 or now - last >= self.every_s:
                self._line(n, start)
                last = now
        if n > self.initial + 1:
            self._line(n, start)


class _Silent:
    def __init__(self, iterable):
        self.iterable = iterable

    def set_postfix(self, **values):
        pass

    def __iter__(self):
        return iter(self.iterable)


def progress(iterable, desc, total=None, initial=0, every_s=30.0):
    """A progress bar over a stage's steps, shown on rank 0 only. Use it as tqdm:
        for step in progress(range(start, steps), "rl", total=steps, initial=start):
            ...; bar.set_postfix(reward=...)"""
    if not is_master():
        return _Silent(iterable)
    if sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(iterable, desc=desc, total=total, initial=initial, dynamic_ncols=True)
    return _LogLines(iterable, desc, total, initial, every_s)


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
# Reading the JSON files stages depend on

def read_json(path, what="file", kind=dict):
    """A JSON file (trainer_state.json, args.json, results.json, ...) as a Python value; a missing,
    corrupt or cut-short file, or one holding the wrong kind of value, is a UserError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{what} {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} is corrupt or cut short ({one_line(e)}); restore it, or "
                        "start again without it") from None
    except OSError as e:
        raise UserError(f"{what} {path}: cannot be read ({one_line(e)})") from None
    if kind is not None and not isinstance(value, kind):
        raise UserError(f"{what} {path}: expected a JSON {'object' if kind is dict else kind.__name__}, "
                        f"found {type(value).__name__}; restore it, or start again without it")
    return value


def read_jsonl(path):
    """Records of a JSON-lines file. A last line cut short by a kill is left out; a corrupt line
    elsewhere is a UserError naming the file and line."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if lineno == len(lines):          # the last line, with no newline after it
                break
            raise UserError(f"{path}:{lineno}: corrupt line ({e.msg})") from None
    return records


# -----------------------------------------------------------------------------
# Atomic writes: a file or directory is either the old one or the complete new one, never half

def atomic_write_text(path, text):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")


def replace_readme_section(readme, name, section):
    """Rewrite the text between `<!-- NAME:start -->` and `<!-- NAME:end -->` in a README (the
    reports' maintainer step); the markers must already be there, so a report never decides where
    in the README its section goes."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = open(readme).read()
    if start not in text or end not in text:
        raise UserError(f"{readme} has no {start} ... {end} markers: add them where the section belongs")
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    atomic_write_text(readme, f"{before}{start}\n{section.strip()}\n{end}{after}")


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


@contextlib.contextmanager
def signals_deferred():
    """Hold Ctrl-C and SIGTERM until the block ends, so a few renames that belong together are
    never cut apart by an interrupt (a SIGKILL still can: recover_leftovers handles that)."""
    if not _in_main_thread():
        yield
        return
    caught = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for s in caught[:1]:
            signal.raise_signal(s)      # delivered now, to the handler the program had


def _fsync_tree(root):
    """Flush a directory's files and the directory entries to disk before it is renamed in."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(dirpath)


def _fsync_dir(path):
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_save_dir(path, write_fn):
    """Write a whole directory atomically: write_fn(tmp_dir) fills a sibling temp directory,
    which then replaces `path`. The steps, and what a kill at each leaves:
        write_fn fills .tmp-NAME-x      killed here: .tmp- is half written; NAME is intact
        .tmp-NAME-x -> .new-NAME-x      .new- is complete
        NAME -> .old-NAME-x             NAME is missing: .new- (complete, newer) is renamed in
        .new-NAME-x -> NAME             by recover_leftovers at the next start
        remove .old-NAME-x
    so the expected name always comes back complete, new or previous."""
    path = os.path.abspath(path)
    parent, name = os.path.dirname(path), os.path.basename(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{name}-")
    suffix = os.path.basename(tmp)[len(f".tmp-{name}-"):]
    new, old = os.path.join(parent, f".new-{name}-{suffix}"), os.path.join(parent, f".old-{name}-{suffix}")
    try:
        write_fn(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with signals_deferred():
        os.replace(tmp, new)
        had_old = os.path.exists(path)
        if had_old:
            os.replace(path, old)
        os.replace(new, path)
        _fsync_dir(parent)
        if had_old:
            shutil.rmtree(old, ignore_errors=True)


def recover_leftovers(directory):
    """Finish or undo what a killed atomic save left in `directory`, and remove its leftovers.
    NAME missing: the newest complete .new-NAME-* (else .old-NAME-*) is renamed back to NAME.
    NAME present: a complete .new-NAME-* is newer than NAME and replaces it. Half-written .tmp-*
    files and directories are removed. Returns one note per recovered directory."""
    if not os.path.isdir(directory):
        return []
    notes, groups = [], {}
    for entry in os.listdir(directory):
        full = os.path.join(directory, entry)
        kind = entry[1:4] if entry[:5] in (".tmp-", ".new-", ".old-") else None
        if kind is None:
            continue
        if kind == "tmp":
            shutil.rmtree(full, ignore_errors=True) if os.path.isdir(full) else os.remove(full)
            continue
        name = entry[5:].rsplit("-", 1)[0]
        groups.setdefault(name, {"new": [], "old": []})[kind].append(full)
    for name, found in groups.items():
        target = os.path.join(directory, name)
        newest = lambda paths: max(paths, key=os.path.getmtime)
        source = newest(found["new"]) if found["new"] else \
            (newest(found["old"]) if not os.path.exists(target) else None)
        if source:
            if os.path.exists(target):
                shutil.rmtree(target)
            os.replace(source, target)
            which = "the save the run was making when it stopped" if "/.new-" in source \
                else "the previous one (the run stopped while replacing it)"
            notes.append(f"recovered {target} from {os.path.basename(source)}: {which}")
        for leftover in found["new"] + found["old"]:
            if os.path.exists(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
    return notes


# -----------------------------------------------------------------------------
# The lock that keeps two runs out of one output directory

_held_locks = set()


def _process_start(pid):
    """The start time of a process (Linux /proc), so a reused pid is not taken for the holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid, start):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or _process_start(pid) in (None, start)


def acquire_lock(directory):
    """Create directory/.lock naming this process (pid, host, command), or refuse in one line if
    a live process holds it. A lock left by a process that is gone is taken over with a note."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, ".lock")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
          "command": command_line(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".lock-")   # not a .tmp-: no run cleans it away
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    notes = []
    try:
        for _ in range(2):
            try:
                os.link(tmp, path)        # fails if the lock exists: creation is atomic
                break
            except FileExistsError:
                pass
            try:
                with open(path) as f:
                    holder = json.load(f)
                pid = int(holder["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                holder, pid = None, None
            if holder and pid == os.getpid() and holder.get("host") == me["host"]:
                break                      # this process already holds it
            if holder and holder.get("host") != me["host"]:
                raise UserError(f"{directory} is in use by pid {pid} on host {holder.get('host')} "
                                f"({holder.get('command')}); wait for it to finish, choose another "
                                f"--out, or delete {path} if that process is gone")
            if holder and _alive(pid, holder.get("start")):
                raise UserError(f"{directory} is in use by pid {pid} since {holder.get('since')} "
                                f"({holder.get('command')}); wait for it to finish or choose another --out")
            notes.append(f"note: took over the lock of {directory} from "
                         f"{'pid ' + str(pid) if holder else 'an unreadable lock file'}, which is no longer running")
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        else:
            raise UserError(f"{directory} was locked by another run just now; choose another --out")
    finally:
        os.remove(tmp)
    _held_locks.add(path)
    return notes


def release_locks():
    """Remove the locks this process holds (run_main calls it at exit; a killed process leaves
    its lock behind, and the next run takes it over)."""
    for path in list(_held_locks):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            with open(path) as f:
                pid = json.load(f)["pid"]
            if pid == os.getpid():
                os.remove(path)
        _held_locks.discard(path)


atexit.register(release_locks)


# -----------------------------------------------------------------------------
# Run directory: args.json, metrics.jsonl (append-only, one JSON object per step), a lock,
# and the checks that keep a resumed run the same run

def command_line(resume=False):
    """The command that started this process, as a user would type it (with --resume added)."""
    argv = list(sys.argv)
    if resume and "--resume" not in argv:
        argv.append("--resume")
    script = shlex.join([os.path.relpath(argv[0]) if os.path.isabs(argv[0]) else argv[0], *argv[1:]])
    ddp, _, _, world = ddp_info()
    if ddp:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        return f"torchrun --nproc_per_node {local} {script}" if local == world else \
            f"torchrun (the same launch flags) {script}"
    return f"python {script}"


_current_run = {"run": None, "hint": None}


def set_interrupt_hint(text):
    """What a stage without a run directory says after Ctrl-C (e.g. where partial output is)."""
    _current_run["hint"] = text


def interrupted_message():
    run, hint = _current_run["run"], _current_run["hint"]
    if run is None:
        return "interrupted" + (f"; {hint}" if hint else "")
    return run.interrupted_message()


# Flags a resumed run may change: they do not define the run (how often it logs, evaluates or
# saves). --steps may grow (train longer); a smaller --steps would end before the checkpoint.
MAY_CHANGE = ("resume", "eval_every", "save_every", "sample_every", "log_every")
MAY_GROW = ("steps",)


class RunDir:
    LOGS = ("metrics.jsonl", "samples.jsonl", "summary.jsonl")

    def __init__(self, path, args=None, master=True, resume=False, *, checkpoint="checkpoint",
                 may_change=MAY_CHANGE, may_grow=MAY_GROW):
        """A run's directory, guarded so that no run is lost or mixed with another:
        - a lock (.lock, naming the process) keeps a second run out while this one works;
        - what a killed checkpoint save left behind is recovered or removed;
        - a run without --resume is refused if the directory holds a checkpoint or logs of a run,
          and --resume is refused if it holds logs but no checkpoint (nothing would continue);
        - on resume, the flags that define the run must equal those in args.json: others are
          refused in one line; those in may_change (and may_grow, upward) change with a record
          in resumes.jsonl; a log line cut short by a kill is dropped.
        `resume` says whether the caller resumes; with args that have a `resume` flag, args.resume
        is what the user asked for. self.resuming: a checkpoint is there to resume from."""
        self.path = path
        self.master = master
        self.args = args
        self.checkpoint = os.path.join(path, checkpoint)
        self.supports_resume = args is not None and hasattr(args, "resume")
        self.last_step = None
        asked = bool(getattr(args, "resume", resume)) if args is not None else bool(resume)
        # rank 0 checks and prepares the directory; every rank gets its answer (or its refusal)
        answer = on_master(lambda: self._open(asked, bool(resume), may_change, may_grow))
        self.resuming, notes = answer if answer is not None else (False, [])   # ranks without DDP
        for note in notes:
            print0(note)
        _current_run["run"] = self

    def _open(self, asked, caller_resumes, may_change, may_grow):
        check_out_dir(self.path)
        os.makedirs(self.path, exist_ok=True)
        notes = acquire_lock(self.path)
        notes += recover_leftovers(self.path)
        recovered = any(self.checkpoint in n for n in notes)
        has_checkpoint = os.path.isdir(self.checkpoint)
        logs = [name for name in self.LOGS if os.path.exists(self.file(name))]
        found = ", ".join(([os.path.basename(self.checkpoint) + "/"] if has_checkpoint else []) + logs)
        if not asked and found:
            raise UserError(f"{self.path} already holds a run ({found}): " + (
                "add --resume to continue it, or choose a new --out" if self.supports_resume
                else f"choose a new --out, or delete {self.path} to start over"))
        if asked and not has_checkpoint and logs:
            raise UserError(f"--resume: {self.path} holds logs of a run ({', '.join(logs)}) but no "
                            f"checkpoint to continue from; choose a new --out, or delete {self.path} "
                            "to start over")
        if asked and has_checkpoint and not caller_resumes:
            raise UserError(f"{self.checkpoint} " + (
                "was just recovered from an interrupted save; run the same command again to resume from it"
                if recovered else "is incomplete; choose a new --out, or delete it to start over"))
        resuming = asked and has_checkpoint
        if asked and not has_checkpoint:
            notes.append(f"note: no checkpoint in {self.path} yet: starting a new run")
        if resuming:
            notes += self._compare_args(may_change, may_grow)
            for name in logs:
                notes += self._drop_cut_short_line(name)
        if self.args is not None:
            atomic_write_json(self.file("args.json"), vars(self.args))
        return resuming, notes

    def _compare_args(self, may_change, may_grow):
        """Refuse a resume whose run-defining flags differ from args.json; record allowed changes."""
        saved_path = self.file("args.json")
        if self.args is None or not os.path.exists(saved_path):
            return [f"note: {saved_path} is missing: the flags of the resumed run cannot be checked"]
        saved = read_json(saved_path, "the run's flags")
        now = json.loads(json.dumps(_jsonable(vars(self.args))))
        changed, refused = {}, []
        for name in sorted(set(saved) & set(now)):
            old, new = saved[name], now[name]
            if old == new or name in ("resume",):
                continue
            if name in may_change or (name in may_grow and isinstance(new, (int, float))
                                      and isinstance(old, (int, float)) and new >= old):
                changed[name] = [old, new]
            else:
                refused.append(f"{flag(name)} {old} -> {new}" + (" (may only grow)" if name in may_grow else ""))
        if refused:
            raise UserError(f"--resume: flags that define the run differ from {saved_path}: "
                            f"{', '.join(refused)}; resume with the original flags, or choose a new --out")
        if not changed:
            return []
        with open(self.file("resumes.jsonl"), "a") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "changed": changed,
                                "command": command_line()}) + "\n")
        return ["note: resuming with " + ", ".join(f"{flag(k)} {a} -> {b}" for k, (a, b) in changed.items())
                + f" (recorded in {self.file('resumes.jsonl')})"]

    def _drop_cut_short_line(self, name):
        path = self.file(name)
        with open(path, "rb") as f:
            data = f.read()
        if not data or data.endswith(b"\n"):
            return []
        keep = data[:data.rfind(b"\n") + 1]
        atomic_write_text(path, keep.decode("utf-8", errors="replace"))
        return [f"note: dropped the cut-short last line of {path} (written as the run was stopped)"]

    def file(self, name):
        return os.path.join(self.path, name)

    def log(self, record, name="metrics.jsonl"):
        if isinstance(record.get("step"), int):
            self.last_step = max(record["step"], self.last_step if self.last_step is not None else -1)
        if self.master:
            with open(self.file(name), "a") as f:
                f.write(json.dumps(_jsonable(record)) + "\n")

    def truncate_log(self, after_step, name="metrics.jsonl"):
        """On resume, drop records newer than the checkpoint so the log has each step once."""
        path = self.file(name)
        if not (self.master and os.path.exists(path)):
            return
        records = read_jsonl(path)
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records
                                        if r.get("step", -1) <= after_step))

    def interrupted_message(self):
        """One line for Ctrl-C: where the run stopped, its last checkpoint, and how to go on."""
        where = "before its first step" if self.last_step is None else f"at step {self.last_step + 1}"
        line = f"interrupted {where} ({self.path})"
        if os.path.isdir(self.checkpoint):
            step = ""
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                with open(os.path.join(self.checkpoint, "trainer_state.json")) as f:
                    step = f" (step {json.load(f)['step']})"
            return line + f"; last complete checkpoint: {self.checkpoint}{step}" + \
                f"; continue with: {command_line(resume=True)}"
        kept = "no checkpoint was written yet" if self.supports_resume else \
            "this stage saves only at the end, so nothing was kept"
        if not any(os.path.exists(self.file(name)) for name in self.LOGS):
            return line + f"; {kept}; start again with: {command_line()}"
        return line + f"; {kept}; start again with a new --out, or delete {self.path} first"
