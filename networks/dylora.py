"""DyLoRA (``--network_module networks.dylora``; Valipour et al. 2023, "DyLoRA: Parameter-Efficient
Tuning of Pretrained Models using Dynamic Search-Free Low-Rank Adaptation"), kohya's network arg
``unit`` (rank step, default 1).

The rank ``--network_dim`` is cut into blocks of ``unit`` ranks. At each training step one block
``i`` is drawn; the step uses ranks ``0 .. (i+1)*unit`` at the scale ``alpha / ((i+1)*unit)``, trains
block ``i`` only and holds the blocks before it fixed (they get no gradient, so the optimizer leaves
them as they are). Every leading sub-matrix is thereby trained to work on its own: the saved file
is an ordinary full-rank kohya LoRA, and ``networks/extract_lora_from_dylora.py`` cuts fixed-rank
LoRAs from it (the first ``r`` ranks, alpha unchanged).

Departures from kohya, on purpose: one block is drawn per step for the whole network (kohya draws
per module and per forward call, so gradient checkpointing's recomputation saw other ranks than the
forward pass), from torch's seeded generator.

network_args: ``unit``, ``conv_dim`` / ``conv_alpha`` (3x3 convs too, as networks.lora).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from library.utils.errors import UserError
from networks import lora
from networks.lora_modules import HookedModule

#: create_network_from_weights reads every rank from the file (a DyLoRA file is a kohya LoRA)
SHAPE_FROM_FILE = True
KNOWN_ARGS = {"unit", "conv_dim", "conv_alpha"}


class DyLoRAModule(HookedModule):
    """A LoRA update stored as blocks of ``unit`` ranks (``lora_down_<i>``: (unit, in[, k, k]),
    ``lora_up_<i>``: (out, unit[, 1, 1])), saved and loaded as kohya's full ``lora_down.weight`` /
    ``lora_up.weight`` / ``alpha``."""

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float, dim: int, alpha: float | None,
                 unit: int):
        super().__init__()
        if dim % unit:
            raise UserError(f"networks.dylora: {lora_name}: rank {dim} is not a multiple of unit={unit}")
        self.lora_name, self.unit, self.dim, self.multiplier = lora_name, unit, dim, multiplier
        self.conv = isinstance(org_module, nn.Conv2d)
        in_shape = (org_module.in_channels, *org_module.kernel_size) if self.conv else (org_module.in_features,)
        out = org_module.out_channels if self.conv else org_module.out_features
        down = torch.empty(dim, *in_shape)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # as nn.Linear / kohya's start; up starts at zero
        for i, block in enumerate(down.split(unit)):
            self.register_parameter(f"lora_down_{i}", nn.Parameter(block.clone()))
            self.register_parameter(f"lora_up_{i}", nn.Parameter(torch.zeros(out, unit, *((1, 1) if self.conv
                                                                                            else ()))))
        self.register_buffer("alpha", torch.tensor(float(alpha or dim)))
        self.enabled, self.dropouts = True, None
        self.trained_block: int | None = None  # set each training step by the network
        self._hook_into(org_module)

    @property
    def blocks(self) -> int:
        return self.dim // self.unit

    def _weights(self, used: int, trained: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """down (r, ...) and up (out, r) of the first ``used`` blocks; with ``trained``, the blocks
        before it are detached (held fixed this step)."""
        downs = [getattr(self, f"lora_down_{i}") for i in range(used)]
        ups = [getattr(self, f"lora_up_{i}") for i in range(used)]
        if trained is not None:
            downs = [d.detach() if i < trained else d for i, d in enumerate(downs)]
            ups = [u.detach() if i < trained else u for i, u in enumerate(ups)]
        return torch.cat(downs, 0), torch.cat(ups, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._org_forward(x)
        if not self.enabled or self.multiplier == 0:
            return out
        trained = self.trained_block if self.training else None
        used = trained + 1 if trained is not None else self.blocks
        down, up = self._weights(used, trained)
        x = x.to(down.dtype)
        if self.conv:
            org = self._org[0]
            lx = nn.functional.conv2d(nn.functional.conv2d(x, down, None, org.stride, org.padding, org.dilation), up)
        else:
            lx = nn.functional.linear(nn.functional.linear(x, down), up)
        scale = float(self.alpha) / (used * self.unit)
        return out + (lx * (self.multiplier * scale)).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The full-rank update ``alpha / dim * up @ down`` in the base module's weight shape."""
        down, up = self._weights(self.blocks, None)
        scale = float(self.alpha) / self.dim
        if not self.conv:
            return scale * (up @ down)
        return scale * torch.einsum("or,rikl->oikl", up.flatten(1), down)

    # kohya's file keys: one full matrix each, whatever the block layout in memory
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        down, up = self._weights(self.blocks, None)
        destination[prefix + "lora_down.weight"] = down if keep_vars else down.detach()
        destination[prefix + "lora_up.weight"] = up if keep_vars else up.detach()
        destination[prefix + "alpha"] = self.alpha if keep_vars else self.alpha.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        keys = {k: prefix + k for k in ("lora_down.weight", "lora_up.weight", "alpha")}
        missing_keys.extend(v for v in keys.values() if v not in state_dict)
        if keys["alpha"] in state_dict:
            self.alpha.copy_(state_dict[keys["alpha"]])
        for name, dim in (("lora_down", 0), ("lora_up", 1)):
            key = keys[f"{name}.weight"]
            if key not in state_dict:
                continue
            value = state_dict[key]
            if value.shape[dim] != self.dim:
                error_msgs.append(f"{key}: rank {value.shape[dim]}, this DyLoRA module has rank {self.dim}")
                continue
            with torch.no_grad():
                for i, block in enumerate(value.split(self.unit, dim)):
                    getattr(self, f"{name}_{i}").copy_(block)


