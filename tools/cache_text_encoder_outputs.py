"""Pre-compute the text-encoder output cache files of a dataset, with the same flags as training.

    python tools/cache_text_encoder_outputs.py --pretrained_model_name_or_path model.safetensors \
        --dataset_config dataset.toml [--clip_skip 2] [--max_token_length 225]

Writes ``<image stem>_sd_te.npz`` (``_sdxl_te.npz`` with ``--sdxl``) next to each image (kept while
caption and encoder settings are unchanged). Train with ``--cache_text_encoder_outputs_to_disk
--network_train_unet_only``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.args.common import network_training_parser
from library.args.config_file import parse_args_with_config
from library.utils.errors import UserError, run_cli  # noqa: E402
from library.utils.log import setup_logging


def main(argv: list[str] | None = None) -> None:
    parser = network_training_parser("Pre-compute text-encoder output cache files (SD1.x/2.x, or SDXL with --sdxl)")
    parser.add_argument("--sdxl", action="store_true", help="the model is SDXL (files end in _sdxl*.npz)")
    args = parse_args_with_config(parser, argv, required=("pretrained_model_name_or_path",))
    setup_logging(args.console_log_level, args.console_log_file)
    # imported after parsing, so --help and argument errors do not wait for torch and diffusers
    import torch

    from library.config.family_options import training_family
    from library.config.training_config import build_datasets
    from library.data.dataset import build_dataset_group
    from library.data.text_cache import cache_text_outputs, random_caption_options

    group, report = build_dataset_group(build_datasets(args)[0], args.seed or 0, args.prior_loss_weight,
                                        args.strict_dataset)
    groups = [group] + ([group.validation] if group.validation else [])
    randomised = random_caption_options([it for g in groups for it in g.items])
    if randomised:
        raise UserError(f"captions change between steps ({', '.join(randomised)}); they cannot be cached")
    family = training_family("sdxl" if args.sdxl else "sd", args)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)
    models = family.load(args.pretrained_model_name_or_path, dtype, args.tokenizer_cache_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for encoder in models.text_encoders:
        encoder.to(device)
    counts = cache_text_outputs(groups, lambda caps: family.encode_prompts(models, caps, device),
                                family.text_encoder_settings(models), args.text_encoder_batch_size,
                                family.cache_suffix)
    print(f"text-encoder cache: {counts['loaded']} valid file(s) kept, {counts['encoded']} written; "
          f"{len(report.skipped)} unusable image(s) skipped")


if __name__ == "__main__":
    run_cli(main)
