"""Train a LoRA on an SD3 / SD3.5 model (flow matching, three text encoders, optional block swap).

    accelerate launch sd3_train_network.py --pretrained_model_name_or_path sd3.5_medium.safetensors \
        --clip_l clip_l.safetensors --clip_g clip_g.safetensors --t5xxl t5xxl_fp16.safetensors \
        --dataset_config dataset.toml --output_dir out --output_name my_lora --network_module networks.lora_sd3
"""

from __future__ import annotations

from library.args.common import network_training_parser
from library.args.config_file import parse_args_with_config
from library.args.sd3 import add_sd3_args
from library.utils.errors import run_cli
from library.utils.log import setup_logging


def main(argv: list[str] | None = None) -> None:
    parser = network_training_parser("LoRA training for SD3 / SD3.5")
    add_sd3_args(parser)
    parser.set_defaults(network_module="networks.lora_sd3")
    args = parse_args_with_config(parser, argv, required=("pretrained_model_name_or_path", "output_dir"))
    setup_logging(args.console_log_level, args.console_log_file)
    # imported after parsing, so --help and argument errors do not wait for torch and diffusers
    from library.config.family_options import training_family
    from library.config.training_config import build_training_config
    from library.training.trainer import Trainer
    from library.utils.errors import UserError

    if args.network_module == "networks.lora":
        raise UserError("--network_module networks.lora targets SD1/SDXL UNets; for SD3 use networks.lora_sd3")
    config = build_training_config(args)
    Trainer(training_family("sd3", args, config.datasets), config).run()


if __name__ == "__main__":
    run_cli(main)
