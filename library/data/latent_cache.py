"""Latent caching in memory: each image is encoded once, in VAE batches grouped by bucket."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from tqdm import tqdm

from library.data.dataset import DatasetGroup


@torch.no_grad()
def cache_latents_in_memory(group: DatasetGroup, encode: Callable[[torch.Tensor], torch.Tensor],
                            batch_size: int, show_progress: bool = True) -> None:
    """Encode every image of the group (and its mirror image where flip_aug is on)."""
    by_bucket = defaultdict(list)
    for ds in group.datasets:
        for item in ds.items:
            if item.latents is None:
                by_bucket[item.bucket].append((ds, item))
    chunks = [members[i:i + batch_size] for members in by_bucket.values() for i in range(0, len(members), batch_size)]
    for chunk in tqdm(chunks, desc="caching latents", disable=not show_progress):
        pixels = torch.stack([ds.load_pixels(item, flip=False) for ds, item in chunk])
        latents = encode(pixels).float().cpu()
        flipped = None
        if any(item.subset.flip_aug for _, item in chunk):
            flipped = encode(torch.flip(pixels, dims=[3])).float().cpu()
        for i, (_, item) in enumerate(chunk):
            item.latents = latents[i]
            if flipped is not None and item.subset.flip_aug:
                item.latents_flipped = flipped[i]
