"""Image generation shared by gen_img.py and the sample images made during training.

A :class:`GenBatch` is a group of images that share everything but their prompts and seeds (size,
steps, scale, sampler, strength, network strengths), so one diffusers pipeline call makes them.
Each image has its own seeded generator, so an image does not depend on what it was batched with.
Families supply the pipeline and the prompt embeddings (``ModelFamily.pipeline`` and
``ModelFamily.call_kwargs``); the call itself is here.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image

from library.sampling.controlnet import ControlNetUse, control_kwargs
from library.sampling.deep_shrink import DeepShrink, apply_deep_shrink, check_deep_shrink
from library.sampling.gradual_latent import GradualLatent, use_gradual_latent
from library.sampling.lllite import LLLiteSchedule, LLLiteUse
from library.sampling.negative_scale import NegativeScaleUNet
from library.sampling.regional import RegionalLoRA
from library.sampling.samplers import canonical_sampler
from library.sampling.start_noise import NoiseTricks, start_latents
from library.utils.errors import UserError

KINDS = ("txt2img", "img2img", "inpaint")


class PooledFromImage(Protocol):
    """kohya's --clip_vision_strength: the pooled text embedding replaced by one of the init image."""

    def __call__(self, images: list[Image.Image] | torch.Tensor, pooled: torch.Tensor) -> torch.Tensor: ...


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
    init_images: list[Image.Image] | torch.Tensor | None = None  # img2img / inpaint (latents: highres fix)
    masks: list[Image.Image] | None = None  # white = repaint: inpaint
    strength: float = 0.8
    original_size: tuple[int, int] | None = None  # SDXL (height, width); default: the image size
    crop: tuple[int, int] = (0, 0)  # SDXL (top, left)
    negative_scale: float | None = None  # kohya's separate negative-prompt strength (UNet families)
    negative_original_size: tuple[int, int] | None = None  # SDXL, of the negative prediction
    deep_shrink: DeepShrink | None = None  # UNet families
    gradual_latent: GradualLatent | None = None  # UNet families, euler_a, text-to-image
    noise_tricks: NoiseTricks | None = None  # text-to-image
    ddim_eta: float | None = None  # the ddim sampler's eta
    zero_steps_offset: bool = False  # kohya's --force_scheduler_zero_steps_offset
    vae_batch_size: float | None = None  # images decoded at a time (below 1: a fraction of the batch)
    controlnets: tuple[ControlNetUse, ...] = ()  # applied with guide_images
    lllites: tuple[LLLiteUse, ...] = ()  # SDXL, applied with guide_images
    guide_images: list[Image.Image] | None = None  # one per image
    regional: RegionalLoRA | None = None  # AND sub-prompts over LoRA regions
    clip_vision: PooledFromImage | None = None  # SDXL img2img's pooled text from the image

    @property
    def kind(self) -> str:
        if self.masks is not None:
            return "inpaint"
        return "img2img" if self.init_images is not None else "txt2img"


def run_batch(family, models, batch: GenBatch, device: torch.device, output_type: str = "pil"):
    """Run one pipeline call for ``batch``; returns PIL images in prompt order (or the latents, with
    ``output_type="latent"``). ``init_images`` may be latents (a tensor), e.g. the highres fix's."""

    controlnet = None
    if batch.controlnets:
        models_of = [u.model for u in batch.controlnets]
        controlnet = models_of[0] if len(models_of) == 1 else models_of
    pipe = family.pipeline(models, batch.sampler, batch.kind, controlnet)
    pipe.set_progress_bar_config(disable=True)
    if batch.zero_steps_offset:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, steps_offset=0)
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in batch.seeds]
    _check_tricks(family, models, batch)
    with torch.no_grad():
        kwargs = batch.regional.call_kwargs(family, models, batch, device) if batch.regional \
            else family.call_kwargs(models, batch, device)
        if batch.clip_vision is not None and batch.kind != "txt2img":
            kwargs["pooled_prompt_embeds"] = batch.clip_vision(batch.init_images, kwargs["pooled_prompt_embeds"])
        if batch.negative_scale is not None:
            _use_negative_scale(family, models, pipe, batch, device)
    kwargs.update(num_inference_steps=batch.steps, guidance_scale=batch.scale, generator=generators)
    if batch.ddim_eta is not None and "eta" in inspect.signature(pipe.__call__).parameters:
        kwargs["eta"] = batch.ddim_eta  # diffusers hands it to schedulers that use it (ddim)
    if batch.kind == "txt2img":
        kwargs.update(_start_kwargs(pipe, models, batch, generators, kwargs["prompt_embeds"].dtype, device))
    else:
        kwargs.update(_init_image_kwargs(pipe, batch))
    if batch.controlnets:
        key = "image" if batch.kind == "txt2img" else "control_image"
        kwargs.update(control_kwargs(batch.controlnets, batch.guide_images, batch.width, batch.height, key))
    chunk = _vae_chunk(batch)
    regional = batch.regional.active(models.denoiser, batch) if batch.regional else contextlib.nullcontext()
    with torch.no_grad(), apply_deep_shrink(models.denoiser, batch.deep_shrink), _lllites(batch, kwargs, device), \
            regional:
        if output_type != "pil" or chunk >= len(batch.prompts):
            return pipe(**kwargs, output_type=output_type).images
        latents = pipe(**kwargs, output_type="latent").images
    return [im for i in range(0, len(latents), chunk) for im in decode_latents(pipe, latents[i:i + chunk])]


