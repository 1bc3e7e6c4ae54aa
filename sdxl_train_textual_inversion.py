"""Textual inversion for SDXL: a new word with vectors for both text encoders (kohya's
sdxl_train_textual_inversion.py).

    accelerate launch sdxl_train_textual_inversion.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \
        --dataset_config dataset.toml --output_dir out --output_name mychar \
        --token_string mychar --init_word girl --num_vectors_per_token 4 --learning_rate 5e-3

The embedding file holds ``clip_l`` and ``clip_g`` (the vectors of CLIP-L and of OpenCLIP bigG),
the layout AUTOMATIC1111, ComfyUI and diffusers read for SDXL.
"""

from __future__ import annotations

from library.args.token_training import run_token_trainer
from library.utils.errors import run_cli


def main(argv: list[str] | None = None) -> None:
    run_token_trainer("sdxl", "textual inversion for SDXL", argv)


if __name__ == "__main__":
    run_cli(main)
