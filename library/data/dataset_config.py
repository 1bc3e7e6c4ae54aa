"""Dataset configuration: kohya's TOML/JSON dataset format and the legacy folder flags.

Values are looked up subset > dataset > [general] > command line > default. Every problem in a
file is collected and reported together, each with its path, before any model is loaded.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import voluptuous as vol

from library.data.captions import CaptionOptions
from library.utils.errors import UserError
from library.utils.files import parse_user_file

logger = logging.getLogger(__name__)

def _positive_int(v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise vol.Invalid("expected a positive int")
    return v


def _resolution(v):
    if isinstance(v, bool):
        raise vol.Invalid("expected int or [width, height]")
    if isinstance(v, int) and v > 0:
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v):
        return (v[0], v[1])
    raise vol.Invalid("expected int or [width, height]")


def _non_negative_int(v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise vol.Invalid("expected an int >= 0")
    return v


def _non_negative_number(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise vol.Invalid("expected a number >= 0")
    return v


def _rate(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise vol.Invalid("expected a number between 0 and 1")
    return float(v)


def _typed(kind):
    def check(v):
        if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
            raise vol.Invalid("expected int")
        if kind is bool and not isinstance(v, bool):
            raise vol.Invalid("expected true or false")
        if kind is str and not isinstance(v, str):
            raise vol.Invalid("expected a string")
        return v
    return check


INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")


def _face_range(v):
    if (not isinstance(v, (list, tuple)) or len(v) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in v) or v[0] > v[1]):
        raise vol.Invalid("expected [low, high] with 0 < low <= high")
    return (float(v[0]), float(v[1]))


def _table(v):
    if not isinstance(v, dict):
        raise vol.Invalid("expected a table")
    return v


def _interpolation(v):
    if v not in INTERPOLATIONS:
        raise vol.Invalid(f"expected one of {', '.join(INTERPOLATIONS)}")
    return v


DATASET_KEYS = {
    "resolution": _resolution, "batch_size": _positive_int, "enable_bucket": _typed(bool),
    "min_bucket_reso": _positive_int, "max_bucket_reso": _positive_int, "bucket_reso_steps": _positive_int,
    "bucket_no_upscale": _typed(bool), "validation_split": _rate, "validation_seed": _typed(int),
    "network_multiplier": _non_negative_number,
}
SUBSET_KEYS = {
    "num_repeats": _positive_int, "shuffle_caption": _typed(bool), "keep_tokens": _typed(int),
    "caption_separator": _typed(str), "caption_prefix": _typed(str), "caption_suffix": _typed(str),
    "caption_dropout_rate": _rate, "flip_aug": _typed(bool), "color_aug": _typed(bool),
    "random_crop": _typed(bool), "caption_extension": _typed(str),
    "class_tokens": _typed(str), "keep_tokens_separator": _typed(str), "secondary_separator": _typed(str),
    "enable_wildcard": _typed(bool), "caption_dropout_every_n_epochs": _non_negative_int,
    "caption_tag_dropout_rate": _rate, "token_warmup_min": _non_negative_int,
    "token_warmup_step": _non_negative_number, "resize_interpolation": _interpolation, "cache_info": _typed(bool),
    "face_crop_aug_range": _face_range, "custom_attributes": _table,
}
SUBSET_ONLY_KEYS = {"image_dir": _typed(str), "is_reg": _typed(bool), "alpha_mask": _typed(bool),
                    "conditioning_data_dir": _typed(str), "metadata_file": _typed(str)}



@dataclass(frozen=True)
class SubsetConfig:
    """One folder of images (a DreamBooth-style subset)."""

    image_dir: str | None = None
    is_reg: bool = False
    metadata_file: str | None = None  # fine-tuning subsets: captions (and tags) from kohya's metadata JSON/JSONL
    resize_interpolation: str | None = None  # default: area when shrinking, lanczos when enlarging
    cache_info: bool = False  # remember image sizes in <image_dir>/metadata_cache.json
    face_crop_aug_range: tuple[float, float] | None = None  # scale range of face crops (name_cx_cy_w_h files)
    custom_attributes: dict = field(default_factory=dict)  # per-sample attributes (diff_output_preservation)
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    num_repeats: int = 1
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    alpha_mask: bool = False  # the image's alpha channel weights the loss
    conditioning_data_dir: str | None = None  # mask images (red channel) with the images' file names
    caption: CaptionOptions = field(default_factory=CaptionOptions)


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset: a resolution and batch size shared by its subsets."""

    resolution: tuple[int, int]
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    validation_split: float = 0.0  # share of each (non-reg) subset's images held out for validation
    validation_seed: int | None = None
    network_multiplier: float = 1.0  # the network's strength while training on this dataset
    subsets: tuple[SubsetConfig, ...] = ()


