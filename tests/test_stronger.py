"""The stronger-model options of issue 12: LSTM and GRU cores, the convolutional glimpse
encoder, training augmentation and the cosine schedule; each off by default."""

import dataclasses
import json
import math
import signal

import numpy as np
import pytest
import torch

import main
from checkpoints import load_checkpoint
from config import (
    TrainConfig,
    ignored_flags,
    loss_weights,
    model_config,
    model_name,
    parse_args,
    train_config,
)
from data_loader import Batching, ImageBatches, make_loader
from datasets import Augmented, DataSpec, crop_and_flip, load_data
from model import LossWeights, RecurrentAttention, compute_losses
from modules import ConvGlimpseEncoder, GlimpseNetwork, ModelConfig
from trainer import Trainer, resume_changes
from utils import UserError

B = 4
SMALL = dict(glimpse_hidden=16, loc_hidden=8, hidden_size=32, num_glimpses=3)
CPU = torch.device("cpu")
TINY = ["--batch_size=20", "--M=1", "--num_glimpses=3", "--hidden_size=32",
        "--glimpse_hidden=16", "--loc_hidden=16"]

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


def test_crop_and_flip_equals_the_hand_computed_result():
    x = torch.arange(1, 10, dtype=torch.uint8).view(1, 1, 3, 3).repeat(2, 1, 1, 1)
    # Image 0: window at column 0, row 2 of the 1-px-padded 5x5 image, mirrored.
    # Image 1: window at (1, 1), the image itself, not mirrored.
    u = torch.tensor([[0.0, 0.99, 0.2], [0.5, 0.5, 0.7]])
    out = crop_and_flip(x, u, pad=1)
    assert out.dtype == torch.uint8
    assert out[0, 0].tolist() == [[5, 4, 0], [8, 7, 0], [0, 0, 0]]
    assert torch.equal(out[1], x[1])


def stored_images(n=12, seed=0):
    images = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return ImageBatches(images, np.zeros(n, np.uint8))


def test_an_images_augmentation_is_fixed_by_the_seed_the_epoch_and_the_image():
    index = np.arange(12)
    first = Augmented(stored_images(), seed=1)[index, 0][0]
    assert torch.equal(Augmented(stored_images(), seed=1)[index, 0][0], first)
    assert torch.equal(Augmented(stored_images(), seed=1)[index[5:8], 0][0], first[5:8])
    assert not torch.equal(Augmented(stored_images(), seed=1)[index, 1][0], first)
    assert not torch.equal(Augmented(stored_images(), seed=2)[index, 0][0], first)
    stored = stored_images()
    assert not torch.equal(first, stored.images)
    assert torch.equal(Augmented(stored, seed=1)[index, None][0], stored.images)  # evaluation


def by_position(batches):
    return {int(p): image for images, _, positions in batches
            for p, image in zip(positions, images, strict=True)}


def test_a_resumed_epoch_gets_the_same_augmented_images():
    def loader(batch_size):
        return make_loader(Augmented(stored_images(), seed=3), Batching(batch_size, seed=3),
                           shuffle=True)

    straight = by_position(loader(4).epoch(0))
    stopped = loader(4)
    batches = iter(stopped.epoch(0))
    seen = by_position([next(batches), next(batches)])
    resumed = loader(2)  # with another batch size, as a resume may be
    resumed.load_state_dict(stopped.state_dict())
    seen.update(by_position(resumed.epoch(0)))
    assert straight.keys() == seen.keys() == set(range(12))
    assert all(torch.equal(straight[p], seen[p]) for p in straight)


def tiny_run(data_dir, ckpt_dir, *extra):
    args = parse_args([f"--data_dir={data_dir}", f"--ckpt_dir={ckpt_dir}", *TINY, *extra])
    data = load_data(DataSpec(), str(data_dir), 0.1, seed=1)
    return Trainer(model_config(args, data), loss_weights(args), train_config(args), CPU), data


