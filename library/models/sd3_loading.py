"""Load and save SD3 / SD3.5 single files, with or without bundled text encoders.

Layout: ``model.diffusion_model.*`` (MMDiT, see :mod:`library.models.sd3_keys`),
``first_stage_model.*`` (16-channel VAE without quant convs), and optionally
``text_encoders.clip_l.transformer.*``, ``text_encoders.clip_g.transformer.*`` (transformers CLIP
layout with projection) and ``text_encoders.t5xxl.transformer.*`` (transformers T5 encoder layout).
Encoders missing from the file come from separate files (``--clip_l``, ``--clip_g``, ``--t5xxl``).
Not wired to a training script yet (sd3_train_network.py is its own issue).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from library.models import sd3_keys, sd_infer, sd_keys
from library.models.sd_loading import _build, _Cfg, _strip, read_state_dict, require_layout
from library.utils.errors import UserError
from library.utils.files import save_safetensors

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


def _clip_with_projection(state: dict, act: str, dtype, what: str, path) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

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
    from transformers import T5Config, T5EncoderModel

    state = dict(state)
    if "shared.weight" not in state:  # files keep only the encoder's copy of the tied embedding
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    return _build(T5EncoderModel, T5Config(**infer_t5_config(state)), state, dtype, "T5-XXL", path)


def _text_encoder(name: str, state: dict, separate: str | None, dtype, path) -> torch.nn.Module | None:
    """A bundled encoder, or one from its separate file; None when neither is there."""
    bundled = _strip(state, TE_PREFIXES[name])
    source = path
    if not bundled and separate:
        bundled, source = read_state_dict(separate), separate
        bundled = _strip(bundled, TE_PREFIXES[name]) or bundled
    if not bundled:
        return None
    if name == "t5xxl":
        return _t5(bundled, dtype, source)
    return _clip_with_projection(bundled, "quick_gelu" if name == "clip_l" else "gelu", dtype, name, source)


def load_sd3_single_file(path: str | os.PathLike, dtype: torch.dtype = torch.float32, clip_l: str | None = None,
                         clip_g: str | None = None, t5xxl: str | None = None,
                         require_text_encoders: bool = True) -> SD3Components:
    """Load an SD3/SD3.5 single file; text encoders come from the file or the given files."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    state = read_state_dict(path)
    require_layout(state, ("sd3",), path)
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
    return SD3Components(transformer, vae, encoders["clip_l"], encoders["clip_g"], encoders["t5xxl"])


def save_sd3_single_file(path: str | os.PathLike, parts: SD3Components, dtype: torch.dtype | None = None,
                         bundle_text_encoders: bool = True) -> None:
    """Write an SD3 single file in the original layout (text encoders bundled when present)."""
    state = sd3_keys.mmdit_to_ldm(parts.transformer.state_dict(), parts.transformer.config.num_layers)
    state.update(sd_keys.vae_to_ldm(parts.vae.state_dict(), parts.vae.config))
    if bundle_text_encoders:
        for name in TE_PREFIXES:
            module = getattr(parts, name)
            if module is not None:
                state.update({TE_PREFIXES[name] + k: v for k, v in module.state_dict().items()
                              if not (name == "t5xxl" and k == "shared.weight")})
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_safetensors(state, path)
