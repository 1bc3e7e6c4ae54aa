"""gen_img.py's main work: check the inputs, load the model and LoRAs once, make every image."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from library.sampling import gen_run
from library.sampling.gen_prompts import parse_gen_line, read_prompt_file
from library.sampling.generate import GenBatch, run_batch
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
    for f in args.network_weights:
        if not Path(f).is_file():
            raise UserError(f"--network_weights {f}: file not found")
    if len(args.network_mul) > len(args.network_weights) or len(args.network_module) > len(args.network_weights):
        raise UserError("--network_mul / --network_module: at most one value per --network_weights file")
    if args.highres_fix_scale is not None and not 0 < args.highres_fix_scale < 1:
        raise UserError("--highres_fix_scale: the first pass's fraction of the size, between 0 and 1 (e.g. 0.5)")
    if args.mask_path and not args.image_path:
        raise UserError("--mask_path needs --image_path (the image to inpaint)")
    _check_shrink_and_noise_args(args)


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


def load_networks(args, family, models, device) -> list[tuple[str, float, object]]:
    """(file name, strength, network) for each ``--network_weights`` file, applied or merged."""
    from networks.base import import_network_module

    te = models.text_encoders[0] if len(models.text_encoders) == 1 else models.text_encoders
    loaded = []
    for i, path in enumerate(args.network_weights):
        if family.diffusers_lora_via_pipeline and _is_diffusers_form(path) and i >= len(args.network_module):
            mul = args.network_mul[i] if i < len(args.network_mul) else 1.0
            network = DiffusersLoRA(family, models, path, f"lora{i}", mul)
            if args.network_merge:
                network.merge_to(mul)
            loaded.append((Path(path).stem, mul, network))
            continue
        module = import_network_module(args.network_module[i] if i < len(args.network_module)
                                       else family.default_network_module)
        mul = args.network_mul[i] if i < len(args.network_mul) else 1.0
        network, _ = module.create_network_from_weights(mul, path, models.vae, te, models.denoiser,
                                                        for_inference=True)
        network.apply_to(te, models.denoiser, True, True)
        logger.info("LoRA %s: %s", Path(path).name, network.load_weights(path))
        network.to(device, models.denoiser.dtype)
        if args.network_merge:
            network.merge_to(mul)
        loaded.append((Path(path).stem, mul, network))
    return loaded


def _set_strengths(networks, muls, merged: bool, source: str) -> list[tuple[str, float]]:
    """A line's ``--am`` strengths (the last value repeats); merged LoRAs cannot change."""
    used = []
    for i, (name, mul, net) in enumerate(networks):
        value = muls[min(i, len(muls) - 1)] if muls else mul
        if merged and value != mul:
            raise UserError(f"{source}: --am cannot change the strength of merged LoRAs (drop --network_merge)")
        if not merged:
            net.set_multiplier(value)
        used.append((name, value))
    return used


def plan(args: argparse.Namespace, family, family_name: str) -> tuple[list, list[str]]:
    """The run's jobs (every image with its settings and seed) and the problems found in the prompts."""
    if args.from_file:
        prompts, problems = read_prompt_file(args.from_file)
    else:
        prompts, problems = [parse_gen_line(args.prompt, "--prompt")], []
    from library.sampling.deep_shrink import DeepShrink

    size = family.default_image_size
    deep_shrink = DeepShrink(args.ds_depth_1 or 3, args.ds_timesteps_1, args.ds_depth_2, args.ds_timesteps_2,
                             args.ds_ratio)
    settings = gen_run.Settings(args.W or size, args.H or size, args.steps, args.scale, args.sampler, args.strength,
                                args.negative_prompt, args.images_per_prompt, args.n_iter, args.seed,
                                args.iter_same_seed, args.negative_scale, deep_shrink, args.ds_depth_1 is not None,
                                gradual_latent_settings(args), args.gradual_latent_timesteps is not None)
    sized = [p.source for p in prompts
             if p.original_size != (None, None) or p.negative_original_size != (None, None) or p.crop != (0, 0)]
    if sized and not family.size_conditioning:
        problems += [f"{src}: --ow/--oh/--nw/--nh/--ct/--cl are SDXL's size conditioning; this {family_name} model "
                     "has none (the line was generated without them)" for src in sized]
    return gen_run.make_jobs(prompts, settings), problems


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
    if args.xformers:
        from library.training.precision import set_attention

        set_attention(models.denoiser, "xformers")
    return models