def test_augmentation_changes_training_batches_and_never_validation_batches(tiny_cifar,
                                                                            tmp_path):
    data_dir, _ = tiny_cifar
    trainer, data = tiny_run(data_dir, tmp_path, "--augment=true")
    train_loader, valid_loader = main.loaders(trainer, data)
    for images, _, positions in valid_loader:
        assert torch.equal(images, data.valid.images[positions])
    changed = [not torch.equal(images[i], data.train.images[p])
               for images, _, positions in train_loader.epoch(0)
               for i, p in enumerate(positions)]
    assert len(changed) == 180 and sum(changed) > 0.9 * len(changed)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_augmentation_leaves_the_policy_random_stream_alone(tiny_cifar, num_workers):
    data_dir, _ = tiny_cifar
    data = load_data(DataSpec(), str(data_dir), 0.1, seed=1)
    train = make_loader(Augmented(data.train, seed=1),
                        Batching(7, seed=1, num_workers=num_workers), shuffle=True)
    before = torch.get_rng_state()
    for epoch in (0, 1):
        for _ in train.epoch(epoch):
            pass
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("dataset", ["mnist", "cluttered"])
def test_augmentation_is_refused_for_digits_in_one_line(tmp_path, capsys, dataset):
    flags = [f"--dataset={dataset}", "--augment=true", f"--data_dir={tmp_path}",
             f"--ckpt_dir={tmp_path / 'ckpt'}"]
    assert main.main(flags) == 2
    err = capsys.readouterr().err
    assert "--augment=true is for --dataset=cifar10 only" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "ckpt").exists()


def stop_at_the_end_of_epoch(monkeypatch, epoch, steps_per_epoch):
    """Make the next in-process main.main stop, as on Ctrl-C, once `epoch` epochs are done: the
    stop is asked after every step and once more after each epoch."""
    asked = iter(range(10**6))
    last = epoch * (steps_per_epoch + 1) - 1
    monkeypatch.setattr(main.StopOnSignal, "requested", lambda self: next(asked) >= last)


def learning_rates(folder):
    with open(folder / "metrics.jsonl") as f:
        return [json.loads(line)["lr"] for line in f]


