"""gen_img.py's ControlNet on tiny SD1 and SDXL models: original-layout files (converted by
diffusers' converter, round-tripped exactly) and diffusers folders, strength, step ratio, canny
preprocessing, several ControlNets, img2img and highres fix, and what is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tests.scripts.test_gen_img_tricks import _gen, _pixels


def _random_controlnet(unet, seed: int):
    """A ControlNet shaped like ``unet`` whose zero convolutions are not zero (so it and its guide
    image act)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet)
    zero_initialised = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                        controlnet.controlnet_cond_embedding.conv_out]
    for conv in zero_initialised:
        torch.nn.init.normal_(conv.weight, std=0.2)
    return controlnet


@pytest.fixture(scope="module")
def setup(tiny_default, tmp_path_factory):
    from safetensors.torch import save_file

    from library.families.sd import SDFamily
    from library.models.tiny import controlnet_to_original_layout

    out = tmp_path_factory.mktemp("controlnet")
    sd1 = str(tiny_default / "model" / "tiny-sd15.safetensors")
    unet = SDFamily().load(sd1, torch.float32, None).denoiser
    controlnet = _random_controlnet(unet, 0)
    state = controlnet_to_original_layout(controlnet, unet.config)
    assert {"control_model.input_hint_block.0.weight", "control_model.zero_convs.0.0.weight",
            "control_model.middle_block_out.0.weight", "control_model.input_blocks.1.1.proj_in.weight"} <= set(state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "tiny_control.safetensors"))
    controlnet.save_pretrained(str(out / "tiny_control_diffusers"))
    save_file({k: v.contiguous() for k, v in controlnet_to_original_layout(_random_controlnet(unet, 1),
                                                                           unet.config).items()},
              str(out / "second.safetensors"))
    guide = Image.new("RGB", (64, 64), (0, 0, 0))
    ImageDraw.Draw(guide).rectangle((16, 16, 48, 48), fill=(255, 255, 255))
    guide.save(out / "guide.png")
    return sd1, out


def _one(sd1: str, out, *args: str, prompt: str = "red circle") -> np.ndarray:
    assert _gen("--ckpt", sd1, "--prompt", prompt, "--W", "64", "--H", "64", "--steps", "4", "--seed", "3",
                "--outdir", str(out), "--sequential_file_name", *args) == 0
    return _pixels(out / "im_000001.png")


def test_controlnet_strength_ratio_forms_and_preps(setup, tmp_path):
    sd1, files = setup
    cn = ("--control_net_models", str(files / "tiny_control.safetensors"), "--guide_image_path",
          str(files / "guide.png"))
    plain = _one(sd1, tmp_path / "plain")
    assert np.abs(_one(sd1, tmp_path / "zero", *cn, "--control_net_multipliers", "0") - plain).max() <= 1
    full = _one(sd1, tmp_path / "full", *cn)
    assert np.abs(full - plain).max() > 5 and np.array_equal(full, _one(sd1, tmp_path / "again", *cn))
    folder = _one(sd1, tmp_path / "folder", "--control_net_models", str(files / "tiny_control_diffusers"),
                  "--guide_image_path", str(files / "guide.png"))
    assert np.abs(folder - full).max() <= 1  # the same weights as a diffusers folder
    half = _one(sd1, tmp_path / "half", *cn, "--control_net_ratios", "0.5")
    assert np.abs(half - full).max() > 0 and np.abs(half - plain).max() > 0
    canny = _one(sd1, tmp_path / "canny", *cn, "--control_net_preps", "canny_63_191")
    assert np.abs(canny - full).max() > 0
    two = _one(sd1, tmp_path / "two", "--control_net_models", str(files / "tiny_control.safetensors"),
               str(files / "second.safetensors"), "--control_net_multipliers", "1", "0.5", "--guide_image_path",
               str(files / "guide.png"))
    assert np.abs(two - full).max() > 0


