"""Image generation shared by gen_img.py and the sample images made during training.

A :class:`GenBatch` is a group of images that share everything but their prompts and seeds (size,
steps, scale, sampler, strength, network strengths), so one diffusers pipeline call makes them.
Each image has its own seeded generator, so an image does not depend on what it was batched with.
Families supply the pipeline and the prompt embeddings (``ModelFamily.pipeline`` and
``ModelFamily.call_kwargs``); the call itself is here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

KINDS = ("txt2img", "img2img", "inpaint")


@dataclass
class GenBatch:
    """Images made by one pipeline call."""

    prompts: list[str]
    negatives: list[str]
    seeds: list[int]
    width: int = 512
    height: int = 512
    steps: int = 30
    scale: float = 7.5
    sampler: str = "euler_a"
    init_images: list | None = None  # PIL images: img2img / inpaint
    masks: list | None = None  # PIL masks (white = repaint): inpaint
    strength: float = 0.8
    original_size: tuple[int, int] | None = None  # SDXL (height, width); default: the image size
    crop: tuple[int, int] = (0, 0)  # SDXL (top, left)
    negative_scale: float | None = None  # kohya's separate negative-prompt strength (UNet families)
    negative_original_size: tuple[int, int] | None = None  # SDXL, of the negative prediction
    extra: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        if self.masks is not None:
            return "inpaint"
        return "img2img" if self.init_images is not None else "txt2img"


def run_batch(family, models, batch: GenBatch, device: torch.device) -> list:
    """Run one pipeline call for ``batch``; returns PIL images in prompt order."""
    pipe = family.pipeline(models, batch.sampler, batch.kind)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in batch.seeds]
    with torch.no_grad():
        kwargs = family.call_kwargs(models, batch, device)
        if batch.negative_scale is not None:
            _use_negative_scale(family, models, pipe, batch, device)
    kwargs.update(num_inference_steps=batch.steps, guidance_scale=batch.scale, generator=generators)
    if batch.kind == "txt2img":
        kwargs.update(width=batch.width, height=batch.height)
    else:
        import inspect

        images = [im.convert("RGB").resize((batch.width, batch.height)) for im in batch.init_images]
        kwargs.update(image=images, strength=batch.strength)
        if "height" in inspect.signature(pipe.__call__).parameters:  # SD3's img2img would pick its own size
            kwargs.update(width=batch.width, height=batch.height)
        if batch.kind == "inpaint":
            masks = [m.convert("L").resize((batch.width, batch.height)) for m in batch.masks]
            kwargs.update(mask_image=masks, width=batch.width, height=batch.height)
    with torch.no_grad():
        return pipe(**kwargs).images


def _use_negative_scale(family, models, pipe, batch: GenBatch, device) -> None:
    """Swap the pipeline's UNet for kohya's three-prediction guidance (see negative_scale.py)."""
    from library.sampling.negative_scale import NegativeScaleUNet
    from library.utils.errors import UserError

    if not family.negative_scale_supported:
        raise UserError(f"--negative_scale / --nl are not available for {family.name} models")
    empty = family.call_kwargs(models, GenBatch([""], [""], [0], batch.width, batch.height), device)
    keep = {k: empty[k] for k in ("prompt_embeds", "pooled_prompt_embeds") if k in empty}
    pipe.unet = NegativeScaleUNet(models.denoiser, keep, batch.scale, batch.negative_scale)
