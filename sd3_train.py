"""Train an SD3 / SD3.5 model's own weights: the MMDiT, CLIP-L/G with --train_text_encoder and
T5-XXL with --train_t5xxl (kohya's sd3_train.py).

    accelerate launch sd3_train.py --pretrained_model_name_or_path sd3.5_medium.safetensors \
        --clip_l clip_l.safetensors --clip_g clip_g.safetensors --t5xxl t5xxl_fp16.safetensors \
        --dataset_config dataset.toml --output_dir out --output_name tuned --mixed_precision bf16 \
        --optimizer_type adafactor --optimizer_args relative_step=False scale_parameter=False \
        --fused_backward_pass --blocks_to_swap 8 --full_bf16 --learning_rate 1e-5

Either kind of dataset (image folders or kohya's metadata JSON), the flow-matching options of
sd3_train_network.py, block swap of the trained blocks (their gradients travel with them), T5's
outputs cached alone with --use_t5xxl_cache_only; the result is a whole SD3 file (or a diffusers
folder with --save_model_as).
"""

from __future__ import annotations

from library.args.model_training import run_model_trainer
from library.args.sd3 import add_sd3_full_training_args
from library.utils.errors import run_cli


def main(argv: list[str] | None = None) -> None:
    run_model_trainer("sd3", "sd3", "full-weight training for SD3 / SD3.5", argv, add_sd3_full_training_args)


if __name__ == "__main__":
    run_cli(main)
