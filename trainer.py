"""Training, evaluation and checkpoints. The maths lives in model.py; this file conducts."""

import json
import math
import os
import sys
import time
from dataclasses import asdict, fields, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from checkpoints import (
    CKPT_SUFFIX,
    epochs_on_disk,
    link_or_copy,
    load_checkpoint,
    load_weights,
    rng_state,
    set_rng_state,
    to_bytes,
)
from config import TrainConfig, model_name
from data_loader import to_float
from model import (
    LossWeights,
    RecurrentAttention,
    Steered,
    Swapped,
    compute_losses,
    distinct_glimpses,
    glimpse_hits,
    psnr,
)
from modules import ModelConfig, policy_std
from utils import (
    SINGLE_PROCESS,
    UserError,
    WriteError,
    all_reduce,
    atomic_write,
    autocast,
    compile_model,
    linear_evaluation,
    on_main,
    progress,
    remove_temporaries,
    seed_everything,
)

# What a checkpoint written before a ModelConfig field existed did instead (the probe read h_T).
OLDER_MODEL_CONFIG = {"reward": "sum", "baseline": "shared", "probe_input": "last",
                      "policy_input": "state", "dataset": "cifar10", "decoder": True,
                      "core": "rnn", "glimpse_encoder": "linear", "std_final": None,
                      "policy_epochs": None, "write": "none", "decoder_hidden": None,
                      "location_grad": "none", "learn_std": False, "contrast_dim": None,
                      "temperature": 0.5}
# What a run written before a TrainConfig field existed did: the plateau schedule, no augmentation,
# one learning rate for every weight.
OLDER_TRAIN_CONFIG = {"schedule": "plateau", "augment": False, "policy_lr": None}
# What a run written before a loss weight existed did: no entropy bonus (and no contrastive
# loss, whose weight does nothing without --contrast_dim).
OLDER_LOSS_WEIGHTS = {"entropy_weight": 0.0, "contrast_weight": 1.0}
METRICS_NAME = "metrics.jsonl"  # one JSON line per epoch in the run's checkpoint folder
NOISE_STRIDE = 1_000_003  # a prime above any split size: (seed, image) pairs never collide
LOSS_TERMS = ("recon", "classify", "reinforce", "baseline", "entropy", "contrast",
              "total")  # compute_losses' keys

# How a resumed run treats a flag that differs from its checkpoint's run: a refused change is
# an error (why, below); any other is applied from now on, with a note (what it does, below).
REFUSED_ON_RESUME = {
    "random_seed": "it fixes the run's data order, training canvases and evaluation noise",
    "valid_size": "it would change the validation images and move some into training",
    "schedule": "the checkpoint holds the state of the run's own schedule",
    "policy_lr": "the checkpoint's optimizer holds the run's own learning-rate groups",
}
APPLIED_ON_RESUME = {
    "init_lr": "the learning rate restarts at it, and the policy's at --policy_lr where "
               "that is given (with --schedule=cosine: the cosine is rescaled to start from "
               "it, from the epoch reached on)",
    "epochs": "training goes on to it (with --schedule=cosine: on the cosine that ends there, "
              "from the epoch reached on; with --std_final, the policy's anneal ends there too)",
    "lr_patience": "the epochs without improvement counted so far still count",
    "batch_size": "the epoch in progress goes on from its first image not yet trained on",
}
NOT_COMPARED = ("resume", "is_train", "best", "model_epoch")  # choose what to do, not how


class NonFiniteLossError(Exception):
    """The loss or the weights became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(Exception):
    """A stop was asked for (SIGINT, SIGTERM); `path` holds a checkpoint to resume from, taken
    after `images` images of epoch `epoch` (0: at the end of that epoch)."""

    def __init__(self, path, epoch, images):
        super().__init__(path)
        self.path, self.epoch, self.images = path, epoch, images


def make_optimizer(model, lr, device, policy_lr=None):
    """Adam; the fused kernel where the device has one (one pass over each group). With
    `policy_lr` the location network's weights form a second group at that rate (where the
    policy has weights: the fixed policies have none)."""
    fused = device.type in ("cpu", "cuda")
    policy = list(model.locator.parameters()) if policy_lr is not None else []
    if not policy:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=fused)
    chosen = {id(p) for p in policy}
    rest = [p for p in model.parameters() if id(p) not in chosen]
    return torch.optim.Adam([{"params": rest}, {"params": policy, "lr": policy_lr}], lr=lr,
                            fused=fused)


def start_lrs(optimizer, train_cfg):
    """The rate each of `make_optimizer`'s groups starts at: --init_lr, then --policy_lr."""
    return [train_cfg.init_lr, train_cfg.policy_lr][:len(optimizer.param_groups)]


