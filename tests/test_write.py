"""--write=glimpse: the decoder writes each step's detail back where its glimpse was taken,
through the retina's exact adjoint."""

import pytest
import torch
import torch.nn as nn

import main
from config import model_config, model_name, parse_args
from model import LossWeights, RecurrentAttention, compute_losses
from modules import Decoder, ModelConfig, Retina, WritingDecoder

SMALL = dict(glimpse_hidden=16, loc_hidden=8, hidden_size=32, num_glimpses=3)
TINY = ["--batch_size=20", "--M=1", "--num_glimpses=3", "--hidden_size=32",
        "--glimpse_hidden=16", "--loc_hidden=16", "--linear_eval=false"]


def writer(cfg):
    """A WritingDecoder whose V is the identity: `written` of a state is R_l^T of it."""
    decoder = WritingDecoder(cfg)
    decoder.fc_write = nn.Identity()
    return decoder


@pytest.mark.parametrize("size,channels,g,s,k", [(32, 3, 6, 2, 3), (28, 1, 8, 2, 1),
                                                 (20, 2, 4, 3, 2)])
@pytest.mark.parametrize("location_grad", ["none", "pathwise"])
def test_the_write_is_the_retinas_adjoint(size, channels, g, s, k, location_grad):
    # <R_l^T v, x> = <v, R_l x> for every image x, value v and location l, edges included;
    # pathwise, for the retina that reads between pixels.
    cfg = ModelConfig(image_size=size, num_channels=channels, patch_size=g, glimpse_scale=s,
                      num_patches=k, pixel_mean=(0.0,) * channels, pixel_std=(1.0,) * channels,
                      location_grad=location_grad)
    torch.manual_seed(0)
    N = 40
    x = torch.randn(N, channels, size, size, dtype=torch.float64)
    l = torch.cat([torch.rand(N - 4, 2) * 2 - 1,
                   torch.tensor([[-1.0, -1.0], [1.0, 1.0], [-1.0, 1.0], [0.99, -0.97]])])
    v = torch.randn(1, N, cfg.glimpse_numel, dtype=torch.float64)
    written = writer(cfg).double().written(v, l.view(1, N, 2))  # (1, N, C, H, W)
    retina = Retina(cfg).double()
    read = retina(retina.prepare(x), l)  # (N, k, C, g, g)
    torch.testing.assert_close((written[0] * x).flatten(1).sum(1),
                               (v[0] * read.flatten(1)).sum(1))


def test_a_written_value_lands_on_the_pixels_its_cell_pooled():
    cfg = ModelConfig(pixel_mean=(0.0,) * 3, pixel_std=(1.0,) * 3)  # 6, 12, 24 px, cells 1, 2, 4
    decoder = writer(cfg)
    l = torch.zeros(1, 1, 2)  # pixel 16: the patches start at 13, 10 and 4 on both axes
    for level, (start, cell) in enumerate([(13, 1), (10, 2), (4, 4)]):
        v = torch.zeros(1, 1, cfg.num_patches, 3, 6, 6)
        v[0, 0, level, 1, 2, 5] = 1.0  # channel 1, row 2, column 5 of the pooled patch
        canvas = decoder.written(v.view(1, 1, -1), l)[0, 0]  # (C, H, W)
        expected = torch.zeros(3, 32, 32)
        top, left = start + 2 * cell, start + 5 * cell
        expected[1, top:top + cell, left:left + cell] = 1.0 / cell**2  # the mean's adjoint
        torch.testing.assert_close(canvas, expected)


def test_with_nothing_written_it_is_the_linear_decoder_and_its_errors_are_the_canvases():
    cfg = ModelConfig(**SMALL, write="glimpse")
    decoder, linear = WritingDecoder(cfg), Decoder(cfg)
    linear.load_state_dict({k: v for k, v in decoder.state_dict().items()
                            if k.startswith("fc.")})
    h, l, x = torch.randn(3, 8, 32), torch.rand(3, 8, 2) * 2 - 1, torch.rand(4, 3, 32, 32)
    nn.init.zeros_(decoder.fc_write.weight)
    nn.init.zeros_(decoder.fc_write.bias)
    torch.testing.assert_close(decoder(h, l), linear(h))
    torch.testing.assert_close(decoder.errors(h, x, locations=l), linear.errors(h, x),
                               rtol=1e-4, atol=1e-6)
    nn.init.normal_(decoder.fc_write.weight)
    recon = decoder(h, l)  # (T, 2*4, C, H, W): two paths over the four images
    expected = (recon - x.repeat(2, 1, 1, 1)).pow(2).flatten(2).mean(-1)
    torch.testing.assert_close(decoder.errors(h, x, locations=l), expected)
    torch.testing.assert_close(decoder.errors(h, x, last_only=True, locations=l), expected[-1:])


