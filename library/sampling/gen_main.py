"""gen_img.py's main work: check the inputs, load the model and LoRAs once, make every image."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from library.sampling import gen_run
from library.sampling.gen_prompts import parse_gen_line, read_prompt_file
from library.sampling.gen_session import GenSession
from library.utils.errors import UserError

logger = logging.getLogger(__name__)

def detect_family(args: argparse.Namespace) -> str:
    """The family name from ``--sdxl``/``--sd3``, else from the file's keys or the diffusers folder's
    index (a hub id is taken as SD1/SD2 unless a flag says otherwise)."""
    from library.families import LAYOUT_FAMILY, PIPELINE_FAMILY

    forced = [name for name in ("sdxl", "sd3") if getattr(args, name)]
    path = Path(args.ckpt)
    index = path / "model_index.json"
    if forced or not (path.is_file() or index.is_file()):
        return forced[0] if forced else "sd"
    if index.is_file():
        return PIPELINE_FAMILY.get(json.loads(index.read_text(encoding="utf-8")).get("_class_name", ""), "sd")
    from library.models.sd_loading import detect_layout, read_state_dict

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            layout = detect_layout(dict.fromkeys(f.keys()))
    else:
        layout = detect_layout(read_state_dict(path))
    if layout not in LAYOUT_FAMILY:
        raise UserError(f"--ckpt {path}: not a Stable Diffusion checkpoint this script knows (SD1/SD2, SDXL, SD3)")
    return LAYOUT_FAMILY[layout]


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
    from library.sampling.controlnet import check_controlnet_args

    check_controlnet_args(args)


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
    ranges = {"pyramid_noise": args.pyramid_noise_discount_range, "noise_offset": args.noise_offset_range}
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
    return NoiseTricks(args.pyramid_noise_prob or 0.0, tuple(args.pyramid_noise_discount_range),
                       args.noise_offset_prob or 0.0, tuple(args.noise_offset_range))


class DiffusersLoRA:
    """A LoRA in the diffusers/PEFT form, loaded by diffusers' own ``load_lora_weights`` into the
    shared modules (any family, including SD3 files with separate q/k/v LoRAs)."""

    def __init__(self, family, models, path: str, name: str, multiplier: float):
        self.pipe = family.pipeline(models, "euler", "txt2img")
        self.name = name
        try:
            self.pipe.load_lora_weights(path, adapter_name=name)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise UserError(f"--network_weights {path}: diffusers could not load this LoRA into this model "
                            f"({str(exc).splitlines()[0]}; is it for another model family?)") from exc
        self.set_multiplier(multiplier)

    active: dict[str, float] = {}  # every loaded adapter's strength (they live in shared modules)

    def set_multiplier(self, value: float) -> None:
        DiffusersLoRA.active[self.name] = value
        self.pipe.set_adapters(list(self.active), adapter_weights=list(self.active.values()))

    def merge_to(self, multiplier: float) -> None:
        self.pipe.fuse_lora(lora_scale=multiplier, adapter_names=[self.name])
        self.pipe.delete_adapters(self.name)
        DiffusersLoRA.active.pop(self.name, None)


def _is_diffusers_form(path: str) -> bool:
    from safetensors import safe_open

    if not path.endswith(".safetensors"):
        return False
    with safe_open(path, "pt") as f:
        return any(".lora_A." in k or ".lora_B." in k for k in f.keys())


@dataclass
class LoadedNetwork:
    name: str  # the file's stem (PNG metadata)
    multiplier: float
    network: object
    merged: bool = False


OWN_MODULES = ("networks.lora", "networks.lora_sd3")


def network_kwargs(args: argparse.Namespace, i: int, module_name: str) -> dict[str, str]:
    """kohya's ``--network_args``: one 'key=value;key=value' string per LoRA file, for its module."""
    if i >= len(args.network_args) or not args.network_args[i].strip():
        return {}
    if module_name in OWN_MODULES:
        raise UserError(f"--network_args {args.network_args[i]!r}: {module_name} takes its shape from the file "
                        "and has no arguments at generation time (they are for other modules, e.g. lycoris.kohya)")
    pairs = [part.split("=", 1) for part in args.network_args[i].split(";") if part.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise UserError(f"--network_args {args.network_args[i]!r}: write key=value pairs separated by ';'")
    return {k.strip(): v.strip() for k, v in pairs}


def load_networks(args, family, models, device) -> list[LoadedNetwork]:
    """Each ``--network_weights`` file, applied, or merged (``--network_merge``, or the first
    ``--network_merge_n_models``)."""
    from networks.base import import_network_module

    te = models.text_encoders[0] if len(models.text_encoders) == 1 else models.text_encoders
    merge_count = len(args.network_weights) if args.network_merge else (args.network_merge_n_models or 0)
    loaded = []
    for i, path in enumerate(args.network_weights):
        mul = args.network_mul[i] if i < len(args.network_mul) else 1.0
        if args.network_show_meta:
            logger.info("LoRA %s metadata: %s", Path(path).name, _file_metadata(path))
        if family.diffusers_lora_via_pipeline and _is_diffusers_form(path) and i >= len(args.network_module):
            network = DiffusersLoRA(family, models, path, f"lora{i}", mul)
        else:
            name = args.network_module[i] if i < len(args.network_module) else family.default_network_module
            module = import_network_module(name)
            network, _ = module.create_network_from_weights(mul, path, models.vae, te, models.denoiser,
                                                            for_inference=True, **network_kwargs(args, i, name))
            network.apply_to(te, models.denoiser, True, True)
            logger.info("LoRA %s: %s", Path(path).name, network.load_weights(path))
            network.to(device, models.denoiser.dtype)
        if i < merge_count:
            network.merge_to(mul)
        elif args.network_pre_calc and not hasattr(network, "pre_calculation"):
            raise UserError(f"--network_pre_calc: {Path(path).name} is not a kohya-format LoRA of ours (it has no "
                            "pre_calculation); use --network_merge for it, or drop --network_pre_calc")
        loaded.append(LoadedNetwork(Path(path).stem, mul, network, i < merge_count))
    return loaded


def load_upscaler(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """kohya's ``--highres_fix_upscaler module --highres_fix_upscaler_args "k=v;k=v"``: the module's
    ``create_upscaler(**kwargs)`` gives a torch module with ``support_latents()`` and
    ``upscale(vae, images, latents, dtype, width, height, batch_size, vae_batch_size)``."""
    import importlib

    try:
        module = importlib.import_module(args.highres_fix_upscaler)
    except ImportError as exc:
        raise UserError(f"--highres_fix_upscaler {args.highres_fix_upscaler}: cannot import it ({exc})") from exc
    if not callable(getattr(module, "create_upscaler", None)):
        raise UserError(f"--highres_fix_upscaler {args.highres_fix_upscaler}: the module has no create_upscaler()")
    pairs = [p.split("=", 1) for p in (args.highres_fix_upscaler_args or "").split(";") if p.strip()]
    if any(len(p) != 2 for p in pairs):
        raise UserError("--highres_fix_upscaler_args: write key=value pairs separated by ';'")
    upscaler = module.create_upscaler(**{k.strip(): v.strip() for k, v in pairs})
    return upscaler.to(dtype).to(device)


def _file_metadata(path: str) -> dict:
    if not path.endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.metadata() or {}


SIZE_FLAGS = ("original_width", "original_height", "original_width_negative", "original_height_negative",
              "crop_top", "crop_left")


def _check_family_args(args: argparse.Namespace, family, family_name: str) -> None:
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
        used = [f"--{name}" for name in ("force_scheduler_zero_steps_offset", "ddim_eta") if getattr(args, name)]
        if args.emb_normalize_mode != "original":
            used.append("--emb_normalize_mode")
        if used:
            raise UserError(f"{', '.join(used)}: for SD1/SD2/SDXL models (their samplers and prompt weighting); "
                            f"this is an {family_name} model")
    sizes = [f"--{name}" for name in SIZE_FLAGS if getattr(args, name) is not None]
    if sizes and not family.size_conditioning:
        raise UserError(f"{', '.join(sizes)}: SDXL's size conditioning; this {family_name} model has none")


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


def load_for_generation(args: argparse.Namespace, family, device: torch.device, dtype: torch.dtype):
    """The model, placed and set up for generation (precision, VAE slicing/tiling, attention)."""
    models = family.load(args.ckpt, dtype, args.tokenizer_cache_dir)
    family.place(models, device)
    if args.no_half_vae:
        models.vae.to(torch.float32)
    if args.vae_slices:
        models.vae.enable_slicing()
    if args.vae_tiling:
        models.vae.enable_tiling()
    if args.opt_channels_last:
        models.denoiser.to(memory_format=torch.channels_last)
    if args.xformers or args.diffusers_xformers:
        from library.training.precision import set_attention

        set_attention(models.denoiser, "xformers")
    return models


def generate_all(args: argparse.Namespace) -> list[str]:
    """Make every image; returns the problems (bad lines, failed batches) for the exit status."""
    from library.families import generation_family

    check_args(args)
    init_images = gen_run.read_images(args.image_path, "image_path")
    masks = gen_run.read_images(args.mask_path, "mask_path")
    guides = gen_run.read_images(args.guide_image_path, "guide_image_path")
    family_name = detect_family(args)
    family = generation_family(family_name, args)
    if (args.ds_depth_1 is not None or args.gradual_latent_timesteps is not None) and not family.unet_denoiser:
        raise UserError(f"--ds_depth_1 / --gradual_latent_timesteps work on UNet models (SD1/SD2/SDXL), "
                        f"not on this {family_name} model")
    _check_family_args(args, family, family_name)
    settings = run_settings(args, family)
    jobs, problems = [], []
    if args.prompt is not None or args.from_file:  # checked before the model is loaded
        prompts, problems = read_prompt_file(args.from_file) if args.from_file \
            else ([parse_gen_line(args.prompt, "--prompt")], [])
        prompts = with_size_defaults(prompts, args)
        problems += line_problems(prompts, family, family_name)
        jobs = gen_run.make_jobs(prompts, settings)
        if not jobs:
            return problems or ["no prompts to generate"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if args.fp16 else (torch.bfloat16 if args.bf16 else torch.float32)
    models = load_for_generation(args, family, device, dtype)
    if args.replace_clip_l14_336:
        from library.sampling.extra_encoders import replace_text_encoder

        replace_text_encoder(args, models, dtype)
    embeddings = None
    if args.textual_inversion_embeddings:
        from library.sampling.textual_inversion import load_textual_inversions

        embeddings = load_textual_inversions(args.textual_inversion_embeddings, family, models)
    networks = load_networks(args, family, models, device)
    autocast = torch.autocast(device.type, dtype) if dtype != torch.float32 else contextlib.nullcontext()
    shared = {"noise_tricks": noise_tricks(args), "ddim_eta": args.ddim_eta,
              "zero_steps_offset": args.force_scheduler_zero_steps_offset, "vae_batch_size": args.vae_batch_size}
    if args.clip_vision_strength is not None:
        from library.sampling.extra_encoders import ClipVisionPooled

        shared["clip_vision"] = ClipVisionPooled(args.clip_vision_model, args.clip_vision_strength, device, dtype)
    if args.control_net_models:
        from library.sampling.controlnet import load_controlnets

        shared["controlnets"] = load_controlnets(args, models, device, dtype)
    if args.control_net_lllite_models:
        from library.sampling.lllite import load_lllites

        shared["lllites"] = load_lllites(args, models, device, dtype)
    if masks and init_images is None:  # LoRAs with a mask and no image: the mask holds their regions
        from library.sampling.regional import RegionalLoRA

        if not family.unet_denoiser:
            raise UserError(f"regional LoRA (--mask_path without --image_path) is for SD1/SD2/SDXL, not {family_name}")
        shared["regional"] = RegionalLoRA(networks, masks[0], args.network_regional_mask_max_color_codes)
        masks = None
    session = GenSession(args, family, models, networks, (init_images, masks, guides), device, autocast, shared,
                         embeddings)
    session.problems = problems
    if args.highres_fix_upscaler:
        session.upscaler = load_upscaler(args, device, models.vae.dtype)
    if jobs:
        session.generate(jobs)
    else:
        _generate_as_prompts_arrive(args, session, settings, family_name)
    logger.info("%d image(s) written to %s", session.written, session.outdir)
    return session.problems


def _generate_as_prompts_arrive(args, session: GenSession, settings: gen_run.Settings, family_name: str) -> None:
    """--interactive: a typed line at a time; --from_module: an iteration of the prompter at a time."""
    from dataclasses import replace

    from library.sampling import gen_sources

    if args.interactive:
        chunks = gen_sources.interactive_chunks()
    else:
        context = gen_sources.GenerationContext(session.family, session.models, session.device)
        prompter = gen_sources.load_prompter(args, context, session.networks)
        chunks = gen_sources.module_chunks(args, prompter, context, settings.seed)
    one_iteration = replace(settings, n_iter=1)
    for chunk in chunks:
        session.problems += chunk.problems + line_problems(chunk.prompts, session.family, family_name)
        for problem in chunk.problems:
            logger.error(problem)
        prompts = with_size_defaults(chunk.prompts, args)
        session.generate(gen_run.make_jobs(prompts, one_iteration, session.done, chunk.iteration))


