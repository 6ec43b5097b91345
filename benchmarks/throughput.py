"""Training, evaluation and sensor throughput on random images of the dataset's shape (--dataset;
CIFAR-10 by default).

    python3 benchmarks/throughput.py --seconds=10 --threads=2

Prints one JSON line. Every model flag of main.py (and --objective, --policy, --batch_size,
--amp, --compile, --device) selects what is measured; the defaults are the seed configuration.
Each rate is the median over several windows of about --seconds / 3 each, after a warm-up.
FLOPs are counted by torch's FlopCounterMode over one real training step (matrix products,
forward and backward), so they follow the configuration rather than a hand formula.
"""

import json
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import (  # noqa: E402
    build_parser,
    loss_weights,
    model_config,
    positive_float,
    positive_int,
)
from model import RecurrentAttention, compute_losses  # noqa: E402
from trainer import make_optimizer  # noqa: E402
from utils import UserError, autocast, compile_model, pick_device  # noqa: E402

WINDOWS = 3
WARMUP_STEPS = 5


def rate(run, images_per_call, seconds, device):
    """Median images per second of `run` over WINDOWS windows of seconds / WINDOWS each."""
    for _ in range(WARMUP_STEPS):
        run()
    rates = []
    for _ in range(WINDOWS):
        calls, start = 0, time.perf_counter()
        while True:
            run()
            calls += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / WINDOWS:
                break
        rates.append(calls * images_per_call / elapsed)
    return statistics.median(rates)


def parse(argv):
    """The flags of main.py and the benchmark's own; returns them, the model config and the
    device, or exits with a one-line error."""
    parser = build_parser()
    parser.prog = "throughput.py"
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--seconds", type=positive_float, default=10.0,
                       help="time spent measuring each of the three rates")
    bench.add_argument("--threads", type=positive_int, default=torch.get_num_threads(),
                       help="torch intra-op threads on the CPU")
    args = parser.parse_args(argv)
    try:
        return args, model_config(args), pick_device(args.device)
    except UserError as e:
        parser.error(str(e))


def steps(args, cfg, device):
    """The model, and the three things measured on random images of the dataset's shape: a
    training step, an evaluation pass (one path, final image only) and the sensor's glimpses.
    With --contrast_dim a training step rolls out two views of each of the batch's images, as
    training does, and still counts as one batch of images."""
    model = RecurrentAttention(cfg).to(device)
    step_model = compile_model(model, device) if args.compile else model
    optimizer = make_optimizer(model, args.init_lr, device, args.policy_lr)
    weights = loss_weights(args)
    B = args.batch_size
    views = cfg.views
    x = torch.rand(views * B, cfg.num_channels, cfg.image_size, cfg.image_size, device=device)
    y = torch.randint(0, cfg.num_classes, (views * B,), device=device)
    locations = torch.rand(cfg.num_glimpses, B, 2, device=device) * 2 - 1

    def train_step():
        with autocast(device, args.amp):
            out = step_model(x)  # (views * B) rollouts
            losses = compute_losses(out, y, cfg, weights)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()

    @torch.no_grad()
    def eval_step():
        with autocast(device, args.amp):
            step_model(x[:B], decode="last")

    @torch.no_grad()
    def sensor_step():
        prepared = model.retina.prepare(x[:B])
        for l in locations:
            model.retina(prepared, l)

    return model, train_step, eval_step, sensor_step


def main(argv=None):
    args, cfg, device = parse(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.random_seed)
    model, train_step, eval_step, sensor_step = steps(args, cfg, device)
    B = args.batch_size
    counter = FlopCounterMode(display=False)
    with counter:
        train_step()
    flops_per_image = counter.get_total_flops() / B

    model.train()
    train = rate(train_step, B, args.seconds, device)
    model.eval()
    evaluation = rate(eval_step, B, args.seconds, device)
    sensor = rate(sensor_step, B, args.seconds, device)
    print(json.dumps({
        "train_images_per_s": round(train, 1),
        "eval_images_per_s": round(evaluation, 1),
        "sensor_images_per_s": round(sensor, 1),
        "train_flops_per_image": int(flops_per_image),
        "train_gflop_per_s": round(flops_per_image * train / 1e9, 1),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "batch_size": B,
        "objective": cfg.objective,
        "policy": cfg.policy,
        "amp": args.amp,
        "compile": args.compile,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
