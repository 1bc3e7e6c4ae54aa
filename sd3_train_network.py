"""Train a LoRA on an SD3 / SD3.5 model (flow matching, three text encoders, optional block swap).

    accelerate launch sd3_train_network.py --pretrained_model_name_or_path sd3.5_medium.safetensors \
        --clip_l clip_l.safetensors --clip_g clip_g.safetensors --t5xxl t5xxl_fp16.safetensors \
        --dataset_config dataset.toml --output_dir out --output_name my_lora --network_module networks.lora_sd3
"""

from __future__ import annotations

import argparse

from library.args.common import network_training_parser
from library.args.config_file import parse_args_with_config
from library.utils.errors import run_cli
from library.utils.log import setup_logging


def add_sd3_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SD3")
    g.add_argument("--clip_l", help="CLIP-L file, when the checkpoint does not bundle it")
    g.add_argument("--clip_g", help="CLIP-G file, when the checkpoint does not bundle it")
    g.add_argument("--t5xxl", help="T5-XXL file, when the checkpoint does not bundle it (without one T5 is zeros)")
    g.add_argument("--t5xxl_max_token_length", type=int, default=256, help="T5 tokens per caption")
    g.add_argument("--t5xxl_device", help="keep T5 on this device (e.g. cpu); its outputs are moved")
    g.add_argument("--t5xxl_dtype", choices=["fp32", "fp16", "bf16"], help="keep T5 in this dtype")
    g.add_argument("--apply_lg_attn_mask", action="store_true", help="mask CLIP-L/G padding in their attention")
    g.add_argument("--apply_t5_attn_mask", action="store_true", help="mask T5 padding in its attention")
    for name in ("clip_l", "clip_g", "t5"):
        g.add_argument(f"--{name}_dropout_rate", type=float, default=0.0,
                       help=f"zero the {name} output of a caption with this probability")
    g.add_argument("--weighting_scheme", default="uniform",
                   choices=["uniform", "none", "logit_normal", "mode", "sigma_sqrt", "cosmap"],
                   help="timestep density (logit_normal, mode) or loss weighting (sigma_sqrt, cosmap)")
    g.add_argument("--logit_mean", type=float, default=0.0)
    g.add_argument("--logit_std", type=float, default=1.0)
    g.add_argument("--mode_scale", type=float, default=1.29)
    g.add_argument("--training_shift", type=float, default=1.0, help="timestep shift; > 1 favours noisier steps")
    g.add_argument("--pos_emb_random_crop_rate", type=float, default=0.0,
                   help="probability of a random positional-embedding window per step (SD3.5)")
    g.add_argument("--enable_scaled_pos_embed", action="store_true",
                   help="positional embeddings scaled per training resolution (SD3.5, multi-resolution)")
    g.add_argument("--blocks_to_swap", type=int,
                   help="keep the last N transformer blocks in CPU memory, moved in just in time")
    g.add_argument("--cpu_offload_checkpointing", action="store_true",
                   help="(kohya's; not available in this version, and it excludes --blocks_to_swap)")


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

    if args.cpu_offload_checkpointing and args.blocks_to_swap:
        raise UserError("--cpu_offload_checkpointing and --blocks_to_swap cannot be used together: both move "
                        "memory to the CPU in ways that conflict; keep --blocks_to_swap")
    if args.cpu_offload_checkpointing:
        raise UserError("--cpu_offload_checkpointing is not available in this version; use --blocks_to_swap N "
                        "or --gradient_checkpointing")
    if args.network_module == "networks.lora":
        raise UserError("--network_module networks.lora targets SD1/SDXL UNets; for SD3 use networks.lora_sd3")
    config = build_training_config(args)
    Trainer(training_family("sd3", args, config.datasets), config).run()


if __name__ == "__main__":
    run_cli(main)
