"""Glimpse plots: the data training writes each epoch, and the figures drawn from it later.

Training calls `write_glimpse_data` every --plot_freq epochs on a fixed set of validation images;
it saves <plot_dir>/<model name>/glimpses_epoch_<epoch>.npz. The figures are drawn from that
file alone, headless, by

    python3 plot_glimpses.py --plot_dir=./plots/ram_9_6x6_2/ --epoch=1

which writes, next to the data:

    glimpses_epoch_<epoch>.png  one sheet for all the images. Each image has a block of k + 2 rows
        and one column per glimpse: the image with the box of the finest patch, the k patches
        as the sensor delivered them (each pooled to g x g), and the cumulative prediction after
        that glimpse (clipped to [0, 1]).
    glimpses_epoch_<epoch>.gif  one frame per glimpse: every image with the boxes of all k patches
        of the current glimpse (the finest in red) beside the reconstruction built so far.

Patch size, scale and count come from the data file, never from the folder's name. Matplotlib is
imported inside the drawing functions only, so training does not pay for it.
"""

import json
import math
import os
import re
import sys
import zipfile

import numpy as np
import torch

from modules import location_to_pixels, patch_corners
from utils import OneLineParser, atomic_write

DATA_FILE = re.compile(r"glimpses_epoch_(\d+)\.npz")

# Sheet layout, in inches: every picture is a CELL_IN square, GAP_IN apart.
CELL_IN = 0.9
GAP_IN = 0.1
HEADER_IN = 0.4  # the sheet's title
TITLE_IN = 0.25  # above each image's first row, for the glimpse titles
BLOCK_GAP_IN = 0.25  # between the blocks of two images
LABEL_IN = 1.3  # left margin for the row labels
DPI = 100

GIF_CELL_IN = 1.2
GIF_HEADER_IN = 0.8  # the frame title and the two grids' titles
GIF_DPI = 80
GIF_FPS = 2

FINEST_COLOUR = "red"
COARSE_COLOUR = "yellow"


def data_path(folder, epoch):
    """Where `write_glimpse_data` puts the data of `epoch`; the figures go next to it."""
    return os.path.join(folder, f"glimpses_epoch_{epoch}.npz")


def write_glimpse_data(model, images, epoch, folder):
    """Roll the model out once over `images` and save everything the plots need.

    The rollout runs in eval mode under no_grad and restores the caller's mode afterwards. It
    runs on a fork of the RNG: the policy samples its locations, and a plot must not change the
    random stream that training continues with.

    Args:
        model: a RecurrentAttention.
        images: (N, C, H, W) in [0, 1] on the model's device; the same images every epoch.
        epoch: saved in the file and in its name.
        folder: created if missing.

    Returns:
        The path written, <folder>/glimpses_epoch_<epoch>.npz. It holds
        images (N, C, H, W) float32; locations (T, N, 2) float32, (x, y) in [-1, 1];
        pixel_centres (T, N, 2) int64, the pixels the sensor centred each glimpse on;
        patches (T, N, k, C, g, g) float32 in [0, 1] pixel units, where a patch's part outside
        the image shows the mean pixel (the sensor pads the normalised image with zeros);
        decoded and recon (T, N, C, H, W) float32, each step's decoder output and the cumulative
        prediction (absent for a model without a decoder); patch_sizes (k,) the patch sides
        before pooling, finest first; and the scalars patch_size, glimpse_scale, num_patches,
        image_size and epoch.
    """
    cfg = model.cfg
    device = images.device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(
                devices=[] if device.type == "cpu" else [device], device_type=device.type):
            out = model(images, decode="plots")
    finally:
        model.train(was_training)
    arrays = {
        "images": images.float(),
        "locations": out.locations.float(),
        "pixel_centres": location_to_pixels(out.locations, cfg.image_size),
        # The (1, C, 1, 1) mean and std line up with the trailing (C, g, g) of (T, N, k, C, g, g).
        "patches": model.unnormalize(out.patches).float(),
    }
    if out.recon is not None:  # a model without a decoder (pure RAM) predicts no image
        arrays["decoded"], arrays["recon"] = out.decoded.float(), out.recon.float()
    arrays = {name: value.cpu().numpy() for name, value in arrays.items()}
    arrays["patch_sizes"] = np.array(cfg.patch_sizes, dtype=np.int64)
    for name in ("patch_size", "glimpse_scale", "num_patches", "image_size"):
        arrays[name] = np.int64(getattr(cfg, name))
    arrays["epoch"] = np.int64(epoch)
    os.makedirs(folder, exist_ok=True)
    path = data_path(folder, epoch)
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def load_glimpse_data(path):
    """Every array of a file `write_glimpse_data` wrote, read into memory."""
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def saved_epochs(folder):
    """The epochs with glimpse data in `folder`, ascending; none if the folder does not exist."""
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(m.group(1)) for m in map(DATA_FILE.fullmatch, names) if m)


