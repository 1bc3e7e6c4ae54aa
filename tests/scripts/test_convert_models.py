"""tools/convert_diffusers20_original_sd.py: single file -> diffusers folder -> single file keeps every
tensor for SD1, SDXL and SD3; the folder opens in diffusers' own pipeline class; kohya's flags."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from library.models.sd3_loading import save_sd3_single_file
from library.models.sd_loading import save_sd_single_file
from library.models.sdxl_loading import save_sdxl_single_file
from library.models.tiny import make_tiny_sd1, make_tiny_sd3, make_tiny_sdxl
from library.utils.errors import UserError
from tests.conftest import assert_own_hashes
from tools import convert_diffusers20_original_sd as convert


def _single_file(name: str, folder):
    """A tiny single file with its tokenizers beside it (where the converter looks first)."""
    if name == "sd1":
        parts = make_tiny_sd1(seed=0)
        save_sd_single_file(folder / "model.safetensors", parts)
        parts.tokenizer.save_pretrained(str(folder / "tokenizer"))
        return "StableDiffusionPipeline"
    if name == "sdxl":
        parts = make_tiny_sdxl(seed=0)
        save_sdxl_single_file(folder / "model.safetensors", parts)
        parts.tokenizer_1.save_pretrained(str(folder / "tokenizer"))
        parts.tokenizer_2.save_pretrained(str(folder / "tokenizer_2"))
        return "StableDiffusionXLPipeline"
    parts = make_tiny_sd3(seed=0)
    save_sd3_single_file(folder / "model.safetensors", parts)
    for key, sub in (("clip_l", "tokenizer"), ("clip_g", "tokenizer_2"), ("t5xxl", "tokenizer_3")):
        parts.tokenizers[key].save_pretrained(str(folder / sub))
    return "StableDiffusion3Pipeline"


@pytest.mark.parametrize("name", ["sd1", "sdxl", "sd3"])
def test_single_file_to_folder_and_back(name, tmp_path):
    import diffusers

    pipeline = _single_file(name, tmp_path)
    convert.main([str(tmp_path / "model.safetensors"), str(tmp_path / "folder")])
    pipe = getattr(diffusers, pipeline).from_pretrained(str(tmp_path / "folder"))  # diffusers' own reader
    assert pipe is not None
    convert.main([str(tmp_path / "folder"), str(tmp_path / "again.safetensors")])
    assert_own_hashes(tmp_path / "again.safetensors")
    before, after = load_file(str(tmp_path / "model.safetensors")), load_file(str(tmp_path / "again.safetensors"))
    # SDXL's OpenCLIP logit_scale (unused by any pipeline) has no place in a diffusers folder
    lost = {"conditioner.embedders.1.model.logit_scale"} if name == "sdxl" else set()
    assert set(after) == set(before) - lost
    assert all(torch.equal(after[k], before[k]) for k in after)


def test_precision_reference_and_flags(tmp_path):
    _single_file("sd1", tmp_path)
    ref = tmp_path / "ref" / "scheduler"
    ref.mkdir(parents=True)
    (ref / "scheduler_config.json").write_text(json.dumps({"_class_name": "EulerDiscreteScheduler",
                                                           "num_train_timesteps": 1000}))
    convert.main([str(tmp_path / "model.safetensors"), str(tmp_path / "folder"), "--reference_model",
                  str(tmp_path / "ref"), "--save_precision_as", "fp16"])
    index = json.loads((tmp_path / "folder" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    unet = load_file(str(next((tmp_path / "folder" / "unet").glob("*.safetensors"))))
    assert {v.dtype for v in unet.values() if v.is_floating_point()} == {torch.float16}
    convert.main([str(tmp_path / "folder"), str(tmp_path / "m.ckpt"), "--epoch", "3", "--global_step", "1200"])
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["global_step"] == 1200 and "state_dict" in ckpt
    with pytest.raises(UserError, match="--v2 was given but .* is an SD1.x model"):
        convert.main([str(tmp_path / "model.safetensors"), str(tmp_path / "x"), "--v2"])
    with pytest.raises(UserError, match="both single files"):
        convert.main([str(tmp_path / "model.safetensors"), str(tmp_path / "x.safetensors")])
    with pytest.raises(UserError, match="--fp16 and --bf16: give one precision"):
        convert.main([str(tmp_path / "model.safetensors"), str(tmp_path / "x"), "--fp16", "--bf16"])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="mine: the folder exists and is not empty"):
        convert.main([str(tmp_path / "model.safetensors"), str(tmp_path / "mine")])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
