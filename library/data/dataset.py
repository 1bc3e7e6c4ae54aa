"""Training datasets: scanning image folders, bucketing, epoch order and batch assembly.

One dataset item is one whole batch from a single bucket (as in kohya-ss/sd-scripts). The batch
order of an epoch and every random choice inside a sample depend only on (seed, epoch, index),
so a run can be resumed at any batch and data-loader workers need no shared state.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from library.data import buckets as bk
from library.data.batch import TrainBatch
from library.data.captions import CaptionError, process_caption, read_caption_file
from library.data.dataset_config import DatasetConfig, SubsetConfig
from library.data.images import (
    color_augment,
    face_crop,
    face_info,
    is_image_file,
    load_image_rgb,
    load_mask,
    resize_mask,
    resize_to,
    to_tensor_image,
)
from library.data.metadata import metadata_images
from library.utils.errors import UserError
from library.utils.files import atomic_path

logger = logging.getLogger(__name__)


@dataclass
class ImageItem:
    """One training image and everything decided about it before training."""

    path: str
    caption: str
    subset: SubsetConfig
    size: tuple[int, int]
    bucket: tuple[int, int] = (0, 0)
    resized: tuple[int, int] = (0, 0)
    latents: torch.Tensor | None = None
    latents_flipped: torch.Tensor | None = None
    mask_path: str | None = None  # a conditioning mask image, or the image itself for alpha masks
    text_outputs: object = None  # cached text-encoder outputs for the (fixed) caption
    face: tuple[int, int, int, int] | None = None  # face centre and size from a name_cx_cy_w_h file name


@dataclass
class ScanReport:
    """What scanning found: usable images, and files skipped with the reason."""

    skipped: list[tuple[str, str]] = field(default_factory=list)
    class_token_fallbacks: int = 0
    empty_subsets: list[str] = field(default_factory=list)


def _candidates(subset: SubsetConfig, report: ScanReport, strict: bool):
    """(image path, caption or None, caption problem or None) for each image of a subset."""
    if subset.metadata_file:
        for key, path, caption in metadata_images(subset.metadata_file, subset.image_dir):
            if path is None:
                _skip(report, key, f"listed in {subset.metadata_file} but no such image file", strict)
                continue
            # no caption and no tags: kohya stops with an assertion; here the image is skipped and named,
            # unless the subset gives class_tokens to use instead
            missing = None if caption or subset.class_tokens else (
                f"its entry in {subset.metadata_file} has no caption and no tags (add one, or class_tokens to the "
                "subset)")
            yield path, caption or None, missing
        return
    folder = Path(subset.image_dir)
    if not folder.is_dir():
        raise UserError(f"image_dir not found: {folder}")
    for path in _image_files(folder, report, strict):
        try:
            caption = read_caption_file(str(path), subset.caption_extension, subset.caption.enable_wildcard)
            face = face_info(path.stem)
            if caption is None and face:  # kohya also looks for the caption without the face suffix
                caption = read_caption_file(str(path.with_name(face[1] + path.suffix)), subset.caption_extension,
                                            subset.caption.enable_wildcard)
            yield path, caption, None
        except CaptionError as exc:
            yield path, None, str(exc)


def _image_files(folder: Path, report: ScanReport, strict: bool) -> list[Path]:
    """The image files of a folder, sorted; a dangling link, or a second image with the same stem
    (``a.png`` beside ``a.jpg``: they would share one caption and one latent cache file), is skipped
    and named in the report."""
    files, seen = [], {}
    for path in sorted(folder.iterdir()):
        if not is_image_file(path.name):
            continue
        if path.is_symlink() and not path.exists():
            _skip(report, str(path), "a link whose target does not exist", strict)
            continue
        if not path.is_file():
            _skip(report, str(path), "not a file", strict)
            continue
        if path.stem in seen:
            _skip(report, str(path), f"has the same name as {seen[path.stem].name}, so the two would share one caption "
                  "and one latent cache file; rename one to train both", strict)
            continue
        seen[path.stem] = path
        files.append(path)
    return files


def scan_subset(subset: SubsetConfig, report: ScanReport, strict: bool, min_side: int = 1) -> list[ImageItem]:
    """List a subset's images, decode each once to be sure it is usable, and read its caption.
    Images with a side below ``min_side`` are skipped (they would have no bucket)."""
    items = []
    info = ScanInfoCache(subset) if subset.cache_info else None
    for path, caption, problem in _candidates(subset, report, strict):
        size = info.size_of(path) if info else None
        if size is None:
            try:
                image = load_image_rgb(str(path))
            except Exception as exc:  # noqa: BLE001 - any decoder error means this file is unusable
                _skip(report, str(path), f"cannot be read as an image ({type(exc).__name__}: {exc})", strict)
                continue
            size = (image.shape[1], image.shape[0])
        if problem:
            _skip(report, str(path), problem, strict)
            continue
        if info:
            info.remember(path, size)
        if caption is None:
            caption = subset.class_tokens or ""
            report.class_token_fallbacks += 1
        if min(size) < min_side:
            _skip(report, str(path), f"{size[0]}x{size[1]} is smaller than one bucket step ({min_side}) and "
                  "bucket_no_upscale never enlarges", strict)
            continue
        mask_path, problem = find_mask(Path(path), subset, size)
        if problem:
            _skip(report, str(path), problem, strict)
            continue
        face = face_info(Path(path).stem)
        items.append(ImageItem(str(path), caption, subset, size, mask_path=mask_path,
                               face=face[0] if face else None))
    if info:
        info.save()
    if not items:
        where = subset.metadata_file or subset.image_dir
        if strict:
            raise UserError(f"{where} gives no usable images (--strict_dataset is set)")
        logger.warning("%s gives no usable images (supported: .png .jpg .jpeg .webp .bmp)", where)
        report.empty_subsets.append(str(where))
    return items


class ScanInfoCache:
    """kohya's ``cache_info``: ``metadata_cache.json`` in the image folder remembers the size of every
    image that decoded fine, keyed by its file size and modification time, so later runs skip
    decoding unchanged images. Captions are always read fresh."""

    NAME = "metadata_cache.json"

    def __init__(self, subset: SubsetConfig):
        self.path = Path(subset.image_dir or ".") / self.NAME
        try:
            self.entries = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.entries = {}
        self.fresh: dict[str, dict] = {}

    @staticmethod
    def _stamp(path) -> list[int]:
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]

    def size_of(self, path) -> tuple[int, int] | None:
        entry = self.entries.get(Path(path).name)
        if entry and entry.get("stamp") == self._stamp(path):
            return tuple(entry["size"])
        return None

    def remember(self, path, size: tuple[int, int]) -> None:
        self.fresh[Path(path).name] = {"stamp": self._stamp(path), "size": list(size)}

    def save(self) -> None:
        if self.fresh != self.entries:
            with atomic_path(self.path) as tmp:
                Path(tmp).write_text(json.dumps(self.fresh, indent=1), encoding="utf-8")


def find_mask(image: Path, subset: SubsetConfig, size: tuple[int, int]) -> tuple[str | None, str | None]:
    """The loss-mask source of an image and a problem description (None when usable)."""
    if subset.alpha_mask:
        return str(image), None
    if not subset.conditioning_data_dir:
        return None, None
    folder = Path(subset.conditioning_data_dir)
    found = [p for p in folder.glob(f"{glob_escape(image.stem)}.*") if is_image_file(p.name)] if folder.is_dir() else []
    if not found:
        return None, f"no mask with the same name in conditioning_data_dir {folder}"
    try:
        with Image.open(found[0]) as m:
            mask_size = ImageOps.exif_transpose(m).size
    except OSError as exc:
        return None, f"its mask {found[0]} cannot be read ({exc})"
    if mask_size != size:
        return None, f"its mask {found[0]} is {mask_size[0]}x{mask_size[1]}, the image {size[0]}x{size[1]}"
    return str(found[0]), None


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def _skip(report: ScanReport, path: str, reason: str, strict: bool) -> None:
    if strict:
        raise UserError(f"{path}: {reason} (--strict_dataset is set; fix or remove the file)")
    logger.warning("skipping %s: %s", path, reason)
    report.skipped.append((path, reason))


def balance_regularization(train_count: int, reg_items: list[ImageItem]) -> list[tuple[ImageItem, int]]:
    """kohya's reg balancing: take reg images (with their repeats) until they match the number of
    training samples; if all of them are fewer, raise their repeats round-robin until equal."""
    chosen: list[list] = []
    total = 0
    for item in reg_items:
        if total >= train_count:
            break
        chosen.append([item, item.subset.num_repeats])
        total += item.subset.num_repeats
    i = 0
    while chosen and total < train_count:
        chosen[i % len(chosen)][1] += 1
        total += 1
        i += 1
    return [(item, repeats) for item, repeats in chosen]


class BucketBatchDataset(torch.utils.data.Dataset):
    """One dataset config's images, served as same-bucket batches."""

    def __init__(self, config: DatasetConfig, items: list[ImageItem], reg_items: list[ImageItem],
                 prior_loss_weight: float = 1.0):
        self.config = config
        self.world_size = 1  # processes sharing each global batch (set by DatasetGroup)
        self.prior_loss_weight = prior_loss_weight
        self.items = items + reg_items
        self._assign_buckets()
        train_count = sum(it.subset.num_repeats for it in items)
        self.entries: list[tuple[ImageItem, int]] = [(it, it.subset.num_repeats) for it in items]
        self.entries += balance_regularization(train_count, reg_items)
        self.num_train_images = train_count
        self.num_reg_images = sum(r for _, r in self.entries[len(items):])
        #: (caption, sample's generator) -> the caption trained, after the subset's own processing
        #: (textual inversion's templates); None: as processed
        self.caption_rewrite = None

    def _assign_buckets(self) -> None:
        c = self.config
        if not c.enable_bucket:
            for it in self.items:
                # without buckets every image is resized to cover the resolution and center-cropped
                _, it.resized = bk.select_bucket(it.size, [c.resolution])
                it.bucket = c.resolution
            return
        if c.bucket_no_upscale:
            area = c.resolution[0] * c.resolution[1]
            for it in self.items:
                it.bucket, it.resized = bk.no_upscale_bucket(it.size, area, c.bucket_reso_steps)
            return
        table = bk.make_bucket_resolutions(c.resolution, c.min_bucket_reso, c.max_bucket_reso, c.bucket_reso_steps)
        for it in self.items:
            it.bucket, it.resized = bk.select_bucket(it.size, table)
        self._warn_enlarged()

    def _warn_enlarged(self) -> None:
        """Images far smaller than their bucket are used (as in kohya), but named: they train blurry."""
        small = [(it.path, it.resized[0] / it.size[0]) for it in self.items if it.resized[0] >= 2 * it.size[0]]
        for path, factor in small[:10]:
            logger.warning("%s is enlarged %.1fx to fit its bucket (smaller than min_bucket_reso); it will be "
                           "blurry - use a larger image or bucket_no_upscale", path, factor)
        if len(small) > 10:
            logger.warning("... and %d more enlarged images", len(small) - 10)

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """Samples per bucket (repeats counted), for the table printed at start."""
        counts: Counter = Counter()
        for it, repeats in self.entries:
            counts[it.bucket] += repeats
        return dict(sorted(counts.items()))

    @property
    def global_batch_size(self) -> int:
        """``batch_size`` is per process (kohya's meaning); a global batch feeds every process."""
        return self.config.batch_size * self.world_size

    def epoch_batches(self, seed: int, epoch: int) -> list[list[ImageItem]]:
        """The global batches of one epoch: each bucket shuffled, cut into batches, batches shuffled."""
        rng = random.Random(seed + epoch)
        per_bucket: dict[tuple[int, int], list[ImageItem]] = defaultdict(list)
        for item, repeats in self.entries:
            per_bucket[item.bucket].extend([item] * repeats)
        batches = []
        for bucket in sorted(per_bucket):
            members = per_bucket[bucket]
            rng.shuffle(members)
            bs = self.global_batch_size
            batches += [members[i:i + bs] for i in range(0, len(members), bs)]
        rng.shuffle(batches)
        return batches

    def __len__(self) -> int:
        bs = self.global_batch_size
        return sum(math.ceil(n / bs) for n in self.bucket_counts().values())

    def crop_box(self, item: ImageItem, rng: random.Random | None) -> tuple[int, int, int, int]:
        """The (left, top, right, bottom) window cut from the resized image: centred, or random with
        random_crop (drawn from ``rng``)."""
        left, top, right, bottom = bk.center_crop_box(item.resized, item.bucket)
        if rng is not None and item.subset.random_crop:
            left = rng.randint(0, item.resized[0] - item.bucket[0])
            top = rng.randint(0, item.resized[1] - item.bucket[1])
            right, bottom = left + item.bucket[0], top + item.bucket[1]
        return left, top, right, bottom

    def load_mask(self, item: ImageItem, flip: bool, box: tuple[int, int, int, int]) -> torch.Tensor:
        """The item's loss mask, resized, cropped and flipped like its pixels; (1, H, W) in [0, 1]."""
        if item.mask_path is None:
            return torch.ones(1, item.bucket[1], item.bucket[0])
        mask = resize_mask(load_mask(item.mask_path, from_alpha=item.subset.alpha_mask), item.resized)
        left, top, right, bottom = box
        mask = mask[top:bottom, left:right]
        if flip:
            mask = np.ascontiguousarray(mask[:, ::-1])
        return torch.from_numpy(np.clip(mask, 0.0, 1.0)).float()[None]

    def load_pixels(self, item: ImageItem, flip: bool, rng: random.Random | None = None,
                    box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """The image resized to cover its bucket, cropped (centred, or at random with random_crop),
        colour-augmented with color_aug, optionally mirrored; (3, H, W) in [-1, 1]."""
        if rng is not None and item.face and item.subset.face_crop_aug_range:
            image = face_crop(load_image_rgb(item.path), item.bucket, item.face, item.subset.face_crop_aug_range,
                              item.subset.random_crop, rng)
        else:
            image = resize_to(load_image_rgb(item.path), item.resized, item.subset.resize_interpolation)
            left, top, right, bottom = box if box is not None else self.crop_box(item, rng)
            image = image[top:bottom, left:right]
        if rng is not None and item.subset.color_aug:
            image = color_augment(image, rng)
        if flip:
            image = np.ascontiguousarray(image[:, ::-1])
        return to_tensor_image(image)

    def make_batch(self, batch: list[ImageItem], key: tuple[int, int, int], rank: int,
                   step: tuple[int, int] = (0, 0)) -> TrainBatch:
        """Assemble this process's share of a global batch: latents (cached) or pixels, processed
        captions, loss weights, and each sample's (epoch, batch, position) key. Every random choice
        for a sample is seeded by its key, so the split over processes does not change it."""
        seed, epoch, index = key
        bs = self.config.batch_size
        positions = range(rank * bs, min((rank + 1) * bs, len(batch)))
        if not positions:  # a short last batch: this process repeats the batch's first samples
            positions = range(0, min(bs, len(batch)))
        rngs = [random.Random(f"{seed}-{epoch}-{index}-{j}") for j in positions]
        items = [batch[j] for j in positions]
        flips = [it.subset.flip_aug and r.random() < 0.5 for it, r in zip(items, rngs)]
        captions = [process_caption(it.caption, it.subset.caption, r, epoch, *step) for it, r in zip(items, rngs)]
        if self.caption_rewrite is not None:
            captions = [self.caption_rewrite(c, r) for c, r in zip(captions, rngs)]
        boxes = [self.crop_box(it, r) for it, r in zip(items, rngs)]
        out = TrainBatch(
            captions=captions,
            loss_weights=torch.tensor([self.prior_loss_weight if it.subset.is_reg else 1.0 for it in items]),
            paths=[it.path for it in items], original_sizes=[it.size for it in items],
            sample_keys=[(epoch, index, j) for j in positions],
            size_conditioning=torch.tensor([size_conditioning(it, b, f) for it, b, f in zip(items, boxes, flips)]),
            network_multiplier=float(self.config.network_multiplier),
            custom_attributes=[it.subset.custom_attributes for it in items])
        if all(it.latents is not None for it in items):
            out.latents = torch.stack([it.latents_flipped if f else it.latents for it, f in zip(items, flips)])
        else:
            out.images = torch.stack([self.load_pixels(it, f, r, b) for it, f, r, b in zip(items, flips, rngs, boxes)])
        if all(it.text_outputs is not None for it in items):
            out.conditioning = stack_outputs([it.text_outputs for it in items])
        if any(it.mask_path for it in items):
            out.masks = torch.stack([self.load_mask(it, f, b) for it, f, b in zip(items, flips, boxes)])
        return out


def size_conditioning(item: ImageItem, box: tuple[int, int, int, int], flipped: bool) -> list[int]:
    """SDXL's size conditioning of one sample: (original height, original width, crop top, crop
    left, target height, target width). The crop is the window actually cut from the resized
    image (mirrored along with a flipped image), in resized-image pixels as kohya records it."""
    left, top, right, _ = box
    if flipped:
        left = item.resized[0] - right
    width, height = item.size
    return [height, width, top, left, item.bucket[1], item.bucket[0]]


class DatasetGroup(torch.utils.data.Dataset):
    """All datasets of a run. Items are addressed by (epoch, index): the batch behind a key
    depends only on the seed, so persistent workers and resumed runs see the same batches."""

    def __init__(self, datasets: list[BucketBatchDataset], seed: int, world_size: int = 1, rank: int = 0):
        self.datasets = datasets
        self.seed = seed
        self.rank = rank
        self.accumulation, self.max_train_steps = 1, 0  # set by the trainer, for token warm-up
        self.validation: DatasetGroup | None = None
        for ds in datasets:
            ds.world_size = world_size
        self._order_epoch: int | None = None
        self._order: list[tuple[int, list[ImageItem]]] = []

    def epoch_order(self, epoch: int) -> list[tuple[int, list[ImageItem]]]:
        """(dataset index, batch) pairs of one epoch, in training order."""
        if self._order_epoch != epoch:
            order = [(d, b) for d, ds in enumerate(self.datasets) for b in ds.epoch_batches(self.seed, epoch)]
            random.Random(self.seed * 1000003 + epoch).shuffle(order)
            self._order, self._order_epoch = order, epoch
        return self._order

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, key: tuple[int, int]) -> TrainBatch:
        epoch, index = key
        ds_index, batch = self.epoch_order(epoch)[index]
        step = (epoch * len(self) + index) // self.accumulation
        return self.datasets[ds_index].make_batch(batch, (self.seed, epoch, index), self.rank,
                                                  (step, self.max_train_steps))

    @property
    def items(self) -> list[ImageItem]:
        return [it for d in self.datasets for it in d.items]

    def set_caption_rewrite(self, rewrite) -> None:
        """Every caption of this group (and of its validation group) passed through ``rewrite``
        (caption, the sample's generator) -> caption, after the subset's processing."""
        for ds in self.datasets:
            ds.caption_rewrite = rewrite
        if self.validation is not None:
            self.validation.set_caption_rewrite(rewrite)


