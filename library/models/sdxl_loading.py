"""Load and save SDXL single files (original SGM key layout).

Layout: ``model.diffusion_model.*`` (UNet with ``label_emb`` size conditioning),
``first_stage_model.*`` (VAE), ``conditioner.embedders.0.transformer.*`` (CLIP-L) and
``conditioner.embedders.1.model.*`` (OpenCLIP bigG, all layers plus its text projection).
The architecture is read from tensor shapes; real and tiny test files load through the same code.
Diffusers folders (``StableDiffusionXLPipeline`` layout) and hub ids load and save too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from library.models import sd_infer, sd_keys
from library.models.sd_loading import (
    CHECKPOINT_SUFFIXES,
    _build,
    _Cfg,
    _strip,
    read_checked_state_dict,
    write_diffusers_folder,
    write_single_file,
)
from library.models.tokenizers import resolve_tokenizer
from library.utils.errors import UserError

TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."


@dataclass
class SDXLComponents:
    """The parts of an SDXL model."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder_1: torch.nn.Module  # CLIP-L (CLIPTextModel)
    text_encoder_2: torch.nn.Module  # OpenCLIP bigG (CLIPTextModelWithProjection)
    unused: dict = field(default_factory=dict)  # e.g. TE2's logit_scale, written back on save
    tokenizer_1: object = None  # CLIP-L's
    tokenizer_2: object = None  # OpenCLIP-G's (same vocabulary, pads with "!")

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    @property
    def text_encoder_list(self) -> list[torch.nn.Module]:
        return [self.text_encoder_1, self.text_encoder_2]

    base_model_version = "sdxl_base_v1-0"  # kohya's ss_base_model_version


def _text_encoder_2(state: dict, dtype, path) -> tuple[torch.nn.Module, dict]:
    ldm = _strip(state, TE2_PREFIX)
    cfg_kwargs, _ = sd_infer.infer_open_clip_config(ldm)
    layers = len({k.split(".")[2] for k in ldm if k.startswith("transformer.resblocks.")})
    cfg = CLIPTextConfig(**{**cfg_kwargs, "num_hidden_layers": layers})  # SDXL keeps every layer
    converted, unused = sd_keys.open_clip_from_ldm(ldm, layers, flat=False)
    projection = unused.pop("text_projection", None)
    if projection is None:
        raise UserError(f"{path}: the second text encoder has no text_projection")
    converted["text_projection.weight"] = projection.T.contiguous()
    return _build(CLIPTextModelWithProjection, cfg, converted, dtype, "second text encoder", path), unused


def load_sdxl_single_file(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                          device: torch.device | None = None) -> SDXLComponents:
    """Load an SDXL single file into diffusers/transformers modules."""

    state, _ = read_checked_state_dict(path, ("sdxl",), device or "cpu", dtype)
    te2, unused = _text_encoder_2(state, dtype, path)
    te1_ldm = _strip(state, TE1_PREFIX)
    te1_cfg = CLIPTextConfig(**sd_infer.infer_clip_l_config(te1_ldm))
    with torch.device("meta"):
        te1_keys = list(CLIPTextModel(te1_cfg).state_dict())
    te1 = _build(CLIPTextModel, te1_cfg, sd_keys.clip_from_ldm(te1_ldm, te1_keys), dtype, "first text encoder", path)
    unet_ldm = _strip(state, sd_keys.UNET_PREFIX)
    unet_cfg = sd_infer.infer_unet_config(unet_ldm, v2=True, pooled_dim=te2.config.projection_dim)
    unet_cfg.update(cross_attention_dim=te1.config.hidden_size + te2.config.hidden_size)
    unet_state = sd_keys.unet_from_ldm(unet_ldm, _Cfg(unet_cfg))
    del unet_ldm
    unet = _build(UNet2DConditionModel, unet_cfg, unet_state, dtype, "UNet", path)
    vae_ldm = _strip(state, sd_keys.VAE_PREFIX)
    vae_cfg = sd_infer.infer_vae_config(vae_ldm)
    vae_cfg["scaling_factor"] = 0.13025
    vae = _build(AutoencoderKL, vae_cfg, sd_keys.vae_from_ldm(vae_ldm, _Cfg(vae_cfg)), dtype, "VAE", path)
    return SDXLComponents(unet, vae, te1, te2, unused)


