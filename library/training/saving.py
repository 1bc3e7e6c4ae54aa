"""File names of saved models and the training metadata written into them (kohya's conventions)."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from library.config.training_config import TrainingConfig
from library.data.dataset import DatasetGroup
from library.maths.metadata import file_hashes

MINIMAL_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")


def epoch_file_name(name: str, epoch: int, ext: str) -> str:
    """``name-000001.safetensors`` (epochs are counted from 1)."""
    return f"{name}-{epoch:06d}{ext}"


def step_file_name(name: str, step: int, ext: str) -> str:
    """``name-step00000100.safetensors``."""
    return f"{name}-step{step:08d}{ext}"


def final_file_name(name: str, ext: str) -> str:
    return f"{name}{ext}"


def _subset_name(subset) -> str:
    """kohya names a subset by its folder's base name (or the metadata file's)."""
    return os.path.basename(os.path.normpath(subset.image_dir or subset.metadata_file))


def _tag_frequency(group: DatasetGroup) -> dict[str, dict[str, int]]:
    freq: dict[str, Counter] = {}
    for item in group.items:
        folder = _subset_name(item.subset)
        counter = freq.setdefault(folder, Counter())
        for tag in item.caption.split(","):
            if tag.strip():
                counter[tag.strip().lower()] += 1
    return {k: dict(v) for k, v in freq.items()}


def _dataset_dirs(group: DatasetGroup, reg: bool) -> dict[str, dict[str, int]]:
    dirs = {}
    for ds in group.datasets:
        for subset in ds.config.subsets:
            if subset.is_reg == reg:
                count = sum(1 for it in ds.items if it.subset is subset)
                dirs[_subset_name(subset)] = {"n_repeats": subset.num_repeats, "img_count": count}
    return dirs


def _datasets_info(group: DatasetGroup) -> list[dict]:
    out = []
    for ds in group.datasets:
        c = ds.config
        out.append({
            "is_dreambooth": True, "batch_size_per_device": c.batch_size, "num_train_images": ds.num_train_images,
            "num_reg_images": ds.num_reg_images, "resolution": list(c.resolution), "enable_bucket": c.enable_bucket,
            "min_bucket_reso": c.min_bucket_reso, "max_bucket_reso": c.max_bucket_reso,
            "bucket_info": {"buckets": {f"{w}x{h}": n for (w, h), n in ds.bucket_counts().items()}},
            "subsets": [{"img_count": sum(1 for it in ds.items if it.subset is s), "num_repeats": s.num_repeats,
                         "flip_aug": s.flip_aug, "shuffle_caption": s.caption.shuffle_caption,
                         "keep_tokens": s.caption.keep_tokens, "caption_prefix": s.caption.caption_prefix,
                         "caption_suffix": s.caption.caption_suffix,
                         "image_dir": _subset_name(s), "metadata_file": s.metadata_file,
                         "class_tokens": s.class_tokens, "is_reg": s.is_reg} for s in c.subsets],
        })
    return out


def _training_metadata(cfg: TrainingConfig, num_batches_per_epoch: int, num_epochs: int,
                       max_train_steps: int) -> dict[str, str]:
    """How the run trains: schedule, optimizer, network, precision."""
    opt = cfg.optimizer
    optimizer = f"{opt.optimizer_type}({','.join(opt.optimizer_args)})" if opt.optimizer_args else opt.optimizer_type
    return {
        "ss_session_id": str(int(time.time() * 1000) % 2**31), "ss_training_started_at": str(time.time()),
        "ss_output_name": cfg.save.output_name, "ss_learning_rate": str(opt.learning_rate),
        "ss_text_encoder_lr": str(list(opt.text_encoder_lr) if isinstance(opt.text_encoder_lr, tuple)
                                  else opt.text_encoder_lr), "ss_unet_lr": str(opt.unet_lr),
        "ss_num_batches_per_epoch": str(num_batches_per_epoch), "ss_num_epochs": str(num_epochs),
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
        "ss_max_train_steps": str(max_train_steps), "ss_lr_warmup_steps": str(opt.lr_warmup),
        "ss_lr_scheduler": opt.lr_scheduler, "ss_mixed_precision": cfg.mixed_precision,
        "ss_full_fp16": str(cfg.full_half == "fp16"), "ss_fp8_base": str(cfg.fp8_base is not None),
        "ss_fp8_base_unet": str(cfg.fp8_base == "unet"), "ss_seed": str(cfg.seed), "ss_lowram": str(cfg.lowram),
        "ss_cache_latents": str(cfg.cache_latents), "ss_optimizer": optimizer,
        "ss_max_grad_norm": str(opt.max_grad_norm), "ss_prior_loss_weight": str(cfg.prior_loss_weight),
        "ss_training_comment": str(cfg.save.training_comment),
        "ss_sd_model_name": os.path.basename(cfg.model_path.rstrip("/")),
        "ss_validate_every_n_steps": str(cfg.validate_every_n_steps),
        "ss_validate_every_n_epochs": str(cfg.validate_every_n_epochs),
        "ss_max_validation_steps": str(cfg.max_validation_steps),
    }


def _data_metadata(cfg: TrainingConfig, group: DatasetGroup) -> dict[str, str]:
    """What the run trains on (the first dataset's settings where kohya records one value)."""
    first = group.datasets[0].config
    subsets = first.subsets
    infos = _datasets_info(group)
    return {
        "ss_num_train_images": str(sum(d.num_train_images for d in group.datasets)),
        "ss_num_reg_images": str(sum(d.num_reg_images for d in group.datasets)),
        "ss_num_validation_images": str(len(group.validation.items) if group.validation else 0),
        "ss_validation_split": str(first.validation_split), "ss_validation_seed": str(first.validation_seed),
        "ss_resolution": f"({first.resolution[0]}, {first.resolution[1]})",
        "ss_batch_size_per_device": str(first.batch_size),
        "ss_total_batch_size": str(first.batch_size * cfg.gradient_accumulation_steps),
        "ss_enable_bucket": str(first.enable_bucket), "ss_min_bucket_reso": str(first.min_bucket_reso),
        "ss_max_bucket_reso": str(first.max_bucket_reso), "ss_bucket_no_upscale": str(first.bucket_no_upscale),
        "ss_flip_aug": str(any(s.flip_aug for s in subsets)), "ss_color_aug": str(any(s.color_aug for s in subsets)),
        "ss_random_crop": str(any(s.random_crop for s in subsets)),
        "ss_face_crop_aug_range": str(next((s.face_crop_aug_range for s in subsets if s.face_crop_aug_range), None)),
        "ss_shuffle_caption": str(any(s.caption.shuffle_caption for s in subsets)),
        "ss_keep_tokens": str(subsets[0].caption.keep_tokens),
        "ss_caption_dropout_rate": str(subsets[0].caption.caption_dropout_rate),
        "ss_caption_dropout_every_n_epochs": str(subsets[0].caption.caption_dropout_every_n_epochs),
        "ss_caption_tag_dropout_rate": str(subsets[0].caption.caption_tag_dropout_rate),
        "ss_resize_interpolation": str(subsets[0].resize_interpolation),
        "ss_tag_frequency": json.dumps(_tag_frequency(group)),
        "ss_dataset_dirs": json.dumps(_dataset_dirs(group, reg=False)),
        "ss_reg_dataset_dirs": json.dumps(_dataset_dirs(group, reg=True)),
        "ss_bucket_info": json.dumps(infos[0]["bucket_info"]), "ss_datasets": json.dumps(infos),
    }


def base_metadata(cfg: TrainingConfig, family_meta: dict[str, str], group: DatasetGroup,
                  num_batches_per_epoch: int, num_epochs: int, max_train_steps: int) -> dict[str, str]:
    """The metadata fixed at the start of a run (steps and epoch are added at each save)."""
    first = group.datasets[0].config
    meta = {**_training_metadata(cfg, num_batches_per_epoch, num_epochs, max_train_steps),
            **_data_metadata(cfg, group),
            "modelspec.sai_model_spec": "1.0.1", "modelspec.title": cfg.save.output_name,
            "modelspec.resolution": f"{first.resolution[0]}x{first.resolution[1]}",
            "modelspec.date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if os.path.isfile(cfg.model_path):
        meta["ss_sd_model_hash"], meta["ss_new_sd_model_hash"] = file_hashes(cfg.model_path)
    meta.update(family_meta)
    for key, value in cfg.save.modelspec.items():  # --metadata_title etc.
        meta[f"modelspec.{key}"] = value
    return meta


def epochs_between_saves(num_epochs: int, ratio: int) -> int:
    """kohya's ``--save_n_epoch_ratio``: about ``ratio`` saves in the run, every floor(epochs / ratio)
    epochs (at least every epoch)."""
    return max(1, num_epochs // ratio)


def metadata_for_save(base: dict[str, str], steps: int, epoch: int, minimal: bool) -> dict[str, str]:
    """Base metadata plus progress; with ``--no_metadata`` only kohya's minimum set (and modelspec)."""
    meta = dict(base, ss_steps=str(steps), ss_epoch=str(epoch), ss_training_finished_at=str(time.time()))
    if minimal:
        meta = {k: v for k, v in meta.items() if k in MINIMAL_KEYS or k.startswith("modelspec.")}
    return meta


def sample_file_name(output_dir: Path, output_name: str, epoch: int | None, step: int, index: int,
                     seed: int | None) -> Path:
    """kohya's sample name: ``<name>_<e000001|000100>_<00>_<timestamp>[_<seed>].png`` under ``sample/``."""
    when = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
    seed_part = f"_{seed}" if seed is not None else ""
    return output_dir / "sample" / f"{output_name}_{when}_{index:02d}_{stamp}{seed_part}.png"
