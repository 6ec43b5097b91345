"""The learned policy's std as a weight (--learn_std) and its entropy bonus (--entropy_weight)."""

import dataclasses
import json
import math

import pytest
import torch

import main
from checkpoints import load_checkpoint
from config import loss_weights, model_config, model_name, parse_args, train_config
from model import LossWeights, RecurrentAttention, compute_losses
from modules import LOG_STD_MAX, LOG_STD_MIN, ModelConfig
from trainer import Trainer, make_optimizer, resume_changes
from utils import UserError

B = 6
SMALL = dict(glimpse_hidden=16, loc_hidden=8, hidden_size=32, num_glimpses=3)
TINY = ["--batch_size=20", "--M=1", "--num_glimpses=3", "--hidden_size=32",
        "--glimpse_hidden=16", "--loc_hidden=16"]
CPU = torch.device("cpu")
NO_TERMS = dict(recon_weight=0.0, classify_weight=0.0, reinforce_weight=0.0, baseline_weight=0.0)


def learned_model(**overrides):
    model = RecurrentAttention(ModelConfig(**SMALL, std=0.1, learn_std=True, **overrides))
    with torch.no_grad():  # a different spread for every glimpse and axis
        model.locator.log_std.copy_(torch.tensor([[-2.0, -1.5], [-3.0, -2.5], [-1.0, -2.2]]))
    return model


def test_a_learned_std_starts_at_std_and_samples_and_scores_with_its_own_value():
    fresh = RecurrentAttention(ModelConfig(**SMALL, std=0.1, learn_std=True))
    assert fresh.locator.log_std.shape == (3, 2)
    assert torch.allclose(fresh.locator.log_std, torch.full((3, 2), math.log(0.1)))
    model = learned_model()
    noise = 0.3 * torch.randn(3, B, 2)  # small: no sample is clamped at the border
    out = model(torch.rand(B, 3, 32, 32), noise=noise)
    std = model.locator.log_std.detach().exp()  # (T, 2)
    assert torch.allclose(out.locations, out.loc_means + std[:, None] * noise, atol=1e-6)
    gaussian = torch.distributions.Normal(out.loc_means, std[:, None].expand_as(out.loc_means))
    assert torch.allclose(out.log_pi, gaussian.log_prob(out.locations).sum(-1), atol=1e-5)
    assert torch.allclose(out.entropy, gaussian.entropy()[:, 0].sum(-1), atol=1e-6)


def test_the_entropy_bonus_widens_every_learned_std_and_touches_nothing_else():
    model = learned_model()
    x, y = torch.rand(B, 3, 32, 32), torch.arange(B) % 10
    losses = compute_losses(model(x), y, model.cfg, LossWeights(**NO_TERMS, entropy_weight=0.5))
    losses["total"].backward()
    # total = -0.5 * sum_t sum_axes log_std[t] + constants: a gradient of -0.5 everywhere,
    # so a descent step raises every std.
    assert torch.allclose(model.locator.log_std.grad, torch.full((3, 2), -0.5))
    others = [p.grad for name, p in model.named_parameters() if name != "locator.log_std"]
    assert all(g is None or not g.any() for g in others)


def test_reinforce_moves_the_learned_std_and_a_frozen_policy_has_no_entropy():
    model = learned_model()
    x, y = torch.rand(B, 3, 32, 32), torch.arange(B) % 10
    weights = LossWeights(**{**NO_TERMS, "reinforce_weight": 1.0})
    compute_losses(model(x), y, model.cfg, weights)["total"].backward()
    assert model.locator.log_std.grad.abs().min() > 0  # every glimpse and axis
    std = model.locator.log_std.detach().exp()
    assert model.locator.mean_std() == pytest.approx(float(std.mean()))
    frozen = learned_model(policy_epochs=1)
    frozen.locator.exploring.fill_(False)
    out = frozen(x)
    assert out.entropy is None and torch.equal(out.locations, out.loc_means)
    assert frozen.locator.mean_std() == 0.0
    fixed = RecurrentAttention(ModelConfig(**SMALL))
    assert fixed(x).entropy is None  # a constant std: no entropy term
    assert compute_losses(fixed(x), y, fixed.cfg, LossWeights())["entropy"] == 0


def test_learn_std_and_the_entropy_bonus_are_refused_where_they_cannot_act():
    for policy in ("grid", "random", "centre"):
        with pytest.raises(UserError, match="--learn_std is for the learned"):
            model_config(parse_args(["--learn_std=true", f"--policy={policy}"]))
    with pytest.raises(UserError, match="both set the policy's std"):
        model_config(parse_args(["--learn_std=true", "--std_final=0.01"]))
    with pytest.raises(UserError, match="add --learn_std=true"):
        loss_weights(parse_args(["--entropy_weight=0.1"]))
    args = parse_args(["--learn_std=true", "--entropy_weight=0.1"])
    assert loss_weights(args).entropy_weight == 0.1
    assert model_name(model_config(args)) == "ram_9_6x6_2_learnstd"
    # A run from before the entropy bonus had none: resuming it without the flag changes nothing.
    older = {k: v for k, v in dataclasses.asdict(LossWeights()).items() if k != "entropy_weight"}
    ckpt = {"train_config": {}, "loss_weights": older}
    assert all(name != "entropy_weight" for name, _, _ in
               resume_changes(ckpt, train_config(parse_args([])), LossWeights()))


