"""Load and save SD3 / SD3.5 single files, with or without bundled text encoders.

Layout: ``model.diffusion_model.*`` (MMDiT, see :mod:`library.models.sd3_keys`),
``first_stage_model.*`` (16-channel VAE without quant convs), and optionally
``text_encoders.clip_l.transformer.*``, ``text_encoders.clip_g.transformer.*`` (transformers CLIP
layout with projection) and ``text_encoders.t5xxl.transformer.*`` (transformers T5 encoder layout).
Encoders missing from the file come from separate files (``--clip_l``, ``--clip_g``, ``--t5xxl``).
Diffusers folders (``StableDiffusion3Pipeline`` layout) and hub ids load too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from library.models import sd3_keys, sd_infer, sd_keys
from library.models.sd_loading import (
    CHECKPOINT_SUFFIXES,
    _build,
    _Cfg,
    _strip,
    read_checked_state_dict,
    read_state_dict,
    write_diffusers_folder,
    write_single_file,
)
from library.models.tokenizers import resolve_tokenizer
from library.utils.errors import UserError

TE_PREFIXES = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
               "t5xxl": "text_encoders.t5xxl.transformer."}
SD3_VAE_SCALE, SD3_VAE_SHIFT = 1.5305, 0.0609


@dataclass
class SD3Components:
    """The parts of an SD3/SD3.5 model (text encoders may be None when not needed)."""

    transformer: torch.nn.Module
    vae: torch.nn.Module
    clip_l: torch.nn.Module | None
    clip_g: torch.nn.Module | None
    t5xxl: torch.nn.Module | None
    tokenizers: dict = field(default_factory=dict)  # "clip_l", "clip_g", "t5xxl"
    #: the encoders the loaded single file itself held (not given as separate files)
    bundled: frozenset[str] = frozenset(TE_PREFIXES)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    @property
    def text_encoder_list(self) -> list[torch.nn.Module]:
        """The bundled encoders in the order LoRA files number them (te1 CLIP-L, te2 CLIP-G, te3 T5)."""
        return [m for m in (self.clip_l, self.clip_g, self.t5xxl) if m is not None]

    @property
    def base_model_version(self) -> str:
        return f"sd3_{self.model_type()}"  # kohya's ss_base_model_version

    def model_type(self) -> str:
        """kohya's name of the MMDiT variant: ``medium`` (SD3), ``5-medium`` or ``5-large`` (SD3.5)."""
        cfg = self.transformer.config
        if not cfg.qk_norm:
            return "medium"
        return "5-medium" if cfg.dual_attention_layers else "5-large"


def _clip_with_projection(state: dict, act: str, dtype, what: str, path) -> torch.nn.Module:
    cfg = sd_infer.infer_clip_l_config(state)
    cfg.update(hidden_act=act, projection_dim=state["text_projection.weight"].shape[0])
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    return _build(CLIPTextModelWithProjection, CLIPTextConfig(**cfg), state, dtype, what, path)


def infer_t5_config(state: dict) -> dict:
    """T5EncoderModel config kwargs from transformers-layout keys (heads from the relative bias)."""
    embed = state.get("encoder.embed_tokens.weight", state.get("shared.weight"))
    bias = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    inner = state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    layers = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state
    ff = state["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"].shape[0]
    return {"vocab_size": embed.shape[0], "d_model": embed.shape[1], "d_ff": ff, "num_layers": len(layers),
            "num_heads": bias.shape[1], "d_kv": inner // bias.shape[1], "relative_attention_num_buckets": bias.shape[0],
            "feed_forward_proj": "gated-gelu" if gated else "relu", "is_encoder_decoder": False}


def _t5(state: dict, dtype, path) -> torch.nn.Module:
    state = dict(state)
    if "shared.weight" not in state:  # files keep only the encoder's copy of the tied embedding
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    return _build(T5EncoderModel, T5Config(**infer_t5_config(state)), state, dtype, "T5-XXL", path)


# prefixes separate encoder files carry when cut out of SD1/SD2/SDXL single files
_ORIGINAL_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.",
                      "cond_stage_model.transformer.", "cond_stage_model.model.")


