"""The recurrent attention model with an autoencoder head, its rollout and its losses."""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules import (
    CORES,
    POLICIES,
    BaselineNetwork,
    Classifier,
    Decoder,
    GlimpseNetwork,
    MLPDecoder,
    ModelConfig,
    Projector,
    Retina,
    WritingDecoder,
    location_to_pixels,
)


@dataclass
class Rollout:
    """Everything one pass of T glimpses over a batch produced. Shapes use T steps, B images.

    locations: (T, B, 2) where glimpse t was taken, the first glimpse first.
    loc_means: (T, B, 2) where the policy aimed (its mean; the location itself when not learned).
    log_pi: (T, B) log-probability of each location under the policy (zeros if not learned).
    baselines: (T, B) value estimate made before each glimpse was chosen.
    log_probs: (B, num_classes) class log-probabilities from the model's code of the image.
    code: (B, hidden_size) that code, what the classifier reads (`probe_input`); detached
        under `unsupervised`.
    errors: (T, B) mean squared error of the reconstruction after each step, in [0, 1] pixel
        units, differentiable; (1, B), the last step's alone, when only the end is asked for;
        None without a decoder (pure RAM), and so are decoded and recon.
    blank_errors: (B,) the error before any glimpse, of the empty prediction x_hat_0 = 0.
    decoded: (T, B, C, H, W) decoder output of each step (None unless asked for, with patches).
    recon: (T, B, C, H, W) cumulative reconstruction after each step, in [0, 1] pixel units;
        built only with the patches (for the plots), None otherwise.
    patches: (T, B, k, C, g, g) the normalised patches the sensor delivered, or None.
    entropy: (T,) the policy's entropy at each glimpse (nats) where its std is a weight
        (--learn_std) and it explores; None otherwise, and when the rollout follows a given path.
    projection: (B, contrast_dim) the Projector's output from the code, not detached, in
        training mode with --contrast_dim; None otherwise.
    """

    locations: torch.Tensor
    loc_means: torch.Tensor
    log_pi: torch.Tensor
    baselines: torch.Tensor
    log_probs: torch.Tensor
    code: torch.Tensor
    errors: torch.Tensor | None
    blank_errors: torch.Tensor
    decoded: torch.Tensor | None
    recon: torch.Tensor | None
    patches: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    projection: torch.Tensor | None = None


DECODES = ("every", "last", "plots")  # what the rollout decodes: see RecurrentAttention.forward


