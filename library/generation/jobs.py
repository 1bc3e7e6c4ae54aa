"""gen_img.py's run: prompt lines -> images (seeds, batching, LoRAs, file names, PNG metadata).

Every image is a :class:`Job` with its own seed; consecutive jobs that agree on everything but
prompt and seed share one pipeline call (``--batch_size``). A job's image depends only on the job,
never on its batch, so the same prompt file and seed give the same files every time.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, PngImagePlugin

from library.generation.dynamic_prompts import enumerate_dynamic, expand_dynamic
from library.generation.prompt_lines import NO_NEGATIVE_SCALE, GenPrompt
from library.sampling.deep_shrink import DeepShrink
from library.sampling.generate import GenBatch
from library.sampling.gradual_latent import GradualLatent
from library.utils.errors import UserError
from library.utils.files import atomic_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """The command line's defaults for what a prompt line may override."""

    width: int = 512
    height: int = 512
    steps: int = 50
    scale: float = 7.5
    sampler: str = "ddim"
    strength: float = 0.8
    negative_prompt: str = ""
    images_per_prompt: int = 1
    n_iter: int = 1
    seed: int | None = None
    iter_same_seed: bool = False
    negative_scale: float | None = None
    # the command line's Deep Shrink / Gradual Latent values, and whether they are on for every line
    # (a line with any of their options turns them on for itself, its values over these)
    deep_shrink: DeepShrink = DeepShrink(3)
    deep_shrink_on: bool = False
    gradual_latent: GradualLatent = GradualLatent(650)
    gradual_latent_on: bool = False
    shuffle_prompts: bool = False


@dataclass(frozen=True)
class Job:
    """One image to make."""

    prompt: GenPrompt
    seed: int
    copy: int  # which image of its prompt line (0, 1, ...)
    width: int
    height: int
    steps: int
    scale: float
    sampler: str
    strength: float
    negative: str
    negative_scale: float | None = None
    text: str = ""  # the prompt with its dynamic choices drawn for this image
    deep_shrink: DeepShrink | None = None
    gradual_latent: GradualLatent | None = None

    @property
    def prompt_text(self) -> str:
        return self.text or self.prompt.prompt

    def batch_key(self) -> tuple:
        p = self.prompt
        return (self.width, self.height, self.steps, self.scale, self.sampler, self.strength, p.network_muls,
                p.original_size, p.negative_original_size, p.crop, self.negative_scale, self.deep_shrink,
                self.gradual_latent)


def make_jobs(prompts: list[GenPrompt], s: Settings, first_image: int = 0, first_iteration: int = 0) -> list[Job]:
    """Every image of the run in order: for each iteration, each prompt's images (in a new order
    each iteration with ``shuffle_prompts``). A line's ``--d`` seeds come first; otherwise seeds
    count up from ``--seed`` (random when not given); with ``--iter_same_seed`` every prompt of an
    iteration uses that iteration's seed. ``first_image``/``first_iteration`` continue the counts
    of earlier calls (interactive and module prompts arrive a few at a time)."""
    base = s.seed if s.seed is not None else random.randint(0, 2**31 - 1)
    jobs, counter = [], first_image
    copies = {id(p): 0 for p in prompts}
    for iteration in range(first_iteration, first_iteration + s.n_iter):
        order = list(prompts)
        if s.shuffle_prompts:
            random.Random(f"shuffle {base} {iteration}").shuffle(order)
        for p in order:
            # an enumerating line ({e$$a|b}) makes one image per variant instead of images_per_prompt
            variants = enumerate_dynamic(p.prompt)
            texts = variants if len(variants) > 1 else [p.prompt] * s.images_per_prompt
            for text in texts:
                copy = copies[id(p)]
                copies[id(p)] += 1
                if copy < len(p.seeds):
                    seed = p.seeds[copy]
                elif s.iter_same_seed:
                    seed = base + iteration
                else:
                    seed = base + counter
                counter += 1
                jobs.append(_job(p, s, seed, copy, text))
    return jobs


def _job(p: GenPrompt, s: Settings, seed: int, copy: int, text: str) -> Job:
    """One image of line ``p``: the line's values over the command line's."""
    return Job(p, seed, copy, p.width or s.width, p.height or s.height, p.steps or s.steps,
               p.scale if p.scale is not None else s.scale, p.sampler or s.sampler,
               p.strength if p.strength is not None else s.strength,
               p.negative_prompt if p.negative_prompt is not None else s.negative_prompt,
               _negative_scale(p, s), expand_dynamic(text, random.Random(seed)),
               _line_setting(p.deep_shrink, s.deep_shrink, s.deep_shrink_on),
               _line_setting(p.gradual_latent, s.gradual_latent, s.gradual_latent_on))


def _line_setting(line: tuple, default, on: bool):
    """Deep Shrink / Gradual Latent for a line: its own values over the command line's, or the
    command line's when it turns the feature on for every line, else None."""
    if line:
        return replace(default, **dict(line))
    return default if on else None


def _negative_scale(p: GenPrompt, s: Settings) -> float | None:
    if p.negative_scale is None:
        return s.negative_scale
    return None if p.negative_scale == NO_NEGATIVE_SCALE else p.negative_scale


