"""Shapes through every module, the decoder's cumulative sum, and where gradients may flow."""

import dataclasses

import pytest
import torch

from checkpoints import load_weights
from config import parse_args
from model import LossWeights, RecurrentAttention, Rollout, compute_losses, distinct_glimpses
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
    patch_corners,
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
    h, c = CoreNetwork(cfg)(g, torch.zeros(B, 256), torch.zeros(B, 256))
    assert h.shape == c.shape == (B, 256)
    l_next, log_pi, mu = LocationNetwork(cfg)(h, 0)
    assert l_next.shape == (B, 2) and log_pi.shape == (B,) and mu.shape == (B, 2)
    assert l_next.abs().max() <= 1.0
    assert BaselineNetwork(cfg)(h, 0).shape == (B,)
    assert Classifier(cfg)(h).shape == (B, 10)
    assert Decoder(cfg)(torch.stack([h, h])).shape == (2, B, 3, 32, 32)
    assert Decoder(cfg).steps(torch.stack([h, h])).shape == (2, B, 3, 32, 32)


def test_rollout_shapes():
    cfg = ModelConfig()
    out = RecurrentAttention(cfg)(torch.rand(B, 3, 32, 32), decode="plots")
    T = cfg.num_glimpses
    assert out.locations.shape == out.loc_means.shape == (T, B, 2)
    assert out.log_pi.shape == out.baselines.shape == (T, B)
    assert out.log_probs.shape == (B, 10)
    assert out.decoded.shape == out.recon.shape == (T, B, 3, 32, 32)
    assert out.patches.shape == (T, B, 3, 3, 6, 6)


