"""Loss functions. Pure tensor functions."""

from __future__ import annotations

import torch

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")


def elementwise_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """Per-element loss in float32: squared error (l2), absolute error (l1), pseudo-Huber
    ``2c(sqrt(d^2 + c^2) - c)`` (huber) or ``2(sqrt(d^2 + c^2) - c)`` (smooth_l1), with a per-sample c."""
    d = prediction.float() - target.float()
    if loss_type == "l2":
        return d ** 2
    if loss_type == "l1":
        return d.abs()
    if loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss_type {loss_type} needs huber_c")
        c = huber_c.float().view(-1, *([1] * (d.ndim - 1)))
        core = torch.sqrt(d ** 2 + c ** 2) - c
        return 2 * c * core if loss_type == "huber" else 2 * core
    raise ValueError(f"unknown loss_type {loss_type!r}")


def per_sample_mean(loss: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch."""
    return loss.mean(dim=tuple(range(1, loss.ndim)))


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample (mean over every dimension but the batch), in float32."""
    return per_sample_mean(elementwise_loss(prediction, target, "l2"))


def weighted_batch_loss(per_sample: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Batch mean of per-sample losses times per-sample weights (``prior_loss_weight`` for reg images)."""
    return (per_sample * weights.to(per_sample.device, per_sample.dtype)).mean()


def apply_mask(loss: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Weight a per-element loss (B, C, h, w) by a pixel mask (B, 1, H, W) in [0, 1], resized to
    (h, w) by area averaging. Like kohya, the result is not renormalised by the mask's area, so a
    mostly masked image contributes a smaller loss."""
    if mask is None:
        return loss
    mask = mask.to(loss.device, torch.float32)
    if mask.shape[-2:] != loss.shape[-2:]:
        mask = torch.nn.functional.interpolate(mask, size=loss.shape[-2:], mode="area")
    return loss * mask
