"""Resume, signals, atomic checkpoints, non-finite losses, determinism and bad input."""

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data_loader
import main
import plot_glimpses
import trainer
from checkpoints import load_checkpoint
from conftest import ROOT, run_main, write_tiny_cifar
from utils import RunLock, UserError, atomic_write, remove_temporaries

TINY = ["--batch_size=20", "--M=1", "--num_glimpses=3", "--hidden_size=32",
        "--glimpse_hidden=16", "--loc_hidden=16"]
NAME = "ram_3_6x6_2"


def flags(data_dir, out, *extra):
    return [f"--data_dir={data_dir}", f"--ckpt_dir={out / 'ckpt'}", f"--plot_dir={out / 'plots'}",
            *TINY, *extra]


def weights(out, name="latest.pth"):
    return load_checkpoint(str(out / "ckpt" / NAME / name))["model"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("workers", ["--num_workers=0", "--num_workers=1"])
def test_two_epochs_equal_one_plus_resume_one(tiny_cifar, tmp_path, capsys, workers):
    data_dir, _ = tiny_cifar
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main.main(flags(data_dir, straight, "--epochs=2", workers)) == 0
    assert main.main(flags(data_dir, split, "--epochs=1", workers)) == 0
    capsys.readouterr()
    assert main.main(flags(data_dir, split, "--epochs=2", "--resume=True", workers)) == 0
    out = capsys.readouterr().out
    assert "epoch 2/2" in out and "epoch 1/2" not in out  # it resumed, it did not start over
    assert same_weights(weights(straight), weights(split))
    resumed = load_checkpoint(str(split / "ckpt" / NAME / "latest.pth"))
    assert resumed["epoch"] == 2 and resumed["loader"]["images_seen"] == 0


def test_same_seed_same_losses_and_weights(tiny_cifar, tmp_path, capsys):
    data_dir, _ = tiny_cifar
    lines = []
    for run in ("a", "b"):
        assert main.main(flags(data_dir, tmp_path / run, "--epochs=1")) == 0
        out = capsys.readouterr().out
        lines.append([line.split("| valid")[0] for line in out.splitlines()
                      if line.startswith("epoch 1/1")])
    assert lines[0] and lines[0] == lines[1]
    assert same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    assert main.main(flags(data_dir, tmp_path / "c", "--epochs=1", "--random_seed=2")) == 0
    assert not same_weights(weights(tmp_path / "a"), weights(tmp_path / "c"))


@pytest.fixture
def long_epoch_cifar(tmp_path):
    """1,000 train images: at batch size 2, an epoch of 450 steps lasts several seconds."""
    data_dir = tmp_path / "data"
    write_tiny_cifar(str(data_dir), per_batch=200)
    return data_dir


def start_training(data_dir, out, *extra):
    """main.py in a real process, with epochs long enough to be stopped inside one."""
    cmd = [sys.executable, os.path.join(ROOT, "main.py"),
           *flags(data_dir, out, "--batch_size=2", *extra)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_training(proc):
    """Returns once the signal handlers are in place and the first step is about to run.

    A signal sent now stops the run after that step, inside the epoch on any machine; a fixed
    wait was not: a faster CPU finished the whole epoch within it (CI failed so)."""
    for line in proc.stdout:
        if line.startswith("training "):
            return
    raise AssertionError(proc.stderr.read())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_mid_epoch_and_resume_matches_straight_run(long_epoch_cifar,
                                                                      tmp_path, signum):
    data_dir = long_epoch_cifar
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    proc = start_training(data_dir, stopped, "--epochs=1")
    wait_for_training(proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert "--resume=True" in err and "Traceback" not in err
    ckpt = load_checkpoint(str(stopped / "ckpt" / NAME / "latest.pth"))
    seen = ckpt["loader"]["images_seen"]
    assert ckpt["epoch"] == 0 and 0 < seen < 900 and f"{seen} images in" in err
    assert not (stopped / "ckpt" / NAME / "epoch_1.pth").exists()

    resumed = run_main(*flags(data_dir, stopped, "--batch_size=2", "--epochs=1",
                              "--resume=True"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"{seen} images into epoch 1" in resumed.stdout
    assert run_main(*flags(data_dir, straight, "--batch_size=2", "--epochs=1")).returncode == 0
    assert same_weights(weights(stopped), weights(straight))


def test_second_sigint_exits_at_once_without_touching_files(long_epoch_cifar, tmp_path):
    data_dir = long_epoch_cifar
    big = ["--valid_size=0.9", "--batch_size=100", "--hidden_size=512"]
    assert main.main(flags(data_dir, tmp_path, "--epochs=1", *big)) == 0
    folder = tmp_path / "ckpt" / NAME
    before = {p.name: digest(p) for p in folder.glob("*.pth")}
    # One short training step, then a validation of several seconds: a first Ctrl-C only takes
    # effect after validation, so the second one surely comes before any file is written.
    cmd = [sys.executable, os.path.join(ROOT, "main.py"),
           *flags(data_dir, tmp_path, "--epochs=2", *big, "--M=50", "--resume=True")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stdout:
        if line.startswith("training "):
            break
    proc.send_signal(signal.SIGINT)
    for line in proc.stderr:  # two signals sent at once would merge into one
        if "stopping after this step" in line:
            break
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert {p.name: digest(p) for p in folder.glob("*.pth")} == before


def killed(point, path, new):
    """In a forked child, atomic_write `new` over `path` and die by SIGKILL at `point`:
    ("byte", k) once k bytes are written, or ("after", name) right after os.<name> returns."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        kind, where = point
        if kind == "after":
            real = getattr(os, where)

            def then_die(*args):
                real(*args)
                os.kill(os.getpid(), signal.SIGKILL)
            setattr(os, where, then_die)

        def write(f):
            if kind == "byte":
                f.write(new[:where])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            f.write(new)
        atomic_write(str(path), write)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_kill_9_at_any_point_of_a_write_leaves_a_whole_file(tmp_path):
    path = tmp_path / "latest.pth"
    old, new = b"old" * 1000, b"new" * 2000
    atomic_write(str(path), lambda f: f.write(old))
    points = [("byte", 0), ("byte", 1), ("byte", len(new) // 2), ("byte", len(new) - 1),
              ("after", "fsync"), ("after", "replace")]
    for point in points:
        assert killed(point, path, new), point
        assert path.read_bytes() in (old, new), point
    assert path.read_bytes() == new  # the last kill came after the rename
    left = [name for name in os.listdir(tmp_path) if name != "latest.pth"]
    assert left and all(name.startswith(".latest.pth.") for name in left)
    remove_temporaries(str(tmp_path))
    assert os.listdir(tmp_path) == ["latest.pth"]


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "latest.pth"
    atomic_write(str(path), lambda f: f.write(b"old"))

    def crash(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(str(path), crash)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["latest.pth"]


def stop_after(monkeypatch, steps):
    """Make the next in-process main.main stop, as on Ctrl-C, after `steps` training steps."""
    asked = iter(range(10**6))
    monkeypatch.setattr(main.StopOnSignal, "requested", lambda self: next(asked) >= steps)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_cifar, tmp_path,
                                                                    monkeypatch):
    data_dir, _ = tiny_cifar
    stop_after(monkeypatch, 3)
    assert main.main(flags(data_dir, tmp_path, "--epochs=1")) == 128 + signal.SIGINT
    folder = tmp_path / "ckpt" / NAME
    checkpoints = sorted(folder.glob("*.pth"))
    before = [digest(p) for p in checkpoints]
    done = run_main(*flags(data_dir, tmp_path, "--epochs=1", "--init_lr=1e30", "--resume=True"))
    assert done.returncode == 1
    assert "epoch 1, step" in done.stderr and "last good checkpoint" in done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(folder.glob("*.pth")) == checkpoints
    assert [digest(p) for p in checkpoints] == before


def one_line_error(done, expected):
    assert done.returncode == 2, done.stdout + done.stderr
    assert expected in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_broken_checkpoints_are_refused_in_one_line(tiny_cifar, tmp_path):
    data_dir, _ = tiny_cifar
    assert main.main(flags(data_dir, tmp_path, "--epochs=1")) == 0
    folder = tmp_path / "ckpt" / NAME
    good = (folder / "epoch_1.pth").read_bytes()
    test = [*flags(data_dir, tmp_path), "--is_train=false", "--model_epoch=1"]

    (folder / "epoch_1.pth").unlink()
    (folder / "epoch_1.pth").write_bytes(good[: len(good) // 2])
    one_line_error(run_main(*test), "not a readable checkpoint")

    (folder / "epoch_1.pth").write_bytes(b"this is not a checkpoint")
    one_line_error(run_main(*test), "not a readable checkpoint")

    torch.save({"model": {}, "model_config": {}, "epoch": 1, "payload": np.dtype("float32")},
               folder / "epoch_1.pth")  # an object that weights_only refuses to build
    one_line_error(run_main(*test), "not a readable checkpoint")

    (folder / "epoch_1.pth").write_bytes(good)
    other = [*flags(data_dir, tmp_path), "--is_train=false", "--model_epoch=1", "--std=0.3"]
    one_line_error(run_main(*other), "std: checkpoint 0.05, flags 0.3")


def test_unwritable_folders_are_refused(tiny_cifar, tmp_path):
    data_dir, _ = tiny_cifar
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    one_line_error(run_main(*flags(data_dir, tmp_path), f"--ckpt_dir={blocker / 'x'}"),
                   "--ckpt_dir")
    one_line_error(run_main(*flags(blocker / "x", tmp_path)), "--data_dir")
    one_line_error(run_main(*flags(data_dir, tmp_path), "--use_tensorboard=true",
                            f"--logs_dir={blocker / 'x'}"), "--logs_dir")


def test_cache_failing_its_checksum_is_fetched_again(tiny_cifar, monkeypatch, capsys):
    data_dir, written = tiny_cifar
    data_loader.load_cifar10(str(data_dir))
    digests = {name: data_loader._sha256(written[name]) for name in data_loader.SHA256}
    monkeypatch.setattr(data_loader, "SHA256", digests)
    monkeypatch.setattr(data_loader, "FULL_SIZES", {"train": 200, "test": 40})
    cache = data_dir / data_loader.CACHE_NAME
    arrays = dict(np.load(cache))
    arrays["train_x"][0, 0, 0, 0] ^= 0xFF
    np.savez(cache, **arrays)
    again = data_loader.load_cifar10(str(data_dir))
    assert "fails its SHA-256 check" in capsys.readouterr().out
    assert np.array_equal(again["train_x"], written["train_x"])
    assert np.array_equal(np.load(cache)["train_x"], written["train_x"])


def test_checkpoint_loading_refuses_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "model_config": {}, "epoch": 1, "x": Payload()}, path)
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(str(path))


def test_a_second_run_on_the_same_folder_is_refused_naming_the_first(tiny_cifar, tmp_path):
    data_dir, _ = tiny_cifar
    folder = tmp_path / "ckpt" / NAME
    lock = RunLock(str(folder))
    lock.acquire()  # this test's process is "the first run"
    try:
        done = run_main(*flags(data_dir, tmp_path, "--epochs=1"))
    finally:
        lock.release()
    one_line_error(done, f"in use by another run (pid {os.getpid()} on ")
    assert not (folder / "latest.pth").exists()


def test_a_run_killed_with_9_frees_its_folder(tmp_path):
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child takes the lock, says so, and waits to be killed
        RunLock(str(tmp_path)).acquire()
        os.write(ready_w, b"x")
        time.sleep(60)
        os._exit(0)
    os.read(ready_r, 1)
    with pytest.raises(UserError, match=f"pid {pid} on "):
        RunLock(str(tmp_path)).acquire()
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    lock = RunLock(str(tmp_path))
    lock.acquire()  # the kernel dropped the dead process's lock
    lock.release()


def test_a_new_run_does_not_overwrite_an_existing_one(tiny_cifar, tmp_path):
    data_dir, _ = tiny_cifar
    assert main.main(flags(data_dir, tmp_path, "--epochs=1")) == 0
    folder = tmp_path / "ckpt" / NAME
    before = {p.name: digest(p) for p in folder.glob("*.pth")}
    one_line_error(run_main(*flags(data_dir, tmp_path, "--epochs=1")), "--resume=True")
    assert {p.name: digest(p) for p in folder.glob("*.pth")} == before


class FullDisk:
    """A file that takes `room` more bytes, then fails as a full disk does."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def fill_disk(monkeypatch, module, room):
    """Every atomic_write that `module` makes runs on a disk with `room` bytes free."""
    real = module.atomic_write
    monkeypatch.setattr(module, "atomic_write",
                        lambda path, write: real(path, lambda f: write(FullDisk(f, room))))


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_files(tiny_cifar, tmp_path,
                                                                       monkeypatch, capsys):
    data_dir, _ = tiny_cifar
    assert main.main(flags(data_dir, tmp_path, "--epochs=1")) == 0
    folder = tmp_path / "ckpt" / NAME
    before = {p.name: digest(p) for p in folder.iterdir()}
    capsys.readouterr()
    fill_disk(monkeypatch, trainer, 100_000)  # config.json fits, a checkpoint does not
    assert main.main(flags(data_dir, tmp_path, "--epochs=2", "--resume=True")) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"disk full (errno 28) writing {folder / 'latest.pth'}" in err
    assert {p.name: digest(p) for p in folder.iterdir() if p.name != "config.json"} == {
        name: value for name, value in before.items() if name != "config.json"}


def test_disk_full_for_glimpse_data_warns_and_training_goes_on(tiny_cifar, tmp_path,
                                                               monkeypatch, capsys):
    data_dir, _ = tiny_cifar
    fill_disk(monkeypatch, plot_glimpses, 0)
    assert main.main(flags(data_dir, tmp_path, "--epochs=2")) == 0
    captured = capsys.readouterr()
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == 2 and all("disk full (errno 28)" in line for line in warnings)
    assert "epoch 2/2" in captured.out
    assert (tmp_path / "ckpt" / NAME / "epoch_2.pth").is_file()
    assert not list((tmp_path / "plots" / NAME).iterdir())  # no half-written file either


def test_a_resume_applies_changed_flags_and_says_so_one_line_each(tiny_cifar, tmp_path, capsys):
    data_dir, _ = tiny_cifar
    assert main.main(flags(data_dir, tmp_path, "--epochs=1")) == 0
    capsys.readouterr()
    assert main.main(flags(data_dir, tmp_path, "--epochs=2", "--resume=True", "--init_lr=1e-3",
                           "--lr_patience=7", "--recon_weight=2")) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert [note.split()[1] for note in notes] == [
        "--epochs=2", "--init_lr=0.001", "--lr_patience=7", "--recon_weight=2.0"]
    assert "(the run had 0.0003) is applied; the learning rate restarts at it" in notes[1]
    assert "| lr 1.0e-03" in out
    ckpt = load_checkpoint(str(tmp_path / "ckpt" / NAME / "latest.pth"))
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == 1e-3
    assert ckpt["scheduler"]["patience"] == 7 and ckpt["loss_weights"]["recon_weight"] == 2.0


def test_a_resume_refuses_changes_that_would_spoil_the_run(tiny_cifar, tmp_path, capsys):
    data_dir, _ = tiny_cifar
    assert main.main(flags(data_dir, tmp_path, "--epochs=1")) == 0
    folder = tmp_path / "ckpt" / NAME
    before = {p.name: digest(p) for p in folder.glob("*.pth")}
    capsys.readouterr()
    for extra, expected in ((["--random_seed=2"], "pass --random_seed=1 to resume"),
                            (["--valid_size=0.2"], "pass --valid_size=0.1 to resume"),
                            (["--epochs=1"], "has trained 1 epochs already and --epochs=1")):
        assert main.main(flags(data_dir, tmp_path, "--epochs=2", "--resume=True", *extra)) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
    ckpt = load_checkpoint(str(folder / "latest.pth"))
    del ckpt["train_config"]  # as written before this version
    (folder / "latest.pth").unlink()  # not in place: best.pth and epoch_1.pth are its links
    torch.save(ckpt, folder / "latest.pth")
    assert main.main(flags(data_dir, tmp_path, "--epochs=2", "--resume=True")) == 2
    assert "older version of this project" in capsys.readouterr().err
    assert {p.name: digest(p) for p in folder.glob("*.pth") if p.name != "latest.pth"} == {
        name: value for name, value in before.items() if name != "latest.pth"}


def test_a_stopped_epoch_resumes_with_another_batch_size(tiny_cifar, tmp_path, monkeypatch,
                                                         capsys):
    data_dir, _ = tiny_cifar
    stop_after(monkeypatch, 2)
    assert main.main(flags(data_dir, tmp_path, "--epochs=1")) == 128 + signal.SIGINT
    latest = str(tmp_path / "ckpt" / NAME / "latest.pth")
    assert load_checkpoint(latest)["loader"]["images_seen"] == 60  # 3 steps of 20
    monkeypatch.undo()
    capsys.readouterr()
    assert main.main(flags(data_dir, tmp_path, "--epochs=1", "--resume=True",
                           "--batch_size=30")) == 0
    out = capsys.readouterr().out
    assert "note: --batch_size=30 (the run had 20) is applied" in out
    assert "60 images into epoch 1" in out and "epoch 1/1" in out
    ckpt = load_checkpoint(latest)
    assert ckpt["epoch"] == 1 and ckpt["loader"] == {"epoch": 1, "images_seen": 0,
                                                     "num_images": 180, "seed": 1}
