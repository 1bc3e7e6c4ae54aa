"""networks/convert_lora.py: kohya -> diffusers/PEFT -> kohya keeps every module's update (SD1, SDXL,
SD3), diffusers' load_lora_weights reads the converted file with the same effect as our LoRA, and
separate diffusers q/k/v LoRAs become kohya's fused SD3 module exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.models.sd3_loading import save_sd3_single_file
from library.models.sd_loading import save_sd_single_file
from library.models.sdxl_loading import save_sdxl_single_file
from library.models.tiny import make_tiny_sd1, make_tiny_sd3, make_tiny_sdxl
from library.utils.errors import UserError
from networks import convert_lora, lora, lora_sd3
from networks.lora_merge import lora_modules, update_of
from tests.conftest import assert_own_hashes

FAMILIES = {
    "sd1": (lambda: make_tiny_sd1(seed=0), save_sd_single_file, lambda p: ([p.text_encoder], p.unet), lora),
    "sdxl": (lambda: make_tiny_sdxl(seed=0), save_sdxl_single_file,
             lambda p: ([p.text_encoder_1, p.text_encoder_2], p.unet), lora),
    "sd3": (lambda: make_tiny_sd3(seed=0), save_sd3_single_file, lambda p: ([p.clip_l, p.clip_g, p.t5xxl],
                                                                           p.transformer), lora_sd3),
}


def _kohya_lora(name: str, tmp_path):
    make, save, parts_of, module = FAMILIES[name]
    parts = make()
    save(tmp_path / "model.safetensors", parts)
    tes, denoiser = parts_of(parts)
    net = module.create_network(1.0, 4, 2, None, tes[0] if len(tes) == 1 else tes, denoiser,
                                **({"conv_dim": "2"} if name == "sd1" else {}))
    torch.manual_seed(3)
    for m in net.all_loras():
        torch.nn.init.normal_(m.lora_up.weight, std=0.2)
    net.save_weights(str(tmp_path / "kohya.safetensors"), None, {})
    return parts


@pytest.mark.parametrize("name", ["sd1", "sdxl", "sd3"])
def test_kohya_to_diffusers_and_back_keeps_every_update(name, tmp_path):
    _kohya_lora(name, tmp_path)
    model = str(tmp_path / "model.safetensors")
    convert_lora.main(["--model", str(tmp_path / "kohya.safetensors"), "--sd_model", model,
                       "--save_to", str(tmp_path / "diffusers.safetensors")])
    peft = load_file(str(tmp_path / "diffusers.safetensors"))
    assert_own_hashes(tmp_path / "diffusers.safetensors")
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in peft)
    convert_lora.main(["--model", str(tmp_path / "diffusers.safetensors"), "--sd_model", model,
                       "--save_to", str(tmp_path / "back.safetensors")])
    before = lora_modules(load_file(str(tmp_path / "kohya.safetensors")), "before")
    after = lora_modules(load_file(str(tmp_path / "back.safetensors")), "after")
    if name == "sd3":  # diffusers' loaders read no T5 LoRA: the diffusers form leaves it out
        before = {k: v for k, v in before.items() if not k.startswith("lora_te3")}
    assert set(after) == set(before)
    for key, value in before.items():
        torch.testing.assert_close(update_of(*after[key]), update_of(*value), rtol=1e-5, atol=1e-7)


def test_diffusers_reads_the_converted_file_as_we_do(tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    _kohya_lora("sd1", tmp_path)
    convert_lora.main(["--model", str(tmp_path / "kohya.safetensors"), "--sd_model",
                       str(tmp_path / "model.safetensors"), "--save_to", str(tmp_path / "folder")])
    ours = make_tiny_sd1(seed=0)
    net, _ = lora.create_network_from_weights(1.0, str(tmp_path / "kohya.safetensors"), None, ours.text_encoder,
                                              ours.unet)
    net.apply_to(ours.text_encoder, ours.unet)
    net.load_weights(str(tmp_path / "kohya.safetensors"))
    base = make_tiny_sd1(seed=0)
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=base.unet, scheduler=EulerDiscreteScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path / "folder"))
    torch.manual_seed(2)
    x, t, ids = torch.randn(1, 4, 8, 8), torch.tensor([300]), torch.arange(2, 12)[None]
    with torch.no_grad():
        mine = ours.unet(x, t, ours.text_encoder(ids).last_hidden_state).sample
        theirs = pipe.unet(x, t, pipe.text_encoder(ids).last_hidden_state).sample
    assert (theirs - mine).abs().max() / mine.abs().max() < 1e-5
    assert (tmp_path / "folder" / "adapter_config.json").is_file()


def test_separate_qkv_loras_become_kohyas_fused_module(tmp_path):
    parts = make_tiny_sd3(seed=0)
    save_sd3_single_file(tmp_path / "model.safetensors", parts)
    attn = parts.transformer.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(0)
    state, expected = {}, []
    for layer, rank in (("to_q", 2), ("to_k", 3), ("to_v", 1)):
        weight = getattr(attn, layer).weight
        a, b = torch.randn(rank, weight.shape[1], generator=g), torch.randn(weight.shape[0], rank, generator=g)
        state[f"transformer.transformer_blocks.0.attn.{layer}.lora_A.weight"] = a
        state[f"transformer.transformer_blocks.0.attn.{layer}.lora_B.weight"] = b
        expected.append(b @ a)
    save_file(state, str(tmp_path / "peft.safetensors"))
    convert_lora.main(["--model", str(tmp_path / "peft.safetensors"), "--sd_model",
                       str(tmp_path / "model.safetensors"), "--save_to", str(tmp_path / "kohya.safetensors")])
    (name, (down, up, alpha)), = lora_modules(load_file(str(tmp_path / "kohya.safetensors")), "k").items()
    assert name == "lora_unet_joint_blocks_0_x_block_attn_qkv" and down.shape[0] == 6 and alpha == 6
    torch.testing.assert_close(update_of(down, up, alpha), torch.cat(expected, 0), rtol=1e-5, atol=1e-6)


def test_convert_bad_input(tmp_path):
    _kohya_lora("sd1", tmp_path)
    make_sdxl = make_tiny_sdxl(seed=0)
    save_sdxl_single_file(tmp_path / "sdxl.safetensors", make_sdxl)
    with pytest.raises(UserError, match="--model is an SD1.x/2.x LoRA, --sd_model an SDXL checkpoint"):
        convert_lora.main(["--model", str(tmp_path / "kohya.safetensors"), "--sd_model",
                           str(tmp_path / "sdxl.safetensors"), "--save_to", str(tmp_path / "x.safetensors")])
    with pytest.raises(UserError, match="is the input file"):
        convert_lora.main(["--model", str(tmp_path / "kohya.safetensors"), "--sd_model",
                           str(tmp_path / "model.safetensors"), "--save_to", str(tmp_path / "kohya.safetensors")])
