"""Faster float32 convolutions on the CPU: small feature maps through PyTorch's own kernels.

On the CPU, PyTorch runs a convolution through oneDNN by default. oneDNN reorders the plain
weight tensor into its blocked layout on every call, a cost that grows with the weight and does
not shrink with the feature map, so convolutions with many channels on small maps are slow there:
measured on this project's 2-core AVX-512 machine (SD1.5 UNet shapes, forward + backward with a
frozen weight), a 3x3 convolution of 1280 -> 1280 channels at 8x8 takes 69 ms with oneDNN and 30 ms
with PyTorch's own im2col + GEMM kernels, while at 64x64 oneDNN is faster (320 channels: 63 ms
against 98 ms). Over all of the UNet's convolutions, routing maps of at most
:data:`SMALL_MAP` positions to PyTorch's kernels and the rest to oneDNN took the convolutions'
time per step from 2.34 s to 1.39 s at 256 px and from 6.32 s to 4.85 s at 512 px, within 5% of
picking the faster kernel for every single shape (bench/bench_cpu_options.py measures the step).

The choice depends on the shape only, so a run is as reproducible as before. Only float32 CPU
convolutions outside autocast and outside ``torch.compile`` are routed; everything else (GPU,
bf16/fp16, a compiled region) runs as PyTorch would run it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

#: feature maps of at most this many positions (16x16) use PyTorch's own convolution kernels
SMALL_MAP = 256
#: ... when the weight has at least this many elements: below it oneDNN's reorder costs little and
#: the routing's own Python overhead (about 0.7 ms per call, forward and backward) would dominate
#: (the smallest routed weight in SD1.5's UNet, 320 -> 640 channels 1x1, has 204,800)
MIN_WEIGHT = 65536


@contextmanager
def _onednn_off() -> Iterator[None]:
    """oneDNN off for the block (only that switch: torch.backends.mkldnn.flags also resets the
    TF32 and precision settings, and warns about them on every call)."""
    was = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(was)


class _NativeConv2d(torch.autograd.Function):
    """conv2d forward and backward with oneDNN turned off (PyTorch's im2col + GEMM kernels)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        with _onednn_off():
            out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups, bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conf
        wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
        with _onednn_off():
            gx, gw, gb = torch.ops.aten.convolution_backward(
                grad, x, weight, [weight.shape[0]] if has_bias else None, stride, padding, dilation, False,
                [0, 0], groups, wanted)
        return gx, gw, gb, None, None, None, None


def _routed(conv: torch.nn.Conv2d, x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and x.shape[-1] * x.shape[-2] <= SMALL_MAP and conv.weight.numel() >= MIN_WEIGHT
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())


def _conv_forward(conv: torch.nn.Conv2d, original):
    def forward(x, weight, bias):
        if not _routed(conv, x):
            return original(x, weight, bias)
        return _NativeConv2d.apply(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return forward


def route_small_cpu_convolutions(module: torch.nn.Module) -> int:
    """Make ``module``'s 2-D convolutions run small float32 CPU maps through PyTorch's own kernels
    (see the module docstring); returns how many convolutions may be routed. Idempotent.

    The convolution's ``_conv_forward`` is wrapped (not ``forward``), so network plug-ins that
    replace ``forward`` (LoRA, LoCon) keep working whichever is installed first."""
    count = 0
    for conv in module.modules():
        if not isinstance(conv, torch.nn.Conv2d) or getattr(conv, "_small_maps_native", False):
            continue
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            continue  # convolution_backward takes explicit zero padding only
        conv._conv_forward = _conv_forward(conv, conv._conv_forward)
        conv._small_maps_native = True
        count += 1
    return count
