"""The datasets behind `--dataset`, each behind one interface (`Data`): three splits that hand
out whole batches, the class count, the pixel statistics, and a tag that names its runs.

- `cifar10`: 32x32 RGB photographs (data_loader.py says where they come from).
- `mnist`: the 28x28 digits, read from torchvision's layout (`<data_dir>/MNIST/raw/`).
- `translated`: each digit at a uniformly random place on a blank canvas (60x60 by default).
- `cluttered`: as `translated`, plus distractors: 8x8 crops of random other training digits at
  random places, added and clipped to [0, 1] (the recipe of DeepMind's mnist-cluttered).

The synthetic canvases are drawn on the fly, a batch at a time, by `place_digits`. Each
image's placement is a hash of (seed, draw, image), so it depends on nothing else: not on the
batch it falls in, the worker that draws it, or a resume. Training draws afresh every epoch
(draw = the epoch, seed = --random_seed: the paper's unlimited data); validation and test use
one fixed draw of a fixed seed, so every run is measured on the same images.

`Augmented` wraps a training split for `--augment`: a random crop of the zero-padded image and a
random horizontal flip, drawn the same way, per image, from (seed, epoch, image). `TwoViews`
wraps it for `--contrast_dim`: two stronger random views of every image (`random_view`: a resized
crop, a flip, colour changes), drawn the same way.
"""

import gzip
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from data_loader import ImageBatches, load_cifar10, torchvision_download, train_valid_split
from modules import CIFAR10_MEAN, CIFAR10_STD, CONTRAST_VIEWS
from utils import UserError

DATASETS = ("cifar10", "mnist", "translated", "cluttered")
DIGIT = 28  # side of an MNIST digit
CROP = 8  # side of a distractor
MNIST_FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
               "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}
IDX_MAGIC = {3: 2051, 1: 2049}  # dimensions -> magic number of an idx file of uint8
EVAL_SEED = 0  # validation and test canvases: the same for every --random_seed
EVAL_DRAW = 2**40  # the draw of the fixed canvases; training draws are epochs, far below
STATS_DRAW = EVAL_DRAW + 1  # the draw whose training canvases give the pixel statistics
STATS_IMAGES = 5000
PAD = 4  # --augment: zero pixels added on each side before the random crop
# --contrast_dim's views (random_view), after SimCLR's (Chen et al., 2020):
VIEW_AREA = (0.2, 1.0)  # fraction of the image the crop covers (SimCLR: 0.08; MoCo's CIFAR: 0.2)
VIEW_RATIO = (3 / 4, 4 / 3)  # the crop's width over its height
VIEW_JITTER = 0.4  # brightness, contrast and saturation each scaled by 1 +- up to this
VIEW_GREY = 0.2  # probability that a view loses its colour
VIEW_DRAWS = 9  # uniform numbers one view takes (random_view)
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma of R, G, B


@dataclass(frozen=True)
class DataSpec:
    """What the data flags ask for: the dataset's name and, for the synthetic ones, the canvas
    side and the number of distractors."""

    name: str = "cifar10"
    canvas_size: int = 60
    distractors: int = 0  # cluttered only

    @property
    def tag(self):
        """The dataset's name in run folders and model configurations."""
        if self.name == "translated":
            return f"translated{self.canvas_size}"
        if self.name == "cluttered":
            return f"cluttered{self.canvas_size}d{self.distractors}"
        return self.name

    @property
    def image_shape(self):
        """(channels, side) of the images, known before any is read."""
        if self.name == "cifar10":
            return 3, 32
        return 1, DIGIT if self.name == "mnist" else self.canvas_size

    def model_defaults(self):
        """The paper's sensor for this dataset, and a policy std to match, where the flags
        leave them open. CIFAR-10: the seed's 9 glimpses of 6x6 at 3 scales, std 0.05. MNIST:
        6 glimpses of one 8x8 patch, std 0.15. A canvas: 8 glimpses of 12x12 with as many
        scales as it takes for the coarsest patch to span most of it (3 on 60x60, 4 on
        100x100), std 0.25 (a digit can be anywhere, so the policy must explore more). The
        stds on digits are those of bentrevett's RAM, which reproduced the paper's errors."""
        if self.name == "cifar10":
            return {"num_glimpses": 9, "patch_size": 6, "glimpse_scale": 2, "num_patches": 3,
                    "std": 0.05}
        if self.name == "mnist":
            return {"num_glimpses": 6, "patch_size": 8, "glimpse_scale": 2, "num_patches": 1,
                    "std": 0.15}
        scales = max(1, int(np.ceil(np.log2(self.canvas_size / 12))))
        return {"num_glimpses": 8, "patch_size": 12, "glimpse_scale": 2, "num_patches": scales,
                "std": 0.25}