def glimpse_boxes(locations, image_size, patch_sizes):
    """Where the sensor cut each patch of each glimpse, by its own mapping `patch_corners`.

    Args:
        locations: (..., 2) array of locations (x, y) in [-1, 1].
        image_size: side of the image in pixels.
        patch_sizes: the k patch sides, finest first.

    Returns:
        (..., k, 3) int64 array of (x0, y0, side): the patch covers columns x0 .. x0 + side - 1
        and rows y0 .. y0 + side - 1; x0 and y0 are negative or past the image where it sticks
        out.
    """
    sides = [int(s) for s in patch_sizes]
    l = torch.as_tensor(np.asarray(locations))
    corners = patch_corners(l, image_size, sides).numpy()  # (..., k, 2)
    side_col = np.broadcast_to(np.array(sides).reshape(-1, 1), corners.shape[:-1] + (1,))
    return np.concatenate([corners, side_col], axis=-1)  # (..., k, 3)


def to_display(chw):
    """(C, H, W) in [0, 1] -> the array imshow shows in true colour, clipped to [0, 1].

    Returns (H, W, C), or (H, W) for a single channel (drawn with a grey colour map).
    """
    hwc = np.clip(np.moveaxis(chw, -3, -1), 0.0, 1.0)  # (H, W, C)
    return hwc[..., 0] if hwc.shape[-1] == 1 else hwc


def seen_so_far(data):
    """What a model without a decoder shows instead of its prediction: (T, N, C, H, W), each
    image at full brightness where the finest patches of glimpses 1..t fell, dimmed to a
    quarter elsewhere."""
    T, N = data["locations"].shape[:2]
    size = int(data["image_size"])
    boxes = glimpse_boxes(data["locations"], size, data["patch_sizes"])[:, :, 0]  # (T, N, 3)
    seen = np.zeros((T, N, 1, size, size), np.float32)
    for t in range(T):
        for n in range(N):
            x0, y0, side = (int(v) for v in boxes[t, n])
            seen[t:, n, :, max(y0, 0):max(y0 + side, 0), max(x0, 0):max(x0 + side, 0)] = 1
    return data["images"][None] * (0.25 + 0.75 * seen)


def predictions(data):
    """The last row of the sheet and the right of the GIF: (label, (T, N, C, H, W) array), the
    prediction after each glimpse, or what was seen so far where there is no decoder."""
    if "recon" in data:
        return "prediction", data["recon"]
    return "seen so far", seen_so_far(data)


def sheet_rows(data, n):
    """The rows of image n's block of the sheet: exactly the arrays `draw_sheet` shows.

    Args:
        data: the dict `load_glimpse_data` returns.
        n: which image.

    Returns:
        k + 2 (label, cells) pairs, each with T display arrays (see `to_display`): the image
        (the same in every column), then patch i of every glimpse for i < k, then the prediction
        after every glimpse (see `predictions`).
    """
    g = int(data["patch_size"])
    T = data["locations"].shape[0]
    rows = [("image", [to_display(data["images"][n])] * T)]
    for i, side in enumerate(data["patch_sizes"]):
        label = f"{g}x{g}" if side == g else f"{side}x{side} -> {g}x{g}"
        rows.append((label, [to_display(data["patches"][t, n, i]) for t in range(T)]))
    label, last = predictions(data)
    rows.append((label, [to_display(last[t, n]) for t in range(T)]))
    return rows