def cosine_factor(epoch, epochs):
    """The fraction of --init_lr that --schedule=cosine trains epoch `epoch` + 1 of `epochs`
    at: (1 + cos(pi epoch / epochs)) / 2, 1 for the first epoch, 0 once the last is done."""
    return (1 + math.cos(math.pi * epoch / epochs)) / 2


def make_scheduler(optimizer, train_cfg: TrainConfig):
    """The --schedule, stepped once after each epoch's validation (Trainer.validate).

    plateau: ReduceLROnPlateau on the validation score, the learning rate cut by 10x after
    --lr_patience epochs without a better one. cosine: lr = init_lr * cosine_factor(e, epochs)
    after e epochs, whatever the score.
    """
    if train_cfg.schedule == "cosine":
        epochs = train_cfg.epochs  # this run's: a resume with a new --epochs follows the new cosine
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: cosine_factor(e, epochs))
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=0.1, patience=train_cfg.lr_patience)


class EpochTally:
    """An epoch's sums of the losses (each times its batch size) and of correct answers.

    They stay on the device: `running` reads them every --print_freq steps for the progress
    bar, `metrics` once at the end. Batches count views: with `views` of each image
    (--contrast_dim), images per second is views per second over `views`.
    """

    def __init__(self, views=1):
        self.sums, self.correct, self.seen = dict.fromkeys(LOSS_TERMS, 0.0), 0, 0
        self.views = views

    def add(self, losses, correct, batch):
        for name in LOSS_TERMS:
            self.sums[name] = self.sums[name] + losses[name] * batch
        self.correct = self.correct + correct
        self.seen += batch

    def running(self):
        return {"loss": f"{float(self.sums['total']) / self.seen:.3f}",
                "acc": f"{100 * float(self.correct) / self.seen:.1f}%"}

    def metrics(self, procs, elapsed):
        """Mean losses, accuracy and images per second over every process's steps."""
        totals = all_reduce(torch.tensor([float(self.sums[n]) for n in LOSS_TERMS]
                                         + [float(self.correct), self.seen],
                                         dtype=torch.float64), procs).tolist()
        seen = max(totals[-1], 1)  # a resumed epoch may have had no step left
        metrics = {f"train_{name}": value / seen
                   for name, value in zip(LOSS_TERMS, totals, strict=False)}
        metrics["train_acc"] = 100.0 * totals[-2] / seen
        metrics["train_images_per_s"] = seen / self.views / elapsed
        return metrics


class EvaluationNoise:
    """Policy noise fixed per image: path m of image i is the m-th (T, 2) standard normal draw
    of a generator seeded by `seed` and i (its position in the split).

    So an image gets the same M paths whatever batch, process or chunk of paths evaluates it,
    and evaluation leaves the training's random stream alone.
    """

    def __init__(self, positions, num_glimpses, seed):
        self.num_glimpses = num_glimpses
        self.generators = [torch.Generator().manual_seed(seed * NOISE_STRIDE + int(i))
                           for i in positions]

    def draw(self, paths):
        """The next `paths` paths of every image: (T, paths*B, 2), path m of image b at
        column m*B + b."""
        draws = [torch.stack([torch.randn(self.num_glimpses, 2, generator=g)
                              for g in self.generators], 1)  # (T, B, 2)
                 for _ in range(paths)]
        return torch.cat(draws, 1)  # (T, paths*B, 2)