def test_cosine_schedule_follows_its_formula_and_a_resume_continues_it(tiny_cifar, tmp_path,
                                                                       monkeypatch, capsys):
    data_dir, _ = tiny_cifar

    def run(out, *extra):
        return main.main([f"--data_dir={data_dir}", f"--ckpt_dir={out / 'ckpt'}",
                          f"--plot_dir={out / 'plots'}", *TINY, "--schedule=cosine",
                          "--epochs=4", *extra])  # a later --epochs overrides this one

    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(straight) == 0
    stop_at_the_end_of_epoch(monkeypatch, 2, steps_per_epoch=9)  # 180 images, batch 20
    assert run(split) == 128 + signal.SIGINT
    monkeypatch.undo()
    assert run(split, "--schedule=plateau", "--resume=true") == 2
    assert "pass --schedule=cosine to resume" in capsys.readouterr().err
    assert run(split, "--resume=true") == 0
    folder = "ckpt/ram_3_6x6_2"
    expected = [3e-4 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    assert learning_rates(straight / folder) == pytest.approx(expected, rel=1e-12)
    assert learning_rates(split / folder) == learning_rates(straight / folder)
    a = load_checkpoint(str(straight / folder / "latest.pth"))
    b = load_checkpoint(str(split / folder / "latest.pth"))
    assert a["optimizer"]["param_groups"][0]["lr"] == 0.0  # annealed to 0 after the last epoch
    assert a["scheduler"] == b["scheduler"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # Resumed with a new --epochs, training goes on along the cosine that ends there; a new
    # --lr_patience is warned about, and not said to be applied.
    capsys.readouterr()
    assert run(straight, "--epochs=6", "--resume=true", "--lr_patience=5") == 0
    out, err = capsys.readouterr()
    assert "note: --epochs=6 (the run had 4) is applied" in out and "--lr_patience=5" not in out
    assert "--lr_patience=5 is ignored with --schedule=cosine" in err
    assert learning_rates(straight / folder)[4:] == pytest.approx(
        [3e-4 * (1 + math.cos(math.pi * e / 6)) / 2 for e in (4, 5)], rel=1e-12)


def test_std_final_anneals_the_policy_and_a_checkpoint_keeps_its_epochs_std(tiny_cifar, tmp_path,
                                                                          capsys):
    data_dir, _ = tiny_cifar

    def run(*extra):
        return main.main([f"--data_dir={data_dir}", f"--ckpt_dir={tmp_path / 'ckpt'}",
                          f"--plot_dir={tmp_path / 'plots'}", *TINY, "--std=0.2",
                          "--std_final=0.05", "--epochs=3", *extra])

    def stds(folder):
        with open(folder / "metrics.jsonl") as f:
            return [json.loads(line)["policy_std"] for line in f]

    assert run() == 0
    folder = tmp_path / "ckpt" / "ram_3_6x6_2_stdfinal0.05"
    assert stds(folder) == pytest.approx([0.2, 0.1, 0.05], rel=1e-6)  # x0.5 an epoch
    latest = load_checkpoint(str(folder / "latest.pth"))
    assert latest["model"]["locator.std"].item() == pytest.approx(0.05)
    epoch_1 = load_checkpoint(str(folder / "epoch_1.pth"))
    assert epoch_1["model"]["locator.std"].item() == pytest.approx(0.2)
    # Testing samples with the std of the checkpoint's epoch, not with --std.
    args = parse_args([f"--ckpt_dir={tmp_path / 'ckpt'}", *TINY, "--std=0.2",
                       "--std_final=0.05"])
    trainer = Trainer(model_config(args), loss_weights(args), train_config(args), CPU)
    assert float(trainer.model.locator.std) == pytest.approx(0.2)
    trainer.load(str(folder / "epoch_2.pth"))
    assert float(trainer.model.locator.std) == pytest.approx(0.1)
    # A resume with a new --epochs follows the anneal that ends there.
    capsys.readouterr()
    assert run("--epochs=5", "--resume=true") == 0
    assert stds(folder)[3:] == pytest.approx([0.2 * 0.25 ** 0.75, 0.05], rel=1e-6)


def test_an_annealed_policy_samples_and_scores_with_its_buffer():
    fixed = RecurrentAttention(ModelConfig(**SMALL, std=0.1))
    annealed = RecurrentAttention(ModelConfig(**SMALL, std=0.3, std_final=0.01))
    annealed.load_state_dict({**fixed.state_dict(), "locator.std": torch.tensor(0.1)})
    x = torch.rand(B, 3, 32, 32)
    torch.manual_seed(1)
    a = fixed(x)
    torch.manual_seed(1)
    b = annealed(x)
    assert torch.equal(a.locations, b.locations)
    assert torch.allclose(a.log_pi, b.log_pi, atol=1e-6)
    annealed.locator.std.fill_(1e-6)  # next to no exploration: the path is the aimed one
    c = annealed(x)
    assert (c.locations - c.loc_means).abs().max() < 1e-4


def test_std_final_and_policy_epochs_are_refused_where_nothing_learns():
    for policy in ("grid", "random", "centre"):
        for flag in ("--std_final=0.01", "--policy_epochs=3"):
            with pytest.raises(UserError, match=f"{flag.split('=')[0]} is for the learned"):
                model_config(parse_args([flag, f"--policy={policy}"]))
    for flag in ("--std_final=0", "--policy_epochs=0"):
        with pytest.raises(SystemExit):
            parse_args([flag])


def test_policy_epochs_freezes_the_policy_on_its_aimed_path(tiny_cifar, tmp_path, capsys):
    data_dir, _ = tiny_cifar
    flags = [f"--data_dir={data_dir}", f"--ckpt_dir={tmp_path / 'ckpt'}",
             f"--plot_dir={tmp_path / 'plots'}", *TINY, "--policy_epochs=1"]
    assert main.main([*flags, "--epochs=2"]) == 0
    folder = tmp_path / "ckpt" / "ram_3_6x6_2_policyepochs1"
    with open(folder / "metrics.jsonl") as f:
        assert [json.loads(line)["policy_std"] for line in f] == [0.05, 0.0]
    first = load_checkpoint(str(folder / "epoch_1.pth"))["model"]
    second = load_checkpoint(str(folder / "epoch_2.pth"))["model"]
    assert bool(first["locator.exploring"]) and not bool(second["locator.exploring"])
    policy = [k for k in first if k.startswith("locator.") and k != "locator.exploring"]
    assert policy and all(torch.equal(first[k], second[k]) for k in policy)  # frozen
    assert not torch.equal(first["core.i2h.weight"], second["core.i2h.weight"])  # still learns
    # Frozen, the model glimpses where the policy aims: no noise, nothing to score.
    args = parse_args(flags)
    trainer = Trainer(model_config(args), loss_weights(args), train_config(args), CPU)
    trainer.load(str(folder / "epoch_2.pth"))
    out = trainer.model(torch.rand(B, 3, 32, 32))
    assert torch.equal(out.locations, out.loc_means) and (out.log_pi == 0).all()
    trainer.load(str(folder / "epoch_1.pth"))  # still exploring
    out = trainer.model(torch.rand(B, 3, 32, 32))
    assert not torch.equal(out.locations, out.loc_means)
    capsys.readouterr()
    assert main.main([*flags, "--is_train=false"]) == 0
    assert "distinct glimpses" in capsys.readouterr().out


def test_policy_lr_gives_the_policy_its_own_rate_and_the_schedule_moves_both():
    args = parse_args([*TINY, "--policy_lr=1e-2", "--lr_patience=1"])
    cfg = model_config(args)
    trainer = Trainer(cfg, loss_weights(args), train_config(args), CPU)
    model, optimizer = trainer.model, trainer.optimizer
    rest, policy = optimizer.param_groups
    assert [id(p) for p in policy["params"]] == [id(p) for p in model.locator.parameters()]
    assert {id(p) for p in rest["params"] + policy["params"]} == \
        {id(p) for p in model.parameters()}
    assert len(rest["params"]) + len(policy["params"]) == len(list(model.parameters()))
    # Adam's first step moves every weight with a gradient by its group's rate (|g| >> eps).
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.manual_seed(0)
    x, y = torch.rand(B, 3, 32, 32), torch.randint(0, 10, (B,))
    compute_losses(model(x), y, cfg, LossWeights())["total"].backward()
    optimizer.step()
    rates = {}
    for name, p in model.named_parameters():
        moved = (p.detach() - before[name]).abs()[p.grad.abs() > 1e-4]
        rates.setdefault(name.startswith("locator."), []).append(moved)
    for is_policy, lr in ((True, 1e-2), (False, 3e-4)):
        moved = torch.cat(rates[is_policy])
        assert moved.numel() > 100 and moved == pytest.approx(torch.full_like(moved, lr), rel=1e-3)
    for score in (1.0, 0.5, 0.5):  # a plateau of --lr_patience=1 epoch cuts both by 10x
        trainer.scheduler.step(score)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([3e-5, 1e-3], rel=1e-12)
    # Without the flag, one group, as before it existed.
    args = parse_args(TINY)
    one = Trainer(model_config(args), loss_weights(args), train_config(args), CPU)
    assert len(one.optimizer.param_groups) == 1


def test_policy_lr_follows_the_cosine_is_kept_on_resume_and_refused_without_a_policy(
        tiny_cifar, tmp_path, monkeypatch, capsys):
    data_dir, _ = tiny_cifar

    def run(*extra):
        return main.main([f"--data_dir={data_dir}", f"--ckpt_dir={tmp_path / 'ckpt'}",
                          f"--plot_dir={tmp_path / 'plots'}", *TINY, "--schedule=cosine",
                          "--epochs=3", "--policy_lr=1e-3", *extra])

    stop_at_the_end_of_epoch(monkeypatch, 1, steps_per_epoch=9)  # 180 images, batch 20
    assert run() == 128 + signal.SIGINT
    monkeypatch.undo()
    capsys.readouterr()
    assert run("--resume=true", "--policy_lr=2e-3") == 2
    assert "pass --policy_lr=0.001 to resume" in capsys.readouterr().err
    assert run("--resume=true", "--init_lr=6e-4") == 0
    with open(tmp_path / "ckpt" / "ram_3_6x6_2" / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    factors = [(1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)]
    assert [m["lr"] for m in lines] == pytest.approx(
        [3e-4 * factors[0]] + [6e-4 * c for c in factors[1:]], rel=1e-12)
    assert [m["policy_lr"] for m in lines] == pytest.approx([1e-3 * c for c in factors],
                                                            rel=1e-12)
    # Under the plateau schedule a new --init_lr restarts the rest, the policy at --policy_lr;
    # a run without the flag is not resumed with it, nor the other way round.
    plateau = [f"--data_dir={data_dir}", f"--ckpt_dir={tmp_path / 'plateau'}",
               f"--plot_dir={tmp_path / 'plots'}", *TINY]
    assert main.main([*plateau, "--epochs=1"]) == 0
    capsys.readouterr()
    assert main.main([*plateau, "--epochs=2", "--resume=true", "--policy_lr=1e-3"]) == 2
    assert "; leave --policy_lr out to resume" in capsys.readouterr().err
    plateau.append("--policy_lr=1e-3")
    assert main.main([*plateau, "--epochs=1", f"--ckpt_dir={tmp_path / 'two'}"]) == 0
    assert main.main([*plateau, "--epochs=2", f"--ckpt_dir={tmp_path / 'two'}", "--resume=true",
                      "--init_lr=6e-4"]) == 0
    with open(tmp_path / "two" / "ram_3_6x6_2" / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert [(m["lr"], m["policy_lr"]) for m in lines] == [(3e-4, 1e-3), (6e-4, 1e-3)]
    capsys.readouterr()
    assert run("--policy=grid", "--resume=false") == 2
    err = capsys.readouterr().err
    assert "--policy_lr is for the learned policy; --policy=grid" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_lr_patience_with_cosine_is_warned_about():
    warned = ignored_flags(train_config(parse_args(["--schedule=cosine", "--lr_patience=5"])))
    assert [line for line in warned if "--lr_patience=5 is ignored with --schedule=cosine" in line]
    # The plateau warning about the cut coming after early stopping does not apply to cosine.
    assert not ignored_flags(train_config(parse_args(["--schedule=cosine",
                                                      "--train_patience=10"])))


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
    # A run from before --schedule and --augment trained on the plateau, unaugmented.
    run = {k: v for k, v in dataclasses.asdict(TrainConfig()).items()
           if k not in ("schedule", "augment")}
    ckpt = {"train_config": run, "loss_weights": dataclasses.asdict(LossWeights())}
    assert resume_changes(ckpt, TrainConfig(), LossWeights()) == []
    assert resume_changes(ckpt, TrainConfig(schedule="cosine"), LossWeights()) == [
        ("schedule", "plateau", "cosine")]


def test_every_option_together_trains_an_epoch_and_tests_through_main(tiny_cifar, tmp_path,
                                                                     capsys):
    data_dir, _ = tiny_cifar
    flags = [f"--data_dir={data_dir}", f"--ckpt_dir={tmp_path / 'ckpt'}",
             f"--plot_dir={tmp_path / 'plots'}", *TINY, "--core=lstm", "--glimpse_encoder=conv",
             "--augment=true", "--schedule=cosine", "--epochs=1"]
    assert main.main(flags) == 0
    assert main.main([*flags, "--is_train=false", "--linear_eval=false"]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "test ram_3_6x6_2_lstm_conv epoch 1" in out