def clip_to_transformers_layout(state: dict, what: str, path) -> dict:
    """A separate CLIP file in any layout users have -> transformers ``CLIPTextModelWithProjection``
    names: the transformers layout itself, the original SD/SDXL single-file prefixes, or OpenCLIP's
    own layout (``transformer.resblocks.*`` with fused q/k/v and ``text_projection``, as SDXL's
    bigG is stored)."""
    for prefix in _ORIGINAL_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = _strip(dict(state), prefix)
            break
    if "transformer.resblocks.0.attn.in_proj_weight" in state:
        layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
        converted, unused = sd_keys.open_clip_from_ldm(state, layers, flat=False)
        if "text_projection" not in unused:
            raise UserError(f"{path}: this OpenCLIP {what} has no text_projection; SD3 needs the encoder with its "
                            "projection")
        converted["text_projection.weight"] = unused["text_projection"].T.contiguous()
        return converted
    if "text_projection.weight" not in state:
        raise UserError(f"{path}: this {what} has no text_projection (an SD1 text encoder?); SD3 needs the CLIP "
                        "with projection (the clip_l / clip_g files made for SD3)")
    return state


def _text_encoder(name: str, state: dict, separate: str | None, dtype, path) -> torch.nn.Module | None:
    """A bundled encoder, or one from its separate file; None when neither is there."""
    bundled = _strip(state, TE_PREFIXES[name])
    source = path
    if not bundled and separate:
        bundled, source = read_state_dict(separate, dtype=dtype), separate
        bundled = _strip(bundled, TE_PREFIXES[name]) or bundled
        if name != "t5xxl":
            bundled = clip_to_transformers_layout(bundled, name, separate)
    if not bundled:
        return None
    if name == "t5xxl":
        return _t5(bundled, dtype, source)
    return _clip_with_projection(bundled, "quick_gelu" if name == "clip_l" else "gelu", dtype, name, source)


def load_sd3_single_file(path: str | os.PathLike, dtype: torch.dtype = torch.float32, clip_l: str | None = None,
                         clip_g: str | None = None, t5xxl: str | None = None,
                         require_text_encoders: bool = True, device: torch.device | None = None) -> SD3Components:
    """Load an SD3/SD3.5 single file; text encoders come from the file or the given files."""
    state, _ = read_checked_state_dict(path, ("sd3",), device or "cpu", dtype)
    bundled = frozenset(name for name, prefix in TE_PREFIXES.items() if any(k.startswith(prefix) for k in state))
    encoders = {name: _text_encoder(name, state, sep, dtype, path)
                for name, sep in (("clip_l", clip_l), ("clip_g", clip_g), ("t5xxl", t5xxl))}
    missing = [name for name in ("clip_l", "clip_g") if encoders[name] is None]
    if require_text_encoders and missing:
        raise UserError(f"{path} has no bundled {' and '.join(missing)}: pass "
                        + " ".join(f"--{m} <file>" for m in missing))
    mmdit = _strip(state, sd3_keys.PREFIX)
    cfg = sd3_keys.infer_mmdit_config(mmdit)
    transformer = _build(SD3Transformer2DModel, cfg, sd3_keys.mmdit_from_ldm(mmdit, cfg["num_layers"]), dtype,
                         "MMDiT", path)
    vae_ldm = _strip(state, sd_keys.VAE_PREFIX)
    vae_cfg = sd_infer.infer_vae_config(vae_ldm)
    vae_cfg.update(scaling_factor=SD3_VAE_SCALE, shift_factor=SD3_VAE_SHIFT)
    vae = _build(AutoencoderKL, vae_cfg, sd_keys.vae_from_ldm(vae_ldm, _Cfg(vae_cfg)), dtype, "VAE", path)
    return SD3Components(transformer, vae, encoders["clip_l"], encoders["clip_g"], encoders["t5xxl"],
                         bundled=bundled)


