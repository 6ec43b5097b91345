"""Small helpers shared by the entry point, the trainer and the data loader."""

import argparse
import contextlib
import errno
import faulthandler
import fcntl
import gc
import os
import random
import socket
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm


class UserError(Exception):
    """A problem the user can fix; main.py prints it as one line and exits with code 2."""


class WriteError(OSError):
    """A file could not be written (a full disk, ...); the file it was to replace is intact.
    Its message is one line naming the file; `errno` is the original error's."""

    def __init__(self, message, errno=None):
        super().__init__(message)
        self.errno = errno


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump) with exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def str2bool(text):
    """Parse a boolean flag strictly: true/false in any case, nothing else."""
    lowered = str(text).strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    raise ValueError(f"expected true or false, got {text!r}")


def seed_everything(seed):
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Procs:
    """Where this process stands in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


SINGLE_PROCESS = Procs()


def torchrun_world_size():
    """The number of processes torchrun started (its WORLD_SIZE), 1 in a plain run."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device):
    """Join torchrun's process group when its environment is set; plain runs get Procs().

    gloo on the CPU; on CUDA nccl, one GPU per process (cuda:LOCAL_RANK), with gloo beside it
    for the CPU tensors.
    Returns the Procs and the device this process uses.
    """
    world_size = torchrun_world_size()
    if world_size == 1:
        return Procs(), device
    procs = Procs(int(os.environ["RANK"]), world_size, int(os.environ["LOCAL_RANK"]))
    # A rank that dies in C++ (SIGABRT, SIGSEGV) prints its Python stacks first, so that the
    # job's log says where.
    faulthandler.enable()
    if device.type == "cuda":
        device = torch.device("cuda", procs.local_rank)
        torch.cuda.set_device(device)
    # On CUDA, nccl for the model's tensors and gloo for the CPU ones (the evaluation's sums,
    # the gathered random states): nccl alone has no CPU backend.
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return procs, device


def close_distributed():
    """Tear torchrun's process group down, if this process joined one, before the interpreter
    exits: the DDP wrapper's reducer holds the group, so what still refers to it is collected
    first, and the group's threads stop here, not in the interpreter's teardown."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def leave(code):
    """Exit with `code`. Under torchrun, without the interpreter's teardown (os._exit, once the
    output is flushed): a rank was seen to abort there now and then ("terminate called
    without an active exception"), turning a finished job into a failed one. By then every
    file is written and closed, and the process group is down (close_distributed)."""
    if torchrun_world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def all_reduce(values, procs, op=None):
    """Sum (or `op`) a 1-D float64 tensor over all processes; unchanged in a plain run."""
    if procs.distributed:
        dist.all_reduce(values, op=op or dist.ReduceOp.SUM)
    return values


def _mps_available():
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(name):
    """'auto' picks CUDA, then MPS, then the CPU; otherwise cpu, cuda, cuda:N or mps, checked
    to exist here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device={name} is not a device this project runs on; use auto, cpu, "
                        "cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={name} but CUDA is not available here; use --device=cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device={name} but this machine has {torch.cuda.device_count()} CUDA "
                        f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not _mps_available():
        raise UserError(f"--device={name} but MPS is not available here; use --device=cpu")
    return device


def autocast(device, enabled):
    """bf16 autocast on `device` when `enabled` (--amp), a no-op context otherwise."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


L2_CHOICES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


def linear_evaluation(train, valid, test, num_classes, max_iter=300):
    """Offline linear evaluation of frozen features: multinomial logistic regression.

    Features are standardised with the training set's statistics; for each L2 strength in
    L2_CHOICES a logistic regression is fitted on `train` to convergence (full-batch L-BFGS,
    float64), the strength with the best `valid` accuracy is kept, and its `test` accuracy is
    the figure. Each split is a (features (N, D), labels (N,)) pair.

    Returns:
        dict with test_acc, valid_acc (in %) and l2, the strength chosen.
    """
    mean = train[0].double().mean(0)
    std = train[0].double().std(0).clamp(min=1e-8)

    def prepare(split):
        features, labels = split
        scaled = (features.double() - mean) / std
        return torch.cat([scaled, torch.ones(len(scaled), 1, dtype=torch.float64)], 1), labels

    (x, y), (vx, vy), (tx, ty) = prepare(train), prepare(valid), prepare(test)

    def accuracy(weight, features, labels):
        return 100.0 * ((features @ weight).argmax(-1) == labels).double().mean().item()

    best = None
    for l2 in L2_CHOICES:
        weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight], max_iter=max_iter, tolerance_grad=1e-9,
                                      tolerance_change=1e-12, history_size=20,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(x @ weight, y) + l2 * weight[:-1].pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            score = accuracy(weight, vx, vy)
            if best is None or score > best["valid_acc"]:
                best = {"valid_acc": score, "test_acc": accuracy(weight, tx, ty), "l2": l2}
    return best


def compile_model(module, device):
    """torch.compile for --compile. On CUDA, "reduce-overhead" replays the step as CUDA graphs:
    at small batches the 9-step rollout is bound by kernel launches, not arithmetic. The CPU
    has no graphs to replay and gets the default mode."""
    return torch.compile(module, mode="reduce-overhead" if device.type == "cuda" else None)


def atomic_write(path, write):
    """Write a file so that a crash at any moment leaves either the old file or the new one.

    `write(f)` fills a temporary file `.<name>.*.tmp` in the same folder; it is flushed, fsynced
    and renamed over `path`, and the folder is fsynced so the rename itself survives a power
    cut. Any OSError on the way (a full disk) removes the temporary and is raised as a
    WriteError; a process killed outright leaves the temporary, which `remove_temporaries`
    deletes.
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.",
                                   suffix=".tmp")
    except OSError as e:
        raise WriteError(write_failure(path, e), e.errno) from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(write_failure(path, e), e.errno) from None
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_failure(path, error):
    """One line for an OSError met while writing `path`: a full disk is named as such."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full (errno {error.errno}) writing {path}"
    return f"could not write {path} ({error.strerror or error}, errno {error.errno})"


def remove_temporaries(folder):
    """Delete what atomic writes that were killed mid-way left in `folder` (`.<name>.*.tmp`).
    Only safe while no other process writes there: call it holding the folder's RunLock."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.startswith(".") and name.endswith(".tmp"):
            os.remove(os.path.join(folder, name))


