"""Evaluation: M paths per image in chunks of bounded size, with the figures of one pass."""

import numpy as np
import torch

from config import TrainConfig
from data_loader import Batching, ImageBatches, make_loader
from model import RecurrentAttention
from modules import ModelConfig
from trainer import evaluate

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
