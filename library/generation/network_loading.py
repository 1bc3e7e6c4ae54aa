"""gen_img.py's LoRAs: kohya-format files through their network module (hooked, merged or
pre-calculated), diffusers-form files through diffusers' loader, and the highres-fix upscaler module."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from library.generation.config import HighresFix, NetworkSettings
from library.utils.errors import UserError
from networks.base import NetworkAdapter, import_network_module, takes_generation_args

logger = logging.getLogger(__name__)


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
        self.multiplier = multiplier
        self.set_multiplier(multiplier)

    active: dict[str, float] = {}  # every loaded adapter's strength (they live in shared modules)

    def set_multiplier(self, value: float) -> None:
        self.multiplier = value
        DiffusersLoRA.active[self.name] = value
        self.pipe.set_adapters(list(self.active), adapter_weights=list(self.active.values()))

    def apply_to(self, text_encoder, unet, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Nothing to do: diffusers injected the layers when the file was loaded."""

    def merge_to(self, text_encoder=None, unet=None, weights_sd=None, dtype=None, device=None) -> None:
        """kohya's merge signature; diffusers fuses the adapter it loaded into the shared modules."""
        self.pipe.fuse_lora(lora_scale=self.multiplier, adapter_names=[self.name])
        self.pipe.delete_adapters(self.name)
        DiffusersLoRA.active.pop(self.name, None)


def _is_diffusers_form(path: str) -> bool:
    if not path.endswith(".safetensors"):
        return False
    with safe_open(path, "pt") as f:
        return any(".lora_A." in k or ".lora_B." in k for k in f.keys())


@dataclass
class LoadedNetwork:
    name: str  # the file's stem (PNG metadata)
    multiplier: float
    network: NetworkAdapter
    merged: bool = False


def network_kwargs(settings: NetworkSettings, i: int, module_name: str, module) -> dict[str, str]:
    """kohya's ``--network_args``: one 'key=value;key=value' string per LoRA file, for its module."""
    if i >= len(settings.args) or not settings.args[i].strip():
        return {}
    text = settings.args[i]
    if not takes_generation_args(module):
        raise UserError(f"--network_args {text!r}: {module_name} takes its shape from the file "
                        "and has no arguments at generation time (they are for other modules, e.g. lycoris.kohya)")
    pairs = [part.split("=", 1) for part in text.split(";") if part.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise UserError(f"--network_args {text!r}: write key=value pairs separated by ';'")
    return {k.strip(): v.strip() for k, v in pairs}


def load_networks(settings: NetworkSettings, family, models, device) -> list[LoadedNetwork]:
    """Each ``--network_weights`` file, applied, or merged (``--network_merge``, or the first
    ``--network_merge_n_models``)."""
    te = models.text_encoders[0] if len(models.text_encoders) == 1 else models.text_encoders
    s = settings
    merge_count = len(s.weights) if s.merge else (s.merge_n_models or 0)
    loaded = []
    for i, path in enumerate(s.weights):
        mul = s.mul(i)
        if s.show_meta:
            logger.info("LoRA %s metadata: %s", Path(path).name, _file_metadata(path))
        merged, weights_sd = i < merge_count, None
        if family.diffusers_lora_via_pipeline and _is_diffusers_form(path) and i >= len(s.modules):
            network = NetworkAdapter(DiffusersLoRA(family, models, path, f"lora{i}", mul), "generate")
        else:
            name = s.modules[i] if i < len(s.modules) else family.default_network_module
            module = import_network_module(name)
            raw, weights_sd = module.create_network_from_weights(mul, path, models.vae, te, models.denoiser,
                                                                 for_inference=True,
                                                                 **network_kwargs(s, i, name, module))
            network = NetworkAdapter(raw, "generate")
            if not merged:  # kohya's protocol: a network that is merged is never hooked
                network.apply_to(te, models.denoiser, True, True)
            logger.info("LoRA %s: %s", Path(path).name, network.load_for_generation(path, weights_sd))
            network.to(device, models.denoiser.dtype)
        if merged:
            network.merge_to(te, models.denoiser, weights_sd, models.denoiser.dtype, device)
        elif s.pre_calc and not network.capabilities.can_pre_calculate:
            raise UserError(f"--network_pre_calc: {Path(path).name} is not a kohya-format LoRA of ours (it has no "
                            "pre_calculation); use --network_merge for it, or drop --network_pre_calc")
        loaded.append(LoadedNetwork(Path(path).stem, mul, network, merged))
    return loaded


def load_upscaler(highres: HighresFix, device: torch.device, dtype: torch.dtype):
    """kohya's ``--highres_fix_upscaler module --highres_fix_upscaler_args "k=v;k=v"``: the module's
    ``create_upscaler(**kwargs)`` gives a torch module with ``support_latents()`` and
    ``upscale(vae, images, latents, dtype, width, height, batch_size, vae_batch_size)``."""
    try:
        module = importlib.import_module(highres.upscaler)
    except ImportError as exc:
        raise UserError(f"--highres_fix_upscaler {highres.upscaler}: cannot import it ({exc})") from exc
    if not callable(getattr(module, "create_upscaler", None)):
        raise UserError(f"--highres_fix_upscaler {highres.upscaler}: the module has no create_upscaler()")
    pairs = [p.split("=", 1) for p in (highres.upscaler_args or "").split(";") if p.strip()]
    if any(len(p) != 2 for p in pairs):
        raise UserError("--highres_fix_upscaler_args: write key=value pairs separated by ';'")
    upscaler = module.create_upscaler(**{k.strip(): v.strip() for k, v in pairs})
    return upscaler.to(dtype).to(device)


def _file_metadata(path: str) -> dict:
    if not path.endswith(".safetensors"):
        return {}

    with safe_open(path, "pt") as f:
        return f.metadata() or {}
