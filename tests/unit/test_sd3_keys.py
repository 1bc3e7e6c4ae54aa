"""SD3/SD3.5 MMDiT key conversion against diffusers' own converter, config from shapes, and the
real architectures' key names on the meta device."""

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

from library.models import sd3_keys

TINY = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=4,
            joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
            pos_embed_max_size=32)
VARIANTS = {"sd3-medium": {}, "sd3.5-medium": {"qk_norm": "rms_norm", "dual_attention_layers": (0, 1)},
            "sd3.5-large": {"qk_norm": "rms_norm"}}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_matches_diffusers(variant):
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**TINY, **VARIANTS[variant])
    state = model.state_dict()
    ldm = sd3_keys.mmdit_to_ldm(state, TINY["num_layers"])
    assert "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in ldm
    assert "model.diffusion_model.joint_blocks.2.context_block.attn.proj.weight" not in ldm  # last block: context only
    ref = convert_sd3_transformer_checkpoint_to_diffusers(dict(ldm))  # diffusers' original -> diffusers
    assert set(ref) == set(state) and all(torch.equal(ref[k], state[k]) for k in state)
    stripped = {k[len(sd3_keys.PREFIX):]: v for k, v in ldm.items()}
    back = sd3_keys.mmdit_from_ldm(stripped, TINY["num_layers"])
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    cfg = sd3_keys.infer_mmdit_config(stripped)
    for key in ("patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
                "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
                "pos_embed_max_size", "qk_norm"):
        assert cfg[key] == model.config[key], key
    assert tuple(cfg["dual_attention_layers"]) == tuple(model.config.dual_attention_layers)


def test_real_sd35_medium_key_names():
    cfg = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
               num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
               pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
               dual_attention_layers=tuple(range(13)))
    with torch.device("meta"):
        model = SD3Transformer2DModel(**cfg)
    ldm = sd3_keys.mmdit_to_ldm(model.state_dict(), 24)
    for key in ("joint_blocks.12.x_block.attn2.qkv.weight", "joint_blocks.23.context_block.adaLN_modulation.1.weight",
                "joint_blocks.0.context_block.attn.ln_k.weight", "final_layer.adaLN_modulation.1.bias", "pos_embed",
                "x_embedder.proj.weight", "t_embedder.mlp.2.weight", "y_embedder.mlp.0.weight"):
        assert sd3_keys.PREFIX + key in ldm, key
    assert sd3_keys.PREFIX + "joint_blocks.13.x_block.attn2.qkv.weight" not in ldm
    inferred = sd3_keys.infer_mmdit_config({k[len(sd3_keys.PREFIX):]: v for k, v in ldm.items()})
    assert inferred["num_attention_heads"] == 24 and inferred["dual_attention_layers"] == tuple(range(13))
    assert inferred["pos_embed_max_size"] == 384 and inferred["joint_attention_dim"] == 4096
