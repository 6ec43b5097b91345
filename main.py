"""Entry point: `python3 main.py` trains, `python3 main.py --is_train=False` tests."""

import os
import signal
import sys

import torch.distributed as dist

from config import (
    data_spec,
    ignored_flags,
    loss_weights,
    model_config,
    parse_args,
    train_config,
)
from data_loader import Batching, make_loader, to_float
from datasets import Augmented, TwoViews, load_data
from plot_glimpses import write_glimpse_data
from trainer import NonFiniteLossError, Trainer, TrainingInterrupted, print_main
from utils import (
    Procs,
    UserError,
    WriteError,
    check_writable,
    close_distributed,
    init_distributed,
    leave,
    pick_device,
    run_lock,
    seed_everything,
)

PLOT_IMAGES = 9  # the same first validation images every epoch, so epochs can be compared


class StopOnSignal:
    """SIGINT/SIGTERM ask training to stop after the current step (it checkpoints first);
    a second signal exits at once, before any further file is touched."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self.previous = {}
        self.pid = os.getpid()

    def __call__(self, signum, frame):
        if os.getpid() != self.pid:
            return  # a data-loading worker forked from us: the training process decides
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        if os.environ.get("RANK", "0") == "0":  # once per torchrun job, not once per process
            print(f"\n{signal.Signals(signum).name}: stopping after this step to write a "
                  "checkpoint (send it again to quit at once)", file=sys.stderr, flush=True)

    def requested(self):
        return self.signum is not None

    def __enter__(self):
        self.previous = {signum: signal.signal(signum, self) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def load_once(spec, cfg, procs):
    """The dataset `spec` names, from the run's data folder. Under torchrun, rank 0 fetches
    (and caches) it while the others wait, then all read it; two processes never download
    into the same folder."""
    if procs.distributed and procs.is_main:
        load_data(spec, cfg.data_dir, cfg.valid_size, cfg.random_seed)
    if procs.distributed:
        dist.barrier()
    return load_data(spec, cfg.data_dir, cfg.valid_size, cfg.random_seed)


def batching(trainer):
    cfg = trainer.train_cfg
    return Batching(cfg.batch_size, cfg.random_seed, cfg.num_workers,
                    trainer.device.type == "cuda", trainer.procs)


def loaders(trainer, data):
    """The training loader, its images cropped and flipped with --augment, or two random views
    of each with --contrast_dim, and the validation loader, never augmented."""
    cfg = trainer.train_cfg
    train_set = data.train
    if trainer.cfg.contrast_dim is not None:
        train_set = TwoViews(data.train, cfg.random_seed)
    elif cfg.augment:
        train_set = Augmented(data.train, cfg.random_seed)
    return (make_loader(train_set, batching(trainer), shuffle=True),
            make_loader(data.valid, batching(trainer), shuffle=False))


def plot_hook(trainer, valid_loader):
    """What training calls after each epoch: the glimpse data of the first validation images,
    every --plot_freq epochs. A failed write (a full disk) is a warning; training goes on."""
    cfg = trainer.train_cfg
    folder = os.path.join(cfg.plot_dir, trainer.name)
    shown = range(min(PLOT_IMAGES, len(valid_loader.dataset)))
    images = to_float(valid_loader.dataset[list(shown), None][0], trainer.device)

    def write_plot_data(trainer):
        if trainer.epoch % cfg.plot_freq == 0:
            try:
                write_glimpse_data(trainer.model, images, trainer.epoch, folder)
            except OSError as e:
                print(f"main.py: warning: no glimpse data for epoch {trainer.epoch}: {e}; "
                      "training goes on", file=sys.stderr, flush=True)
    return write_plot_data


def open_writer(trainer):
    cfg = trainer.train_cfg
    if not (cfg.use_tensorboard and trainer.procs.is_main):
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(os.path.join(cfg.logs_dir, trainer.name))


def train(trainer, data, stop):
    cfg, procs = trainer.train_cfg, trainer.procs
    check_writable(cfg.ckpt_dir, "--ckpt_dir")
    check_writable(cfg.plot_dir, "--plot_dir")
    if cfg.use_tensorboard:
        check_writable(cfg.logs_dir, "--logs_dir")
    with run_lock(trainer.ckpt_folder, procs):
        trainer.claim_folder()
        path = trainer.checkpoint_path(best=False) if cfg.resume else None
        train_loader, valid_loader = loaders(trainer, data)
        if path is not None:
            position = trainer.resume(path, train_loader)
            within = f", {position['images_seen']} images into epoch {trainer.epoch + 1}" \
                if position["images_seen"] else ""
            print_main(procs, f"resuming {trainer.name} from {path} after epoch {trainer.epoch}"
                       f"{within}")
        processes = f" x {procs.world_size} processes" if procs.distributed else ""
        print_main(procs, f"training {trainer.name} on {trainer.device}{processes}: "
                   f"{len(train_loader.dataset)} train and {len(valid_loader.dataset)} "
                   f"validation images, batch {cfg.batch_size}{processes}, {cfg.epochs} epochs "
                   "at most")
        writer = open_writer(trainer)
        try:
            trainer.fit(train_loader, valid_loader, writer, plot_hook(trainer, valid_loader),
                        stop.requested)
        finally:
            if writer is not None:
                writer.close()
    print_main(procs, f"best validation {trainer.selection} {trainer.best_score:.2f}; "
               f"checkpoints in {trainer.ckpt_folder}")


def test(trainer, data):
    cfg = trainer.train_cfg
    if cfg.model_epoch == 0:  # the seeded initialisation start() built
        path = "untrained, no checkpoint"
    else:
        path = trainer.checkpoint_path(cfg.model_epoch, cfg.best)
        trainer.load(path)
    loader = make_loader(data.test, batching(trainer), shuffle=False)
    m = trainer.test(loader)
    recon = f"reconstruction mse {m['mse']:.5f} psnr {m['psnr']:.2f} dB" if trainer.cfg.decoder \
        else "no reconstruction (no decoder)"
    print_main(trainer.procs, f"test {trainer.name} epoch {trainer.epoch} ({path}), M={cfg.M}: "
               f"accuracy {m['acc']:.2f}% (error {100 - m['acc']:.2f}%) | {recon} | location "
               f"spread {m['loc_spread']:.3f} | distinct glimpses {m['distinct']:.2f} of "
               f"{trainer.cfg.num_glimpses}")
    aims = " ".join(f"({x:+.2f},{y:+.2f})±{(sx + sy) / 2:.3f}"
                    for (x, y), (sx, sy) in zip(m["loc_mean"], m["loc_std"], strict=True))
    print_main(trainer.procs, f"where the policy aims, glimpse by glimpse, as (x, y) in [-1, 1] "
               f"± std across images: {aims}")
    if "hit_rate" in m:
        hits = " ".join(f"{rate:.1f}" for rate in m["hit_rate"])
        print_main(trainer.procs, f"hit rate (% of glimpses centred in the digit's box), glimpse "
                   f"by glimpse: {hits}; all glimpses {sum(m['hit_rate']) / len(m['hit_rate']):.1f}"
                   f"%; any glimpse of the episode {m['any_hit']:.1f}%")
    if trainer.cfg.learn_std and bool(trainer.model.locator.exploring):  # frozen: no noise
        stds = trainer.model.locator.learned_stds().mean(-1)  # (T,): x and y averaged
        print_main(trainer.procs, "learned std, glimpse by glimpse (x and y averaged): "
                   + " ".join(f"{s:.3f}" for s in stds.tolist()))
    if trainer.cfg.policy == "learned":
        report_adaptivity(trainer, loader)
    if cfg.linear_eval:
        report_linear_evaluation(trainer, data)


def report_adaptivity(trainer, loader):
    """The adaptivity test's lines: each image on its own path against the mean path, and
    against another image's own path (the control); each gain with one standard error over
    the test images (paired: every path on the same images)."""
    own, mean, swapped = trainer.adaptivity(loader)
    decoder = trainer.cfg.decoder  # without one, accuracy alone

    def figures(m):
        return (f"psnr {m['psnr']:.2f} dB, " if decoder else "") + f"accuracy {m['acc']:.2f}%"

    for other, name, label in ((mean, "the mean path", "adaptivity"),
                               (swapped, "another test image's path", "adaptivity control")):
        points = f"{other['acc_gain']:+.2f} ± {other['acc_se']:.2f} points"
        gain = f"{other['psnr_gain']:+.4f} ± {other['psnr_se']:.4f} dB, {points}" if decoder \
            else points
        print_main(trainer.procs, f"{label} (one path, no exploration noise): own paths "
                   f"{figures(own)}; every image on {name} {figures(other)}; gain {gain} (± one "
                   "standard error, paired)")


def report_linear_evaluation(trainer, data):
    if trainer.procs.distributed:  # each process holds a share of the codes
        print_main(trainer.procs, "linear evaluation skipped under torchrun: run the test in "
                   "one process for it")
        return
    result = trainer.linear_evaluation(
        [make_loader(split, batching(trainer), shuffle=False)
         for split in (data.train, data.valid, data.test)])
    features = trainer.train_cfg.linear_eval_features
    what = {"code": f"code ({trainer.cfg.probe_input} states)",
            "glimpses": "glimpse features (g_1..g_T side by side)",
            "states": "states (h_1..h_T side by side)"}[features]
    print_main(trainer.procs, f"linear evaluation of the frozen {what}, logistic regression, L2 "
               f"{result['l2']:g} chosen on validation: test accuracy {result['test_acc']:.2f}% "
               f"(validation {result['valid_acc']:.2f}%)")


def main(argv=None):
    args = parse_args(argv)
    if not args.is_train:
        return run(args, StopOnSignal())
    # Installed until the run has said how it ended, so that a second Ctrl-C still quits at once
    # while the first one's checkpoint is written or reported; restored for in-process callers.
    with StopOnSignal() as stop:
        return run(args, stop)


def start(args):
    """This process's place and device, the data, and the trainer with its three
    configurations."""
    weights, train_cfg = loss_weights(args), train_config(args)
    procs, device = init_distributed(pick_device(train_cfg.device))
    for warning in ignored_flags(train_cfg):
        if procs.is_main:
            print(f"main.py: warning: {warning}", file=sys.stderr, flush=True)
    data = load_once(data_spec(args), train_cfg, procs)
    cfg = model_config(args, data)
    seed_everything(train_cfg.random_seed + procs.rank)  # one policy stream per process
    return Trainer(cfg, weights, train_cfg, device, procs), data


def run(args, stop):
    """Train or test as the flags say; returns the exit code."""
    procs = Procs()
    try:
        trainer, data = start(args)
        procs = trainer.procs
        if args.is_train:
            train(trainer, data, stop)
        else:
            test(trainer, data)
        if procs.distributed:
            # Every rank done before any tears its process group down: a rank that left early
            # was seen to abort in gloo's teardown ("terminate called without an active
            # exception") once in a while.
            dist.barrier()
    except UserError as e:
        return fail(procs, f"error: {e}", 2)
    except TrainingInterrupted as e:
        where = f"epoch {e.epoch}, {e.images} images in" if e.images else \
            f"the end of epoch {e.epoch}"
        return fail(procs, f"stopped at {where}; checkpoint {e.path}; continue with the same "
                    "flags and --resume=True", 128 + (stop.signum or signal.SIGINT))
    except NonFiniteLossError as e:
        return fail(procs, f"error: {e}; the last good checkpoint is kept", 1)
    except WriteError as e:
        return fail(procs, f"error: {e}; the checkpoints written before are kept: free some "
                    "space, then continue with --resume=True", 1)
    except KeyboardInterrupt:
        return fail(procs, "interrupted", 130)
    finally:
        trainer = None  # its DDP wrapper holds the process group
        close_distributed()
    return 0


def fail(procs, message, code):
    """One line on stderr (once per torchrun job where every rank fails alike) and the code:
    2 for bad input, 1 for a failed run, 128 + the signal for a stop."""
    if procs.is_main:
        print(f"main.py: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    leave(main())
