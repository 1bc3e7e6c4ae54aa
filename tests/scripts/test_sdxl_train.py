"""sdxl_train.py: SDXL's own weights on the one trainer. --block_lr's 23 blocks (hand-checked
names; a block at rate 0 keeps its bytes), each text encoder at its own rate (0 freezes it), the
saved single file as diffusers' from_single_file reads it, and a frozen-encoder run with cached
text outputs written as a diffusers folder that StableDiffusionXLPipeline opens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_script

UNET = "model.diffusion_model."


@pytest.fixture(scope="module")
def tiny_sdxl(tiny_family_models) -> Path:
    """The session's tiny SDXL folder (model, dataset, dataset TOML, prompts); runs write elsewhere."""
    return tiny_family_models["sdxl"].parent.parent


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(data / "model" / "tiny-sdxl.safetensors"), "--dataset_config",
            str(data / "dataset.toml"), "--output_dir", str(out), "--max_train_steps", "3", "--learning_rate", "1e-3",
            "--seed", "4", "--console_log_level", "WARNING", *extra]


def test_block_lr_indices_follow_kohyas_blocks():
    """On SDXL base's own UNet architecture (built on the meta device: no weights)."""
    from diffusers import UNet2DConditionModel

    from bench.bench_sdxl_train_step import SDXL_UNET
    from library.families.sdxl import SDXLFamily

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    models = type("M", (), {"denoiser": unet})()
    index = {name: SDXLFamily().block_lr_index(models, name) for name, _ in unet.named_parameters()}
    assert index["time_embedding.linear_1.weight"] == 0 and index["add_embedding.linear_2.bias"] == 0
    assert index["conv_in.weight"] == 1  # input_blocks.0
    assert index["down_blocks.1.attentions.0.proj_in.weight"] == 1 + 4  # input_blocks.4
    assert index["down_blocks.1.downsamplers.0.conv.weight"] == 1 + 6  # input_blocks.6
    assert index["mid_block.resnets.1.conv1.weight"] == 10 + 2  # middle_block.2
    assert index["mid_block.attentions.0.proj_out.weight"] == 10 + 1  # middle_block.1
    assert index["up_blocks.0.resnets.0.conv1.weight"] == 13 + 0  # output_blocks.0
    assert index["up_blocks.2.resnets.2.conv1.weight"] == 13 + 8  # output_blocks.8
    assert index["conv_out.weight"] == 22 and index["conv_norm_out.weight"] == 22
    assert set(index.values()) == set(range(23))


def test_sdxl_full_training_by_block_and_encoder(tiny_sdxl, tmp_path):
    rates = ["1e-3"] * 10 + ["0"] * 3 + ["1e-3"] * 10  # the middle block frozen
    run_script("sdxl_train.py", *_args(tiny_sdxl, tmp_path, "--train_text_encoder", "--learning_rate_te2", "0",
                                       "--block_lr", ",".join(rates)), check=True)
    base = load_file(str(tiny_sdxl / "model" / "tiny-sdxl.safetensors"))
    tuned = load_file(str(tmp_path / "last.safetensors"))

    def changed(prefix: str) -> bool:
        return any(not torch.equal(base[k], tuned[k]) for k in base if k.startswith(prefix))

    assert changed(UNET + "input_blocks.") and changed(UNET + "output_blocks.") and changed(UNET + "time_embed.")
    assert not changed(UNET + "middle_block.")  # --block_lr 0
    assert changed("conditioner.embedders.0.")  # CLIP-L at --learning_rate
    assert not changed("conditioner.embedders.1.")  # OpenCLIP bigG at --learning_rate_te2 0
    assert not changed("first_stage_model.")
    from diffusers import UNet2DConditionModel

    from library.models.sdxl_loading import load_sdxl_single_file

    ours = load_sdxl_single_file(str(tmp_path / "last.safetensors"))
    ours.unet.save_config(str(tmp_path / "cfg"))
    theirs = UNet2DConditionModel.from_single_file(str(tmp_path / "last.safetensors"), config=str(tmp_path / "cfg"))
    mine = ours.unet.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in theirs.state_dict().items())


def test_frozen_encoders_cached_outputs_and_a_diffusers_folder(tiny_sdxl, tmp_path):
    run_script("sdxl_train.py", *_args(tiny_sdxl, tmp_path, "--cache_text_encoder_outputs", "--cache_latents",
                                       "--save_model_as", "diffusers_safetensors"), check=True)
    from diffusers import StableDiffusionXLPipeline

    from library.models.sdxl_loading import load_sdxl_single_file

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "last"))
    base = load_sdxl_single_file(str(tiny_sdxl / "model" / "tiny-sdxl.safetensors"))
    for mine, theirs in ((base.text_encoder_1, pipe.text_encoder), (base.text_encoder_2, pipe.text_encoder_2)):
        assert all(torch.equal(v, mine.state_dict()[k]) for k, v in theirs.state_dict().items())
    assert any(not torch.equal(v, base.unet.state_dict()[k]) for k, v in pipe.unet.state_dict().items())


def test_fused_optimizer_groups_give_the_plain_adamw_result(tiny_sdxl, tmp_path):
    """--fused_optimizer_groups 4: AdamW steps the model a part at a time inside backward; without
    clipping each tensor gets the same update as in the plain step, bit for bit. CLIP-L's last
    layer gets no gradient (SDXL reads its penultimate layer), so its part is completed after
    backward."""
    common = ("--train_text_encoder", "--optimizer_type", "AdamW", "--max_grad_norm", "0")
    run_script("sdxl_train.py", *_args(tiny_sdxl, tmp_path / "plain", *common), check=True)
    run_script("sdxl_train.py", *_args(tiny_sdxl, tmp_path / "groups", *common, "--fused_optimizer_groups", "4"),
               check=True)
    plain, groups = (load_file(str(tmp_path / n / "last.safetensors")) for n in ("plain", "groups"))
    base = load_file(str(tiny_sdxl / "model" / "tiny-sdxl.safetensors"))
    assert any(not torch.equal(base[k], plain[k]) for k in plain if k.startswith("conditioner.embedders.0."))
    assert all(torch.equal(plain[k], groups[k]) for k in plain)
