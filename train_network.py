"""Train a LoRA (or another network plug-in) on a Stable Diffusion 1.x/2.x model.

    accelerate launch train_network.py --pretrained_model_name_or_path model.safetensors \
        --dataset_config dataset.toml --output_dir out --output_name my_lora --network_module networks.lora
"""

from __future__ import annotations

from library.args.common import network_training_parser
from library.args.config_file import parse_args_with_config
from library.utils.errors import run_cli
from library.utils.log import setup_logging


def main(argv: list[str] | None = None) -> None:
    parser = network_training_parser("LoRA training for SD1.x/2.x")
    args = parse_args_with_config(parser, argv, required=("pretrained_model_name_or_path", "output_dir"))
    setup_logging(args.console_log_level, args.console_log_file)
    # imported after parsing, so --help and argument errors do not wait for torch and diffusers
    from library.config.family_options import training_family
    from library.config.training_config import build_training_config
    from library.training.trainer import Trainer

    config = build_training_config(args)
    Trainer(training_family("sd", args, config.datasets), config).run()


if __name__ == "__main__":
    run_cli(main)
