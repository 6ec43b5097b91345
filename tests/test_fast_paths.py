"""The opt-in fast paths (--amp, --compile) and the benchmark still compute the same model."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from model import LossWeights, RecurrentAttention, compute_losses
from modules import ModelConfig
from utils import autocast

SMALL = ModelConfig(glimpse_hidden=16, loc_hidden=16, hidden_size=32, num_glimpses=3)


def one_step(model, x, y, amp=False):
    with autocast(torch.device("cpu"), amp):
        out = model(x)
        losses = compute_losses(out, x, y, SMALL.objective, LossWeights())
    losses["total"].backward()
    return losses


def test_amp_bf16_step_on_cpu_matches_fp32_roughly():
    torch.manual_seed(0)
    model = RecurrentAttention(SMALL)
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8)
    torch.manual_seed(1)
    full = one_step(model, x, y)
    model.zero_grad()
    torch.manual_seed(1)
    half = one_step(model, x, y, amp=True)
    assert torch.isfinite(half["total"])
    assert abs(half["recon"].item() - full["recon"].item()) < 0.05 * full["recon"].item()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for n, p in model.named_parameters() if not n.startswith("locator."))


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_model_gives_the_eager_losses():
    # Compiled code draws its random numbers its own way: compare on a policy that draws none.
    torch.manual_seed(0)
    model = RecurrentAttention(dataclasses.replace(SMALL, policy="centre"))
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8)
    torch.manual_seed(1)
    eager = one_step(model, x, y)
    torch.manual_seed(1)
    compiled = one_step(torch.compile(model), x, y)
    for name in ("recon", "classify", "baseline"):
        assert torch.allclose(eager[name], compiled[name], rtol=1e-4, atol=1e-5), name


def test_benchmark_prints_one_json_line():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"),
                           "--seconds=0.3", "--threads=1", "--batch_size=16",
                           "--num_glimpses=3", "--hidden_size=32"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("train_images_per_s", "eval_images_per_s", "sensor_images_per_s",
                "train_flops_per_image", "train_gflop_per_s", "threads"):
        assert result[key] > 0, key
    assert result["threads"] == 1
