"""What gen_img.py decides once the model family is known, before the model is loaded: the flags this
family cannot use, the run-wide line defaults, and the line options it must report."""

from __future__ import annotations

import random
from dataclasses import replace

from library.generation import jobs as gen_run
from library.generation.config import GenConfig, NoiseTrickSettings, SizeConditioning
from library.sampling.start_noise import NoiseTricks
from library.utils.errors import UserError


def noise_tricks(noise: NoiseTrickSettings) -> NoiseTricks | None:
    if not (noise.pyramid_prob or noise.offset_prob):
        return None
    return NoiseTricks(noise.pyramid_prob or 0.0, noise.pyramid_range, noise.offset_prob or 0.0, noise.offset_range)


def check_family_args(c: GenConfig, family, family_name: str) -> None:
    """Flags this model family cannot use, refused before the model is loaded."""
    if c.images.clip_vision_strength is not None and not (family.pooled_text_from_image and c.images.image_path):
        raise UserError(f"--clip_vision_strength: for SDXL img2img (--image_path); this is an {family_name} model"
                        + ("" if c.images.image_path else " and there is no --image_path"))
    if c.model.replace_clip_l14_336 and not family.text_encoder_replaceable:
        raise UserError(f"--replace_clip_l14_336: replaces SD1's CLIP-L text encoder; not for {family_name} models")
    if c.model.textual_inversion_embeddings and not family.textual_inversion_keys:
        raise UserError(f"--textual_inversion_embeddings: not available for {family_name} models")
    if c.control.lllite_models and not family.lllite_supported:
        raise UserError(f"--control_net_lllite_models: ControlNet-LLLite files are for SDXL models, not {family_name}")
    if c.control.models and not family.controlnet_supported:
        raise UserError(f"--control_net_models: ControlNet is available for SD1/SD2/SDXL models, not {family_name}")
    if not family.unet_denoiser:
        _check_unet_only_args(c, family_name)
    sizes = c.size.given()
    if sizes and not family.size_conditioning:
        raise UserError(f"{', '.join(sizes)}: SDXL's size conditioning; this {family_name} model has none")


def _check_unet_only_args(c: GenConfig, family_name: str) -> None:
    """Flags for the UNet families (SD1/SD2/SDXL), refused for a model without a UNet."""
    if c.deep_shrink_on or c.gradual_latent_on:
        raise UserError(f"--ds_depth_1 / --gradual_latent_timesteps work on UNet models (SD1/SD2/SDXL), "
                        f"not on this {family_name} model")
    if c.images.regional:
        raise UserError(f"regional LoRA (--mask_path without --image_path) is for SD1/SD2/SDXL, not {family_name}")
    used = [flag for flag, on in (("--force_scheduler_zero_steps_offset", c.prompts.zero_steps_offset),
                                  ("--ddim_eta", c.prompts.ddim_eta), ("--emb_normalize_mode",
                                                                       c.model.emb_normalize_mode != "original"))
            if on]
    if used:
        raise UserError(f"{', '.join(used)}: for SD1/SD2/SDXL models (their samplers and prompt weighting); "
                        f"this is an {family_name} model")


def with_size_defaults(prompts: list, size: SizeConditioning) -> list:
    """Lines without --ow/--oh/--nw/--nh/--ct/--cl take the command line's SDXL size flags."""
    def fill(pair, defaults):
        return tuple(v if v is not None else d for v, d in zip(pair, defaults))

    return [replace(p, original_size=fill(p.original_size, (size.original_width, size.original_height)),
                    negative_original_size=fill(p.negative_original_size,
                                                (size.original_width_negative, size.original_height_negative)),
                    crop=(p.crop[0] or (size.crop_top or 0), p.crop[1] or (size.crop_left or 0)))
            for p in prompts]


def run_settings(c: GenConfig, family) -> gen_run.Settings:
    """The command line's defaults for prompt lines; the seed is drawn now when not given, so
    prompts arriving later (interactive, module) continue the same sequence."""
    p = c.prompts
    size = family.default_image_size
    seed = p.seed if p.seed is not None else random.randint(0, 2**31 - 1)
    return gen_run.Settings(p.width or size, p.height or size, p.steps, p.scale, p.sampler, p.strength,
                            p.negative_prompt, p.images_per_prompt, p.n_iter, seed, p.iter_same_seed, p.negative_scale,
                            c.deep_shrink, c.deep_shrink_on, c.gradual_latent, c.gradual_latent_on,
                            p.shuffle_prompts)


def line_problems(prompts: list, family, family_name: str) -> list[str]:
    """Line options this model family cannot use (reported; the lines generate without them)."""
    sized = [p.source for p in prompts
             if p.original_size != (None, None) or p.negative_original_size != (None, None) or p.crop != (0, 0)]
    if not sized or family.size_conditioning:
        return []
    return [f"{src}: --ow/--oh/--nw/--nh/--ct/--cl are SDXL's size conditioning; this {family_name} model "
            "has none (the line was generated without them)" for src in sized]
