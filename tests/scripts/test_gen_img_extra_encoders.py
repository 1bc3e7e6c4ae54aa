"""--clip_vision_strength (SDXL img2img's pooled text from the init image) and --replace_clip_l14_336
(SD1's text encoder swapped), with tiny local models in the layouts transformers saves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.scripts.test_gen_img_tricks import _gen, _pixels


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = tmp_path_factory.mktemp("clip_vision")
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    CLIPVisionModelWithProjection(config).save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return str(folder)


def test_clip_vision_strength_replaces_sdxl_pooled_text(tiny_family_models, vision_model, tmp_path, capsys):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from library.generation.extra_encoders import ClipVisionPooled

    init = Image.new("RGB", (64, 64), (200, 60, 20))
    init.save(tmp_path / "init.png")
    xl = str(tiny_family_models["sdxl"])

    def one(out, *extra):
        assert _gen("--ckpt", xl, "--prompt", "red circle", "--W", "64", "--H", "64", "--steps", "4", "--seed", "2",
                    "--image_path", str(tmp_path / "init.png"), "--strength", "0.7", "--outdir", str(tmp_path / out),
                    "--sequential_file_name", *extra) == 0
        return _pixels(tmp_path / out / "im_000001.png")

    plain = one("plain")
    full = one("full", "--clip_vision_model", vision_model, "--clip_vision_strength", "1")
    half = one("half", "--clip_vision_model", vision_model, "--clip_vision_strength", "0.5")
    assert np.abs(full - plain).max() > 0 and np.abs(half - full).max() > 0
    assert np.array_equal(full, one("again", "--clip_vision_model", vision_model, "--clip_vision_strength", "1"))
    # the pooled embedding is the image's projection times the strength
    pooled = ClipVisionPooled(vision_model, 0.5, torch.device("cpu"), torch.float32)([init], torch.zeros(1, 32))
    model = CLIPVisionModelWithProjection.from_pretrained(vision_model)
    pixels = CLIPImageProcessor.from_pretrained(vision_model)(images=[init], return_tensors="pt").pixel_values
    with torch.no_grad():
        assert torch.allclose(pooled, model(pixel_values=pixels).image_embeds * 0.5, atol=1e-6)
    assert _gen("--ckpt", xl, "--prompt", "x", "--outdir", str(tmp_path / "t2i"), "--clip_vision_model", vision_model,
                "--clip_vision_strength", "1") == 2
    assert "--clip_vision_strength: for SDXL img2img (--image_path)" in capsys.readouterr().err


def test_replace_clip_l14_336(tiny_default, tiny_family_models, tmp_path, capsys):
    from transformers import CLIPTextModel

    from library.models.tiny import tiny_clip_config
    from library.models.tiny_tokenizer import build_tiny_clip_tokenizer

    vocab = len(build_tiny_clip_tokenizer())
    torch.manual_seed(5)
    CLIPTextModel(tiny_clip_config(vocab)).save_pretrained(str(tmp_path / "l336"))
    CLIPTextModel(tiny_clip_config(vocab, hidden=64)).save_pretrained(str(tmp_path / "wide"))
    sd1 = str(tiny_default / "model" / "tiny-sd15.safetensors")

    def one(out, *extra):
        return _gen("--ckpt", sd1, "--prompt", "red circle", "--W", "64", "--H", "64", "--steps", "3", "--seed", "2",
                    "--outdir", str(tmp_path / out), "--sequential_file_name", *extra)

    assert one("plain") == 0 and one("swapped", "--replace_clip_l14_336", "--clip_l14_336_model",
                                     str(tmp_path / "l336")) == 0
    assert np.abs(_pixels(tmp_path / "plain" / "im_000001.png") -
                  _pixels(tmp_path / "swapped" / "im_000001.png")).max() > 5
    assert one("wide", "--replace_clip_l14_336", "--clip_l14_336_model", str(tmp_path / "wide")) == 2
    assert "is 64 wide, this model's text encoder 32" in capsys.readouterr().err
    assert _gen("--ckpt", str(tiny_family_models["sdxl"]), "--prompt", "x", "--outdir", str(tmp_path / "xl"),
                "--replace_clip_l14_336") == 2
    assert "replaces SD1's CLIP-L text encoder; not for sdxl" in capsys.readouterr().err
    assert one("missing", "--replace_clip_l14_336", "--clip_l14_336_model", str(tmp_path / "nothing")) == 2
    assert "could not load it" in capsys.readouterr().err
