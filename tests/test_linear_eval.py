"""The offline linear evaluation: a logistic regression on frozen features."""

import torch

from utils import L2_CHOICES, linear_evaluation


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
