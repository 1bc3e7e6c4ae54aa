"""LyCORIS's default preset (``full``) on diffusers' UNets: it reaches time_embedding.linear_1/2 both
through its TimestepEmbedding class and by name, and lycoris itself stops on the duplicated module
name; through our seam every module it means is built once."""

from __future__ import annotations

import pytest

from library.config.training_config import NetworkConfig
from library.families.base import LoadedModels
from library.models.tiny import make_tiny_sd1, make_tiny_sdxl
from library.training.network_setup import build_network

lycoris = pytest.importorskip("lycoris.kohya")


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_full_preset_builds_every_module_once(family):
    if family == "sd":
        t = make_tiny_sd1(seed=0)
        models = LoadedModels(t.unet, t.vae, [t.text_encoder], [t.tokenizer])
    else:
        t = make_tiny_sdxl(seed=0)
        models = LoadedModels(t.unet, t.vae, [t.text_encoder_1, t.text_encoder_2], [t.tokenizer_1, t.tokenizer_2])
    with pytest.raises(AssertionError, match="duplicated lora name"):  # lycoris on its own
        te = models.text_encoders[0] if family == "sd" else models.text_encoders
        lycoris.create_network(1.0, 4, 1, None, te, models.denoiser, algo="loha")
    adapter = build_network(NetworkConfig("lycoris.kohya", 4, 1, {"algo": "loha"}, None, True, True), models, False)
    names = [m.lora_name for m in adapter.net.loras]
    assert len(names) == len(set(names))
    assert {"lora_unet_time_embedding_linear_1", "lora_unet_time_embedding_linear_2", "lora_unet_conv_in"} <= set(names)