def test_prediction_is_the_cumulative_sum_of_step_outputs():
    cfg = ModelConfig(**SMALL)
    model = RecurrentAttention(cfg)
    x = torch.rand(B, 3, 32, 32)
    torch.manual_seed(0)
    out = model(x, decode="plots")
    assert torch.allclose(out.recon, out.decoded.cumsum(0), atol=1e-5)
    by_hand = (out.recon - x).pow(2).flatten(2).mean(-1)  # (T, B)
    assert torch.allclose(out.errors, by_hand, rtol=1e-4, atol=1e-6)
    torch.manual_seed(0)
    last = model(x, decode="last")
    assert last.recon is None and last.errors.shape == (1, B)
    assert torch.allclose(last.errors[0], by_hand[-1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("options", [{}, {"location_grad": "pathwise"},
                                     {"location_grad": "pathwise", "write": "glimpse"}])
def test_paths_equal_a_batch_of_repeated_images(options):
    cfg = ModelConfig(**SMALL, **options)
    model = RecurrentAttention(cfg)
    x, M = torch.rand(B, 3, 32, 32), 3
    noise = torch.randn(cfg.num_glimpses, M * B, 2)
    paths = model(x, decode="last", noise=noise, paths=M)
    repeated = model(x.repeat(M, 1, 1, 1), decode="last", noise=noise)
    assert paths.errors.shape == (1, M * B)
    torch.testing.assert_close(paths.errors, repeated.errors, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(paths.log_probs, repeated.log_probs)
    assert torch.equal(paths.locations, repeated.locations)


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


def rollout_and_losses(objective, labels, seed=0, **options):
    torch.manual_seed(seed)
    cfg = ModelConfig(**SMALL, objective=objective, **options)
    model = RecurrentAttention(cfg)
    x = torch.rand(8, 3, 32, 32)
    out = model(x)
    return model, compute_losses(out, labels, cfg, LossWeights())


@pytest.mark.parametrize("objective", ["unsupervised", "supervised"])
def test_location_network_learns_only_from_reinforce(objective):
    model, losses = rollout_and_losses(objective, torch.arange(8) % 10)
    for term in ("recon", "classify", "baseline"):
        grads = grads_of(model, losses[term])
        assert all((grads[n] == 0).all() for n in grads if n.startswith("locator.")), term
    grads = grads_of(model, losses["reinforce"])
    assert any((grads[n] != 0).any() for n in grads if n.startswith("locator."))
    assert all((grads[n] == 0).all() for n in grads if not n.startswith("locator."))


@pytest.mark.parametrize("objective, term", [("unsupervised", "recon"),
                                             ("supervised", "classify")])
def test_a_pathwise_policy_also_learns_from_the_losses_through_its_glimpses(objective, term):
    """--location_grad=pathwise: the objective's loss reaches the policy's weights, through
    the locations it chose; REINFORCE's term still trains the policy alone."""
    model, losses = rollout_and_losses(objective, torch.arange(8) % 10,
                                       location_grad="pathwise", policy_input="grid_prior")
    grads = grads_of(model, losses[term])
    assert (grads["locator.prior"] != 0).any() and (grads["locator.fc_mu.weight"] != 0).any()
    assert (grads_of(model, losses["baseline"])["locator.prior"] == 0).all()
    assert all((g == 0).all() for n, g in grads_of(model, losses["reinforce"]).items()
               if not n.startswith("locator."))


def test_pathwise_is_for_a_learned_policy():
    with pytest.raises(ValueError, match="--location_grad is for the learned policy"):
        ModelConfig(location_grad="pathwise", policy="grid")


def test_baseline_learns_only_from_its_own_loss():
    model, losses = rollout_and_losses("unsupervised", torch.arange(8) % 10)
    for term in ("recon", "classify", "reinforce"):
        grads = grads_of(model, losses[term])
        assert all((grads[n] == 0).all() for n in grads if n.startswith("baseline.")), term
    assert (grads_of(model, losses["baseline"])["baseline.fc.weight"] != 0).any()


@pytest.mark.parametrize("location_grad", ["none", "pathwise"])
def test_unsupervised_labels_reach_only_the_probe(location_grad):
    y1 = torch.arange(8) % 10
    y2 = (y1 + 3) % 10
    model, losses1 = rollout_and_losses("unsupervised", y1, location_grad=location_grad)
    g1 = grads_of(model, losses1["total"])
    model, losses2 = rollout_and_losses("unsupervised", y2, location_grad=location_grad)
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
    errors = torch.tensor(errors_per_image).expand(T, B)  # (T, B)
    log_pi = torch.zeros(T, B, requires_grad=True)
    return Rollout(locations=torch.zeros(T, B, 2), loc_means=torch.zeros(T, B, 2), log_pi=log_pi,
                   baselines=torch.zeros(T, B), log_probs=torch.zeros(B, 10).log_softmax(-1),
                   code=torch.zeros(B, 1), errors=errors, blank_errors=torch.ones(B),
                   decoded=None, recon=None)


def test_unsupervised_reward_favours_the_better_reconstruction():
    out = fake_rollout([0.01, 0.09])  # image 0 is reconstructed better
    losses = compute_losses(out, torch.zeros(2, dtype=torch.long), ModelConfig(),
                            LossWeights())
    (grad,) = torch.autograd.grad(losses["reinforce"], out.log_pi)
    # Gradient descent raises the log-probability of the path that reconstructed better.
    assert (grad[:, 0] < 0).all() and (grad[:, 1] > 0).all()


def test_supervised_reward_is_one_for_a_correct_class():
    out = fake_rollout([0.05, 0.05])
    out = dataclasses.replace(out, log_probs=torch.tensor([[0.0, -9.0], [0.0, -9.0]]))
    y = torch.tensor([0, 1])  # image 0 right, image 1 wrong
    losses = compute_losses(out, y, ModelConfig(objective="supervised"), LossWeights())
    (grad,) = torch.autograd.grad(losses["reinforce"], out.log_pi)
    assert (grad[:, 0] < 0).all() and (grad[:, 1] > 0).all()


@pytest.mark.parametrize("term", ["recon", "classify", "reinforce", "baseline"])
def test_each_loss_weight_scales_its_own_term(term):
    model = RecurrentAttention(ModelConfig(**SMALL))
    x = torch.rand(8, 3, 32, 32)
    weights = LossWeights(**{f"{name}_weight": 3.0 if name == term else 0.0
                             for name in ("recon", "classify", "reinforce", "baseline")})
    torch.manual_seed(0)
    losses = compute_losses(model(x), torch.arange(8) % 10, model.cfg, weights)
    assert losses[term].abs() > 0
    assert torch.allclose(losses["total"], 3.0 * losses[term])


def test_config_rejects_sizes_the_model_cannot_be_built_with():
    with pytest.raises(ValueError, match="glimpse_scale"):
        ModelConfig(glimpse_scale=1, num_patches=3)
    with pytest.raises(ValueError, match="largest patch"):
        ModelConfig(patch_size=16, glimpse_scale=4, num_patches=3)
    with pytest.raises(ValueError, match="std"):
        ModelConfig(std=0.0)
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig(hidden_size=0)


def test_probe_reads_the_summed_states_by_default_and_the_last_on_request():
    x = torch.rand(B, 3, 32, 32)
    for probe_input in ("summed", "last"):
        model = RecurrentAttention(ModelConfig(**SMALL, probe_input=probe_input))
        states, seen = [], []
        model.core.register_forward_hook(lambda m, args, out: states.append(out[0]))
        model.classifier.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        model(x)
        expected = torch.stack(states).sum(0) if probe_input == "summed" else states[-1]
        assert torch.equal(seen[0], expected)
        assert not seen[0].requires_grad  # unsupervised: labels never reach the model


def reinforce_grad(errors, blank, reward):
    """d reinforce / d log pi for a two-image rollout with the given (T, B) errors."""
    out = dataclasses.replace(fake_rollout([0.0, 0.0], T=len(errors)),
                              errors=torch.tensor(errors), blank_errors=torch.tensor(blank))
    losses = compute_losses(out, torch.zeros(2, dtype=torch.long), ModelConfig(reward=reward),
                            LossWeights())
    return torch.autograd.grad(losses["reinforce"], out.log_pi)[0]


def test_gain_reward_pays_each_location_for_its_own_glimpse_only():
    # Both images gain 0.5 from glimpse 1; only image 0 gains again from glimpse 2.
    errors, blank = [[0.5, 0.5], [0.1, 0.5]], [1.0, 1.0]
    gain = reinforce_grad(errors, blank, "gain")
    assert torch.allclose(gain[0], torch.zeros(2), atol=1e-6)  # glimpse 1: equal gains
    assert gain[1, 0] < 0 < gain[1, 1]  # glimpse 2: image 0's location is favoured
    summed = reinforce_grad(errors, blank, "sum")
    assert summed[0, 0] < 0 < summed[0, 1]  # the sum credits glimpse 1 with glimpse 2's gain


def test_final_reward_pays_every_location_for_the_last_error_only():
    # Image 0 ends worse (0.3 against 0.2) although its first glimpse did better.
    errors, blank = [[0.1, 0.6], [0.3, 0.2]], [1.0, 1.0]
    final = reinforce_grad(errors, blank, "final")
    assert (final[:, 0] > 0).all() and (final[:, 1] < 0).all()  # image 1's path is favoured
    assert torch.allclose(final[0], final[1])  # every step, the same return
    summed = reinforce_grad(errors, blank, "sum")
    assert summed[0, 0] < 0 < summed[0, 1]  # the sum favours image 0's early gain


def test_per_step_baseline_has_a_head_per_glimpse():
    cfg = ModelConfig(**SMALL, baseline="per_step")
    baseline = RecurrentAttention(cfg).baseline
    h = torch.randn(B, cfg.hidden_size)
    values = torch.stack([baseline(h, t) for t in range(cfg.num_glimpses)])  # (T, B)
    assert values.shape == (cfg.num_glimpses, B)
    assert not torch.allclose(values[0], values[1])
    values[1].sum().backward()
    grad = baseline.fc.weight.grad  # (T, hidden): only step 1's head learns from step 1
    assert (grad[1] != 0).any() and (grad[0] == 0).all() and (grad[2:] == 0).all()
    shared = RecurrentAttention(ModelConfig(**SMALL)).baseline
    assert torch.equal(shared(h, 0), shared(h, 2))


def test_grid_policy_scans_a_raster_whose_patches_cover_the_image():
    cfg = ModelConfig(**{**SMALL, "num_glimpses": 9}, policy="grid")
    out = RecurrentAttention(cfg)(torch.rand(B, 3, 32, 32))
    third = 2 / 3
    expected = torch.tensor([[x, y] for y in (-third, 0, third) for x in (-third, 0, third)])
    for b in range(B):
        assert torch.allclose(out.locations[:, b], expected)
    # The second patches (12 px) of the nine glimpses together see every pixel.
    seen = torch.zeros(32, 32, dtype=torch.bool)
    corners = patch_corners(out.locations[:, 0], 32, cfg.patch_sizes)  # (T, k, 2)
    size = cfg.patch_sizes[1]
    for x0, y0 in corners[:, 1].tolist():
        seen[max(y0, 0):y0 + size, max(x0, 0):x0 + size] = True
    assert seen.all()
    assert (out.log_pi == 0).all()


def test_distinct_glimpses_counts_centres_away_from_every_earlier_one():
    cfg = ModelConfig(**SMALL)  # g = 6: a centre within 3 px of an earlier one repeats it
    step = 2 / 32  # one pixel in location units
    locations = torch.tensor([
        [[0.0, 0.0], [0.0, 0.0]],
        [[2 * step, 0.0], [0.5, 0.5]],  # image 0: 2 px away, a repeat; image 1: far
        [[0.0, 4 * step], [0.5, 0.5 + 2 * step]],  # image 0: 4 px away; image 1: a repeat
    ])
    assert distinct_glimpses(locations, cfg).tolist() == [2, 2]


def test_a_step_aware_policy_aims_apart_from_the_same_state():
    cfg = ModelConfig(**SMALL, policy_input="state_step", std=1e-4)
    locator = RecurrentAttention(cfg).locator
    torch.nn.init.normal_(locator.step.weight)
    h = torch.randn(B, cfg.hidden_size)
    _, _, first = locator(h, 0)
    _, _, second = locator(h, 1)
    assert not torch.allclose(first, second)
    plain = RecurrentAttention(ModelConfig(**SMALL)).locator
    assert plain.step is None and torch.equal(plain(h, 0)[2], plain(h, 1)[2])


def test_a_grid_prior_policy_starts_near_the_grid_scan():
    cfg = ModelConfig(**{**SMALL, "num_glimpses": 9}, policy_input="grid_prior", std=1e-4)
    model = RecurrentAttention(cfg)
    grid = RecurrentAttention(dataclasses.replace(cfg, policy="grid"))
    out = model(torch.rand(B, 3, 32, 32))
    expected = grid(torch.rand(B, 3, 32, 32)).locations
    assert torch.allclose(out.loc_means, expected, atol=1e-6)
    losses = compute_losses(out, torch.arange(B) % 10, cfg, LossWeights())
    losses["reinforce"].backward()
    assert (model.locator.fc_mu.weight.grad != 0).any()  # it can learn to move per image


def test_a_checkpoint_from_before_the_new_model_options_loads_with_their_old_behaviour(
        tmp_path):
    from config import train_config
    from trainer import Trainer

    train_cfg, cpu = train_config(parse_args([f"--ckpt_dir={tmp_path}"])), torch.device("cpu")
    older = Trainer(ModelConfig(**SMALL, probe_input="last"), LossWeights(), train_cfg, cpu)
    new_fields = ("reward", "baseline", "probe_input", "policy_input")
    saved = {k: v for k, v in dataclasses.asdict(older.cfg).items() if k not in new_fields}
    path = str(tmp_path / "older.pth")
    torch.save({"model": older.model.state_dict(), "epoch": 1, "model_config": saved}, path)
    assert older.load(path)["epoch"] == 1  # its probe read h_T: --probe_input=last loads it
    summed = Trainer(ModelConfig(**SMALL), LossWeights(), train_cfg, cpu)
    with pytest.raises(UserError, match="probe_input: checkpoint 'last', flags 'summed'"):
        summed.load(path)


def test_a_grid_local_policy_starts_on_the_grid_and_never_leaves_its_cells():
    cfg = ModelConfig(**{**SMALL, "num_glimpses": 9}, policy_input="grid_local", std=1e-4)
    model = RecurrentAttention(cfg)
    grid = RecurrentAttention(dataclasses.replace(cfg, policy="grid"))
    expected = grid(torch.rand(B, 3, 32, 32)).locations  # (T, B, 2)
    out = model(torch.rand(B, 3, 32, 32))
    assert torch.allclose(out.loc_means, expected, atol=1e-6)
    losses = compute_losses(out, torch.arange(B) % 10, cfg, LossWeights())
    losses["reinforce"].backward()
    assert (model.locator.fc_mu.weight.grad != 0).any()  # it can learn to move per image
    # With large weights the means saturate, but each stays inside its third of the image.
    with torch.no_grad():
        model.locator.fc_mu.weight.normal_(0, 100)
    out = model(torch.rand(B, 3, 32, 32))
    offset = (out.loc_means - expected).abs()
    assert offset.max() <= 1 / 3 + 1e-6 and offset.max() > 0.3
