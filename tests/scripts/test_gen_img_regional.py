"""Regional LoRA with AND sub-prompts: regions read as kohya reads them, and a region covering the
whole image gives what that sub-prompt with that LoRA alone gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.sampling.regional import region_masks, split_prompt
from tests.scripts.test_gen_img_tricks import _gen, _pixels


def test_region_masks_channels_and_colour_codes():
    image = Image.new("RGB", (4, 2), (0, 0, 0))
    for x, colour in enumerate([(255, 0, 0), (0, 255, 0), (255, 255, 0), (0, 0, 255)]):
        image.putpixel((x, 0), colour)
    by_channel = region_masks(image, 4, None, 4, 2)
    assert by_channel[0][0].tolist() == [1, 0, 1, 0] and by_channel[2][0].tolist() == [0, 0, 0, 1]
    assert torch.equal(by_channel[3], torch.ones(2, 4))  # the fourth LoRA: the whole image
    codes = region_masks(image, 5, 4, 4, 2)  # 1 red, 2 green, 3 yellow, 4 blue
    assert [m[0].tolist() for m in codes[:4]] == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert torch.equal(codes[4], torch.ones(2, 4))
    assert split_prompt("a cat AND a dog AND sky") == ["a cat", "a dog", "sky"]


@pytest.fixture(scope="module")
def setup(tiny_default, tmp_path_factory):
    """The tiny SD1 model and two LoRAs on the attention/projection layers (no time-embedding
    layers, whose update regional LoRA shares between the LoRAs)."""
    from library.families.sd import SDFamily
    from networks import lora

    sd1 = str(tiny_default / "model" / "tiny-sd15.safetensors")
    out = tmp_path_factory.mktemp("regional")
    paths = []
    for seed in (1, 2):
        models = SDFamily().load(sd1, torch.float32, None)
        net = lora.create_network(1.0, 4, 4, None, models.text_encoders[0], models.denoiser)
        torch.manual_seed(seed)
        for m in net.all_loras():
            torch.nn.init.normal_(m.lora_up.weight, std=0.5)
        path = out / f"region{seed}.safetensors"
        net.save_weights(str(path), torch.float32, {})
        paths.append(str(path))
    for name, colour in (("red", (255, 0, 0)), ("green", (0, 255, 0))):
        Image.new("RGB", (64, 64), colour).save(out / f"{name}.png")
    halves = Image.new("RGB", (64, 64), (255, 0, 0))
    halves.paste((0, 255, 0), (32, 0, 64, 64))
    halves.save(out / "halves.png")
    return sd1, paths, out


def _image(sd1: str, out: Path, prompt: str, *args: str) -> np.ndarray:
    assert _gen("--ckpt", sd1, "--prompt", prompt, "--W", "64", "--H", "64", "--steps", "3", "--seed", "4",
                "--sampler", "euler", "--outdir", str(out), "--sequential_file_name", *args) == 0
    return _pixels(out / "im_000001.png")


def test_a_whole_image_region_equals_its_sub_prompt_and_lora_alone(setup, tmp_path):
    sd1, (one, two), files = setup
    both = ("--network_weights", one, two, "--network_mul", "0.8", "0.6", "--scale", "1")  # scale 1: no CFG
    prompt = "red circle AND blue square on grass"
    first = _image(sd1, tmp_path / "r0", prompt, *both, "--mask_path", str(files / "red.png"))
    alone = _image(sd1, tmp_path / "a0", "red circle", "--network_weights", one, "--network_mul", "0.8",
                   "--scale", "1")
    assert np.abs(first - alone).max() <= 2
    second = _image(sd1, tmp_path / "r1", prompt, *both, "--mask_path", str(files / "green.png"))
    alone2 = _image(sd1, tmp_path / "a1", "blue square on grass", "--network_weights", two, "--network_mul", "0.6",
                    "--scale", "1")
    assert np.abs(second - alone2).max() <= 2
    halves = _image(sd1, tmp_path / "h", prompt, *both, "--mask_path", str(files / "halves.png"))
    assert np.abs(halves - first).max() > 5 and np.abs(halves - second).max() > 5


def test_regional_with_guidance_colour_codes_and_bad_lines(setup, tmp_path, capsys):
    sd1, (one, two), files = setup
    flags = ("--network_weights", one, two, "--mask_path", str(files / "halves.png"))
    a = _image(sd1, tmp_path / "a", "red circle AND blue square --n ugly", *flags)
    assert np.array_equal(a, _image(sd1, tmp_path / "b", "red circle AND blue square --n ugly", *flags))
    codes = _image(sd1, tmp_path / "c", "red circle AND blue square --n ugly", *flags,
                   "--network_regional_mask_max_color_codes", "2")
    assert np.abs(codes - a).max() <= 2  # pure red and green: codes 1 and 2 are the R and G channels
    code = _gen("--ckpt", sd1, "--prompt", "just one prompt", "--W", "64", "--H", "64", "--steps", "2",
                "--outdir", str(tmp_path / "d"), *flags)
    assert code == 1 and "one sub-prompt per LoRA" in capsys.readouterr().err
    assert _gen("--ckpt", sd1, "--prompt", "x AND y", "--outdir", str(tmp_path / "e"), *flags,
                "--network_pre_calc") == 2
    assert "--network_pre_calc cannot be used with regional LoRA" in capsys.readouterr().err
    assert _gen("--ckpt", sd1, "--prompt", "x", "--outdir", str(tmp_path / "f"),
                "--network_regional_mask_max_color_codes", "2") == 2
    assert "is for regional LoRA" in capsys.readouterr().err


def test_sdxl_whole_image_region_equals_its_lora_alone(tiny_family_models, tmp_path):
    """The same check on SDXL (two text encoders, pooled text and size conditioning)."""
    from library.families.sdxl import SDXLFamily
    from networks import lora

    xl = str(tiny_family_models["sdxl"])
    paths = []
    for seed in (1, 2):
        models = SDXLFamily().load(xl, torch.float32, None)
        net = lora.create_network(1.0, 4, 4, None, models.text_encoders, models.denoiser)
        torch.manual_seed(seed)
        for m in net.all_loras():
            torch.nn.init.normal_(m.lora_up.weight, std=0.5)
        net.save_weights(str(tmp_path / f"xl{seed}.safetensors"), torch.float32, {})
        paths.append(str(tmp_path / f"xl{seed}.safetensors"))
    Image.new("RGB", (64, 64), (255, 0, 0)).save(tmp_path / "red.png")
    regional = _image(xl, tmp_path / "r", "red circle AND blue square", "--network_weights", *paths,
                      "--network_mul", "0.8", "0.6", "--scale", "1", "--mask_path", str(tmp_path / "red.png"))
    alone = _image(xl, tmp_path / "a", "red circle", "--network_weights", paths[0], "--network_mul", "0.8",
                   "--scale", "1")
    assert np.abs(regional - alone).max() <= 2