class RecurrentAttention(nn.Module):
    """RAM (Mnih et al., 2014) with a decoder that rebuilds the image from the glimpses.

    For t = 1..T:  l_t ~ pi(. | h_{t-1}, t),  h_t = core(glimpse(retina(x, l_t), l_t), h_{t-1}),
    x_hat_t = sum_{tau <= t} decoder(h_tau).  h_0 = 0, so the learned policy places the first
    glimpse too. pi is the `locator`, the module POLICIES names for cfg.policy; the core is the
    one CORES names for cfg.core (an LSTM core also carries its memory cell c_t, c_0 = 0, from
    step to step inside the rollout; nothing else sees it).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.retina = Retina(cfg)
        self.glimpse = GlimpseNetwork(cfg)
        self.core = CORES[cfg.core](cfg)
        self.locator = POLICIES[cfg.policy](cfg)
        self.baseline = BaselineNetwork(cfg)
        self.classifier = Classifier(cfg)
        decoder = (WritingDecoder if cfg.write == "glimpse"
                   else MLPDecoder if cfg.decoder_hidden is not None else Decoder)
        self.decoder = decoder(cfg) if cfg.decoder else None  # pure RAM has none
        self.projector = None if cfg.contrast_dim is None else Projector(cfg)
        shape = (1, cfg.num_channels, 1, 1)
        # The dataset's pixel statistics, (1, C, 1, 1); not cfg.std, the policy's spread.
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(shape),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(shape),
                             persistent=False)

    def normalize(self, x):
        return (x - self.pixel_mean) / self.pixel_std

    def unnormalize(self, x):
        return x * self.pixel_std + self.pixel_mean

    def _place(self, h, t, noise, path):
        """Glimpse t's location, log-probability and aim: the policy's, or path[t]: one
        location for all (2,), or one per column (paths*B, 2)."""
        if path is None:
            return self.locator(h, t, None if noise is None else noise[t])
        l = path[t].to(h.dtype).expand(h.shape[0], 2)  # (paths*B, 2)
        return l, h.new_zeros(h.shape[0]), l

    def _code(self, states, paths):
        """The code the classifier reads from the states (T, N, hidden): s_T or h_T (N, hidden),
        detached under `unsupervised`, where the classifier is a probe; and the Projector's
        output from it, not detached, in training mode with --contrast_dim and one path per
        image, the batch's views side by side (else None)."""
        code = states.sum(0) if self.cfg.probe_input == "summed" else states[-1]  # (N, hidden)
        # The contrastive loss is a training loss: evaluation leaves the head out.
        contrast = self.projector is not None and self.training and paths == 1
        projection = self.projector(code) if contrast else None  # (N, contrast_dim)
        return code if self.cfg.objective == "supervised" else code.detach(), projection

    def forward(self, x, decode="every", noise=None, paths=1, path=None):
        """Roll out all glimpses over a batch.

        Args:
            x: (B, C, H, W) images in [0, 1].
            decode: "every": the reconstruction error of every step (training); "last": that of
                the last step alone (evaluation); neither builds an image. "plots": every
                step's error, and the patches, each step's decoder output and the cumulative
                reconstructions.
            noise: (T, paths*B, 2) standard normal draws for the policy, or None to draw
                afresh. Evaluation passes noise fixed per image, so its figures do not depend
                on batching, on the number of processes, or on the training's random stream.
            paths: glimpse paths per image (RAM's Monte Carlo test). Path p of image b is
                column p*B + b of every output; the sensor's and the decoder's per-image work
                is done once per image, not once per path.
            path: (T, 2) locations that every image is glimpsed at instead of where the policy
                would look, or (T, paths*B, 2), a path per column (the adaptivity test), or
                None.
            A model without a decoder (pure RAM) decodes nothing whatever `decode` says.

        Returns:
            A `Rollout` over paths*B columns.
        """
        cfg = self.cfg
        if decode not in DECODES:
            raise ValueError(f"decode must be one of {', '.join(DECODES)}, got {decode!r}")
        prepared = self.retina.prepare(self.normalize(x))  # once per batch, reused every step
        # The state h and the LSTM core's memory cell c (the other cores hand it back untouched).
        h = c = x.new_zeros(paths * x.shape[0], cfg.hidden_size)  # (paths*B, hidden) each
        states, locations, means, log_pis, baselines, patches = [], [], [], [], [], []
        for t in range(cfg.num_glimpses):
            l, log_pi, mu = self._place(h, t, noise, path)
            baselines.append(self.baseline(h, t))  # value of the state the choice was made in
            phi = self.retina(prepared, l)  # (paths*B, k, C, g, g)
            h, c = self.core(self.glimpse(phi, l), h, c)  # (paths*B, hidden) each
            states.append(h)
            locations.append(l)
            means.append(mu)
            log_pis.append(log_pi)
            if decode == "plots":
                patches.append(phi)
        states, locations = torch.stack(states), torch.stack(locations)  # (T, paths*B, ...)
        code, projection = self._code(states, paths)
        # No canvas for the linear decoder (Gram form); the writing and MLP ones build them.
        errors = None if self.decoder is None else self.decoder.errors(
            states, x, last_only=decode == "last", locations=locations)
        canvases = decode == "plots" and self.decoder is not None
        return Rollout(
            locations=locations,
            loc_means=torch.stack(means),
            log_pi=torch.stack(log_pis),
            baselines=torch.stack(baselines),
            log_probs=self.classifier(code),
            code=code,
            errors=errors,
            blank_errors=x.pow(2).flatten(1).mean(-1).repeat(paths),  # (paths*B,)
            decoded=self.decoder.steps(states, locations) if canvases else None,
            recon=self.decoder(states, locations) if canvases else None,
            patches=torch.stack(patches) if patches else None,  # taken for the plots only
            entropy=self.locator.entropy() if path is None else None,
            projection=projection,
        )


