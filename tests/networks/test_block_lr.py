"""Block-wise UNet learning rates (down/mid/up_lr_weight): kohya's block numbering for SD1 and SDXL
names, the presets, and the parameter groups they produce."""

import math

import pytest

from library.models.tiny import make_tiny_sdxl
from library.utils.errors import UserError
from networks import lora
from networks.block_lr import block_index, block_lr_weights, preset


@pytest.mark.parametrize("name, sgm, expected", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in", False, 1),
    ("lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn1_to_q", False, 5),
    ("lora_unet_down_blocks_0_downsamplers_0_conv", False, 3),
    ("lora_unet_mid_block_attentions_0_proj_in", False, 12),
    ("lora_unet_up_blocks_1_attentions_2_proj_out", False, 18),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", False, 15),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", False, -1),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", True, 5),
    ("lora_unet_middle_block_1_proj_in", True, 11),
    ("lora_unet_output_blocks_8_0_in_layers_2", True, 21),
])
def test_block_numbers(name, sgm, expected):
    assert block_index(name, sgm) == expected


def test_presets_and_lists():
    cos = preset("cosine", 12)
    assert cos[0] == pytest.approx(1.0) and cos[-1] == pytest.approx(0.0)
    assert cos[6] == pytest.approx(math.sin(math.pi * (5 / 11) / 2))
    assert preset("linear", 3) == [0.0, 0.5, 1.0] and preset("zeros+0.5", 2) == [0.5, 0.5]
    weights = block_lr_weights({"down_lr_weight": "0.1,0.2", "mid_lr_weight": "2", "block_lr_zero_threshold": "0.15"},
                               sgm=False)
    assert len(weights) == 25 and weights[:3] == [0.0, 0.2, 1.0] and weights[12] == 2.0 and weights[13:] == [1.0] * 12
    xl = block_lr_weights({"up_lr_weight": "zeros"}, sgm=True)
    assert len(xl) == 23 and xl[0] == xl[-1] == 1.0 and xl[13:22] == [0.0] * 9 and xl[1:13] == [1.0] * 12
    assert block_lr_weights({}, sgm=False) is None
    with pytest.raises(UserError, match="down_lr_weight=cosin: expected .* or a preset .cosine, sine"):
        block_lr_weights({"down_lr_weight": "cosin"}, sgm=False)


def test_groups_and_skipped_blocks_sd1(tiny_sd1):
    net = lora.create_network(1.0, 4, 1, None, tiny_sd1.text_encoder, tiny_sd1.unet, down_lr_weight="0,0",
                              mid_lr_weight="0.5")
    names = {m.lora_name for m in net.unet_loras}
    assert names and not any(n.startswith("lora_unet_down_blocks_0_attentions_0_") for n in names)  # block 1: 0
    assert any(n.startswith("lora_unet_mid_block_") for n in names)
    groups, group_names = net.prepare_optimizer_params(None, 1e-3, 1e-4)
    lr = dict(zip(group_names, (g["lr"] for g in groups)))
    assert lr["unet block12"] == pytest.approx(5e-4) and lr["textencoder"] == 1e-4
    assert all(v == 1e-3 for k, v in lr.items() if k.startswith("unet block") and k != "unet block12")
    counted = sum(len(g["params"]) for g in groups)
    assert counted == len(list(net.parameters()))  # every parameter is in exactly one group


def test_sdxl_output_side_off():
    parts = make_tiny_sdxl(seed=0)
    net = lora.create_network(1.0, 4, 1, None, [parts.text_encoder_1, parts.text_encoder_2], parts.unet,
                              up_lr_weight="zeros")
    names = {m.lora_name for m in net.unet_loras}
    assert names and not any(n.startswith("lora_unet_output_blocks_") for n in names)
