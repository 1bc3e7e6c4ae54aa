"""Small-map CPU convolutions through PyTorch's own kernels (library/models/cpu_conv.py): the same
outputs and gradients as torch's default convolution, routed only where meant, and the trainer
flag that turns it off changes what runs."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from library.models import cpu_conv
from tests.conftest import run_in_process


@pytest.fixture(autouse=True)
def any_weight(monkeypatch):
    """These tests use small weights: route them too (the real threshold is for real models)."""
    monkeypatch.setattr(cpu_conv, "MIN_WEIGHT", 0)


CONVS = [dict(in_channels=8, out_channels=16, kernel_size=3, padding=1),
         dict(in_channels=8, out_channels=8, kernel_size=3, stride=2, padding=1, groups=2, bias=False),
         dict(in_channels=8, out_channels=4, kernel_size=1, dilation=1)]


@pytest.mark.parametrize("config", CONVS)
def test_same_outputs_and_gradients_as_torch(config):
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(**config)
    routed = copy.deepcopy(plain)
    assert cpu_conv.route_small_cpu_convolutions(routed) == 1
    assert cpu_conv.route_small_cpu_convolutions(routed) == 0  # idempotent
    x = torch.randn(2, 8, 12, 12)
    grad = torch.randn_like(plain(x))
    results = []
    for conv in (plain, routed):
        xi = x.clone().requires_grad_(True)
        conv(xi).backward(grad)
        bias = [conv.bias.grad] if conv.bias is not None else []
        results.append([conv(x).detach(), xi.grad, conv.weight.grad, *bias])
    for reference, ours in zip(*results):
        assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-5), (ours - reference).abs().max()


def test_routed_only_for_small_float32_maps_outside_autocast(monkeypatch):
    calls = []
    original = cpu_conv._NativeConv2d.apply
    monkeypatch.setattr(cpu_conv._NativeConv2d, "apply", lambda *a: calls.append(a[0].shape) or original(*a))
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    cpu_conv.route_small_cpu_convolutions(conv)
    conv(torch.randn(1, 4, 16, 16))  # 256 positions: routed
    conv(torch.randn(1, 4, 17, 16))  # one row more: oneDNN
    conv.to(torch.bfloat16)(torch.randn(1, 4, 8, 8, dtype=torch.bfloat16))
    conv.float()
    with torch.autocast("cpu", torch.bfloat16):
        conv(torch.randn(1, 4, 8, 8))
    assert calls == [torch.Size([1, 4, 16, 16])]


def test_a_network_that_replaces_forward_still_runs_through_it():
    """LoRA-style plug-ins replace ``forward`` and call the original: the routing sits below it."""
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    original = conv.forward
    conv.forward = lambda x: original(x) * 2
    cpu_conv.route_small_cpu_convolutions(conv)
    x = torch.randn(1, 4, 8, 8)
    plain = torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1) * 2
    assert torch.allclose(conv(x), plain, atol=1e-5)


def test_small_weights_are_left_to_torch(monkeypatch):
    monkeypatch.setattr(cpu_conv, "MIN_WEIGHT", 65536)
    calls = []
    monkeypatch.setattr(cpu_conv._NativeConv2d, "apply", lambda *a: calls.append(1))
    small, large = torch.nn.Conv2d(32, 32, 3), torch.nn.Conv2d(128, 128, 3)  # 9,216 and 147,456 weights
    for conv in (small, large):
        cpu_conv.route_small_cpu_convolutions(conv)
        conv(torch.randn(1, conv.in_channels, 8, 8))
    assert calls == [1]


def test_trainer_flag(tiny_default, tmp_path, monkeypatch):
    """In-process, so that the tiny model's convolutions count as routable (``any_weight``) and the
    routed calls can be counted: the default routes them, --cpu_conv_kernels onednn does not, and
    both train the same LoRA up to float rounding."""
    calls = []
    original = cpu_conv._NativeConv2d.apply
    monkeypatch.setattr(cpu_conv._NativeConv2d, "apply", lambda *a: calls.append(1) or original(*a))
    files, counts = [], []
    for kernels in ("auto", "onednn"):
        out = tmp_path / kernels
        proc = run_in_process("train_network.py", "--pretrained_model_name_or_path",
                              str(tiny_default / "model" / "tiny-sd15.safetensors"), "--train_data_dir",
                              str(tiny_default / "train"), "--resolution", "64", "--caption_extension", ".caption",
                              "--cache_latents", "--max_train_steps", "3", "--learning_rate", "1e-3", "--seed", "5",
                              "--output_dir", str(out), "--cpu_conv_kernels", kernels)
        assert proc.returncode == 0, proc.stderr[-2000:]
        files.append(load_file(str(out / "last.safetensors")))
        counts.append(len(calls))
        calls.clear()
    assert counts[0] > 0 and counts[1] == 0, counts
    auto, onednn = files
    assert set(auto) == set(onednn)
    assert all(torch.allclose(auto[k], onednn[k], rtol=1e-3, atol=1e-5) for k in auto)
