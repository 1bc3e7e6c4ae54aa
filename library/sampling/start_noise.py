"""The noise a text-to-image call starts from, when gen_img changes it.

Drawn from the images' own generators exactly as diffusers' pipelines draw it (so an image whose
noise is left alone is the image the pipeline would make), then optionally altered per image by
kohya's noise tricks and shrunk for Gradual Latent. The pipeline then scales it by its scheduler's
initial sigma as it does its own noise.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from library.maths.noise import multires_noise
from library.maths.rng import SampleRNG
from library.sampling.gradual_latent import initial_latents

logger = logging.getLogger(__name__)

PYRAMID_LEVELS = 6  # kohya's pyramid noise at generation time uses six levels


@dataclass(frozen=True)
class NoiseTricks:
    """``--pyramid_noise_prob/--pyramid_noise_discount_range`` and
    ``--noise_offset_prob/--noise_offset_range``: each image, with the given probability, gets
    pyramid noise with a discount drawn from the range, and/or one constant offset drawn from the
    range added to every value of its noise. The draws come from the image's seed."""

    pyramid_prob: float = 0.0
    pyramid_discount_range: tuple[float, float] = (0.3, 0.8)
    offset_prob: float = 0.0
    offset_range: tuple[float, float] = (-0.1, 0.1)

    def apply(self, noise: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict[str, float]]:
        """(noise of one image (1, C, H, W), what was applied) for the image with ``seed``."""
        draw = random.Random(f"noise tricks {seed}")
        applied = {}
        if draw.random() < self.pyramid_prob:
            discount = draw.uniform(*self.pyramid_discount_range)
            noise = multires_noise(noise, PYRAMID_LEVELS, discount, SampleRNG(seed, [(0, 0, 0)], noise.device))
            applied["pyramid noise discount"] = round(discount, 4)
        if draw.random() < self.offset_prob:
            offset = draw.uniform(*self.offset_range)
            noise = noise + offset
            applied["noise offset"] = round(offset, 4)
        return noise, applied


def start_latents(pipe, models, batch, generators: list[torch.Generator], dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """The batch's unit start noise (what the noise tricks did is logged per seed)."""
    channels = models.denoiser.config.in_channels
    f = pipe.vae_scale_factor
    shape = (len(generators), channels, batch.height // f, batch.width // f)
    noise = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
    if batch.noise_tricks is not None:
        images = []
        for i, seed in enumerate(batch.seeds):
            one, applied = batch.noise_tricks.apply(noise[i:i + 1].float(), int(seed))
            if applied:
                logger.info("seed %s: %s", seed, ", ".join(f"{k} {v}" for k, v in applied.items()))
            images.append(one.to(dtype))
        noise = torch.cat(images)
    if batch.gradual_latent is not None:
        noise = initial_latents(noise, batch.gradual_latent)
    return noise
