"""gen_img.py's main work: check the inputs, load the model and LoRAs once, make every image."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace

import torch

from library.families.detect import family_of_model
from library.generation import jobs as gen_run
from library.generation import sources as gen_sources
from library.generation.checks import check_family_args, line_problems, noise_tricks, run_settings, with_size_defaults
from library.generation.config import GenConfig, ModelSettings, family_for
from library.generation.control_loading import load_controlnets, load_lllites
from library.generation.extra_encoders import ClipVisionPooled, replace_text_encoder
from library.generation.network_loading import load_networks, load_upscaler
from library.generation.prompt_lines import parse_gen_line, read_prompt_file
from library.generation.session import GenSession
from library.generation.textual_inversion import load_textual_inversions
from library.maths.precision import set_attention
from library.models.compiling import check_toolchain, compile_blocks
from library.sampling.regional import RegionalLoRA

logger = logging.getLogger(__name__)


def detect_family(model: ModelSettings) -> str:
    """The family name from ``--sdxl``/``--sd3``, else from the file's keys or the diffusers folder's
    index (a hub id is taken as SD1/SD2 unless a flag says otherwise)."""
    return model.forced_family or family_of_model(model.ckpt, "--ckpt") or "sd"


def load_for_generation(c: GenConfig, family, device: torch.device):
    """The model, placed and set up for generation (precision, VAE slicing/tiling, attention)."""
    r = c.runtime
    models = family.load(c.model.ckpt, r.dtype, c.model.tokenizer_cache_dir)
    family.place(models, device)
    if r.no_half_vae:
        _keep_in_float32(models.vae)
    if r.vae_slices:
        models.vae.enable_slicing()
    if r.vae_tiling:
        models.vae.enable_tiling()
    if r.channels_last:
        models.denoiser.to(memory_format=torch.channels_last)
    if r.xformers:
        set_attention(models.denoiser, "xformers")
    return models


def _keep_in_float32(vae: torch.nn.Module) -> None:
    """--no_half_vae: float32 weights, and encode/decode run outside the run's bf16/fp16 autocast
    (inside it the convolutions would compute in half precision whatever the weights)."""
    vae.to(torch.float32)
    for name in ("encode", "decode"):
        inner = getattr(vae, name)

        def in_float32(x, *args, _inner=inner, **kwargs):
            with torch.autocast(x.device.type, enabled=False):
                return _inner(x.to(torch.float32), *args, **kwargs)

        setattr(vae, name, in_float32)


def generate_all(c: GenConfig) -> list[str]:
    """Make every image; returns the problems (bad lines, failed batches) for the exit status."""
    init_images = gen_run.read_images(c.images.image_path, "image_path")
    masks = gen_run.read_images(c.images.mask_path, "mask_path")
    guides = gen_run.read_images(c.images.guide_image_path, "guide_image_path")
    family_name = detect_family(c.model)
    family = family_for(family_name, c.model)
    check_family_args(c, family, family_name)
    settings = run_settings(c, family)
    jobs, problems = _planned_jobs(c, family, family_name, settings)
    if not jobs and (c.prompts.prompt is not None or c.prompts.from_file):
        return problems or ["no prompts to generate"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = c.runtime.dtype
    if c.runtime.compile_backend:
        check_toolchain(c.runtime.compile_backend, device)
    models = load_for_generation(c, family, device)
    embeddings = _prepare_text_encoders(c, family, models, dtype)
    networks = load_networks(c.networks, family, models, device)
    if c.runtime.compile_backend:  # after the networks: the compiled blocks trace their hooks
        count = compile_blocks(models.denoiser, family.compiled_blocks, c.runtime.compile_backend)
        logger.info("torch.compile (%s): %d denoiser blocks", c.runtime.compile_backend, count)
    shared = _run_batch_settings(c, models, device, dtype)
    if masks and init_images is None:  # LoRAs with a mask and no image: the mask holds their regions
        shared["regional"] = RegionalLoRA(networks, masks[0], c.networks.regional_color_codes)
        masks = None
    autocast = torch.autocast(device.type, dtype) if dtype != torch.float32 else contextlib.nullcontext()
    session = GenSession(c, family, models, networks, (init_images, masks, guides), device, autocast, shared,
                         embeddings)
    session.problems = problems
    if c.highres.upscaler:
        session.upscaler = load_upscaler(c.highres, device, models.vae.dtype)
    if jobs:
        session.generate(jobs)
    else:
        _generate_as_prompts_arrive(c, session, settings, family_name)
    logger.info("%d image(s) written to %s", session.written, session.outdir)
    return session.problems


def _planned_jobs(c: GenConfig, family, family_name: str, settings: gen_run.Settings) -> tuple[list, list[str]]:
    """--prompt / --from_file: every job and the problems of the lines, before the model is loaded
    (none for --interactive / --from_module, whose prompts arrive later)."""
    p = c.prompts
    if p.prompt is None and not p.from_file:
        return [], []
    prompts, problems = read_prompt_file(p.from_file) if p.from_file else ([parse_gen_line(p.prompt, "--prompt")], [])
    prompts = with_size_defaults(prompts, c.size)
    problems += line_problems(prompts, family, family_name)
    return gen_run.make_jobs(prompts, settings), problems


def _prepare_text_encoders(c: GenConfig, family, models, dtype: torch.dtype):
    """--replace_clip_l14_336, then --textual_inversion_embeddings (returned: it rewrites prompts)."""
    if c.model.replace_clip_l14_336:
        replace_text_encoder(c.model.clip_l14_336_model, models, dtype)
    if not c.model.textual_inversion_embeddings:
        return None
    return load_textual_inversions(list(c.model.textual_inversion_embeddings), family, models)


def _run_batch_settings(c: GenConfig, models, device: torch.device, dtype: torch.dtype) -> dict:
    """The GenBatch fields every batch of the run shares (and the models they bring)."""
    shared = {"noise_tricks": noise_tricks(c.noise), "ddim_eta": c.prompts.ddim_eta,
              "zero_steps_offset": c.prompts.zero_steps_offset, "vae_batch_size": c.runtime.vae_batch_size}
    if c.images.clip_vision_strength is not None:
        shared["clip_vision"] = ClipVisionPooled(c.images.clip_vision_model, c.images.clip_vision_strength, device,
                                                 dtype)
    if c.control.models:
        shared["controlnets"] = load_controlnets(c.control.models, _per_model(c), models, device, dtype)
    if c.control.lllite_models:
        shared["lllites"] = load_lllites(c.control.lllite_models, _per_model(c), models, device, dtype)
    return shared


def _per_model(c: GenConfig) -> list[tuple[str, float, float]]:
    count = len(c.control.models or c.control.lllite_models)
    return [c.control.per_model(i) for i in range(count)]


def _generate_as_prompts_arrive(c: GenConfig, session: GenSession, settings: gen_run.Settings,
                                family_name: str) -> None:
    """--interactive: a typed line at a time; --from_module: an iteration of the prompter at a time."""
    if c.prompts.interactive:
        chunks = gen_sources.interactive_chunks()
    else:
        context = gen_sources.GenerationContext(session.family, session.models, session.device)
        prompter = gen_sources.load_prompter(c, context, session.networks)
        chunks = gen_sources.module_chunks(c, prompter, context, settings.seed)
    one_iteration = replace(settings, n_iter=1)
    for chunk in chunks:
        session.problems += chunk.problems + line_problems(chunk.prompts, session.family, family_name)
        for problem in chunk.problems:
            logger.error(problem)
        prompts = with_size_defaults(chunk.prompts, c.size)
        session.generate(gen_run.make_jobs(prompts, one_iteration, session.done, chunk.iteration))
