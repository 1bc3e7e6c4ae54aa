"""gen_img.py's command-line checks and the run-wide settings built from the flags, all before
any model is loaded."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

from library.generation import jobs as gen_run
from library.utils.errors import UserError


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before a model is loaded."""
    if args.fp16 and not torch.cuda.is_available():
        raise UserError("--fp16 needs a CUDA GPU; on CPU use --bf16 or full precision")
    for flag in ("W", "H"):
        value = getattr(args, flag)
        if value is not None and (value < 64 or value % 8):
            raise UserError(f"--{flag} {value}: image sizes must be multiples of 8, at least 64")
    for flag in ("network_weights", "textual_inversion_embeddings"):
        for f in getattr(args, flag):
            if not Path(f).is_file():
                raise UserError(f"--{flag} {f}: file not found")
    if len(args.network_mul) > len(args.network_weights) or len(args.network_module) > len(args.network_weights):
        raise UserError("--network_mul / --network_module: at most one value per --network_weights file")
    if args.highres_fix_scale is not None and not 0 < args.highres_fix_scale < 1:
        raise UserError("--highres_fix_scale: the first pass's fraction of the size, between 0 and 1 (e.g. 0.5)")
    if not args.highres_fix_scale:
        needing = [f"--{n}" for n in ("highres_fix_save_1st", "highres_fix_latents_upscaling", "highres_fix_upscaler",
                                      "highres_fix_disable_control_net") if getattr(args, n)]
        if needing:
            raise UserError(f"{', '.join(needing)}: parts of the highres fix; add --highres_fix_scale (e.g. 0.5)")
    if args.mask_path and not args.image_path and not args.network_weights:
        raise UserError("--mask_path needs --image_path (the image to inpaint), or LoRAs whose regions it holds")
    if args.network_regional_mask_max_color_codes is not None:
        if not (args.mask_path and not args.image_path and args.network_weights):
            raise UserError("--network_regional_mask_max_color_codes is for regional LoRA: LoRAs and a region "
                            "--mask_path, without --image_path")
        if not 1 <= args.network_regional_mask_max_color_codes <= 7:
            raise UserError("--network_regional_mask_max_color_codes: 1 to 7 (the colour codes of 3 bits)")
    if args.mask_path and not args.image_path and args.network_pre_calc:
        raise UserError("--network_pre_calc cannot be used with regional LoRA (its updates depend on the region)")
    _check_shrink_and_noise_args(args)
    _check_nothing_unused(args)
    from library.sampling.controlnet import check_controlnet_args

    check_controlnet_args(args)


PYRAMID_DISCOUNTS, OFFSETS = (0.3, 0.8), (-0.1, 0.1)  # kohya's ranges when the flags are not given

# a flag -> the flags of which one must be given for it to be used
USED_WITH = {"clip_vision_model": ("clip_vision_strength",), "clip_l14_336_model": ("replace_clip_l14_336",),
             "prompter_module_args": ("from_module",), "highres_fix_upscaler_args": ("highres_fix_upscaler",),
             "pyramid_noise_discount_range": ("pyramid_noise_prob",), "noise_offset_range": ("noise_offset_prob",),
             "guide_image_path": ("control_net_models", "control_net_lllite_models")}


def _check_nothing_unused(args: argparse.Namespace) -> None:
    """A flag given without the flag that uses it would be ignored: say so instead."""
    for flag, users in USED_WITH.items():
        if getattr(args, flag) and not any(getattr(args, user) for user in users):
            raise UserError(f"--{flag} is only used with {' or '.join('--' + u for u in users)}, which is not given")


def _check_shrink_and_noise_args(args: argparse.Namespace) -> None:
    from library.sampling.samplers import canonical_sampler

    if args.ds_depth_1 is not None and args.ds_depth_1 < 1 or args.ds_depth_2 is not None and args.ds_depth_2 < 1:
        raise UserError("--ds_depth_1/--ds_depth_2: input block depths start at 1 (3 is usual)")
    if not 0 < args.ds_ratio < 1:
        raise UserError(f"--ds_ratio {args.ds_ratio}: the shrink factor is between 0 and 1 (e.g. 0.5)")
    gradual_latent_settings(args).check()
    if args.gradual_latent_timesteps is not None:
        if canonical_sampler(args.sampler) != "euler_a":
            raise UserError(f"--gradual_latent_timesteps needs --sampler euler_a (not {args.sampler})")
        if args.image_path:
            raise UserError("--gradual_latent_timesteps is for text-to-image; it cannot be used with --image_path")
    ranges = {"pyramid_noise": args.pyramid_noise_discount_range or PYRAMID_DISCOUNTS,
              "noise_offset": args.noise_offset_range or OFFSETS}
    for name, (low, high) in ranges.items():
        prob = getattr(args, f"{name}_prob")
        if prob is not None and not 0 <= prob <= 1:
            raise UserError(f"--{name}_prob {prob}: a probability between 0 and 1")
        if low > high:
            raise UserError(f"--{name} range {low} {high}: give the smaller value first")
        if prob and args.image_path:
            raise UserError(f"--{name}_prob changes the start noise of text-to-image; "
                            "it cannot be used with --image_path")


def gradual_latent_settings(args: argparse.Namespace):
    """The command line's Gradual Latent values (the start defaults to 650 for lines that turn it on)."""
    from library.sampling.gradual_latent import GradualLatent, Unsharp

    unsharp = None
    if args.gradual_latent_unsharp_params:
        try:
            unsharp = Unsharp.parse(args.gradual_latent_unsharp_params)
        except ValueError as exc:
            raise UserError(f"--gradual_latent_unsharp_params {exc}") from exc
    start = args.gradual_latent_timesteps if args.gradual_latent_timesteps is not None else 650
    return GradualLatent(start, args.gradual_latent_ratio, args.gradual_latent_ratio_step,
                         args.gradual_latent_every_n_steps, args.gradual_latent_s_noise, unsharp)