class DyLoRANetwork(lora.LoRANetwork):
    """networks.lora's targets and optimizer groups with DyLoRA modules; one rank block per step."""

    apply_max_norm_regularization = None  # block-wise ranks: kohya's max-norm is not defined for them

    def __init__(self, *args, unit: int = 1, **kwargs):
        self.unit = unit  # read by _make_module while the base class builds the modules
        super().__init__(*args, **kwargs)

    def _make_module(self, target, multiplier: float, dim: int, alpha: float | None) -> nn.Module:
        if target.fused:
            raise UserError("networks.dylora is for SD1/SD2/SDXL UNets and CLIP encoders")
        return DyLoRAModule(target.name, target.module, multiplier, dim, alpha, self.unit)

    def on_step_start(self, text_encoder, unet) -> None:
        """Draw this step's rank block (one number, each module's block count scaling it)."""
        draw = float(torch.rand(()))
        for m in self.all_loras():
            m.trained_block = min(int(draw * m.blocks), m.blocks - 1)


def _unit(kwargs: dict) -> int:
    try:
        unit = int(kwargs.get("unit", 1) or 1)
    except ValueError as exc:
        raise UserError(f"--network_args unit={kwargs.get('unit')}: expected a whole number of ranks") from exc
    if unit < 1:
        raise UserError(f"--network_args unit={unit}: at least 1")
    return unit


def check_network_args(kwargs: dict, family: str, neuron_dropout: float | None = None) -> None:
    unknown = sorted(set(kwargs) - KNOWN_ARGS)
    if unknown:
        raise UserError(f"--network_args: unknown key(s) {unknown} for networks.dylora (known: {sorted(KNOWN_ARGS)})")
    if neuron_dropout:
        raise UserError("--network_dropout: networks.dylora has no dropout")
    _unit(kwargs)


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoder,
                   unet, neuron_dropout: float | None = None, **kwargs) -> DyLoRANetwork:
    """kohya's defaults: rank 4, alpha 1, unit 1."""
    check_network_args(kwargs, "", neuron_dropout)
    unit = _unit(kwargs)
    if (network_dim or 4) % unit or (int(kwargs.get("conv_dim", 0) or 0) % unit):
        raise UserError(f"networks.dylora: --network_dim {network_dim or 4} (and conv_dim) must be multiples of "
                        f"unit={unit}")
    rest = {k: v for k, v in kwargs.items() if k != "unit"}
    return lora.build_from_args(functools.partial(DyLoRANetwork, unit=unit), multiplier, network_dim, network_alpha,
                                text_encoder, unet, None, rest)


def create_network_from_weights(multiplier: float, file: str | None, vae, text_encoder, unet, weights_sd=None,
                                for_inference: bool = False, **kwargs):
    """A DyLoRA file is a full-rank kohya LoRA: for generation it loads as one."""
    if not for_inference:
        raise UserError("--dim_from_weights: networks.dylora takes its rank from --network_dim and "
                        "--network_args unit (give those, with --network_weights to start from a file)")
    return lora.build_from_file(lora.LoRANetwork, multiplier, file, text_encoder, unet, weights_sd, True, kwargs)
