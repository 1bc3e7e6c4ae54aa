"""kohya's ``--negative_scale`` for the UNet families: a separate strength for the negative prompt.

kohya's guidance runs three predictions per step, with the empty prompt (u), the negative prompt
(n) and the prompt (c), and combines them as

    u + scale * (c - u) - negative_scale * (n - u)

diffusers' pipelines run two, (a, c), and combine them as a + scale * (c - a). This wrapper around
the UNet is given the pipeline's (negative, prompt) batch, adds the empty-prompt prediction, and
hands back a = u + negative_scale * (n - u) / (scale - 1) in the first half, so diffusers' own
combination gives exactly kohya's. It needs scale > 1 (diffusers skips guidance otherwise).
"""

from __future__ import annotations

import torch

from library.utils.errors import UserError


class _Output:
    def __init__(self, sample: torch.Tensor):
        self.sample = sample

    def __getitem__(self, index):
        return (self.sample,)[index]


class NegativeScaleUNet(torch.nn.Module):
    """Wraps a UNet for one pipeline call; everything else is passed through to the UNet."""

    def __init__(self, unet: torch.nn.Module, empty: dict, scale: float, negative_scale: float):
        """``empty``: the family's call arguments for the empty prompt (``prompt_embeds`` and, for
        SDXL, ``pooled_prompt_embeds``), one row."""
        super().__init__()
        if scale <= 1:
            raise UserError(f"--negative_scale needs a CFG scale above 1 (got {scale})")
        self.inner = unet
        self.empty = empty
        self.scale, self.negative_scale = scale, negative_scale

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, return_dict=True,
                **kwargs):
        out = self.inner(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=added_cond_kwargs,
                         return_dict=False, **kwargs)[0]
        half = sample.shape[0] // 2
        empty_states = self.empty["prompt_embeds"].to(encoder_hidden_states).expand(half, -1, -1)
        added = None
        if added_cond_kwargs is not None:
            added = {k: v[:half] for k, v in added_cond_kwargs.items()}
            if "pooled_prompt_embeds" in self.empty:
                added["text_embeds"] = self.empty["pooled_prompt_embeds"].to(added["text_embeds"]).expand(half, -1)
        step = timestep[:half] if torch.is_tensor(timestep) and timestep.ndim else timestep
        uncond = self.inner(sample[:half], step, empty_states, *args, added_cond_kwargs=added, return_dict=False,
                            **kwargs)[0]
        negative, positive = out[:half], out[half:]
        first = uncond + self.negative_scale * (negative - uncond) / (self.scale - 1)
        result = torch.cat([first, positive])
        return _Output(result) if return_dict else (result,)
