"""The smallest network plug-in the contract allows (docs/architecture.md, "Adding a network
plug-in"): the four methods training needs and nothing else. It adds one learned value per output
channel to the denoiser's last convolution. Used by tests/networks/test_minimal_plugin.py as
``--network_module tests.networks.minimal_plugin``."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class ChannelBias(nn.Module):
    def __init__(self, unet: nn.Module, multiplier: float):
        super().__init__()
        self.multiplier = multiplier
        self.bias = nn.Parameter(torch.zeros(unet.conv_out.out_channels))
        self._target = unet.conv_out

    def apply_to(self, text_encoder, unet, apply_text_encoder=True, apply_unet=True):
        self._target.register_forward_hook(
            lambda module, inputs, out: out + self.multiplier * self.bias.to(out).view(1, -1, 1, 1))

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
        return [{"params": [self.bias], "lr": unet_lr or default_lr}]

    def get_trainable_params(self):
        return [self.bias]

    def save_weights(self, file, dtype, metadata):
        save_file({"bias": self.bias.detach().to("cpu", dtype or torch.float32).contiguous()}, file, metadata or {})


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, **network_args):
    return ChannelBias(unet, multiplier)


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                **kwargs):
    weights_sd = weights_sd if weights_sd is not None else load_file(file)
    return ChannelBias(unet, multiplier), weights_sd
