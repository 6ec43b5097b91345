"""Evaluation: M paths per image in chunks of bounded size, with the figures of one pass."""

import math

import numpy as np
import torch

from config import TrainConfig
from data_loader import Batching, ImageBatches, make_loader, to_float
from model import RecurrentAttention, Swapped
from modules import ModelConfig
from trainer import evaluate, evaluate_batch, paired_difference

CPU = torch.device("cpu")


def model_and_loader():
    torch.manual_seed(0)
    model = RecurrentAttention(ModelConfig(glimpse_hidden=16, loc_hidden=16, hidden_size=32,
                                           num_glimpses=3, std=0.3))
    images = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    loader = make_loader(ImageBatches(images, np.arange(12) % 10), Batching(5), shuffle=False)
    return model, loader


def record_pass_sizes(model):
    sizes = []
    forward = model.forward

    def recorded(x, **kwargs):
        sizes.append(x.shape[0] * kwargs.get("paths", 1))  # the rollout runs paths x images
        return forward(x, **kwargs)
    model.forward = recorded
    return sizes


def test_chunked_paths_give_the_figures_of_one_pass_in_bounded_memory():
    model, loader = model_and_loader()
    sizes = record_pass_sizes(model)
    whole = evaluate(model, loader, TrainConfig(M=6, eval_chunk=10_000), CPU)
    assert max(sizes) == 30  # all 6 paths of a batch of 5 at once
    sizes.clear()
    chunked = evaluate(model, loader, TrainConfig(M=6, eval_chunk=10), CPU)
    assert max(sizes) == 10  # two paths of 5 images per pass
    # Equal up to float rounding: with several threads a matrix product's rounding depends on
    # its row count, so passes of another size may differ in the last bits.
    assert chunked.keys() == whole.keys()
    for key, value in whole.items():
        torch.testing.assert_close(torch.tensor(chunked[key], dtype=torch.float64),
                                   torch.tensor(value, dtype=torch.float64),
                                   rtol=1e-6, atol=1e-9, msg=key)
    sizes.clear()
    evaluate(model, loader, TrainConfig(M=60, eval_chunk=10), CPU)
    assert max(sizes) == 10  # whatever M is


def test_paths_differ_and_are_fixed_per_image():
    model, loader = model_and_loader()
    one = evaluate(model, loader, TrainConfig(M=1), CPU)
    again = evaluate(model, loader, TrainConfig(M=1), CPU)
    other_seed = evaluate(model, loader, TrainConfig(M=1, random_seed=2), CPU)
    assert one == again and one["mse"] != other_seed["mse"]


def per_image(model, images, cfg):
    """(predicted class, mean squared error) of each image alone, through evaluate_batch."""
    out = [evaluate_batch(model, to_float(images[i:i + 1], CPU), torch.tensor([i]), cfg)
           for i in range(len(images))]
    return (torch.cat([probs.argmax(-1) for probs, *_ in out]),
            torch.cat([errors for _, errors, *_ in out]))


def test_the_paired_gain_and_its_standard_errors_match_the_per_image_figures():
    # Two differently seeded grid-scan models (no noise), the labels chosen so that each is
    # right where the other is wrong on some images: a difference of both signs.
    cfg = TrainConfig(M=1)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(RecurrentAttention(ModelConfig(glimpse_hidden=16, loc_hidden=16,
                                                     hidden_size=32, num_glimpses=3,
                                                     policy="grid")).eval())
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (40, 3, 32, 32),
                                                                 dtype=np.uint8))
    (p1, e1), (p2, e2) = (per_image(m, images, cfg) for m in models)
    labels = torch.where(torch.arange(40) % 2 == 0, p1, p2)
    d = (p1 == labels).double() - (p2 == labels).double()
    assert (d > 0).any() and (d < 0).any()
    loader = [(images[i:i + 8], labels[i:i + 8], torch.arange(i, i + 8)) for i in range(0, 40, 8)]

    got = paired_difference(models, loader, cfg, CPU)
    n = 40
    assert math.isclose(got["acc_gain"], 100 * d.mean().item(), abs_tol=1e-9)
    assert math.isclose(got["acc_se"], 100 * d.std().item() / math.sqrt(n), rel_tol=1e-9)
    m1, m2 = e1.mean().item(), e2.mean().item()
    # float32 forward passes of 8 images against 1: equal to about 1e-7 of the error
    assert math.isclose(got["psnr_gain"], 10 * math.log10(m2 / m1), rel_tol=1e-4)
    u = e2 / m2 - e1 / m1  # the gain's first-order change per image, in units of ln 10 / 10
    assert math.isclose(got["psnr_se"], 10 / math.log(10) * u.std().item() / math.sqrt(n),
                        rel_tol=1e-4)
    assert math.isclose(got["acc"], 100 * (p2 == labels).double().mean().item())
    assert math.isclose(got["mse"], m2, rel_tol=1e-6)

    same = paired_difference((models[0], models[0]), loader, cfg, CPU)
    assert same["acc_gain"] == same["acc_se"] == 0 and abs(same["psnr_gain"]) < 1e-12
    assert same["psnr_se"] < 1e-6


def test_the_control_glimpses_each_image_along_another_images_own_path():
    torch.manual_seed(0)
    model = RecurrentAttention(ModelConfig(glimpse_hidden=16, loc_hidden=16, hidden_size=32,
                                           num_glimpses=3, std=0.3)).eval()
    with torch.no_grad():  # a policy whose aims differ from image to image
        model.locator.fc_mu.weight.mul_(50)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        aims = model(x, decode="last", noise=torch.zeros(3, 4, 2)).loc_means  # (T, B, 2)
        # evaluation noise is handed in, as evaluate does; the control must not use it
        got = Swapped(model)(x, decode="last", noise=torch.randn(3, 4, 2))
        assert (aims[:, 0] - aims[:, 1]).abs().max() > 0.05
        for b in range(4):
            alone = model(x[b:b + 1], decode="last", path=aims[:, b - 1])  # the previous's
            assert torch.allclose(got.locations[:, b], aims[:, b - 1])
            assert torch.allclose(got.errors[-1][b], alone.errors[-1][0], atol=1e-6)
            assert torch.allclose(got.log_probs[b], alone.log_probs[0], atol=1e-5)
