"""Family options from the training flags: they become one family's options record, and
:func:`library.families.build_family` makes the family from it (gen_img's flags go the same way in
:func:`library.generation.config.family_for`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from library.data.dataset_config import DatasetConfig
from library.families import ModelFamily, build_family
from library.families.sd import SDOptions
from library.families.sd3 import SD3Options
from library.families.sdxl import SDXLOptions
from library.maths.flow import FlowOptions
from library.maths.noise import DDPMOptions, SNRWeighting
from library.models.sd3_pos_embed import patched_side
from library.utils.errors import UserError

# flags of the DDPM families that mean nothing to flow matching: refused rather than ignored
_DDPM_ONLY = ("noise_offset", "adaptive_noise_scale", "multires_noise_iterations", "zero_terminal_snr",
              "min_snr_gamma", "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss", "debiased_estimation_loss",
              "v_parameterization", "v2", "clip_skip", "weighted_captions", "noise_offset_random_strength")
_DTYPES = {None: None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_ddpm_options(args: argparse.Namespace) -> DDPMOptions:
    """The DDPM noise and loss options of the SD1/SD2/SDXL trainers."""
    opts = DDPMOptions(
        v_parameterization=args.v_parameterization, min_timestep=args.min_timestep, max_timestep=args.max_timestep,
        noise_offset=args.noise_offset, noise_offset_random_strength=args.noise_offset_random_strength,
        adaptive_noise_scale=args.adaptive_noise_scale, multires_noise_iterations=args.multires_noise_iterations,
        multires_noise_discount=args.multires_noise_discount, ip_noise_gamma=args.ip_noise_gamma,
        ip_noise_gamma_random_strength=args.ip_noise_gamma_random_strength, zero_terminal_snr=args.zero_terminal_snr,
        snr_weighting=SNRWeighting(args.min_snr_gamma, args.scale_v_pred_loss_like_noise_pred,
                                   args.v_pred_like_loss, args.debiased_estimation_loss),
        loss_type=args.loss_type, huber_schedule=args.huber_schedule, huber_c=args.huber_c,
        huber_scale=args.huber_scale)
    problems = opts.problems()
    if problems:
        raise UserError("; ".join(problems))
    return opts


def training_family(name: str, args: argparse.Namespace, datasets: Sequence[DatasetConfig] = ()) -> ModelFamily:
    """The family ``name`` configured from the shared training parser's flags (``datasets``: the
    parsed dataset configs, which SD3's --enable_scaled_pos_embed sizes its embeddings from)."""
    return build_family(name, _TRAINING[name](args, datasets))


def _at_most_two_rates(args: argparse.Namespace) -> None:
    """SD1/SD2 and SDXL: one --text_encoder_lr value per encoder (SD1 takes two as the GUI writes them)."""
    if len(args.text_encoder_lr or []) > 2:
        raise UserError(f"--text_encoder_lr: at most one value per text encoder (2), got {len(args.text_encoder_lr)}")


def _sd_training(args: argparse.Namespace, datasets) -> SDOptions:
    _at_most_two_rates(args)
    no_padding = getattr(args, "no_token_padding", False)  # train_db.py's flag
    if no_padding and (args.max_token_length or 75) != 75:
        raise UserError(f"--no_token_padding pads each batch to its longest caption within one window of 75 tokens; "
                        f"it cannot be used with --max_token_length {args.max_token_length}")
    return SDOptions(ddpm=build_ddpm_options(args), v2=args.v2, clip_skip=args.clip_skip,
                     max_token_length=args.max_token_length or 75, weighted_captions=args.weighted_captions,
                     vae=args.vae, no_token_padding=no_padding)


def _sdxl_training(args: argparse.Namespace, datasets) -> SDXLOptions:
    if args.v2:
        raise UserError("--v2 is for SD2.x models; SDXL is trained without it")
    _at_most_two_rates(args)
    return SDXLOptions(ddpm=build_ddpm_options(args), max_token_length=args.max_token_length or 75,
                       vae=args.vae, weighted_captions=args.weighted_captions, clip_skip=args.clip_skip)


