"""Deep Shrink (kohya's "hires fix" inside the UNet) for diffusers' UNet2DConditionModel.

While the timestep is high (early, composition-forming steps), the hidden states entering one of
the UNet's input blocks are shrunk by ``ratio`` (bicubic), so the deep layers see an image the size
they were trained on even when a large image is asked for; on the way up, a hidden state that no
longer matches the size of its skip connection is enlarged back to it (bicubic) before the two are
joined. Low timesteps (details) run the UNet unchanged.

Depths count kohya's (original SD) input blocks: 0 is ``conv_in``, then each down block's resnets
(with their attention) and its downsampler in order, so SD1 has depths 0-11 and SDXL 0-8. Two
depths may be given: depth 1 for ``t >= timesteps_1`` and depth 2 for ``timesteps_2 <= t <
timesteps_1``.

Done with forward hooks, so diffusers' own UNet forward (and any LoRA hooks) run unchanged:

* a pre-hook on the UNet records the timestep of the call;
* a pre-hook on the module at the chosen depth shrinks its input;
* on the way up, the hidden state is compared with the skip it is about to be joined with: at the
  start of each up block (a pre-hook on the block) and between its layers (a hook on the layer that
  feeds the next join).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from library.utils.errors import UserError


@dataclass(frozen=True)
class DeepShrink:
    """kohya's ``--ds_depth_1 --ds_timesteps_1 --ds_depth_2 --ds_timesteps_2 --ds_ratio``."""

    depth_1: int
    timesteps_1: int = 650
    depth_2: int | None = None
    timesteps_2: int = 650
    ratio: float = 0.5

    def depth_at(self, t: float) -> int | None:
        """The depth to shrink at timestep ``t``, or None (run the UNet unchanged)."""
        if t >= self.timesteps_1:
            return self.depth_1
        if self.depth_2 is not None and self.timesteps_2 <= t < self.timesteps_1:
            return self.depth_2
        return None


def resize(x: torch.Tensor, size=None, scale: float | None = None) -> torch.Tensor:
    """Bicubic resize (computed in float32: bicubic is not implemented for bfloat16 everywhere)."""
    out = F.interpolate(x.float(), size=size, scale_factor=scale, mode="bicubic", align_corners=False)
    return out.to(x.dtype)


def input_block_modules(unet) -> list[torch.nn.Module]:
    """The first module of each of kohya's input blocks, in depth order (see the module docstring)."""
    modules = [unet.conv_in]
    for block in unet.down_blocks:
        modules.extend(block.resnets)
        if block.downsamplers:
            modules.append(block.downsamplers[0])
    return modules


def check_deep_shrink(ds: DeepShrink, unet) -> None:
    """Depths a UNet has (depth 0 would shrink the whole UNet's output too) and a ratio in (0, 1)."""
    deepest = len(input_block_modules(unet)) - 1
    for name, depth in (("depth 1", ds.depth_1), ("depth 2", ds.depth_2)):
        if depth is not None and not 1 <= depth <= deepest:
            raise UserError(f"Deep Shrink {name} is {depth}; this UNet's input blocks are 1-{deepest}")
    if not 0 < ds.ratio < 1:
        raise UserError(f"Deep Shrink ratio {ds.ratio} must be between 0 and 1 (e.g. 0.5)")


class _Hooks:
    """The hooks of one ``apply_deep_shrink``; ``state`` holds the current call's timestep."""

    def __init__(self, unet, ds: DeepShrink):
        self.ds = ds
        self.depth_modules = input_block_modules(unet)
        self.timestep: float | None = None
        self.skips: list[torch.Tensor] = []  # the current up block's skips, in the order joined

    def on_unet(self, module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        self.timestep = float(torch.as_tensor(t).flatten()[0])

    def on_depth(self, depth: int):
        def hook(module, args):
            if self.timestep is not None and self.ds.depth_at(self.timestep) == depth:
                return (resize(args[0], scale=self.ds.ratio), *args[1:])
            return None

        return hook

    def on_up_block(self, module, args, kwargs):
        # the block joins its skips last-first; remember them for the joins inside the block
        self.skips = list(reversed(kwargs["res_hidden_states_tuple"]))
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[-2:] == self.skips[0].shape[-2:]:
            return None
        hidden = resize(hidden, size=self.skips[0].shape[-2:])
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def before_join(self, index: int):
        """A forward hook on the layer whose output is joined with the block's skip ``index``."""

        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            target = self.skips[index].shape[-2:] if index < len(self.skips) else hidden.shape[-2:]
            if hidden.shape[-2:] == target:
                return None
            hidden = resize(hidden, size=target)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook


@contextlib.contextmanager
def apply_deep_shrink(unet, ds: DeepShrink | None):
    """Install Deep Shrink on ``unet`` for the duration of the ``with`` block (nothing when None)."""
    if ds is None:
        yield
        return
    hooks = _Hooks(unet, ds)
    handles = [unet.register_forward_pre_hook(hooks.on_unet, with_kwargs=True)]
    for depth in {ds.depth_1, ds.depth_2} - {None}:
        handles.append(hooks.depth_modules[depth].register_forward_pre_hook(hooks.on_depth(depth)))
    for block in unet.up_blocks:
        handles.append(block.register_forward_pre_hook(hooks.on_up_block, with_kwargs=True))
        feeders = block.attentions if getattr(block, "attentions", None) else block.resnets
        for i, layer in enumerate(list(feeders)[:-1]):
            handles.append(layer.register_forward_hook(hooks.before_join(i + 1)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