@dataclass(frozen=True)
class Data:
    """A dataset's three splits, each a Dataset indexed by (indices, draw) that returns
    (uint8 images (B, C, H, W), labels (B,), positions (B,)) and knows each image's `boxes`;
    and what the model must know of the images."""

    tag: str
    train: Dataset
    valid: Dataset
    test: Dataset
    num_classes: int
    pixel_mean: tuple
    pixel_std: tuple

    @property
    def num_channels(self):
        return self.train.image_shape[0]

    @property
    def image_size(self):
        return self.train.image_shape[1]


def _uniform(seed, draw, index, count):
    """(B, count) numbers uniform in [0, 1): splitmix64 of (seed, draw, image, j) chained, so
    every image's numbers are its own whatever else is drawn."""
    def mix(z):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    with np.errstate(over="ignore"):  # the hash multiplies modulo 2**64 on purpose
        key = mix(mix(np.full(1, seed, np.uint64)) ^ np.full(1, draw, np.uint64))  # (1,)
        key = mix(key ^ np.asarray(index, np.uint64))[:, None]  # (B, 1)
        bits = mix(key ^ np.arange(count, dtype=np.uint64))  # (B, count)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _add_at(sums, side, corners, pieces):
    """Add pieces (B, p, p) into B canvases of `side` x `side` held one after the other in the
    flat `sums` (B*side*side,), piece b's top-left corner at corners (x (B,), y (B,)). One flat
    index per pixel: several times faster than a 2-D fancy index."""
    x, y = corners
    B, p = pieces.shape[:2]
    steps = np.arange(p)
    rows = np.arange(B)[:, None, None] * side + y[:, None, None] + steps[:, None]  # (B, p, 1)
    flat = rows * side + x[:, None, None] + steps  # (B, p, p)
    sums[flat.ravel()] += pieces.ravel()  # no index repeats within one call


def _place(u, room):
    """Top-left corners, uniform over the `room` places a piece fits in: floor(u * room)."""
    return np.floor(u * room).astype(np.int64)


def digit_boxes(u, side):
    """(B, 4) int64 boxes (x0, y0, x1, y1), x1 and y1 exclusive, of the digits whose corners
    the first two numbers of `u` (B, >= 2) place on a canvas of `side` pixels (`_uniform`
    gives every image the same first numbers however many it draws)."""
    x0, y0 = _place(u[:, 0], side - DIGIT + 1), _place(u[:, 1], side - DIGIT + 1)
    return np.stack([x0, y0, x0 + DIGIT, y0 + DIGIT], 1)


def place_digits(digits, index, pool, spec: DataSpec, key):
    """Place digits on blank canvases, with distractors where the spec has them.

    Args:
        digits: (N, 28, 28) uint8, the split's digits; `index` (B,) picks the batch's.
        pool: (P, 28, 28) uint8, the training digits the distractors are cut from; distractor
            j of image i comes from pool[(i + 1 + r) % P], r < P - 1, so never from pool[i]
            (for the training split, pool is digits: never the image's own digit).
        spec: canvas_size S and distractors K (0 for `translated`).
        key: (seed, draw); with each image's index, all its randomness (see `_uniform`).

    Returns:
        canvases (B, 1, S, S) uint8; boxes (B, 4) int64, the digit's (x0, y0, x1, y1) on the
        canvas, x1 and y1 exclusive.
    """
    index = np.asarray(index, np.int64)
    B, S = len(index), spec.canvas_size
    K = spec.distractors
    u = _uniform(*key, index, 2 + 5 * K)  # (B, 2 + 5K)
    boxes = digit_boxes(u, S)  # (B, 4)
    sums = np.zeros(B * S * S, np.int32)  # (B*S*S,)
    _add_at(sums, S, (boxes[:, 0], boxes[:, 1]), digits[index])
    steps = np.arange(CROP)
    for j in range(K):
        v = u[:, 2 + 5 * j:7 + 5 * j]  # (B, 5): source, crop x, crop y, place x, place y
        source = (index + 1 + _place(v[:, 0], len(pool) - 1)) % len(pool)
        cx, cy = _place(v[:, 1], DIGIT - CROP + 1), _place(v[:, 2], DIGIT - CROP + 1)
        crops = pool[source[:, None, None], cy[:, None, None] + steps[:, None],
                     cx[:, None, None] + steps]  # (B, 8, 8)
        _add_at(sums, S, (_place(v[:, 3], S - CROP + 1), _place(v[:, 4], S - CROP + 1)), crops)
    np.minimum(sums, 255, out=sums)  # in place: a fresh 4-byte canvas costs more than the sums
    canvases = sums.astype(np.uint8).reshape(B, 1, S, S)  # (B, 1, S, S)
    return canvases, boxes