def save_sd3_single_file(path: str | os.PathLike, parts: SD3Components, dtype: torch.dtype | None = None,
                         bundle_text_encoders: bool | Collection[str] = True, metadata: dict[str, str] | None = None,
                         progress: bool = False) -> None:
    """Write an SD3 single file in the original layout, with the text encoders present
    (``bundle_text_encoders``: all, none, or the names of those to write)."""
    state = sd3_keys.mmdit_to_ldm(parts.transformer.state_dict(), parts.transformer.config.num_layers)
    state.update(sd_keys.vae_to_ldm(parts.vae.state_dict(), parts.vae.config))
    names = TE_PREFIXES if bundle_text_encoders is True else (bundle_text_encoders or ())
    for name in TE_PREFIXES:
        module = getattr(parts, name)
        if name in names and module is not None:
            state.update({TE_PREFIXES[name] + k: v for k, v in module.state_dict().items()
                          if not (name == "t5xxl" and k == "shared.weight")})
    write_single_file(state, path, dtype, metadata, progress)


def load_sd3_diffusers(name_or_path: str, dtype: torch.dtype = torch.float32) -> SD3Components:
    """A ``StableDiffusion3Pipeline`` folder or hub id (T5 may be absent, as in the pipeline)."""

    root = Path(name_or_path)
    if root.is_dir() and not (root / "transformer").is_dir():
        raise UserError(f"{name_or_path} is not an SD3 diffusers folder (no transformer/); SD1/SD2 folders are "
                        "trained with train_network.py, SDXL ones with sdxl_train_network.py")
    try:
        transformer = SD3Transformer2DModel.from_pretrained(name_or_path, subfolder="transformer", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", torch_dtype=dtype)
        clip_l = CLIPTextModelWithProjection.from_pretrained(name_or_path, subfolder="text_encoder", torch_dtype=dtype)
        clip_g = CLIPTextModelWithProjection.from_pretrained(name_or_path, subfolder="text_encoder_2",
                                                             torch_dtype=dtype)
        tokenizers = {"clip_l": CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer"),
                      "clip_g": CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer_2", pad_token="!")}
        t5 = None
        if not root.is_dir() or (root / "text_encoder_3").is_dir():
            t5 = T5EncoderModel.from_pretrained(name_or_path, subfolder="text_encoder_3", torch_dtype=dtype)
            tokenizers["t5xxl"] = T5TokenizerFast.from_pretrained(name_or_path, subfolder="tokenizer_3")
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load an SD3 diffusers model from {name_or_path}: "
                        f"{str(exc).splitlines()[0]}") from exc
    for m in (transformer, vae, clip_l, clip_g, t5):
        if m is not None:
            m.eval().requires_grad_(False)
    return SD3Components(transformer, vae, clip_l, clip_g, t5, tokenizers)


def load_sd3_model(name_or_path: str, dtype: torch.dtype = torch.float32, tokenizer_dir: str | None = None,
                   clip_l: str | None = None, clip_g: str | None = None, t5xxl: str | None = None) -> SD3Components:
    """An SD3/SD3.5 model from a single file (encoders bundled or separate; tokenizers looked up
    offline-first), a diffusers folder or a hub id."""

    p = Path(name_or_path)
    if p.is_dir() or not (p.is_file() or p.suffix in CHECKPOINT_SUFFIXES):
        return load_sd3_diffusers(name_or_path, dtype)
    parts = load_sd3_single_file(p, dtype, clip_l, clip_g, t5xxl)
    parts.tokenizers = {"clip_l": resolve_tokenizer("clip_l", p, tokenizer_dir),
                        "clip_g": resolve_tokenizer("clip_g", p, tokenizer_dir)}
    if parts.t5xxl is not None:
        parts.tokenizers["t5xxl"] = resolve_tokenizer("t5xxl", p, tokenizer_dir)
    return parts


def save_sd3_diffusers(folder: str | os.PathLike, parts: SD3Components, dtype: torch.dtype | None = None) -> None:
    """Write a ``StableDiffusion3Pipeline`` folder with a FlowMatchEulerDiscreteScheduler (shift 3)."""
    write_diffusers_folder(
        folder, "StableDiffusion3Pipeline",
        {"transformer": parts.transformer, "vae": parts.vae, "text_encoder": parts.clip_l,
         "text_encoder_2": parts.clip_g, "text_encoder_3": parts.t5xxl},
        {"tokenizer": parts.tokenizers.get("clip_l"), "tokenizer_2": parts.tokenizers.get("clip_g"),
         "tokenizer_3": parts.tokenizers.get("t5xxl")},
        dtype, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0))