def _block_height(num_patches):
    """Height in inches of one image's block of the sheet: glimpse titles and k + 2 rows."""
    rows = num_patches + 2
    return TITLE_IN + rows * CELL_IN + (rows - 1) * GAP_IN


def sheet_figsize(num_images, num_glimpses, num_patches):
    """(width, height) in inches of the sheet; the PNG is this times DPI pixels."""
    width = LABEL_IN + num_glimpses * (CELL_IN + GAP_IN)
    height = (HEADER_IN + num_images * _block_height(num_patches)
              + (num_images - 1) * BLOCK_GAP_IN + GAP_IN)
    return width, height


def _new_figure(figsize, dpi):
    """A figure on the Agg canvas, outside pyplot, so nothing needs a display or is kept alive."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _show(ax, picture):
    """Draw a display array on a bare axis and pin the view to it, so a box can stick out."""
    ax.imshow(picture, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    height, width = picture.shape[:2]
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])


def _box(box, colour, linewidth):
    """The outline of a (x0, y0, side) box on an image drawn by imshow."""
    from matplotlib.patches import Rectangle

    x0, y0, side = (int(v) for v in box)
    # imshow centres pixel j on coordinate j, so pixels x0 .. x0 + side - 1 span
    # x0 - 0.5 .. x0 + side - 0.5.
    return Rectangle((x0 - 0.5, y0 - 0.5), side, side, fill=False, edgecolor=colour,
                     linewidth=linewidth)


def draw_sheet(data):
    """The PNG sheet: per image a block of k + 2 rows (see `sheet_rows`), one column per glimpse.

    Args:
        data: the dict `load_glimpse_data` returns.

    Returns:
        The figure, and its axes as an (N, k + 2, T) object array.
    """
    T, N = data["locations"].shape[:2]
    k = int(data["num_patches"])
    boxes = glimpse_boxes(data["locations"], int(data["image_size"]), data["patch_sizes"])
    width, height = sheet_figsize(N, T, k)
    fig = _new_figure((width, height), DPI)
    shown = "the prediction" if "recon" in data else "what was seen"
    fig.text(0.5, 1 - HEADER_IN / 2 / height, f"epoch {int(data['epoch'])}: glimpses, patches "
             f"and {shown} after each glimpse", ha="center", va="center", fontsize=11)
    axes = np.empty((N, k + 2, T), dtype=object)
    pitch = _block_height(k) + BLOCK_GAP_IN  # from one image's block to the next, inches
    for n in range(N):
        for r, (label, cells) in enumerate(sheet_rows(data, n)):
            top = HEADER_IN + n * pitch + TITLE_IN + r * (CELL_IN + GAP_IN)  # inches from the top
            for t, picture in enumerate(cells):
                left = LABEL_IN + t * (CELL_IN + GAP_IN)
                ax = fig.add_axes((left / width, 1 - (top + CELL_IN) / height,
                                   CELL_IN / width, CELL_IN / height))
                _show(ax, picture)
                if r == 0:
                    ax.add_patch(_box(boxes[t, n, 0], FINEST_COLOUR, 1.5))
                    ax.set_title(f"glimpse {t + 1}", fontsize=8)
                if t == 0:
                    text = f"image {n + 1}" if r == 0 else label
                    ax.set_ylabel(text, rotation=0, ha="right", va="center", fontsize=8)
                axes[n, r, t] = ax
    return fig, axes


def write_sheet(data, path):
    """Draw the sheet and save it as a PNG of exactly sheet_figsize * DPI pixels."""
    fig, _ = draw_sheet(data)
    fig.savefig(path, dpi=DPI)
    return path


def write_gif(data, path):
    """Animate the glimpses, one frame per glimpse, and save a GIF with Pillow (no ffmpeg).

    Left: every image with the boxes of all patches of the current glimpse, the finest in red.
    Right: each image's prediction after the current glimpse (see `predictions`).
    """
    from matplotlib.animation import FuncAnimation, PillowWriter

    T, N = data["locations"].shape[:2]
    boxes = glimpse_boxes(data["locations"], int(data["image_size"]), data["patch_sizes"])
    cols = math.ceil(math.sqrt(N))
    rows = math.ceil(N / cols)
    height = rows * GIF_CELL_IN + GIF_HEADER_IN
    fig = _new_figure((2 * cols * GIF_CELL_IN + GIF_CELL_IN / 2, height), GIF_DPI)
    # A narrow empty column keeps the two grids apart.
    grid = fig.add_gridspec(rows, 2 * cols + 1, width_ratios=[1] * cols + [0.3] + [1] * cols,
                            left=0.02, right=0.98, bottom=0.02, top=1 - GIF_HEADER_IN / height,
                            wspace=0.08, hspace=0.08)
    title = fig.suptitle("", fontsize=10)
    label, last = predictions(data)
    for x, text in ((0.26, "glimpses (finest patch in red)"), (0.74, label)):
        fig.text(x, 1 - 0.6 * GIF_HEADER_IN / height, text, ha="center", va="center", fontsize=9)
    rects, recons = [], []  # per image: its k boxes, finest first; its prediction's image
    for n in range(N):
        row, col = divmod(n, cols)
        image_ax = fig.add_subplot(grid[row, col])
        recon_ax = fig.add_subplot(grid[row, cols + 1 + col])
        _show(image_ax, to_display(data["images"][n]))
        _show(recon_ax, to_display(last[0, n]))
        recons.append(recon_ax.images[0])
        scale_rects = [_box(box, FINEST_COLOUR if i == 0 else COARSE_COLOUR,
                            1.5 if i == 0 else 0.8) for i, box in enumerate(boxes[0, n])]
        for rect in reversed(scale_rects):  # coarsest first, so the finest is drawn on top
            image_ax.add_patch(rect)
        rects.append(scale_rects)

    def show_glimpse(t):
        title.set_text(f"epoch {int(data['epoch'])}, glimpse {t + 1} of {T}")
        for n in range(N):
            for rect, (x0, y0, _) in zip(rects[n], boxes[t, n], strict=True):
                rect.set_xy((x0 - 0.5, y0 - 0.5))
            recons[n].set_data(to_display(last[t, n]))

    FuncAnimation(fig, show_glimpse, frames=T).save(path, writer=PillowWriter(fps=GIF_FPS))
    return path


CURVES = (  # metrics.jsonl key, panel title
    ("train_recon", "train reconstruction MSE"),
    ("train_contrast", "train contrastive loss (--contrast_dim)"),
    ("valid_psnr", "validation PSNR (dB)"),
    ("valid_acc", "validation accuracy (%, probe under unsupervised)"),
    ("valid_loc_spread", "location spread across images"),
    ("valid_distinct", "distinct glimpses per episode"),
    ("valid_hit_rate", "hit rate (% of glimpses in the digit's box)"),
    ("train_images_per_s", "images/s"),
)


def read_metrics(path):
    """The epoch lines of a metrics.jsonl that training wrote, as a list of dicts."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def curve_panels(runs):
    """The CURVES entries that some run measured, a finite value other than 0: a model without
    a decoder has no reconstruction (its loss term is 0, its PSNR NaN), CIFAR-10 no hit rate."""
    def measured(value):
        return math.isfinite(value) and value != 0
    return [(key, title) for key, title in CURVES
            if any(measured(m.get(key, math.nan)) for lines in runs.values() for m in lines)]


