"""Entry point: `python3 main.py` trains, `python3 main.py --is_train=False` tests."""

import os
import signal
import sys

import torch.distributed as dist

from config import loss_weights, model_config, model_name, parse_args
from data_loader import cifar10_loaders, cifar10_test_loader, load_cifar10, to_float
from plot_glimpses import write_glimpse_data
from trainer import NonFiniteLossError, Trainer, TrainingInterrupted, print_main
from utils import Procs, UserError, check_writable, init_distributed, pick_device, seed_everything

PLOT_IMAGES = 9  # the same first validation images every epoch, so epochs can be compared


class StopOnSignal:
    """SIGINT/SIGTERM ask training to stop after the current step (it checkpoints first);
    a second signal exits at once, before any further file is touched."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self.previous = {}

    def __call__(self, signum, frame):
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step to write a checkpoint "
              "(send it again to quit at once)", file=sys.stderr, flush=True)

    def requested(self):
        return self.signum is not None

    def __enter__(self):
        self.previous = {signum: signal.signal(signum, self) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def fetch_once(data_dir, procs):
    """Under torchrun, rank 0 fetches and caches CIFAR-10 while the others wait, then all read
    the cache; two processes never download into the same folder."""
    if procs.distributed:
        if procs.is_main:
            load_cifar10(data_dir)
        dist.barrier()


def train(args, trainer, stop):
    procs = trainer.procs
    check_writable(args.ckpt_dir, "--ckpt_dir")
    check_writable(args.plot_dir, "--plot_dir")
    if args.resume:
        path = trainer.checkpoint_path(best=False)
        trainer.load(path, resume=True)
        within = f", step {trainer.step_in_epoch} of epoch {trainer.epoch + 1}" \
            if trainer.step_in_epoch else ""
        print_main(procs, f"resuming {trainer.name} from {path} after epoch {trainer.epoch}"
                   f"{within}")
    fetch_once(args.data_dir, procs)
    train_loader, valid_loader = cifar10_loaders(
        args.data_dir, args.batch_size, args.valid_size, args.num_workers, trainer.generator,
        trainer.device.type == "cuda", procs, args.random_seed)
    processes = f" x {procs.world_size} processes" if procs.distributed else ""
    print_main(procs, f"training {trainer.name} on {trainer.device}{processes}: "
               f"{len(train_loader.dataset)} train and {len(valid_loader.dataset)} validation "
               f"images, batch {args.batch_size}{processes}, {args.epochs} epochs at most")
    plot_folder = os.path.join(args.plot_dir, trainer.name)
    shown = range(min(PLOT_IMAGES, len(valid_loader.dataset)))
    plot_images = to_float(valid_loader.dataset[list(shown)][0], trainer.device)

    def write_plot_data(trainer):
        if trainer.epoch % args.plot_freq == 0:
            write_glimpse_data(trainer.model, plot_images, trainer.epoch, plot_folder)

    writer = None
    if args.use_tensorboard and procs.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(args.logs_dir, trainer.name))
    try:
        trainer.fit(train_loader, valid_loader, writer, write_plot_data, stop.requested)
    finally:
        if writer is not None:
            writer.close()
    print_main(procs, f"best validation accuracy {trainer.best_valid_acc:.2f}%; checkpoints in "
               f"{trainer.ckpt_folder}")


def test(args, trainer):
    path = trainer.checkpoint_path(args.model_epoch, args.best)
    trainer.load(path)
    fetch_once(args.data_dir, trainer.procs)
    loader = cifar10_test_loader(args.data_dir, args.batch_size, args.num_workers,
                                 trainer.device.type == "cuda", trainer.procs)
    m = trainer.test(loader)
    print_main(trainer.procs, f"test {trainer.name} epoch {trainer.epoch} ({path}), M={args.M}: "
               f"accuracy {m['acc']:.2f}% (error {100 - m['acc']:.2f}%) | reconstruction mse "
               f"{m['mse']:.5f} psnr {m['psnr']:.2f} dB | location spread "
               f"{m['loc_spread']:.3f}")
    aims = " ".join(f"({x:+.2f},{y:+.2f})±{(sx + sy) / 2:.3f}"
                    for (x, y), (sx, sy) in zip(m["loc_mean"], m["loc_std"], strict=True))
    print_main(trainer.procs, f"where the policy aims, glimpse by glimpse, as (x, y) in [-1, 1] "
               f"± std across images: {aims}")


def main(argv=None):
    args = parse_args(argv)
    if not args.is_train:
        return run(args, StopOnSignal())
    # Installed until the run has said how it ended, so that a second Ctrl-C still quits at once
    # while the first one's checkpoint is written or reported; restored for in-process callers.
    with StopOnSignal() as stop:
        return run(args, stop)


def run(args, stop):
    """Train or test as the flags say; returns the exit code."""
    procs = Procs()
    try:
        cfg = model_config(args)
        weights = loss_weights(args)
        procs, device = init_distributed(pick_device(args.device))
        seed_everything(args.random_seed + procs.rank)  # one policy stream per process
        trainer = Trainer(cfg, weights, args, model_name(cfg), device, procs)
        if args.is_train:
            train(args, trainer, stop)
        else:
            test(args, trainer)
    except UserError as e:
        return fail(procs, f"error: {e}", 2)
    except TrainingInterrupted as e:
        where = f"epoch {e.epoch}, step {e.step}" if e.step else f"the end of epoch {e.epoch}"
        return fail(procs, f"stopped at {where}; checkpoint {e.path}; continue with the same "
                    "flags and --resume=True", 128 + (stop.signum or signal.SIGINT))
    except NonFiniteLossError as e:
        return fail(procs, f"error: {e}; the last good checkpoint is kept", 1)
    except KeyboardInterrupt:
        return fail(procs, "interrupted", 130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def fail(procs, message, code):
    """One line on stderr (once per torchrun job where every rank fails alike) and the code:
    2 for bad input, 1 for a failed run, 128 + the signal for a stop."""
    if procs.is_main:
        print(f"main.py: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
