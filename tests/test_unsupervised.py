"""Issue-12 facts: no label reaches the unsupervised model or its choice of checkpoint; the
metrics file and its plot; the test's adaptivity and linear-evaluation lines."""

import json
import os
import pickle
import shutil

import torch

import main
import plot_glimpses
from checkpoints import load_checkpoint
from config import TrainConfig
from conftest import write_tiny_cifar
from model import RecurrentAttention
from modules import ModelConfig, grid_locations
from trainer import encode

TINY = ["--batch_size=20", "--M=1", "--num_glimpses=3", "--hidden_size=32",
        "--glimpse_hidden=16", "--loc_hidden=16", "--linear_eval=false"]
NAME = "ram_3_6x6_2"


def flags(data_dir, out, *extra):
    return [f"--data_dir={data_dir}", f"--ckpt_dir={out / 'ckpt'}", f"--plot_dir={out / 'plots'}",
            *TINY, *extra]


def relabel(source, target):
    """A copy of the tiny CIFAR-10 in `source` with every label changed."""
    shutil.copytree(source, target)
    batches = target / "cifar-10-batches-py"
    for name in os.listdir(batches):
        with open(batches / name, "rb") as f:
            entry = pickle.load(f)
        entry["labels"] = [(label + 3) % 10 for label in entry["labels"]]
        with open(batches / name, "wb") as f:
            pickle.dump(entry, f)


def test_labels_reach_neither_the_unsupervised_model_nor_its_checkpoint_choice(tmp_path):
    data = tmp_path / "data"
    write_tiny_cifar(str(data))
    relabel(data, tmp_path / "relabelled")
    runs = {}
    for run, folder in (("a", data), ("b", tmp_path / "relabelled")):
        assert main.main(flags(folder, tmp_path / run, "--epochs=3")) == 0
        best = load_checkpoint(str(tmp_path / run / "ckpt" / NAME / "best.pth"))
        runs[run] = best
    a, b = runs["a"], runs["b"]
    assert a["epoch"] == b["epoch"] and a["best_score"] == b["best_score"]
    for key, value in a["model"].items():
        if not key.startswith("classifier."):  # the probe alone learns from the labels
            assert torch.equal(value, b["model"][key]), key
    assert any(not torch.equal(v, b["model"][k]) for k, v in a["model"].items()
               if k.startswith("classifier."))


def test_every_epoch_has_a_metrics_line_and_the_curves_are_drawn(tiny_cifar, tmp_path, capsys):
    data_dir, _ = tiny_cifar
    assert main.main(flags(data_dir, tmp_path, "--epochs=2")) == 0
    path = tmp_path / "ckpt" / NAME / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    for key in ("train_recon", "train_acc", "valid_acc", "valid_psnr", "valid_loc_spread",
                "valid_distinct", "train_images_per_s", "lr", "epoch_s", "policy_std"):
        assert all(key in line for line in lines), key
    assert 1 <= lines[-1]["valid_distinct"] <= 3
    out = tmp_path / "curves.png"
    assert plot_glimpses.main(["--metrics", str(path), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000


def test_the_test_reports_adaptivity_and_the_linear_evaluation(tiny_cifar, tmp_path, capsys):
    data_dir, _ = tiny_cifar
    common = flags(data_dir, tmp_path)
    assert main.main([*common, "--epochs=1"]) == 0
    capsys.readouterr()
    assert main.main([*common, "--is_train=false", "--linear_eval=true"]) == 0
    out = capsys.readouterr().out
    assert "distinct glimpses" in out
    assert "adaptivity (one path, no exploration noise)" in out and "gain" in out
    assert "adaptivity control (one path, no exploration noise)" in out
    assert "every image on another test image's path" in out
    assert "linear evaluation of the frozen code (summed states" in out
    assert main.main([*common, "--is_train=false", "--linear_eval=true",
                      "--linear_eval_features=glimpses"]) == 0
    assert "linear evaluation of the frozen glimpse features (g_1..g_T" in capsys.readouterr().out


def test_the_linear_evaluation_reads_the_features_it_is_told():
    cfg = ModelConfig(glimpse_hidden=16, loc_hidden=8, hidden_size=32, num_glimpses=3,
                      policy="grid")  # no noise: each feature can be recomputed by hand
    model = RecurrentAttention(cfg)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    loader = [(images, torch.arange(5), torch.arange(5))]
    x = images.float() / 255

    def features(kind):
        train_cfg = TrainConfig(linear_eval_features=kind)
        feats, labels = encode(model, loader, train_cfg, torch.device("cpu"))
        assert labels.tolist() == list(range(5))
        return feats

    code, glimpses, states = features("code"), features("glimpses"), features("states")
    assert code.shape == (5, 32) and glimpses.shape == states.shape == (5, 3 * 32)
    # The states side by side sum to the code the decoder and the probe read, s_T.
    assert torch.allclose(states.view(5, 3, 32).sum(1), code, atol=1e-5)
    with torch.no_grad():
        prepared = model.retina.prepare(model.normalize(x))
        h = torch.zeros(5, 32)
        for t, l in enumerate(grid_locations(3)):
            l = l.expand(5, 2)
            g = model.glimpse(model.retina(prepared, l), l)
            h, _ = model.core(g, h, h)
            assert torch.allclose(glimpses[:, 32 * t:32 * (t + 1)], g, atol=1e-6)
            assert torch.allclose(states[:, 32 * t:32 * (t + 1)], h, atol=1e-6)
    assert not model.glimpse._forward_hooks and not model.core._forward_hooks  # removed