def load_config_file(path: str) -> dict:
    """Parse a dataset config file (.toml or .json)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"dataset config not found: {p} (--dataset_config)")
    return parse_user_file(p, "--dataset_config")


def _check_table(table: Any, allowed: dict, where: str, errors: list[str]) -> dict:
    """Validate one table with a voluptuous schema (every key optional, no extra keys); append every
    problem as a readable line (path, message, offending value, a "did you mean" for typos);
    return the converted values of the valid keys."""
    if not isinstance(table, dict):
        errors.append(f"{where}: expected a table")
        return {}
    schema = vol.Schema({vol.Optional(k): check for k, check in allowed.items()}, extra=vol.PREVENT_EXTRA)
    try:
        return schema(table)
    except vol.MultipleInvalid as exc:
        bad = set()
        for err in exc.errors:
            key = err.path[0] if err.path else "?"
            bad.add(key)
            path = f"{where}.{key}" if where else str(key)
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), list(allowed), n=1)
                errors.append(f"{path}: unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
            else:
                errors.append(f"{path}: {err.msg}, got {json.dumps(table.get(key))}")
        return schema({k: v for k, v in table.items() if k not in bad})


def parse_dataset_config(raw: dict, source: str, cli: dict) -> list[DatasetConfig]:
    """Validate a parsed dataset config and resolve every value by precedence.

    ``cli`` holds the values given on the command line (None for flags not given).
    """
    errors: list[str] = []
    for key in raw:
        if key not in ("general", "datasets"):
            errors.append(f"{key}: unknown top-level key (expected [general] and [[datasets]])")
    general = _check_table(raw.get("general", {}), {**DATASET_KEYS, **SUBSET_KEYS}, "general", errors)
    datasets_raw = raw.get("datasets", [])
    if not isinstance(datasets_raw, list) or not datasets_raw:
        errors.append("datasets: expected at least one [[datasets]] table")
        datasets_raw = []
    resolved = []
    for i, ds in enumerate(datasets_raw):
        ds_vals = _check_table({k: v for k, v in ds.items() if k != "subsets"} if isinstance(ds, dict) else ds,
                               {**DATASET_KEYS, **SUBSET_KEYS}, f"datasets[{i}]", errors)
        subsets_raw = ds.get("subsets", []) if isinstance(ds, dict) else []
        if not isinstance(subsets_raw, list) or not subsets_raw:
            errors.append(f"datasets[{i}].subsets: expected at least one [[datasets.subsets]] table")
            subsets_raw = []
        subs = []
        for j, sub in enumerate(subsets_raw):
            where = f"datasets[{i}].subsets[{j}]"
            vals = _check_table(sub, {**SUBSET_KEYS, **SUBSET_ONLY_KEYS}, where, errors)
            if isinstance(sub, dict) and "image_dir" not in sub and "metadata_file" not in sub:
                errors.append(f"{where}.image_dir: required key missing (or give metadata_file)")
            if isinstance(sub, dict) and "metadata_file" in sub and sub.get("is_reg"):
                errors.append(f"{where}: metadata_file subsets cannot be is_reg")
            subs.append(vals)
        kinds = {"metadata_file" in sub for sub in subsets_raw if isinstance(sub, dict)}
        if len(kinds) > 1:
            errors.append(f"datasets[{i}]: subsets with and without metadata_file cannot be mixed in the same "
                          "dataset; put them in separate [[datasets]]")
        resolved.append((ds_vals, subs))
    if errors:
        raise UserError(f"{source}: {len(errors)} problem(s) in the dataset config:\n  " + "\n  ".join(errors))
    return [_build_dataset(ds_vals, subs, general, cli, source, i) for i, (ds_vals, subs) in enumerate(resolved)]


def _lookup(key: str, *tables: dict) -> Any:
    for table in tables:
        if table.get(key) is not None:
            return table[key]
    return None


def _build_dataset(ds_vals: dict, subsets: list[dict], general: dict, cli: dict, source: str,
                   index: int) -> DatasetConfig:
    ds_kwargs = {}
    for f in fields(DatasetConfig):
        if f.name != "subsets" and (v := _lookup(f.name, ds_vals, general, cli)) is not None:
            ds_kwargs[f.name] = v
    if "resolution" not in ds_kwargs:
        raise UserError(f"{source}: datasets[{index}] has no resolution; set resolution in the file or --resolution")
    subs = tuple(_build_subset(s, ds_vals, general, cli) for s in subsets)
    return _checked_buckets(DatasetConfig(**ds_kwargs, subsets=subs), f"{source}: datasets[{index}]")


def _checked_buckets(ds: DatasetConfig, where: str) -> DatasetConfig:
    if ds.enable_bucket and any(s.face_crop_aug_range for s in ds.subsets):
        raise UserError(f"{where}: face_crop_aug_range works without buckets only (as in kohya); "
                        "set enable_bucket = false")
    return _rounded_buckets(ds, where)


def _rounded_buckets(ds: DatasetConfig, where: str) -> DatasetConfig:
    """kohya's bucket rules: min/max_bucket_reso rounded to the step, and a resolution whose sides
    are not multiples of the step rounded down to them as bucket sides are (each with a warning);
    the resolution must lie between min and max."""
    if not ds.enable_bucket or ds.bucket_no_upscale:
        return ds
    step = ds.bucket_reso_steps
    lo, hi = ds.min_bucket_reso - ds.min_bucket_reso % step, -(-ds.max_bucket_reso // step) * step
    if (lo, hi) != (ds.min_bucket_reso, ds.max_bucket_reso):
        logger.warning("%s: min/max_bucket_reso %d/%d rounded to multiples of bucket_reso_steps %d: %d/%d", where,
                       ds.min_bucket_reso, ds.max_bucket_reso, step, lo, hi)
    w, h = ds.resolution
    if w % step or h % step:
        if min(w, h) < step:
            raise UserError(f"{where}.resolution {w}x{h} is smaller than bucket_reso_steps {step}")
        w, h = w - w % step, h - h % step
        logger.warning("%s.resolution %dx%d is not a multiple of bucket_reso_steps %d: trained as %dx%d (sides "
                       "rounded down, as bucket sides are)", where, *ds.resolution, step, w, h)
    if lo > min(w, h) or hi < max(w, h):
        raise UserError(f"{where}: resolution {w}x{h} must lie between min_bucket_reso {lo} and max_bucket_reso {hi}")
    return replace(ds, resolution=(w, h), min_bucket_reso=lo, max_bucket_reso=hi)


def fit_to_family(datasets: list[DatasetConfig], multiple: int, advised: int, family: str) -> list[DatasetConfig]:
    """Training sizes for a model family: sizes must be multiples of ``multiple`` (what the model
    needs: a bucket step or a fixed resolution that is not becomes the next safe value, named in a
    warning); multiples of it that are not multiples of ``advised`` train as given, with kohya's
    warning."""
    fitted = []
    for i, ds in enumerate(datasets):
        where = f"datasets[{i}]"
        if ds.enable_bucket:
            step = ds.bucket_reso_steps
            if step % multiple:
                safe = -(-step // multiple) * multiple
                logger.warning("%s.bucket_reso_steps %d: %s images must have sides that are multiples of %d, so %d is "
                               "used", where, step, family, multiple, safe)
                ds = _rounded_buckets(replace(ds, bucket_reso_steps=safe), where)
            elif step % advised:
                logger.warning("%s.bucket_reso_steps %d is not a multiple of %d, which kohya advises for %s models; "
                               "it trains as given", where, step, advised, family)
        else:
            w, h = ds.resolution
            if w % multiple or h % multiple:
                ds = replace(ds, resolution=(max(multiple, w - w % multiple), max(multiple, h - h % multiple)))
                logger.warning("%s.resolution %dx%d: %s images must have sides that are multiples of %d; trained as "
                               "%dx%d", where, w, h, family, multiple, *ds.resolution)
            elif w % advised or h % advised:
                logger.warning("%s.resolution %dx%d is not a multiple of %d, which kohya advises for %s models; it "
                               "trains as given", where, w, h, advised, family)
        fitted.append(ds)
    return fitted


def _build_subset(sub: dict, ds_vals: dict, general: dict, cli: dict) -> SubsetConfig:
    tables = (sub, ds_vals, general, cli)
    cap_kwargs = {f.name: v for f in fields(CaptionOptions) if (v := _lookup(f.name, *tables)) is not None}
    kwargs = {f.name: v for f in fields(SubsetConfig)
              if f.name != "caption" and (v := _lookup(f.name, *tables)) is not None}
    return SubsetConfig(**kwargs, caption=CaptionOptions(**cap_kwargs))


_FOLDER = re.compile(r"^(\d+)_(.+)$")


def metadata_to_config(train_data_dir: str | None, in_json: str, repeats: int) -> dict:
    """kohya's ``--in_json`` (with ``--train_data_dir`` and ``--dataset_repeats``) as a dataset config."""
    subset = {"metadata_file": in_json, "num_repeats": repeats}
    if train_data_dir:
        subset["image_dir"] = train_data_dir
    return {"datasets": [{"subsets": [subset]}]}


def folders_to_config(train_data_dir: str, reg_data_dir: str | None) -> dict:
    """Turn kohya's legacy ``<repeats>_<class tokens>`` folders into a dataset-config dict."""
    subsets = []
    for root, is_reg in ((train_data_dir, False), (reg_data_dir, True)):
        if root is None:
            continue
        base = Path(root)
        flag = "--reg_data_dir" if is_reg else "--train_data_dir"
        if not base.is_dir():
            raise UserError(f"{flag} {base}: folder not found")
        found = False
        for child in sorted(p for p in base.iterdir() if p.is_dir()):
            m = _FOLDER.match(child.name)
            if not m or int(m.group(1)) < 1:
                continue
            found = True
            subsets.append({"image_dir": str(child), "num_repeats": int(m.group(1)),
                            "class_tokens": m.group(2), "is_reg": is_reg})
        if not found:
            raise UserError(f"{flag} {base}: no sub-folder named '<repeats>_<class tokens>' (e.g. '10_sks dog'); "
                            "put the images in such a folder")
    return {"datasets": [{"subsets": subsets}]}
