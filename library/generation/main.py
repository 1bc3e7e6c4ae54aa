"""gen_img.py's main work: check the inputs, load the model and LoRAs once, make every image."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from pathlib import Path

import torch

from library.generation import jobs as gen_run
from library.generation.checks import (
    check_args,
    check_family_args,
    line_problems,
    noise_tricks,
    run_settings,
    with_size_defaults,
)
from library.generation.network_loading import load_networks, load_upscaler
from library.generation.prompt_lines import parse_gen_line, read_prompt_file
from library.generation.session import GenSession
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
        from library.maths.precision import set_attention

        set_attention(models.denoiser, "xformers")
    return models


def generate_all(args: argparse.Namespace) -> list[str]:
    """Make every image; returns the problems (bad lines, failed batches) for the exit status."""
    from library.config.family_options import generation_family

    check_args(args)
    init_images = gen_run.read_images(args.image_path, "image_path")
    masks = gen_run.read_images(args.mask_path, "mask_path")
    guides = gen_run.read_images(args.guide_image_path, "guide_image_path")
    family_name = detect_family(args)
    family = generation_family(family_name, args)
    check_family_args(args, family, family_name)
    settings = run_settings(args, family)
    jobs, problems = _planned_jobs(args, family, family_name, settings)
    if not jobs and (args.prompt is not None or args.from_file):
        return problems or ["no prompts to generate"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if args.fp16 else (torch.bfloat16 if args.bf16 else torch.float32)
    models = load_for_generation(args, family, device, dtype)
    embeddings = _prepare_text_encoders(args, family, models, dtype)
    networks = load_networks(args, family, models, device)
    shared = _run_batch_settings(args, models, device, dtype)
    if masks and init_images is None:  # LoRAs with a mask and no image: the mask holds their regions
        from library.sampling.regional import RegionalLoRA

        shared["regional"] = RegionalLoRA(networks, masks[0], args.network_regional_mask_max_color_codes)
        masks = None
    autocast = torch.autocast(device.type, dtype) if dtype != torch.float32 else contextlib.nullcontext()
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


def _planned_jobs(args, family, family_name: str, settings: gen_run.Settings) -> tuple[list, list[str]]:
    """--prompt / --from_file: every job and the problems of the lines, before the model is loaded
    (none for --interactive / --from_module, whose prompts arrive later)."""
    if args.prompt is None and not args.from_file:
        return [], []
    prompts, problems = read_prompt_file(args.from_file) if args.from_file \
        else ([parse_gen_line(args.prompt, "--prompt")], [])
    prompts = with_size_defaults(prompts, args)
    problems += line_problems(prompts, family, family_name)
    return gen_run.make_jobs(prompts, settings), problems


def _prepare_text_encoders(args, family, models, dtype: torch.dtype):
    """--replace_clip_l14_336, then --textual_inversion_embeddings (returned: it rewrites prompts)."""
    if args.replace_clip_l14_336:
        from library.generation.extra_encoders import replace_text_encoder

        replace_text_encoder(args, models, dtype)
    if not args.textual_inversion_embeddings:
        return None
    from library.generation.textual_inversion import load_textual_inversions

    return load_textual_inversions(args.textual_inversion_embeddings, family, models)


def _run_batch_settings(args, models, device: torch.device, dtype: torch.dtype) -> dict:
    """The GenBatch fields every batch of the run shares (and the models they bring)."""
    shared = {"noise_tricks": noise_tricks(args), "ddim_eta": args.ddim_eta,
              "zero_steps_offset": args.force_scheduler_zero_steps_offset, "vae_batch_size": args.vae_batch_size}
    if args.clip_vision_strength is not None:
        from library.generation.extra_encoders import ClipVisionPooled

        shared["clip_vision"] = ClipVisionPooled(args.clip_vision_model, args.clip_vision_strength, device, dtype)
    if args.control_net_models:
        from library.sampling.controlnet import load_controlnets

        shared["controlnets"] = load_controlnets(args, models, device, dtype)
    if args.control_net_lllite_models:
        from library.sampling.lllite import load_lllites

        shared["lllites"] = load_lllites(args, models, device, dtype)
    return shared


def _generate_as_prompts_arrive(args, session: GenSession, settings: gen_run.Settings, family_name: str) -> None:
    """--interactive: a typed line at a time; --from_module: an iteration of the prompter at a time."""
    from dataclasses import replace

    from library.generation import sources as gen_sources

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