def _sd3_training(args: argparse.Namespace, datasets) -> SD3Options:
    # clip_skip 1 is "no skip", which is what SD3 does (the kohya_ss GUI may write it): accepted
    given = [f"--{name}" for name in _DDPM_ONLY if getattr(args, name, None) and not (name == "clip_skip"
                                                                                    and args.clip_skip == 1)]
    if given:
        raise UserError(f"{', '.join(given)}: not used by SD3 (flow matching); remove them (SD3 has "
                        "--weighting_scheme, --training_shift, --ip_noise_gamma instead)")
    if args.loss_type in ("huber", "smooth_l1") and args.huber_schedule != "constant":
        raise UserError(f"--loss_type {args.loss_type} on SD3 uses a constant c: add --huber_schedule constant")
    if args.cpu_offload_checkpointing:
        also = " (and it cannot be combined with --blocks_to_swap)" if args.blocks_to_swap else ""
        raise UserError(f"--cpu_offload_checkpointing is not available in this version{also}; use --blocks_to_swap N "
                        "or --gradient_checkpointing")
    _check_t5_training(args)
    flow = FlowOptions(args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale, args.training_shift,
                       args.min_timestep, args.max_timestep, args.loss_type, args.huber_c)
    sizes = tuple(patched_side(*ds.resolution) for ds in datasets) if args.enable_scaled_pos_embed else ()
    return SD3Options(
        flow=flow, clip_l=args.clip_l, clip_g=args.clip_g, t5xxl=args.t5xxl, vae=args.vae,
        t5xxl_max_token_length=args.t5xxl_max_token_length, apply_lg_attn_mask=args.apply_lg_attn_mask,
        apply_t5_attn_mask=args.apply_t5_attn_mask, clip_l_dropout_rate=args.clip_l_dropout_rate,
        clip_g_dropout_rate=args.clip_g_dropout_rate, t5_dropout_rate=args.t5_dropout_rate,
        pos_emb_random_crop_rate=args.pos_emb_random_crop_rate, scaled_pos_embed_sizes=sizes,
        blocks_to_swap=args.blocks_to_swap or 0, t5xxl_device=args.t5xxl_device,
        t5xxl_dtype=_DTYPES[args.t5xxl_dtype], ip_noise_gamma=args.ip_noise_gamma,
        ip_noise_gamma_random_strength=args.ip_noise_gamma_random_strength,
        save_clip=getattr(args, "save_clip", False), save_t5xxl=getattr(args, "save_t5xxl", False),
        train_t5xxl=getattr(args, "train_t5xxl", False))


def _check_t5_training(args: argparse.Namespace) -> None:
    """sd3_train.py's --train_t5xxl: only beside the CLIPs (as kohya requires), never cached, and
    with T5 where the trained weights are (not on its own device or dtype)."""
    if not getattr(args, "train_t5xxl", False):
        return
    if not args.train_text_encoder:
        raise UserError("--train_t5xxl trains T5-XXL beside CLIP-L/G: add --train_text_encoder")
    cached = [f"--{name}" for name in ("use_t5xxl_cache_only", "cache_text_encoder_outputs",
                                       "cache_text_encoder_outputs_to_disk") if getattr(args, name)]
    if cached:
        raise UserError(f"--train_t5xxl with {', '.join(cached)}: a trained T5's outputs change at every step, so "
                        "they cannot be cached; remove one of them")
    placed = [f"--{name}" for name in ("t5xxl_device", "t5xxl_dtype") if getattr(args, name)]
    if placed:
        raise UserError(f"--train_t5xxl with {', '.join(placed)}: a trained T5 stays on the training device in the "
                        "trained weights' dtype; remove " + " and ".join(placed))


_TRAINING = {"sd": _sd_training, "sdxl": _sdxl_training, "sd3": _sd3_training}
