"""The networks of the recurrent attention model, one `nn.Module` per idea.

Conventions used throughout:
    B: batch size, C: image channels, H, W: image height and width,
    k: patches per glimpse, g: patch size, T: number of glimpses.
Images are (B, C, H, W). A location `l` is (B, 2) in [-1, 1]^2 ordered (x, y):
x runs left to right along W, y top to bottom along H; (-1, -1) is the top-left corner.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# Per-channel mean and std of the CIFAR-10 training images in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def check_learns(policy, name):
    """--name, given, is for the learned policy only: a ValueError for any other --policy."""
    if policy != "learned":
        raise ValueError(f"--{name} is for the learned policy; --policy={policy} does not "
                         f"learn: leave --{name} out")


def _check_whole(name, value):
    """A ModelConfig size: an int (not a bool) of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"--{name} must be a whole number of at least 1, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Every hyper-parameter of the model, checked once when built.

    Defaults are the seed configuration: 9 glimpses of 3 patches (6, 12 and 24 px,
    each pooled to 6x6) on 32x32 RGB images.
    """

    dataset: str = "cifar10"  # the tag of the images the model is for (datasets.DataSpec)
    image_size: int = 32
    num_channels: int = 3
    num_classes: int = 10
    patch_size: int = 6
    glimpse_scale: int = 2
    num_patches: int = 3
    glimpse_hidden: int = 128
    loc_hidden: int = 128
    hidden_size: int = 256
    num_glimpses: int = 9
    std: float = 0.05
    std_final: float | None = None  # None: --std throughout; else annealed to it (policy_std)
    learn_std: bool = False  # True: the std of each glimpse and axis is a weight, from --std
    policy_epochs: int | None = None  # None: the policy learns throughout; else frozen after
    policy: str = "learned"
    objective: str = "unsupervised"
    reward: str = "sum"
    baseline: str = "shared"
    probe_input: str = "summed"
    policy_input: str = "state"
    core: str = "rnn"
    glimpse_encoder: str = "linear"
    pixel_mean: tuple = CIFAR10_MEAN
    pixel_std: tuple = CIFAR10_STD
    decoder: bool = True  # False: pure RAM, no reconstruction at all (it costs nothing)
    write: str = "none"  # "glimpse": the decoder also writes at the glimpse (WritingDecoder)
    decoder_hidden: int | None = None  # None: the linear decoder; N: plus a ReLU layer (MLPDecoder)
    location_grad: str = "none"  # "pathwise": the losses' gradient reaches the locations too
    contrast_dim: int | None = None  # None: no contrastive loss; N: Projector's output width
    temperature: float = 0.5  # of the contrastive loss (model.contrastive_loss)

    def __post_init__(self):
        for name in ("image_size", "num_channels", "num_classes", "patch_size", "glimpse_scale",
                     "num_patches", "glimpse_hidden", "loc_hidden", "hidden_size", "num_glimpses"):
            _check_whole(name, getattr(self, name))
        if not self.std > 0:
            raise ValueError(f"--std must be greater than 0, got {self.std}")
        if self.policy not in POLICIES:
            raise ValueError(f"--policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not len(self.pixel_mean) == len(self.pixel_std) == self.num_channels:
            raise ValueError(f"pixel_mean and pixel_std need {self.num_channels} values each")
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        for name, choices in (("reward", REWARDS), ("baseline", BASELINES),
                              ("probe_input", PROBE_INPUTS), ("policy_input", POLICY_INPUTS),
                              ("core", tuple(CORES)), ("glimpse_encoder", GLIMPSE_ENCODERS),
                              ("location_grad", LOCATION_GRADS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"--{name} must be one of {', '.join(choices)}, "
                                 f"got {getattr(self, name)!r}")
        self._check_policy_schedule()
        if self.write not in WRITES:
            raise ValueError(f"--write must be one of {', '.join(WRITES)}, got {self.write!r}")
        if self.write != "none" and not self.decoder:
            raise ValueError("--write=glimpse writes the decoder's increments: pure RAM "
                             "(--recon_weight=0 under supervised) has no decoder")
        self._check_decoder_hidden()
        self._check_contrast()
        if not self.decoder and self.objective == "unsupervised":
            raise ValueError("the unsupervised objective needs the decoder: its reward is the "
                             "reconstruction error")
        if self.num_patches > 1 and self.glimpse_scale < 2:
            raise ValueError("--glimpse_scale must be at least 2 when --num_patches > 1 "
                             "(scale 1 would take the same patch several times)")
        if self.largest_patch > 4 * self.image_size:
            raise ValueError(
                f"the largest patch is {self.largest_patch} px (patch_size * glimpse_scale ** "
                f"(num_patches - 1)), more than 4x the {self.image_size} px image: "
                "lower --patch_size, --glimpse_scale or --num_patches")

    def _check_decoder_hidden(self):
        """--decoder_hidden: a whole number, for a decoder that does not write."""
        if self.decoder_hidden is None:
            return
        _check_whole("decoder_hidden", self.decoder_hidden)
        if not self.decoder:
            raise ValueError("--decoder_hidden widens the decoder: pure RAM (--recon_weight=0 "
                             "under supervised) has none")
        if self.write != "none":
            raise ValueError("--decoder_hidden and --write=glimpse are two different decoders: "
                             "leave one out")

    def _check_contrast(self):
        """--contrast_dim and --temperature: a whole width, on colour photographs."""
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"--temperature must be a finite number above 0, got "
                             f"{self.temperature}")
        if self.contrast_dim is None:
            if self.temperature != ModelConfig.temperature:
                raise ValueError("--temperature sets the contrastive loss: add --contrast_dim, "
                                 "or leave --temperature out")
            return
        _check_whole("contrast_dim", self.contrast_dim)
        if self.dataset != "cifar10":
            raise ValueError(f"--contrast_dim trains on random views of each image (crops, "
                             f"flips, colour changes): it is for --dataset=cifar10, not "
                             f"{self.dataset}")

    def _check_policy_schedule(self):
        """--std_final, --policy_epochs, --location_grad and --learn_std: for a policy that
        learns, with sound values."""
        if self.std_final is not None and not self.std_final > 0:
            raise ValueError(f"--std_final must be greater than 0, got {self.std_final}")
        if self.policy_epochs is not None and self.policy_epochs < 1:
            raise ValueError(f"--policy_epochs must be at least 1, got {self.policy_epochs}")
        if self.learn_std and self.std_final is not None:
            raise ValueError("--learn_std=true and --std_final both set the policy's std: "
                             "leave one out")
        if self.learn_std and not math.exp(LOG_STD_MIN) <= self.std <= math.exp(LOG_STD_MAX):
            raise ValueError(f"--learn_std=true keeps the std between {math.exp(LOG_STD_MIN):g} "
                             f"and {math.exp(LOG_STD_MAX):g}; --std={self.std:g} starts it outside")
        for name in ("std_final", "policy_epochs", "location_grad", "learn_std"):
            if getattr(self, name) != getattr(ModelConfig, name):
                check_learns(self.policy, name)

    @property
    def patch_sizes(self):
        """Side of each patch before pooling: g, g*s, g*s^2, ..."""
        return [self.patch_size * self.glimpse_scale**i for i in range(self.num_patches)]

    @property
    def views(self):
        """Rollouts per training image: two views under --contrast_dim, else the image once."""
        return 1 if self.contrast_dim is None else CONTRAST_VIEWS

    @property
    def largest_patch(self):
        return self.patch_sizes[-1]

    @property
    def glimpse_numel(self):
        """Length of one flattened glimpse: k * C * g * g."""
        return self.num_patches * self.num_channels * self.patch_size**2

    @property
    def image_numel(self):
        return self.num_channels * self.image_size**2


OBJECTIVES = ("unsupervised", "supervised")
REWARDS = ("sum", "gain", "final")  # how the unsupervised objective pays a glimpse (compute_losses)
BASELINES = ("shared", "per_step")
PROBE_INPUTS = ("summed", "last")
POLICY_INPUTS = ("state", "state_step", "grid_prior", "grid_local")
GLIMPSE_ENCODERS = ("linear", "conv")  # the first layer of the "what" pathway
WRITES = ("none", "glimpse")  # where the decoder writes: see Decoder and WritingDecoder
# How the learned policy learns: "none", RAM's REINFORCE alone (a location is an action);
# "pathwise", also the losses' own gradient, through a sensor that reads between pixels.
LOCATION_GRADS = ("none", "pathwise")
CONTRAST_VIEWS = 2  # views of each training image under --contrast_dim (datasets.TwoViews)
CONV_CHANNELS = 32  # feature maps of each convolution of the conv glimpse encoder
# Where a learned std (--learn_std) may go: 1e-4 to 1 in location units ([-1, 1] spans the image).
LOG_STD_MIN, LOG_STD_MAX = math.log(1e-4), 0.0


def policy_std(cfg: ModelConfig, epoch, epochs):
    """The learned policy's standard deviation while training epoch `epoch` + 1 of `epochs`:
    --std throughout, or with --std_final from --std at the first epoch to --std_final at the
    last, geometrically (the same factor every epoch), and --std_final after it."""
    if cfg.std_final is None:
        return cfg.std
    done = min(epoch / max(epochs - 1, 1), 1.0)
    return cfg.std * (cfg.std_final / cfg.std) ** done


def location_to_pixels(l, image_size):
    """Map locations in [-1, 1] to integer pixel centres in [0, image_size].

    A patch of side S centred at pixel c covers [c - S // 2, c - S // 2 + S). With this mapping
    l = 0 puts an even-sized patch exactly in the middle of an even-sized image, and l = -1 / +1
    put the patch centre on the image border, half of the patch outside. The sensor and the
    plots both call this function, so a drawn box is always where the pixels came from.

    Args:
        l: (..., 2) locations (x, y) in [-1, 1].
        image_size: side of the square image in pixels.

    Returns:
        (..., 2) long tensor of pixel centres (x, y).
    """
    half = image_size / 2.0
    centre = l.detach().float().mul(half).add_(half).floor_()  # in place: one temporary
    return centre.long().clamp_(0, image_size)


def pixel_neighbours(l, image_size):
    """The 4 centre pixels around the real-valued centre p = (l + 1) S / 2, and their bilinear
    weights: what a glimpse between pixels (location_grad=pathwise) is made of.

    Args:
        l: (N, 2) locations (x, y) in [-1, 1].
        image_size: side of the square image in pixels.

    Returns:
        (N, 4, 2) long pixel centres in [0, image_size], in the order c, c + (1, 0),
        c + (0, 1), c + (1, 1) with c the pixel at or before p, and (N, 4) weights, summing to
        1, differentiable in l (in l's precision, at least float32).
    """
    p = (l.to(torch.promote_types(l.dtype, torch.float32)) + 1) * (image_size / 2)  # (N, 2)
    base = p.detach().floor().clamp_(0, image_size - 1)  # the neighbours are base and base + 1
    fx, fy = (p - base).unbind(-1)  # (N,) each, in [0, 1]
    step = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]], device=l.device)  # (4, (x, y))
    weights = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], 1)
    return base.long().unsqueeze(1) + step, weights


def patch_corners(l, image_size, patch_sizes):
    """Top-left pixel (x, y) of every patch of a glimpse at `l`.

    Args:
        l: (..., 2) locations in [-1, 1].
        image_size: side of the image in pixels.
        patch_sizes: the k patch sides.

    Returns:
        (..., k, 2) long tensor; may be negative or past the image where patches stick out.
    """
    centre = location_to_pixels(l, image_size).unsqueeze(-2)  # (..., 1, 2)
    half = torch.tensor([s // 2 for s in patch_sizes], device=centre.device)  # (k,)
    return centre - half.view(-1, 1)  # (..., k, 2)


def sensor_pad(cfg: ModelConfig):
    """How many zero pixels the retina pads each side of the image with: the side of its
    largest box, s^(k-1) (see Retina)."""
    return cfg.glimpse_scale ** (cfg.num_patches - 1)


def cell_starts(cfg: ModelConfig):
    """Where the box of pooled cell a of patch i starts along either axis, in the retina's padded
    coordinates, for a glimpse centred on pixel c of that axis: (S + 1 centres, k, g).

    Clamping to [0, S + pad] leaves every box that touches the image where it is and moves the
    others onto a box of padding only, which holds zeros when read (Retina) and is cut off when
    written (WritingDecoder)."""
    pad, g = sensor_pad(cfg), cfg.patch_size
    centres = torch.arange(cfg.image_size + 1).view(-1, 1, 1)
    start = torch.stack([pad - size // 2 + torch.arange(g) * cfg.glimpse_scale**i
                         for i, size in enumerate(cfg.patch_sizes)])  # (k, g)
    return (centres + start).clamp(0, cfg.image_size + pad)


class Retina(nn.Module):
    """Glimpse sensor: k square patches of sides g*s^i around `l`, each average-pooled to g x g.

    phi(x, l) = [pool_{s^i}(crop_{g s^i}(x, l))]_{i < k}, zero outside the image.

    The image does not change between glimpses, so `prepare` does the pooling once per batch:
    it zero-pads the image and sums it over every s^i x s^i box at stride 1, for every scale.
    Every pooled patch value is then one such sum over the box's area, and `forward` is a
    single gather per glimpse, whose index is looked up by the glimpse's centre pixel (and a
    scaling of the few values it gathered). This gives the
    same numbers as cropping and pooling each patch, which the tests check against a direct
    crop.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        s, k = cfg.glimpse_scale, cfg.num_patches
        # Every level is padded by the largest box's side f = s^(k-1), not by half the largest
        # patch: a box that starts more than f px before the image, or at its far edge or
        # beyond, holds only zeros, and `forward` clamps its start onto the first or the last
        # of those all-zero boxes. For the seed's sensor the levels hold less than half the
        # values they would with the full padding (40^2 + 39^2 + 37^2 against 56^2 + 55^2 +
        # 53^2 per channel), and so does the memory `prepare` writes and `forward` reads.
        self.pad = sensor_pad(cfg)
        # Side of each scale's filtered image: an f-box at stride 1 loses f - 1 pixels, and
        # scale i + 1's box is s boxes of scale i, f_i pixels apart.
        self.sides = [cfg.image_size + 2 * self.pad]
        for i in range(1, k):
            self.sides.append(self.sides[-1] - (s - 1) * s ** (i - 1))
        self.offsets = [sum(side**2 for side in self.sides[:i]) for i in range(k)]
        self.length = self.offsets[-1] + self.sides[-1] ** 2  # of one channel's k levels
        # The gather index of every glimpse centre, looked up rather than computed per glimpse
        # (one row lookup is faster than the broadcast integer ops). 2.8 MB for CIFAR-10's
        # sensor, 47 MB for the 4-scale sensor on 100 x 100 canvases (C times that with C
        # channels). Kept out of the module's buffers, which DistributedDataParallel would
        # broadcast at every step; `_apply` moves it with the module.
        self.index_table = self._index_table()  # ((S + 1)^2, k*C*g*g)
        area = torch.tensor([float(s ** (2 * i)) for i in range(k)])
        self.register_buffer("inv_area", (1.0 / area).view(1, -1, 1, 1, 1),
                             persistent=False)  # (1, k, 1, 1, 1): box sum -> mean

    def _index_table(self):
        """Row cy * (S + 1) + cx: the (k, C, g, g) positions in `prepare`'s output of the glimpse
        centred on pixel (cx, cy), channels included, so that the gathered patches come out in
        the order the glimpse network reads them."""
        cfg = self.cfg
        start = cell_starts(cfg)  # (S + 1, k, g)
        offset = torch.tensor(self.offsets).view(-1, 1, 1)  # (k, 1, 1) where each level begins
        side = torch.tensor(self.sides).view(-1, 1, 1)  # (k, 1, 1)
        channel = torch.arange(cfg.num_channels).view(-1, 1, 1) * self.length  # (C, 1, 1)
        table = (offset + start[:, None, :, :, None] * side
                 + start[None, :, :, None, :])  # (S + 1, S + 1, k, g, g): (cy, cx, ...)
        table = table.unsqueeze(3) + channel  # (S + 1, S + 1, k, C, g, g)
        return table.flatten(2).flatten(0, 1)  # ((S + 1)^2, k*C*g*g)

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .half() and the like reach every tensor through here; the table is
        # not a buffer, so it is moved by hand (dtype casts leave integer tensors alone).
        module = super()._apply(fn, *args, **kwargs)
        self.index_table = fn(self.index_table)
        return module

    def prepare(self, x):
        """Box-filter the zero-padded image at every scale.

        Args:
            x: (B, C, H, W) images.

        Returns:
            (B, C, L) the k filtered images (box sums, not yet means), each flattened, one
            after the other (L = sum of side_i^2), ready for `forward`'s gather.
        """
        cfg, pad = self.cfg, self.pad
        B, C, H, W = x.shape
        s = cfg.glimpse_scale
        flat = x.new_empty(B, C, self.length)  # (B, C, L)
        levels = [flat[:, :, o:o + side**2].view(B, C, side, side)  # (B, C, side_i, side_i)
                  for o, side in zip(self.offsets, self.sides, strict=True)]
        levels[0].zero_()
        levels[0][..., pad:pad + H, pad:pad + W] = x
        for i in range(1, cfg.num_patches):
            # The (s f)-box sum is the sum of s f-box sums f pixels apart, one axis at a time:
            # s - 1 additions per axis, written straight into place. Several times faster on
            # the CPU than a stride-1 average pool, and exact for zero padding.
            prev, side, f = levels[i - 1], self.sides[i], s ** (i - 1)
            rows = prev[..., :side, :] + prev[..., f:f + side, :]  # (B, C, side, side_prev)
            for j in range(2, s):
                rows += prev[..., j * f:j * f + side, :]
            torch.add(rows[..., :side], rows[..., f:f + side], out=levels[i])
            for j in range(2, s):
                levels[i] += rows[..., j * f:j * f + side]
        # The levels hold box sums; `forward` turns the few gathered ones into means.
        return flat

    def forward(self, prepared, l):
        """Take one glimpse per image and path.

        Args:
            prepared: (B, C, L) output of `prepare`.
            l: (P*B, 2) locations in [-1, 1], P paths per image: row p*B + b looks at image b.

        Returns:
            (P*B, k, C, g, g) pooled patches; differentiable in `l` with location_grad=pathwise
            (`_between_pixels`).
        """
        cfg = self.cfg
        if cfg.location_grad == "pathwise":
            phi = self._between_pixels(prepared, l)
        else:
            phi = self._box_sums(prepared, location_to_pixels(l, cfg.image_size))
        k, C, g = cfg.num_patches, cfg.num_channels, cfg.patch_size
        return phi.view(-1, k, C, g, g) * self.inv_area  # box sums -> means

    def _box_sums(self, prepared, centres):
        """The box sums of the glimpses centred on pixels `centres`, (x, y) each: (N, 2) ->
        (P, B, k*C*g*g), or m per column, (N, m, 2) -> (P, B, m*k*C*g*g), P paths of the B
        images."""
        B, C, L = prepared.shape
        paths = centres.shape[0] // B
        cells = centres[..., 1] * (self.cfg.image_size + 1) + centres[..., 0]  # index rows
        index = self.index_table.index_select(0, cells.flatten())  # (N[*m], k*C*g*g)
        # The paths read the same prepared images: a stride-0 view, never a copy per path.
        source = prepared.view(1, B, C * L).expand(paths, B, C * L)  # (P, B, C*L)
        return source.gather(2, index.view(paths, B, -1))

    def _between_pixels(self, prepared, l):
        """Box sums at the real-valued centre p = (l + 1) S / 2, not rounded to a pixel: those
        of its 4 neighbouring centre pixels, weighted bilinearly (pixel_neighbours). A box sum
        is linear in the image, so this is exactly the pixel sensor on the image shifted by p's
        fraction of a pixel (linearly interpolated), and it is differentiable in l. At a whole
        pixel it equals the pixel sensor; `location_to_pixels` (the plots, the distinct-glimpse
        count) rounds down, so a drawn box may sit up to a pixel before the one read.
        (N, k*C*g*g)."""
        centres, weights = pixel_neighbours(l, self.cfg.image_size)  # (N, 4, 2), (N, 4)
        sums = self._box_sums(prepared, centres).view(len(l), 4, -1)  # (N, 4, k*C*g*g)
        # Element-wise, not a product: autocast would round a product's operands to bf16, and
        # the location's gradient is made of differences between neighbouring box sums.
        return (weights.to(sums.dtype).unsqueeze(-1) * sums).sum(1)  # (N, k*C*g*g)


class ConvGlimpseEncoder(nn.Module):
    """The first layer of the "what" pathway as a small CNN (`glimpse_encoder=conv`).

    e_t = W_fc flatten(relu(conv_2(relu(conv_1(phi_t)))))

    The k pooled patches are concentric views of one spot, so they are stacked as the k*C
    channels of a single g x g image; both convolutions are 3x3 with zero padding, so the
    maps stay g x g.

    Args of forward:
        phi: (B, k, C, g, g) patches from the retina.
    Returns:
        (B, glimpse_hidden), before the ReLU that GlimpseNetwork applies (as to fc_phi's).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        channels = cfg.num_patches * cfg.num_channels
        self.conv1 = nn.Conv2d(channels, CONV_CHANNELS, 3, padding=1)
        self.conv2 = nn.Conv2d(CONV_CHANNELS, CONV_CHANNELS, 3, padding=1)
        self.fc = nn.Linear(CONV_CHANNELS * cfg.patch_size**2, cfg.glimpse_hidden)

    def forward(self, phi):
        x = phi.flatten(1, 2)  # (B, k*C, g, g)
        x = F.relu(self.conv2(F.relu(self.conv1(x))))  # (B, CONV_CHANNELS, g, g)
        return self.fc(x.flatten(1))  # (B, glimpse_hidden)


class GlimpseNetwork(nn.Module):
    """Combine "what" (the patches) and "where" (the location) into one feature vector.

    g_t = relu(W_what relu(E(phi_t)) + W_where relu(W_l l_t))

    E is a linear layer on the flattened patches, E(phi) = W_phi phi (`glimpse_encoder=linear`,
    the seed's), or a ConvGlimpseEncoder (`conv`).

    Args of forward:
        phi: (B, k, C, g, g) patches from the retina.
        l: (B, 2) the location they were taken at.
    Returns:
        g_t: (B, hidden_size).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        conv = cfg.glimpse_encoder == "conv"
        self.fc_phi = None if conv else nn.Linear(cfg.glimpse_numel, cfg.glimpse_hidden)
        self.conv_phi = ConvGlimpseEncoder(cfg) if conv else None
        self.fc_l = nn.Linear(2, cfg.loc_hidden)
        self.fc_what = nn.Linear(cfg.glimpse_hidden, cfg.hidden_size)
        self.fc_where = nn.Linear(cfg.loc_hidden, cfg.hidden_size)

    def forward(self, phi, l):
        encoded = self.fc_phi(phi.flatten(1)) if self.conv_phi is None else self.conv_phi(phi)
        what = self.fc_what(F.relu(encoded))  # (B, hidden)
        where = self.fc_where(F.relu(self.fc_l(l)))  # (B, hidden)
        return F.relu(what + where)


class CoreNetwork(nn.Module):
    """Elman RNN that integrates the glimpses (`core=rnn`, the seed's).

    h_t = relu(W_g g_t + W_h h_{t-1})

    Every core in CORES is called alike. Args of forward:
        g_t: (B, hidden_size) glimpse feature.
        h_prev: (B, hidden_size) previous state.
        c_prev: (B, hidden_size) previous memory cell. Only the LSTM has one; the other cores
            hand it back untouched.
    Returns:
        h_t: (B, hidden_size), the state the policy, baseline, decoder and probe read.
        c_t: (B, hidden_size), the memory cell (c_prev here).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.i2h = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.h2h = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, g_t, h_prev, c_prev):
        return F.relu(self.i2h(g_t) + self.h2h(h_prev)), c_prev


class LSTMCore(nn.Module):
    """LSTM cell that integrates the glimpses (`core=lstm`).

    [i, f, u, o] = [sigm, sigm, tanh, sigm](W_g g_t + W_h h_{t-1} + b),
    c_t = f * c_{t-1} + i * u,   h_t = o * tanh(c_t)

    h_t is the state passed on; the memory cell c_t stays inside the rollout. Called like
    CoreNetwork: (g_t, h_prev, c_prev) -> (h_t, c_t), all (B, hidden_size).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cell = nn.LSTMCell(cfg.hidden_size, cfg.hidden_size)

    def forward(self, g_t, h_prev, c_prev):
        return self.cell(g_t, (h_prev, c_prev))


class GRUCore(nn.Module):
    """GRU cell that integrates the glimpses (`core=gru`).

    z = sigm(W_z g_t + U_z h_{t-1}),  r = sigm(W_r g_t + U_r h_{t-1}),
    n = tanh(W_n g_t + r * (U_n h_{t-1})),  h_t = (1 - z) * n + z * h_{t-1}   (biases omitted)

    Called like CoreNetwork: (g_t, h_prev, c_prev) -> (h_t, c_prev), all (B, hidden_size); a
    GRU has no memory cell.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cell = nn.GRUCell(cfg.hidden_size, cfg.hidden_size)

    def forward(self, g_t, h_prev, c_prev):
        return self.cell(g_t, h_prev), c_prev


class LocationNetwork(nn.Module):
    """The learned policy: Gaussian over the next location, its standard deviation fixed,
    annealed or learned.

    mu = tanh(W_2 relu(W_1 h_t [+ e_t])),   l ~ N(mu, std^2 I),   l_used = clamp(l, -1, 1)

    With `policy_input=state_step` a learned vector e_t per glimpse index tells the policy
    which glimpse it is placing. From the state alone it cannot: when a glimpse repeats the
    last one, h barely changes, so the next mean is the same spot again (a fixed point).
    With `policy_input=grid_prior` the mean is tanh(p_t + W_2 relu(W_1 h_t)): a learned offset
    p_t per glimpse, initialised at the grid policy's raster (atanh of its locations) and W_2
    at zero, so the policy starts as the fixed scan that covers the image and learns per-image
    moves from it. Nothing keeps it there: REINFORCE may move p_t anywhere.
    With `policy_input=grid_local` the raster is fixed and the policy only moves each glimpse
    inside its own cell: mu = c_t + tanh(W_2 relu(W_1 h_t + e_t)) / n, with c_t the t-th of the
    n x n cell centres (GridPolicy's) and e_t the step's vector, so no glimpse's mean can leave
    its cell (the exploration noise still can). When T is a square (9 glimpses: a 3 x 3 raster)
    the cells tile the image, which the scan keeps covering whatever the policy learns; for
    other T the first T cells of the n x n raster are used, and the others are never aimed at.
    W_2 starts at zero: the policy starts as the grid scan.

    With --std_final the standard deviation is a buffer, not a constant: the trainer sets it
    every epoch (policy_std), and a checkpoint carries the one its last epoch trained with,
    which is then what evaluation samples with. With --learn_std it is a weight: one log std
    per glimpse and axis, log_std (T, 2), starting at log(--std), l ~ N(mu, diag(exp(2
    log_std[t]))); REINFORCE moves it through log pi like the mean (towards the spread of the
    samples that paid), and the entropy bonus (--entropy_weight) pushes it up; it is clamped
    to [LOG_STD_MIN, LOG_STD_MAX], where log pi stays finite and a sample still lands near the
    mean (a constant bonus would otherwise widen it without end). With --policy_epochs the
    buffer `exploring` says whether the policy still learns: once the trainer turns it off,
    every glimpse goes where the policy aims (l = mu, no noise) with log pi = 0, so REINFORCE
    gives the policy no gradient and the rest of the model trains, and is tested, on the exact
    paths it will take.

    The state is detached, so the policy never pushes gradient into the core. The sample is
    detached: it is an action, not a function of the weights, and the policy learns through
    the REINFORCE term alone (a learned std also through the entropy bonus). With
    `location_grad=pathwise` the location handed on is mu + std * noise itself
    (reparameterised), and the sensor reads between pixels (Retina), so every loss's gradient
    also reaches the policy through the glimpses it chose; log pi is still that of the
    detached sample, REINFORCE's term unchanged (--reinforce_weight=0 drops it). The
    log-probability is that of the raw sample; the clamp is treated as part of the
    environment, which keeps the score-function estimate unbiased.

    Every policy in POLICIES is called alike. Args of forward:
        h: (B, hidden_size) state the choice is made in.
        t: index of the glimpse being placed, 0 for the first.
        noise: (B, 2) standard normal draws to use instead of fresh ones, or None.
    Returns:
        l: (B, 2) location in [-1, 1], detached unless pathwise.
        log_pi: (B,) log-probability of the sample under the policy.
        mu: (B, 2) detached mean of the policy.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.log_std = None
        if cfg.learn_std:
            self.log_std = nn.Parameter(torch.full((cfg.num_glimpses, 2), math.log(cfg.std)))
        elif cfg.std_final is None:
            self.std = cfg.std
        else:  # annealed: in the state_dict, so that a checkpoint keeps the epoch's value
            self.register_buffer("std", torch.tensor(float(cfg.std)))
        if cfg.policy_epochs is None:
            self.exploring = True
        else:  # in the state_dict: a checkpoint knows whether its policy was still learning
            self.register_buffer("exploring", torch.tensor(True))
        self.pathwise = cfg.location_grad == "pathwise"
        width = max(1, cfg.hidden_size // 2)
        self.fc = nn.Linear(cfg.hidden_size, width)
        self.fc_mu = nn.Linear(width, 2)
        self.step = (nn.Embedding(cfg.num_glimpses, width)
                     if cfg.policy_input in ("state_step", "grid_local") else None)
        cells = grid_locations(cfg.num_glimpses) if cfg.policy_input == "grid_local" else None
        self.register_buffer("cells", cells, persistent=False)  # (T, 2) or None
        # A cell is 2 / n wide in location units, n cells a side.
        self.half_cell = 1.0 / grid_side(cfg.num_glimpses)
        self.prior = None
        if cfg.policy_input == "grid_prior":
            grid = grid_locations(cfg.num_glimpses).clamp(-0.999, 0.999)  # (T, 2)
            self.prior = nn.Parameter(torch.atanh(grid))
        if cfg.policy_input in ("grid_prior", "grid_local"):
            # Start exactly on the scan; REINFORCE's gradient still reaches fc_mu at once.
            nn.init.zeros_(self.fc_mu.weight)
            nn.init.zeros_(self.fc_mu.bias)

    def forward(self, h, t, noise=None):
        hidden = self.fc(h.detach())  # (B, width)
        if self.step is not None:
            hidden = hidden + self.step.weight[t]
        pre = self.fc_mu(F.relu(hidden))  # (B, 2)
        if self.cells is not None:
            mu = self.cells[t].to(pre.dtype) + torch.tanh(pre) * self.half_cell  # (B, 2)
        else:
            mu = torch.tanh(pre if self.prior is None else pre + self.prior[t])  # (B, 2)
        if not self.exploring:  # frozen (--policy_epochs): the aimed path, nothing to learn
            mu = mu.detach()
            return mu.clamp(-1.0, 1.0), mu.new_zeros(mu.shape[0]), mu
        noise = torch.randn_like(mu) if noise is None else noise.to(mu.dtype)
        std, log_std = self.spread(t, mu.dtype)
        drawn = mu + std * noise  # (B, 2); reparameterised: a function of mu (and of log_std)
        sample = drawn.detach()
        # log N(sample; mu, std^2) per axis, summed; written out rather than through
        # torch.distributions, whose argument checks would raise on NaN instead of letting
        # the trainer's finite-loss guard report where it happened.
        log_pi = (-0.5 * ((sample - mu) / std) ** 2
                  - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)  # (B,)
        used = drawn if self.pathwise else sample
        return used.clamp(-1.0, 1.0), log_pi, mu.detach()

    def spread(self, t, dtype):
        """(std, log std) of glimpse t's Gaussian: (2,) tensors of the clamped weight with
        --learn_std, in the mean's `dtype` (bf16 under --amp, like the fixed std's samples),
        else the fixed or annealed value, the same for every glimpse and axis."""
        if self.log_std is not None:
            log_std = self._log_stds()[t].to(dtype)  # (2,)
            return log_std.exp(), log_std
        return self.std, self.std.log() if torch.is_tensor(self.std) else math.log(self.std)

    def entropy(self):
        """(T,) the learned std's Gaussian entropy at each glimpse, in nats, both axes summed:
        sum_axes (log_std + log(2 pi e) / 2). None where the std is not a weight (a constant
        entropy moves nothing) and once the policy is frozen (no noise)."""
        if self.log_std is None or not self.exploring:
            return None
        return (self._log_stds() + 0.5 * math.log(2 * math.pi * math.e)).sum(-1)  # (T,)

    def _log_stds(self):
        """(T, 2) the learned log std, clamped to [LOG_STD_MIN, LOG_STD_MAX]: the one place
        the bound is applied, for sampling, scoring, the entropy and the reports alike."""
        return self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def learned_stds(self):
        """(T, 2) the learned std of each glimpse and axis, as sampled with (--learn_std)."""
        return self._log_stds().detach().exp()

    def mean_std(self):
        """The std this policy samples with, averaged over glimpses and axes; 0 once frozen."""
        if not self.exploring:
            return 0.0
        return float(self.std if self.log_std is None else self.learned_stds().mean())


class FixedPolicy(nn.Module):
    """A policy that does not learn, for ablations: l_t = place(h, t, noise), log pi = 0, mu = l_t.

    A subclass says where glimpse t goes by defining `place(h, t, noise)` -> (B, 2) in
    [-1, 1]; it has no weights, so nothing to train and no gradient. Called like
    LocationNetwork, it returns (l, zeros (B,), l).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, h, t, noise=None):
        l = self.place(h, t, noise)  # (B, 2)
        return l, h.new_zeros(h.shape[0]), l

    def entropy(self):
        """None: no learned spread, so nothing for an entropy bonus to move."""
        return None

    def place(self, h, t, noise):
        raise NotImplementedError


class RandomPolicy(FixedPolicy):
    """Every glimpse uniform over [-1, 1]^2: l = 2 Phi(noise) - 1 when standard normal noise is
    given (Phi the normal CDF), a fresh uniform draw otherwise."""

    def place(self, h, t, noise):
        if noise is None:
            return torch.rand(h.shape[0], 2, device=h.device, dtype=h.dtype) * 2 - 1
        return (torch.special.ndtr(noise) * 2 - 1).to(h.dtype)


class CentrePolicy(FixedPolicy):
    """Every glimpse at the image's centre, l = (0, 0)."""

    def place(self, h, t, noise):
        return h.new_zeros(h.shape[0], 2)


def grid_side(num_glimpses):
    """Cells per side of the grid scan's raster: n = ceil(sqrt(T))."""
    return math.ceil(math.sqrt(num_glimpses))


def grid_locations(num_glimpses):
    """A raster of n x n cell centres, n = ceil(sqrt(T)), row by row from the top left, the
    first T of them: (T, 2) locations (x, y) in [-1, 1]."""
    n = grid_side(num_glimpses)
    centres = (2 * torch.arange(n, dtype=torch.float32) + 1) / n - 1  # (n,)
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")  # (n, n) each
    return torch.stack([xs.flatten(), ys.flatten()], -1)[:num_glimpses]  # (T, 2)


class GridPolicy(FixedPolicy):
    """A fixed scan that covers the image: a raster of n x n cell centres, n = ceil(sqrt(T)),
    row by row from the top left, glimpse t at the t-th. For 9 glimpses the centres are at
    -2/3, 0 and +2/3 on each axis, and their 12 px patches tile a 32 px image."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.register_buffer("grid", grid_locations(cfg.num_glimpses), persistent=False)

    def place(self, h, t, noise):
        return self.grid[t].to(h.dtype).expand(h.shape[0], 2)


class BaselineNetwork(nn.Module):
    """Value estimate used to reduce the variance of REINFORCE.

    shared:   b_t = w^T h_{t-1} + c      (one head for every step)
    per_step: b_t = w_t^T h_{t-1} + c_t  (a head per step: the returns of step 1 and step T
              differ in scale, which one head cannot tell apart from the state alone)
    On the detached state; trained by MSE to the return.

    Args of forward:
        h: (B, hidden_size) the state the location of glimpse t is chosen in.
        t: the glimpse's index, 0 for the first.
    Returns:
        b: (B,).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.per_step = cfg.baseline == "per_step"
        self.fc = nn.Linear(cfg.hidden_size, cfg.num_glimpses if self.per_step else 1)

    def forward(self, h, t):
        values = self.fc(h.detach())  # (B, T or 1)
        return values[:, t] if self.per_step else values.squeeze(-1)


class Classifier(nn.Module):
    """Class scores from the model's code of the image: log softmax(W standardise(c)).

    c is s_T = h_1 + ... + h_T by default (`probe_input=summed`): the decoder reads exactly
    that sum (x_hat_T = W s_T + T b), so it is what the model knows of the image; h_T alone
    (`last`) carries only the last increment.

    Under the unsupervised objective it is fed a detached state and is only a probe. Each
    feature is standardised over the batch (BatchNorm without learned scale, the usual linear
    probe): the reconstruction objective leaves h_T with features of very different and small
    spreads, which a plain linear layer learns from several times more slowly.

    Args of forward:
        h: (B, hidden_size); B > 1 in training mode.
    Returns:
        (B, num_classes) log-probabilities.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.BatchNorm1d(cfg.hidden_size, affine=False)
        self.fc = nn.Linear(cfg.hidden_size, cfg.num_classes)

    def forward(self, h):
        return F.log_softmax(self.fc(self.norm(h)), dim=-1)


class Projector(nn.Module):
    """The contrastive loss's head (SimCLR's): z = W_2 relu(BN(W_1 c)), read from the model's
    code c (the classifier's input, before the unsupervised objective detaches it), so that the
    loss shapes the code without asking it to be the space the views are compared in.

    Args of forward:
        c: (B, hidden_size); B > 1 in training mode.
    Returns:
        (B, contrast_dim).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False),
            nn.BatchNorm1d(cfg.hidden_size),
            nn.ReLU(),
            nn.Linear(cfg.hidden_size, cfg.contrast_dim),
        )

    def forward(self, c):
        return self.net(c)


class _SquaredNorms(torch.autograd.Function):
    """||W s||^2 for every row s of S (N, hidden), through the Gram matrix G = W^T W.

    Four products in all: G and S G forward; S^T diag(g) S and W times it backward, with
    dL/dS = 2 g (S G) read off the forward's S G because G is symmetric. Autograd, seeing
    W^T, W and G as unrelated operands, would pay two more (N x hidden x hidden and
    rows x hidden x hidden).
    """

    @staticmethod
    def forward(ctx, s, weight):
        sg = s @ (weight.t() @ weight)  # (N, hidden)
        ctx.save_for_backward(s, weight, sg)
        return (sg * s).sum(-1)

    @staticmethod
    def backward(ctx, grad):
        s, weight, sg = ctx.saved_tensors
        grad = grad.unsqueeze(-1)  # (N, 1)
        d_s = 2 * grad * sg if ctx.needs_input_grad[0] else None
        d_weight = weight @ (s.t() @ (2 * grad * s)) if ctx.needs_input_grad[1] else None
        return d_s, d_weight


class Decoder(nn.Module):
    """Autoencoder head: each state is decoded to an image increment.

    d_t = W h_t + b,   x_hat_t = sum_{tau <= t} d_tau = W s_t + t b,   s_t = h_1 + ... + h_t

    The decoder is linear, so training never needs the canvases x_hat_t: `errors` gets every
    step's squared error from hidden-wide vectors (the Gram form below). The canvases are
    built only where someone looks at them (`forward`, for the plots and the tests).

    Args of forward:
        h: (T, B, hidden_size) states of all steps.
        locations: (T, B, 2) where each glimpse was taken; unused here, taken so that every
            decoder is called alike (WritingDecoder needs them).
        last_only: the last canvas alone.
    Returns:
        x_hat: (T, B, C, H, W) cumulative predictions after each step; (1, B, C, H, W), x_hat_T,
            with `last_only`.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.shape = (cfg.num_channels, cfg.image_size, cfg.image_size)
        self.fc = nn.Linear(cfg.hidden_size, cfg.image_numel)

    @staticmethod
    def _summed(h, last_only=False):
        """The summed states s_t (T, B, hidden) and the number of steps t in each (T, 1, 1);
        the last step's alone, (1, B, hidden) and (1, 1, 1), with `last_only`. Summing the
        states instead of the images makes the cumulative sum and its backward 12 times
        smaller in the seed configuration."""
        T = h.shape[0]
        if last_only:
            return h.sum(0, keepdim=True), h.new_full((1, 1, 1), float(T))
        return h.cumsum(0), torch.arange(1, T + 1, device=h.device, dtype=h.dtype).view(T, 1, 1)

    def forward(self, h, locations=None, last_only=False):
        summed, t = self._summed(h, last_only)
        return self._read(summed, t).view(*summed.shape[:2], *self.shape)

    def _read(self, summed, t):
        """The flat canvases the summed states give: (T', B, hidden) -> (T', B, C*H*W)."""
        return F.linear(summed, self.fc.weight) + t * self.fc.bias

    def errors(self, h, x, last_only=False, locations=None):
        """Mean squared error of every step's prediction, without building the predictions.

        For each image x and step t, with u = W^T x:
            ||W s_t + t b - x||^2 = ||W s_t||^2 + 2t s_t.(W^T b) + t^2 ||b||^2
                                    - 2 s_t.u - 2t b.x + ||x||^2
        ||W s_t||^2 goes through the hidden x hidden Gram matrix W^T W, made once per batch
        (_SquaredNorms); u once per image (not once per path when several paths look at it);
        each step then costs hidden-wide products instead of a (hidden x C*H*W) one and a
        C*H*W-wide difference. Computed in float32 whatever the autocast: ||x||^2 is about 15
        times the error in the seed configuration, so the terms cancel and bf16 would lose the
        result.

        Args:
            h: (T, P*B, hidden_size) states of all steps of P paths over the B images, path p
                of image b in column p*B + b.
            x: (B, C, H, W) the images, in the units the decoder predicts.
            last_only: the error of the last step alone.
            locations: (T, P*B, 2) where each glimpse was taken; unused here.
        Returns:
            (T, P*B) mean over pixels of (x_hat_t - x)^2, differentiable in h, W and b;
            (1, P*B) with `last_only`.
        """
        with torch.autocast(h.device.type, enabled=False):
            summed, t = self._summed(h.float(), last_only)  # (T', P*B, hidden), (T', 1, 1)
            weight, bias = self.fc.weight.float(), self.fc.bias.float()
            flat = x.float().flatten(1)  # (B, CHW)
            T, B, hidden = summed.shape[0], flat.shape[0], summed.shape[-1]
            s = summed.view(T, -1, B, hidden)  # (T', P, B, hidden)
            squares = _SquaredNorms.apply(summed.view(-1, hidden), weight).view(T, -1, B)
            with_bias = s @ (weight.t() @ bias)  # s_t . W^T b, (T', P, B)
            with_image = (s * (flat @ weight)).sum(-1)  # s_t . u, (T', P, B)
            squared = (squares + 2 * t * with_bias + t**2 * bias.pow(2).sum()
                       - 2 * with_image - 2 * t * (flat @ bias) + flat.pow(2).sum(-1))
        # Rounding can leave a perfect prediction a hair below zero; an error is never negative.
        return (squared.clamp(min=0) / flat.shape[1]).flatten(1)  # (T', P*B)

    def direct_errors(self, h, x, last_only=False, locations=None):
        """The same errors as `errors`, from the built predictions x_hat_t.

        (T, P*B, C*H*W) canvases and their differences (one canvas per column with
        `last_only`): the path the non-linear decoders take (WritingDecoder,
        MLPDecoder), and the reference
        the tests hold the Gram form to.
        """
        with torch.autocast(h.device.type, enabled=False):
            recon = self(h.float(), locations, last_only)  # (T', P*B, C, H, W)
            target = x.float().repeat(h.shape[1] // x.shape[0], 1, 1, 1)  # (P*B, C, H, W)
            return (recon - target).pow(2).flatten(-3).mean(-1)

    def steps(self, h, locations=None):
        """The output d_t of each step alone: (T, B, hidden_size) -> (T, B, C, H, W)."""
        return self.fc(h).view(*h.shape[:2], *self.shape)


class WritingDecoder(Decoder):
    """A decoder that also writes where each glimpse was taken (`write=glimpse`).

    d_t = W h_t + b + R_{l_t}^T (V h_t),   x_hat_t = sum_{tau <= t} d_tau

    R_l is the retina at l, a linear map from the image to the glimpse's k x C x g x g values,
    and R_l^T its adjoint: each value of V h_t is spread evenly over the pixels its pooled cell
    averaged (zero where the cell lies outside the image). A glimpse's detail can so be put
    back exactly where it was seen, wherever that was; the linear decoder W h_t can only put it
    where glimpses usually are, which is what a policy that moves glimpses between images costs
    it. The prediction is no longer linear in the summed states, so there is no Gram form:
    `errors` builds the T canvases (`direct_errors`), in float32; evaluation, which asks for
    the last step's error alone, gets one canvas per column.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.cfg = cfg
        self.fc_write = nn.Linear(cfg.hidden_size, cfg.glimpse_numel)
        self.pad = sensor_pad(cfg)
        self.side = cfg.image_size + 2 * self.pad + 1  # of the difference array below
        cell = torch.tensor([float(cfg.glimpse_scale**i) for i in range(cfg.num_patches)])
        self.register_buffer("inv_area", (1.0 / cell**2).view(1, -1, 1), persistent=False)
        self.register_buffer("cell", cell.long().view(1, -1, 1), persistent=False)  # (1, k, 1)
        self.register_buffer("starts", cell_starts(cfg), persistent=False)  # (S + 1, k, g)
        # Row r of `fill` sums the difference array's rows up to the image's row r: a
        # cumulative sum and the crop to the image in one product (faster than cumsum here).
        fill = torch.tril(torch.ones(self.side, self.side))[self.pad:self.pad + cfg.image_size]
        self.register_buffer("fill", fill, persistent=False)  # (H, side)

    def _corners(self, centre):
        """Where the pooled cells of glimpses centred on `centre` (..., 2) pixels begin and end:
        flat positions in a (C, side, side) difference array of the padded image, (..., 4,
        k*C*g*g) for the top-left, top-right, bottom-left and bottom-right corners. The boxes
        are the retina's (cell_starts): one wholly outside the image lies in the padding, which
        is cut off."""
        cfg, side = self.cfg, self.side
        ys, xs = self.starts[centre[..., 1]], self.starts[centre[..., 0]]  # (..., k, g) each
        channel = (torch.arange(cfg.num_channels, device=centre.device) * side**2).view(
            -1, 1, 1)  # (C, 1, 1)

        def flat(rows, cols):  # (..., k, g) each -> (..., k*C*g*g)
            return (channel + rows[..., None, :, None] * side
                    + cols[..., None, None, :]).flatten(-4)

        bottom, right = ys + self.cell, xs + self.cell
        return torch.stack([flat(ys, xs), flat(ys, right), flat(bottom, xs),
                            flat(bottom, right)], -2)

    def written(self, h, locations, summed=False):
        """R_{l_t}^T (V h_t) for every step and column: (T, N, hidden), (T, N, 2) ->
        (T, N, C, H, W); with `summed`, their sum over the steps, (1, N, C, H, W).

        The retina's value of a cell is the mean of the f x f padded pixels it pooled, so the
        adjoint adds value / f^2 to each of them. That is done for all cells at once with a
        difference array: +v at the box's top-left and bottom-right corners, -v at the other
        two, then a cumulative sum down and one across fill every box. Summed, every step's
        cells go into their column's one array, so only one canvas per column is built. With
        location_grad=pathwise the retina reads between pixels, a bilinear mix of 4 glimpses,
        and the write is that mix's adjoint: the 4 glimpses' cells, each value weighted, and
        differentiable in the location through the weights."""
        cfg, side, size = self.cfg, self.side, self.cfg.image_size
        T, N, _ = h.shape
        values = (self.fc_write(h).view(T * N, cfg.num_patches, -1) * self.inv_area).flatten(1)
        signed = torch.stack([values, -values, -values, values], 1)  # (T*N, 4, k*C*g*g)
        flat = locations.flatten(0, 1)  # (T*N, 2)
        if cfg.location_grad == "pathwise":
            centres, weights = pixel_neighbours(flat, size)  # (T*N, 4, 2), (T*N, 4)
            signed = weights.to(values.dtype)[:, :, None, None] * signed.unsqueeze(1)
        else:
            centres = location_to_pixels(flat.detach(), size).unsqueeze(1)  # (T*N, 1, 2)
        corners = self._corners(centres)  # (T*N, 1 or 4, 4, k*C*g*g)
        signed, corners = signed.view(T, N, -1), corners.view(T, N, -1)  # matched, (T, N, ...)
        if summed:
            signed, corners = (a.transpose(0, 1).reshape(1, N, -1) for a in (signed, corners))
        spread = values.new_zeros(len(signed) * N, cfg.num_channels * side**2).scatter_add(
            1, corners.flatten(0, 1), signed.flatten(0, 1))
        canvas = self.fill @ spread.view(-1, cfg.num_channels, side, side) @ self.fill.T
        return canvas.view(len(signed), N, cfg.num_channels, size, size)

    def steps(self, h, locations=None):
        return super().steps(h) + self.written(h, locations)

    def forward(self, h, locations=None, last_only=False):
        written = self.written(h, locations, summed=last_only)
        return super().forward(h, last_only=last_only) + (
            written if last_only else written.cumsum(0))

    def errors(self, h, x, last_only=False, locations=None):
        return self.direct_errors(h, x, last_only, locations)


class MLPDecoder(Decoder):
    """The linear decoder plus a non-linear read of the same code (`--decoder_hidden=N`).

    x_hat_t = W s_t + t b + V relu(U s_t + c),   s_t = h_1 + ... + h_t

    Each step's increment is x_hat_t - x_hat_{t-1}, so the prediction is still their cumulative
    sum, and s_T is still the code every canvas is read from; but the code no longer has to be
    a linear image of the reconstruction: with the linear decoder, s_T = W^+ (x_hat_T - T b),
    so any linear probe of s_T is one of the canvas (at the limit of a perfect reconstruction
    for its width, of the pixels' principal components). V starts at zero: the model starts as the
    linear one. There is no Gram form: `errors` builds the T canvases (`direct_errors`), and
    a training image costs several times the linear decoder's arithmetic.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.fc_hidden = nn.Linear(cfg.hidden_size, cfg.decoder_hidden)
        self.fc_out = nn.Linear(cfg.decoder_hidden, cfg.image_numel, bias=False)
        nn.init.zeros_(self.fc_out.weight)

    def _read(self, summed, t):
        return super()._read(summed, t) + self.fc_out(F.relu(self.fc_hidden(summed)))

    def errors(self, h, x, last_only=False, locations=None):
        return self.direct_errors(h, x, last_only, locations)

    def steps(self, h, locations=None):
        canvases = self(h)  # x_hat_0 = 0: no glimpse, no prediction
        return torch.cat([canvases[:1], canvases.diff(dim=0)])


# --policy: the module that places the glimpses. A new fixed policy is a FixedPolicy subclass
# with its `place`, and one entry here.
POLICIES = {"learned": LocationNetwork, "random": RandomPolicy, "centre": CentrePolicy,
            "grid": GridPolicy}

# --core: the recurrence that integrates the glimpses.
CORES = {"rnn": CoreNetwork, "lstm": LSTMCore, "gru": GRUCore}
