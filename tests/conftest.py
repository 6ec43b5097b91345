"""Shared fixtures: the repository on sys.path, and a tiny CIFAR-10 and MNIST in torchvision's
layouts."""

import gzip
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_tiny_cifar(folder, per_batch=40, num_test=40, seed=0):
    """Write `cifar-10-batches-py/` as the official release lays it out, with few images.

    Returns the arrays written, as (N, 32, 32, 3) uint8 images and uint8 labels.
    """
    rng = np.random.default_rng(seed)
    batches = os.path.join(folder, "cifar-10-batches-py")
    os.makedirs(batches, exist_ok=True)
    written = {"train_x": [], "train_y": []}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = num_test if name == "test_batch" else per_batch
        images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        rows = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # official: R, G, B planes
        with open(os.path.join(batches, name), "wb") as f:
            pickle.dump({"data": rows, "labels": labels, "batch_label": name}, f)
        if name == "test_batch":
            written["test_x"], written["test_y"] = images, np.asarray(labels, np.uint8)
        else:
            written["train_x"].append(images)
            written["train_y"].append(np.asarray(labels, np.uint8))
    written["train_x"] = np.concatenate(written["train_x"])
    written["train_y"] = np.concatenate(written["train_y"])
    return written


@pytest.fixture
def tiny_cifar(tmp_path):
    """A data folder holding a tiny CIFAR-10 (200 train, 40 test images)."""
    data_dir = tmp_path / "data"
    arrays = write_tiny_cifar(str(data_dir))
    return data_dir, arrays


def write_idx(path, array):
    """An idx file of uint8 as MNIST's originals are laid out (gzipped if the name says so)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def write_tiny_mnist(folder, num_train=120, num_test=30, seed=0, gz=False):
    """Write `MNIST/raw/` with synthetic 28x28 "digits": a bright rectangle whose size depends
    on the label, on black. Returns the arrays written."""
    rng = np.random.default_rng(seed)
    raw = os.path.join(folder, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    written = {}
    for split, n, prefix in (("train", num_train, "train"), ("test", num_test, "t10k")):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = np.zeros((n, 28, 28), np.uint8)
        for i, label in enumerate(labels):
            images[i, 4:8 + 2 * label, 6:20] = rng.integers(128, 256)
        suffix = ".gz" if gz else ""
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte{suffix}"), images)
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte{suffix}"), labels)
        written[f"{split}_x"], written[f"{split}_y"] = images, labels
    return written


@pytest.fixture
def tiny_mnist(tmp_path):
    """A data folder holding a tiny MNIST (120 train, 30 test digits)."""
    data_dir = tmp_path / "data"
    return data_dir, write_tiny_mnist(str(data_dir))


def run_main(*flags, cwd=ROOT, timeout=600):
    """Run main.py in a real subprocess, as a user would."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *flags], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
