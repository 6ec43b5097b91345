"""What the offline linear evaluation gives on CIFAR-10 without any model: the reference for the
code's figure (`main.py --is_train=False --linear_eval=True`).

    python3 benchmarks/linear_baselines.py --features=pca --components=256
    python3 benchmarks/linear_baselines.py --features=pixels

The same splits as main.py (45,000 training images, the 5,000 of the fixed validation share,
the 10,000 test images) and the same fit (utils.linear_evaluation: features standardised,
logistic regression by L-BFGS for each L2 strength, the best on validation). `pca` projects the
pixels in [0, 1] onto the training images' first --components principal directions: the code
of the best linear autoencoder of that width, which a linear decoder's code tends towards as its
reconstruction improves. Prints one JSON line.
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_loader import load_cifar10, train_valid_split  # noqa: E402
from utils import UserError, linear_evaluation  # noqa: E402


def pixels(images):
    """uint8 (N, H, W, C) -> float32 (N, H*W*C) in [0, 1]."""
    return torch.from_numpy(images).flatten(1).float().div_(255.0)


def principal_directions(train, components):
    """The first `components` principal directions of the rows of `train`: (D, components)."""
    centred = train.double() - train.double().mean(0)
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    return vectors[:, -components:].flip(1).float()


def splits(data_dir):
    """(features, labels) of the training, validation and test images, as pixels."""
    arrays = load_cifar10(data_dir)
    x, y = pixels(arrays["train_x"]), torch.from_numpy(arrays["train_y"]).long()
    train_idx, valid_idx = train_valid_split(len(y), 0.1)
    test = (pixels(arrays["test_x"]), torch.from_numpy(arrays["test_y"]).long())
    return (x[train_idx], y[train_idx]), (x[valid_idx], y[valid_idx]), test


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", choices=("pixels", "pca"), default="pca")
    parser.add_argument("--components", type=int, default=256, help="width of the PCA code")
    parser.add_argument("--data_dir", default="./data")
    args = parser.parse_args(argv)
    try:
        data = splits(args.data_dir)
    except UserError as e:
        sys.exit(f"linear_baselines.py: error: {e}")
    start = time.perf_counter()
    if args.features == "pca":
        if not 0 < args.components <= data[0][0].shape[1]:
            sys.exit(f"linear_baselines.py: error: --components must be between 1 and "
                     f"{data[0][0].shape[1]}, got {args.components}")
        basis = principal_directions(data[0][0], args.components)
        data = [(features @ basis, labels) for features, labels in data]
    result = linear_evaluation(*data, num_classes=10)
    print(json.dumps({"features": args.features, "width": data[0][0].shape[1], **result,
                      "seconds": round(time.perf_counter() - start)}), flush=True)


if __name__ == "__main__":
    main()