def generate_all(args: argparse.Namespace) -> list[str]:
    """Make every image; returns the problems (bad lines, failed batches) for the exit status."""
    from library.families import generation_family

    check_args(args)
    init_images = gen_run.read_images(args.image_path, "image_path")
    masks = gen_run.read_images(args.mask_path, "mask_path")
    family_name = detect_family(args)
    family = generation_family(family_name, args)
    if (args.ds_depth_1 is not None or args.gradual_latent_timesteps is not None) and not family.unet_denoiser:
        raise UserError(f"--ds_depth_1 / --gradual_latent_timesteps work on UNet models (SD1/SD2/SDXL), "
                        f"not on this {family_name} model")
    jobs, problems = plan(args, family, family_name)
    if not jobs:
        return problems or ["no prompts to generate"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if args.fp16 else (torch.bfloat16 if args.bf16 else torch.float32)
    models = load_for_generation(args, family, device, dtype)
    networks = load_networks(args, family, models, device)
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    autocast = torch.autocast(device.type, dtype) if dtype != torch.float32 else contextlib.nullcontext()
    written = _generate_groups(args, family, models, networks, jobs, (init_images, masks), outdir, device, autocast,
                               problems)
    logger.info("%d image(s) written to %s", written, outdir)
    return problems


def _generate_groups(args, family, models, networks, jobs, images_in, outdir: Path, device, autocast,
                     problems: list[str]) -> int:
    """Run the jobs batch by batch, saving each image; a failing batch is recorded in ``problems``."""
    from dataclasses import replace

    init_images, masks = images_in
    kind = "txt2img" if init_images is None else ("inpaint" if masks else "img2img")
    model_name, stamp = Path(args.ckpt.rstrip("/")).stem, gen_run.timestamp()
    tricks = noise_tricks(args)
    bar = tqdm(total=len(jobs), desc="images")
    done = written = 0
    for group in gen_run.group(jobs, max(1, args.batch_size)):
        sources = ", ".join(sorted({j.prompt.source for j in group}))
        pick = [done + k for k in range(len(group))]
        try:
            used = _set_strengths(networks, group[0].prompt.network_muls, args.network_merge, sources)
            inits = [init_images[k % len(init_images)] for k in pick] if init_images else None
            batch_masks = [masks[k % len(masks)] for k in pick] if masks else None
            batch = replace(gen_run.to_batch(group, inits, batch_masks), noise_tricks=tricks)
            with autocast:
                images, first_pass = _run(family, models, batch, args, device)
        except (UserError, ValueError, RuntimeError) as exc:
            problems.append(f"{sources}: {exc}")
            images, first_pass = [], None
        for i, (k, job, image) in enumerate(zip(pick, group, images)):
            name = gen_run.file_name(job, k, stamp, args.sequential_file_name)
            info = gen_run.png_info(job, model_name, used, kind)
            path = gen_run.save_image(image, outdir, name, info, args.sequential_file_name)
            if first_pass is not None:  # --highres_fix_save_1st: next to its final image
                gen_run.save_image(first_pass[i], outdir, f"{path.stem}_1st.png", info, False)
            written += 1
        done += len(group)
        bar.update(len(group))
    bar.close()
    return written


def _run(family, models, batch: GenBatch, args, device) -> tuple[list, list | None]:
    """(images, the highres fix's first-pass images when they are to be saved) for one batch; the
    highres fix (text-to-image only) makes a smaller image first, enlarges it (or its latents, with
    ``--highres_fix_latents_upscaling``) and refines it with an img2img pass."""
    if not args.highres_fix_scale or batch.kind != "txt2img":
        return run_batch(family, models, batch, device), None
    from dataclasses import replace

    small = gen_run.highres_first_pass(batch, args.highres_fix_scale)
    first_images = None
    if args.highres_fix_latents_upscaling:
        latents = run_batch(family, models, small, device, output_type="latent")
        if args.highres_fix_save_1st:
            first_images = decode_latents(family.pipeline(models, batch.sampler, "img2img"), latents)
        f = latents.shape[-1] * 1.0 / small.width
        size = (round(batch.height * f), round(batch.width * f))
        upscaled = torch.nn.functional.interpolate(latents.float(), size=size, mode="bilinear",
                                                   align_corners=False).to(latents.dtype)
    else:
        first_images = run_batch(family, models, small, device)
        upscaled = [im.resize((batch.width, batch.height)) for im in first_images]
    # the refinement starts from the first pass: no Gradual Latent, no start-noise tricks
    second = replace(batch, init_images=upscaled, steps=args.highres_fix_steps, strength=args.highres_fix_strength,
                     gradual_latent=None, noise_tricks=None)
    return run_batch(family, models, second, device), first_images if args.highres_fix_save_1st else None


def decode_latents(pipe, latents: torch.Tensor) -> list:
    """PIL images of a pipeline's ``output_type="latent"`` result (its VAE's scaling and shift undone)."""
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample
    return pipe.image_processor.postprocess(decoded, output_type="pil")
