"""What the MNIST benchmarks need of the model: pure RAM without a decoder, and the hit rate."""

import dataclasses

import pytest
import torch

import modules
from config import TrainConfig, model_config, parse_args
from conftest import run_main
from data_loader import Batching, make_loader
from datasets import DataSpec, load_data
from model import LossWeights, RecurrentAttention, compute_losses, glimpse_hits
from modules import ModelConfig
from plot_glimpses import load_glimpse_data, write_glimpse_data, write_sheet
from trainer import evaluate

CANVAS = dict(image_size=40, num_channels=1, pixel_mean=(0.1,), pixel_std=(0.3,),
              patch_size=8, num_patches=2, num_glimpses=3, hidden_size=32, glimpse_hidden=16,
              loc_hidden=16)


def test_pure_ram_is_the_supervised_objective_without_reconstruction():
    pure = model_config(parse_args(["--objective=supervised", "--recon_weight=0"]))
    assert not pure.decoder
    assert model_config(parse_args(["--objective=supervised"])).decoder
    assert model_config(parse_args(["--recon_weight=0"])).decoder  # its reward needs one
    with pytest.raises(ValueError, match="needs the decoder"):
        ModelConfig(decoder=False)


def test_pure_ram_has_no_decoder_and_never_calls_one(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the decoder ran")
    for name in ("errors", "direct_errors", "forward", "steps"):
        monkeypatch.setattr(modules.Decoder, name, forbidden)
    cfg = ModelConfig(**CANVAS, objective="supervised", decoder=False)
    model = RecurrentAttention(cfg)
    assert not any(name.startswith("decoder") for name, _ in model.named_parameters())
    x, y = torch.rand(6, 1, 40, 40), torch.randint(0, 10, (6,))
    losses = compute_losses(model(x), y, cfg, LossWeights(recon_weight=0.0))
    losses["total"].backward()
    assert losses["recon"].item() == 0.0
    assert all(p.grad is not None for p in model.core.parameters())
    plots = model(x, decode="plots")
    assert plots.recon is None and plots.patches.shape[:2] == (3, 6)


def test_pure_ram_trains_exactly_like_the_hybrid_loss_with_reconstruction_weight_zero():
    """Same initial weights, same noise: the same loss and the same gradient for every
    parameter the two models share; the decoder only cost time."""
    cfg = ModelConfig(**CANVAS, objective="supervised")
    x, y = torch.rand(6, 1, 40, 40), torch.randint(0, 10, (6,))
    noise = torch.randn(3, 6, 2)
    weights = LossWeights(recon_weight=0.0)
    results = []
    for decoder in (True, False):
        torch.manual_seed(0)
        model = RecurrentAttention(dataclasses.replace(cfg, decoder=decoder))
        losses = compute_losses(model(x, noise=noise), y, model.cfg, weights)
        losses["total"].backward()
        results.append((losses["total"].item(),
                        {n: p.grad for n, p in model.named_parameters()
                         if not n.startswith("decoder")}))
    (hybrid_loss, hybrid), (pure_loss, pure) = results
    assert hybrid_loss == pytest.approx(pure_loss, rel=1e-6)
    assert hybrid.keys() == pure.keys()
    for name in pure:
        assert torch.allclose(hybrid[name], pure[name], atol=1e-6), name


def test_a_glimpse_hits_when_its_centre_pixel_is_inside_the_box():
    # 40 px image: location x maps to pixel 20 (x + 1); box columns 10..37, rows 0..27.
    boxes = torch.tensor([[10, 0, 38, 28]])
    l = torch.tensor([[[-0.5, -1.0]], [[-0.55, 0.0]], [[0.85, 0.35]], [[0.9, 0.35]]])
    # centres (10, 0) in; (9, 20) left of it; (37, 27) last pixel in; (38, 27) just out
    assert glimpse_hits(l, boxes, 40)[:, 0].tolist() == [True, False, True, False]


def test_evaluation_reports_the_hit_rate_where_the_dataset_has_boxes(tiny_mnist):
    data_dir, _ = tiny_mnist
    data = load_data(DataSpec("translated", 40, 0), str(data_dir), 0.1, seed=1)
    cfg = ModelConfig(**CANVAS, policy="centre")
    model = RecurrentAttention(cfg)
    loader = make_loader(data.test, Batching(7), shuffle=False)
    result = evaluate(model, loader, TrainConfig(M=1), torch.device("cpu"))
    boxes = data.test.boxes(torch.arange(len(data.test)))
    inside = ((boxes[:, :2] <= 20) & (boxes[:, 2:] > 20)).all(1).double().mean().item() * 100
    assert result["hit_rate"] == pytest.approx([inside] * 3)
    assert result["any_hit"] == pytest.approx(inside)
    cifar_like = make_loader(data.train, Batching(7), shuffle=False)
    cifar_like.dataset.boxes = lambda positions: None
    assert "hit_rate" not in evaluate(model, cifar_like, TrainConfig(M=1), torch.device("cpu"))


def test_glimpse_sheet_of_a_model_without_decoder(tmp_path):
    model = RecurrentAttention(ModelConfig(**CANVAS, objective="supervised", decoder=False))
    path = write_glimpse_data(model, torch.rand(2, 1, 40, 40), 1, str(tmp_path))
    data = load_glimpse_data(path)
    assert "recon" not in data
    write_sheet(data, str(tmp_path / "sheet.png"))
    assert (tmp_path / "sheet.png").stat().st_size > 0


def test_translated_digits_train_and_test_through_main(tiny_mnist, tmp_path):
    data_dir, _ = tiny_mnist
    common = [f"--data_dir={data_dir}", "--dataset=translated", "--canvas_size=40",
              "--objective=supervised", "--recon_weight=0", "--num_glimpses=3",
              "--hidden_size=32", "--batch_size=16", "--M=2", f"--ckpt_dir={tmp_path / 'ckpt'}",
              f"--plot_dir={tmp_path / 'plots'}"]
    trained = run_main("--epochs=1", *common)
    assert trained.returncode == 0, trained.stderr
    name = "ram_translated40_3_12x12_2_k2_supervised_nodecoder"  # 2 scales on 40 px
    assert (tmp_path / "ckpt" / name / "best.pth").is_file()
    assert "psnr nan" in trained.stdout  # no decoder, no reconstruction
    tested = run_main("--is_train=False", *common)
    assert tested.returncode == 0, tested.stderr
    assert "hit rate (% of glimpses centred in the digit's box)" in tested.stdout
    assert "no reconstruction (no decoder)" in tested.stdout and "nan" not in tested.stdout
    assert "linear evaluation" in tested.stdout


def test_dataset_defaults_fill_only_the_flags_left_open():
    mnist = model_config(parse_args(["--dataset=mnist"]))
    assert (mnist.num_glimpses, mnist.patch_size, mnist.num_patches, mnist.std) == (6, 8, 1, 0.15)
    assert (mnist.image_size, mnist.num_channels) == (28, 1)
    chosen = model_config(parse_args(["--dataset=cluttered", "--canvas_size=100", "--std=0.1",
                                      "--num_glimpses=4"]))
    assert (chosen.num_glimpses, chosen.num_patches, chosen.std, chosen.image_size) == (
        4, 4, 0.1, 100)
    assert chosen.dataset == "cluttered100d8"  # 8 distractors on 100 px, as in the paper