@pytest.mark.parametrize("decoder_class", [Decoder, WritingDecoder])
def test_the_last_canvas_alone_is_the_last_of_all_canvases(decoder_class):
    # Evaluation builds x_hat_T alone (the writing decoder sums every step's cells into one
    # difference array); it must be the last of the T canvases that training builds.
    torch.manual_seed(0)
    decoder = decoder_class(ModelConfig(**SMALL, write="glimpse"))
    h, l = torch.randn(3, 8, 32), torch.rand(3, 8, 2) * 2 - 1
    last = decoder(h, l, last_only=True)
    assert last.shape == (1, 8, 3, 32, 32)
    torch.testing.assert_close(last, decoder(h, l)[-1:], rtol=1e-5, atol=1e-5)


def test_the_writing_model_trains_its_write_and_never_moves_the_policy_through_it():
    cfg = ModelConfig(**SMALL, write="glimpse")
    model = RecurrentAttention(cfg)
    assert isinstance(model.decoder, WritingDecoder)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    out = model(x)
    losses = compute_losses(out, y, cfg, LossWeights(reinforce_weight=0.0))
    losses["total"].backward()
    assert model.decoder.fc_write.weight.grad.abs().sum() > 0
    assert model.core.i2h.weight.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in model.locator.parameters())
    plots = model(x, decode="plots")
    torch.testing.assert_close(plots.recon, plots.decoded.cumsum(0))


def test_a_pathwise_write_is_differentiable_in_the_location():
    cfg = ModelConfig(location_grad="pathwise", pixel_mean=(0.0,) * 3, pixel_std=(1.0,) * 3)
    torch.manual_seed(4)
    v = torch.randn(1, 3, cfg.glimpse_numel, dtype=torch.float64)
    l = torch.tensor([[0.13, -0.41], [0.52, 0.27], [-0.71, 0.05]], dtype=torch.float64,
                     requires_grad=True)
    decoder = writer(cfg).double()
    assert torch.autograd.gradcheck(lambda l: decoder.written(v, l.view(1, 3, 2)), (l,))


def test_a_pathwise_write_passes_the_reconstructions_gradient_to_the_policy():
    cfg = ModelConfig(**SMALL, write="glimpse", location_grad="pathwise",
                      policy_input="grid_prior")
    model = RecurrentAttention(cfg)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    out = model(x)
    compute_losses(out, y, cfg, LossWeights(reinforce_weight=0.0))["recon"].backward()
    assert model.locator.prior.grad.abs().sum() > 0
    plots = model(x, decode="plots")
    torch.testing.assert_close(plots.recon, plots.decoded.cumsum(0))
    last = model(x, decode="last", noise=torch.zeros(3, 4, 2))
    every = model(x, decode="every", noise=torch.zeros(3, 4, 2))
    torch.testing.assert_close(last.errors[0], every.errors[-1])


def test_write_flag_names_the_run_and_needs_a_decoder(tiny_cifar, tmp_path):
    cfg = model_config(parse_args(["--write=glimpse"]))
    assert cfg.write == "glimpse" and model_name(cfg) == "ram_9_6x6_2_writeglimpse"
    with pytest.raises(ValueError, match="has no decoder"):
        ModelConfig(objective="supervised", decoder=False, write="glimpse")
    data_dir, _ = tiny_cifar
    flags = [f"--data_dir={data_dir}", f"--ckpt_dir={tmp_path / 'ckpt'}",
             f"--plot_dir={tmp_path / 'plots'}", *TINY, "--write=glimpse"]
    assert main.main([*flags, "--epochs=1"]) == 0
    assert main.main([*flags, "--is_train=false"]) == 0
