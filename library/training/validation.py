"""Validation loss on held-out images: deterministic (fixed timesteps, per-sample keyed noise), no
gradients, network in eval mode; logged as kohya names it."""

from __future__ import annotations

import math

import torch

from library.data.batch import TrainBatch
from library.data.dataset import DatasetGroup, to_device
from library.families.base import LoadedModels, ModelFamily
from library.maths.loss import weighted_batch_loss
from library.maths.rng import SampleRNG

VALIDATION_SALT = 0x5EED_0F_7A1  # keeps validation noise apart from training noise of the same keys


def batch_latents(family: ModelFamily, models: LoadedModels, batch: TrainBatch, device, dtype,
                  rng: SampleRNG | None) -> torch.Tensor:
    """The batch's latents: cached ones, or its pixels encoded now (posterior sampled with ``rng``)."""
    with torch.no_grad():
        if batch.latents is not None:
            return batch.latents.to(device, dtype)
        return family.encode_images(models, batch.images.to(device), rng).to(dtype)


def batch_conditioning(family: ModelFamily, models: LoadedModels, batch: TrainBatch, device, dtype,
                       live_encoders: list[int]):
    """The batch's text conditioning: cached, encoded now, or (SD3's --use_t5xxl_cache_only) the
    cached parts of the frozen encoders joined by the parts of ``live_encoders`` encoded now."""
    if batch.conditioning is None:
        return family.encode_prompts(models, batch.captions, device)
    cached = to_device(batch.conditioning, device, dtype)
    if not live_encoders:
        return cached
    return {**cached, **family.encode_prompt_parts(models, batch.captions, device, live_encoders)}


def make_noisy_batch(family: ModelFamily, batch: TrainBatch, latents: torch.Tensor, rng: SampleRNG,
                     timestep: int | None = None):
    """The family's noisy batch for a data batch, carrying the batch's size conditioning."""
    noisy = family.make_noisy_batch(latents, rng, timestep)
    noisy.size_conditioning = batch.size_conditioning.to(latents.device)
    return noisy


class Validator:
    """Computes the mean validation loss over (at most ``max_batches``) held-out batches."""

    def __init__(self, family: ModelFamily, models: LoadedModels, group: DatasetGroup, seed: int,
                 max_batches: int | None, acc, dtype: torch.dtype, live_encoders: list[int] | None = None):
        self.family, self.models, self.group, self.acc, self.dtype = family, models, group, acc, dtype
        self.live_encoders = live_encoders or []
        self.seed = seed ^ VALIDATION_SALT
        self.batches = min(len(group), max_batches) if max_batches else len(group)

    @torch.no_grad()
    def loss(self, network: torch.nn.Module) -> float:
        """Mean loss over the validation batches and the family's fixed timesteps."""
        was_training = network.training
        network.eval()
        total, count = 0.0, 0
        try:
            for index in range(self.batches):
                batch = self.group[(0, index)]  # epoch 0's order: the same batches every time
                for t in self.family.validation_timesteps():
                    rng = SampleRNG(self.seed + t, batch.sample_keys, self.acc.device)
                    latents = batch_latents(self.family, self.models, batch, self.acc.device, self.dtype, rng)
                    with self.acc.autocast():
                        cond = batch_conditioning(self.family, self.models, batch, self.acc.device, self.dtype,
                                                  self.live_encoders)
                        noisy = make_noisy_batch(self.family, batch, latents, rng, timestep=t)
                        pred = self.family.denoise(self.models, noisy, cond)
                    per = self.family.per_sample_loss(pred, noisy, batch.masks)
                    total += weighted_batch_loss(per, batch.loss_weights).item()
                    count += 1
        finally:
            network.train(was_training)
        value = torch.tensor(total / max(count, 1), device=self.acc.device)
        if self.acc.num_processes > 1:
            value = self.acc.reduce(value, reduction="mean")
        result = value.item()
        return result if math.isfinite(result) else float("nan")