class PlacedDigits(Dataset):
    """Digits placed on canvases as they are asked for, a batch at a time (`place_digits`).

    Indexed by (indices, draw): draw is the training epoch, or None for the fixed canvases of
    evaluation. A split with seed None (validation, test) always gives its fixed canvases.
    """

    def __init__(self, digits, labels, pool, spec: DataSpec, seed):
        self.digits, self.pool, self.spec = digits, pool, spec
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.fixed = seed is None
        self.seed = EVAL_SEED if self.fixed else seed
        self.image_shape = (1, spec.canvas_size, spec.canvas_size)

    def __len__(self):
        return len(self.labels)

    def _draw(self, draw):
        return EVAL_DRAW if self.fixed or draw is None else draw

    def __getitem__(self, key):
        index, draw = key
        index = torch.as_tensor(index)
        canvases, _ = place_digits(self.digits, index.numpy(), self.pool, self.spec,
                                   (self.seed, self._draw(draw)))
        return torch.from_numpy(canvases), self.labels[index], index

    def boxes(self, positions, draw=None):
        """(B, 4) int64 tensor: where each image's digit lies, (x0, y0, x1, y1); from the
        placement's hash alone, without drawing the canvases."""
        u = _uniform(self.seed, self._draw(draw), np.asarray(positions, np.int64), 2)  # (B, 2)
        return torch.from_numpy(digit_boxes(u, self.spec.canvas_size))


def crop_and_flip(images, u, pad=PAD):
    """Random crop of the zero-padded images and random horizontal flip, the batch at once.

    Args:
        images: (B, C, H, W) images, of any dtype.
        u: (B, 3) numbers in [0, 1) per image: the crop's column and row offsets, and the flip.
        pad: zero pixels added on each side of the image.

    Returns:
        (B, C, H, W): image b padded with `pad` zeros on every side, the H x W window whose top
        left corner is at (dx, dy) = floor(u[b, :2] * (2 pad + 1)) cut out of it, and that
        window mirrored left to right where u[b, 2] < 0.5.
    """
    B, C, H, W = images.shape
    u = torch.as_tensor(u)
    dx, dy = (u[:, :2] * (2 * pad + 1)).long().unbind(1)  # (B,) each, in 0..2 pad
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))  # (B, C, H + 2pad, W + 2pad)
    rows = dy[:, None] + torch.arange(H)  # (B, H)
    cols = dx[:, None] + torch.arange(W)  # (B, W)
    cols = torch.where(u[:, 2:] < 0.5, cols.flip(1), cols)  # a mirrored window reads right to left
    # One gather of every channel through a flat index: several times faster than indexing
    # the four axes.
    index = (rows[:, :, None] * (W + 2 * pad) + cols[:, None, :]).view(B, 1, H * W)  # (B, 1, HW)
    return padded.flatten(2).gather(2, index.expand(B, C, H * W)).view(B, C, H, W)


class Augmented(Dataset):
    """A training split whose images are randomly cropped and flipped (`crop_and_flip`).

    Indexed like the split it wraps, by (indices, draw). A training epoch's draw (the epoch)
    gives each image its crop and flip from the hash of (seed, draw, image) (`_uniform`): the
    same whatever batch, worker or process takes it, after a resume too, and another every
    epoch; no random stream of the run is touched. Evaluation passes (draw None) get the images
    as they are stored.
    """

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed
        self.image_shape = dataset.image_shape

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        images, labels, positions = self.dataset[key]
        draw = key[1]
        if draw is None:
            return images, labels, positions
        return self.augment(images, labels, positions, draw)

    def augment(self, images, labels, positions, draw):
        """A training batch as it is handed out: here, each image cropped and flipped."""
        u = torch.from_numpy(_uniform(self.seed, draw, positions.numpy(), 3))  # (B, 3)
        return crop_and_flip(images, u), labels, positions

    def boxes(self, positions):
        return self.dataset.boxes(positions)


def _grey(x):
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    return torch.einsum("bchw,c->bhw", x, x.new_tensor(GREY_WEIGHTS)).unsqueeze(1)


