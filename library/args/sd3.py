"""argparse for SD3 / SD3.5: the model and flow-matching flags that sd3_train_network.py and
sd3_train.py share (kohya's ``add_sd3_training_arguments``)."""

from __future__ import annotations

import argparse

from library.args.model_training import add_per_encoder_rates


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


def add_sd3_full_training_args(p: argparse.ArgumentParser) -> None:
    """sd3_train.py's own flags: which encoders train and at what rate, what is cached, and what the
    saved file bundles."""
    add_sd3_args(p)
    g = p.add_argument_group("SD3 full-weight training")
    add_per_encoder_rates(g, ("CLIP-L", "CLIP-G", "T5-XXL"))
    g.add_argument("--train_t5xxl", action="store_true",
                   help="with --train_text_encoder: train T5-XXL too, at --learning_rate_te3")
    g.add_argument("--use_t5xxl_cache_only", action="store_true",
                   help="cache the frozen T5-XXL's outputs once while CLIP-L/G train and run at every step (turns "
                        "on --cache_text_encoder_outputs)")
    g.add_argument("--save_clip", action="store_true",
                   help="bundle CLIP-L and CLIP-G in saved files even when the base file did not and they did not "
                        "train (trained or bundled encoders are always written)")
    g.add_argument("--save_t5xxl", action="store_true",
                   help="bundle T5-XXL in saved files even when the base file did not and it did not train")
    g.add_argument("--num_last_block_to_freeze", type=int,
                   help="keep the MMDiT's last N joint transformer blocks frozen (their weights keep their bytes)")