@contextlib.contextmanager
def _lllites(batch: GenBatch, kwargs: dict, device):
    """The batch's guides set into its LLLites for the call (switched off on their schedule, and after)."""
    if not batch.lllites:
        yield
        return

    schedule = LLLiteSchedule(batch.lllites, batch.guide_images, batch.width, batch.height, device)
    kwargs["callback_on_step_end"] = schedule
    try:
        yield
    finally:
        schedule.close()


def _vae_chunk(batch: GenBatch) -> int:
    size = batch.vae_batch_size
    if not size:
        return len(batch.prompts)
    return max(1, int(len(batch.prompts) * size) if size < 1 else int(size))


def decode_latents(pipe, latents: torch.Tensor) -> list:
    """PIL images of a pipeline's ``output_type="latent"`` result (its VAE's scaling and shift undone)."""
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample
    return pipe.image_processor.postprocess(decoded, output_type="pil")


def _start_kwargs(pipe, models, batch: GenBatch, generators, dtype, device) -> dict:
    """Text-to-image: the size, and the start noise when Gradual Latent or a noise trick changes it
    (Gradual Latent also swaps in its scheduler)."""
    kwargs = {"width": batch.width, "height": batch.height}
    if batch.gradual_latent is not None:
        use_gradual_latent(pipe, batch.gradual_latent, batch.height, batch.width)
    if batch.gradual_latent is not None or batch.noise_tricks is not None:
        kwargs["latents"] = start_latents(pipe, models, batch, generators, dtype, device)
    return kwargs


def _init_image_kwargs(pipe, batch: GenBatch) -> dict:
    """img2img / inpainting: the init images (or latents), strength, masks and size."""
    images = batch.init_images if isinstance(batch.init_images, torch.Tensor) else \
        [im.convert("RGB").resize((batch.width, batch.height)) for im in batch.init_images]
    kwargs = {"image": images, "strength": batch.strength}
    if "height" in inspect.signature(pipe.__call__).parameters:  # SD3's img2img would pick its own size
        kwargs.update(width=batch.width, height=batch.height)
    if batch.kind == "inpaint":
        masks = [m.convert("L").resize((batch.width, batch.height)) for m in batch.masks]
        kwargs.update(mask_image=masks, width=batch.width, height=batch.height)
    return kwargs


def _check_tricks(family, models, batch: GenBatch) -> None:
    """Deep Shrink and Gradual Latent need a UNet (and Gradual Latent euler_a and text-to-image)."""

    if (batch.deep_shrink or batch.gradual_latent) and not family.unet_denoiser:
        raise UserError(f"Deep Shrink and Gradual Latent work on UNet models (SD1/SD2/SDXL), not {family.name}")
    if batch.regional is not None:
        others = [name for name, used in (("Deep Shrink", batch.deep_shrink), ("Gradual Latent", batch.gradual_latent),
                                          ("--negative_scale", batch.negative_scale is not None),
                                          ("ControlNet", batch.controlnets), ("LLLite", batch.lllites)) if used]
        if others:
            raise UserError(f"regional LoRA cannot be combined with {', '.join(others)}")
        batch.regional.check_batch(batch)
    if batch.lllites and (batch.deep_shrink or batch.gradual_latent):
        raise UserError("ControlNet-LLLite cannot be combined with Deep Shrink or Gradual Latent (its guide is "
                        "embedded at the UNet's own resolutions)")
    if batch.controlnets and (batch.deep_shrink or batch.gradual_latent or batch.negative_scale is not None):
        raise UserError("ControlNet cannot be combined with Deep Shrink, Gradual Latent or --negative_scale/--nl "
                        "(their UNet calls do not carry the ControlNet's residuals at matching sizes)")
    if batch.deep_shrink is not None:
        check_deep_shrink(batch.deep_shrink, models.denoiser)
    if batch.gradual_latent is not None:
        if canonical_sampler(batch.sampler) != "euler_a":
            raise UserError(f"Gradual Latent needs the euler_a sampler (this line uses {batch.sampler}); "
                            "use --sampler euler_a or --ss euler_a")
        if batch.kind != "txt2img":
            raise UserError("Gradual Latent is for text-to-image; drop it for img2img and inpainting lines")
        batch.gradual_latent.check()


def _use_negative_scale(family, models, pipe, batch: GenBatch, device) -> None:
    """Swap the pipeline's UNet for kohya's three-prediction guidance (see negative_scale.py)."""
    if not family.negative_scale_supported:
        raise UserError(f"--negative_scale / --nl are not available for {family.name} models")
    empty = family.call_kwargs(models, GenBatch([""], [""], [0], batch.width, batch.height), device)
    keep = {k: empty[k] for k in ("prompt_embeds", "pooled_prompt_embeds") if k in empty}
    pipe.unet = NegativeScaleUNet(models.denoiser, keep, batch.scale, batch.negative_scale)
