"""Textual inversion for SD1.x/2.x: teach the frozen model a new word (kohya's train_textual_inversion.py).

    accelerate launch train_textual_inversion.py --pretrained_model_name_or_path model.safetensors \
        --dataset_config dataset.toml --output_dir out --output_name mychar \
        --token_string mychar --init_word girl --num_vectors_per_token 4 --learning_rate 5e-3

Only the new token's vectors train; captions name the concept with --token_string (or
--use_object_template / --use_style_template write them). The result is an embedding file
(``emb_params``; ``--save_model_as pt`` for AUTOMATIC1111's .pt) that gen_img.py and the other
tools load; in prompts its file name is the word.
"""

from __future__ import annotations

from library.args.token_training import run_token_trainer
from library.utils.errors import run_cli


def main(argv: list[str] | None = None) -> None:
    run_token_trainer("sd", "textual inversion for SD1.x/2.x", argv)


if __name__ == "__main__":
    run_cli(main)