def noise_tricks(args: argparse.Namespace):
    from library.sampling.start_noise import NoiseTricks

    if not (args.pyramid_noise_prob or args.noise_offset_prob):
        return None
    return NoiseTricks(args.pyramid_noise_prob or 0.0, tuple(args.pyramid_noise_discount_range or PYRAMID_DISCOUNTS),
                       args.noise_offset_prob or 0.0, tuple(args.noise_offset_range or OFFSETS))


SIZE_FLAGS = ("original_width", "original_height", "original_width_negative", "original_height_negative",
              "crop_top", "crop_left")


def check_family_args(args: argparse.Namespace, family, family_name: str) -> None:
    """Flags this model family cannot use, refused before the model is loaded."""
    if args.clip_vision_strength is not None and not (family.pooled_text_from_image and args.image_path):
        raise UserError(f"--clip_vision_strength: for SDXL img2img (--image_path); this is an {family_name} model"
                        + ("" if args.image_path else " and there is no --image_path"))
    if args.replace_clip_l14_336 and not family.text_encoder_replaceable:
        raise UserError(f"--replace_clip_l14_336: replaces SD1's CLIP-L text encoder; not for {family_name} models")
    if args.textual_inversion_embeddings and not family.textual_inversion_keys:
        raise UserError(f"--textual_inversion_embeddings: not available for {family_name} models")
    if args.control_net_lllite_models and not family.lllite_supported:
        raise UserError(f"--control_net_lllite_models: ControlNet-LLLite files are for SDXL models, not {family_name}")
    if args.control_net_models and not family.controlnet_supported:
        raise UserError(f"--control_net_models: ControlNet is available for SD1/SD2/SDXL models, not {family_name}")
    if not family.unet_denoiser:
        _check_unet_only_args(args, family_name)
    sizes = [f"--{name}" for name in SIZE_FLAGS if getattr(args, name) is not None]
    if sizes and not family.size_conditioning:
        raise UserError(f"{', '.join(sizes)}: SDXL's size conditioning; this {family_name} model has none")


def _check_unet_only_args(args: argparse.Namespace, family_name: str) -> None:
    """Flags for the UNet families (SD1/SD2/SDXL), refused for a model without a UNet."""
    if args.ds_depth_1 is not None or args.gradual_latent_timesteps is not None:
        raise UserError(f"--ds_depth_1 / --gradual_latent_timesteps work on UNet models (SD1/SD2/SDXL), "
                        f"not on this {family_name} model")
    if args.mask_path and not args.image_path:
        raise UserError(f"regional LoRA (--mask_path without --image_path) is for SD1/SD2/SDXL, not {family_name}")
    used = [f"--{name}" for name in ("force_scheduler_zero_steps_offset", "ddim_eta") if getattr(args, name)]
    if args.emb_normalize_mode != "original":
        used.append("--emb_normalize_mode")
    if used:
        raise UserError(f"{', '.join(used)}: for SD1/SD2/SDXL models (their samplers and prompt weighting); "
                        f"this is an {family_name} model")


def with_size_defaults(prompts: list, args: argparse.Namespace) -> list:
    """Lines without --ow/--oh/--nw/--nh/--ct/--cl take the command line's SDXL size flags."""
    from dataclasses import replace

    a = args

    def fill(pair, defaults):
        return tuple(v if v is not None else d for v, d in zip(pair, defaults))

    return [replace(p, original_size=fill(p.original_size, (a.original_width, a.original_height)),
                    negative_original_size=fill(p.negative_original_size,
                                                (a.original_width_negative, a.original_height_negative)),
                    crop=(p.crop[0] or (a.crop_top or 0), p.crop[1] or (a.crop_left or 0)))
            for p in prompts]


def run_settings(args: argparse.Namespace, family) -> gen_run.Settings:
    """The command line's defaults for prompt lines; the seed is drawn now when not given, so
    prompts arriving later (interactive, module) continue the same sequence."""
    from library.sampling.deep_shrink import DeepShrink

    size = family.default_image_size
    deep_shrink = DeepShrink(args.ds_depth_1 or 3, args.ds_timesteps_1, args.ds_depth_2, args.ds_timesteps_2,
                             args.ds_ratio)
    seed = args.seed if args.seed is not None else random.randint(0, 2**31 - 1)
    return gen_run.Settings(args.W or size, args.H or size, args.steps, args.scale, args.sampler, args.strength,
                            args.negative_prompt, args.images_per_prompt, args.n_iter, seed,
                            args.iter_same_seed, args.negative_scale, deep_shrink, args.ds_depth_1 is not None,
                            gradual_latent_settings(args), args.gradual_latent_timesteps is not None,
                            args.shuffle_prompts)


def line_problems(prompts: list, family, family_name: str) -> list[str]:
    """Line options this model family cannot use (reported; the lines generate without them)."""
    sized = [p.source for p in prompts
             if p.original_size != (None, None) or p.negative_original_size != (None, None) or p.crop != (0, 0)]
    if not sized or family.size_conditioning:
        return []
    return [f"{src}: --ow/--oh/--nw/--nh/--ct/--cl are SDXL's size conditioning; this {family_name} model "
            "has none (the line was generated without them)" for src in sized]
