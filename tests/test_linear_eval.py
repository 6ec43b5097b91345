"""The offline linear evaluation: a logistic regression on frozen features."""

import json
import os
import sys

import pytest
import torch

from conftest import ROOT
from utils import L2_CHOICES, linear_evaluation

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import linear_baselines  # noqa: E402


def blobs(n, seed, shift=3.0):
    """Three classes of 5-d points around different means (separable), labels (n,)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    means = torch.eye(3, 5) * shift  # (3, 5)
    return means[labels] + torch.randn(n, 5, generator=g), labels


def test_separable_classes_are_found():
    result = linear_evaluation(blobs(300, 0), blobs(90, 1), blobs(90, 2), num_classes=3)
    assert result["test_acc"] > 95 and result["valid_acc"] > 95
    assert result["l2"] in L2_CHOICES


def test_labels_the_features_do_not_carry_give_chance():
    g = torch.Generator().manual_seed(0)

    def noise(n):
        return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)

    result = linear_evaluation(noise(300), noise(300), noise(600), num_classes=3)
    assert 20 < result["test_acc"] < 47  # chance is 33%


def test_the_scale_of_a_feature_does_not_matter():
    (x, y), valid, test = blobs(300, 0), blobs(90, 1), blobs(90, 2)
    scale = torch.tensor([1e-4, 1e3, 1.0, 1e-2, 10.0])
    plain = linear_evaluation((x, y), valid, test, num_classes=3)
    scaled = linear_evaluation((x * scale, y), (valid[0] * scale, valid[1]),
                               (test[0] * scale, test[1]), num_classes=3)
    assert abs(plain["test_acc"] - scaled["test_acc"]) < 2


def test_principal_directions_are_orthonormal_sorted_and_exact_at_full_width():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(200, 6, generator=g) * torch.tensor([3.0, 0.1, 1.0, 0.2, 2.0, 0.5])
    mean, basis = linear_baselines.pca(images, 3)
    torch.testing.assert_close(basis.T @ basis, torch.eye(3), atol=1e-5, rtol=0)
    spread = ((images - mean) @ basis).var(0)
    assert spread[0] > spread[1] > spread[2]
    assert torch.argmax(basis[:, 0].abs()) == 0  # the widest axis comes first
    _, full = linear_baselines.pca(images, 6)
    assert linear_baselines.reconstruction_psnr(images, mean, full) > 100
    assert linear_baselines.reconstruction_psnr(images, mean, basis) < 40


def test_the_baseline_script_prints_one_json_line(tiny_cifar, capsys):
    data_dir, _ = tiny_cifar
    linear_baselines.main(["--features=pca", "--components=8", f"--data_dir={data_dir}"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # after any warning
    assert result["features"] == "pca" and result["width"] == 8
    assert 0 <= result["test_acc"] <= 100 and result["test_psnr"] > 0
    with pytest.raises(SystemExit, match="--components must be between 1 and 3072"):
        linear_baselines.main(["--components=4000", f"--data_dir={data_dir}"])