def test_canny_preprocessing_is_opencv_edges():
    import cv2

    from library.sampling.controlnet import preprocess

    image = Image.new("RGB", (32, 32), (0, 0, 0))
    ImageDraw.Draw(image).rectangle((8, 8, 24, 24), fill=(250, 250, 250))
    edges = np.asarray(preprocess(image, "canny_50_150"))
    expected = cv2.Canny(np.asarray(image), 50, 150)
    assert edges.shape == (32, 32, 3) and all(np.array_equal(edges[..., c], expected) for c in range(3))
    assert set(np.unique(edges)) == {0, 255}


def test_controlnet_with_img2img_highres_and_sdxl(setup, tiny_family_models, tmp_path):
    sd1, files = setup
    cn = ("--control_net_models", str(files / "tiny_control.safetensors"), "--guide_image_path",
          str(files / "guide.png"))
    Image.new("RGB", (64, 64), (40, 90, 160)).save(tmp_path / "init.png")
    assert _one(sd1, tmp_path / "i2i", *cn, "--image_path", str(tmp_path / "init.png"), "--strength", "0.6").shape \
        == (64, 64, 3)
    assert _gen("--ckpt", sd1, "--prompt", "red circle", "--W", "128", "--H", "128", "--steps", "3", "--seed", "3",
                "--highres_fix_scale", "0.5", "--highres_fix_steps", "3", "--outdir", str(tmp_path / "hr"), *cn) == 0
    assert _gen("--ckpt", sd1, "--prompt", "red circle", "--W", "128", "--H", "128", "--steps", "3", "--seed", "3",
                "--highres_fix_scale", "0.5", "--highres_fix_steps", "3", "--highres_fix_disable_control_net",
                "--outdir", str(tmp_path / "hr_off"), *cn) == 0
    assert np.abs(_pixels(next((tmp_path / "hr").glob("*.png"))) -
                  _pixels(next((tmp_path / "hr_off").glob("*.png")))).max() > 0
    from library.families.sdxl import SDXLFamily

    xl = str(tiny_family_models["sdxl"])
    _random_controlnet(SDXLFamily().load(xl, torch.float32, None).denoiser, 2).save_pretrained(str(tmp_path / "xlcn"))
    plain = _one(xl, tmp_path / "xl_plain")
    guided = _one(xl, tmp_path / "xl_cn", "--control_net_models", str(tmp_path / "xlcn"), "--guide_image_path",
                  str(files / "guide.png"))
    assert np.abs(guided - plain).max() > 5


def test_controlnet_refusals(setup, tiny_family_models, tmp_path, capsys):
    sd1, files = setup
    model = str(files / "tiny_control.safetensors")
    assert _gen("--ckpt", sd1, "--prompt", "x", "--outdir", str(tmp_path / "a"), "--control_net_models", model) == 2
    assert "--control_net_models needs --guide_image_path" in capsys.readouterr().err
    assert _gen("--ckpt", sd1, "--prompt", "x", "--outdir", str(tmp_path / "b"), "--control_net_models", model,
                "--guide_image_path", str(files / "guide.png"), "--control_net_preps", "sobel") == 2
    assert "--control_net_preps sobel: use none, canny" in capsys.readouterr().err
    assert _gen("--ckpt", str(tiny_family_models["sd3"]), "--prompt", "x", "--outdir", str(tmp_path / "c"),
                "--control_net_models", model, "--guide_image_path", str(files / "guide.png")) == 2
    assert "ControlNet is available for SD1/SD2/SDXL models, not sd3" in capsys.readouterr().err
    code = _gen("--ckpt", sd1, "--prompt", "x --dsd1 2", "--W", "64", "--H", "64", "--steps", "2",
                "--outdir", str(tmp_path / "d"), "--control_net_models", model, "--guide_image_path",
                str(files / "guide.png"))
    assert code == 1 and "ControlNet cannot be combined with Deep Shrink" in capsys.readouterr().err
    xl = str(tiny_family_models["sdxl"])
    assert _gen("--ckpt", xl, "--prompt", "x", "--W", "64", "--H", "64", "--outdir", str(tmp_path / "e"),
                "--control_net_models", model, "--guide_image_path", str(files / "guide.png")) == 2
    assert "does not fit this model's UNet" in capsys.readouterr().err
