"""Entry point: `python3 main.py` trains, `python3 main.py --is_train=False` tests."""

import os
import signal
import sys

from config import loss_weights, model_config, model_name, parse_args
from data_loader import cifar10_loaders, cifar10_test_loader, to_float
from plot_glimpses import write_glimpse_data
from trainer import NonFiniteLossError, Trainer, TrainingInterrupted
from utils import UserError, check_writable, pick_device, seed_everything

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


def train(args, trainer, stop):
    check_writable(args.ckpt_dir, "--ckpt_dir")
    check_writable(args.plot_dir, "--plot_dir")
    if args.resume:
        path = trainer.checkpoint_path(best=False)
        trainer.load(path, resume=True)
        within = f", step {trainer.step_in_epoch} of epoch {trainer.epoch + 1}" \
            if trainer.step_in_epoch else ""
        print(f"resuming {trainer.name} from {path} after epoch {trainer.epoch}{within}")
    pin = trainer.device.type == "cuda"
    train_loader, valid_loader = cifar10_loaders(
        args.data_dir, args.batch_size, args.valid_size, args.num_workers, trainer.generator, pin)
    print(f"training {trainer.name} on {trainer.device}: {len(train_loader.dataset)} train and "
          f"{len(valid_loader.dataset)} validation images, {args.epochs} epochs at most")
    plot_folder = os.path.join(args.plot_dir, trainer.name)
    shown = range(min(PLOT_IMAGES, len(valid_loader.dataset)))
    plot_images = to_float(valid_loader.dataset[list(shown)][0], trainer.device)

    def write_plot_data(trainer):
        if trainer.epoch % args.plot_freq == 0:
            write_glimpse_data(trainer.model, plot_images, trainer.epoch, plot_folder)

    writer = None
    if args.use_tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(args.logs_dir, trainer.name))
    try:
        trainer.fit(train_loader, valid_loader, writer, write_plot_data, stop.requested)
    finally:
        if writer is not None:
            writer.close()
    print(f"best validation accuracy {trainer.best_valid_acc:.2f}%; checkpoints in "
          f"{trainer.ckpt_folder}")


def test(args, trainer):
    path = trainer.checkpoint_path(args.model_epoch, args.best)
    trainer.load(path)
    loader = cifar10_test_loader(args.data_dir, args.batch_size, args.num_workers,
                                 trainer.device.type == "cuda")
    m = trainer.test(loader)
    print(f"test {trainer.name} epoch {trainer.epoch} ({path}), M={args.M}: "
          f"accuracy {m['acc']:.2f}% (error {100 - m['acc']:.2f}%) | reconstruction mse "
          f"{m['mse']:.5f} psnr {m['psnr']:.2f} dB | location spread {m['loc_spread']:.3f}")


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = model_config(args)
        weights = loss_weights(args)
        device = pick_device(args.device)
        seed_everything(args.random_seed)
        trainer = Trainer(cfg, weights, args, model_name(cfg), device)
        if args.is_train:
            with StopOnSignal() as stop:
                train(args, trainer, stop)
        else:
            test(args, trainer)
    except UserError as e:
        print(f"main.py: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        where = f"epoch {e.epoch}, step {e.step}" if e.step else f"the end of epoch {e.epoch}"
        print(f"main.py: stopped at {where}; checkpoint {e.path}; continue with the same flags "
              "and --resume=True", file=sys.stderr)
        return 128 + (stop.signum or signal.SIGINT)  # 130 for SIGINT, 143 for SIGTERM
    except NonFiniteLossError as e:
        print(f"main.py: error: {e}; the last good checkpoint is kept", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("main.py: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
