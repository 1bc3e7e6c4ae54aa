"""argparse for the full-weight trainers (train_db.py, fine_tune.py): the shared training flags
without the network ones, plus what kohya's two scripts add."""

from __future__ import annotations

import argparse

from library.args.common import shared_training_parser
from library.config.model_training import SAVE_FORMATS


def add_text_encoder_args(p: argparse.ArgumentParser, kind: str) -> None:
    """DreamBooth trains the text encoder unless told to stop; fine-tuning only when asked (kohya)."""
    g = p.add_argument_group("what is trained")
    if kind == "dreambooth":
        g.add_argument("--stop_text_encoder_training", type=int,
                       help="train the text encoder for the first N steps only (-1: never; default: every step)")
        g.add_argument("--no_token_padding", action="store_true",
                       help="pad each batch's captions to its longest, not to 77 tokens (diffusers' DreamBooth)")
    else:
        g.add_argument("--train_text_encoder", action="store_true",
                       help="train the text encoder(s) as well as the UNet / MMDiT (SD3: CLIP-L and CLIP-G; "
                            "T5-XXL too with --train_t5xxl)")
    g.add_argument("--learning_rate_te", dest="text_encoder_lr", type=float, nargs=1,
                   help="the text encoder's learning rate (default --learning_rate; SDXL, SD3: both CLIPs)")


def add_per_encoder_rates(group, names: tuple[str, ...]) -> None:
    """kohya's ``--learning_rate_te1`` / ``--learning_rate_te2`` (SDXL's and SD3's CLIP encoders) and
    SD3's ``--learning_rate_te3`` (T5-XXL, with ``--train_t5xxl``)."""
    for i, name in enumerate(names, start=1):
        group.add_argument(f"--learning_rate_te{i}", dest=f"text_encoder_lr{i}", type=float,
                           help=f"{name}'s learning rate (default --learning_rate_te, else --learning_rate; 0 "
                                "freezes it)")


def add_sharding_args(p: argparse.ArgumentParser) -> None:
    """kohya's DeepSpeed flags; the run is sharded with torch's FSDP2 (library/config/sharding.py)."""
    g = p.add_argument_group("sharded training over processes (kohya's DeepSpeed flags, run on torch FSDP2)")
    g.add_argument("--deepspeed", action="store_true",
                   help="shard the trained weights, their gradients and the optimizer state over the processes of "
                        "accelerate launch --num_processes N (N > 1)")
    g.add_argument("--zero_stage", type=int, choices=[0, 1, 2, 3],
                   help="2 (default) or 1: weights gathered once per step; 3: regathered for backward (least "
                        "memory); 0: no sharding")
    for name in ("offload_optimizer_device", "offload_param_device"):
        g.add_argument(f"--{name}", choices=["none", "cpu", "nvme"],
                       help="cpu: keep the shards in host memory between uses (either flag offloads weights, "
                            "gradients and optimizer state together); nvme is not in this version")
    for name in ("offload_optimizer_nvme_path", "offload_param_nvme_path"):
        g.add_argument(f"--{name}", help="(NVMe offloading is not in this version: refused)")
    g.add_argument("--zero3_init_flag", action="store_true",
                   help="(building the model already sharded is not in this version: refused)")
    g.add_argument("--zero3_save_16bit_model", action="store_true",
                   help="saved models are always gathered whole, in --save_precision (accepted)")
    g.add_argument("--fp16_master_weights_and_gradients", action="store_true",
                   help="(sharded runs keep float32 master weights: refused)")


def add_ema_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("moving average of the weights (EMA)")
    g.add_argument("--ema", action="store_true", help="keep an exponential moving average of the trained weights")
    g.add_argument("--ema_decay", type=float,
                   help="its decay per update (default 0.9999; warmed up over the first updates)")
    g.add_argument("--ema_update_every", type=int, help="update it every N optimizer steps (default 1)")
    g.add_argument("--ema_cpu", action="store_true",
                   help="keep it in CPU memory (saves GPU memory, costs a copy per update)")
    g.add_argument("--ema_save_mode", choices=["ema", "both"],
                   help="ema (default): saved models are the average; both: the trained weights, and the average as "
                        "<name>-ema next to them")


def model_training_parser(description: str, kind: str, add_family_args=None) -> argparse.ArgumentParser:
    """The full parser of a full-weight trainer (``kind``: "dreambooth", "fine_tune", "sdxl" or "sd3");
    ``add_family_args(parser)`` adds the flags of the script's model family."""
    p = shared_training_parser(description, SAVE_FORMATS, network=False)
    add_text_encoder_args(p, kind)
    add_ema_args(p)
    p.add_argument_group("memory").add_argument(
        "--fused_optimizer_groups", type=int,
        help="step the model in N parts, each as soon as its gradients are complete (any per-parameter optimizer; "
             "about 1/N of the gradients held at a time; excludes --fused_backward_pass)")
    add_sharding_args(p)
    if add_family_args is not None:
        add_family_args(p)
    p.set_defaults(log_tracker_name="dreambooth" if kind == "dreambooth" else "finetuning")
    return p


def run_model_trainer(kind: str, family: str, description: str, argv: list[str] | None, add_family_args=None,
                      check=None) -> None:
    """An entry script's main(): parse (with ``add_family_args``), build the config (``check(config)``
    for a family's own advice), train the model's own weights."""
    from library.args.config_file import parse_args_with_config
    from library.utils.log import setup_logging

    args = parse_args_with_config(model_training_parser(description, kind, add_family_args), argv,
                                  required=("pretrained_model_name_or_path", "output_dir"))
    setup_logging(args.console_log_level, args.console_log_file)
    # imported after parsing, so --help and argument errors do not wait for torch and diffusers
    from library.config.family_options import training_family
    from library.config.training_config import build_training_config
    from library.training.model_weights import ModelTraining
    from library.training.trainer import Trainer

    config = build_training_config(args, kind)
    if check is not None:
        check(config)
    Trainer(training_family(family, args, config.datasets), config, ModelTraining(config.model)).run()
