"""ControlNet-LLLite in gen_img.py: the modules kohya's SDXL files name (checked on SDXL's real
layout, built on the meta device), the hooked layer's maths, and generation with a tiny SDXL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from library.sampling.lllite import PREFIX, LLLite, LLLiteModule, lllite_targets
from tests.scripts.test_gen_img_tricks import _gen, _pixels


def test_targets_on_sdxl_are_kohyas_136_modules():
    from diffusers import UNet2DConditionModel

    from bench.bench_sdxl_train_step import SDXL_UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    targets = lllite_targets(unet)
    # input blocks 4, 5 (2 transformer blocks each), 7, 8 and the middle block (10 each): 34 blocks x 4 layers
    assert len(targets) == 136
    assert targets[PREFIX + "input_blocks_4_1_transformer_blocks_0_attn1_to_q"] == (
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 2)
    assert targets[PREFIX + "input_blocks_8_1_transformer_blocks_9_attn2_to_q"][1] == 3
    assert targets[PREFIX + "middle_block_1_transformer_blocks_3_attn1_to_v"][1] == 3
    assert not any("attn2_to_k" in n or "attn2_to_v" in n or "to_out" in n or "output_blocks" in n for n in targets)


def _random_lllite_state(unet, seed: int, cond_dim: int = 8, mlp_dim: int = 8) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    layers = dict(unet.named_modules())
    state = {}
    for name, (path, depth) in lllite_targets(unet).items():
        module = LLLiteModule(depth, layers[path].in_features, cond_dim, mlp_dim)
        torch.nn.init.normal_(module.up[0].weight, std=0.5)  # kohya initialises it to zero
        state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    return state


def test_hooked_layer_adds_the_lllite_update(tiny_family_models):
    from library.families.sdxl import SDXLFamily

    unet = SDXLFamily().load(str(tiny_family_models["sdxl"]), torch.float32, None).denoiser
    state = _random_lllite_state(unet, 0)
    name = PREFIX + "input_blocks_3_1_transformer_blocks_0_attn1_to_k"  # tiny SDXL: level 1 is input block 3
    assert f"{name}.conditioning1.2.weight" in state and f"{name}.up.0.weight" in state
    network = LLLite(unet, state, "test")
    path, depth = lllite_targets(unet)[name]
    layer, module = dict(unet.named_modules())[path], network.hooked[name]
    guide = torch.rand(2, 3, 64, 64) * 2 - 1
    x = torch.randn(4, 16, layer.in_features)  # CFG batch: 2 images twice; 64 px -> 4 x 4 tokens at level 1
    with torch.no_grad():
        plain = layer(x)
        network.set_cond_image(guide)
        network.set_multiplier(0.5)
        hooked = layer(x)
        emb = module.conditioning1(guide).flatten(2).transpose(1, 2).repeat(2, 1, 1)
        w1, b1 = state[f"{name}.down.0.weight"], state[f"{name}.down.0.bias"]
        w2, b2 = state[f"{name}.mid.0.weight"], state[f"{name}.mid.0.bias"]
        w3, b3 = state[f"{name}.up.0.weight"], state[f"{name}.up.0.bias"]
        down = torch.relu(x @ w1.T + b1)
        mid = torch.relu(torch.cat([emb, down], dim=-1) @ w2.T + b2)
        expected = torch.nn.functional.linear(x + 0.5 * (mid @ w3.T + b3), layer.weight, layer.bias)
        network.set_cond_image(None)
        off = layer(x)
    assert depth == 2 and emb.shape == (4, 16, 8)
    assert torch.allclose(hooked, expected, atol=1e-5)
    assert torch.equal(off, plain)  # no guide: the layer is untouched


def test_generation_with_lllite(tiny_family_models, tmp_path, capsys):
    from safetensors.torch import save_file

    from library.families.sdxl import SDXLFamily

    xl = str(tiny_family_models["sdxl"])
    unet = SDXLFamily().load(xl, torch.float32, None).denoiser
    save_file(_random_lllite_state(unet, 1), str(tmp_path / "lllite.safetensors"))
    guide = Image.new("RGB", (64, 64), (0, 0, 0))
    ImageDraw.Draw(guide).ellipse((12, 12, 52, 52), fill=(255, 255, 255))
    guide.save(tmp_path / "guide.png")
    flags = ("--control_net_lllite_models", str(tmp_path / "lllite.safetensors"), "--guide_image_path",
             str(tmp_path / "guide.png"))

    def one(out, *args):
        assert _gen("--ckpt", xl, "--prompt", "red circle", "--W", "64", "--H", "64", "--steps", "4", "--seed", "5",
                    "--sampler", "euler", "--outdir", str(tmp_path / out), "--sequential_file_name", *args) == 0
        return _pixels(tmp_path / out / "im_000001.png")

    plain, full = one("plain"), one("full", *flags)
    assert np.abs(full - plain).max() > 5 and np.array_equal(full, one("again", *flags))
    assert np.array_equal(one("zero", *flags, "--control_net_multipliers", "0"), plain)
    half = one("half", *flags, "--control_net_ratios", "0.25")  # off after the first of 4 steps
    assert np.abs(half - full).max() > 0 and np.abs(half - plain).max() > 0
    assert np.abs(one("canny", *flags, "--control_net_preps", "canny") - full).max() > 0


@pytest.mark.parametrize("extra, message", [
    (("--control_net_models", "x.safetensors"), "not both"),
    (("--control_net_ratios", "0.5", "0.5"), "--control_net_ratios: at most one value per --control_net_lllite_models"),
])
def test_lllite_flag_errors(tiny_family_models, tmp_path, capsys, extra, message):
    xl = str(tiny_family_models["sdxl"])
    assert _gen("--ckpt", xl, "--prompt", "x", "--outdir", str(tmp_path / "o"), "--control_net_lllite_models",
                str(tmp_path / "l.safetensors"), "--guide_image_path", str(tmp_path / "g.png"), *extra) == 2
    assert message in capsys.readouterr().err


def test_lllite_refused_for_sd1(tiny_default, tmp_path, capsys):
    Image.new("RGB", (64, 64)).save(tmp_path / "g.png")
    sd1 = str(tiny_default / "model" / "tiny-sd15.safetensors")
    assert _gen("--ckpt", sd1, "--prompt", "x", "--outdir", str(tmp_path / "o"), "--control_net_lllite_models",
                str(tmp_path / "l.safetensors"), "--guide_image_path", str(tmp_path / "g.png")) == 2
    assert "ControlNet-LLLite files are for SDXL models, not sd" in capsys.readouterr().err
