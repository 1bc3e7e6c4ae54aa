"""Infer diffusers/transformers configs for SD1.x/2.x parts from the shapes in a state dict.

Everything that weights reveal (widths, depths, channel counts, projection kind) is read from
the tensors. What they do not reveal follows the rule of the real models: SD1 UNets use 8 heads,
SD2 UNets and CLIP text towers use 64-wide heads (test-size towers narrower than 64 use 8-wide
heads). So real checkpoints and tiny test checkpoints load through the same code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch


def _indices(state: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state if (m := rx.match(k))})


def infer_unet_config(state: Mapping[str, torch.Tensor], v2: bool, pooled_dim: int | None = None) -> dict:
    """UNet2DConditionModel config from ldm UNet keys (``model.diffusion_model.`` removed).

    ``v2`` selects 64-wide attention heads (SD2 and SDXL; SD1 uses 8 heads). An SDXL UNet (with
    ``label_emb``) also needs the pooled text width, ``pooled_dim``, to split its size-embedding
    input into the pooled text and the six size/crop values."""
    model_channels = state["input_blocks.0.0.weight"].shape[0]
    in_channels = state["input_blocks.0.0.weight"].shape[1]
    n_input = len(_indices(state, r"input_blocks\.(\d+)\."))
    downsample_at = _indices(state, r"input_blocks\.(\d+)\.0\.op\.weight")
    levels = len(downsample_at) + 1
    layers_per_block = (n_input - 1 - len(downsample_at)) // levels
    per_level = layers_per_block + 1
    channels, down_types, transformer_depths = [], [], []
    for lvl in range(levels):
        first = per_level * lvl + 1
        channels.append(state[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0])
        has_attn = f"input_blocks.{first}.1.proj_in.weight" in state
        down_types.append("CrossAttnDownBlock2D" if has_attn else "DownBlock2D")
        depth = len(_indices(state, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")) if has_attn else 1
        transformer_depths.append(depth)
    up_types = [t.replace("Down", "Up") for t in reversed(down_types)]
    attn_key = next(k for k in state if k.endswith("attn2.to_k.weight"))
    proj_in = next(k for k in state if k.endswith(".proj_in.weight"))
    if v2:  # SD2: 64-wide heads
        heads = [max(1, c // 64) for c in channels]
    else:  # SD1: 8 heads everywhere
        heads = 8
    extra = {}
    if "label_emb.0.0.weight" in state:  # SDXL: size and crop conditioning plus the pooled text
        embed_in = state["label_emb.0.0.weight"].shape[1]
        if pooled_dim is None:
            raise ValueError("an SDXL UNet needs pooled_dim to infer its config")
        extra = {"addition_embed_type": "text_time", "addition_time_embed_dim": (embed_in - pooled_dim) // 6,
                 "projection_class_embeddings_input_dim": embed_in}
    return {
        **extra,
        "sample_size": 128 if extra else (96 if v2 else 64),
        "in_channels": in_channels,
        "out_channels": state["out.2.weight"].shape[0],
        "block_out_channels": channels,
        "layers_per_block": layers_per_block,
        "down_block_types": down_types,
        "up_block_types": up_types,
        "cross_attention_dim": state[attn_key].shape[1],
        "attention_head_dim": heads,
        "use_linear_projection": state[proj_in].ndim == 2,
        "transformer_layers_per_block": transformer_depths,
        "norm_num_groups": 32 if model_channels % 32 == 0 else model_channels,
    }


def infer_vae_config(state: Mapping[str, torch.Tensor]) -> dict:
    """AutoencoderKL config from ldm VAE keys (``first_stage_model.`` removed)."""
    levels = _indices(state, r"encoder\.down\.(\d+)\.")
    layers = len(_indices(state, r"encoder\.down\.0\.block\.(\d+)\."))
    channels = [state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in levels]
    quant = "quant_conv.weight" in state  # SD3/FLUX VAEs have no quant convs
    return {
        "use_quant_conv": quant,
        "use_post_quant_conv": "post_quant_conv.weight" in state,
        "in_channels": state["encoder.conv_in.weight"].shape[1],
        "out_channels": state["decoder.conv_out.weight"].shape[0],
        "latent_channels": state["encoder.conv_out.weight"].shape[0] // 2,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "norm_num_groups": 32 if channels[0] % 32 == 0 else channels[0],
        "sample_size": 512,
    }


def clip_heads(hidden: int) -> int:
    """Head count for a CLIP text tower of width ``hidden`` (64-wide heads; 8-wide below 64)."""
    return hidden // 64 if hidden >= 64 else max(1, hidden // 8)


def infer_clip_l_config(state: Mapping[str, torch.Tensor]) -> dict:
    """CLIPTextConfig kwargs from HF-named CLIP keys (``text_model.`` present or not)."""
    pre = "text_model." if any(k.startswith("text_model.") for k in state) else ""
    tok = state[f"{pre}embeddings.token_embedding.weight"]
    vocab, hidden = tok.shape
    layers = _indices(state, rf"{re.escape(pre)}encoder\.layers\.(\d+)\.")
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": state[f"{pre}encoder.layers.0.mlp.fc1.weight"].shape[0],
        "num_hidden_layers": len(layers),
        "num_attention_heads": clip_heads(hidden),
        "max_position_embeddings": state[f"{pre}embeddings.position_embedding.weight"].shape[0],
        "hidden_act": "quick_gelu",
        "projection_dim": 768 if hidden == 768 else hidden,
        # the start/end tokens are the last two vocabulary entries in CLIP and in our tiny tokenizer
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
        "pad_token_id": 1,
    }


def shipped_config(name: str) -> dict:
    """A real architecture's config shipped with the project (``library/models/configs/<name>.json``)."""

    return json.loads((Path(__file__).parent / "configs" / f"{name}.json").read_text(encoding="utf-8"))


def infer_open_clip_config(state: Mapping[str, torch.Tensor]) -> tuple[dict, int]:
    """CLIPTextConfig kwargs for SD2's OpenCLIP text tower (keys with ``cond_stage_model.model.``
    removed) and the number of layers SD2 uses (all but the last: it takes the penultimate output)."""
    tok = state["token_embedding.weight"]
    vocab, hidden = tok.shape
    layers = len(_indices(state, r"transformer\.resblocks\.(\d+)\."))
    used = max(1, layers - 1)
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": used,
        "num_attention_heads": clip_heads(hidden),
        "max_position_embeddings": state["positional_embedding"].shape[0],
        "hidden_act": "gelu",
        "projection_dim": state["text_projection"].shape[1] if "text_projection" in state else hidden,
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
        "pad_token_id": 0,
    }, used
