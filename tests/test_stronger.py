"""The stronger-model options of issue 12: LSTM and GRU cores and the convolutional glimpse
encoder; each off by default."""

import dataclasses

import pytest
import torch

from config import (
    loss_weights,
    model_config,
    model_name,
    parse_args,
    train_config,
)
from model import LossWeights, RecurrentAttention, compute_losses
from modules import ConvGlimpseEncoder, GlimpseNetwork, ModelConfig
from trainer import Trainer
from utils import UserError

B = 4
SMALL = dict(glimpse_hidden=16, loc_hidden=8, hidden_size=32, num_glimpses=3)
CPU = torch.device("cpu")

# named_parameters() of ModelConfig()'s model before these options existed.
SEED_PARAMETERS = {
    "glimpse.fc_phi.weight": (128, 324), "glimpse.fc_phi.bias": (128,),
    "glimpse.fc_l.weight": (128, 2), "glimpse.fc_l.bias": (128,),
    "glimpse.fc_what.weight": (256, 128), "glimpse.fc_what.bias": (256,),
    "glimpse.fc_where.weight": (256, 128), "glimpse.fc_where.bias": (256,),
    "core.i2h.weight": (256, 256), "core.i2h.bias": (256,),
    "core.h2h.weight": (256, 256), "core.h2h.bias": (256,),
    "locator.fc.weight": (128, 256), "locator.fc.bias": (128,),
    "locator.fc_mu.weight": (2, 128), "locator.fc_mu.bias": (2,),
    "baseline.fc.weight": (1, 256), "baseline.fc.bias": (1,),
    "classifier.fc.weight": (10, 256), "classifier.fc.bias": (10,),
    "decoder.fc.weight": (3072, 256), "decoder.fc.bias": (3072,),
}


def test_default_flags_build_the_seed_model():
    args = parse_args([])
    cfg = model_config(args)
    assert cfg == ModelConfig() and cfg.core == "rnn" and cfg.glimpse_encoder == "linear"
    model = RecurrentAttention(cfg)
    assert {name: tuple(p.shape) for name, p in model.named_parameters()} == SEED_PARAMETERS
    assert model_name(cfg) == "ram_9_6x6_2"
    trainer = Trainer(cfg, loss_weights(args), train_config(args), CPU)
    assert isinstance(trainer.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    # The Elman core's equation, h_t = relu(W_g g_t + W_h h_{t-1}), and no memory cell.
    g, h, c = torch.randn(3, B, 256).unbind()
    h_t, c_t = model.core(g, h, c)
    assert torch.equal(h_t, torch.relu(model.core.i2h(g) + model.core.h2h(h)))
    assert c_t is c


def test_each_option_gets_its_own_run_folder():
    for flag, suffix in (("--core=lstm", "_lstm"), ("--core=gru", "_gru"),
                         ("--glimpse_encoder=conv", "_conv")):
        assert model_name(model_config(parse_args([flag]))) == "ram_9_6x6_2" + suffix


@pytest.mark.parametrize("core", ["lstm", "gru"])
def test_gated_cores_roll_out_with_the_documented_shapes_and_train(core):
    cfg = ModelConfig(**SMALL, core=core)
    model = RecurrentAttention(cfg)
    outputs = []
    model.core.register_forward_hook(lambda m, args, out: outputs.append(out))
    out = model(torch.rand(B, 3, 32, 32), decode="plots")
    T = cfg.num_glimpses
    assert out.locations.shape == (T, B, 2) and out.log_pi.shape == out.baselines.shape == (T, B)
    assert out.errors.shape == (T, B) and out.recon.shape == (T, B, 3, 32, 32)
    assert all(h.shape == c.shape == (B, 32) for h, c in outputs)
    # What the probe and the decoder read is the sum of the cell's outputs h_t, never c_t.
    assert torch.equal(out.code, torch.stack([h for h, _ in outputs]).sum(0))
    losses = compute_losses(out, torch.arange(B) % 10, cfg, LossWeights())
    losses["total"].backward()
    for name, p in model.core.named_parameters():
        assert p.grad is not None and (p.grad != 0).any(), name


def test_conv_encoder_reads_the_stacked_patches_and_learns():
    cfg = ModelConfig(**SMALL, glimpse_encoder="conv")
    phi = torch.rand(B, cfg.num_patches, 3, 6, 6, requires_grad=True)  # (B, k, C, g, g)
    encoder = ConvGlimpseEncoder(cfg)
    assert encoder.conv1.in_channels == cfg.num_patches * 3
    assert encoder(phi).shape == (B, cfg.glimpse_hidden)
    glimpse = GlimpseNetwork(cfg)
    assert glimpse.fc_phi is None
    g = glimpse(phi, torch.zeros(B, 2))
    assert g.shape == (B, cfg.hidden_size)
    g.sum().backward()
    assert (phi.grad[:, -1] != 0).any()  # the coarsest patch reaches the output too
    for name, p in glimpse.conv_phi.named_parameters():
        assert p.grad is not None and (p.grad != 0).any(), name
    out = RecurrentAttention(cfg)(torch.rand(B, 3, 32, 32))
    assert out.errors.shape == (cfg.num_glimpses, B)


def test_checkpoints_from_before_these_options_load_with_their_old_behaviour(tmp_path):
    train_cfg = train_config(parse_args([f"--ckpt_dir={tmp_path}"]))
    older = Trainer(ModelConfig(**SMALL), LossWeights(), train_cfg, CPU)
    saved = {k: v for k, v in dataclasses.asdict(older.cfg).items()
             if k not in ("core", "glimpse_encoder")}
    path = str(tmp_path / "older.pth")
    torch.save({"model": older.model.state_dict(), "epoch": 1, "model_config": saved}, path)
    assert older.load(path)["epoch"] == 1  # an Elman core and a linear encoder
    for option, old, new in (("core", "rnn", "gru"), ("glimpse_encoder", "linear", "conv")):
        newer = Trainer(ModelConfig(**SMALL, **{option: new}), LossWeights(), train_cfg, CPU)
        with pytest.raises(UserError, match=f"{option}: checkpoint '{old}', flags '{new}'"):
            newer.load(path)
