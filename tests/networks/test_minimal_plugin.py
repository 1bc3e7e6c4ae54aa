"""docs/architecture.md's "Adding a network plug-in", followed: a module with only the four methods
training needs (tests/networks/minimal_plugin.py) trains through train_network.py and generates
through gen_img.py, the adapter supplying every other method's default."""

from __future__ import annotations

import numpy as np
from safetensors.torch import load_file

from tests.conftest import run_script, tiny_train_args
from tests.scripts.test_gen_img import _gen, _pixels

MODULE = "tests.networks.minimal_plugin"


def test_a_minimal_plugin_trains_and_generates(tiny_default, tmp_path):
    run_script("train_network.py", *tiny_train_args(tiny_default, tmp_path / "train", "--network_module", MODULE,
                                                      "--learning_rate", "0.05", "--max_train_steps", "2",
                                                      "--output_name", "bias"), check=True)
    trained = tmp_path / "train" / "bias.safetensors"
    assert load_file(str(trained))["bias"].abs().max() > 0.01  # it trained
    sd1 = str(tiny_default / "model" / "tiny-sd15.safetensors")
    common = ("--ckpt", sd1, "--prompt", "red circle", "--W", "64", "--H", "64", "--steps", "3", "--seed", "3",
              "--sequential_file_name")
    assert _gen(*common, "--outdir", str(tmp_path / "plain")) == 0
    assert _gen(*common, "--outdir", str(tmp_path / "bias"), "--network_module", MODULE,
                "--network_weights", str(trained)) == 0
    # no set_multiplier: strength 1 is accepted, another strength is refused with the reason
    assert _gen(*common, "--outdir", str(tmp_path / "half"), "--network_module", MODULE,
                "--network_weights", str(trained), "--network_mul", "0.5") == 1
    plain, bias = (_pixels(tmp_path / d / "im_000001.png") for d in ("plain", "bias"))
    assert np.abs(plain - bias).max() > 0
    assert not list((tmp_path / "half").glob("*.png"))
