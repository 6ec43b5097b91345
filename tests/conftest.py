"""Shared fixtures: the repository on sys.path and a tiny CIFAR-10 in torchvision's layout."""

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


def run_main(*flags, cwd=ROOT, timeout=600):
    """Run main.py in a real subprocess, as a user would."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *flags], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
