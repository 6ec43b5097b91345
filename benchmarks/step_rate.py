"""Training-step and sensor rate of any checkout of this project, to compare commits.

    git worktree add /tmp/base 344fe98
    python3 benchmarks/step_rate.py /tmp/base --unfused   # the first commit (plain Adam)
    python3 benchmarks/step_rate.py .                     # this checkout (fused Adam)

Uses only what every commit has (ModelConfig, RecurrentAttention, compute_losses, the retina's
prepare and forward), the seed configuration and batch 128, and prints one JSON line with the
median over three windows after a warm-up, like throughput.py.
"""

import argparse
import inspect
import json
import statistics
import sys
import time

WINDOWS, WARMUP_STEPS, BATCH = 3, 5, 128


def rate(run, seconds):
    for _ in range(WARMUP_STEPS):
        run()
    rates = []
    for _ in range(WINDOWS):
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            run()
            calls += 1
        rates.append(calls * BATCH / (time.perf_counter() - start))
    return statistics.median(rates)


def loss_arguments(compute_losses, x, y, cfg):
    """What this checkout's compute_losses takes between the rollout and the weights: (x, y,
    objective) before the Gram-form decoder, (y, objective) for a few commits, (y, cfg) since
    the reward and baseline options."""
    params = inspect.signature(compute_losses).parameters
    if "x" in params:
        return x, y, cfg.objective
    return (y, cfg) if "cfg" in params else (y, cfg.objective)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", help="the checkout to measure")
    parser.add_argument("--unfused", action="store_true", help="plain Adam (older commits)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each window")
    args = parser.parse_args()
    sys.path.insert(0, args.repo)
    import torch

    from model import LossWeights, RecurrentAttention, compute_losses
    from modules import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig()
    model = RecurrentAttention(cfg)
    optimizer = torch.optim.Adam(model.parameters(), 3e-4, fused=not args.unfused)
    x, y = torch.rand(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,))
    locations = torch.rand(cfg.num_glimpses, BATCH, 2) * 2 - 1

    given = loss_arguments(compute_losses, x, y, cfg)

    def train_step():
        losses = compute_losses(model(x), *given, LossWeights())
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()

    @torch.no_grad()
    def sensor():
        prepared = model.retina.prepare(x)
        for l in locations:
            model.retina(prepared, l)

    train = rate(train_step, args.seconds)
    print(json.dumps({"repo": args.repo, "train_images_per_s": round(train),
                      "sensor_images_per_s": round(rate(sensor, args.seconds)),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
