"""networks.lora_sd3: kohya's SD3 names on the original MMDiT layout, fused q/k/v, per-layer ranks,
block selection, and merging into the original-layout weights (what ComfyUI does) converted to
diffusers by diffusers' own converter."""

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

from library.models import sd3_keys
from library.models.tiny import make_tiny_sd3
from library.utils.errors import UserError
from networks import lora_sd3


def _net(parts, **args):
    return lora_sd3.create_network(1.0, 4, 2, None, [parts.clip_l, parts.clip_g, parts.t5xxl], parts.transformer,
                                   **args)


def _inputs():
    torch.manual_seed(11)
    return dict(hidden_states=torch.randn(2, 16, 8, 8), encoder_hidden_states=torch.randn(2, 10, 128),
                pooled_projections=torch.randn(2, 64), timestep=torch.tensor([100.0, 700.0]))


@pytest.mark.parametrize("medium35", [False, True])
def test_default_modules_names_and_shapes(medium35):
    parts = make_tiny_sd3(seed=0, sd35_medium=medium35)
    net = _net(parts)
    names = {m.lora_name: m for m in net.unet_loras}
    qkv = names["lora_unet_joint_blocks_0_x_block_attn_qkv"]
    assert qkv.lora_down.weight.shape == (4, 32) and qkv.lora_up.weight.shape == (96, 4)
    for suffix in ("x_block_attn_proj", "x_block_mlp_fc1", "x_block_mlp_fc2", "x_block_adaLN_modulation_1",
                   "context_block_attn_qkv", "context_block_attn_proj", "context_block_mlp_fc1",
                   "context_block_adaLN_modulation_1"):
        assert f"lora_unet_joint_blocks_0_{suffix}" in names, suffix
    last = {n for n in names if n.startswith("lora_unet_joint_blocks_2_")}
    assert "lora_unet_joint_blocks_2_context_block_attn_proj" not in last  # the last block is context-pre-only
    assert "lora_unet_joint_blocks_2_context_block_adaLN_modulation_1" in last
    assert ("lora_unet_joint_blocks_1_x_block_attn2_qkv" in names) == medium35
    assert not any("embedder" in n for n in names)  # emb_dims default: the final layer only
    assert names["lora_unet_final_layer_linear"].lora_down.weight.shape[0] == 4
    assert "lora_unet_final_layer_adaLN_modulation_1" in names
    kohya_default = _net(parts, emb_dims="[0,0,0,0,0,0]")
    assert not any("final_layer" in m.lora_name for m in kohya_default.unet_loras)
    te = {m.lora_name for m in net.text_encoder_loras}
    assert any(n.startswith("lora_te1_text_model_encoder_layers_0_") for n in te)
    assert any(n.startswith("lora_te2_text_model_encoder_layers_1_") for n in te)
    assert not any(n.startswith("lora_te3_") for n in te)


def test_layer_dims_emb_dims_and_blocks():
    parts = make_tiny_sd3(seed=0)
    net = _net(parts, x_attn_dim="0", context_mlp_dim="2", emb_dims="[1,2,3,4,5,6]", train_block_indices="0,2",
               train_t5xxl="True")
    ranks = {m.lora_name: m.lora_down.weight.shape[0] for m in net.unet_loras}
    assert not any("x_block_attn" in n for n in ranks)
    assert ranks["lora_unet_joint_blocks_0_context_block_mlp_fc1"] == 2
    assert ranks["lora_unet_joint_blocks_0_x_block_mlp_fc1"] == 4
    assert not any(n.startswith("lora_unet_joint_blocks_1_") for n in ranks)
    assert {n: ranks[n] for n in ranks if not n.startswith("lora_unet_joint")} == {
        "lora_unet_context_embedder": 1, "lora_unet_t_embedder_mlp_0": 2, "lora_unet_t_embedder_mlp_2": 2,
        "lora_unet_x_embedder_proj": 3, "lora_unet_y_embedder_mlp_0": 4, "lora_unet_y_embedder_mlp_2": 4,
        "lora_unet_final_layer_adaLN_modulation_1": 5, "lora_unet_final_layer_linear": 6}
    te = [m.lora_name for m in net.text_encoder_loras]
    assert any(n.startswith("lora_te3_encoder_block_0_layer_0_SelfAttention_q") for n in te)
    none = _net(parts, train_block_indices="none", emb_dims="[0,0,0,0,0,0]")
    assert {m.lora_name for m in none.unet_loras} == set()


