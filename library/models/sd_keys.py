"""Key maps between diffusers module names and the original (ldm) single-file layout for SD1.x/2.x.

One table per model serves both directions: loading renames ldm -> diffusers, saving renames
diffusers -> ldm. The tables are generated from the diffusers config, so they hold for any width
or depth (real models and the tiny test models alike). diffusers' own ldm -> diffusers converters
are the independent reference the tests compare against.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "cond_stage_model.transformer."

# resnet sub-modules: diffusers name -> ldm name
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_block_map(block_out_channels, layers_per_block: int, up_block_types,
                   size_conditioning: bool = False) -> dict[str, str]:
    """Map diffusers UNet block prefixes to ldm prefixes (``down_blocks.0.resnets.0`` -> ``input_blocks.1.0``).
    ``size_conditioning`` adds SDXL's size/pooled-text embedding (``add_embedding`` <-> ``label_emb.0``)."""
    per_level = layers_per_block + 1
    levels = len(block_out_channels)
    m = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
         "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
         "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
         "mid_block.resnets.1": "middle_block.2"}
    if size_conditioning:
        m["add_embedding.linear_1"] = "label_emb.0.0"
        m["add_embedding.linear_2"] = "label_emb.0.2"
    for i in range(levels):
        for j in range(layers_per_block):
            m[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{per_level * i + j + 1}.0"
            m[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{per_level * i + j + 1}.1"
        if i < levels - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{per_level * (i + 1)}.0.op"
        for j in range(per_level):
            m[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{per_level * i + j}.0"
            m[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{per_level * i + j}.1"
        if i < levels - 1:
            slot = 2 if "CrossAttn" in up_block_types[i] else 1
            m[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{per_level * i + layers_per_block}.{slot}.conv"
    return m


def vae_block_map(num_levels: int, layers_per_block: int) -> dict[str, str]:
    """Map diffusers AutoencoderKL block prefixes to ldm prefixes."""
    m = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out",
         "encoder.mid_block.attentions.0": "encoder.mid.attn_1", "decoder.mid_block.attentions.0": "decoder.mid.attn_1"}
    for part in ("encoder", "decoder"):
        m[f"{part}.mid_block.resnets.0"] = f"{part}.mid.block_1"
        m[f"{part}.mid_block.resnets.1"] = f"{part}.mid.block_2"
    for i in range(num_levels):
        for j in range(layers_per_block):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        ldm_level = num_levels - 1 - i  # the decoder's levels are stored in reverse order
        for j in range(layers_per_block + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{ldm_level}.block.{j}"
        m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{ldm_level}.upsample.conv"
    return m


def _rename(key: str, block_map: Mapping[str, str], inner_maps: Mapping[str, Mapping[str, str]]) -> str:
    """Rename one key by its longest matching block prefix, then rename the part after the prefix
    with the inner map of the block's kind (the kind is read from the diffusers side of the pair)."""
    for prefix in _prefixes(key):
        if prefix in block_map:
            target = block_map[prefix]
            rest = key[len(prefix) + 1:]
            for kind, inner in inner_maps.items():
                if kind in prefix or kind in target:
                    for src, dst in inner.items():
                        if rest.startswith(src + "."):
                            rest = dst + rest[len(src):]
                            break
            return f"{target}.{rest}"
    return key


def _unet_map(config) -> dict[str, str]:
    return unet_block_map(config.block_out_channels, config.layers_per_block, config.up_block_types,
                          getattr(config, "addition_embed_type", None) == "text_time")


def unet_to_ldm(state: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel state dict -> ldm ``model.diffusion_model.*`` keys."""
    block_map = _unet_map(config)
    inner = {"resnets": _UNET_RESNET}
    return {UNET_PREFIX + _rename(k, block_map, inner): v for k, v in state.items()}


def unet_module_to_ldm(path: str, config) -> str:
    """A diffusers UNet module path -> its ldm/SGM path (``down_blocks.1.attentions.0.proj_in`` ->
    ``input_blocks.4.1.proj_in``); used for kohya's SDXL LoRA names."""
    return _rename(path + ".weight", _unet_map(config), {"resnets": _UNET_RESNET})[: -len(".weight")]


def unet_from_ldm(state: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """ldm UNet keys (prefix already removed) -> diffusers names (inverse of :func:`unet_to_ldm`)."""
    block_map = _unet_map(config)
    inner = {"resnets": _invert(_UNET_RESNET)}
    return {_rename(k, _invert(block_map), inner): v for k, v in state.items()}


def vae_to_ldm(state: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> ldm ``first_stage_model.*`` keys (attention as 1x1 convs)."""
    block_map = vae_block_map(len(config.block_out_channels), config.layers_per_block)
    out = {}
    for key, value in state.items():
        new = _rename(key, block_map, {"resnets": _VAE_RESNET, "attentions": _VAE_ATTN})
        if ".attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)
        out[VAE_PREFIX + new] = value
    return out


def vae_from_ldm(state: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """ldm VAE keys (prefix removed) -> diffusers names; 1x1-conv attention weights become linear."""
    inverse = _invert(vae_block_map(len(config.block_out_channels), config.layers_per_block))
    out = {}
    for key, value in state.items():
        new = _rename(key, inverse, {"resnets": _invert(_VAE_RESNET), "attentions": _invert(_VAE_ATTN)})
        if ".attentions." in new and new.endswith(".weight") and value.ndim == 4:
            value = value.reshape(value.shape[0], value.shape[1])
        out[new] = value
    return out


def clip_to_ldm(state: Mapping[str, torch.Tensor], prefix: str = CLIP_L_PREFIX) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel keys -> ldm keys. transformers 5 dropped the ``text_model.``
    level from CLIPTextModel; the file layout keeps it, so it is added back here."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


def clip_from_ldm(state: Mapping[str, torch.Tensor], model_keys) -> dict[str, torch.Tensor]:
    """ldm CLIP keys (prefix removed) -> the names ``model_keys`` uses (with or without ``text_model.``)."""
    flat = not any(k.startswith("text_model.") for k in model_keys)
    out = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue  # a buffer some files carry; the model rebuilds it
        out[key[len("text_model."):] if flat and key.startswith("text_model.") else key] = value
    return out


def _invert(m: Mapping[str, str]) -> dict[str, str]:
    return {v: k for k, v in m.items()}


def _prefixes(key: str):
    parts = key.split(".")
    return (".".join(parts[:cut]) for cut in range(len(parts) - 1, 0, -1))


OPEN_CLIP_PREFIX = "cond_stage_model.model."
_OPEN_CLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def open_clip_from_ldm(state: Mapping[str, torch.Tensor], keep_layers: int,
                       flat: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """SD2's OpenCLIP text tower (``cond_stage_model.model.*``, prefix removed) -> transformers
    CLIPTextModel names for the first ``keep_layers`` layers (SD2 uses the penultimate layer, so the
    last one is not part of the model). The fused attention ``in_proj`` is split into q, k, v.

    Returns (converted, unused): ``unused`` holds the tensors the model does not use (the last
    layer, ``text_projection``, ``logit_scale``) so a saved file can carry them unchanged."""
    pre = "" if flat else "text_model."
    out, unused = {}, {}
    for key, value in state.items():
        if key == "token_embedding.weight":
            out[f"{pre}embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out[f"{pre}embeddings.position_embedding.weight"] = value
        elif key.startswith("ln_final."):
            out[f"{pre}final_layer_norm.{key[len('ln_final.'):]}"] = value
        elif key.startswith("transformer.resblocks."):
            index, rest = key[len("transformer.resblocks."):].split(".", 1)
            if int(index) >= keep_layers:
                unused[key] = value
                continue
            layer = f"{pre}encoder.layers.{index}."
            if rest.startswith("attn.in_proj_"):
                kind = rest[len("attn.in_proj_"):]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{layer}self_attn.{name}.{kind}"] = part.clone()
                continue
            for src, dst in _OPEN_CLIP_LAYER.items():
                if rest.startswith(src + "."):
                    out[layer + dst + rest[len(src):]] = value
                    break
            else:
                unused[key] = value
        else:
            unused[key] = value
    return out, unused


def open_clip_to_ldm(state: Mapping[str, torch.Tensor],
                     unused: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`open_clip_from_ldm` (q, k, v fused again; the unused tensors put back)."""
    flat = {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in state.items()}
    out = {OPEN_CLIP_PREFIX + k: v for k, v in unused.items()}
    layer_map = {v: k for k, v in _OPEN_CLIP_LAYER.items()}
    for key, value in flat.items():
        if key == "embeddings.token_embedding.weight":
            out[OPEN_CLIP_PREFIX + "token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out[OPEN_CLIP_PREFIX + "positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out[OPEN_CLIP_PREFIX + "ln_final." + key[len("final_layer_norm."):]] = value
        elif key.startswith("encoder.layers."):
            index, rest = key[len("encoder.layers."):].split(".", 1)
            block = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{index}."
            if rest.startswith("self_attn.q_proj."):
                kind = rest.rsplit(".", 1)[1]
                qkv = [flat[f"encoder.layers.{index}.self_attn.{n}.{kind}"] for n in ("q_proj", "k_proj", "v_proj")]
                out[f"{block}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
                continue
            for dst, src in layer_map.items():
                if rest.startswith(dst + "."):
                    out[block + src + rest[len(dst):]] = value
                    break
    return out
