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
from modules import ModelConfig, _SquaredNorms
from utils import autocast

SMALL = ModelConfig(glimpse_hidden=16, loc_hidden=16, hidden_size=32, num_glimpses=3)


def one_step(model, x, y, amp=False):
    with autocast(torch.device("cpu"), amp):
        out = model(x)
        losses = compute_losses(out, y, SMALL, LossWeights())
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


@pytest.mark.parametrize("objective", ["unsupervised", "supervised"])
def test_gram_form_gives_the_losses_and_gradients_of_the_built_canvases(objective, monkeypatch):
    cfg = dataclasses.replace(SMALL, objective=objective)
    x, y = torch.rand(6, 3, 32, 32), torch.arange(6)
    results = []
    for direct in (False, True):
        torch.manual_seed(0)
        model = RecurrentAttention(cfg)
        if direct:
            monkeypatch.setattr(model.decoder, "errors", model.decoder.direct_errors)
        torch.manual_seed(1)
        out = model(x)
        losses = compute_losses(out, y, cfg, LossWeights())
        losses["total"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.errors.detach(), losses, grads))
    (gram_errors, gram, gram_grads), (direct_errors, direct, direct_grads) = results
    assert gram_errors.shape == (cfg.num_glimpses, 6)
    torch.testing.assert_close(gram_errors, direct_errors, rtol=1e-4, atol=1e-6)
    for name in ("recon", "reinforce", "baseline", "classify", "total"):
        torch.testing.assert_close(gram[name], direct[name], rtol=1e-4, atol=1e-6)
    assert gram_grads.keys() == direct_grads.keys()
    assert "decoder.fc.weight" in gram_grads and "decoder.fc.bias" in gram_grads
    for name, grad in gram_grads.items():
        torch.testing.assert_close(grad, direct_grads[name], rtol=1e-3, atol=1e-6, msg=name)


def test_the_squared_norms_backward_is_autograds():
    # _SquaredNorms writes its backward by hand (G = W^T W is symmetric); gradcheck holds it to
    # finite differences in float64, for both operands.
    torch.manual_seed(0)
    s = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(_SquaredNorms.apply(s, weight), (s @ weight.t()).pow(2).sum(-1))
    assert torch.autograd.gradcheck(_SquaredNorms.apply, (s, weight))


def test_gram_form_stays_in_float32_under_amp():
    model = RecurrentAttention(SMALL)
    x = torch.rand(4, 3, 32, 32)
    h = torch.randn(SMALL.num_glimpses, 4, SMALL.hidden_size)
    with autocast(torch.device("cpu"), True):
        errors = model.decoder.errors(h.bfloat16(), x)
    assert errors.dtype == torch.float32
    torch.testing.assert_close(errors, model.decoder.direct_errors(h.bfloat16().float(), x),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_gives_the_cpu_losses_and_gradients():
    cfg = dataclasses.replace(SMALL, policy="centre")  # no random draw: the same path on both
    torch.manual_seed(0)
    cpu_model = RecurrentAttention(cfg)
    cuda_model = RecurrentAttention(cfg).cuda()
    cuda_model.load_state_dict(cpu_model.state_dict())
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8)
    on_cpu = one_step(cpu_model, x, y)
    on_cuda = compute_losses(cuda_model(x.cuda()), y.cuda(), cfg, LossWeights())
    on_cuda["total"].backward()
    for name in ("recon", "classify", "baseline", "total"):
        torch.testing.assert_close(on_cuda[name].cpu(), on_cpu[name], rtol=1e-4, atol=1e-6)
    for (name, p), q in zip(cpu_model.named_parameters(), cuda_model.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-5, msg=name)
