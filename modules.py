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


@dataclass(frozen=True)
class ModelConfig:
    """Every hyper-parameter of the model, checked once when built.

    Defaults are the seed configuration: 9 glimpses of 3 patches (6, 12 and 24 px,
    each pooled to 6x6) on 32x32 RGB images.
    """

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
    policy: str = "learned"
    objective: str = "unsupervised"
    pixel_mean: tuple = CIFAR10_MEAN
    pixel_std: tuple = CIFAR10_STD

    def __post_init__(self):
        for name in ("image_size", "num_channels", "num_classes", "patch_size", "glimpse_scale",
                     "num_patches", "glimpse_hidden", "loc_hidden", "hidden_size", "num_glimpses"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name} must be a whole number of at least 1, got {value!r}")
        if not self.std > 0:
            raise ValueError(f"--std must be greater than 0, got {self.std}")
        if self.policy not in POLICIES:
            raise ValueError(f"--policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not len(self.pixel_mean) == len(self.pixel_std) == self.num_channels:
            raise ValueError(f"pixel_mean and pixel_std need {self.num_channels} values each")
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.num_patches > 1 and self.glimpse_scale < 2:
            raise ValueError("--glimpse_scale must be at least 2 when --num_patches > 1 "
                             "(scale 1 would take the same patch several times)")
        if self.largest_patch > 4 * self.image_size:
            raise ValueError(
                f"the largest patch is {self.largest_patch} px (patch_size * glimpse_scale ** "
                f"(num_patches - 1)), more than 4x the {self.image_size} px image: "
                "lower --patch_size, --glimpse_scale or --num_patches")

    @property
    def patch_sizes(self):
        """Side of each patch before pooling: g, g*s, g*s^2, ..."""
        return [self.patch_size * self.glimpse_scale**i for i in range(self.num_patches)]

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


class Retina(nn.Module):
    """Glimpse sensor: k square patches of sides g*s^i around `l`, each average-pooled to g x g.

    phi(x, l) = [pool_{s^i}(crop_{g s^i}(x, l))]_{i < k}, zero outside the image.

    The image does not change between glimpses, so `prepare` does the pooling once per batch:
    it zero-pads the image and sums it over every s^i x s^i box at stride 1, for every scale.
    Every pooled patch value is then one such sum over the box's area, and `forward` is a
    single gather per glimpse (and a scaling of the few values it gathered). This gives the
    same numbers as cropping and pooling each patch, which the tests check against a direct
    crop.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # A patch of side S centred on any pixel in [0, image_size] starts at least S // 2
        # before the image and ends at most S - S // 2 after it.
        self.pad = cfg.largest_patch - cfg.largest_patch // 2
        s, g = cfg.glimpse_scale, cfg.patch_size
        # Side of each scale's filtered image: an f-box at stride 1 loses f - 1 pixels, and
        # scale i + 1's box is s boxes of scale i, f_i pixels apart.
        self.sides = [cfg.image_size + 2 * self.pad]
        for i in range(1, cfg.num_patches):
            self.sides.append(self.sides[-1] - (s - 1) * s ** (i - 1))
        self.offsets = [sum(side**2 for side in self.sides[:i]) for i in range(cfg.num_patches)]
        # Where pooled cell (a, b) of patch i sits in `prepare`'s output when the glimpse is
        # centred on pixel (0, 0); a glimpse centred on (cx, cy) adds cy * side_i + cx.
        side = torch.tensor(self.sides).view(-1, 1, 1)  # (k, 1, 1)
        corner = torch.tensor([[[self.pad - size // 2]] for size in cfg.patch_sizes])  # (k,1,1)
        steps = torch.stack([torch.arange(g) * s**i for i in range(cfg.num_patches)])  # (k, g)
        rows = corner + steps.unsqueeze(-1)  # (k, g, 1)
        cols = corner + steps.unsqueeze(-2)  # (k, 1, g)
        base = torch.tensor(self.offsets).view(-1, 1, 1) + rows * side + cols  # (k, g, g)
        self.register_buffer("base_index", base, persistent=False)
        area = torch.tensor([float(s ** (2 * i)) for i in range(cfg.num_patches)])
        self.register_buffer("inv_area", (1.0 / area).view(1, 1, -1, 1, 1),
                             persistent=False)  # (1, 1, k, 1, 1): box sum -> mean
        self.register_buffer("side", side, persistent=False)

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
        flat = x.new_empty(B, C, self.offsets[-1] + self.sides[-1] ** 2)  # (B, C, L)
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
        """Take one glimpse per image.

        Args:
            prepared: (B, C, L) output of `prepare`.
            l: (B, 2) locations in [-1, 1].

        Returns:
            (B, k, C, g, g) pooled patches.
        """
        cfg = self.cfg
        B, C, _ = prepared.shape
        k, g = cfg.num_patches, cfg.patch_size
        centre = location_to_pixels(l, cfg.image_size).view(B, 2, 1, 1, 1)  # (B, (x, y), 1, 1, 1)
        index = self.base_index + centre[:, 1] * self.side + centre[:, 0]  # (B, k, g, g)
        index = index.view(B, 1, k * g * g).expand(B, C, k * g * g)
        phi = prepared.gather(2, index).view(B, C, k, g, g) * self.inv_area  # box sums -> means
        return phi.transpose(1, 2)  # (B, k, C, g, g)


class GlimpseNetwork(nn.Module):
    """Combine "what" (the patches) and "where" (the location) into one feature vector.

    g_t = relu(W_what relu(W_phi phi_t) + W_where relu(W_l l_t))

    Args of forward:
        phi: (B, k, C, g, g) patches from the retina.
        l: (B, 2) the location they were taken at.
    Returns:
        g_t: (B, hidden_size).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc_phi = nn.Linear(cfg.glimpse_numel, cfg.glimpse_hidden)
        self.fc_l = nn.Linear(2, cfg.loc_hidden)
        self.fc_what = nn.Linear(cfg.glimpse_hidden, cfg.hidden_size)
        self.fc_where = nn.Linear(cfg.loc_hidden, cfg.hidden_size)

    def forward(self, phi, l):
        what = self.fc_what(F.relu(self.fc_phi(phi.flatten(1))))  # (B, hidden)
        where = self.fc_where(F.relu(self.fc_l(l)))  # (B, hidden)
        return F.relu(what + where)


class CoreNetwork(nn.Module):
    """Elman RNN that integrates the glimpses.

    h_t = relu(W_g g_t + W_h h_{t-1})

    Args of forward:
        g_t: (B, hidden_size) glimpse feature.
        h_prev: (B, hidden_size) previous state.
    Returns:
        h_t: (B, hidden_size).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.i2h = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.h2h = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, g_t, h_prev):
        return F.relu(self.i2h(g_t) + self.h2h(h_prev))


class LocationNetwork(nn.Module):
    """The learned policy: Gaussian over the next location, with a fixed standard deviation.

    mu = tanh(W_2 relu(W_1 h_t)),   l ~ N(mu, std^2 I),   l_used = clamp(l, -1, 1)

    The state is detached, so the policy learns only through the REINFORCE term and never
    pushes gradient into the core. The sample is detached: it is an action, not a function
    of the weights. The log-probability is that of the raw sample; the clamp is treated as part
    of the environment, which keeps the score-function estimate unbiased.

    Every policy in POLICIES is called alike. Args of forward:
        h: (B, hidden_size) state the choice is made in.
        t: index of the glimpse being placed, 0 for the first (unused here).
        noise: (B, 2) standard normal draws to use instead of fresh ones, or None.
    Returns:
        l: (B, 2) detached location in [-1, 1].
        log_pi: (B,) log-probability of the sample under the policy.
        mu: (B, 2) detached mean of the policy.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.std = cfg.std
        width = max(1, cfg.hidden_size // 2)
        self.fc = nn.Linear(cfg.hidden_size, width)
        self.fc_mu = nn.Linear(width, 2)

    def forward(self, h, t, noise=None):
        mu = torch.tanh(self.fc_mu(F.relu(self.fc(h.detach()))))  # (B, 2)
        noise = torch.randn_like(mu) if noise is None else noise.to(mu.dtype)
        sample = (mu + self.std * noise).detach()  # (B, 2)
        # log N(sample; mu, std^2) per axis, summed; written out rather than through
        # torch.distributions, whose argument checks would raise on NaN instead of letting
        # the trainer's finite-loss guard report where it happened.
        log_pi = (-0.5 * ((sample - mu) / self.std) ** 2
                  - math.log(self.std) - 0.5 * math.log(2 * math.pi)).sum(-1)  # (B,)
        return sample.clamp(-1.0, 1.0), log_pi, mu.detach()


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


class BaselineNetwork(nn.Module):
    """Value estimate used to reduce the variance of REINFORCE.

    b_t = W h_t  (on the detached state; trained by MSE to the return)

    Args of forward:
        h: (..., hidden_size).
    Returns:
        b: (...,).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.hidden_size, 1)

    def forward(self, h):
        return self.fc(h.detach()).squeeze(-1)


class Classifier(nn.Module):
    """Class scores from the final state: log softmax(W standardise(h_T)).

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


class Decoder(nn.Module):
    """Autoencoder head: each state is decoded to an image increment.

    d_t = W h_t + b,   x_hat_t = sum_{tau <= t} d_tau = W (sum_{tau <= t} h_tau) + t b

    Args of forward:
        h: (T, B, hidden_size) states of all steps.
    Returns:
        x_hat: (T, B, C, H, W) cumulative predictions after each step.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.shape = (cfg.num_channels, cfg.image_size, cfg.image_size)
        self.fc = nn.Linear(cfg.hidden_size, cfg.image_numel)

    def forward(self, h):
        T, B, _ = h.shape
        # Summing the states (T, B, hidden) instead of the images (T, B, C*H*W) makes the
        # cumulative sum and its backward 12x smaller in the seed configuration. The bias enters
        # t times: append t to each summed state and b to W, so one matrix product does it all.
        summed = h.cumsum(0)  # (T, B, hidden)
        t = torch.arange(1, T + 1, dtype=h.dtype, device=h.device).view(T, 1, 1).expand(T, B, 1)
        weight = torch.cat([self.fc.weight, self.fc.bias.unsqueeze(1)], 1)  # (CHW, hidden + 1)
        out = F.linear(torch.cat([summed, t], -1), weight)  # (T, B, C*H*W)
        return out.view(T, B, *self.shape)

    def steps(self, h):
        """The output d_t of each step alone: (T, B, hidden_size) -> (T, B, C, H, W)."""
        return self.fc(h).view(*h.shape[:2], *self.shape)

    def final(self, h):
        """The last cumulative prediction alone: sum_t (W h_t + b) = W sum_t h_t + T b.

        One (B, hidden) x (hidden, C*H*W) product instead of T of them.

        Args:
            h: (T, B, hidden_size).
        Returns:
            (1, B, C, H, W).
        """
        out = F.linear(h.sum(0), self.fc.weight, self.fc.bias * h.shape[0])  # (B, C*H*W)
        return out.view(1, h.shape[1], *self.shape)


# --policy: the module that places the glimpses. A new fixed policy is a FixedPolicy subclass
# with its `place`, and one entry here.
POLICIES = {"learned": LocationNetwork, "random": RandomPolicy, "centre": CentrePolicy}
