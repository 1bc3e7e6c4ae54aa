"""Latent cache files made ahead of training, by exactly the code and flags training uses
(tools/cache_latents.py and finetune/prepare_buckets_latents.py): the same dataset scan and buckets,
the same model loading and dtype, the same VAE fingerprint, so the trainer finds every file valid."""

from __future__ import annotations

import argparse
import logging

import torch

from library.config.family_options import training_family
from library.config.training_config import build_datasets, check_latent_caching
from library.data.dataset import DatasetGroup, ScanReport, build_dataset_group
from library.data.dataset_config import fit_to_family
from library.data.latent_cache import cache_latents
from library.models.fingerprint import module_fingerprint
from library.utils.ranges import TRAINING, check_flags

logger = logging.getLogger(__name__)


def cache_dataset_latents(args: argparse.Namespace, family_name: str, what: str,
                          refresh: bool = False) -> tuple[DatasetGroup, dict[str, int], ScanReport]:
    """Scan the datasets the training flags ``args`` describe and write every image's latent cache
    file; with ``refresh`` every file is encoded again, else valid ones are kept. ``what`` names the
    script in refusals. Returns the group (its items carry their buckets), the counts and the scan report."""
    check_flags(vars(args), TRAINING)
    configs, _ = build_datasets(args)
    check_latent_caching(configs, what, to_disk=True)  # the trainer's own refusals
    family = training_family(family_name, args)
    configs = fit_to_family(configs, family.size_multiple, family.advised_size_multiple, family.title)  # as training
    group, report = build_dataset_group(configs, args.seed or 0, args.prior_loss_weight, args.strict_dataset)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)
    models = family.load(args.pretrained_model_name_or_path, dtype, args.tokenizer_cache_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models.vae.to(device)
    if args.no_half_vae:
        models.vae.to(torch.float32)
    counts = cache_latents(group, lambda px: family.encode_images(models, px), args.vae_batch_size,
                           family.latent_channels, family.cache_suffix, module_fingerprint(models.vae),
                           refresh=refresh)
    return group, counts, report
