"""SDXL single files in the original (SGM) layout: loading from shapes, bit-exact round trip, and
agreement with diffusers' converters; the real architecture's key names on the meta device."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint
from safetensors.torch import load_file

from library.models import sd_keys
from library.models.sdxl_loading import load_sdxl_single_file, save_sdxl_single_file
from library.models.tiny import make_tiny_sdxl
from library.utils.errors import UserError


def test_round_trip_is_bit_exact(tmp_path):
    parts = make_tiny_sdxl(seed=2)
    path = tmp_path / "xl.safetensors"
    save_sdxl_single_file(path, parts)
    original = load_file(str(path))
    for key in ("model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.input_blocks.3.1.proj_in.weight",
                "conditioner.embedders.0.transformer.text_model.encoder.layers.1.mlp.fc2.weight",
                "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
                "conditioner.embedders.1.model.text_projection", "first_stage_model.encoder.conv_in.weight"):
        assert key in original, key
    loaded = load_sdxl_single_file(path)
    for name in ("unet", "vae", "text_encoder_1", "text_encoder_2"):
        a, b = getattr(parts, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    assert loaded.unet.config.addition_embed_type == "text_time" and loaded.unet.config.addition_time_embed_dim == 8
    save_sdxl_single_file(tmp_path / "again.safetensors", loaded)
    again = load_file(str(tmp_path / "again.safetensors"))
    assert set(again) == set(original) and all(torch.equal(again[k], original[k]) for k in original)


def test_agrees_with_diffusers_converters(tmp_path):
    parts = make_tiny_sdxl(seed=1)
    ldm = sd_keys.unet_to_ldm(parts.unet.state_dict(), parts.unet.config)
    ref = convert_ldm_unet_checkpoint(dict(ldm), dict(parts.unet.config))
    ours = parts.unet.state_dict()
    assert set(ref) == set(ours) and all(torch.equal(ref[k], ours[k]) for k in ours)
    path = tmp_path / "xl.safetensors"
    save_sdxl_single_file(path, parts)
    from transformers import CLIPTextModelWithProjection
    te2_ref = convert_open_clip_checkpoint(CLIPTextModelWithProjection(parts.text_encoder_2.config),
                                           load_file(str(path)), prefix="conditioner.embedders.1.model.")
    ref_state = te2_ref if isinstance(te2_ref, dict) else te2_ref.state_dict()
    for key, value in parts.text_encoder_2.state_dict().items():
        assert torch.equal(ref_state[key], value), key


def test_real_sdxl_unet_key_names():
    cfg = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
               transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048, attention_head_dim=[5, 10, 20],
               use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
               projection_class_embeddings_input_dim=2816)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    ldm = sd_keys.unet_to_ldm(unet.state_dict(), unet.config)
    for key in ("model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight",
                "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.bias",
                "model.diffusion_model.output_blocks.2.1.transformer_blocks.9.norm3.weight",
                "model.diffusion_model.output_blocks.8.0.skip_connection.weight",
                "model.diffusion_model.label_emb.0.2.weight", "model.diffusion_model.input_blocks.6.0.op.weight"):
        assert key in ldm, key


def test_sd1_file_is_refused(tmp_path, tiny_sd1):
    from library.models.sd_loading import save_sd_single_file

    save_sd_single_file(tmp_path / "sd1.safetensors", tiny_sd1)
    with pytest.raises(UserError, match="not an SDXL checkpoint .*looks like: sd1"):
        load_sdxl_single_file(tmp_path / "sd1.safetensors")


def test_diffusers_folder_and_ckpt_round_trip(tmp_path):
    """save_sdxl_diffusers writes a folder StableDiffusionXLPipeline opens and our loader reads back
    bit for bit; a .ckpt single file holds the same tensors as the .safetensors one."""
    from diffusers import StableDiffusionXLPipeline

    from library.models.sdxl_loading import load_sdxl_model, save_sdxl_diffusers

    parts = make_tiny_sdxl(seed=3)
    save_sdxl_diffusers(tmp_path / "xl", parts)
    loaded = load_sdxl_model(str(tmp_path / "xl"))
    for name in ("unet", "vae", "text_encoder_1", "text_encoder_2"):
        a, b = getattr(parts, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    assert loaded.tokenizer_2.pad_token == "!" and loaded.tokenizer_1("a b").input_ids == \
        parts.tokenizer_1("a b").input_ids
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "xl"))
    assert torch.equal(pipe.unet.state_dict()["conv_in.weight"], parts.unet.state_dict()["conv_in.weight"])
    save_sdxl_diffusers(tmp_path / "xl16", parts, dtype=torch.float16)
    assert load_sdxl_model(str(tmp_path / "xl16"), torch.float32).unet.conv_in.weight.dtype == torch.float32

    save_sdxl_single_file(tmp_path / "xl.safetensors", parts)
    save_sdxl_single_file(tmp_path / "xl.ckpt", parts)
    a = load_file(str(tmp_path / "xl.safetensors"))
    b = torch.load(str(tmp_path / "xl.ckpt"), weights_only=True)["state_dict"]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    from_ckpt = load_sdxl_single_file(tmp_path / "xl.ckpt")
    assert torch.equal(from_ckpt.unet.conv_in.weight, parts.unet.conv_in.weight)


def test_sd1_folder_is_refused_by_the_sdxl_loader(tmp_path, tiny_sd1):
    from library.models.sd_loading import save_sd_diffusers
    from library.models.sdxl_loading import load_sdxl_model

    save_sd_diffusers(tmp_path / "sd1", tiny_sd1)
    with pytest.raises(UserError, match="not an SDXL diffusers folder .*train_network.py"):
        load_sdxl_model(str(tmp_path / "sd1"))


def test_diffusers_from_single_file_reads_our_sdxl_file(tmp_path):
    from diffusers import AutoencoderKL

    parts = make_tiny_sdxl(seed=4)
    path = tmp_path / "xl.safetensors"
    save_sdxl_single_file(path, parts)
    parts.unet.save_config(str(tmp_path / "unet_cfg"))
    parts.vae.save_config(str(tmp_path / "vae_cfg"))
    unet = UNet2DConditionModel.from_single_file(str(path), config=str(tmp_path / "unet_cfg"))
    vae = AutoencoderKL.from_single_file(str(path), config=str(tmp_path / "vae_cfg"))
    for theirs, ours in ((unet, parts.unet), (vae, parts.vae)):
        state = ours.state_dict()
        assert all(torch.equal(theirs.state_dict()[k], state[k]) for k in state)
