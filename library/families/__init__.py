"""Model families by name. A new family is a module plus one entry in :data:`BUILDERS`."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from library.families.base import LoadedModels, ModelFamily, NoisyBatch


def _sd(args: argparse.Namespace) -> ModelFamily:
    from library.config.training_config import build_ddpm_options
    from library.families.sd import SDFamily, SDOptions

    return SDFamily(SDOptions(ddpm=build_ddpm_options(args), v2=args.v2, clip_skip=args.clip_skip,
                              max_token_length=args.max_token_length or 75, weighted_captions=args.weighted_captions,
                              vae=args.vae))


def _sdxl(args: argparse.Namespace) -> ModelFamily:
    from library.config.training_config import build_ddpm_options
    from library.families.sdxl import SDXLFamily, SDXLOptions
    from library.utils.errors import UserError

    if args.v2:
        raise UserError("--v2 is for SD2.x models; SDXL is trained without it")
    return SDXLFamily(SDXLOptions(ddpm=build_ddpm_options(args), max_token_length=args.max_token_length or 75,
                                  vae=args.vae, weighted_captions=args.weighted_captions, clip_skip=args.clip_skip))


# flags of the DDPM families that mean nothing to flow matching: refused rather than ignored
_DDPM_ONLY = ("noise_offset", "adaptive_noise_scale", "multires_noise_iterations", "zero_terminal_snr",
              "min_snr_gamma", "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss", "debiased_estimation_loss",
              "v_parameterization", "v2", "clip_skip", "weighted_captions", "noise_offset_random_strength")


def _sd3(args: argparse.Namespace) -> ModelFamily:
    from library.families.sd3 import SD3Family, SD3Options, check_options
    from library.models.sd3_pos_embed import patched_side
    from library.training.flow import FlowOptions
    from library.utils.errors import UserError

    given = [f"--{name}" for name in _DDPM_ONLY if getattr(args, name, None)]
    if given:
        raise UserError(f"{', '.join(given)}: not used by SD3 (flow matching); remove them (SD3 has "
                        "--weighting_scheme, --training_shift, --ip_noise_gamma instead)")
    if args.loss_type in ("huber", "smooth_l1") and args.huber_schedule != "constant":
        raise UserError(f"--loss_type {args.loss_type} on SD3 uses a constant c: add --huber_schedule constant")
    flow = FlowOptions(args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale, args.training_shift,
                       args.min_timestep, args.max_timestep, args.loss_type, args.huber_c)
    sizes = ()
    if args.enable_scaled_pos_embed:
        from library.config.training_config import build_datasets

        sizes = tuple(patched_side(*ds.resolution) for ds in build_datasets(args)[0])
    dtypes = {None: None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    options = SD3Options(
        flow=flow, clip_l=args.clip_l, clip_g=args.clip_g, t5xxl=args.t5xxl, vae=args.vae,
        t5xxl_max_token_length=args.t5xxl_max_token_length, apply_lg_attn_mask=args.apply_lg_attn_mask,
        apply_t5_attn_mask=args.apply_t5_attn_mask, clip_l_dropout_rate=args.clip_l_dropout_rate,
        clip_g_dropout_rate=args.clip_g_dropout_rate, t5_dropout_rate=args.t5_dropout_rate,
        pos_emb_random_crop_rate=args.pos_emb_random_crop_rate, scaled_pos_embed_sizes=sizes,
        blocks_to_swap=args.blocks_to_swap or 0, t5xxl_device=args.t5xxl_device,
        t5xxl_dtype=dtypes[args.t5xxl_dtype], ip_noise_gamma=args.ip_noise_gamma,
        ip_noise_gamma_random_strength=args.ip_noise_gamma_random_strength)
    check_options(options)
    return SD3Family(options)


#: family name -> builder from the parsed flags of the shared training parser
BUILDERS: dict[str, Callable[[argparse.Namespace], ModelFamily]] = {"sd": _sd, "sdxl": _sdxl, "sd3": _sd3}


# single-file layouts and diffusers pipeline classes -> family name
LAYOUT_FAMILY = {"sd1": "sd", "sd2": "sd", "sdxl": "sdxl", "sd3": "sd3"}
PIPELINE_FAMILY = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
                   "StableDiffusion3Pipeline": "sd3"}


def generation_family(name: str, args: argparse.Namespace) -> ModelFamily:
    """A family configured from gen_img.py's flags (prompt weighting always on for the CLIP families)."""
    from library.training.noise import DDPMOptions

    ddpm = DDPMOptions(v_parameterization=args.v_parameterization, zero_terminal_snr=args.zero_terminal_snr)
    tokens = 75 * max(1, min(3, args.max_embeddings_multiples))
    if name == "sd3":
        from library.families.sd3 import SD3Family, SD3Options

        return SD3Family(SD3Options(clip_l=args.clip_l, clip_g=args.clip_g, t5xxl=args.t5xxl, vae=args.vae,
                                    t5xxl_max_token_length=args.t5xxl_max_token_length,
                                    sample_shift=args.flow_shift))
    if name == "sdxl":
        from library.families.sdxl import SDXLFamily, SDXLOptions

        return SDXLFamily(SDXLOptions(ddpm=ddpm, max_token_length=tokens, vae=args.vae, weighted_captions=True,
                                      emb_normalize=args.emb_normalize_mode))
    from library.families.sd import SDFamily, SDOptions

    return SDFamily(SDOptions(ddpm=ddpm, v2=args.v2, clip_skip=args.clip_skip, max_token_length=tokens, vae=args.vae,
                              weighted_captions=True, emb_normalize=args.emb_normalize_mode))


def family_from_args(name: str, args: argparse.Namespace) -> ModelFamily:
    """The family ``name`` configured from the training flags."""
    return BUILDERS[name](args)


__all__ = ["BUILDERS", "LAYOUT_FAMILY", "LoadedModels", "ModelFamily", "NoisyBatch", "PIPELINE_FAMILY",
           "family_from_args", "generation_family"]
