"""gen_img.py's generation once the model is loaded: jobs -> batches -> saved images.

A :class:`GenSession` holds what every batch shares (model, LoRAs, init images, output folder,
precision) and is fed jobs, all at once for prompt files or a few at a time for interactive and
module prompts; image counts and names continue across calls.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from library.generation import jobs as gen_run
from library.generation.config import GenConfig
from library.sampling.generate import GenBatch, decode_latents, run_batch
from library.utils.errors import UserError

logger = logging.getLogger(__name__)


def set_strengths(networks, muls, source: str, pre_calc: bool = False) -> list[tuple[str, float]]:
    """A line's ``--am`` strengths (the last value repeats); merged LoRAs cannot change. With
    ``pre_calc`` (``--network_pre_calc``) the hooked LoRAs are added into the weights at those
    strengths (the previous batch's addition undone first)."""
    used = []
    if pre_calc:  # the last one added is taken out first: each restores the weights it found
        for loaded in reversed(networks):
            if not loaded.merged:
                loaded.network.restore_weights()
    for i, loaded in enumerate(networks):
        value = muls[min(i, len(muls) - 1)] if muls else loaded.multiplier
        if loaded.merged and value != loaded.multiplier:
            raise UserError(f"{source}: --am cannot change the strength of merged LoRA {loaded.name} "
                            "(drop --network_merge, or lower --network_merge_n_models)")
        if not loaded.merged:
            loaded.network.set_multiplier(value)
            if pre_calc:
                loaded.network.pre_calculation()
        used.append((loaded.name, value))
    return used


class GenSession:
    """Makes and saves the images of jobs; failing batches are recorded in ``problems``."""

    def __init__(self, config: GenConfig, family, models, networks, images_in, device: torch.device,
                 autocast, batch_settings: dict | None = None, embeddings=None):
        self.config, self.family, self.models, self.networks = config, family, models, networks
        self.embeddings = embeddings  # textual_inversion.TextualInversion: rewrites the prompts' words
        self.init_images, self.masks, self.guides = images_in
        self.device, self.autocast = device, autocast
        self.batch_settings = batch_settings or {}  # GenBatch fields the whole run shares
        self.upscaler = None  # --highres_fix_upscaler: kohya's protocol (create_upscaler(...).upscale(...))
        self.kind = "txt2img" if self.init_images is None else ("inpaint" if self.masks else "img2img")
        self.model_name, self.stamp = Path(config.model.ckpt.rstrip("/")).stem, gen_run.timestamp()
        self.outdir = Path(config.output.outdir)
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.problems: list[str] = []
        self.done = 0  # jobs handled so far (the index in file names and init-image choice)
        self.written = 0

    def generate(self, jobs: list[gen_run.Job]) -> None:
        bar = tqdm(total=len(jobs), desc="images")
        for group in gen_run.group(jobs, max(1, self.config.prompts.batch_size)):
            self._generate_group(group)
            bar.update(len(group))
        bar.close()

    def _generate_group(self, group: list[gen_run.Job]) -> None:
        out = self.config.output
        sources = ", ".join(sorted({j.prompt.source for j in group}))
        pick = [self.done + k for k in range(len(group))]
        self.done += len(group)
        try:
            used = set_strengths(self.networks, group[0].prompt.network_muls, sources,
                                 self.config.networks.pre_calc)
            inits = [self.init_images[k % len(self.init_images)] for k in pick] if self.init_images else None
            masks = [self.masks[k % len(self.masks)] for k in pick] if self.masks else None
            batch = replace(gen_run.to_batch(group, inits, masks), **self.batch_settings)
            if self.guides:
                batch = replace(batch, guide_images=[self.guides[k % len(self.guides)] for k in pick])
            if self.embeddings is not None:
                batch = replace(batch, prompts=[self.embeddings.expand(t) for t in batch.prompts],
                                negatives=[self.embeddings.expand(t) for t in batch.negatives])
            with self.autocast:
                images, first_pass = self._run(batch)
        except (UserError, ValueError, RuntimeError) as exc:
            self.problems.append(f"{sources}: {exc}")
            return
        for i, (k, job, image) in enumerate(zip(pick, group, images)):
            original = getattr(inits[i], "filename", None) if inits and out.use_original_file_name else None
            name = gen_run.file_name(job, k, self.stamp, out.sequential_file_name, original)
            info = gen_run.png_info(job, self.model_name, used, self.kind, self.family.size_conditioning)
            path = gen_run.save_image(image, self.outdir, name, info, out.sequential_file_name)
            if first_pass is not None:  # --highres_fix_save_1st: next to its final image
                gen_run.save_image(first_pass[i], self.outdir, f"{path.stem}_1st.png", info, False)
            self.written += 1

    def _run(self, batch: GenBatch) -> tuple[list, list | None]:
        """(images, the highres fix's first-pass images when they are to be saved) for one batch;
        the highres fix (text-to-image only) makes a smaller image first, enlarges it (or its
        latents, with ``--highres_fix_latents_upscaling``) and refines it with an img2img pass."""
        fix, family, models, device = self.config.highres, self.family, self.models, self.device
        if not fix.scale or batch.kind != "txt2img":
            return run_batch(family, models, batch, device), None
        small = gen_run.highres_first_pass(batch, fix.scale)
        first_images = None
        in_latents = self.upscaler.support_latents() if self.upscaler is not None \
            else fix.latents_upscaling
        if in_latents:
            latents = run_batch(family, models, small, device, output_type="latent")
            if fix.save_1st:
                first_images = decode_latents(family.pipeline(models, batch.sampler, "img2img"), latents)
        else:
            first_images = run_batch(family, models, small, device)
        if self.upscaler is not None:  # kohya's upscaler protocol: PIL images or latents back
            upscaled = self.upscaler.upscale(models.vae, None if in_latents else first_images,
                                             latents if in_latents else None, models.vae.dtype, batch.width,
                                             batch.height, len(batch.prompts), len(batch.prompts))
        elif in_latents:
            per_pixel = latents.shape[-1] / small.width
            size = (round(batch.height * per_pixel), round(batch.width * per_pixel))
            upscaled = torch.nn.functional.interpolate(latents.float(), size=size, mode="bilinear",
                                                       align_corners=False).to(latents.dtype)
        else:
            upscaled = [im.resize((batch.width, batch.height)) for im in first_images]
        # the refinement starts from the first pass: no Gradual Latent, no start-noise tricks
        second = replace(batch, init_images=upscaled, steps=fix.steps, strength=fix.strength, gradual_latent=None,
                         noise_tricks=None)
        if fix.disable_control_net:
            second = replace(second, controlnets=(), lllites=())
        return run_batch(family, models, second, device), first_images if fix.save_1st else None
