"""Text-encoder output caches, in memory and on disk, never used stale.

Only possible when captions are fixed (no shuffling, dropout, wildcards, tag dropout or token
warm-up) and the text encoders are not trained. On disk each image gets
``<stem>_<family>_te.npz`` holding the outputs and ``cache_record``: the caption text and the
encoder settings (encoder fingerprint, clip_skip, token length, weighting). A record that differs
from the current one, or a file that cannot be read, means the outputs are encoded again.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from library.data.dataset import DatasetGroup, ImageItem
from library.utils.files import atomic_path

logger = logging.getLogger(__name__)

RANDOM_CAPTION_OPTIONS = ("shuffle_caption", "caption_dropout_rate", "caption_dropout_every_n_epochs",
                          "caption_tag_dropout_rate", "enable_wildcard", "token_warmup_step")


def random_caption_options(group_items: list[ImageItem]) -> list[str]:
    """Caption options in use that make a caption differ between steps (they forbid caching)."""
    used = set()
    for item in group_items:
        for name in RANDOM_CAPTION_OPTIONS:
            if getattr(item.subset.caption, name):
                used.add(name)
    return sorted(used)


def te_cache_path(item: ImageItem, suffix: str) -> Path:
    p = Path(item.path)
    return p.with_name(f"{p.stem}_{suffix}_te.npz")


def _flatten(outputs) -> dict[str, np.ndarray]:
    if isinstance(outputs, torch.Tensor):
        return {"out": outputs.float().cpu().numpy()}
    return {f"out_{k}": v.float().cpu().numpy() for k, v in outputs.items()}


def _unflatten(data) -> torch.Tensor | dict:
    if "out" in data.files:
        return torch.from_numpy(data["out"].copy())
    return {k[4:]: torch.from_numpy(data[k].copy()) for k in data.files if k.startswith("out_")}


def load_te_cache(path: Path, record: dict):
    try:
        with np.load(path, allow_pickle=False) as data:
            if json.loads(str(data["cache_record"])) != record:
                return None
            return _unflatten(data)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def save_te_cache(path: Path, outputs, record: dict) -> None:
    arrays = {**_flatten(outputs), "cache_record": np.array(json.dumps(record))}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def _select(outputs, i: int):
    if isinstance(outputs, torch.Tensor):
        return outputs[i].float().cpu().clone()
    return {k: v[i].float().cpu().clone() for k, v in outputs.items()}


@torch.no_grad()
def cache_text_outputs(groups: list[DatasetGroup], encode: Callable[[list[str]], object], settings: dict,
                       batch_size: int, to_disk: str | None = None, show_progress: bool = True) -> dict[str, int]:
    """Fill ``item.text_outputs`` for every image (captions as trained, fixed). ``settings`` describe
    the encoder (they go into each record). Returns counts: ``loaded`` and ``encoded``."""
    counts = {"loaded": 0, "encoded": 0}
    todo = []
    for group in groups:
        for item in group.items:
            record = {**settings, "caption": item.caption}
            if to_disk and (found := load_te_cache(te_cache_path(item, to_disk), record)) is not None:
                item.text_outputs = found
                counts["loaded"] += 1
            else:
                todo.append((item, record))
    chunks = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    for chunk in tqdm(chunks, desc="caching text-encoder outputs", disable=not show_progress or not chunks):
        outputs = encode([item.caption for item, _ in chunk])
        for i, (item, record) in enumerate(chunk):
            item.text_outputs = _select(outputs, i)
            if to_disk:
                save_te_cache(te_cache_path(item, to_disk), item.text_outputs, record)
            counts["encoded"] += 1
    logger.info("text-encoder cache: %d loaded from disk, %d encoded", counts["loaded"], counts["encoded"])
    return counts