def evaluate_batch(model, x, positions, train_cfg: TrainConfig):
    """The --M glimpse paths of every image of a batch, at most --eval_chunk images per pass.

    Returns the class probabilities (B, classes) and the error of the final reconstruction
    (B,; NaN without a decoder), each averaged over the paths in float64, path after path, so
    that neither depends on how the paths are chunked; aims (T, B, 2), where the policy aimed
    on each image's first path; and glimpses (T, B, 2), where that path's glimpses went.
    """
    B, M = x.shape[0], train_cfg.M
    noise = EvaluationNoise(positions, model.cfg.num_glimpses, train_cfg.random_seed)
    per_pass = max(1, train_cfg.eval_chunk // B)
    probs = errors = aims = glimpses = None
    for first in range(0, M, per_pass):
        paths = min(per_pass, M - first)
        with autocast(x.device, train_cfg.amp):
            out = model(x, decode="last", noise=noise.draw(paths).to(x.device),
                        paths=paths)  # (paths*B, ...)
        chunk_probs = out.log_probs.float().exp().view(paths, B, -1).double()  # (paths, B, K)
        chunk_errors = out.errors[-1].view(paths, B).double() if out.errors is not None \
            else chunk_probs.new_full((paths, B), math.nan)  # (paths, B)
        for m in range(paths):
            probs = chunk_probs[m] if probs is None else probs + chunk_probs[m]
            errors = chunk_errors[m] if errors is None else errors + chunk_errors[m]
        if aims is None:
            aims, glimpses = out.loc_means[:, :B], out.locations[:, :B]  # (T, B, 2) each
    return probs / M, errors / M, aims, glimpses


@torch.no_grad()
def evaluate(model, loader, train_cfg: TrainConfig, device, procs=SINGLE_PROCESS):
    """Accuracy, reconstruction MSE and PSNR over `loader`, with --M sampled glimpse paths each.

    The class probabilities of the M paths are averaged before the argmax (as in RAM); the
    reconstruction error is the mean over paths of the error after the last glimpse, so it is
    the error of one real path, not of an average of paths. Under torchrun each process takes
    its share of the images and the sums are added up, so every process returns the figures of
    the whole split.
    Where the policy aims (its mean, without the exploration noise) on each image's first
    path: loc_mean and loc_std, (T, 2) lists, the mean and std across images per glimpse and
    axis; loc_spread, loc_std averaged: 0 means every image gets the same path, uniform random
    locations give about 0.58. distinct: the mean number of glimpses per episode (first path)
    whose centre is at least g/2 px from every earlier one's. Where the dataset knows each
    image's object box (translated and cluttered digits): hit_rate, a (T,) list, the percentage
    of first-path glimpses whose centre fell inside it, glimpse by glimpse; any_hit, the
    percentage of episodes with at least one such glimpse.
    """
    model.eval()
    T = model.cfg.num_glimpses
    # correct, summed squared error, images, distinct glimpses; the aims' sums and sums of
    # squares, (T, 2) each; hits per glimpse (T,); episodes with a hit
    sums = torch.zeros(5 + 5 * T, dtype=torch.float64)
    boxed = False
    for images, labels, positions in loader:
        x, y = to_float(images, device), labels.to(device, non_blocking=True)
        probs, errors, aims, glimpses = evaluate_batch(model, x, positions, train_cfg)
        distinct = distinct_glimpses(glimpses, model.cfg)  # (B,)
        boxes = loader.dataset.boxes(positions)  # (B, 4) or None
        hits = torch.zeros(T, 1, dtype=torch.bool) if boxes is None else \
            glimpse_hits(glimpses, boxes, model.cfg.image_size).cpu()  # (T, B)
        boxed = boxes is not None
        aims = aims.double().cpu()  # (T, B, 2)
        counts = torch.tensor([float((probs.argmax(-1) == y).sum()), float(errors.sum()),
                               len(y), float(distinct.sum())], dtype=torch.float64)
        sums += torch.cat([counts, aims.sum(1).flatten(), aims.pow(2).sum(1).flatten(),
                           hits.sum(1), hits.any(0).sum().view(1)])
    return _summary(all_reduce(sums, procs), T, boxed)


def _summary(totals, T, boxed):
    """evaluate's figures from its sums over the split."""
    correct, sq_err, seen, distinct = totals[:4].tolist()
    aim_mean = totals[4:4 + 2 * T].view(T, 2) / seen
    aim_std = (totals[4 + 2 * T:4 + 4 * T].view(T, 2) / seen - aim_mean.pow(2)).clamp_(min=0).sqrt()
    mse = sq_err / seen
    summary = {"acc": 100.0 * correct / seen, "mse": mse, "psnr": psnr(mse),
               "loc_spread": aim_std.mean().item(), "distinct": distinct / seen,
               "loc_mean": aim_mean.tolist(), "loc_std": aim_std.tolist()}
    if boxed:
        summary["hit_rate"] = (100.0 * totals[4 + 4 * T:4 + 5 * T] / seen).tolist()
        summary["any_hit"] = 100.0 * totals[-1].item() / seen
    return summary


@torch.no_grad()
def paired_difference(pair, loader, train_cfg: TrainConfig, device, procs=SINGLE_PROCESS):
    """Every image of `loader` through the two models of `pair` (--M paths each, drawn as
    evaluate draws them): how much better the first does, with one standard error over the
    images. Both figures come from the same images, so the error is that of the paired
    difference, far smaller than either model's spread from image to image.

    Returns the second model's acc, mse and psnr, and the first's gains over it: acc_gain
    (points) and acc_se; psnr_gain (dB) = 10 log10(mse_2 / mse_1) and psnr_se, by the delta
    method: the standard error of the mean over images of e2_i / mse_2 - e1_i / mse_1, e_i
    being image i's mean squared error, times 10 / ln 10 (NaN without a decoder).
    """
    first, second = pair
    first.eval()
    second.eval()
    # images, correct (second), sum and sum of squares of correct_1 - correct_2; the squared
    # errors' sums e1, e2, their squares' and their products'
    sums = torch.zeros(9, dtype=torch.float64)
    for images, labels, positions in loader:
        x, y = to_float(images, device), labels.to(device, non_blocking=True)
        probs_1, e1, _, _ = evaluate_batch(first, x, positions, train_cfg)
        probs_2, e2, _, _ = evaluate_batch(second, x, positions, train_cfg)
        c2 = (probs_2.argmax(-1) == y).double()
        d = (probs_1.argmax(-1) == y).double() - c2  # (B,)
        sums += torch.stack([torch.tensor(float(len(y)), dtype=torch.float64, device=d.device),
                             c2.sum(), d.sum(), d.pow(2).sum(), e1.sum(), e2.sum(),
                             e1.pow(2).sum(), e2.pow(2).sum(), (e1 * e2).sum()]).cpu()
    return _paired_summary(all_reduce(sums, procs))


def _paired_summary(totals):
    """paired_difference's figures from its sums over the split."""
    n, c2, d, d2, e1, e2, e1_sq, e2_sq, e12 = totals.tolist()
    dof = max(n - 1, 1)
    m1, m2 = e1 / n, e2 / n
    # Var(e2_i / m2 - e1_i / m1); its mean is 0 by construction
    var_u = e2_sq / n / m2**2 + e1_sq / n / m1**2 - 2 * e12 / n / (m1 * m2)
    return {"acc": 100.0 * c2 / n, "mse": m2, "psnr": psnr(m2),
            "acc_gain": 100.0 * d / n,
            "acc_se": 100.0 * math.sqrt(max(d2 / n - (d / n) ** 2, 0.0) / dof),
            "psnr_gain": psnr(m1) - psnr(m2),
            "psnr_se": 10.0 / math.log(10.0) * math.sqrt(max(var_u, 0.0) / dof)}


@torch.no_grad()
def encode(model, loader, train_cfg: TrainConfig, device):
    """The frozen features that --linear_eval_features names, of every image of `loader`, from
    one glimpse path with the evaluation noise, and the labels: (N, D) and (N,) on the CPU.
    code: what the probe reads (D = hidden); glimpses: the glimpse network's outputs g_1..g_T,
    and states: the core's h_1..h_T, side by side in glimpse order (D = T * hidden)."""
    model.eval()
    steps = []  # one (B, hidden) tensor per glimpse, caught on its way out of `watched`
    watched = {"glimpses": model.glimpse, "states": model.core}.get(
        train_cfg.linear_eval_features)
    hook = None if watched is None else watched.register_forward_hook(
        lambda module, args, out: steps.append(out[0] if isinstance(out, tuple) else out))
    features, labels = [], []
    try:
        for images, y, positions in loader:
            noise = EvaluationNoise(positions, model.cfg.num_glimpses, train_cfg.random_seed)
            steps.clear()
            with autocast(device, train_cfg.amp):
                out = model(to_float(images, device), decode="last",
                            noise=noise.draw(1).to(device))
            chosen = out.code if watched is None else torch.cat(steps, -1)  # (B, D)
            features.append(chosen.float().cpu())
            labels.append(y)
    finally:
        if hook is not None:
            hook.remove()
    return torch.cat(features), torch.cat(labels)


def resume_changes(ckpt, train_cfg: TrainConfig, weights: LossWeights):
    """(flag, the run's value, the new value) for every flag that differs from the run's."""
    run = {**OLDER_TRAIN_CONFIG, **ckpt["train_config"]}
    changes = [(f.name, run.get(f.name), getattr(train_cfg, f.name))
               for f in fields(train_cfg) if f.name not in NOT_COMPARED]
    run_weights = {**OLDER_LOSS_WEIGHTS, **ckpt["loss_weights"]}
    changes += [(name, run_weights.get(name), value) for name, value in asdict(weights).items()]
    return [(name, old, new) for name, old, new in changes if old != new]


class Trainer:
    """Trains, validates, tests and checkpoints one model.

    Args:
        cfg: the model's configuration.
        weights: loss weights.
        train_cfg: the training, data and output options.
        device: where the model runs.
        procs: this process's place in a torchrun job; only rank 0 writes files.
    Outputs go to <ckpt_dir>/<name>/ and so on, `name` given by config.model_name.
    """

    def __init__(self, cfg: ModelConfig, weights: LossWeights, train_cfg: TrainConfig, device,
                 procs=SINGLE_PROCESS):
        self.cfg, self.weights, self.train_cfg = cfg, weights, train_cfg
        self.device, self.procs = device, procs
        self.name = model_name(cfg)
        self.ckpt_folder = os.path.join(train_cfg.ckpt_dir, self.name)
        self.model = RecurrentAttention(cfg).to(device)
        # What the loops call; checkpoints always hold the plain module's weights, so they
        # load alike with or without torchrun.
        wrapped = self.model
        if procs.distributed:
            # Once --policy_epochs freezes the policy its weights get no gradient, which DDP
            # must be told to look for, or its reduction never completes.
            wrapped = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=cfg.policy_epochs is not None)
        self.step_model = compile_model(wrapped, device) if train_cfg.compile else wrapped
        # Evaluation needs no gradient exchange: each process runs its share on the module.
        self.eval_model = compile_model(self.model, device) if train_cfg.compile else self.model
        self.optimizer = make_optimizer(self.model, train_cfg.init_lr, device, train_cfg.policy_lr)
        self.scheduler = make_scheduler(self.optimizer, train_cfg)
        self.epoch = 0
        self.best_score = -math.inf
        self.epochs_since_best = 0

    # ---------------------------------------------------------------- checkpoints

    def gathered_rng(self):
        """Every process's random streams, rank by rank (a collective under torchrun)."""
        state = rng_state()
        if not self.procs.distributed:
            return [state]
        states = [None] * self.procs.world_size
        dist.all_gather_object(states, state)
        return states

    def state(self, rng, loader_state):
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "best_score": self.best_score,
            "epochs_since_best": self.epochs_since_best,
            "model_config": asdict(self.cfg),
            "loss_weights": asdict(self.weights),
            "train_config": asdict(self.train_cfg),
            "loader": loader_state,
            "rng": rng,
        }

    def _write_on_main(self, write):
        """Rank 0 alone writes, into the run folder; if it fails, every process raises
        WriteError."""
        def in_folder():
            os.makedirs(self.ckpt_folder, exist_ok=True)
            write()
        on_main(self.procs, in_folder, WriteError, f"rank 0 could not write to {self.ckpt_folder}")

    def save(self, is_best, loader_state):
        """Write latest.pth atomically, then point epoch_N.pth (every --ckpt_freq, whole epochs
        only) and best.pth at the same bytes. A crash at any moment leaves each file either old
        or new, whole; a failed write (a full disk) raises WriteError and leaves the files as
        they were. Weights that are not finite are never written. Every process calls it; rank
        0 alone writes. Returns the path of latest.pth."""
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise NonFiniteLossError(f"the weights became NaN or infinite in epoch "
                                     f"{self.epoch + (loader_state['images_seen'] > 0)}; "
                                     "not saved")
        latest = os.path.join(self.ckpt_folder, "latest" + CKPT_SUFFIX)
        state = self.state(self.gathered_rng(), loader_state)
        whole_epoch = loader_state["images_seen"] == 0

        def write():
            data = to_bytes(state)
            atomic_write(latest, lambda f: f.write(data))
            if whole_epoch and self.epoch % self.train_cfg.ckpt_freq == 0:
                link_or_copy(latest, os.path.join(self.ckpt_folder,
                                                  f"epoch_{self.epoch}{CKPT_SUFFIX}"))
            if is_best:
                link_or_copy(latest, os.path.join(self.ckpt_folder, "best" + CKPT_SUFFIX))

        self._write_on_main(write)
        return latest

    def save_config(self):
        text = json.dumps({"model_config": asdict(self.cfg), "loss_weights": asdict(self.weights),
                           "train_config": asdict(self.train_cfg)}, indent=2, sort_keys=True)
        path = os.path.join(self.ckpt_folder, "config.json")
        self._write_on_main(lambda: atomic_write(path, lambda f: f.write(text.encode())))

    def claim_folder(self):
        """Before training, holding the folder's RunLock: a new run refuses to overwrite the
        checkpoints of another, and what writes killed mid-way left behind is removed."""
        if not self.train_cfg.resume and os.path.exists(
                os.path.join(self.ckpt_folder, "latest" + CKPT_SUFFIX)):
            raise UserError(f"{self.ckpt_folder} already holds a run's checkpoints; continue "
                            "it with --resume=True, or start a new run elsewhere (another "
                            "--ckpt_dir, or remove that folder first)")
        if self.procs.is_main:
            remove_temporaries(self.ckpt_folder)

    def checkpoint_path(self, model_epoch=None, best=True):
        if model_epoch is not None:
            path = os.path.join(self.ckpt_folder, f"epoch_{model_epoch}{CKPT_SUFFIX}")
            if not os.path.isfile(path):
                found = epochs_on_disk(self.ckpt_folder)
                listed = ", ".join(map(str, found)) if found else "none"
                raise UserError(f"no checkpoint for epoch {model_epoch} in {self.ckpt_folder} "
                                f"(epochs saved: {listed}); pass one of those to --model_epoch")
            return path
        path = os.path.join(self.ckpt_folder, ("best" if best else "latest") + CKPT_SUFFIX)
        if not os.path.isfile(path):
            raise UserError(f"no checkpoint at {path}; train first (python3 main.py) or check "
                            "--ckpt_dir and the model flags")
        return path

    def load(self, path):
        """Load the weights and epoch of the checkpoint at `path`; returns the checkpoint."""
        ckpt = load_checkpoint(path)
        saved = {k: tuple(v) if isinstance(v, list) else v
                 for k, v in {**OLDER_MODEL_CONFIG, **ckpt["model_config"]}.items()}
        differing = [f"{k}: checkpoint {saved.get(k)!r}, flags {v!r}"
                     for k, v in asdict(self.cfg).items() if saved.get(k) != v]
        if differing:
            raise UserError(f"{path} was trained with another model configuration "
                            f"({'; '.join(differing)}); pass the same flags")
        load_weights(self.model, ckpt["model"], path)
        self.epoch = ckpt["epoch"]
        return ckpt

    def resume(self, path, train_loader):
        """Load the whole training state from `path`, the train loader's position included.
        Flags that differ from the run's are refused or applied, one line each (see
        REFUSED_ON_RESUME); returns the loader's position."""
        ckpt = self.load(path)
        if not {"train_config", "loader", "best_score"} <= ckpt.keys():
            raise UserError(f"{path} was written by an older version of this project: it can be "
                            "tested (--is_train=false) but not resumed; start a new run")
        changes = resume_changes(ckpt, self.train_cfg, self.weights)
        self._refuse(path, changes)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self._apply(changes)
        self.best_score = ckpt["best_score"]
        self.epochs_since_best = ckpt["epochs_since_best"]
        train_loader.load_state_dict(ckpt["loader"])
        self._restore_rng(path, ckpt["rng"])
        return ckpt["loader"]

    def _refuse(self, path, changes):
        for name, old, new in changes:
            if name in REFUSED_ON_RESUME:
                given = f"leaving --{name} out" if new is None else f"--{name}={new}"
                had = f"the run in {path}, which had none" if old is None else \
                    f"the {old} of the run in {path}"
                keep = f"leave --{name} out" if old is None else f"pass --{name}={old}"
                raise UserError(f"{given} differs from {had}, "
                                f"and {REFUSED_ON_RESUME[name]}; {keep} to resume, "
                                "or start a new run")
        if self.epoch >= self.train_cfg.epochs:
            raise UserError(f"{path} has trained {self.epoch} epochs already and --epochs="
                            f"{self.train_cfg.epochs}; pass a larger --epochs to train on")

    def _apply(self, changes):
        """Make the optimizer and scheduler follow the new flags; say what changed."""
        plateau = self.train_cfg.schedule == "plateau"
        for name, old, new in changes:
            if name == "lr_patience" and not plateau:
                continue  # ignored under cosine, and ignored_flags has said so
            if name == "init_lr" and plateau:
                for group, lr in zip(self.optimizer.param_groups,
                                     start_lrs(self.optimizer, self.train_cfg), strict=True):
                    group["lr"] = lr
            elif name == "lr_patience":
                self.scheduler.patience = new
            print_main(self.procs, f"note: --{name}={new} (the run had {old}) is applied; "
                       + APPLIED_ON_RESUME.get(name, "it holds from now on"))
        if not plateau:
            self._follow_cosine()

    def _follow_cosine(self):
        """Put the learning rate on the cosine of this run's --init_lr and --epochs at the epoch
        reached: where the checkpoint left it, unless one of those flags changed."""
        self.scheduler.base_lrs = start_lrs(self.optimizer, self.train_cfg)
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = lr * cosine_factor(self.epoch, self.train_cfg.epochs)

    def _restore_rng(self, path, states):
        if len(states) == self.procs.world_size:
            set_rng_state(states[self.procs.rank])
            return
        # Saved by another number of processes: new streams, still from the seed.
        seed_everything(self.train_cfg.random_seed + self.procs.rank + 7919 * self.epoch)
        print_main(self.procs, f"note: {path} was saved by {len(states)} process(es), this run "
                   f"has {self.procs.world_size}; random streams restart from the seed")

    def _share_buffers(self):
        """Give every process rank 0's buffers (BatchNorm statistics) before evaluating: DDP
        broadcasts them before each training step, so after the last one they differ."""
        if self.procs.distributed:
            for buffer in self.model.buffers():
                dist.broadcast(buffer, 0)

    # ---------------------------------------------------------------- loops

    def _step(self, images, labels, step, should_stop):
        """One optimizer step on a batch. Returns its detached losses, its correct answers and
        whether to stop after it (every process agrees)."""
        x, y = to_float(images, self.device), labels.to(self.device, non_blocking=True)
        with autocast(self.device, self.train_cfg.amp):
            out = self.step_model(x)
            losses = compute_losses(out, y, self.cfg, self.weights)
        # The one read of a device value per step, on purpose: a NaN must stop the run before
        # the optimizer writes it into the weights, and report the step where it appeared.
        flags = torch.tensor([float(not torch.isfinite(losses["total"])), float(should_stop())],
                             dtype=torch.float64)
        bad, stop = all_reduce(flags, self.procs, dist.ReduceOp.MAX).tolist()
        if bad:
            raise NonFiniteLossError(f"the loss became {losses['total'].item()} at epoch "
                                     f"{self.epoch + 1}, step {step}; lower --init_lr or check "
                                     "the data")
        self.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        self.optimizer.step()
        correct = (out.log_probs.argmax(-1) == y).sum()
        return {name: value.detach() for name, value in losses.items()}, correct, bool(stop)

    def train_epoch(self, train_loader, should_stop):
        """Train on the current epoch of `train_loader`, from where its state says, to its end
        or until `should_stop()` turns true. Returns the metrics of the steps taken (over every
        process) and whether a stop ended them."""
        self.model.train()
        self._follow_policy_schedule()
        tally, stopped, start = EpochTally(self.cfg.views), False, time.perf_counter()
        bar = progress(train_loader.epoch(self.epoch), self.procs, desc=f"epoch {self.epoch + 1}",
                       unit="batch", leave=False)
        for step, (images, labels, _) in enumerate(bar, start=1):
            losses, correct, stopped = self._step(images, labels, step, should_stop)
            tally.add(losses, correct, labels.shape[0])
            if step % self.train_cfg.print_freq == 0:
                bar.set_postfix(tally.running())
            if stopped:
                break
        bar.close()
        return tally.metrics(self.procs, time.perf_counter() - start), stopped

    def _follow_policy_schedule(self):
        """Put the policy where this epoch has it: with --std_final, its standard deviation
        (modules.policy_std); with --policy_epochs, learning or frozen on its aimed path. Also
        right after a resume, and on a resume's new --epochs."""
        locator = self.model.locator
        if self.cfg.std_final is not None:
            locator.std.fill_(policy_std(self.cfg, self.epoch, self.train_cfg.epochs))
        if self.cfg.policy_epochs is not None:
            locator.exploring.fill_(self.epoch < self.cfg.policy_epochs)

    @property
    def selection(self):
        """The validation figure that picks best.pth and drives the schedule and early
        stopping: the reconstruction's PSNR under `unsupervised`, so that no label touches the
        model or its choice; the accuracy under `supervised`."""
        return "psnr" if self.cfg.objective == "unsupervised" else "acc"

    def validate(self, valid_loader, metrics):
        """Evaluate after an epoch and count it for the scheduler and early stopping. Returns
        whether it is the best epoch so far, and `metrics` with the validation figures."""
        self._share_buffers()
        valid = evaluate(self.eval_model, valid_loader, self.train_cfg, self.device, self.procs)
        metrics = {**metrics, **{f"valid_{k}": v for k, v in valid.items()
                                 if not isinstance(v, list)}}
        if "hit_rate" in valid:  # over every glimpse
            metrics["valid_hit_rate"] = sum(valid["hit_rate"]) / len(valid["hit_rate"])
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        if len(self.optimizer.param_groups) > 1:
            metrics["policy_lr"] = self.optimizer.param_groups[1]["lr"]
        if self.cfg.policy == "learned":  # what this epoch explored with; 0 once frozen
            metrics["policy_std"] = self.model.locator.mean_std()
        score = valid[self.selection]
        if self.train_cfg.schedule == "plateau":
            self.scheduler.step(score)
        else:
            self.scheduler.step()
        is_best = score > self.best_score
        if is_best:
            self.best_score, self.epochs_since_best = score, 0
        else:
            self.epochs_since_best += 1
        return is_best, metrics

    def _patience_ran_out(self):
        if self.epochs_since_best < self.train_cfg.train_patience:
            return False
        print_main(self.procs, f"stopping early: no better validation {self.selection} in "
                   f"{self.train_cfg.train_patience} epochs")
        return True

    def fit(self, train_loader, valid_loader, writer=None, on_epoch_end=None, should_stop=None):
        """Train until --epochs or until --train_patience epochs bring no better accuracy.

        `should_stop()` is asked after every step: when it turns true, a checkpoint of the state
        right then is written (inside an epoch, if need be) and TrainingInterrupted is raised.
        """
        should_stop = should_stop or (lambda: False)
        self.save_config()
        while self.epoch < self.train_cfg.epochs and not self._patience_ran_out():
            start = time.perf_counter()
            metrics, stopped = self.train_epoch(train_loader, should_stop)
            position = train_loader.state_dict()
            if stopped and position["epoch"] == self.epoch:  # inside the epoch
                raise TrainingInterrupted(self.save(False, position), self.epoch + 1,
                                          position["images_seen"])
            self.epoch += 1
            is_best, metrics = self.validate(valid_loader, metrics)
            path = self.save(is_best, position)
            if on_epoch_end is not None and self.procs.is_main:
                on_epoch_end(self)
            metrics["epoch_s"] = time.perf_counter() - start
            self.report(metrics, is_best, writer)
            if should_stop():
                raise TrainingInterrupted(path, self.epoch, 0)

    def report(self, metrics, is_best, writer):
        """The epoch's line on stdout and in <ckpt folder>/metrics.jsonl (what
        `plot_glimpses.py --metrics` draws), its scalars in TensorBoard when `writer` is given."""
        print_main(self.procs, format_epoch(self.epoch, self.train_cfg.epochs, metrics, is_best))
        if self.procs.is_main:
            line = json.dumps({"epoch": self.epoch, "best": is_best, **metrics})
            try:
                with open(os.path.join(self.ckpt_folder, METRICS_NAME), "a") as f:
                    f.write(line + "\n")
            except OSError as e:
                print(f"warning: could not append to {METRICS_NAME} ({e.strerror}); training "
                      "goes on", file=sys.stderr)
        if writer is not None:
            for key, value in metrics.items():
                writer.add_scalar(key, value, self.epoch)
            writer.flush()

    def test(self, test_loader):
        return evaluate(self.eval_model, test_loader, self.train_cfg, self.device, self.procs)

    def adaptivity(self, loader):
        """What content-driven attention buys: the figures of one path per image, each image
        glimpsed where the policy aims on it (no exploration noise), and the same with every
        image glimpsed along the mean of those paths, and, as the control, along another
        image's own path (Swapped). Returns (own, mean, swapped): evaluate's dict of the own
        paths, and paired_difference's of the other two, each with the own paths' gains over
        it and their standard errors."""
        one_path = replace(self.train_cfg, M=1)
        own = evaluate(Steered(self.model), loader, one_path, self.device, self.procs)
        mean_path = torch.tensor(own["loc_mean"], device=self.device)  # (T, 2)
        mean, swapped = (paired_difference((Steered(self.model), other), loader, one_path,
                                           self.device, self.procs)
                         for other in (Steered(self.model, mean_path), Swapped(self.model)))
        return own, mean, swapped

    def linear_evaluation(self, loaders):
        """Offline linear evaluation: a logistic regression on the frozen features
        (--linear_eval_features) of the (train, valid, test) loaders' images; see
        utils.linear_evaluation."""
        codes = [encode(self.model, loader, self.train_cfg, self.device) for loader in loaders]
        return linear_evaluation(*codes, num_classes=self.cfg.num_classes)


def print_main(procs, text):
    """Print on rank 0 only, so a torchrun job logs each line once."""
    if procs.is_main:
        print(text, flush=True)


def format_epoch(epoch, epochs, m, is_best):
    """The one summary line printed per epoch."""
    return (f"epoch {epoch}/{epochs} | loss {m['train_total']:.4f} (recon {m['train_recon']:.4f}"
            f" classify {m['train_classify']:.3f} reinforce {m['train_reinforce']:.3f}"
            f" baseline {m['train_baseline']:.4f}"
            + (f" contrast {m['train_contrast']:.3f}" if m.get("train_contrast") else "")
            + f") | train acc {m['train_acc']:.2f}%"
            f" | valid acc {m['valid_acc']:.2f}% mse {m['valid_mse']:.4f}"
            f" psnr {m['valid_psnr']:.2f} dB | {m['train_images_per_s']:.0f} img/s"
            f" | {m['epoch_s']:.1f} s | lr {m['lr']:.1e}" + (" | best" if is_best else ""))
