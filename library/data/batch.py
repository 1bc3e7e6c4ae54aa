"""What one training step gets from the data: a typed record instead of a string-keyed dict."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TrainBatch:
    """One process's share of a global batch (see ``BucketBatchDataset.make_batch``).

    Exactly one of ``latents`` (all samples cached) and ``images`` (pixels in [-1, 1]) is set;
    ``conditioning`` is set when every sample has cached text-encoder outputs, ``masks`` when any
    sample has a mask (alpha or conditioning-folder masks)."""

    captions: list[str]
    loss_weights: torch.Tensor  # (B,) prior_loss_weight for regularisation images, else 1
    paths: list[str]
    original_sizes: list[tuple[int, int]]  # (width, height) of each image file
    #: (epoch, batch index, position in the global batch) per sample: seeds every random draw
    sample_keys: list[tuple[int, int, int]]
    #: (B, 6) original h, w, crop top, left, target h, w of each sample (SDXL conditions on them)
    size_conditioning: torch.Tensor
    network_multiplier: float = 1.0
    custom_attributes: list[dict] = field(default_factory=list)
    latents: torch.Tensor | None = None
    images: torch.Tensor | None = None
    conditioning: torch.Tensor | dict[str, torch.Tensor] | Any | None = None
    masks: torch.Tensor | None = None  # (B, 1, H, W) in [0, 1]
