"""LoRA modules: the low-rank update of one Linear/Conv2d, and of several Linear layers that the
original checkpoint layout stores as one fused matrix (SD3's q/k/v)."""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Dropouts:
    """kohya's training-only regularisers of a LoRA module (probabilities in [0, 1); None or 0 = off).
    They act only while the network is in training mode, and draw from torch's global generator, so a
    run is reproducible from its seed (and gradient checkpointing replays the same draws)."""

    neuron: float | None = None  # --network_dropout (network arg ``dropout``): each unit of lora_down's output
    rank: float | None = None  # ``rank_dropout``: whole ranks per sample, the rest scaled up by 1 / (1 - p)
    module: float | None = None  # ``module_dropout``: the whole update left out for a forward call

    @property
    def active(self) -> bool:
        return bool(self.neuron or self.rank or self.module)


def skip_module(dropouts: Dropouts | None, training: bool) -> bool:
    """module_dropout: leave this LoRA out of the current forward call with probability p."""
    return bool(training and dropouts is not None and dropouts.module and
                torch.rand(()) < dropouts.module)


def drop_down_output(down: torch.Tensor, scale: float, dropouts: Dropouts | None,
                     training: bool) -> tuple[torch.Tensor, float]:
    """Neuron and rank dropout on ``lora_down``'s output (rank on dim -1 for Linear, dim 1 for
    Conv2d outputs); returns the output and the scale to use (rank dropout keeps the expected
    update unchanged by scaling it by 1 / (1 - p), as kohya does)."""
    if not training or dropouts is None:
        return down, scale
    if dropouts.neuron:
        down = torch.nn.functional.dropout(down, p=dropouts.neuron)
    if dropouts.rank:
        rank_dim = 1 if down.ndim == 4 else down.ndim - 1
        shape = [down.shape[0] if d == 0 else (down.shape[d] if d == rank_dim else 1) for d in range(down.ndim)]
        keep = torch.rand(shape, device=down.device) > dropouts.rank
        down = down * keep.to(down.dtype)
        scale = scale / (1.0 - dropouts.rank)
    return down, scale


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _init_lora(module: nn.Module, dim: int, alpha: float | None, multiplier: float) -> None:
    """kohya's start: ``lora_down`` Kaiming-uniform, ``lora_up`` zero (so training starts from the
    base model), alpha stored as a buffer (alpha 0/None means alpha = rank: scale 1)."""
    nn.init.kaiming_uniform_(module.lora_down.weight, a=math.sqrt(5))
    nn.init.zeros_(module.lora_up.weight)
    alpha = dim if not alpha else alpha
    module.register_buffer("alpha", torch.tensor(float(alpha)))
    module.scale = float(alpha) / dim
    module.multiplier = multiplier
    module.enabled = True
    module.dropouts = None  # Dropouts while training (set by the network)
    module.region = None  # gen_img's regional LoRA: a callable giving the mask the update is multiplied by


class HookedModule(nn.Module):
    """A module that takes over one base module's forward (``apply_to``) and gives it back
    (``remove``); the base module is kept in a list, so it is not registered as a child."""

    def _hook_into(self, org_module: nn.Module) -> None:
        self._org = [org_module]
        self._org_forward = None

    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    def apply_to(self) -> None:
        """Route the base module's forward through this module."""
        org = self._org[0]
        self._org_forward = org.forward
        org.forward = self.forward

    def remove(self) -> None:
        """Restore the base module's own forward."""
        if self._org_forward is not None:
            self._org[0].forward = self._org_forward
            self._org_forward = None


