"""--decoder_hidden=N: the linear decoder plus a ReLU layer reading the same code s_t."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import main
from config import model_config, model_name, parse_args
from model import LossWeights, RecurrentAttention, compute_losses
from modules import Decoder, MLPDecoder, ModelConfig

SMALL = dict(glimpse_hidden=16, loc_hidden=8, hidden_size=32, num_glimpses=3, decoder_hidden=24)
TINY = ["--batch_size=20", "--M=1", "--num_glimpses=3", "--hidden_size=32",
        "--glimpse_hidden=16", "--loc_hidden=16", "--linear_eval=false"]


def test_it_starts_as_the_linear_decoder():
    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL)
    decoder, linear = MLPDecoder(cfg), Decoder(cfg)
    linear.load_state_dict({k: v for k, v in decoder.state_dict().items() if k.startswith("fc.")})
    h, x = torch.randn(3, 8, 32), torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(decoder(h), linear(h))
    torch.testing.assert_close(decoder.errors(h, x), linear.errors(h, x), rtol=1e-4, atol=1e-6)


def test_each_canvas_is_the_hand_computed_one_and_errors_are_its_mse():
    torch.manual_seed(1)
    decoder = MLPDecoder(ModelConfig(**SMALL))
    nn.init.normal_(decoder.fc_out.weight, std=0.1)
    h, x = torch.randn(3, 8, 32), torch.rand(4, 3, 32, 32)  # two paths over four images
    recon = decoder(h)
    W, b = decoder.fc.weight, decoder.fc.bias
    U, c, V = decoder.fc_hidden.weight, decoder.fc_hidden.bias, decoder.fc_out.weight
    for t in range(3):
        s = h[:t + 1].sum(0)
        expected = s @ W.T + (t + 1) * b + F.relu(s @ U.T + c) @ V.T
        torch.testing.assert_close(recon[t].flatten(1), expected, rtol=1e-5, atol=1e-5)
    mse = (recon - x.repeat(2, 1, 1, 1)).pow(2).flatten(2).mean(-1)
    torch.testing.assert_close(decoder.errors(h, x), mse)
    torch.testing.assert_close(decoder.errors(h, x, last_only=True), mse[-1:])
    torch.testing.assert_close(decoder(h, last_only=True), recon[-1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decoder.steps(h).cumsum(0), recon, rtol=1e-5, atol=1e-5)


def test_the_errors_gradient_is_that_of_the_hand_computed_canvases():
    torch.manual_seed(3)
    decoder = MLPDecoder(ModelConfig(**SMALL))  # errors are computed in float32
    nn.init.normal_(decoder.fc_out.weight, std=0.1)
    h, x = torch.randn(3, 8, 32), torch.rand(8, 3, 32, 32)
    W, b = decoder.fc.weight, decoder.fc.bias
    U, c, V = decoder.fc_hidden.weight, decoder.fc_hidden.bias, decoder.fc_out.weight
    weights = (h, W, b, U, c, V)

    def by_hand(h, W, b, U, c, V):
        s = h.cumsum(0)  # (T, B, hidden)
        t = torch.arange(1, 4, dtype=h.dtype).view(3, 1, 1)
        canvas = s @ W.T + t * b + F.relu(s @ U.T + c) @ V.T
        return (canvas - x.flatten(1)).pow(2).mean(-1)

    h.requires_grad_(True)
    got = torch.autograd.grad(decoder.errors(h, x).sum(), weights)
    expected = torch.autograd.grad(by_hand(*weights).sum(), weights)
    for name, a, e in zip(("h", "W", "b", "U", "c", "V"), got, expected, strict=True):
        assert e.abs().sum() > 0, name  # the hidden layer's own weights are reached
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6, msg=name)


def test_the_model_trains_both_layers_and_plots_its_increments():
    torch.manual_seed(2)
    cfg = ModelConfig(**SMALL)
    model = RecurrentAttention(cfg)
    assert isinstance(model.decoder, MLPDecoder)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    compute_losses(model(x), y, cfg, LossWeights())["total"].backward()
    assert model.decoder.fc_out.weight.grad.abs().sum() > 0  # V starts at zero, U waits for it
    assert model.core.i2h.weight.grad.abs().sum() > 0
    nn.init.normal_(model.decoder.fc_out.weight, std=0.1)  # increments no longer the linear ones
    plots = model(x, decode="plots")
    torch.testing.assert_close(plots.recon, plots.decoded.cumsum(0), rtol=1e-5, atol=1e-5)


def test_flag_names_the_run_trains_tests_and_refuses_what_has_no_sense(tiny_cifar, tmp_path,
                                                                       capsys):
    cfg = model_config(parse_args(["--decoder_hidden=64"]))
    assert cfg.decoder_hidden == 64 and model_name(cfg) == "ram_9_6x6_2_decoder64"
    with pytest.raises(ValueError, match="two different decoders"):
        ModelConfig(decoder_hidden=8, write="glimpse")
    with pytest.raises(ValueError, match="has none"):
        ModelConfig(objective="supervised", decoder=False, decoder_hidden=8)
    data_dir, _ = tiny_cifar
    flags = [f"--data_dir={data_dir}", f"--ckpt_dir={tmp_path / 'ckpt'}",
             f"--plot_dir={tmp_path / 'plots'}", *TINY, "--decoder_hidden=8"]
    assert main.main([*flags, "--epochs=1"]) == 0
    assert main.main([*flags, "--is_train=false"]) == 0
    capsys.readouterr()
    assert main.main([*flags, "--is_train=false", "--decoder_hidden=9"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no checkpoint" in err
    assert main.main([*flags, "--epochs=1", "--write=glimpse"]) != 0
    assert "two different decoders" in capsys.readouterr().err