class EpochSampler(torch.utils.data.Sampler):
    """Yields (epoch, index) keys for one epoch; ``start`` skips batches already trained."""

    def __init__(self, length: int):
        self.length = length
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        return iter([(self.epoch, i) for i in range(self.start, self.length)])

    def __len__(self) -> int:
        return self.length - self.start


def split_validation(items: list[ImageItem], share: float, seed: int) -> tuple[list[ImageItem], list[ImageItem]]:
    """kohya's split of one subset: shuffle with ``seed``; the first ceil(n (1 - share)) images train,
    the last round(n share) validate (shown once per validation pass, without repeats)."""
    if share <= 0:
        return items, []
    order = list(items)
    random.Random(seed).shuffle(order)
    n_train = math.ceil(len(order) * (1 - share))
    n_val = round(len(order) * share)
    val_subset = {id(it.subset): replace(it.subset, num_repeats=1) for it in order}
    val = [replace(it, subset=val_subset[id(it.subset)]) for it in order[len(order) - n_val:]]
    return order[:n_train], val


def build_dataset_group(configs: list[DatasetConfig], seed: int, prior_loss_weight: float,
                        strict: bool, world_size: int = 1, rank: int = 0) -> tuple[DatasetGroup, ScanReport]:
    """Scan every subset, bucket the images and build the group (and ``group.validation``, the
    held-out images of datasets with validation_split). Raises UserError for unusable data."""
    report = ScanReport()
    datasets, val_datasets = [], []
    for cfg in configs:
        train, reg, val = [], [], []
        min_side = cfg.bucket_reso_steps if cfg.enable_bucket and cfg.bucket_no_upscale else 1
        for subset in cfg.subsets:
            found = scan_subset(subset, report, strict, min_side)
            if subset.is_reg:  # regularisation images are never held out
                reg.extend(found)
                continue
            kept, held = split_validation(found, cfg.validation_split, cfg.validation_seed or seed)
            train.extend(kept)
            val.extend(held)
        if not train:
            folders = ", ".join(s.image_dir for s in cfg.subsets if not s.is_reg) or "none (only is_reg subsets)"
            raise UserError(f"a dataset has no usable training images (image_dir: {folders}); "
                            "supported: .png .jpg .jpeg .webp .bmp")
        datasets.append(BucketBatchDataset(cfg, train, reg, prior_loss_weight))
        if val:
            val_datasets.append(BucketBatchDataset(cfg, val, [], prior_loss_weight))
    group = DatasetGroup(datasets, seed, world_size, rank)
    group.validation = DatasetGroup(val_datasets, seed, world_size, rank) if val_datasets else None
    return group, report


def stack_outputs(outputs: list):
    """Batch cached text-encoder outputs (tensors, or dicts of tensors)."""
    if isinstance(outputs[0], torch.Tensor):
        return torch.stack(outputs)
    return {k: torch.stack([o[k] for o in outputs]) for k in outputs[0]}


def to_device(value, device, dtype=None):
    """Move a tensor, or a dict of tensors, to ``device`` (and floating ones to ``dtype``)."""
    if isinstance(value, dict):
        return {k: to_device(v, device, dtype) for k, v in value.items()}
    return value.to(device, dtype) if dtype is not None and value.is_floating_point() else value.to(device)


def collate_single(batch: list[TrainBatch]) -> TrainBatch:
    """The DataLoader's batch_size is 1 because each item already is a batch."""
    return batch[0]