@pytest.mark.parametrize("args, message", [
    ({"train_block_indices": "0,5"}, "outside this model's blocks 0-2"),
    ({"train_block_indices": "1-x"}, "not an index or a range"),
    ({"emb_dims": "[1,2,3]"}, "expected 6 numbers"),
    ({"x_attn_dims": "4"}, "unknown key"),
])
def test_bad_network_args(args, message):
    with pytest.raises(UserError, match=message):
        _net(make_tiny_sd3(seed=0), **args)


@pytest.mark.parametrize("medium35", [False, True])
def test_keys_name_original_weights_and_merge_there_equals_ours(medium35):
    parts = make_tiny_sd3(seed=0, sd35_medium=medium35)
    net = _net(parts, emb_dims="[2,2,2,2,2,2]")
    net.apply_to([parts.clip_l, parts.clip_g], parts.transformer, apply_text_encoder=False)
    torch.manual_seed(3)
    for m in net.all_loras():
        torch.nn.init.normal_(m.lora_up.weight, std=0.2)
    inputs = _inputs()
    with torch.no_grad():
        ours = parts.transformer(**inputs).sample
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}

    base = make_tiny_sd3(seed=0, sd35_medium=medium35).transformer
    ldm = sd3_keys.mmdit_to_ldm(base.state_dict(), base.config.num_layers)
    by_flat = {k[len(sd3_keys.PREFIX):].replace(".", "_"): k for k in ldm}
    for name in {k.split(".")[0] for k in state}:
        key = by_flat[name[len("lora_unet_"):] + "_weight"]  # every LoRA names a weight of the original layout
        up, down = state[f"{name}.lora_up.weight"], state[f"{name}.lora_down.weight"]
        weight = ldm[key]
        assert (up.shape[0], down.shape[1]) == tuple(weight.shape[:2]), name
        if weight.ndim == 4:  # x_embedder: a 2x2 patch conv
            delta = torch.einsum("or,rikl->oikl", up.flatten(1), down)
        else:
            delta = up @ down
        ldm[key] = weight + state[f"{name}.alpha"] / down.shape[0] * delta
    merged = type(base)(**base.config)
    merged.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(dict(ldm)))
    with torch.no_grad():
        reference = merged.eval()(**inputs).sample
        plain = base(**inputs).sample
    scale = reference.abs().max()
    assert (ours - reference).abs().max() / scale < 1e-5
    assert (reference - plain).abs().max() / scale > 0.01


def test_from_weights_round_trip(tmp_path):
    parts = make_tiny_sd3(seed=0)
    net = _net(parts, context_mod_dim="2", emb_dims="[0,0,0,0,3,0]")
    torch.manual_seed(4)
    for m in net.all_loras():
        torch.nn.init.normal_(m.lora_up.weight, std=0.1)
    path = tmp_path / "sd3_lora.safetensors"
    net.save_weights(str(path), torch.float32, {})
    fresh = make_tiny_sd3(seed=0)
    loaded, _ = lora_sd3.create_network_from_weights(1.0, str(path), None, [fresh.clip_l, fresh.clip_g],
                                                     fresh.transformer)
    assert {m.lora_name: m.lora_down.weight.shape for m in loaded.all_loras()} == \
        {m.lora_name: m.lora_down.weight.shape for m in net.all_loras()}
    loaded.load_weights(str(path))
    a, b = net.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
