"""gen_img.py's typed configuration: the flags become one frozen :class:`GenConfig` (a small record
per feature) once, checked before any model is loaded; nothing after this reads the Namespace.

The one exception is kohya's ``--from_module`` protocol, whose ``get_prompter(args, pipe, networks)``
and prompter calls receive the command line itself: :attr:`GenConfig.prompter_args` carries it to
that user module untouched.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from library.config.compile_options import compile_backend
from library.families import ModelFamily, build_family
from library.families.sd import SDOptions
from library.families.sd3 import SD3Options
from library.families.sdxl import SDXLOptions
from library.maths.noise import DDPMOptions
from library.sampling.controlnet import check_prep
from library.sampling.deep_shrink import DeepShrink
from library.sampling.gradual_latent import GradualLatent, Unsharp
from library.sampling.samplers import canonical_sampler
from library.utils.errors import UserError
from library.utils.files import check_writable_folder
from library.utils.ranges import GENERATION, check_flags

PYRAMID_DISCOUNTS, OFFSETS = (0.3, 0.8), (-0.1, 0.1)  # kohya's ranges when the flags are not given
SIZE_FLAGS = ("original_width", "original_height", "original_width_negative", "original_height_negative",
              "crop_top", "crop_left")


@dataclass(frozen=True)
class ModelSettings:
    """Which model, how its family is configured, and what replaces or extends its text side."""

    ckpt: str
    forced_family: str | None  # --sdxl / --sd3 (else detected from the files)
    v2: bool = False
    v_parameterization: bool = False
    zero_terminal_snr: bool = False
    vae: str | None = None
    clip_l: str | None = None
    clip_g: str | None = None
    t5xxl: str | None = None
    t5xxl_max_token_length: int = 256
    flow_shift: float = 3.0
    tokenizer_cache_dir: str | None = None
    clip_skip: int | None = None
    max_embeddings_multiples: int = 1
    emb_normalize_mode: str = "original"
    textual_inversion_embeddings: tuple[str, ...] = ()
    replace_clip_l14_336: bool = False
    clip_l14_336_model: str | None = None


@dataclass(frozen=True)
class RuntimeSettings:
    """Precision and memory: how the loaded model runs."""

    dtype: torch.dtype = torch.float32  # --fp16 / --bf16
    no_half_vae: bool = False
    vae_slices: bool = False
    vae_tiling: bool = False
    vae_batch_size: float | None = None  # images decoded at a time (below 1: a fraction of the batch)
    channels_last: bool = False
    xformers: bool = False  # --xformers / --diffusers_xformers
    compile_backend: str | None = None  # --torch_compile: the denoiser's blocks compiled with this backend


@dataclass(frozen=True)
class PromptSettings:
    """Where prompts come from and the command line's defaults for every prompt line."""

    prompt: str | None = None
    from_file: str | None = None
    interactive: bool = False
    from_module: str | None = None
    prompter_module_args: str | None = None
    shuffle_prompts: bool = False
    images_per_prompt: int = 1
    n_iter: int = 1
    batch_size: int = 1
    seed: int | None = None
    iter_same_seed: bool = False
    width: int | None = None
    height: int | None = None
    steps: int = 50
    scale: float = 7.5
    negative_scale: float | None = None
    sampler: str = "ddim"
    negative_prompt: str = ""
    strength: float = 0.8  # img2img
    ddim_eta: float | None = None
    zero_steps_offset: bool = False  # --force_scheduler_zero_steps_offset


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's size conditioning defaults for lines without --ow/--oh/--nw/--nh/--ct/--cl."""

    original_width: int | None = None
    original_height: int | None = None
    original_width_negative: int | None = None
    original_height_negative: int | None = None
    crop_top: int | None = None
    crop_left: int | None = None

    def given(self) -> list[str]:
        return [f"--{name}" for name in SIZE_FLAGS if getattr(self, name) is not None]


