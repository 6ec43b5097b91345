"""Shapes through every module, the decoder's cumulative sum, and where gradients may flow."""

import dataclasses

import pytest
import torch

from checkpoints import load_weights
from config import parse_args
from model import LossWeights, RecurrentAttention, Rollout, compute_losses
from modules import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    POLICIES,
    BaselineNetwork,
    Classifier,
    CoreNetwork,
    Decoder,
    FixedPolicy,
    GlimpseNetwork,
    LocationNetwork,
    ModelConfig,
    Retina,
)
from utils import UserError

B = 4
SMALL = dict(glimpse_hidden=16, loc_hidden=8, hidden_size=32, num_glimpses=3)


def test_every_module_has_the_documented_shapes():
    cfg = ModelConfig()
    x = torch.rand(B, 3, 32, 32)
    l = torch.rand(B, 2) * 2 - 1
    retina = Retina(cfg)
    prepared = retina.prepare(x)
    phi = retina(prepared, l)
    assert phi.shape == (B, 3, 3, 6, 6)
    g = GlimpseNetwork(cfg)(phi, l)
    assert g.shape == (B, 256)
    h = CoreNetwork(cfg)(g, torch.zeros(B, 256))
    assert h.shape == (B, 256)
    l_next, log_pi, mu = LocationNetwork(cfg)(h, 0)
    assert l_next.shape == (B, 2) and log_pi.shape == (B,) and mu.shape == (B, 2)
    assert l_next.abs().max() <= 1.0
    assert BaselineNetwork(cfg)(h).shape == (B,)
    assert Classifier(cfg)(h).shape == (B, 10)
    assert Decoder(cfg)(torch.stack([h, h])).shape == (2, B, 3, 32, 32)
    assert Decoder(cfg).steps(torch.stack([h, h])).shape == (2, B, 3, 32, 32)


def test_rollout_shapes():
    cfg = ModelConfig()
    out = RecurrentAttention(cfg)(torch.rand(B, 3, 32, 32), keep_patches=True)
    T = cfg.num_glimpses
    assert out.locations.shape == out.loc_means.shape == (T, B, 2)
    assert out.log_pi.shape == out.baselines.shape == (T, B)
    assert out.log_probs.shape == (B, 10)
    assert out.decoded.shape == out.recon.shape == (T, B, 3, 32, 32)
    assert out.patches.shape == (T, B, 3, 3, 6, 6)


def test_prediction_is_the_cumulative_sum_of_step_outputs():
    cfg = ModelConfig(**SMALL)
    model = RecurrentAttention(cfg)
    torch.manual_seed(0)
    out = model(torch.rand(B, 3, 32, 32), keep_patches=True)
    assert torch.allclose(out.recon, out.decoded.cumsum(0), atol=1e-5)
    torch.manual_seed(0)
    final = model(torch.rand(B, 3, 32, 32), every_step=False).recon
    assert final.shape == (1, B, 3, 32, 32)
    assert torch.allclose(final[0], out.recon[-1], atol=1e-4)


def test_first_glimpse_is_taken_where_the_policy_aims_from_the_empty_state():
    cfg = ModelConfig(**SMALL, std=1e-4)
    model = RecurrentAttention(cfg)
    out = model(torch.rand(B, 3, 32, 32))
    mu0, *_ = model.locator.fc_mu(torch.relu(model.locator.fc(torch.zeros(1, 32)))).tanh()
    assert torch.allclose(out.locations[0], mu0.expand(B, 2), atol=1e-3)


@pytest.mark.parametrize("policy", ["random", "centre"])
def test_fixed_policies(policy):
    cfg = ModelConfig(**SMALL, policy=policy)
    out = RecurrentAttention(cfg)(torch.rand(64, 3, 32, 32))
    assert (out.log_pi == 0).all()
    if policy == "centre":
        assert (out.locations == 0).all()
    else:
        assert out.locations.abs().max() <= 1.0 and out.locations.std() > 0.4


def test_a_new_fixed_policy_is_one_class_and_one_entry(monkeypatch):
    class Corners(FixedPolicy):
        """Glimpse t at corner t % 4: a fixed raster, as a grid policy would be."""

        def place(self, h, t, noise):
            corner = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])[t % 4]
            return corner.expand(h.shape[0], 2)

    monkeypatch.setitem(POLICIES, "corners", Corners)
    assert parse_args(["--policy=corners"]).policy == "corners"
    model = RecurrentAttention(ModelConfig(**SMALL, policy="corners"))
    assert not any(name.startswith("locator.") for name, _ in model.named_parameters())
    out = model(torch.rand(B, 3, 32, 32))
    assert out.locations[:, 0].tolist() == [[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0]]
    assert (out.log_pi == 0).all() and torch.equal(out.loc_means, out.locations)


def test_pixel_statistics_are_not_the_policy_std():
    model = RecurrentAttention(ModelConfig(**SMALL, std=0.3))
    buffers = dict(model.named_buffers())
    assert torch.allclose(buffers["pixel_std"].flatten(), torch.tensor(CIFAR10_STD))
    assert torch.allclose(buffers["pixel_mean"].flatten(), torch.tensor(CIFAR10_MEAN))
    assert "std" not in buffers and "mean" not in buffers
    assert model.locator.std == 0.3


def test_older_fixed_policy_checkpoints_still_load():
    # Fixed policies used to carry an unused location network: its weights are passed over.
    old = RecurrentAttention(ModelConfig(**SMALL)).state_dict()
    model = RecurrentAttention(ModelConfig(**SMALL, policy="random"))
    load_weights(model, old, "old.pth")
    assert torch.equal(model.core.i2h.weight, old["core.i2h.weight"])
    with pytest.raises(UserError, match="old.pth does not fit this model"):
        load_weights(model, {k: v for k, v in old.items() if k != "core.i2h.weight"}, "old.pth")


