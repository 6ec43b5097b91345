"""The glimpse data and plots: boxes where the sensor cut, rows equal to the data, files written."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import plot_glimpses
from model import RecurrentAttention
from modules import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 16 px images, patches of 4 and 8 px pooled to 4x4, 4 glimpses at uniformly random places.
TINY = ModelConfig(image_size=16, patch_size=4, glimpse_scale=2, num_patches=2,
                   glimpse_hidden=8, loc_hidden=8, hidden_size=16, num_glimpses=4,
                   policy="random")
NUM_IMAGES = 4


def tiny_model_and_images(seed=0):
    torch.manual_seed(seed)
    model = RecurrentAttention(TINY)
    images = torch.rand(NUM_IMAGES, TINY.num_channels, TINY.image_size, TINY.image_size)
    return model, images


@pytest.fixture
def saved(tmp_path):
    """A model, its images and the glimpse data of epoch 1 written for them."""
    model, images = tiny_model_and_images()
    path = plot_glimpses.write_glimpse_data(model, images, 1, str(tmp_path / "ram"))
    return model, images, path


def run_cli(*flags):
    return subprocess.run([sys.executable, os.path.join(ROOT, "plot_glimpses.py"), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_data_file_holds_the_documented_arrays(saved):
    _, images, path = saved
    T, N, k, C, g, H = 4, NUM_IMAGES, 2, 3, 4, 16
    assert os.path.basename(path) == "glimpses_epoch_1.npz"
    with np.load(path, allow_pickle=False) as data:
        shapes = {name: data[name].shape for name in data.files}
        assert shapes == {
            "images": (N, C, H, H), "locations": (T, N, 2), "pixel_centres": (T, N, 2),
            "patches": (T, N, k, C, g, g), "decoded": (T, N, C, H, H), "recon": (T, N, C, H, H),
            "patch_sizes": (k,), "patch_size": (), "glimpse_scale": (), "num_patches": (),
            "image_size": (), "epoch": (),
        }
        assert data["images"].dtype == np.float32
        np.testing.assert_array_equal(data["images"], images.numpy())
        assert data["pixel_centres"].dtype == np.int64
        assert data["patch_sizes"].tolist() == [4, 8]
        assert [int(data[name]) for name in ("patch_size", "glimpse_scale", "num_patches",
                                             "image_size", "epoch")] == [4, 2, 2, 16, 1]
        # The prediction after each glimpse is the running sum of the decoder's outputs.
        np.testing.assert_allclose(data["decoded"].cumsum(0), data["recon"], atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_writing_keeps_the_mode_and_the_random_stream(tmp_path, training):
    model, images = tiny_model_and_images()
    model.train(training)
    expected = torch.get_rng_state()
    plot_glimpses.write_glimpse_data(model, images, 3, str(tmp_path))
    assert model.training is training
    assert torch.equal(torch.get_rng_state(), expected)


def test_boxes_for_known_locations_match_a_hand_computation():
    # 16 px image: centre pixel floor((l + 1) * 8); a side-S box starts S // 2 before it.
    l = np.array([[0.0, 0.0], [-1.0, 1.0], [0.5, -0.25]], dtype=np.float32)
    boxes = plot_glimpses.glimpse_boxes(l, 16, [4, 8])
    assert boxes.tolist() == [
        [[6, 6, 4], [4, 4, 8]],  # centre (8, 8)
        [[-2, 14, 4], [-4, 12, 8]],  # centre (0, 16): x left, y bottom
        [[10, 4, 4], [8, 2, 8]],  # centre (12, 6)
    ]


def test_boxes_cover_exactly_the_pixels_the_sensor_took(saved):
    _, images, path = saved
    data = plot_glimpses.load_glimpse_data(path)
    boxes = plot_glimpses.glimpse_boxes(data["locations"], 16, data["patch_sizes"])
    hand = np.floor((data["locations"] + np.float32(1)) * np.float32(8)).astype(int)
    np.testing.assert_array_equal(data["pixel_centres"], hand)
    x = images.numpy()
    checked = [0, 0]
    T, N = data["locations"].shape[:2]
    for t in range(T):
        for n in range(N):
            for i, (side, factor) in enumerate(((4, 1), (8, 2))):
                x0, y0, drawn_side = boxes[t, n, i]
                cx, cy = hand[t, n]
                assert (x0, y0, drawn_side) == (cx - side // 2, cy - side // 2, side)
                if 0 <= x0 <= 16 - side and 0 <= y0 <= 16 - side:
                    crop = x[n, :, y0:y0 + side, x0:x0 + side]  # (C, side, side)
                    pooled = crop.reshape(3, 4, factor, 4, factor).mean((2, 4))  # (C, g, g)
                    np.testing.assert_allclose(data["patches"][t, n, i], pooled, atol=1e-5)
                    checked[i] += 1
    assert min(checked) > 0, "no glimpse fell inside the image; pick another seed"


def test_sheet_draws_the_saved_patches_and_boxes(saved):
    _, _, path = saved
    data = plot_glimpses.load_glimpse_data(path)
    fig, axes = plot_glimpses.draw_sheet(data)
    T, N = data["locations"].shape[:2]
    assert axes.shape == (N, 4, T)  # image, two patch rows, prediction
    boxes = plot_glimpses.glimpse_boxes(data["locations"], 16, data["patch_sizes"])
    for n in range(N):
        rows = plot_glimpses.sheet_rows(data, n)
        assert [label for label, _ in rows] == ["image", "4x4", "8x8 -> 4x4", "prediction"]
        for t in range(T):
            np.testing.assert_allclose(rows[0][1][t], data["images"][n].transpose(1, 2, 0))
            for i in range(2):
                saved_patch = data["patches"][t, n, i].transpose(1, 2, 0)  # (g, g, C)
                np.testing.assert_allclose(rows[1 + i][1][t], saved_patch, atol=1e-6)
            np.testing.assert_allclose(rows[3][1][t],
                                       np.clip(data["recon"][t, n].transpose(1, 2, 0), 0, 1))
            for r, (_, cells) in enumerate(rows):
                np.testing.assert_array_equal(axes[n, r, t].images[0].get_array(), cells[t])
            # The finest box, drawn on pixel centres: pixel j spans j - 0.5 .. j + 0.5.
            (box,) = axes[n, 0, t].patches
            x0, y0, side = boxes[t, n, 0]
            assert box.get_xy() == (x0 - 0.5, y0 - 0.5)
            assert (box.get_width(), box.get_height()) == (side, side)


def test_cli_writes_the_png_and_the_gif(saved):
    _, _, path = saved
    folder = os.path.dirname(path)
    done = run_cli(f"--plot_dir={folder}", "--epoch=1")
    assert done.returncode == 0, done.stderr
    png, gif = (os.path.join(folder, f"glimpses_epoch_1.{ext}") for ext in ("png", "gif"))
    assert done.stdout.split() == [png, gif]
    width, height = plot_glimpses.sheet_figsize(NUM_IMAGES, 4, 2)
    with Image.open(png) as im:
        assert im.size == (round(width * plot_glimpses.DPI), round(height * plot_glimpses.DPI))
    with Image.open(gif) as im:
        assert im.n_frames == 4


def test_cli_lists_the_saved_epochs_when_the_epoch_is_missing(tmp_path):
    model, images = tiny_model_and_images()
    folder = str(tmp_path / "ram")
    for epoch in (1, 3):
        plot_glimpses.write_glimpse_data(model, images, epoch, folder)
    done = run_cli(f"--plot_dir={folder}", "--epoch=2")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "epoch 2" in done.stderr and "epochs there: 1, 3" in done.stderr

    done = run_cli(f"--plot_dir={tmp_path / 'nowhere'}", "--epoch=1")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "epochs there: none" in done.stderr


def test_cli_rejects_an_unknown_flag(tmp_path):
    done = run_cli(f"--plot_dir={tmp_path}", "--epoch=1", "--epochs=2")
    assert done.returncode == 2 and "unrecognized arguments: --epochs=2" in done.stderr
    assert done.stderr.count("\n") == 1 and "usage" not in done.stderr


def test_cli_refuses_a_damaged_data_file_in_one_line(tmp_path):
    (tmp_path / "glimpses_epoch_1.npz").write_bytes(b"not an npz")
    done = run_cli(f"--plot_dir={tmp_path}", "--epoch=1")
    assert done.returncode == 2 and "is not readable glimpse data" in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_importing_the_module_does_not_import_matplotlib():
    done = subprocess.run(
        [sys.executable, "-c", "import sys, plot_glimpses; print('matplotlib' in sys.modules)"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


def test_an_unwritable_output_folder_is_one_line(saved, monkeypatch, capsys):
    _, _, path = saved

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plot_glimpses, "write_sheet", full)
    assert plot_glimpses.main([f"--plot_dir={os.path.dirname(path)}", "--epoch=1"]) == 2
    err = capsys.readouterr().err
    assert "cannot write the figure (No space left on device)" in err
    assert err.count("\n") == 1


def test_curves_leave_out_what_no_run_measured(tmp_path):
    pure_ram = [{"epoch": e, "train_recon": 0.0, "train_contrast": 0.0, "valid_psnr": float("nan"),
                 "valid_acc": 90.0 + e, "valid_hit_rate": 40.0 + e, "train_images_per_s": 1000.0}
                for e in (1, 2)]
    panels = [key for key, _ in plot_glimpses.curve_panels({"translated": pure_ram})]
    assert panels == ["valid_acc", "valid_hit_rate", "train_images_per_s"]  # no reconstruction
    out = plot_glimpses.draw_curves({"translated": pure_ram}, str(tmp_path / "curves.png"))
    assert os.path.getsize(out) > 0


def test_curves_keep_the_legend_off_the_panels():
    lines = [{"epoch": e, "valid_acc": 90.0 + e, "train_images_per_s": 1000.0} for e in (1, 2)]
    fig = plot_glimpses.curves_figure({"seed 1": lines, "seed 2": lines})
    *panels, key_slot = fig.axes
    assert [ax.get_title() for ax in panels] == ["validation accuracy (%, probe under "
                                                 "unsupervised)", "images/s"]
    assert all(ax.get_legend() is None and len(ax.lines) == 2 for ax in panels)
    assert not key_slot.axison and not key_slot.lines
    assert [t.get_text() for t in key_slot.get_legend().get_texts()] == ["seed 1", "seed 2"]


def test_curves_of_runs_with_the_same_name_get_labels_apart():
    paths = ["/runs/ckpt/ram_9_6x6_2/metrics.jsonl", "/runs/ckpt_s2/ram_9_6x6_2/metrics.jsonl",
             "/runs/ckpt/ram_9_6x6_2_grid/metrics.jsonl"]
    assert plot_glimpses.run_labels(paths) == [
        "ckpt/ram_9_6x6_2", "ckpt_s2/ram_9_6x6_2", "ckpt/ram_9_6x6_2_grid"]
    assert plot_glimpses.run_labels(paths[2:]) == ["ram_9_6x6_2_grid"]