@dataclass(frozen=True)
class NetworkSettings:
    """The LoRA files and how they are applied."""

    weights: tuple[str, ...] = ()
    muls: tuple[float, ...] = ()
    modules: tuple[str, ...] = ()
    args: tuple[str, ...] = ()  # per file, 'key=value;key=value' for third-party modules
    merge: bool = False
    merge_n_models: int | None = None
    pre_calc: bool = False
    show_meta: bool = False
    regional_color_codes: int | None = None  # --network_regional_mask_max_color_codes

    def mul(self, i: int) -> float:
        return self.muls[i] if i < len(self.muls) else 1.0


@dataclass(frozen=True)
class ImageInputs:
    """img2img / inpainting inputs, guide images, and SDXL's image-pooled text."""

    image_path: str | None = None
    mask_path: str | None = None
    guide_image_path: str | None = None
    clip_vision_strength: float | None = None
    clip_vision_model: str | None = None

    @property
    def regional(self) -> bool:
        """A mask without an image holds the regions of the LoRAs (regional LoRA)."""
        return bool(self.mask_path and not self.image_path)


@dataclass(frozen=True)
class HighresFix:
    """kohya's highres fix: a smaller first pass, enlarged, refined by an img2img pass."""

    scale: float | None = None  # None: off
    steps: int = 28
    strength: float = 0.7
    save_1st: bool = False
    latents_upscaling: bool = False
    upscaler: str | None = None
    upscaler_args: str | None = None
    disable_control_net: bool = False


@dataclass(frozen=True)
class ControlSettings:
    """ControlNets or ControlNet-LLLites and their per-model settings."""

    models: tuple[str, ...] = ()
    lllite_models: tuple[str, ...] = ()
    preps: tuple[str, ...] = ()
    multipliers: tuple[float, ...] = ()
    ratios: tuple[float, ...] = ()

    def per_model(self, i: int) -> tuple[str, float, float]:
        """(prep, multiplier, ratio) of the i-th model; a missing value takes its default."""
        def nth(values, default):
            return values[i] if i < len(values) else default
        return nth(self.preps, "none"), nth(self.multipliers, 1.0), nth(self.ratios, 1.0)


@dataclass(frozen=True)
class NoiseTrickSettings:
    """kohya's start-noise tricks; a range not given is kohya's default range."""

    pyramid_prob: float | None = None
    pyramid_range_given: tuple[float, float] | None = None
    offset_prob: float | None = None
    offset_range_given: tuple[float, float] | None = None

    @property
    def pyramid_range(self) -> tuple[float, float]:
        return self.pyramid_range_given or PYRAMID_DISCOUNTS

    @property
    def offset_range(self) -> tuple[float, float]:
        return self.offset_range_given or OFFSETS


@dataclass(frozen=True)
class OutputSettings:
    outdir: str
    sequential_file_name: bool = False
    use_original_file_name: bool = False


@dataclass(frozen=True)
class GenConfig:
    """Everything gen_img.py was asked to do."""

    model: ModelSettings
    runtime: RuntimeSettings
    prompts: PromptSettings
    size: SizeConditioning
    networks: NetworkSettings
    images: ImageInputs
    highres: HighresFix
    control: ControlSettings
    deep_shrink: DeepShrink  # the command line's values (lines may override them)
    deep_shrink_on: bool  # --ds_depth_1 given
    gradual_latent: GradualLatent  # the command line's values (lines may override them)
    gradual_latent_on: bool  # --gradual_latent_timesteps given
    noise: NoiseTrickSettings
    output: OutputSettings
    prompter_args: argparse.Namespace | None = None  # only for kohya's --from_module protocol


