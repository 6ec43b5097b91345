"""torchrun with two CPU processes (gloo): one log, one writer, metrics over the whole split."""

import os
import re
import subprocess
import sys

import torch

from checkpoints import load_checkpoint
from config import TrainConfig
from conftest import ROOT, run_main
from data_loader import Batching, make_loader
from datasets import DataSpec, load_data
from model import RecurrentAttention
from modules import ModelConfig
from trainer import evaluate

FLAGS = ["--batch_size=20", "--M=2", "--num_glimpses=3", "--hidden_size=32",
         "--glimpse_hidden=16", "--loc_hidden=16"]


def torchrun(nproc, *flags):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", os.path.join(ROOT, "main.py"), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_two_processes_train_log_once_and_agree_with_one(tiny_cifar, tmp_path):
    data_dir, _ = tiny_cifar
    common = [f"--data_dir={data_dir}", f"--ckpt_dir={tmp_path / 'ckpt'}",
              f"--plot_dir={tmp_path / 'plots'}", *FLAGS]
    done = torchrun(2, "--epochs=1", *common)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("epoch 1/1")]
    assert len(lines) == 1, done.stdout  # rank 0 alone logs
    assert "x 2 processes" in done.stdout
    folder = tmp_path / "ckpt" / "ram_3_6x6_2"
    assert sorted(p.name for p in folder.iterdir()) == [
        "best.pth", "config.json", "epoch_1.pth", "latest.pth", "metrics.jsonl",
        "run.lock"]  # no temporaries
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 1  # rank 0 alone
    assert (tmp_path / "plots" / "ram_3_6x6_2" / "glimpses_epoch_1.npz").is_file()

    ckpt = load_checkpoint(str(folder / "epoch_1.pth"))
    assert len(ckpt["rng"]) == 2  # each rank's streams, so a 2-process resume is exact
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                         for k, v in ckpt["model_config"].items()})
    model = RecurrentAttention(cfg)
    model.load_state_dict(ckpt["model"])
    data = load_data(DataSpec(), str(data_dir), 0.1, seed=1)
    valid = make_loader(data.valid, Batching(7), shuffle=False)  # another batch size on purpose
    m = evaluate(model, valid, TrainConfig(M=2, random_seed=1), torch.device("cpu"))
    single = f"valid acc {m['acc']:.2f}% mse {m['mse']:.4f} psnr {m['psnr']:.2f} dB"
    assert single in lines[0], (single, lines[0])

    tested = run_main("--is_train=False", "--model_epoch=1", *common)
    assert tested.returncode == 0 and "accuracy" in tested.stdout, tested.stderr
    resumed = run_main("--epochs=2", "--resume=True", *common)
    assert resumed.returncode == 0, resumed.stderr
    assert "saved by 2 process(es)" in resumed.stdout and "epoch 2/2" in resumed.stdout


def test_two_processes_train_on_after_the_policy_freezes(tiny_cifar, tmp_path):
    # Frozen, the policy's weights get no gradient; DDP must expect that (--policy_epochs).
    data_dir, _ = tiny_cifar
    done = torchrun(2, "--epochs=2", "--policy_epochs=1", f"--data_dir={data_dir}",
                    f"--ckpt_dir={tmp_path / 'ckpt'}", f"--plot_dir={tmp_path / 'plots'}",
                    *FLAGS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "epoch 2/2" in done.stdout


def test_test_split_figures_do_not_depend_on_the_process_count(tiny_cifar, tmp_path):
    data_dir, _ = tiny_cifar
    common = [f"--data_dir={data_dir}", f"--ckpt_dir={tmp_path / 'ckpt'}",
              f"--plot_dir={tmp_path / 'plots'}", *FLAGS]
    assert run_main("--epochs=1", *common).returncode == 0
    one = run_main("--is_train=False", *common)
    two = torchrun(2, "--is_train=False", *common)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]

    def figures(text):
        return re.search(r"accuracy .*psnr [-\d.]+ dB", text).group(0)

    assert figures(one.stdout) == figures(two.stdout)
    assert sum(line.startswith("test ") for line in two.stdout.splitlines()) == 1  # rank 0

    def adaptivity(text):  # the mean-path test: its sums are added up over the processes
        return next(line for line in text.splitlines() if line.startswith("adaptivity ("))

    assert adaptivity(one.stdout) == adaptivity(two.stdout)