def grads_of(model, loss):
    """Gradient of `loss` for every parameter (zeros where none flows)."""
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
    return {name: torch.zeros_like(p) if g is None else g
            for (name, p), g in zip(params.items(), grads, strict=True)}


def rollout_and_losses(objective, labels, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(**SMALL, objective=objective)
    model = RecurrentAttention(cfg)
    x = torch.rand(8, 3, 32, 32)
    out = model(x)
    return model, compute_losses(out, x, labels, objective, LossWeights())


@pytest.mark.parametrize("objective", ["unsupervised", "supervised"])
def test_location_network_learns_only_from_reinforce(objective):
    model, losses = rollout_and_losses(objective, torch.arange(8) % 10)
    for term in ("recon", "classify", "baseline"):
        grads = grads_of(model, losses[term])
        assert all((grads[n] == 0).all() for n in grads if n.startswith("locator.")), term
    grads = grads_of(model, losses["reinforce"])
    assert any((grads[n] != 0).any() for n in grads if n.startswith("locator."))
    assert all((grads[n] == 0).all() for n in grads if not n.startswith("locator."))


def test_baseline_learns_only_from_its_own_loss():
    model, losses = rollout_and_losses("unsupervised", torch.arange(8) % 10)
    for term in ("recon", "classify", "reinforce"):
        grads = grads_of(model, losses[term])
        assert all((grads[n] == 0).all() for n in grads if n.startswith("baseline.")), term
    assert (grads_of(model, losses["baseline"])["baseline.fc.weight"] != 0).any()


def test_unsupervised_labels_reach_only_the_probe():
    y1 = torch.arange(8) % 10
    y2 = (y1 + 3) % 10
    model, losses1 = rollout_and_losses("unsupervised", y1)
    g1 = grads_of(model, losses1["total"])
    model, losses2 = rollout_and_losses("unsupervised", y2)
    g2 = grads_of(model, losses2["total"])
    probe = [n for n in g1 if n.startswith("classifier.")]
    others = [n for n in g1 if not n.startswith("classifier.")]
    assert all(torch.equal(g1[n], g2[n]) for n in others)
    assert any(not torch.equal(g1[n], g2[n]) for n in probe)
    classify = grads_of(model, losses2["classify"])
    assert all((classify[n] == 0).all() for n in others)


def test_supervised_labels_train_the_whole_network():
    model, losses = rollout_and_losses("supervised", torch.arange(8) % 10)
    grads = grads_of(model, losses["classify"])
    for module in ("glimpse.", "core.", "classifier."):
        assert any((grads[n] != 0).any() for n in grads if n.startswith(module)), module


def fake_rollout(errors_per_image, T=3):
    """A rollout whose reconstruction error per image is given, to test rewards alone."""
    B = len(errors_per_image)
    x = torch.zeros(B, 1, 1, 1)
    recon = torch.tensor(errors_per_image).sqrt().view(1, B, 1, 1, 1).expand(T, B, 1, 1, 1)
    log_pi = torch.zeros(T, B, requires_grad=True)
    out = Rollout(locations=torch.zeros(T, B, 2), loc_means=torch.zeros(T, B, 2), log_pi=log_pi,
                  baselines=torch.zeros(T, B), log_probs=torch.zeros(B, 10).log_softmax(-1),
                  decoded=recon, recon=recon.contiguous())
    return out, x


def test_unsupervised_reward_favours_the_better_reconstruction():
    out, x = fake_rollout([0.01, 0.09])  # image 0 is reconstructed better
    losses = compute_losses(out, x, torch.zeros(2, dtype=torch.long), "unsupervised",
                            LossWeights())
    (grad,) = torch.autograd.grad(losses["reinforce"], out.log_pi)
    # Gradient descent raises the log-probability of the path that reconstructed better.
    assert (grad[:, 0] < 0).all() and (grad[:, 1] > 0).all()


def test_supervised_reward_is_one_for_a_correct_class():
    out, x = fake_rollout([0.05, 0.05])
    out = dataclasses.replace(out, log_probs=torch.tensor([[0.0, -9.0], [0.0, -9.0]]))
    y = torch.tensor([0, 1])  # image 0 right, image 1 wrong
    losses = compute_losses(out, x, y, "supervised", LossWeights())
    (grad,) = torch.autograd.grad(losses["reinforce"], out.log_pi)
    assert (grad[:, 0] < 0).all() and (grad[:, 1] > 0).all()


def test_loss_weights_scale_their_terms():
    model = RecurrentAttention(ModelConfig(**SMALL))
    x = torch.rand(8, 3, 32, 32)
    weights = LossWeights(recon_weight=2.0, classify_weight=0.0, reinforce_weight=0.0,
                          baseline_weight=0.0)
    losses = compute_losses(model(x), x, torch.arange(8) % 10, "unsupervised", weights)
    assert torch.allclose(losses["total"], 2.0 * losses["recon"])


def test_config_rejects_sizes_the_model_cannot_be_built_with():
    with pytest.raises(ValueError, match="glimpse_scale"):
        ModelConfig(glimpse_scale=1, num_patches=3)
    with pytest.raises(ValueError, match="largest patch"):
        ModelConfig(patch_size=16, glimpse_scale=4, num_patches=3)
    with pytest.raises(ValueError, match="std"):
        ModelConfig(std=0.0)
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig(hidden_size=0)