def build_gen_config(args: argparse.Namespace) -> GenConfig:
    """The typed config of gen_img.py's flags, validated (UserError naming the flag)."""
    a = args
    check_flags(vars(a), GENERATION)
    config = GenConfig(
        model=ModelSettings(
            a.ckpt, next((name for name in ("sdxl", "sd3") if getattr(a, name)), None), a.v2, a.v_parameterization,
            a.zero_terminal_snr, a.vae, a.clip_l, a.clip_g, a.t5xxl, a.t5xxl_max_token_length, a.flow_shift,
            a.tokenizer_cache_dir, a.clip_skip, a.max_embeddings_multiples, a.emb_normalize_mode,
            tuple(a.textual_inversion_embeddings), a.replace_clip_l14_336, a.clip_l14_336_model),
        runtime=RuntimeSettings(
            torch.float16 if a.fp16 else (torch.bfloat16 if a.bf16 else torch.float32), a.no_half_vae,
            bool(a.vae_slices), a.vae_tiling, a.vae_batch_size, a.opt_channels_last,
            a.xformers or a.diffusers_xformers, compile_backend(a)),
        prompts=PromptSettings(
            a.prompt, a.from_file, a.interactive, a.from_module, a.prompter_module_args, a.shuffle_prompts,
            a.images_per_prompt, a.n_iter, a.batch_size, a.seed, a.iter_same_seed, a.W, a.H, a.steps, a.scale,
            a.negative_scale, a.sampler, a.negative_prompt, a.strength, a.ddim_eta,
            a.force_scheduler_zero_steps_offset),
        size=SizeConditioning(*(getattr(a, name) for name in SIZE_FLAGS)),
        networks=NetworkSettings(
            tuple(a.network_weights), tuple(a.network_mul), tuple(a.network_module), tuple(a.network_args),
            a.network_merge, a.network_merge_n_models, a.network_pre_calc, a.network_show_meta,
            a.network_regional_mask_max_color_codes),
        images=ImageInputs(a.image_path, a.mask_path, a.guide_image_path, a.clip_vision_strength, a.clip_vision_model),
        highres=HighresFix(
            a.highres_fix_scale, a.highres_fix_steps, a.highres_fix_strength, a.highres_fix_save_1st,
            a.highres_fix_latents_upscaling, a.highres_fix_upscaler, a.highres_fix_upscaler_args,
            a.highres_fix_disable_control_net),
        control=ControlSettings(
            tuple(a.control_net_models), tuple(a.control_net_lllite_models), tuple(a.control_net_preps),
            tuple(a.control_net_multipliers), tuple(a.control_net_ratios)),
        deep_shrink=DeepShrink(a.ds_depth_1 if a.ds_depth_1 is not None else 3, a.ds_timesteps_1, a.ds_depth_2,
                               a.ds_timesteps_2, a.ds_ratio),
        deep_shrink_on=a.ds_depth_1 is not None,
        gradual_latent=_gradual_latent(a),
        gradual_latent_on=a.gradual_latent_timesteps is not None,
        noise=NoiseTrickSettings(a.pyramid_noise_prob, _pair(a.pyramid_noise_discount_range), a.noise_offset_prob,
                                 _pair(a.noise_offset_range)),
        output=OutputSettings(a.outdir, a.sequential_file_name, a.use_original_file_name),
        prompter_args=a if a.from_module else None)
    validate(config)
    check_writable_folder(config.output.outdir, "--outdir")  # before the model loads, not at the first image
    return config


def _pair(values) -> tuple[float, float] | None:
    return tuple(values) if values else None


def _gradual_latent(a: argparse.Namespace) -> GradualLatent:
    """The command line's Gradual Latent values (the start defaults to 650 for lines that turn it on)."""
    unsharp = None
    if a.gradual_latent_unsharp_params:
        try:
            unsharp = Unsharp.parse(a.gradual_latent_unsharp_params)
        except ValueError as exc:
            raise UserError(f"--gradual_latent_unsharp_params {exc}") from exc
    start = a.gradual_latent_timesteps if a.gradual_latent_timesteps is not None else 650
    return GradualLatent(start, a.gradual_latent_ratio, a.gradual_latent_ratio_step, a.gradual_latent_every_n_steps,
                         a.gradual_latent_s_noise, unsharp)


