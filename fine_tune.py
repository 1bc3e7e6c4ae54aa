"""Fine-tune a Stable Diffusion 1.x/2.x model's own weights from caption metadata.

    accelerate launch fine_tune.py --pretrained_model_name_or_path model.safetensors \
        --in_json meta_lat.json --train_data_dir images --output_dir out --output_name tuned

The metadata is what kohya's finetune/ scripts write (JSON or JSONL: captions, tags,
train_resolution), given with --in_json or as metadata_file subsets of a dataset TOML. The UNet
trains (the text encoder too with --train_text_encoder); the result is a whole checkpoint.
"""

from __future__ import annotations

from library.args.model_training import run_model_trainer
from library.utils.errors import run_cli


def main(argv: list[str] | None = None) -> None:
    run_model_trainer("fine_tune", "sd", "fine-tuning (full weights) for SD1.x/2.x", argv)


if __name__ == "__main__":
    run_cli(main)
