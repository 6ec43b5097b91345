"""main.py end to end, as a user runs it, on a tiny CIFAR-10 written in the official layout."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from config import (
    TrainConfig,
    ignored_flags,
    loss_weights,
    model_config,
    parse_args,
    train_config,
)
from conftest import ROOT, run_main
from model import LossWeights
from modules import ModelConfig
from utils import SINGLE_PROCESS, Procs, UserError, pick_device, progress

FAST = ["--batch_size=32", "--M=2", "--num_glimpses=3", "--hidden_size=32",
        "--glimpse_hidden=16", "--loc_hidden=16"]


def outputs(tmp_path):
    return [f"--ckpt_dir={tmp_path / 'ckpt'}", f"--plot_dir={tmp_path / 'plots'}",
            f"--logs_dir={tmp_path / 'logs'}"]


def test_train_one_epoch_then_test_that_epoch(tiny_cifar, tmp_path):
    data_dir, _ = tiny_cifar
    common = [f"--data_dir={data_dir}", *outputs(tmp_path), *FAST]
    trained = run_main("--epochs=1", *common)
    assert trained.returncode == 0, trained.stderr
    assert "epoch 1/1" in trained.stdout and "valid acc" in trained.stdout
    folder = tmp_path / "ckpt" / "ram_3_6x6_2"
    for name in ("epoch_1.pth", "best.pth", "latest.pth", "config.json"):
        assert (folder / name).is_file(), name
    assert (tmp_path / "plots" / "ram_3_6x6_2" / "glimpses_epoch_1.npz").is_file()

    # No progress bar in a log: stderr is a pipe here, not a terminal.
    assert "batch/s" not in trained.stderr and "epoch 1:" not in trained.stderr

    tested = run_main("--is_train=False", "--model_epoch=1", "--resume=true", *common)
    assert tested.returncode == 0, tested.stderr
    assert "accuracy" in tested.stdout and "psnr" in tested.stdout
    assert tested.stderr.strip() == ("main.py: warning: --resume=true is ignored with "
                                     "--is_train=false; testing reads the checkpoint that "
                                     "--model_epoch or --best picks")

    missing = run_main("--is_train=false", "--model_epoch=7", *common)
    assert missing.returncode == 2
    assert "epochs saved: 1" in missing.stderr
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


def test_model_epoch_0_tests_the_seeded_untrained_network(tiny_cifar, tmp_path):
    data_dir, _ = tiny_cifar
    common = ["--is_train=False", "--model_epoch=0", f"--data_dir={data_dir}",
              *outputs(tmp_path), *FAST]
    runs = [run_main(*common, f"--random_seed={seed}") for seed in (1, 1, 2)]
    for done in runs:
        assert done.returncode == 0, done.stderr
        assert "epoch 0 (untrained, no checkpoint)" in done.stdout
        assert "linear evaluation of the frozen code" in done.stdout
    assert not (tmp_path / "ckpt").exists()  # nothing to read, nothing written
    figures = [next(line for line in done.stdout.splitlines() if line.startswith("test "))
               .split("M=2:")[1] for done in runs]
    assert figures[0] == figures[1]  # the initialisation the seed draws, the same every time
    assert figures[0] != figures[2]


def test_supervised_objective_and_fixed_policies_train(tiny_cifar, tmp_path):
    data_dir, _ = tiny_cifar
    for extra, name in ((["--objective=supervised"], "ram_3_6x6_2_supervised"),
                        (["--policy=random"], "ram_3_6x6_2_random"),
                        (["--policy=centre", "--use_tensorboard=True"], "ram_3_6x6_2_centre")):
        done = run_main("--epochs=1", f"--data_dir={data_dir}", *outputs(tmp_path), *FAST, *extra)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "ckpt" / name / "best.pth").is_file()
    assert os.listdir(tmp_path / "logs" / "ram_3_6x6_2_centre")
    # Each run glimpsed as its policy says: the plots' data hold where it looked.
    where = {name: np.load(tmp_path / "plots" / name / "glimpses_epoch_1.npz")["locations"]
             for name in ("ram_3_6x6_2_random", "ram_3_6x6_2_centre")}
    assert (where["ram_3_6x6_2_centre"] == 0).all()
    assert where["ram_3_6x6_2_random"].std() > 0.3


@pytest.mark.parametrize("flags, expected", [
    (["--epoch=3"], "unrecognized arguments: --epoch=3"),
    (["--is_train=maybe"], "--is_train"),
    (["--patch_size=0"], "--patch_size"),
    (["--patch_size=six"], "--patch_size"),
    (["--num_glimpses=-1"], "--num_glimpses"),
    (["--valid_size=1.5"], "--valid_size"),
    (["--std=0"], "--std"),
    (["--M=0"], "--M"),
    (["--policy=greedy"], "--policy"),
    (["--objective=magic"], "--objective"),
    (["--glimpse_scale=1"], "--glimpse_scale"),
    (["--patch_size=20", "--glimpse_scale=4"], "largest patch"),
    (["--is_train=false"], "no checkpoint"),
    (["--resume=true"], "no checkpoint"),
    (["--random_seed=-1"], "--random_seed"),
    (["--random_seed=4294967296"], "--random_seed"),
    (["--device=xpu"], "--device=xpu is not a device this project runs on"),
    (["--device=meta"], "--device=meta is not a device this project runs on"),
    (["--device=gpu"], "--device=gpu is not a device this project runs on"),
    ([f"--num_workers={(os.cpu_count() or 1) + 1}"], "--num_workers"),
    (["--eval_chunk=0"], "--eval_chunk"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, flags, expected):
    done = run_main(*flags, f"--data_dir={tmp_path / 'data'}", *outputs(tmp_path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert expected in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_booleans_accept_any_case(tmp_path):
    from config import parse_args

    assert parse_args(["--is_train=FALSE"]).is_train is False
    assert parse_args(["--is_train=True"]).is_train is True
    assert parse_args(["--use_tensorboard=true"]).use_tensorboard is True


def test_cuda_device_numbers_are_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match="2 CUDA device"):
        pick_device("cuda:2")


@pytest.mark.parametrize("flags, expected", [
    (["--model_epoch=3"], "--model_epoch=3 is ignored while training"),
    (["--lr_patience=50"], "training stops before the learning rate is cut"),
    (["--dataset=mnist", "--canvas_size=100"], "--canvas_size=100 is ignored with --dataset=mnist"),
    (["--dataset=translated", "--distractors=8"], "only cluttered canvases have distractors"),
])
def test_flags_that_do_nothing_are_warned_about(flags, expected):
    assert [line for line in ignored_flags(train_config(parse_args(flags)))
            if expected in line]


def test_progress_bars_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert not progress([], SINGLE_PROCESS).disable
    assert progress([], Procs(1, 2, 1)).disable  # rank 0 alone draws
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert progress([], SINGLE_PROCESS).disable


def test_each_config_has_the_flags_defaults():
    args = parse_args([])
    assert model_config(args) == ModelConfig()
    assert loss_weights(args) == LossWeights()
    assert train_config(args) == TrainConfig()


def test_a_file_where_the_run_folder_should_be_is_one_line(tiny_cifar, tmp_path):
    data_dir, _ = tiny_cifar
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "ram_3_6x6_2").write_text("not a folder")
    done = run_main("--epochs=1", f"--data_dir={data_dir}", *outputs(tmp_path), *FAST)
    assert done.returncode == 2
    assert "is a file, where this run's folder should be" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


@pytest.mark.parametrize("flag", ["--seconds=nan", "--seconds=0", "--threads=0"])
def test_benchmark_refuses_bad_values_in_one_line(flag):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"),
                           flag], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_a_stop_signal_in_a_forked_data_worker_is_left_to_the_training_process(capsys):
    import signal

    from main import StopOnSignal

    stop = StopOnSignal()
    pid = os.fork()
    if pid == 0:  # the worker: the inherited handler must neither print nor stop anything
        stop(signal.SIGINT, None)
        os._exit(3 if stop.requested() else 0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert "stopping" not in capsys.readouterr().err
    stop(signal.SIGINT, None)  # the training process itself
    assert stop.requested() and "stopping after this step" in capsys.readouterr().err