def family_for(name: str, model: ModelSettings) -> ModelFamily:
    """The family ``name`` configured for generation (prompt weighting always on for the CLIP
    families, as kohya's gen_img does)."""
    return build_family(name, _GENERATION_OPTIONS[name](model))


def _ddpm(model: ModelSettings) -> DDPMOptions:
    return DDPMOptions(v_parameterization=model.v_parameterization, zero_terminal_snr=model.zero_terminal_snr)


def _tokens(model: ModelSettings) -> int:
    return 75 * max(1, min(3, model.max_embeddings_multiples))


_GENERATION_OPTIONS = {
    "sd": lambda m: SDOptions(ddpm=_ddpm(m), v2=m.v2, clip_skip=m.clip_skip, max_token_length=_tokens(m), vae=m.vae,
                              weighted_captions=True, emb_normalize=m.emb_normalize_mode),
    "sdxl": lambda m: SDXLOptions(ddpm=_ddpm(m), max_token_length=_tokens(m), vae=m.vae, weighted_captions=True,
                                  emb_normalize=m.emb_normalize_mode),
    "sd3": lambda m: SD3Options(clip_l=m.clip_l, clip_g=m.clip_g, t5xxl=m.t5xxl, vae=m.vae,
                                t5xxl_max_token_length=m.t5xxl_max_token_length, sample_shift=m.flow_shift),
}


# ---------------------------------------------------------------------------------------- validation
def validate(c: GenConfig) -> None:
    """Everything that can be checked before a model is loaded."""
    if c.runtime.dtype == torch.float16 and not torch.cuda.is_available():
        raise UserError("--fp16 needs a CUDA GPU; on CPU use --bf16 or full precision")
    for flag, value in (("W", c.prompts.width), ("H", c.prompts.height)):
        if value is not None and (value < 64 or value % 8):
            raise UserError(f"--{flag} {value}: image sizes must be multiples of 8, at least 64")
    for flag, files in (("network_weights", c.networks.weights),
                        ("textual_inversion_embeddings", c.model.textual_inversion_embeddings)):
        for f in files:
            if not Path(f).is_file():
                raise UserError(f"--{flag} {f}: file not found")
    n = c.networks
    if len(n.muls) > len(n.weights) or len(n.modules) > len(n.weights):
        raise UserError("--network_mul / --network_module: at most one value per --network_weights file")
    _check_highres(c.highres)
    _check_regional(c)
    _check_shrink_and_noise(c)
    _check_nothing_unused(c)
    _check_control(c.control, c.images)


def _check_highres(h: HighresFix) -> None:
    if h.scale is not None and not 0 < h.scale < 1:
        raise UserError("--highres_fix_scale: the first pass's fraction of the size, between 0 and 1 (e.g. 0.5)")
    if not h.scale:
        needing = [f"--highres_fix_{n}" for n, on in (("save_1st", h.save_1st),
                                                     ("latents_upscaling", h.latents_upscaling),
                                                     ("upscaler", h.upscaler),
                                                     ("disable_control_net", h.disable_control_net)) if on]
        if needing:
            raise UserError(f"{', '.join(needing)}: parts of the highres fix; add --highres_fix_scale (e.g. 0.5)")


def _check_regional(c: GenConfig) -> None:
    images, n = c.images, c.networks
    if images.regional and not n.weights:
        raise UserError("--mask_path needs --image_path (the image to inpaint), or LoRAs whose regions it holds")
    if n.regional_color_codes is not None:
        if not (images.regional and n.weights):
            raise UserError("--network_regional_mask_max_color_codes is for regional LoRA: LoRAs and a region "
                            "--mask_path, without --image_path")
        if not 1 <= n.regional_color_codes <= 7:
            raise UserError("--network_regional_mask_max_color_codes: 1 to 7 (the colour codes of 3 bits)")
    if images.regional and n.pre_calc:
        raise UserError("--network_pre_calc cannot be used with regional LoRA (its updates depend on the region)")


