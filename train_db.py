"""DreamBooth: train a Stable Diffusion 1.x/2.x model's own weights on image folders.

    accelerate launch train_db.py --pretrained_model_name_or_path model.safetensors \
        --train_data_dir train --reg_data_dir reg --output_dir out --output_name my_model \
        --prior_loss_weight 1.0 --stop_text_encoder_training 400

Folders are kohya's ``<repeats>_<identifier> <class>`` (or a dataset TOML); regularisation images
are weighted by --prior_loss_weight. The UNet and the text encoder train (the text encoder until
--stop_text_encoder_training); the result is a whole checkpoint (--save_model_as).
"""

from __future__ import annotations

from library.args.model_training import run_model_trainer
from library.utils.errors import run_cli


def main(argv: list[str] | None = None) -> None:
    run_model_trainer("dreambooth", "sd", "DreamBooth (full weights) for SD1.x/2.x", argv)


if __name__ == "__main__":
    run_cli(main)
