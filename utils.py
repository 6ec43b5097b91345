"""Small helpers shared by the entry point, the trainer and the data loader."""

import os
import random
import tempfile

import numpy as np
import torch


class UserError(Exception):
    """A problem the user can fix; main.py prints it as one line and exits with code 2."""


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


def pick_device(name):
    """'auto' picks CUDA, then MPS, then the CPU; anything else is passed to torch.device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device={name} is not a device; use auto, cpu, cuda, cuda:N or mps") \
            from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={name} but CUDA is not available here; use --device=cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device={name} but MPS is not available here; use --device=cpu")
    return device


def autocast(device, enabled):
    """bf16 autocast on `device` when `enabled` (--amp), a no-op context otherwise."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def atomic_write(path, write):
    """Write a file so that a crash at any moment leaves either the old file or the new one.

    `write(f)` fills a temporary file in the same folder; it is flushed, fsynced and renamed
    over `path`, and the folder is fsynced so the rename itself survives a power cut.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def check_writable(folder, flag):
    """Create `folder` if needed and make sure files can be written in it."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{flag}={folder} cannot be written ({e.strerror}); "
                        f"pass a folder you can write to") from None
