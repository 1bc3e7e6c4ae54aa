"""Loss functions. Pure tensor functions."""

from __future__ import annotations

import torch


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample (mean over every dimension but the batch), in float32."""
    err = (prediction.float() - target.float()) ** 2
    return err.mean(dim=tuple(range(1, err.ndim)))


def weighted_batch_loss(per_sample: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Batch mean of per-sample losses times per-sample weights (``prior_loss_weight`` for reg images)."""
    return (per_sample * weights.to(per_sample.device, per_sample.dtype)).mean()
