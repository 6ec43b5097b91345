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
from conftest import write_tiny_cifar

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
                "valid_distinct", "train_images_per_s", "lr", "epoch_s"):
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
    assert "linear evaluation of the frozen code (summed states" in out
