"""The MNIST benchmarks' data: the reader, the translated and cluttered canvases, their boxes,
and which placements are fixed and which are drawn afresh."""

import numpy as np
import pytest
import torch

import datasets
from conftest import write_tiny_mnist
from data_loader import Batching, make_loader
from datasets import DataSpec, load_data, place_digits
from utils import UserError

TRANSLATED = DataSpec("translated", 60, 0)
CLUTTERED = DataSpec("cluttered", 60, 4)


def flat_digits(values):
    """(N, 28, 28) digits, digit i filled with the constant values[i]."""
    return np.broadcast_to(np.asarray(values, np.uint8)[:, None, None], (len(values), 28, 28))


def test_mnist_is_read_from_torchvision_layout(tmp_path):
    for gz in (False, True):
        folder = tmp_path / f"gz{gz}"
        written = write_tiny_mnist(str(folder), gz=gz)
        data = load_data(DataSpec("mnist"), str(folder), 0.1, seed=1)
        assert (data.image_size, data.num_channels, data.num_classes) == (28, 1, 10)
        assert (len(data.train), len(data.valid), len(data.test)) == (108, 12, 30)
        images, labels, _ = data.test[torch.arange(30), None]
        assert images.shape == (30, 1, 28, 28)
        assert np.array_equal(images[:, 0].numpy(), written["test_x"])
        assert np.array_equal(labels.numpy(), written["test_y"])
        held = torch.cat([data.train.images, data.valid.images])[:, 0].numpy()  # (120, 28, 28)
        assert sorted(map(bytes, held)) == sorted(map(bytes, written["train_x"]))


def test_mnist_pixel_statistics_are_the_training_splits(tiny_mnist):
    data_dir, _ = tiny_mnist
    data = load_data(DataSpec("mnist"), str(data_dir), 0.1, seed=1)
    pixels = data.train.images.double() / 255
    assert data.pixel_mean == (round(pixels.mean().item(), 4),)
    assert data.pixel_std == (round(pixels.std(unbiased=False).item(), 4),)


def test_missing_mnist_says_where_to_put_it(tmp_path, monkeypatch):
    def offline(name, data_dir):
        raise OSError("no network")
    monkeypatch.setattr(datasets, "torchvision_download", offline)
    with pytest.raises(UserError, match="MNIST/raw") as err:
        load_data(DataSpec("mnist"), str(tmp_path), 0.1, seed=1)
    assert "\n" not in str(err.value) and "train-images-idx3-ubyte" in str(err.value)


def test_damaged_mnist_file_is_one_line(tiny_mnist):
    data_dir, _ = tiny_mnist
    path = data_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match="replace the damaged file"):
        load_data(DataSpec("mnist"), str(data_dir), 0.1, seed=1)


def test_translated_digit_lies_whole_inside_the_canvas_at_its_box():
    digits = np.random.default_rng(0).integers(1, 256, (50, 28, 28), dtype=np.uint8)
    index = np.arange(50)
    canvases, boxes = place_digits(digits, index, digits, TRANSLATED, key=(3, 0))
    assert canvases.shape == (50, 1, 60, 60) and canvases.dtype == np.uint8
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 60).all()
    assert (boxes[:, 2:] - boxes[:, :2] == 28).all()
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        assert np.array_equal(canvases[i, 0, y0:y1, x0:x1], digits[i])
        assert canvases[i].sum() == digits[i].astype(np.int64).sum()  # nothing else drawn
    assert len({tuple(b) for b in boxes[:, :2]}) > 25  # the places vary


def test_cluttered_ink_adds_up_to_the_digit_plus_k_pieces_of_8x8():
    """Flat digits of value 10 never clip, so the ink counts the pieces and their pixels."""
    N, K = 40, 4
    digits = flat_digits(np.full(N, 10))
    canvases, _ = place_digits(digits, np.arange(N), digits, CLUTTERED, key=(5, 2))
    assert (canvases.reshape(N, -1).astype(np.int64).sum(1) == 10 * (28 * 28 + K * 64)).all()


def test_distractors_never_come_from_the_images_own_digit():
    N = 12
    digits = flat_digits(np.arange(1, N + 1) * 10)  # digit i: 10 (i + 1); two never pass 255
    spec = DataSpec("cluttered", 60, 1)
    for draw in range(20):
        canvases, boxes = place_digits(digits, np.arange(N), digits, spec, key=(7, draw))
        for i in range(N):
            canvas = canvases[i, 0].astype(np.int64)
            x0, y0, x1, y1 = boxes[i]
            canvas[y0:y1, x0:x1] -= 10 * (i + 1)  # take the digit away: the piece is left
            values = set(np.unique(canvas)) - {0}
            assert len(values) == 1 and values != {10 * (i + 1)}
            assert (canvas > 0).sum() == 64  # one 8x8 piece