class RunLock:
    """An exclusive claim on a run folder, so that two runs never write the same checkpoints.

    The file `run.lock` in the folder names the holder (PID and host). The lock itself is
    flock(2) on an open descriptor: the kernel drops it when the process ends in any way,
    kill -9 included, so a crash never leaves a stale lock. (flock may not lock across machines
    on some network file systems.)
    """

    NAME = "run.lock"

    def __init__(self, folder):
        self.folder, self.fd = folder, None

    def acquire(self):
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise UserError(f"{self.folder} is a file, where this run's folder should be; move "
                            "it away or pass another --ckpt_dir")
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the run folder {self.folder} ({e.strerror}); pass "
                            "a --ckpt_dir you can write to") from None
        fd = os.open(os.path.join(self.folder, self.NAME), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "a process"
            os.close(fd)
            raise UserError(f"{self.folder} is in use by another run ({holder}); wait for it to "
                            "end, or pass another --ckpt_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def on_main(procs, action, errors, elsewhere):
    """Run `action()` on rank 0 alone. If it raises one of `errors`, every process raises, so
    that all stop together: rank 0 its error, the others `errors(elsewhere)`."""
    error = None
    if procs.is_main:
        try:
            action()
        except errors as e:
            error = e
    failed = torch.tensor([float(error is not None)], dtype=torch.float64)
    if all_reduce(failed, procs, dist.ReduceOp.MAX).item():
        raise error or errors(elsewhere)


@contextlib.contextmanager
def run_lock(folder, procs):
    """Hold `folder`'s RunLock for the block; under torchrun rank 0 holds it for all."""
    lock = RunLock(folder)
    on_main(procs, lock.acquire, UserError, f"rank 0 could not lock {folder}")
    try:
        yield
    finally:
        lock.release()


def progress(iterable, procs, **kwargs):
    """A tqdm progress bar over `iterable`, drawn only on rank 0 and only when stderr is a
    terminal: in a log file its redraws would pile up as noise."""
    shown = procs.is_main and sys.stderr.isatty()
    return tqdm(iterable, disable=not shown, **kwargs)


def check_writable(folder, flag):
    """Create `folder` if needed and make sure files can be written in it."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{flag}={folder} cannot be written ({e.strerror}); "
                        f"pass a folder you can write to") from None
