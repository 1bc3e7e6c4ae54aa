"""Train a LoRA (or another network plug-in) on an SDXL model.

    accelerate launch sdxl_train_network.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \
        --dataset_config dataset.toml --output_dir out --output_name my_lora --network_module networks.lora

The shared trainer with the SDXL family (two text encoders, size conditioning); LoRA files use
kohya's SDXL names (``lora_unet_input_blocks_...``, ``lora_te1_``, ``lora_te2_``).
"""

from __future__ import annotations

import argparse

from library.args.common import network_training_parser
from library.args.config_file import parse_args_with_config
from library.utils.errors import run_cli
from library.utils.log import setup_logging


def add_sdxl_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SDXL")
    g.add_argument("--text_encoder_lr1", type=float, help="learning rate of the first text encoder (CLIP-L)")
    g.add_argument("--text_encoder_lr2", type=float, help="learning rate of the second text encoder (OpenCLIP bigG)")


def main(argv: list[str] | None = None) -> None:
    parser = network_training_parser("LoRA training for SDXL")
    add_sdxl_args(parser)
    args = parse_args_with_config(parser, argv, required=("pretrained_model_name_or_path", "output_dir"))
    setup_logging(args.console_log_level, args.console_log_file)
    # imported after parsing, so --help and argument errors do not wait for torch and diffusers
    from library.config.family_options import training_family
    from library.config.training_config import build_training_config
    from library.families.sdxl import check_sdxl_resolution
    from library.training.trainer import Trainer

    config = build_training_config(args)
    family = training_family("sdxl", args, config.datasets)
    for i, ds in enumerate(config.datasets):
        check_sdxl_resolution(*ds.resolution, where=f"datasets[{i}].resolution")
    Trainer(family, config).run()


if __name__ == "__main__":
    run_cli(main)
