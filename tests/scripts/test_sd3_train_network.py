"""sd3_train_network.py end to end on tiny SD3 / SD3.5-Medium-layout models: files, kohya SD3 names,
metadata, samples, exact resume, block swap giving the same LoRA, options, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import run_in_process, run_script

SCRIPT = "sd3_train_network.py"


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_sd3")
    run_script("tools/make_tiny_default.py", "--out", str(out), "--family", "sd3", check=True)
    return out


def _args(tiny: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(tiny / "model" / "tiny-sd3.safetensors"),
            "--dataset_config", str(tiny / "dataset.toml"), "--output_dir", str(out), "--seed", "3",
            "--network_dim", "4", "--learning_rate", "2e-3", "--t5xxl_max_token_length", "16",
            "--console_log_level", "WARNING", *extra]


@pytest.fixture(scope="module")
def sd3_run(tiny_sd3, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sd3_run")
    run_script(SCRIPT, *_args(tiny_sd3, out, "--output_name", "s3", "--max_train_steps", "6", "--save_every_n_steps",
                              "3", "--save_state", "--weighting_scheme", "logit_normal", "--training_shift", "3",
                              "--sample_prompts", str(tiny_sd3 / "prompts.txt"), "--sample_every_n_steps", "6",
                              "--network_args", "emb_dims=[2,0,0,2,0,0]", "--save_lora_format", "diffusers"),
               check=True)
    return out


def test_files_keys_and_metadata(sd3_run):
    assert sorted(p.name for p in sd3_run.glob("*.safetensors")) == ["s3-step00000003.safetensors", "s3.safetensors"]
    with safe_open(str(sd3_run / "s3.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    for key in ("lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight",
                "lora_unet_joint_blocks_2_context_block_adaLN_modulation_1.alpha",
                "lora_unet_context_embedder.lora_down.weight", "lora_unet_y_embedder_mlp_2.lora_down.weight",
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                "lora_te2_text_model_encoder_layers_1_mlp_fc2.lora_up.weight"):
        assert key in keys, key
    assert meta["ss_base_model_version"] == "sd3_medium"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-medium/lora"
    assert meta["ss_network_module"] == "networks.lora_sd3" and meta["ss_weighting_scheme"] == "logit_normal"
    assert meta["ss_training_shift"] == "3.0"
    folder = sd3_run / "s3-diffusers"
    assert {p.name for p in folder.iterdir()} == {"pytorch_lora_weights.safetensors", "adapter_config.json",
                                                  "adapter_model.safetensors"}


def test_samples(sd3_run):
    samples = sorted((sd3_run / "sample").glob("*.png"))
    assert len(samples) == 2 and Image.open(samples[0]).size == (64, 64)


def test_resume_from_state_is_exact(sd3_run, tiny_sd3, tmp_path):
    run_script(SCRIPT, *_args(tiny_sd3, tmp_path, "--output_name", "s3", "--max_train_steps", "6",
                              "--weighting_scheme", "logit_normal", "--training_shift", "3",
                              "--network_args", "emb_dims=[2,0,0,2,0,0]",
                              "--resume", str(sd3_run / "s3-step00000003-state")), check=True)
    a, b = load_file(str(sd3_run / "s3.safetensors")), load_file(str(tmp_path / "s3.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_block_swap_trains_the_same_lora(tiny_sd3, tmp_path):
    common = ("--max_train_steps", "3", "--network_train_unet_only")
    run_script(SCRIPT, *_args(tiny_sd3, tmp_path / "plain", *common), check=True)
    run_script(SCRIPT, *_args(tiny_sd3, tmp_path / "swap", *common, "--blocks_to_swap", "1"), check=True)
    a = load_file(str(tmp_path / "plain" / "last.safetensors"))
    b = load_file(str(tmp_path / "swap" / "last.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_sd35_medium_options(tmp_path):
    """An SD3.5-Medium-layout model (qk norm, dual attention) with the SD3.5 positional-embedding
    options, per-encoder dropout, attention masks, T5 kept apart, cached text outputs."""
    from library.models.sd3_loading import save_sd3_single_file
    from library.models.tiny import make_tiny_sd3

    model = tmp_path / "model"
    model.mkdir()
    parts = make_tiny_sd3(seed=1, sd35_medium=True)
    save_sd3_single_file(model / "tiny-sd35m.safetensors", parts)
    for folder, key in (("tokenizer", "clip_l"), ("tokenizer_2", "clip_g"), ("tokenizer_3", "t5xxl")):
        parts.tokenizers[key].save_pretrained(str(model / folder))
    run_script("tools/make_tiny_default.py", "--out", str(tmp_path / "data"), "--family", "sd1", check=True)
    args = ["--pretrained_model_name_or_path", str(model / "tiny-sd35m.safetensors"),
            "--dataset_config", str(tmp_path / "data" / "dataset.toml"), "--output_dir", str(tmp_path / "out"),
            "--max_train_steps", "3", "--t5xxl_max_token_length", "16", "--console_log_level", "WARNING"]
    run_script(SCRIPT, *args, "--pos_emb_random_crop_rate", "0.5", "--enable_scaled_pos_embed",
               "--clip_l_dropout_rate", "0.3", "--t5_dropout_rate", "0.3", "--apply_lg_attn_mask",
               "--apply_t5_attn_mask", "--t5xxl_dtype", "bf16", "--weighting_scheme", "mode",
               "--ip_noise_gamma", "0.1", check=True)
    with safe_open(str(tmp_path / "out" / "last.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_up.weight" in keys
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    run_script(SCRIPT, *args, "--output_name", "cached", "--network_train_unet_only",
               "--cache_text_encoder_outputs", "--clip_g_dropout_rate", "0.5", check=True)
    assert (tmp_path / "out" / "cached.safetensors").is_file()


@pytest.mark.parametrize("extra, message", [
    (("--network_args", "train_block_indices=0-7"), "outside this model's blocks 0-2"),
    (("--network_args", "emb_dims=[1,2]"), "expected 6 numbers"),
    (("--network_module", "networks.lora"), "for SD3 use networks.lora_sd3"),
    (("--noise_offset", "0.05"), "--noise_offset: not used by SD3"),
    (("--blocks_to_swap", "2", "--cpu_offload_checkpointing"), "cannot be combined with --blocks_to_swap"),
    (("--blocks_to_swap", "5"), "swap 1 to 1"),
    (("--weighting_scheme", "bogus"), "invalid choice"),
])
def test_bad_input(tiny_sd3, tmp_path, extra, message):
    proc = run_in_process(SCRIPT, *_args(tiny_sd3, tmp_path, "--max_train_steps", "1", *extra))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_wrong_files(tiny_sd3, tiny_default, tmp_path):
    from library.models.sd3_loading import load_sd3_single_file, save_sd3_single_file

    proc = run_in_process(SCRIPT, *_args(tiny_sd3, tmp_path, "--max_train_steps", "1"),
                      "--pretrained_model_name_or_path", str(tiny_default / "model" / "tiny-sd15.safetensors"))
    assert proc.returncode == 2 and "not an SD3 checkpoint" in proc.stderr and "train_network.py" in proc.stderr
    bare = tmp_path / "bare.safetensors"
    save_sd3_single_file(bare, load_sd3_single_file(tiny_sd3 / "model" / "tiny-sd3.safetensors"),
                         bundle_text_encoders=False)
    proc = run_in_process(SCRIPT, *_args(tiny_sd3, tmp_path, "--max_train_steps", "1"),
                      "--pretrained_model_name_or_path", str(bare))
    assert proc.returncode == 2 and "no bundled clip_l and clip_g: pass --clip_l <file> --clip_g <file>" in proc.stderr
