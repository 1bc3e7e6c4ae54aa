"""ControlNet for gen_img.py (SD1/SD2/SDXL), through diffusers' ControlNet pipelines.

kohya's flags: ``--control_net_models`` (original-layout single files, e.g. ``control_v11p_sd15_canny``,
with or without the ``control_model.`` prefix, or diffusers folders), ``--control_net_preps``
(``canny[_low[_high]]`` or ``none``), ``--control_net_multipliers`` (strength), ``--control_net_ratios``
(the fraction of the steps, from the first, that ControlNet guides) and ``--guide_image_path``.
Loading the files is gen_img's (:mod:`library.generation.control_loading`); this module is what a
pipeline call needs: the guide preprocessing and the call's arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

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


def control_kwargs(uses: tuple, guides: list, width: int, height: int, key: str) -> dict:
    """The pipeline arguments of one batch: each ControlNet's preprocessed guides, strength and end."""
    images = [[preprocess(g, u.prep).resize((width, height)) for g in guides] for u in uses]
    if len(uses) == 1:
        return {key: images[0], "controlnet_conditioning_scale": uses[0].multiplier,
                "control_guidance_start": 0.0, "control_guidance_end": uses[0].ratio}
    per_image = [list(pair) for pair in zip(*images)]  # diffusers: for each image, one guide per ControlNet
    return {key: per_image, "controlnet_conditioning_scale": [u.multiplier for u in uses],
            "control_guidance_start": [0.0] * len(uses), "control_guidance_end": [u.ratio for u in uses]}