def _check_shrink_and_noise(c: GenConfig) -> None:
    d = c.deep_shrink
    if d.depth_1 < 1 or d.depth_2 is not None and d.depth_2 < 1:
        raise UserError("--ds_depth_1/--ds_depth_2: input block depths start at 1 (3 is usual)")
    if not 0 < d.ratio < 1:
        raise UserError(f"--ds_ratio {d.ratio}: the shrink factor is between 0 and 1 (e.g. 0.5)")
    c.gradual_latent.check()
    if c.gradual_latent_on:
        if canonical_sampler(c.prompts.sampler) != "euler_a":
            raise UserError(f"--gradual_latent_timesteps needs --sampler euler_a (not {c.prompts.sampler})")
        if c.images.image_path:
            raise UserError("--gradual_latent_timesteps is for text-to-image; it cannot be used with --image_path")
    for name, prob, (low, high) in (("pyramid_noise", c.noise.pyramid_prob, c.noise.pyramid_range),
                                    ("noise_offset", c.noise.offset_prob, c.noise.offset_range)):
        if prob is not None and not 0 <= prob <= 1:
            raise UserError(f"--{name}_prob {prob}: a probability between 0 and 1")
        if low > high:
            raise UserError(f"--{name} range {low} {high}: give the smaller value first")
        if prob and c.images.image_path:
            raise UserError(f"--{name}_prob changes the start noise of text-to-image; "
                            "it cannot be used with --image_path")


def _check_nothing_unused(c: GenConfig) -> None:
    """A flag given without the flag that uses it would be ignored: say so instead."""
    pairs = (
        ("clip_vision_model", c.images.clip_vision_model, ("clip_vision_strength",),
         c.images.clip_vision_strength is not None),
        ("clip_l14_336_model", c.model.clip_l14_336_model, ("replace_clip_l14_336",), c.model.replace_clip_l14_336),
        ("prompter_module_args", c.prompts.prompter_module_args, ("from_module",), c.prompts.from_module),
        ("highres_fix_upscaler_args", c.highres.upscaler_args, ("highres_fix_upscaler",), c.highres.upscaler),
        ("pyramid_noise_discount_range", c.noise.pyramid_range_given, ("pyramid_noise_prob",), c.noise.pyramid_prob),
        ("noise_offset_range", c.noise.offset_range_given, ("noise_offset_prob",), c.noise.offset_prob),
        ("guide_image_path", c.images.guide_image_path, ("control_net_models", "control_net_lllite_models"),
         c.control.models or c.control.lllite_models))
    for flag, given, users, used in pairs:
        if given and not used:
            raise UserError(f"--{flag} is only used with {' or '.join('--' + u for u in users)}, which is not given")


def _check_control(control: ControlSettings, images: ImageInputs) -> None:
    """Counts, preps, ratios, and a guide image for the ControlNets (or LLLites)."""
    if control.models and control.lllite_models:
        raise UserError("give --control_net_models or --control_net_lllite_models, not both (they share "
                        "--control_net_preps/--control_net_multipliers/--control_net_ratios)")
    flag, models = ("control_net_lllite_models", control.lllite_models) if control.lllite_models \
        else ("control_net_models", control.models)
    for per_model, values in (("control_net_preps", control.preps), ("control_net_multipliers", control.multipliers),
                              ("control_net_ratios", control.ratios)):
        if len(values) > len(models):
            raise UserError(f"--{per_model}: at most one value per --{flag} entry")
    if models and not images.guide_image_path:
        raise UserError(f"--{flag} needs --guide_image_path (the image(s) that guide it)")
    for prep in control.preps:
        check_prep(prep)
    for ratio in control.ratios:
        if not 0 < ratio <= 1:
            raise UserError(f"--control_net_ratios {ratio}: the fraction of the steps guided, in (0, 1]")