def test_a_learned_std_trains_is_checkpointed_and_reported_through_main(tiny_cifar, tmp_path,
                                                                        capsys):
    data_dir, _ = tiny_cifar
    flags = [f"--data_dir={data_dir}", f"--ckpt_dir={tmp_path / 'ckpt'}",
             f"--plot_dir={tmp_path / 'plots'}", *TINY, "--learn_std=true",
             "--entropy_weight=0.01", "--std=0.1"]
    assert main.main([*flags, "--epochs=2"]) == 0
    folder = tmp_path / "ckpt" / "ram_3_6x6_2_learnstd"
    with open(folder / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    saved = load_checkpoint(str(folder / "epoch_2.pth"))["model"]["locator.log_std"]
    first = load_checkpoint(str(folder / "epoch_1.pth"))["model"]["locator.log_std"]
    assert saved.shape == (3, 2) and not torch.equal(saved, first)  # it learns
    assert lines[-1]["policy_std"] == pytest.approx(float(saved.exp().mean()), rel=1e-6)
    assert all(line["train_entropy"] != 0 for line in lines)
    capsys.readouterr()
    assert main.main([*flags, "--is_train=false", "--linear_eval=false"]) == 0
    out = capsys.readouterr().out
    reported = out.split("learned std, glimpse by glimpse (x and y averaged): ")[1].split()[:3]
    best = load_checkpoint(str(folder / "best.pth"))["model"]["locator.log_std"]
    assert [float(s) for s in reported] == pytest.approx(best.exp().mean(-1).tolist(), abs=1e-3)


def test_the_learned_std_reaches_its_gradients_stays_in_range_and_joins_the_policys_rate():
    x, y = torch.rand(B, 3, 32, 32), torch.arange(B) % 10
    # Trained through its glimpses, without REINFORCE: the reconstruction's gradient reaches
    # the std through l = mu + std * noise.
    pathwise = learned_model(location_grad="pathwise")
    weights = LossWeights(**{**NO_TERMS, "recon_weight": 1.0})
    compute_losses(pathwise(x), y, pathwise.cfg, weights)["total"].backward()
    assert pathwise.locator.log_std.grad.abs().min() > 0
    # Frozen, it gets nothing, whatever the terms.
    frozen = learned_model(policy_epochs=1)
    frozen.locator.exploring.fill_(False)
    compute_losses(frozen(x), y, frozen.cfg, LossWeights(entropy_weight=1.0))["total"].backward()
    assert frozen.locator.log_std.grad is None
    # Beyond its range the std is clamped: samples and the bonus use the bound, which the
    # bonus then no longer pushes.
    wide = learned_model()
    with torch.no_grad():
        wide.locator.log_std.fill_(5.0)
    std, log_std = wide.locator.spread(0, torch.float32)
    assert torch.allclose(log_std, torch.full((2,), LOG_STD_MAX))
    assert wide.locator.mean_std() == pytest.approx(math.exp(LOG_STD_MAX))
    compute_losses(wide(x), y, wide.cfg, LossWeights(**NO_TERMS, entropy_weight=1.0))[
        "total"].backward()
    assert not wide.locator.log_std.grad.any()
    with pytest.raises(ValueError, match="keeps the std between"):
        ModelConfig(learn_std=True, std=math.exp(LOG_STD_MIN) / 2)
    # --policy_lr gives it the policy's rate.
    optimizer = make_optimizer(learned_model(), 1e-3, CPU, policy_lr=1e-2)
    policy_group = optimizer.param_groups[1]
    assert any(p.shape == (3, 2) for p in policy_group["params"]) and policy_group["lr"] == 1e-2


def test_a_checkpoint_from_before_the_learned_std_loads_with_a_fixed_one(tmp_path):
    train_cfg = train_config(parse_args([f"--ckpt_dir={tmp_path}"]))
    older = Trainer(ModelConfig(**SMALL), LossWeights(), train_cfg, CPU)
    saved = {k: v for k, v in dataclasses.asdict(older.cfg).items() if k != "learn_std"}
    path = str(tmp_path / "older.pth")
    torch.save({"model": older.model.state_dict(), "epoch": 1, "model_config": saved}, path)
    assert older.load(path)["epoch"] == 1
    newer = Trainer(ModelConfig(**SMALL, learn_std=True), LossWeights(), train_cfg, CPU)
    with pytest.raises(UserError, match="learn_std: checkpoint False, flags True"):
        newer.load(path)