def save_sdxl_single_file(path: str | os.PathLike, parts: SDXLComponents, dtype: torch.dtype | None = None,
                          metadata: dict[str, str] | None = None, progress: bool = False) -> None:
    """Write an SDXL single file in the original SGM layout."""
    state = {}
    state.update(sd_keys.unet_to_ldm(parts.unet.state_dict(), parts.unet.config))
    state.update(sd_keys.vae_to_ldm(parts.vae.state_dict(), parts.vae.config))
    state.update(sd_keys.clip_to_ldm(parts.text_encoder_1.state_dict(), TE1_PREFIX))
    te2 = dict(parts.text_encoder_2.state_dict())
    projection = te2.pop("text_projection.weight").T.contiguous()
    te2_ldm = sd_keys.open_clip_to_ldm(te2, {**parts.unused, "text_projection": projection})
    state.update({TE2_PREFIX + k[len(sd_keys.OPEN_CLIP_PREFIX):]: v for k, v in te2_ldm.items()})
    write_single_file(state, path, dtype, metadata, progress)


def load_sdxl_diffusers(name_or_path: str, dtype: torch.dtype = torch.float32,
                        device: torch.device | None = None) -> SDXLComponents:
    """An SDXL diffusers folder or hub id (the hub cache is used when offline)."""

    place = {"device_map": str(device)} if device is not None else {}
    try:
        if not (Path(name_or_path) / "text_encoder_2").is_dir() and Path(name_or_path).is_dir():
            raise UserError(f"{name_or_path} is not an SDXL diffusers folder (no text_encoder_2/); an SD1/SD2 "
                            "folder is trained with train_network.py")
        unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet", torch_dtype=dtype, **place)
        vae = AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", torch_dtype=dtype, **place)
        te1 = CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder", torch_dtype=dtype, **place)
        te2 = CLIPTextModelWithProjection.from_pretrained(name_or_path, subfolder="text_encoder_2",
                                                          torch_dtype=dtype, **place)
        tok1 = CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer")
        tok2 = CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer_2", pad_token="!")
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load an SDXL diffusers model from {name_or_path}: "
                        f"{str(exc).splitlines()[0]}") from exc
    if min(len(tok1), len(tok2)) <= 256:  # transformers 5 gives an empty tokenizer instead of an error
        raise UserError(f"{name_or_path}: no usable tokenizer (tokenizer/ or tokenizer_2/ is missing or empty)")
    if getattr(unet.config, "addition_embed_type", None) != "text_time":
        raise UserError(f"{name_or_path}: its UNet has no SDXL size conditioning; it is not an SDXL model")
    for m in (unet, vae, te1, te2):
        m.eval().requires_grad_(False)
    return SDXLComponents(unet, vae, te1, te2, tokenizer_1=tok1, tokenizer_2=tok2)


def load_sdxl_model(name_or_path: str, dtype: torch.dtype = torch.float32, tokenizer_dir: str | None = None,
                    device: torch.device | None = None) -> SDXLComponents:
    """An SDXL model from a single file (tokenizers looked up offline-first), a diffusers folder or a hub id."""

    p = Path(name_or_path)
    if p.is_dir() or not (p.is_file() or p.suffix in CHECKPOINT_SUFFIXES):
        return load_sdxl_diffusers(name_or_path, dtype, device)
    parts = load_sdxl_single_file(p, dtype, device)
    parts.tokenizer_1 = resolve_tokenizer("clip_l", p, tokenizer_dir)
    parts.tokenizer_2 = resolve_tokenizer("clip_g", p, tokenizer_dir)
    return parts


def save_sdxl_diffusers(folder: str | os.PathLike, parts: SDXLComponents, dtype: torch.dtype | None = None) -> None:
    """Write a ``StableDiffusionXLPipeline`` folder (needs the tokenizers: load the model with them)."""
    if parts.tokenizer_1 is None or parts.tokenizer_2 is None:
        raise UserError("an SDXL diffusers folder needs both tokenizers; load the model with load_sdxl_model")
    write_diffusers_folder(folder, "StableDiffusionXLPipeline",
                           {"unet": parts.unet, "vae": parts.vae, "text_encoder": parts.text_encoder_1,
                            "text_encoder_2": parts.text_encoder_2},
                           {"tokenizer": parts.tokenizer_1, "tokenizer_2": parts.tokenizer_2}, dtype)
