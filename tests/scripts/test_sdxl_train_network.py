"""sdxl_train_network.py end to end on a tiny SDXL-layout model: files, kohya SDXL names, metadata,
samples, exact resume, loading the LoRA back, text-encoder caches, fused backward, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import run_in_process, run_script

SCRIPT = "sdxl_train_network.py"


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_xl")
    run_script("tools/make_tiny_default.py", "--out", str(out), "--family", "sdxl", check=True)
    return out


def _args(tiny_xl: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(tiny_xl / "model" / "tiny-sdxl.safetensors"),
            "--dataset_config", str(tiny_xl / "dataset.toml"), "--output_dir", str(out), "--seed", "3",
            "--network_dim", "4", "--learning_rate", "2e-3", "--console_log_level", "WARNING", *extra]


@pytest.fixture(scope="module")
def xl_run(tiny_xl, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("xl_run")
    proc = run_script(SCRIPT, *_args(tiny_xl, out, "--output_name", "xl", "--max_train_steps", "6",
                                     "--save_every_n_steps", "3", "--save_state", "--lr_scheduler", "cosine",
                                     "--sample_prompts", str(tiny_xl / "prompts.txt"), "--sample_every_n_steps", "6",
                                     "--text_encoder_lr1", "1e-3", "--text_encoder_lr2", "5e-4",
                                     "--logging_dir", str(out / "logs")), check=True)
    return out, proc.stderr


def test_files_names_and_metadata(xl_run):
    out, stderr = xl_run
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["xl-step00000003.safetensors", "xl.safetensors"]
    with safe_open(str(out / "xl.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_middle_block_1_proj_out.alpha" in keys
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_1_") for k in keys)
    assert not any("down_blocks" in k or "up_blocks" in k for k in keys)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_text_encoder_lr"] == "[0.001, 0.0005]" and meta["ss_v2"] == "False"
    assert "below 512x512" in stderr  # the tiny default's 64 px images


def test_samples(xl_run):
    out, _ = xl_run
    samples = sorted((out / "sample").glob("*.png"))
    assert len(samples) == 2
    image = Image.open(samples[0])
    assert image.size == (64, 64) and "Seed: 1" in image.text["parameters"]


def test_every_used_part_learned(xl_run):
    state = load_file(str(xl_run[0] / "xl.safetensors"))
    # CLIP-L's last layer is not used by SDXL (it takes the penultimate states), so its LoRA, kept
    # in the file as kohya keeps it, stays zero; everything else trained
    unused = "lora_te1_text_model_encoder_layers_1_"
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):
        ups = {k: v for k, v in state.items() if k.startswith(prefix) and k.endswith("lora_up.weight")}
        assert ups and all(v.abs().sum() > 0 for k, v in ups.items() if not k.startswith(unused)), prefix
    assert all(v.abs().sum() == 0 for k, v in state.items() if k.startswith(unused) and "lora_up" in k)


def test_resume_from_state_is_exact(xl_run, tiny_xl, tmp_path):
    out, _ = xl_run
    run_script(SCRIPT, *_args(tiny_xl, tmp_path, "--output_name", "xl", "--max_train_steps", "6",
                              "--lr_scheduler", "cosine", "--text_encoder_lr1", "1e-3", "--text_encoder_lr2", "5e-4",
                              "--resume", str(out / "xl-step00000003-state")), check=True)
    a, b = load_file(str(out / "xl.safetensors")), load_file(str(tmp_path / "xl.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_loads_back(xl_run, tiny_xl, tmp_path):
    from library.families.sdxl import SDXLFamily
    from networks import lora

    models = SDXLFamily().load(str(tiny_xl / "model" / "tiny-sdxl.safetensors"), torch.float32, None)
    network, state = lora.create_network_from_weights(1.0, str(xl_run[0] / "xl.safetensors"), None,
                                                      models.text_encoders, models.denoiser)
    assert set(network.state_dict()) == set(state)
    # and training can continue from it
    run_script(SCRIPT, *_args(tiny_xl, tmp_path, "--max_train_steps", "1",
                              "--network_weights", str(xl_run[0] / "xl.safetensors")), check=True)


def test_cache_tools_and_cached_training(tiny_xl, tmp_path):
    """tools/cache_*.py --sdxl write the files sdxl_train_network.py then reads without encoding."""
    import shutil

    import numpy as np

    data = tmp_path / "data"
    shutil.copytree(tiny_xl / "train", data)
    common = ["--pretrained_model_name_or_path", str(tiny_xl / "model" / "tiny-sdxl.safetensors"),
              "--train_data_dir", str(data), "--resolution", "64", "--caption_extension", ".caption",
              "--console_log_level", "INFO"]
    assert "8 written" in run_script("tools/cache_text_encoder_outputs.py", *common, "--sdxl", check=True).stdout
    assert "8 written" in run_script("tools/cache_latents.py", *common, "--sdxl", check=True).stdout
    folder = data / "10_sks shape"
    caches = sorted(folder.glob("*_sdxl_te.npz"))
    assert len(caches) == 8 and len(list(folder.glob("*_sdxl.npz"))) == 8
    with np.load(caches[0]) as npz:
        assert npz["out_hidden"].shape == (77, 96) and npz["out_pooled"].shape == (32,)
    proc = run_script(SCRIPT, *common, "--output_dir", str(tmp_path / "out"), "--max_train_steps", "2",
                      "--network_train_unet_only", "--cache_text_encoder_outputs_to_disk", "--cache_latents_to_disk",
                      check=True)
    assert "text-encoder cache: 8 loaded from disk, 0 encoded" in proc.stderr
    assert "latent cache: 8 loaded from disk, 0 encoded" in proc.stderr
    state = load_file(str(tmp_path / "out" / "last.safetensors"))
    assert state and all(k.startswith("lora_unet_") for k in state)


def test_fused_backward_pass_equals_plain_adafactor(tiny_xl, tmp_path):
    common = ("--max_train_steps", "3", "--optimizer_type", "Adafactor", "--max_grad_norm", "0",
              "--optimizer_args", "relative_step=False", "scale_parameter=False", "warmup_init=False")
    run_script(SCRIPT, *_args(tiny_xl, tmp_path / "plain", *common), check=True)
    run_script(SCRIPT, *_args(tiny_xl, tmp_path / "fused", *common, "--fused_backward_pass"), check=True)
    a = load_file(str(tmp_path / "plain" / "last.safetensors"))
    b = load_file(str(tmp_path / "fused" / "last.safetensors"))
    assert set(a) == set(b)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if k.endswith("lora_up.weight"))


def test_bf16_with_fp32_vae(tiny_xl, tmp_path):
    run_script(SCRIPT, *_args(tiny_xl, tmp_path, "--max_train_steps", "2", "--mixed_precision", "bf16",
                              "--no_half_vae", "--sample_prompts", str(tiny_xl / "prompts.txt"),
                              "--sample_every_n_steps", "2"), check=True)
    assert len(list((tmp_path / "sample").glob("*.png"))) == 2


@pytest.mark.parametrize("extra, message", [
    (("--cache_text_encoder_outputs",), "needs --network_train_unet_only"),
    (("--cache_text_encoder_outputs", "--network_train_unet_only", "--shuffle_caption"), "shuffle_caption"),
    (("--fused_backward_pass",), "Adafactor only"),
    (("--optimizer_type", "Adafactor", "--fused_backward_pass", "--gradient_accumulation_steps", "2"),
     "gradient_accumulation_steps 1"),
    (("--v2",), "--v2 is for SD2.x"),
    (("--text_encoder_lr", "1e-4", "1e-4", "1e-4"), "at most one value per text encoder"),
])
def test_bad_flags(tiny_xl, tmp_path, extra, message):
    proc = run_in_process(SCRIPT, *_args(tiny_xl, tmp_path, "--max_train_steps", "1", *extra))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_wrong_family_files(tiny_xl, tiny_default, tmp_path):
    sd1 = str(tiny_default / "model" / "tiny-sd15.safetensors")
    proc = run_in_process(SCRIPT, *_args(tiny_xl, tmp_path, "--max_train_steps", "1"),
                      "--pretrained_model_name_or_path", sd1)
    assert proc.returncode == 2 and "not an SDXL checkpoint" in proc.stderr and "train_network.py" in proc.stderr
    proc = run_in_process("train_network.py", "--pretrained_model_name_or_path",
                      str(tiny_xl / "model" / "tiny-sdxl.safetensors"), "--dataset_config",
                      str(tiny_xl / "dataset.toml"), "--output_dir", str(tmp_path), "--max_train_steps", "1")
    assert proc.returncode == 2 and "sdxl_train_network.py" in proc.stderr