def curves_figure(runs):
    """One panel per `curve_panels` entry, one line per run, and the legend in a slot of its own
    after the last panel (over a panel, long run names hid its curves); `runs` maps a label to
    its epoch lines."""
    shown = curve_panels(runs)
    rows = math.ceil((len(shown) + 1) / 3)
    fig = _new_figure((12, 3.5 * rows), 100)
    for i, (key, title) in enumerate(shown, start=1):
        ax = fig.add_subplot(rows, 3, i)
        for j, (label, lines) in enumerate(runs.items()):
            points = [(m["epoch"], m[key]) for m in lines if key in m]
            if points:  # a run keeps its colour in every panel, whichever runs a panel has
                ax.plot(*zip(*points, strict=True), label=label, marker=".", color=f"C{j % 10}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
    key_slot = fig.add_subplot(rows, 3, len(shown) + 1)
    key_slot.axis("off")
    key_slot.legend(*fig.axes[0].get_legend_handles_labels(), loc="center", fontsize=7)
    fig.tight_layout()
    return fig


def draw_curves(runs, out):
    """`curves_figure(runs)` written to the PNG `out`; returns `out`."""
    curves_figure(runs).savefig(out)
    return out


def parse_args(argv=None):
    p = OneLineParser(
        prog="plot_glimpses.py", allow_abbrev=False,
        description="Draw the glimpse sheet (PNG) and animation (GIF) of one epoch from the "
        "glimpses_epoch_<epoch>.npz that training wrote; they are written next to it. With "
        "--metrics, draw learning curves instead.")
    p.add_argument("--plot_dir",
                   help="folder holding the glimpse data of one model, e.g. ./plots/ram_9_6x6_2/")
    p.add_argument("--epoch", type=int, help="the epoch whose glimpses to draw")
    p.add_argument("--metrics", nargs="+", metavar="METRICS_JSONL",
                   help="draw the learning curves of these runs (ckpt/<name>/metrics.jsonl) "
                   "into one PNG")
    p.add_argument("--out", default="curves.png", help="with --metrics: the PNG to write")
    args = p.parse_args(argv)
    if args.metrics is None and (args.plot_dir is None or args.epoch is None):
        p.error("pass --plot_dir and --epoch (glimpses), or --metrics (learning curves)")
    return args


def run_labels(paths):
    """A label per metrics file: its run folder's name, with as many folders above it as it
    takes to tell apart runs of the same name (two seeds in two --ckpt_dir, say)."""
    parts = [os.path.dirname(os.path.abspath(path)).split(os.sep) for path in paths]
    for depth in range(1, max(map(len, parts)) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return list(paths)  # the same file twice


def plot_curves(args):
    try:
        runs = {label: read_metrics(path)
                for label, path in zip(run_labels(args.metrics), args.metrics, strict=True)}
    except (OSError, ValueError) as e:
        print(f"plot_glimpses.py: error: cannot read the metrics ({e}); pass the metrics.jsonl "
              "files that training wrote", file=sys.stderr)
        return 2
    print(draw_curves(runs, args.out))
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return plot_curves(args) if args.metrics is not None else plot_epoch(args)
    except OSError as e:
        print(f"plot_glimpses.py: error: cannot write the figure ({e.strerror or e}); pass a "
              "folder you can write to, with room", file=sys.stderr)
        return 2


def plot_epoch(args):
    path = data_path(args.plot_dir, args.epoch)
    if not os.path.isfile(path):
        epochs = ", ".join(map(str, saved_epochs(args.plot_dir))) or "none"
        where = args.plot_dir if os.path.isdir(args.plot_dir) else f"{args.plot_dir} (no folder)"
        print(f"plot_glimpses.py: error: no glimpse data for epoch {args.epoch} in {where}; "
              f"epochs there: {epochs}", file=sys.stderr)
        return 2
    try:
        data = load_glimpse_data(path)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        print(f"plot_glimpses.py: error: {path} is not readable glimpse data ({e}); plot another "
              "epoch, or train again to rewrite it", file=sys.stderr)
        return 2
    stem = os.path.splitext(path)[0]
    print(write_sheet(data, stem + ".png"))
    print(write_gif(data, stem + ".gif"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
