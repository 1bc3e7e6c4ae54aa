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


def make_noisy_batch(family: ModelFamily, batch: TrainBatch, latents: torch.Tensor, rng: SampleRNG,
                     timestep: int | None = None):
    """The family's noisy batch for a data batch, carrying the batch's size conditioning."""
    noisy = family.make_noisy_batch(latents, rng, timestep)
    noisy.size_conditioning = batch.size_conditioning.to(latents.device)
    return noisy


class Validator:
    """Computes the mean validation loss over (at most ``max_batches``) held-out batches."""

    def __init__(self, family: ModelFamily, models: LoadedModels, group: DatasetGroup, seed: int,
                 max_batches: int | None, acc, dtype: torch.dtype):
        self.family, self.models, self.group, self.acc, self.dtype = family, models, group, acc, dtype
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
                        cond = to_device(batch.conditioning, self.acc.device, self.dtype) \
                            if batch.conditioning is not None \
                            else self.family.encode_prompts(self.models, batch.captions, self.acc.device)
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
