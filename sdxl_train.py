"""Train an SDXL model's own weights: fine-tuning from metadata or DreamBooth folders (kohya's sdxl_train.py).

    accelerate launch sdxl_train.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \
        --dataset_config dataset.toml --output_dir out --output_name tuned --train_text_encoder \
        --learning_rate 4e-7 --learning_rate_te1 1e-7 --learning_rate_te2 1e-7 --mixed_precision bf16

Either kind of dataset (image folders with class tokens and regularisation images, or kohya's
metadata JSON), as kohya's script takes. The UNet trains (per block with --block_lr), the two text
encoders with --train_text_encoder; the result is a whole SDXL checkpoint (--save_model_as).
"""

from __future__ import annotations

import argparse

from library.args.model_training import add_per_encoder_rates, run_model_trainer
from library.utils.errors import run_cli


def add_sdxl_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SDXL")
    add_per_encoder_rates(g, ("CLIP-L", "OpenCLIP bigG"))
    g.add_argument("--block_lr", help="23 comma-separated UNet rates: time/label embeddings, input blocks 0-8, "
                                      "middle block 0-2, output blocks 0-8, out (0 freezes a block)")


def _check_sizes(config) -> None:
    from library.families.sdxl import check_sdxl_resolution

    for i, ds in enumerate(config.datasets):
        check_sdxl_resolution(*ds.resolution, where=f"datasets[{i}].resolution")


def main(argv: list[str] | None = None) -> None:
    run_model_trainer("sdxl", "sdxl", "full-weight training for SDXL", argv, add_sdxl_args, _check_sizes)


if __name__ == "__main__":
    run_cli(main)
