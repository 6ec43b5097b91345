"""Checkpoint files: reading them safely, linking them, listing them, and the random streams
they carry. What goes into a checkpoint, and when, is the trainer's business."""

import io
import os
import pickle
import random
import zipfile

import numpy as np
import torch

from utils import UserError, atomic_write

CKPT_SUFFIX = ".pth"


def rng_state():
    """Every random stream, as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def epochs_on_disk(folder):
    """Sorted epoch numbers of the numbered checkpoints in `folder`."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        stem = name[: -len(CKPT_SUFFIX)] if name.endswith(CKPT_SUFFIX) else ""
        if stem.startswith("epoch_") and stem[6:].isdigit():
            found.append(int(stem[6:]))
    return sorted(found)


def to_bytes(state):
    """A checkpoint serialised in memory. Written to the file in one piece from there, a full
    disk surfaces as the OSError it is: torch.save's own zip writer, when a write to the file
    fails, fails again on its way out and raises a RuntimeError instead."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def link_or_copy(src, dst):
    """Make `dst` hold the same bytes as `src`, atomically: a hard link where the file system
    allows one (free and instant), a copy otherwise."""
    tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.link.tmp")
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        with open(src, "rb") as f:
            data = f.read()
        atomic_write(dst, lambda out: out.write(data))


def load_checkpoint(path):
    """Read a checkpoint safely (weights_only: tensors and plain values, no code)."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}")
    # torch.save writes a zip archive, whose directory is at its end: a truncated file is no zip.
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a readable checkpoint (truncated, or another kind of "
                        "file); use another epoch or retrain")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} is not a readable checkpoint: it holds objects other than "
                        "tensors and plain values, refused since loading them could run code; "
                        "use a checkpoint written by this project") from None
    except Exception as e:  # a damaged archive
        raise UserError(f"{path} is not a readable checkpoint (damaged: {type(e).__name__}); "
                        "use another epoch or retrain") from None
    if not isinstance(ckpt, dict) or not {"model", "model_config", "epoch"} <= ckpt.keys():
        raise UserError(f"{path} is not a checkpoint of this project; use another file")
    return ckpt


def load_weights(model, weights, path):
    """Put a checkpoint's weights into `model`; a mismatch is a UserError.

    Checkpoints of the fixed policies written before those policies became weightless modules
    carry an unused location network: its weights are passed over.
    """
    if not any(name.startswith("locator.") for name in model.state_dict()):
        weights = {k: v for k, v in weights.items() if not k.startswith("locator.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"{path} does not fit this model ({first}); use a checkpoint of this "
                        "model") from None