def _colour(x, u):
    """Brightness, contrast, saturation (each a factor in 1 +- VIEW_JITTER from u[:, :3]), then
    grey where u[:, 3] < VIEW_GREY. x: (B, 3, H, W) in [0, 1]."""
    factor = (1 + VIEW_JITTER * (2 * u[:, :3] - 1)).to(x.dtype)[:, :, None, None, None]
    x = (x * factor[:, 0]).clamp(0, 1)  # brightness
    mean = _grey(x).mean((1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    x = (mean + (x - mean) * factor[:, 1]).clamp(0, 1)  # contrast
    grey = _grey(x)
    x = (grey + (x - grey) * factor[:, 2]).clamp(0, 1)  # saturation
    return torch.where(u[:, 3, None, None, None] < VIEW_GREY, _grey(x).expand_as(x), x)


def random_view(images, u):
    """A random view of each image, the batch at once, after SimCLR's: a crop of random area and
    shape resized back to the image's size, a horizontal flip, and random colour changes. Unlike
    SimCLR's, the crop keeps at least a fifth of the image (SimCLR: 8%), the colour changes are
    always applied (SimCLR: with probability 0.8), in a fixed order, and the hue is kept.

    Args:
        images: (B, C, H, W) uint8 images.
        u: (B, VIEW_DRAWS) numbers in [0, 1) per image: the crop's area and aspect ratio, its
            centre's column and row, the flip (where < 0.5), then brightness, contrast and
            saturation, and the grey (where < VIEW_GREY). Colour changes need C = 3.

    Returns:
        (B, C, H, W) uint8: the crop (area a * H * W, width over height r, both drawn
        log-uniformly for r, uniformly for a, and shrunk to fit the image) sampled bilinearly
        onto the H x W grid, mirrored where drawn, its colours changed.
    """
    u = torch.as_tensor(u, dtype=torch.float64)
    area = VIEW_AREA[0] + (VIEW_AREA[1] - VIEW_AREA[0]) * u[:, 0]
    log_low, log_high = np.log(VIEW_RATIO[0]), np.log(VIEW_RATIO[1])
    ratio = torch.exp(log_low + (log_high - log_low) * u[:, 1])
    # Width and height as fractions of the image's, so [-1, 1] in affine_grid's units.
    width, height = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    centre_x, centre_y = (1 - width) * (2 * u[:, 2] - 1), (1 - height) * (2 * u[:, 3] - 1)
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    zero = torch.zeros_like(area)
    theta = torch.stack([torch.stack([width * flip, zero, centre_x], -1),
                         torch.stack([zero, height, centre_y], -1)], 1).float()  # (B, 2, 3)
    x = images.float() / 255.0
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    # "border": a crop on the image's edge repeats its last pixel rather than fading to black.
    x = torch.nn.functional.grid_sample(x, grid, padding_mode="border",
                                        align_corners=False)  # (B, C, H, W)
    if x.shape[1] == 3:
        x = _colour(x, u[:, 5:].float())
    return (x * 255.0).round_().to(torch.uint8)


class TwoViews(Augmented):
    """A training split that hands out two random views of every image (`random_view`), for
    the contrastive loss of --contrast_dim: a batch of B images comes out as 2B, the first
    views of the B images then their second views, labels and positions repeated to match.

    Each view is drawn from the hash of (seed, draw, image), as `Augmented`'s crops are, so a
    batch's views do not depend on its company, its worker or a resume. Evaluation passes (draw
    None) get the images as they are stored, once.
    """

    def augment(self, images, labels, positions, draw):
        u = torch.from_numpy(_uniform(self.seed, draw, positions.numpy(),
                                      CONTRAST_VIEWS * VIEW_DRAWS))  # (B, views * draws)
        views = [random_view(images, part) for part in u.split(VIEW_DRAWS, dim=1)]
        return (torch.cat(views), labels.repeat(CONTRAST_VIEWS),
                positions.repeat(CONTRAST_VIEWS))  # (2B, C, H, W), (2B,), (2B,)


def _read_idx(path):
    """An idx file of uint8 (MNIST's format), plain or gzipped, as a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = bytearray(f.read())  # writable, so torch can share it without a warning
    magic, dims = int.from_bytes(raw[:4], "big"), raw[3]
    if dims not in IDX_MAGIC or magic != IDX_MAGIC[dims]:
        raise ValueError(f"{path} is not an idx file of uint8 (magic number {magic})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * dims)
    if data.size != np.prod(shape):
        raise ValueError(f"{path} holds {data.size} bytes of data, its header says {shape}")
    return data.reshape(shape)


def _mnist_paths(raw):
    """The four files in `raw`, each plain or gzipped; None if one is missing."""
    paths = {}
    for name, file in MNIST_FILES.items():
        found = [p for p in (os.path.join(raw, file), os.path.join(raw, file + ".gz"))
                 if os.path.isfile(p)]
        if not found:
            return None
        paths[name] = found[0]
    return paths


def load_mnist(data_dir):
    """All of MNIST as uint8 arrays: train_x, test_x (N, 28, 28), train_y, test_y (N,).

    Read from torchvision's layout, `<data_dir>/MNIST/raw/`; torchvision's download is tried
    where the files are missing.
    """
    raw = os.path.join(data_dir, "MNIST", "raw")
    if _mnist_paths(raw) is None:
        try:
            torchvision_download("MNIST", data_dir)
        except Exception as e:  # any failure ends in the one line below
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
            raise UserError(f"MNIST is not in {os.path.abspath(raw)} and could not be "
                            f"downloaded ({reason}); put the four original files "
                            f"({', '.join(MNIST_FILES.values())}, plain or .gz) there, or pass "
                            "the --data_dir that holds MNIST/raw/") from None
    try:
        arrays = {name: _read_idx(path) for name, path in _mnist_paths(raw).items()}
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"cannot read MNIST in {raw}: {e}; replace the damaged file") from None
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or x.shape[1:] != (DIGIT, DIGIT) or len(y) != len(x) or y.max() > 9:
            raise UserError(f"MNIST's {split} files in {raw} hold {x.shape} images and "
                            f"{len(y)} labels; expected (N, 28, 28) with N labels 0..9")
    return arrays


def _statistics(images):
    """Per-channel mean and std of uint8 (N, C, H, W) images in [0, 1], to 4 decimals."""
    x = torch.as_tensor(images).double().div_(255).transpose(0, 1).flatten(1)  # (C, N*H*W)
    return tuple(round(v, 4) for v in x.mean(1).tolist()), \
        tuple(round(v, 4) for v in x.std(1, unbiased=False).tolist())


def _three_splits(arrays, valid_size):
    """(images, labels) of the training, validation and test splits of `arrays` (train_x,
    train_y, test_x, test_y), the validation share held out by train_valid_split."""
    train_idx, valid_idx = (i.numpy() for i in train_valid_split(len(arrays["train_x"]),
                                                                 valid_size))
    x, y = arrays["train_x"], arrays["train_y"]
    return (x[train_idx], y[train_idx]), (x[valid_idx], y[valid_idx]), \
        (arrays["test_x"], arrays["test_y"])


def _cifar10(spec, data_dir, valid_size, seed):
    train, valid, test = (ImageBatches(x, y)
                          for x, y in _three_splits(load_cifar10(data_dir), valid_size))
    return Data(spec.tag, train, valid, test, 10, CIFAR10_MEAN, CIFAR10_STD)


def _mnist(spec, data_dir, valid_size, seed):
    train, valid, test = (ImageBatches(x[..., None], y)  # (N, 28, 28, 1)
                          for x, y in _three_splits(load_mnist(data_dir), valid_size))
    return Data(spec.tag, train, valid, test, 10, *_statistics(train.images))


def _placed(spec, data_dir, valid_size, seed):
    (pool, train_y), valid, test = _three_splits(load_mnist(data_dir), valid_size)
    # The distractors of every split are cut from the training digits; evaluation splits
    # (seed None) keep their canvases fixed.
    train = PlacedDigits(pool, train_y, pool, spec, seed)
    sample = np.arange(min(STATS_IMAGES, len(train)))
    return Data(spec.tag, train, PlacedDigits(*valid, pool, spec, None),
                PlacedDigits(*test, pool, spec, None), 10,
                *_statistics(train[sample, STATS_DRAW][0]))


LOADERS = {"cifar10": _cifar10, "mnist": _mnist, "translated": _placed, "cluttered": _placed}


def load_data(spec: DataSpec, data_dir, valid_size, seed):
    """The Data of `spec`; `seed` draws the training canvases of the synthetic datasets."""
    if spec.name not in LOADERS:
        raise UserError(f"--dataset must be one of {', '.join(DATASETS)}, got {spec.name!r}")
    if spec.name in ("translated", "cluttered") and spec.canvas_size < DIGIT:
        raise UserError(f"--canvas_size={spec.canvas_size} cannot hold a {DIGIT}x{DIGIT} "
                        f"digit; pass at least {DIGIT}")
    return LOADERS[spec.name](spec, data_dir, valid_size, seed)
