"""Latent caches, in memory and on disk, that are never used stale.

Every image is encoded once (in VAE batches grouped by bucket, with a progress bar). On disk each
image gets kohya's file ``<stem>_<WWWW>x<HHHH>_<family>.npz`` (original size in the name) with the
keys ``latents``, ``original_size``, ``crop_ltrb`` and ``latents_flipped`` (with flip_aug), plus
``cache_record``: what the latents were made from (the image file's size and modification time,
the bucket, resize and crop, flipping, and the VAE's fingerprint). A file whose record or latent
shape does not match the current settings, or that cannot be read, is rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from library.data import buckets as bk
from library.data.dataset import DatasetGroup, ImageItem
from library.utils.files import atomic_path

logger = logging.getLogger(__name__)
CACHE_VERSION = 1


def cache_path(item: ImageItem, suffix: str) -> Path:
    """kohya's name: ``<stem>_<WWWW>x<HHHH>_<suffix>.npz`` next to the image (original size)."""
    p = Path(item.path)
    return p.with_name(f"{p.stem}_{item.size[0]:04d}x{item.size[1]:04d}_{suffix}.npz")


def cache_record(item: ImageItem, vae_id: str) -> dict:
    """Everything the cached latents depend on."""
    stat = os.stat(item.path)
    return {"version": CACHE_VERSION, "image": [stat.st_size, stat.st_mtime_ns], "size": list(item.size),
            "bucket": list(item.bucket), "resized": list(item.resized),
            "crop": list(bk.center_crop_box(item.resized, item.bucket)), "flip": item.subset.flip_aug,
            "vae": vae_id}


def load_cached(path: Path, record: dict, latent_shape: tuple[int, ...]) -> tuple | None:
    """(latents, latents_flipped or None) if ``path`` holds latents made from exactly ``record``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if json.loads(str(data["cache_record"])) != record:
                return None
            latents = torch.from_numpy(data["latents"].copy())
            flipped = torch.from_numpy(data["latents_flipped"].copy()) if record["flip"] else None
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # missing, truncated, foreign: rebuild
        return None
    if tuple(latents.shape) != latent_shape or (flipped is not None and tuple(flipped.shape) != latent_shape):
        return None
    return latents, flipped


def save_cached(path: Path, item: ImageItem, record: dict, latents: torch.Tensor,
                flipped: torch.Tensor | None) -> None:
    arrays = {"latents": latents.float().numpy(), "original_size": np.array(item.size),
              "crop_ltrb": np.array(record["crop"]), "cache_record": np.array(json.dumps(record))}
    if flipped is not None:
        arrays["latents_flipped"] = flipped.float().numpy()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


@torch.no_grad()
def cache_latents(group: DatasetGroup, encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int,
                  latent_channels: int, to_disk: str | None = None, vae_id: str = "",
                  show_progress: bool = True, refresh: bool = False) -> dict[str, int]:
    """Fill ``item.latents`` (and ``latents_flipped``) for every image of the group.

    With ``to_disk`` (the family's file suffix, e.g. ``"sd"``) valid cache files are read and the
    others are rebuilt and written (``refresh``: every file is rebuilt). Returns counts: ``loaded``
    and ``encoded``.
    """
    todo = defaultdict(list)
    counts = {"loaded": 0, "encoded": 0}
    for ds in group.datasets:
        for item in ds.items:
            if item.latents is not None:
                continue
            if to_disk and not refresh:
                shape = (latent_channels, item.bucket[1] // 8, item.bucket[0] // 8)
                found = load_cached(cache_path(item, to_disk), cache_record(item, vae_id), shape)
                if found is not None:
                    item.latents, item.latents_flipped = found
                    counts["loaded"] += 1
                    continue
            todo[item.bucket].append((ds, item))
    chunks = [members[i:i + batch_size] for members in todo.values() for i in range(0, len(members), batch_size)]
    for chunk in tqdm(chunks, desc="caching latents", disable=not show_progress or not chunks):
        pixels = torch.stack([ds.load_pixels(item, flip=False) for ds, item in chunk])
        latents = encode(pixels).float().cpu()
        flipped = None
        if any(item.subset.flip_aug for _, item in chunk):
            flipped = encode(torch.flip(pixels, dims=[3])).float().cpu()
        for i, (_, item) in enumerate(chunk):
            item.latents = latents[i].clone()
            item.latents_flipped = flipped[i].clone() if flipped is not None and item.subset.flip_aug else None
            if to_disk:
                save_cached(cache_path(item, to_disk), item, cache_record(item, vae_id), item.latents,
                            item.latents_flipped)
            counts["encoded"] += 1
    if to_disk:
        logger.info("latent cache: %d loaded from disk, %d encoded", counts["loaded"], counts["encoded"])
    return counts
