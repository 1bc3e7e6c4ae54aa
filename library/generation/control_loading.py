"""gen_img's ControlNet and ControlNet-LLLite files, loaded once for the run.

A ControlNet single file (original layout, with or without the ``control_model.`` prefix) is converted
by diffusers' own converter into a ControlNetModel shaped like the loaded UNet, so no config download
is needed; a diffusers folder loads as it is. LLLite files are kohya's, hooked into the UNet layers
they name (:mod:`library.sampling.lllite`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

from library.models.sd_loading import read_state_dict
from library.sampling.controlnet import ControlNetUse
from library.sampling.lllite import LLLite, LLLiteUse
from library.utils.errors import UserError


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


def load_lllites(paths, settings, models, device: torch.device, dtype: torch.dtype) -> tuple:
    """Each ControlNet-LLLite file hooked into the UNet, with its (prep, multiplier, ratio)."""
    uses = []
    for path, (prep, multiplier, ratio) in zip(paths, settings):
        state = read_state_dict(path)
        network = LLLite(models.denoiser, state, path)
        network.to(device, dtype).eval().requires_grad_(False)
        uses.append(LLLiteUse(network, prep, multiplier, ratio))
    return tuple(uses)
