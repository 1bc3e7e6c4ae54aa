"""Pre-compute the latent cache files of a dataset, with the same code and flags as training.

    python tools/cache_latents.py --pretrained_model_name_or_path model.safetensors \
        --dataset_config dataset.toml [--vae_batch_size 4]

Writes ``<image stem>_<WWWW>x<HHHH>_sd.npz`` (``_sdxl.npz`` with ``--sdxl``) next to each image; files
that are still valid for the current settings are kept, stale or broken ones are rebuilt. Training with
``--cache_latents_to_disk`` then starts without encoding.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.args.common import network_training_parser
from library.args.config_file import parse_args_with_config
from library.utils.errors import run_cli  # noqa: E402
from library.utils.log import setup_logging


def main(argv: list[str] | None = None) -> None:
    parser = network_training_parser("Pre-compute latent cache files (SD1.x/2.x, or SDXL with --sdxl)")
    parser.add_argument("--sdxl", action="store_true", help="the model is SDXL (files end in _sdxl*.npz)")
    args = parse_args_with_config(parser, argv, required=("pretrained_model_name_or_path",))
    setup_logging(args.console_log_level, args.console_log_file)
    # imported after parsing, so --help and argument errors do not wait for torch and diffusers
    import torch

    from library.config.family_options import training_family
    from library.config.training_config import build_datasets, check_latent_caching
    from library.data.dataset import build_dataset_group
    from library.data.dataset_config import fit_to_family
    from library.data.latent_cache import cache_latents
    from library.models.fingerprint import module_fingerprint
    from library.utils.ranges import TRAINING, check_flags

    check_flags(vars(args), TRAINING)
    configs, _ = build_datasets(args)
    check_latent_caching(configs, "tools/cache_latents.py", to_disk=True)  # the trainer's own refusals
    family = training_family("sdxl" if args.sdxl else "sd", args)
    configs = fit_to_family(configs, family.size_multiple, family.advised_size_multiple, family.title)  # as training
    group, report = build_dataset_group(configs, args.seed or 0, args.prior_loss_weight, args.strict_dataset)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)
    models = family.load(args.pretrained_model_name_or_path, dtype, args.tokenizer_cache_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models.vae.to(device)
    if args.no_half_vae:
        models.vae.to(torch.float32)
    counts = cache_latents(group, lambda px: family.encode_images(models, px), args.vae_batch_size,
                           family.latent_channels, family.cache_suffix, module_fingerprint(models.vae))
    print(f"latent cache: {counts['loaded']} valid file(s) kept, {counts['encoded']} written; "
          f"{len(report.skipped)} unusable image(s) skipped")


if __name__ == "__main__":
    run_cli(main)
