"""Training, evaluation and checkpoints. The maths lives in model.py; this file conducts."""

import json
import math
import os
import pickle
import random
import time
import zipfile
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data_loader import set_epoch, to_float
from model import LossWeights, RecurrentAttention, compute_losses, psnr, reconstruction_errors
from modules import ModelConfig
from utils import SINGLE_PROCESS, UserError, all_reduce, atomic_write, autocast, seed_everything

CKPT_SUFFIX = ".pth"
NOISE_STRIDE = 1_000_003  # a prime above any split size: (seed, image) pairs never collide


class NonFiniteLossError(Exception):
    """The loss or the weights became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(Exception):
    """A stop was asked for (SIGINT, SIGTERM); `path` holds a checkpoint to resume from."""

    def __init__(self, path, epoch, step):
        super().__init__(path)
        self.path, self.epoch, self.step = path, epoch, step


def make_optimizer(model, lr, device):
    """Adam; the fused kernel where the device has one (one pass over all parameters)."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=device.type in ("cpu", "cuda"))


def train_epoch(model, loader, optimizer, objective, weights, device, epoch, print_freq=10,
                amp=False, skip=0, should_stop=None, procs=SINGLE_PROCESS):
    """One pass over `loader`. Returns the epoch's mean losses, accuracy and images per second
    (summed over all processes), and `stopped_at`: the batches done if `should_stop()` ended
    the epoch early.

    `model` may be the compiled or DistributedDataParallel module; it is called, never saved,
    here. The first `skip` batches are passed over (resuming inside an epoch). The sums stay on
    the device and are read once per `print_freq` batches; the finite-loss check below is the
    step's one read of a device value.
    Under torchrun the processes agree after every step on whether to stop and on whether every
    loss is finite, so that they stop together instead of waiting on each other for ever.
    """
    model.train()
    sums, correct, seen, stopped_at = {}, 0, 0, None
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False,
               disable=not procs.is_main)
    for step, (images, labels, _) in enumerate(bar, start=1):
        if step <= skip:
            continue
        x, y = to_float(images, device), labels.to(device, non_blocking=True)
        with autocast(device, amp):
            out = model(x)
            losses = compute_losses(out, x, y, objective, weights)
        stop = should_stop is not None and should_stop() and step < len(loader)
        # The one read of a device value per step, on purpose: a NaN must stop the run before
        # the optimizer writes it into the weights, and report the step where it appeared.
        flags = torch.tensor([float(not torch.isfinite(losses["total"])), float(stop)],
                             dtype=torch.float64)
        bad, stop = all_reduce(flags, procs, dist.ReduceOp.MAX).tolist()
        if bad:
            raise NonFiniteLossError(f"the loss became {losses['total'].item()} at epoch "
                                     f"{epoch}, step {step}; lower --init_lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        batch = y.shape[0]
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + value.detach() * batch
        correct = correct + (out.log_probs.argmax(-1) == y).sum()
        seen += batch
        if step % print_freq == 0:
            bar.set_postfix(loss=f"{sums['total'].item() / seen:.3f}",
                            acc=f"{100 * correct.item() / seen:.1f}%")
        if stop:
            stopped_at = step
            break
    bar.close()
    elapsed = time.perf_counter() - start
    names = sorted(sums)
    totals = all_reduce(torch.tensor([float(sums[n]) for n in names] + [float(correct), seen],
                                     dtype=torch.float64), procs).tolist()
    seen = max(totals[-1], 1)  # a resumed epoch may have had no batch left
    metrics = {f"train_{name}": value / seen for name, value in zip(names, totals, strict=False)}
    metrics["train_acc"] = 100.0 * totals[-2] / seen
    metrics["train_images_per_s"] = seen / elapsed
    metrics["stopped_at"] = stopped_at
    return metrics


def evaluation_noise(positions, num_glimpses, M, seed):
    """Policy noise fixed per image: (T, M*B, 2), path m of image b at column m*B + b.

    Each image draws from a generator seeded by `seed` and its position in the split, so an
    image gets the same M paths whatever batch or process evaluates it, and evaluation leaves
    the training's random stream alone.
    """
    draws = [torch.randn(M, num_glimpses, 2,
                         generator=torch.Generator().manual_seed(seed * NOISE_STRIDE + int(i)))
             for i in positions]
    noise = torch.stack(draws, 2)  # (M, T, B, 2)
    return noise.transpose(0, 1).flatten(1, 2)  # (T, M*B, 2)


@torch.no_grad()
def evaluate(model, loader, M, device, amp=False, seed=0, procs=SINGLE_PROCESS):
    """Accuracy, reconstruction MSE and PSNR over `loader`, with M sampled glimpse paths each.

    The class probabilities of the M paths are averaged before the argmax (as in RAM); the
    reconstruction error is the mean over paths of the error after the last glimpse, so it is
    the error of one real path, not of an average of paths. Under torchrun each process takes
    its share of the images and the sums are added up, so every process returns the figures of
    the whole split.
    Where the policy aims (its mean, without the exploration noise) on each image's first
    path: loc_mean and loc_std, (T, 2) lists, the mean and std across images per glimpse and
    axis; loc_spread, loc_std averaged: 0 means every image gets the same path, uniform random
    locations give about 0.58.
    """
    model.eval()
    T = model.cfg.num_glimpses
    correct, sq_err, seen = 0, 0.0, 0
    aim_sum = torch.zeros(T, 2, dtype=torch.float64)
    aim_sq = torch.zeros(T, 2, dtype=torch.float64)
    for images, labels, positions in loader:
        x, y = to_float(images, device), labels.to(device, non_blocking=True)
        batch = y.shape[0]
        noise = evaluation_noise(positions, T, M, seed).to(device)
        with autocast(device, amp):
            out = model(x.repeat(M, 1, 1, 1), every_step=False, noise=noise)  # (M*B, ...)
        probs = out.log_probs.float().exp().view(M, batch, -1).mean(0)  # (B, classes)
        correct = correct + (probs.argmax(-1) == y).sum()
        errors = reconstruction_errors(out.recon[-1].float().view(M, batch, *x.shape[1:]), x)
        sq_err = sq_err + errors.mean(0).double().sum()  # errors: (M, B)
        aims = out.loc_means[:, :batch].double().cpu()  # (T, B, 2), the first path
        aim_sum += aims.sum(1)
        aim_sq += aims.pow(2).sum(1)
        seen += batch
    totals = torch.cat([torch.tensor([float(correct), float(sq_err), seen], dtype=torch.float64),
                        aim_sum.flatten(), aim_sq.flatten()])
    totals = all_reduce(totals, procs)
    correct, sq_err, seen = totals[:3].tolist()
    aim_mean = totals[3:3 + 2 * T].view(T, 2) / seen
    aim_std = (totals[3 + 2 * T:].view(T, 2) / seen - aim_mean.pow(2)).clamp_(min=0).sqrt()
    mse = sq_err / seen
    return {"acc": 100.0 * correct / seen, "mse": mse, "psnr": psnr(mse),
            "loc_spread": aim_std.mean().item(), "loc_mean": aim_mean.tolist(),
            "loc_std": aim_std.tolist()}


def rng_state():
    """Every random stream, as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def epochs_on_disk(folder):
    """Sorted epoch numbers of the numbered checkpoints in `folder`."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        stem = name[: -len(CKPT_SUFFIX)] if name.endswith(CKPT_SUFFIX) else ""
        if stem.startswith("epoch_") and stem[6:].isdigit():
            found.append(int(stem[6:]))
    return sorted(found)


def link_or_copy(src, dst):
    """Make `dst` hold the same bytes as `src`, atomically: a hard link where the file system
    allows one (free and instant), a copy otherwise."""
    tmp = f"{dst}.link.tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        with open(src, "rb") as f:
            data = f.read()
        atomic_write(dst, lambda out: out.write(data))


def load_checkpoint(path):
    """Read a checkpoint safely (weights_only: tensors and plain values, no code)."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}")
    # torch.save writes a zip archive, whose directory is at its end: a truncated file is no zip.
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a readable checkpoint (truncated, or another kind of "
                        "file); use another epoch or retrain")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} is not a readable checkpoint: it holds objects other than "
                        "tensors and plain values, refused since loading them could run code; "
                        "use a checkpoint written by this project") from None
    except Exception as e:  # a damaged archive
        raise UserError(f"{path} is not a readable checkpoint (damaged: {type(e).__name__}); "
                        "use another epoch or retrain") from None
    if not isinstance(ckpt, dict) or not {"model", "model_config", "epoch"} <= ckpt.keys():
        raise UserError(f"{path} is not a checkpoint of this project; use another file")
    return ckpt


def load_weights(model, weights, path):
    """Put a checkpoint's weights into `model`; a mismatch is a UserError.

    Checkpoints of the fixed policies written before those policies became weightless modules
    carry an unused location network: its weights are passed over.
    """
    if not any(name.startswith("locator.") for name in model.state_dict()):
        weights = {k: v for k, v in weights.items() if not k.startswith("locator.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"{path} does not fit this model ({first}); use a checkpoint of this "
                        "model") from None


class Trainer:
    """Trains, validates, tests and checkpoints one model.

    Args:
        cfg: the model's configuration.
        weights: loss weights.
        args: the parsed flags (training and output options).
        name: the model's name; outputs go to <ckpt_dir>/<name>/ and so on.
        device: where the model runs.
        procs: this process's place in a torchrun job; only rank 0 writes files.
    """

    def __init__(self, cfg: ModelConfig, weights: LossWeights, args, name, device,
                 procs=SINGLE_PROCESS):
        self.cfg, self.weights, self.args, self.name, self.device = cfg, weights, args, name, device
        self.procs = procs
        self.ckpt_folder = os.path.join(args.ckpt_dir, name)
        self.model = RecurrentAttention(cfg).to(device)
        # What the loops call; checkpoints always hold the plain module's weights, so they
        # load alike with or without torchrun.
        wrapped = self.model
        if procs.distributed:
            wrapped = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.step_model = torch.compile(wrapped) if args.compile else wrapped
        # Evaluation needs no gradient exchange: each process runs its share on the module.
        self.eval_model = torch.compile(self.model) if args.compile else self.model
        self.optimizer = make_optimizer(self.model, args.init_lr, device)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="max", factor=0.1, patience=args.lr_patience)
        self.generator = torch.Generator().manual_seed(args.random_seed)  # data order
        self.data_state = self.generator.get_state()  # at the start of the epoch in progress
        self.step_in_epoch = 0  # batches of that epoch already trained on
        self.epoch = 0
        self.best_valid_acc = -math.inf
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

    def state(self, rng):
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "best_valid_acc": self.best_valid_acc,
            "epochs_since_best": self.epochs_since_best,
            "model_config": asdict(self.cfg),
            "loss_weights": asdict(self.weights),
            "data_generator": self.data_state,
            "step_in_epoch": self.step_in_epoch,
            "rng": rng,
        }

    def save(self, is_best):
        """Write latest.pth atomically, then point epoch_N.pth (every --ckpt_freq, whole epochs
        only) and best.pth at the same bytes. A crash at any moment leaves each file either old
        or new, whole. Weights that are not finite are never written. Every process calls it;
        rank 0 alone writes. Returns the path of latest.pth."""
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise NonFiniteLossError(f"the weights became NaN or infinite in epoch "
                                     f"{self.epoch + (self.step_in_epoch > 0)}; not saved")
        latest = os.path.join(self.ckpt_folder, "latest" + CKPT_SUFFIX)
        rng = self.gathered_rng()
        if not self.procs.is_main:
            return latest
        os.makedirs(self.ckpt_folder, exist_ok=True)
        state = self.state(rng)
        atomic_write(latest, lambda f: torch.save(state, f))
        if self.step_in_epoch == 0 and self.epoch % self.args.ckpt_freq == 0:
            link_or_copy(latest, os.path.join(self.ckpt_folder, f"epoch_{self.epoch}{CKPT_SUFFIX}"))
        if is_best:
            link_or_copy(latest, os.path.join(self.ckpt_folder, "best" + CKPT_SUFFIX))
        return latest

    def save_config(self):
        if not self.procs.is_main:
            return
        os.makedirs(self.ckpt_folder, exist_ok=True)
        text = json.dumps({"model_config": asdict(self.cfg), "loss_weights": asdict(self.weights),
                           "flags": vars(self.args)}, indent=2, sort_keys=True)
        path = os.path.join(self.ckpt_folder, "config.json")
        atomic_write(path, lambda f: f.write(text.encode()))

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

    def load(self, path, resume=False):
        """Load weights (and with `resume`, the whole training state) from `path`."""
        ckpt = load_checkpoint(path)
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["model_config"].items()}
        differing = [f"{k}: checkpoint {saved.get(k)!r}, flags {v!r}"
                     for k, v in asdict(self.cfg).items() if saved.get(k) != v]
        if differing:
            raise UserError(f"{path} was trained with another model configuration "
                            f"({'; '.join(differing)}); pass the same flags")
        load_weights(self.model, ckpt["model"], path)
        self.epoch = ckpt["epoch"]
        if resume:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.best_valid_acc = ckpt["best_valid_acc"]
            self.epochs_since_best = ckpt["epochs_since_best"]
            self.data_state = ckpt["data_generator"]
            self.step_in_epoch = ckpt["step_in_epoch"]
            if len(ckpt["rng"]) == self.procs.world_size:
                set_rng_state(ckpt["rng"][self.procs.rank])
            else:  # saved by another number of processes: new streams, still from the seed
                seed_everything(self.args.random_seed + self.procs.rank + 7919 * self.epoch)
                if self.procs.is_main:
                    print(f"note: {path} was saved by {len(ckpt['rng'])} process(es), this run "
                          f"has {self.procs.world_size}; random streams restart from the seed")
        return ckpt

    def _share_buffers(self):
        """Give every process rank 0's buffers (BatchNorm statistics) before evaluating: DDP
        broadcasts them before each training step, so after the last one they differ."""
        if self.procs.distributed:
            for buffer in self.model.buffers():
                dist.broadcast(buffer, 0)

    # ---------------------------------------------------------------- loops

    def fit(self, train_loader, valid_loader, writer=None, on_epoch_end=None, should_stop=None):
        """Train until --epochs or until --train_patience epochs bring no better accuracy.

        `should_stop()` is asked after every step: when it turns true, a checkpoint of the state
        right then is written (inside an epoch, if need be) and TrainingInterrupted is raised.
        """
        args = self.args
        should_stop = should_stop or (lambda: False)
        self.save_config()
        while self.epoch < args.epochs:
            if self.epochs_since_best >= args.train_patience:
                print_main(self.procs, "stopping early: no better validation accuracy in "
                           f"{args.train_patience} epochs")
                break
            start = time.perf_counter()
            self.generator.set_state(self.data_state)  # same order as an uninterrupted run
            set_epoch(train_loader, self.epoch)
            metrics = train_epoch(self.step_model, train_loader, self.optimizer,
                                  self.cfg.objective, self.weights, self.device, self.epoch + 1,
                                  args.print_freq, args.amp, self.step_in_epoch, should_stop,
                                  self.procs)
            stopped_at = metrics.pop("stopped_at")
            if stopped_at is not None:
                self.step_in_epoch = stopped_at
                raise TrainingInterrupted(self.save(is_best=False), self.epoch + 1, stopped_at)
            self.epoch += 1
            self.step_in_epoch = 0
            self.data_state = self.generator.get_state()
            self._share_buffers()
            valid = evaluate(self.eval_model, valid_loader, args.M, self.device, args.amp,
                             args.random_seed, self.procs)
            metrics.update({f"valid_{k}": v for k, v in valid.items()
                            if k not in ("loc_mean", "loc_std")})
            metrics["lr"] = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step(valid["acc"])
            is_best = valid["acc"] > self.best_valid_acc
            if is_best:
                self.best_valid_acc, self.epochs_since_best = valid["acc"], 0
            else:
                self.epochs_since_best += 1
            path = self.save(is_best)
            if on_epoch_end is not None and self.procs.is_main:
                on_epoch_end(self)
            metrics["epoch_s"] = time.perf_counter() - start
            print_main(self.procs, format_epoch(self.epoch, args.epochs, metrics, is_best))
            if writer is not None:
                for key, value in metrics.items():
                    writer.add_scalar(key, value, self.epoch)
                writer.flush()
            if should_stop():
                raise TrainingInterrupted(path, self.epoch, 0)

    def test(self, test_loader):
        return evaluate(self.eval_model, test_loader, self.args.M, self.device, self.args.amp,
                        self.args.random_seed, self.procs)


def print_main(procs, text):
    """Print on rank 0 only, so a torchrun job logs each line once."""
    if procs.is_main:
        print(text, flush=True)


def format_epoch(epoch, epochs, m, is_best):
    """The one summary line printed per epoch."""
    return (f"epoch {epoch}/{epochs} | loss {m['train_total']:.4f} (recon {m['train_recon']:.4f}"
            f" classify {m['train_classify']:.3f} reinforce {m['train_reinforce']:.3f}"
            f" baseline {m['train_baseline']:.4f}) | train acc {m['train_acc']:.2f}%"
            f" | valid acc {m['valid_acc']:.2f}% mse {m['valid_mse']:.4f}"
            f" psnr {m['valid_psnr']:.2f} dB | {m['train_images_per_s']:.0f} img/s"
            f" | {m['epoch_s']:.1f} s | lr {m['lr']:.1e}" + (" | best" if is_best else ""))
