"""ControlNet for gen_img.py (SD1/SD2/SDXL), through diffusers' ControlNet pipelines.

kohya's flags: ``--control_net_models`` (original-layout single files, e.g. ``control_v11p_sd15_canny``,
with or without the ``control_model.`` prefix, or diffusers folders), ``--control_net_preps``
(``canny[_low[_high]]`` or ``none``), ``--control_net_multipliers`` (strength), ``--control_net_ratios``
(the fraction of the steps, from the first, that ControlNet guides) and ``--guide_image_path``.
A single file is converted by diffusers' own converter into a ControlNetModel shaped like the
loaded UNet (so no config download is needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from PIL import Image

from library.models.sd_loading import read_state_dict
from library.utils.errors import UserError


@dataclass(frozen=True)
class ControlNetUse:
    """A loaded ControlNet with how it is applied."""

    model: torch.nn.Module
    prep: str = "none"
    multiplier: float = 1.0
    ratio: float = 1.0


def check_prep(prep: str) -> None:
    """``none``, or ``canny`` with optional thresholds ``canny_63_191``."""
    parts = prep.split("_")
    if parts[0] == "none" and len(parts) == 1:
        return
    if parts[0] != "canny" or len(parts) > 3 or not all(p.isdigit() for p in parts[1:]):
        raise UserError(f"--control_net_preps {prep}: use none, canny, or canny_LOW_HIGH such as canny_63_191")


def preprocess(image: Image.Image, prep: str) -> Image.Image:
    """The guide image as the ControlNet sees it (kohya's canny: OpenCV's edges, 3 channels)."""
    image = image.convert("RGB")
    if prep == "none":
        return image

    parts = prep.split("_")
    low = int(parts[1]) if len(parts) > 1 else 63
    high = int(parts[2]) if len(parts) > 2 else 191
    edges = cv2.Canny(np.asarray(image), low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def load_controlnet_model(path: str, unet, dtype: torch.dtype):
    """A diffusers folder as it is, or an original-layout file converted for ``unet``'s shape."""
    p = Path(path)
    if (p / "config.json").is_file():
        return ControlNetModel.from_pretrained(str(p), torch_dtype=dtype)
    if not p.is_file():
        raise UserError(f"--control_net_models {path}: not found (a ControlNet file or diffusers folder)")

    model = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    state = read_state_dict(p)
    if not any(k.startswith(("control_model.", "input_hint_block.", "zero_convs.")) for k in state):
        raise UserError(f"--control_net_models {path}: no ControlNet tensors (input_hint_block, zero_convs) in it")
    converted = convert_controlnet_checkpoint(state, dict(model.config))
    converted = {k: v for k, v in converted.items() if v is not None}
    try:
        model.load_state_dict(converted, strict=True)
    except RuntimeError as exc:
        raise UserError(f"--control_net_models {path}: does not fit this model's UNet "
                        f"({str(exc).splitlines()[0]}; is it a ControlNet for another model family?)") from exc
    return model.to(dtype)


def load_controlnets(paths: Sequence[str], settings: Sequence[tuple[str, float, float]], models,
                     device: torch.device, dtype: torch.dtype) -> tuple:
    """Each ControlNet file or folder with its (prep, multiplier, ratio)."""
    uses = []
    for path, (prep, multiplier, ratio) in zip(paths, settings):
        model = load_controlnet_model(path, models.denoiser, dtype).to(device).eval().requires_grad_(False)
        uses.append(ControlNetUse(model, prep, multiplier, ratio))
    return tuple(uses)


def control_kwargs(uses: tuple, guides: list, width: int, height: int, key: str) -> dict:
    """The pipeline arguments of one batch: each ControlNet's preprocessed guides, strength and end."""
    images = [[preprocess(g, u.prep).resize((width, height)) for g in guides] for u in uses]
    if len(uses) == 1:
        return {key: images[0], "controlnet_conditioning_scale": uses[0].multiplier,
                "control_guidance_start": 0.0, "control_guidance_end": uses[0].ratio}
    per_image = [list(pair) for pair in zip(*images)]  # diffusers: for each image, one guide per ControlNet
    return {key: per_image, "controlnet_conditioning_scale": [u.multiplier for u in uses],
            "control_guidance_start": [0.0] * len(uses), "control_guidance_end": [u.ratio for u in uses]}