def group(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    """Consecutive jobs with the same settings, at most ``batch_size`` per group."""
    groups: list[list[Job]] = []
    for job in jobs:
        if groups and len(groups[-1]) < batch_size and groups[-1][0].batch_key() == job.batch_key():
            groups[-1].append(job)
        else:
            groups.append([job])
    return groups


def _height_width(job: Job, size: tuple[int | None, int | None]) -> tuple[int, int] | None:
    """A line's (width, height) option pair as SDXL's (height, width); None when not given."""
    w, h = size
    return (h or job.height, w or job.width) if (w or h) else None


def to_batch(jobs: list[Job], init_images=None, masks=None) -> GenBatch:
    first = jobs[0]
    return GenBatch([j.prompt_text for j in jobs], [j.negative for j in jobs], [j.seed for j in jobs],
                    first.width, first.height, first.steps, first.scale, first.sampler, init_images, masks,
                    first.strength, _height_width(first, first.prompt.original_size), first.prompt.crop,
                    first.negative_scale, _height_width(first, first.prompt.negative_original_size),
                    first.deep_shrink, first.gradual_latent)


def file_name(job: Job, index: int, stamp: str, sequential: bool, original: str | None = None) -> str:
    """kohya's names (``im_<time>_<index>_<seed>.png``, or ``im_<NNNNNN>.png`` with
    ``--sequential_file_name``); ``--f name`` lines and the seeds' ``positive|||negative`` files name
    images by their line (``prompt000_pos.png``, then ``prompt000_pos_1.png``, ...), and
    ``--use_original_file_name`` by the init image's file (``original``)."""
    suffix = f"_{job.copy}" if job.copy else ""
    if job.prompt.file_name:
        return f"{Path(job.prompt.file_name).stem}{suffix}.png"
    if original:
        return f"{Path(original).stem}{suffix}.png"
    if job.prompt.split_style:
        return f"prompt{job.prompt.index:03d}_pos{suffix}.png"
    if sequential:
        return f"im_{index + 1:06d}.png"
    return f"im_{stamp}_{index:03d}_{job.seed}.png"


def png_info(job: Job, model_name: str, networks: list[tuple[str, float]], kind: str,
             size_conditioning: bool = False) -> PngImagePlugin.PngInfo:
    """AUTOMATIC1111's ``parameters`` text (so any image can be reproduced and read by image
    browsers) plus kohya's separate chunks (with SDXL's size conditioning when the model has it)."""
    params = (f"{job.prompt_text}\nNegative prompt: {job.negative}\nSteps: {job.steps}, Sampler: {job.sampler}, "
              f"CFG scale: {job.scale}, Seed: {job.seed}, Size: {job.width}x{job.height}, Model: {model_name}")
    if kind != "txt2img":
        params += f", Denoising strength: {job.strength}"
    if job.negative_scale is not None:
        params += f", Negative scale: {job.negative_scale}"
    if job.deep_shrink is not None:
        ds = job.deep_shrink
        params += f", Deep Shrink: depth {ds.depth_1} t>={ds.timesteps_1}"
        params += f" depth {ds.depth_2} t>={ds.timesteps_2}" if ds.depth_2 is not None else ""
        params += f" ratio {ds.ratio}"
    if job.gradual_latent is not None:
        gl = job.gradual_latent
        params += (f", Gradual Latent: t<{gl.start_timesteps} ratio {gl.ratio} step {gl.ratio_step} "
                   f"every {gl.every_n_steps} s_noise {gl.s_noise}")
        if gl.unsharp is not None:
            u = gl.unsharp
            params += f" unsharp {u.ksize},{u.sigma},{u.strength},{int(u.target_x)}"
    if networks:
        params += ", Lora: " + ", ".join(f"{name}:{mul}" for name, mul in networks)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", params)
    for key, value in (("prompt", job.prompt_text), ("raw-prompt", job.prompt.prompt),
                       ("negative-prompt", job.negative), ("seed", job.seed),
                       ("steps", job.steps), ("scale", job.scale), ("sampler", job.sampler)):
        info.add_text(key, str(value))
    if job.prompt.clip_prompt:
        info.add_text("clip-prompt", job.prompt.clip_prompt)
    if job.negative_scale is not None:
        info.add_text("negative-scale", str(job.negative_scale))
    if size_conditioning:
        for key, value in size_chunks(job).items():
            info.add_text(key, str(value))
    return info


def size_chunks(job: Job) -> dict[str, int]:
    """kohya's SDXL PNG fields: the size conditioning the image was made with (defaults filled in)."""
    p = job.prompt
    width, height = (v or d for v, d in zip(p.original_size, (job.width, job.height)))
    neg_width, neg_height = (v or d for v, d in zip(p.negative_original_size, (width, height)))
    return {"original-height": height, "original-width": width, "original-height-negative": neg_height,
            "original-width-negative": neg_width, "crop-top": p.crop[0], "crop-left": p.crop[1]}


def save_image(image: Image.Image, folder: Path, name: str, info: PngImagePlugin.PngInfo,
               sequential: bool) -> Path:
    """Write ``name`` in ``folder``; a sequential name that exists moves on to the next free number."""
    path = folder / name
    if sequential and name.startswith("im_") and path.exists():
        number = int(path.stem[3:])
        while path.exists():
            number += 1
            path = folder / f"im_{number:06d}.png"
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def read_images(path: str | None, what: str) -> list[Image.Image] | None:
    """``--image_path`` / ``--mask_path``: one image, or every image of a folder (sorted by name)."""
    if not path:
        return None
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")) \
        if p.is_dir() else [p]
    if not files or not files[0].is_file():
        raise UserError(f"--{what} {path}: no image found")
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                copy = im.copy()
            copy.filename = str(f)  # for --use_original_file_name
            out.append(copy)
        except OSError as exc:
            raise UserError(f"--{what} {f}: not a readable image ({exc})") from exc
    return out


def timestamp() -> str:
    return time.strftime("%Y%m%d%H%M%S", time.localtime())


def highres_first_pass(batch: GenBatch, scale: float) -> GenBatch:
    """The first stage of the highres fix: the same batch at ``scale`` times the size (multiple of 8)."""
    w, h = max(64, int(batch.width * scale) // 8 * 8), max(64, int(batch.height * scale) // 8 * 8)
    return replace(batch, width=w, height=h)