class Steered(nn.Module):
    """A trained model whose glimpses go where the adaptivity test puts them: every image to the
    same fixed `path` (T, 2), or, with None, each image to where the policy aims (its mean,
    without the exploration noise). Called like the model."""

    def __init__(self, model, path=None):
        super().__init__()
        self.model, self.cfg, self.path = model, model.cfg, path

    def forward(self, x, decode="every", noise=None, paths=1):
        if self.path is None and noise is not None:
            noise = torch.zeros_like(noise)
        return self.model(x, decode=decode, noise=noise, paths=paths, path=self.path)


class Swapped(nn.Module):
    """The adaptivity test's control: each image of a batch glimpsed along the path the policy
    aims at on the previous image of the batch (the first along the last's), without
    exploration noise; a batch of one image keeps its own. A path that suits its own image
    better than another's fits it; but a model trained on its exact paths may also lose on any
    path moved off them, so the control alone does not prove the fit is to the content.
    The pairing follows the batches: under torchrun each process pairs within its own share,
    so the figures depend on the batch size and the process count (the mean-path test's do
    not). Neighbouring images share a path, so the standard error that paired_difference
    gives, which treats images as independent, may be somewhat too small for this control.
    Called like the model, one path per image."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg = model, model.cfg

    def forward(self, x, decode="every", noise=None, paths=1):
        if paths != 1:
            raise ValueError(f"Swapped runs one path per image, got paths={paths}")
        zero = None if noise is None else torch.zeros_like(noise)
        aims = self.model(x, decode="last", noise=zero).loc_means  # (T, B, 2)
        return self.model(x, decode=decode, path=aims.roll(1, dims=1))


@dataclass(frozen=True)
class LossWeights:
    """Weights of the terms of the training loss (flags of the same names)."""

    recon_weight: float = 1.0
    classify_weight: float = 1.0
    reinforce_weight: float = 1.0
    baseline_weight: float = 1.0
    entropy_weight: float = 0.0
    contrast_weight: float = 1.0

    def __post_init__(self):
        for name, value in vars(self).items():
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"--{name} must be a finite number of at least 0, got {value}")


ADVANTAGE_EPS = 1e-6


def contrastive_loss(z, temperature):
    """NT-Xent, SimCLR's loss (Chen et al., 2020): each view must pick out the other view of its
    image among all 2B - 1 other views of the batch (of this process: under torchrun the
    negatives are not gathered across processes).

    Args:
        z: (2B, d) projections; rows b and b + B are the two views of image b.
        temperature: the softmax's temperature over cosine similarities.
    Returns:
        The mean over the 2B views of -log softmax_j(cos(z_i, z_j) / temperature) at j = the
        other view, the softmax over every j != i.
    """
    n = z.shape[0]
    if n % 2:
        raise ValueError(f"the contrastive loss needs two views of each image, got {n} rows")
    with torch.autocast(z.device.type, enabled=False):  # --amp: cosines to float32's precision
        z = F.normalize(z.float(), dim=1)
        similarity = z @ z.T / temperature  # (2B, 2B)
    itself = torch.eye(n, dtype=torch.bool, device=z.device)
    similarity = similarity.masked_fill(itself, float("-inf"))
    other_view = torch.arange(n, device=z.device).roll(n // 2)  # (2B,): b <-> b + B
    return F.cross_entropy(similarity, other_view)


def compute_losses(out: Rollout, y, cfg: ModelConfig, weights: LossWeights):
    """All terms of the training loss, and their weighted sum under `total`.

    recon: mean over steps and images of the MSE between x_hat_t and x (the rollout's
        `errors`); it trains the retina's consumers, core and decoder under both objectives.
        0 without a decoder (pure RAM).
    classify: NLL of the labels. Under `unsupervised` the classifier reads a detached state,
        so this trains the probe alone; under `supervised` it trains the whole network.
    reinforce: -sum_t log pi(l_t) * A_t with A_t = G_t - b_t, standardised over the batch.
        Returns under `unsupervised`, with e_t the error after glimpse t (e_0 before any):
        `reward=sum` pays each glimpse -e_t and G_t sums the rewards from step t on;
        `reward=gain` pays each location what its glimpse added, G_t = e_{t-1} - e_t, and
        nothing for later steps (their gains are paid to their own locations);
        `reward=final` pays every location -e_T, the error of the last step alone (the figure
        the test's PSNR reports; `sum` also pays for the early steps' errors). Under
        `supervised` the reward is 1 for a correct final classification, so G_t is 1 or 0.
    baseline: MSE between b_t and G_t.
    entropy: the policy's entropy summed over the T glimpses, where its std is learned (0
        otherwise); the total subtracts `entropy_weight` times it, a bonus for exploring.
    contrast: `contrastive_loss` of the two views of each image (--contrast_dim; the rollout's
        columns b and b + B), 0 without a projection. No label enters it.
    """
    losses = {"recon": out.log_pi.new_zeros(()) if out.errors is None else out.errors.mean(),
              "classify": F.nll_loss(out.log_probs, y)}
    if cfg.objective == "supervised":
        correct = (out.log_probs.detach().argmax(-1) == y).to(out.baselines.dtype)  # (B,)
        returns = correct.expand_as(out.baselines)  # (T, B)
    elif cfg.reward == "gain":
        errors = out.errors.detach()  # (T, B); the rewards need no gradient
        before = torch.cat([out.blank_errors.unsqueeze(0), errors[:-1]])  # (T, B): e_{t-1}
        returns = before - errors  # (T, B)
    elif cfg.reward == "final":
        returns = (-out.errors[-1].detach()).expand_as(out.baselines)  # (T, B)
    else:
        returns = (-out.errors.detach()).flip(0).cumsum(0).flip(0)  # (T, B) reward-to-go
    advantage = returns - out.baselines.detach()  # (T, B)
    if advantage.shape[1] > 1:
        # Centre and scale each step's advantages over the batch: the baseline is poor early
        # in training, and this keeps the policy's step size independent of the reward's units
        # (MSE in the one objective, 0/1 in the other).
        advantage = (advantage - advantage.mean(1, keepdim=True)) / (
            advantage.std(1, keepdim=True) + ADVANTAGE_EPS)
    losses["reinforce"] = -(out.log_pi * advantage).sum(0).mean()
    losses["baseline"] = F.mse_loss(out.baselines, returns)
    losses["entropy"] = out.log_pi.new_zeros(()) if out.entropy is None else out.entropy.sum()
    losses["contrast"] = (out.log_pi.new_zeros(()) if out.projection is None
                          else contrastive_loss(out.projection, cfg.temperature))
    losses["total"] = (
        weights.recon_weight * losses["recon"]
        + weights.classify_weight * losses["classify"]
        + weights.reinforce_weight * losses["reinforce"]
        + weights.baseline_weight * losses["baseline"]
        - weights.entropy_weight * losses["entropy"]
        + weights.contrast_weight * losses["contrast"]
    )
    return losses


def distinct_glimpses(locations, cfg: ModelConfig):
    """How many glimpses of each episode look somewhere new.

    A glimpse counts when its centre (the pixel the sensor used) is at least g/2 pixels from
    the centre of every earlier glimpse of the episode; the first always counts.

    Args:
        locations: (T, B, 2) the glimpses taken, in [-1, 1].
    Returns:
        (B,) long, between 1 and T.
    """
    centres = location_to_pixels(locations, cfg.image_size).float()  # (T, B, 2)
    apart = (centres.unsqueeze(1) - centres.unsqueeze(0)).norm(dim=-1)  # (T, T, B): [t, s]
    T = centres.shape[0]
    earlier = torch.ones(T, T, dtype=torch.bool, device=centres.device).tril(-1)  # s < t
    repeats = ((apart < cfg.patch_size / 2) & earlier.unsqueeze(-1)).any(1)  # (T, B)
    return (~repeats).sum(0)


def glimpse_hits(locations, boxes, image_size):
    """Which glimpses looked at the object: their centre (the pixel the sensor used) inside the
    object's box.

    Args:
        locations: (T, B, 2) the glimpses taken, (x, y) in [-1, 1].
        boxes: (B, 4) each image's box (x0, y0, x1, y1) in pixels, x1 and y1 exclusive.
    Returns:
        (T, B) bool.
    """
    centres = location_to_pixels(locations, image_size)  # (T, B, 2)
    boxes = boxes.to(centres.device)
    low, high = boxes[:, :2], boxes[:, 2:]  # (B, 2) each
    return ((centres >= low) & (centres < high)).all(-1)


def psnr(mse, peak=1.0):
    """Peak signal-to-noise ratio in dB of a mean squared error, for pixels in [0, peak]."""
    return 10.0 * math.log10(peak**2 / max(mse, 1e-12))
