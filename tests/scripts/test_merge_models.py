"""tools/merge_models.py: the weighted sum of checkpoints tensor by tensor (the merged UNet equals the
same sum of the inputs' UNets, as diffusers' from_single_file reads it), --unet_only, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.models.sd3_loading import save_sd3_single_file
from library.models.sd_loading import save_sd_single_file
from library.models.tiny import make_tiny_sd1, make_tiny_sd3
from library.utils.errors import UserError
from tests.conftest import assert_own_hashes
from tools import merge_models


def test_weighted_sum_and_unet_only(tmp_path):
    a, b = make_tiny_sd1(seed=0), make_tiny_sd1(seed=1)
    save_sd_single_file(tmp_path / "a.safetensors", a)
    save_sd_single_file(tmp_path / "b.safetensors", b)
    merge_models.main(["--models", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--ratios", "0.25",
                       "0.75", "--output", str(tmp_path / "ab.safetensors")])
    assert_own_hashes(tmp_path / "ab.safetensors")
    from diffusers import UNet2DConditionModel

    a.unet.save_config(str(tmp_path / "cfg"))
    merged = UNet2DConditionModel.from_single_file(str(tmp_path / "ab.safetensors"), config=str(tmp_path / "cfg"))
    ua, ub = a.unet.state_dict(), b.unet.state_dict()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, 0.25 * ua[key] + 0.75 * ub[key], rtol=1e-6, atol=1e-7)
    with safe_open(str(tmp_path / "ab.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["merge_recipe"])[1] == {"model": "b.safetensors", "ratio": 0.75}
    merge_models.main(["--models", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--unet_only",
                       "--output", str(tmp_path / "u.safetensors")])
    first, second, only = (load_file(str(tmp_path / n)) for n in ("a.safetensors", "b.safetensors", "u.safetensors"))
    for key, value in only.items():
        if key.startswith("model.diffusion_model."):
            torch.testing.assert_close(value, 0.5 * first[key] + 0.5 * second[key])
        else:
            assert torch.equal(value, first[key]), key


def test_merge_models_bad_input(tmp_path):
    save_sd_single_file(tmp_path / "sd1.safetensors", make_tiny_sd1(seed=0))
    save_sd3_single_file(tmp_path / "sd3.safetensors", make_tiny_sd3(seed=0))
    cases = [
        (["--models", str(tmp_path / "sd1.safetensors"), str(tmp_path / "sd3.safetensors")],
         "--models are of different architectures"),
        (["--models", str(tmp_path / "sd1.safetensors"), str(tmp_path / "sd1.safetensors"), "--ratios", "1"],
         "--ratios: 1 values for 2 --models"),
        (["--models", str(tmp_path / "sd1.safetensors")], "give two or more checkpoints"),
    ]
    for argv, message in cases:
        with pytest.raises(UserError, match=message):
            merge_models.main([*argv, "--output", str(tmp_path / "out.safetensors")])
    with pytest.raises(UserError, match="is one of the inputs"):
        merge_models.main(["--models", str(tmp_path / "sd1.safetensors"), str(tmp_path / "sd1.safetensors"),
                           "--output", str(tmp_path / "sd1.safetensors")])
