"""--contrast_dim=N: SimCLR's contrastive loss on the code, with two random views of every
training image (datasets.random_view, datasets.TwoViews, model.contrastive_loss)."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import main
import plot_glimpses
from config import TrainConfig, loss_weights, model_config, model_name, parse_args
from conftest import ROOT
from data_loader import ImageBatches
from datasets import GREY_WEIGHTS, TwoViews, random_view
from model import LossWeights, RecurrentAttention, compute_losses, contrastive_loss
from modules import ModelConfig
from trainer import EpochTally, resume_changes
from utils import SINGLE_PROCESS, UserError

SMALL = dict(glimpse_hidden=16, loc_hidden=8, hidden_size=32, num_glimpses=3, contrast_dim=8)
TINY = ["--batch_size=20", "--M=1", "--num_glimpses=3", "--hidden_size=32",
        "--glimpse_hidden=16", "--loc_hidden=16", "--linear_eval=false"]
# One view's draws: the whole image (area 1, square), no flip, colours unchanged, in colour.
PLAIN = [1 - 1e-12, 0.5, 0.5, 0.5, 0.9, 0.5, 0.5, 0.5, 0.9]


def draws(n, **changes):
    """(n, VIEW_DRAWS) draws of random_view: PLAIN with the named entries changed."""
    names = ("area", "ratio", "x", "y", "flip", "brightness", "contrast", "saturation", "grey")
    row = dict(zip(names, PLAIN, strict=True)) | changes
    return torch.tensor([[row[name] for name in names]] * n, dtype=torch.float64)


def test_a_view_of_the_whole_image_is_the_image_and_a_flip_mirrors_it():
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(random_view(images, draws(3)), images)
    assert torch.equal(random_view(images, draws(3, flip=0.1)), images.flip(-1))


def test_a_crop_is_the_hand_computed_resized_window():
    # Column j of the image holds 8 j. Area 0.2 + 0.8 * 0.0625 = 1/4, square: the top-left
    # 16 x 16 window, resized to 32 x 32. Output column j samples input column (2j - 1) / 4
    # (align_corners=False), held at the edge pixel below 0.
    ramp = (torch.arange(32) * 8).to(torch.uint8).view(1, 1, 1, 32).expand(1, 3, 32, 32)
    view = random_view(ramp.contiguous(), draws(1, area=0.0625, x=0.0, y=0.0))
    expected = [round(8 * max((2 * j - 1) / 4, 0)) for j in range(32)]
    assert view[0, 0, 0].tolist() == expected
    assert torch.equal(view[0, :, 5], view[0, :, 0])  # every row the same ramp


def test_colour_changes_follow_their_formulas():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (2, 3, 8, 8), dtype=np.uint8))
    x = images.float() / 255
    # Brightness 1 + 0.4 (2 * 0.75 - 1) = 1.2, clipped.
    bright = random_view(images, draws(2, brightness=0.75))
    assert (bright.int() - (x * 1.2).clamp(0, 1).mul(255).round().int()).abs().max() <= 1
    # Grey: every channel the luma.
    grey = random_view(images, draws(2, grey=0.1))
    luma = (x * torch.tensor(GREY_WEIGHTS).view(1, 3, 1, 1)).sum(1)
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    assert (grey[:, 0].int() - luma.mul(255).round().int()).abs().max() <= 1
    # Contrast 0.6 pulls every pixel 40% of the way to the image's mean luma.
    dull = random_view(images, draws(2, contrast=0.0))
    mean = luma.mean((1, 2)).view(2, 1, 1, 1)
    expected = (mean + (x - mean) * 0.6).clamp(0, 1)
    assert (dull.int() - expected.mul(255).round().int()).abs().max() <= 1
    # Saturation 0.6 pulls every pixel 40% of the way to its own luma.
    pale = random_view(images, draws(2, saturation=0.0))
    expected = (luma.unsqueeze(1) + (x - luma.unsqueeze(1)) * 0.6).clamp(0, 1)
    assert (pale.int() - expected.mul(255).round().int()).abs().max() <= 1


def stored_images(n=12, seed=0):
    images = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return ImageBatches(images, np.arange(n, dtype=np.uint8) % 10)


def test_two_views_of_each_image_fixed_by_the_seed_the_epoch_and_the_image():
    index = np.arange(12)
    images, labels, positions = TwoViews(stored_images(), seed=1)[index, 0]
    assert images.shape == (24, 3, 32, 32)
    assert torch.equal(labels, stored_images().labels[index].repeat(2))
    assert positions.tolist() == list(range(12)) * 2
    first, second = images[:12], images[12:]
    assert not torch.equal(first, second)
    again = TwoViews(stored_images(), seed=1)[index[5:8], 0][0]  # in other company
    assert torch.equal(again, torch.cat([first[5:8], second[5:8]]))
    assert not torch.equal(TwoViews(stored_images(), seed=1)[index, 1][0], images)
    assert not torch.equal(TwoViews(stored_images(), seed=2)[index, 0][0], images)
    stored = stored_images()
    assert torch.equal(TwoViews(stored, seed=1)[index, None][0], stored.images)  # evaluation


def test_contrastive_loss_is_the_hand_computed_nt_xent():
    torch.manual_seed(0)
    z = torch.randn(6, 4)
    tau = 0.3
    unit = [v / v.norm() for v in z]
    total = 0.0
    for i in range(6):
        logits = {j: float(unit[i] @ unit[j]) / tau for j in range(6) if j != i}
        partner = (i + 3) % 6
        total -= logits[partner] - math.log(sum(math.exp(v) for v in logits.values()))
    assert contrastive_loss(z, tau).item() == pytest.approx(total / 6, rel=1e-5)
    # Two views that agree and differ from every other image score lower than random ones.
    base = torch.eye(3, 4) * 5
    assert contrastive_loss(torch.cat([base, base]), tau) < contrastive_loss(z, tau)
    with pytest.raises(ValueError, match="two views"):
        contrastive_loss(z[:5], tau)


def test_the_loss_trains_the_code_and_no_label_reaches_it():
    torch.manual_seed(1)
    cfg = ModelConfig(**SMALL)
    model = RecurrentAttention(cfg).train()
    x = torch.rand(8, 3, 32, 32)  # 4 images, two views each
    out = model(x)
    assert out.projection.shape == (8, 8)
    y1, y2 = torch.zeros(8, dtype=torch.long), torch.arange(8) % 10
    first = compute_losses(out, y1, cfg, LossWeights())
    second = compute_losses(out, y2, cfg, LossWeights())
    assert first["contrast"].item() == second["contrast"].item() > 0
    first["contrast"].backward()
    assert model.core.i2h.weight.grad.abs().sum() > 0  # it shapes the code
    assert model.glimpse.fc_phi.weight.grad.abs().sum() > 0
    assert model.classifier.fc.weight.grad is None  # the probe's labels are elsewhere
    model.eval()
    with torch.no_grad():
        assert model(x).projection is None  # evaluation leaves the head out
        assert model.train()(x, paths=2).projection is None  # views pair up on one path only
        model.eval()
    assert compute_losses(model(x), y1, cfg, LossWeights())["contrast"].item() == 0
    plain = ModelConfig(**{**SMALL, "contrast_dim": None})
    assert RecurrentAttention(plain).projector is None


def test_images_per_second_counts_images_not_views():
    assert ModelConfig(**SMALL).views == 2 and ModelConfig().views == 1
    tally = EpochTally(views=ModelConfig(**SMALL).views)
    losses = {name: torch.tensor(1.0) for name in
              ("recon", "classify", "reinforce", "baseline", "entropy", "contrast", "total")}
    tally.add(losses, torch.tensor(10), 40)
    metrics = tally.metrics(SINGLE_PROCESS, elapsed=2.0)
    assert metrics["train_images_per_s"] == 10.0 and metrics["train_acc"] == 25.0


def test_flags_name_the_run_train_test_and_refuse_what_has_no_sense(tiny_cifar, tmp_path,
                                                                    capsys):
    cfg = model_config(parse_args(["--contrast_dim=64", "--temperature=0.2"]))
    assert (cfg.contrast_dim, cfg.temperature) == (64, 0.2)
    assert model_name(cfg) == "ram_9_6x6_2_contrast64_temp0.2"
    with pytest.raises(ValueError, match="add --contrast_dim"):
        ModelConfig(temperature=0.2)
    with pytest.raises(UserError, match="add --contrast_dim"):
        loss_weights(parse_args(["--contrast_weight=0.5"]))
    with pytest.raises(ValueError, match="cifar10"):
        ModelConfig(dataset="mnist", image_size=28, num_channels=1, pixel_mean=(0.1,),
                    pixel_std=(0.3,), contrast_dim=8)
    # A run from before --contrast_dim had no contrastive loss: its weights compare equal.
    weights = {k: v for k, v in dataclasses.asdict(LossWeights()).items()
               if k != "contrast_weight"}
    ckpt = {"train_config": dataclasses.asdict(TrainConfig()), "loss_weights": weights}
    assert resume_changes(ckpt, TrainConfig(), LossWeights()) == []
    data_dir, _ = tiny_cifar
    flags = [f"--data_dir={data_dir}", f"--ckpt_dir={tmp_path / 'ckpt'}",
             f"--plot_dir={tmp_path / 'plots'}", *TINY, "--contrast_dim=8"]
    assert main.main([*flags, "--epochs=1"]) == 0
    folder = tmp_path / "ckpt" / "ram_3_6x6_2_contrast8"
    line = json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])
    assert line["train_contrast"] > 0
    panels = [key for key, _ in plot_glimpses.curve_panels({"run": [line]})]
    assert "train_contrast" in panels
    assert " contrast " in capsys.readouterr().out  # in the epoch's summary line
    assert main.main([*flags, "--is_train=false"]) == 0
    capsys.readouterr()
    for bad, message in ((["--augment=true"], "leave --augment out"),
                         (["--temperature=0"], "above 0")):
        try:
            code = main.main([*flags, "--epochs=1", *bad])
        except SystemExit as stop:  # argparse's own refusals
            code = stop.code
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err


def test_the_benchmark_counts_two_views_per_image():
    def flops(*extra):
        done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"),
                               "--seconds=0.3", "--threads=1", "--num_glimpses=3",
                               "--hidden_size=32", "--policy=grid", *extra],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])["train_flops_per_image"]

    # 16 images as 32 rollouts against 32 images, each of one rollout: per image, twice the
    # arithmetic, plus the small head and the similarities.
    ratio = flops("--contrast_dim=8", "--batch_size=16") / flops("--batch_size=32")
    assert 2.0 <= ratio < 2.1