def test_placement_of_an_image_depends_on_seed_draw_and_index_alone():
    digits = np.random.default_rng(0).integers(0, 256, (30, 28, 28), dtype=np.uint8)
    whole, _ = place_digits(digits, np.arange(30), digits, CLUTTERED, key=(1, 4))
    part, _ = place_digits(digits, np.array([29, 3, 17]), digits, CLUTTERED, key=(1, 4))
    assert np.array_equal(part, whole[[29, 3, 17]])
    other_draw, _ = place_digits(digits, np.arange(30), digits, CLUTTERED, key=(1, 5))
    other_seed, _ = place_digits(digits, np.arange(30), digits, CLUTTERED, key=(2, 4))
    assert not np.array_equal(other_draw, whole) and not np.array_equal(other_seed, whole)


def canvases_of(loader, epoch=None):
    """image position -> its canvas, over one pass of the loader."""
    batches = loader if epoch is None else loader.epoch(epoch)
    return {int(p): x for images, _, positions in batches for p, x in zip(positions, images,
                                                                          strict=True)}


@pytest.mark.parametrize("name", ["translated", "cluttered"])
def test_training_canvases_are_drawn_afresh_each_epoch_and_evaluation_ones_are_fixed(
        tiny_mnist, name):
    data_dir, _ = tiny_mnist
    spec = DataSpec(name, 40, 2 if name == "cluttered" else 0)
    one = load_data(spec, str(data_dir), 0.1, seed=1)
    other_seed = load_data(spec, str(data_dir), 0.1, seed=2)
    train = make_loader(one.train, Batching(16, seed=1), shuffle=True)
    first, second = canvases_of(train, 0), canvases_of(train, 1)
    again = canvases_of(make_loader(one.train, Batching(16, seed=1), shuffle=True), 0)
    assert all(torch.equal(first[i], again[i]) for i in first)  # an epoch is reproducible
    assert sum(not torch.equal(first[i], second[i]) for i in first) > len(first) // 2
    for split in ("valid", "test"):
        a = canvases_of(make_loader(getattr(one, split), Batching(7), shuffle=False))
        b = canvases_of(make_loader(getattr(other_seed, split), Batching(5), shuffle=False))
        assert a.keys() == b.keys() and all(torch.equal(a[i], b[i]) for i in a)


def test_training_canvases_do_not_depend_on_the_batch_size(tiny_mnist):
    data_dir, _ = tiny_mnist
    data = load_data(CLUTTERED, str(data_dir), 0.1, seed=1)
    small = canvases_of(make_loader(data.train, Batching(4, seed=1), shuffle=True), 3)
    large = canvases_of(make_loader(data.train, Batching(50, seed=1), shuffle=True), 3)
    assert all(torch.equal(small[i], large[i]) for i in small)


def test_boxes_are_where_the_evaluation_digits_are(tiny_mnist):
    data_dir, written = tiny_mnist
    data = load_data(DataSpec("translated", 48, 0), str(data_dir), 0.1, seed=1)
    positions = torch.arange(len(data.test))
    images, _, _ = data.test[positions, None]
    for (x0, y0, x1, y1), image, digit in zip(data.test.boxes(positions).tolist(), images,
                                              written["test_x"], strict=True):
        assert np.array_equal(image[0, y0:y1, x0:x1].numpy(), digit)
        assert image.sum() == int(digit.astype(np.int64).sum())


def test_canvas_smaller_than_a_digit_is_refused(tiny_mnist):
    data_dir, _ = tiny_mnist
    with pytest.raises(UserError, match="cannot hold"):
        load_data(DataSpec("translated", 20, 0), str(data_dir), 0.1, seed=1)


def test_glimpse_defaults_follow_the_paper():
    assert DataSpec("mnist").model_defaults() == {
        "num_glimpses": 6, "patch_size": 8, "glimpse_scale": 2, "num_patches": 1, "std": 0.15}
    assert DataSpec("translated", 60).model_defaults()["num_patches"] == 3
    assert DataSpec("cluttered", 100, 8).model_defaults()["num_patches"] == 4
    assert DataSpec("cluttered", 60, 4).tag == "cluttered60d4"