class LoRAModule(HookedModule):
    """The low-rank update of one Linear or Conv2d, hooked into that module's forward."""

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float, dim: int, alpha: float | None,
                 swap_out_halves: bool = False):
        """``swap_out_halves``: the file stores the update's output rows as (b, a) where the module
        has (a, b) (SD3's final adaLN modulations, (shift, scale) vs diffusers' (scale, shift))."""
        super().__init__()
        self.swap_out_halves = swap_out_halves
        self.lora_name = lora_name
        if isinstance(org_module, nn.Conv2d):
            self.lora_down = nn.Conv2d(org_module.in_channels, dim, org_module.kernel_size, org_module.stride,
                                       org_module.padding, bias=False)
            self.lora_up = nn.Conv2d(dim, org_module.out_channels, 1, 1, bias=False)
        else:
            self.lora_down = nn.Linear(org_module.in_features, dim, bias=False)
            self.lora_up = nn.Linear(dim, org_module.out_features, bias=False)
        _init_lora(self, dim, alpha, multiplier)
        self._hook_into(org_module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._org_forward(x)
        if not self.enabled or self.multiplier == 0 or skip_module(self.dropouts, self.training):
            return out
        down = self.lora_down(x.to(self.lora_down.weight.dtype))
        down, scale = drop_down_output(down, self.scale, self.dropouts, self.training)
        lx = torch.nn.functional.linear(down, _swap_halves(self.lora_up.weight)) if self.swap_out_halves else \
            self.lora_up(down)
        if self.region is not None:
            lx = lx * self.region(lx)
        return out + (lx * (self.multiplier * scale)).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The merged weight update ``scale * up @ down`` in the base module's weight shape."""
        up, down = self.lora_up.weight, self.lora_down.weight
        if up.ndim == 2:
            return self.scale * ((_swap_halves(up) if self.swap_out_halves else up) @ down)
        if down.shape[2:] == (1, 1):
            return self.scale * (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], down.shape[1], 1, 1)
        return self.scale * torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)


class FusedLoRAModule(nn.Module):
    """One LoRA over several Linear layers that read the same input and that the original layout
    stores as one matrix (SD3's fused q/k/v): a shared ``lora_down`` (r, in) and one ``lora_up``
    (sum of the layers' outputs, r) whose row blocks belong to the layers in order, exactly the
    shapes kohya writes for ``..._attn_qkv``."""

    def __init__(self, lora_name: str, org_modules: list[nn.Module], multiplier: float, dim: int,
                 alpha: float | None):
        super().__init__()
        self.lora_name = lora_name
        self.splits = [m.out_features for m in org_modules]
        self.lora_down = nn.Linear(org_modules[0].in_features, dim, bias=False)
        self.lora_up = nn.Linear(dim, sum(self.splits), bias=False)
        _init_lora(self, dim, alpha, multiplier)
        self._orgs = list(org_modules)  # a plain list: the base modules are not children
        self._org_forwards: list = []
        # with dropout, the layers reading one input share one draw, as kohya's single qkv matrix
        # does: (weak ref to the input, its dropped lora_down output or None when skipped, scale)
        self._shared: tuple | None = None

    def apply_to(self) -> None:
        starts = [sum(self.splits[:i]) for i in range(len(self.splits))]
        self._org_forwards = [m.forward for m in self._orgs]
        for i, m in enumerate(self._orgs):
            m.forward = self._hook(i, starts[i])

    def _hook(self, i: int, start: int):
        def forward(x: torch.Tensor) -> torch.Tensor:
            out = self._org_forwards[i](x)
            if not self.enabled or self.multiplier == 0:
                return out
            up = self.lora_up.weight[start:start + self.splits[i]]
            down, scale = self._down(x)
            if down is None:
                return out
            lx = torch.nn.functional.linear(down, up)
            return out + (lx * (self.multiplier * scale)).to(out.dtype)
        return forward

    def _down(self, x: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        """``lora_down(x)`` and the scale, with the dropouts drawn once per input (None: module dropped)."""
        inp = x.to(self.lora_down.weight.dtype)
        if not (self.training and self.dropouts is not None and self.dropouts.active):
            return self.lora_down(inp), self.scale
        if self._shared is not None and self._shared[0]() is x:
            return self._shared[1], self._shared[2]
        down, scale = (None, self.scale) if skip_module(self.dropouts, True) else \
            drop_down_output(self.lora_down(inp), self.scale, self.dropouts, True)
        self._shared = (weakref.ref(x), down, scale)
        return down, scale

    def remove(self) -> None:
        for m, f in zip(self._orgs, self._org_forwards):
            m.forward = f
        self._org_forwards = []

    def delta_weight(self) -> torch.Tensor:
        """The fused update ``scale * up @ down`` (rows of all layers, in order)."""
        return self.scale * (self.lora_up.weight @ self.lora_down.weight)
