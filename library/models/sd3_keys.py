"""SD3/SD3.5 MMDiT: diffusers ``SD3Transformer2DModel`` names <-> the original single-file layout
(``model.diffusion_model.joint_blocks.<i>.{x_block,context_block}.*``), both directions, and the
config read from the original tensors' shapes.

The original layout fuses q/k/v into one ``qkv`` matrix and stores the final (and the last joint
block's context) adaLN modulation as (shift, scale) where diffusers uses (scale, shift). diffusers
only converts original -> diffusers; its converter is the reference the tests compare with.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

PREFIX = "model.diffusion_model."

# outside the joint blocks: diffusers module -> original module (parameters keep their suffix)
_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
# inside joint block i: diffusers module -> original module
_BLOCK = {
    "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
    "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj", "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
}
# fused original q/k/v matrices and the three diffusers projections they hold, in order
_FUSED = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (b, a) along dim 0: the adaLN (shift, scale) <-> (scale, shift) reordering."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _swapped(module: str, last_block: int) -> bool:
    return module == "norm_out.linear" or module == f"transformer_blocks.{last_block}.norm1_context.linear"


def mmdit_to_ldm(state: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """diffusers SD3Transformer2DModel state dict -> original keys (with ``model.diffusion_model.``)."""
    out: dict[str, torch.Tensor] = {}
    last = num_layers - 1
    for key, value in state.items():
        if key == "pos_embed.pos_embed":
            out[PREFIX + "pos_embed"] = value
            continue
        module, _, param = key.rpartition(".")
        if _swapped(module, last):
            value = _swap_halves(value)
        if module in _TOP:
            out[f"{PREFIX}{_TOP[module]}.{param}"] = value
            continue
        m = re.match(r"transformer_blocks\.(\d+)\.(.+)$", module)
        if not m:
            raise KeyError(f"unexpected SD3 key {key}")
        i, inner = m.group(1), m.group(2)
        if inner in _BLOCK:
            out[f"{PREFIX}joint_blocks.{i}.{_BLOCK[inner]}.{param}"] = value
    for i in range(num_layers):
        for fused, parts in _FUSED.items():
            names = [f"transformer_blocks.{i}.{p}" for p in parts]
            for param in ("weight", "bias"):
                if f"{names[0]}.{param}" in state:
                    out[f"{PREFIX}joint_blocks.{i}.{fused}.{param}"] = torch.cat(
                        [state[f"{n}.{param}"] for n in names], dim=0)
    return out


def mmdit_from_ldm(state: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Original keys (prefix removed) -> diffusers SD3Transformer2DModel names."""
    top = {v: k for k, v in _TOP.items()}
    block = {v: k for k, v in _BLOCK.items()}
    last = num_layers - 1
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "pos_embed":
            out["pos_embed.pos_embed"] = value
            continue
        module, _, param = key.rpartition(".")
        m = re.match(r"joint_blocks\.(\d+)\.(.+)$", module)
        if m and m.group(2) in _FUSED:
            for name, part in zip(_FUSED[m.group(2)], value.chunk(3, dim=0)):
                out[f"transformer_blocks.{m.group(1)}.{name}.{param}"] = part.clone()
            continue
        if m:
            target = f"transformer_blocks.{m.group(1)}.{block[m.group(2)]}"
        elif module in top:
            target = top[module]
        else:
            raise KeyError(f"unexpected SD3 key {key}")
        out[f"{target}.{param}"] = _swap_halves(value) if _swapped(target, last) else value
    return out


def infer_mmdit_config(state: Mapping[str, torch.Tensor]) -> dict:
    """SD3Transformer2DModel config from original keys (prefix removed): SD3 Medium, SD3.5 Medium
    (qk norm, dual-attention blocks) and Large, and narrow test models alike. Heads are 64 wide
    (8 wide below 64, for test models)."""
    proj = state["x_embedder.proj.weight"]
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("joint_blocks.")})
    heads = hidden // 64 if hidden >= 64 else max(1, hidden // 8)
    dual = tuple(i for i in layers if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in state)
    return {
        "sample_size": 128,
        "patch_size": patch,
        "in_channels": in_channels,
        "num_layers": len(layers),
        "attention_head_dim": hidden // heads,
        "num_attention_heads": heads,
        "joint_attention_dim": state["context_embedder.weight"].shape[1],
        "caption_projection_dim": state["context_embedder.weight"].shape[0],
        "pooled_projection_dim": state["y_embedder.mlp.0.weight"].shape[1],
        "out_channels": state["final_layer.linear.weight"].shape[0] // (patch * patch),
        "pos_embed_max_size": int(math.isqrt(state["pos_embed"].shape[1])),
        "qk_norm": "rms_norm" if "joint_blocks.0.x_block.attn.ln_q.weight" in state else None,
        "dual_attention_layers": dual,
    }
