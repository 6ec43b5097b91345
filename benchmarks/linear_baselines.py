"""What the offline linear evaluation gives on CIFAR-10 without any model: the reference for the
code's figure (`main.py --is_train=False --linear_eval=True`).

    python3 benchmarks/linear_baselines.py --features=pca --components=256
    python3 benchmarks/linear_baselines.py --features=pixels

The splits are main.py's (datasets.load_data: 45,000 training images, the fixed validation
share of 5,000, the 10,000 test images) and so is the fit (utils.linear_evaluation: features
standardised, logistic regression by L-BFGS for each L2 strength, the best on validation).
`pca` projects the pixels in [0, 1] onto the training images' first --components principal
directions: the code of the best linear autoencoder of that width, the limit a linear
decoder's code would reach if it reconstructed perfectly for its width; the test images'
reconstruction PSNR from that code is printed beside it. Prints one JSON line.
"""

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets import DataSpec, load_data  # noqa: E402
from utils import UserError, linear_evaluation  # noqa: E402


def splits(data_dir, valid_size):
    """(pixels in [0, 1] (N, C*H*W), labels (N,)) of the training, validation and test images."""
    data = load_data(DataSpec("cifar10"), data_dir, valid_size, seed=0)
    return [(split.images.flatten(1).float().div_(255.0), split.labels)
            for split in (data.train, data.valid, data.test)]


def pca(train, components):
    """The mean (D,) of the rows of `train` and their first `components` principal directions,
    (D, components), orthonormal columns."""
    mean = train.double().mean(0)
    centred = train.double() - mean
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    return mean.float(), vectors[:, -components:].flip(1).float()


def reconstruction_psnr(images, mean, basis):
    """PSNR (dB) of `images` in [0, 1] rebuilt from their projection on `basis`."""
    rebuilt = (images - mean) @ basis @ basis.T + mean
    return -10.0 * math.log10((rebuilt - images).pow(2).mean().item())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", choices=("pixels", "pca"), default="pca")
    parser.add_argument("--components", type=int, default=256, help="width of the PCA code")
    parser.add_argument("--data_dir", default="./data")
    parser.add_argument("--valid_size", type=float, default=0.1, help="as main.py's")
    args = parser.parse_args(argv)
    try:
        data = splits(args.data_dir, args.valid_size)
    except UserError as e:
        sys.exit(f"linear_baselines.py: error: {e}")
    width, extra, start = data[0][0].shape[1], {}, time.perf_counter()
    if args.features == "pca":
        if not 0 < args.components <= width:
            sys.exit(f"linear_baselines.py: error: --components must be between 1 and {width}, "
                     f"got {args.components}")
        mean, basis = pca(data[0][0], args.components)
        extra["test_psnr"] = round(reconstruction_psnr(data[2][0], mean, basis), 2)
        data = [(features @ basis, labels) for features, labels in data]
    result = linear_evaluation(*data, num_classes=10)
    print(json.dumps({"features": args.features, "width": data[0][0].shape[1], **result,
                      **extra, "seconds": round(time.perf_counter() - start)}), flush=True)


if __name__ == "__main__":
    main()
