"""train_network.py end to end on the tiny default: files, names, metadata, logs, samples, options."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tests.conftest import run_in_process, run_script, tiny_train_args


def _train(tiny_default: Path) -> str:
    return str(tiny_default / "train" / "10_sks shape")


def _reg(tiny_default: Path) -> str:
    return str(tiny_default / "reg" / "1_shape")


def _dataset_toml(path: Path, subsets: list[dict], **dataset) -> Path:
    """Write a one-dataset config (resolution 64 unless given) and return its path."""
    import toml

    path.write_text(toml.dumps({"datasets": [{"resolution": 64, **dataset, "subsets": subsets}]}), encoding="utf-8")
    return path


def _read(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def main_run(tiny_default, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    run_script("train_network.py", *tiny_train_args(
        tiny_default, out, "--output_name", "tiny_lora", "--network_dim", "4", "--network_alpha", "2",
        "--learning_rate", "1e-3", "--max_train_epochs", "2", "--save_every_n_epochs", "1",
        "--save_every_n_steps", "50", "--cache_latents", "--sample_prompts", str(tiny_default / "prompts.txt"),
        "--sample_every_n_epochs", "1", "--logging_dir", str(out / "logs"), "--training_comment", "hello"),
        check=True)
    return out


def test_saved_files_and_names(main_run):
    names = sorted(p.name for p in main_run.glob("*.safetensors"))
    # 80 batches per epoch, 2 epochs = 160 steps; epoch 2 is the final save under the plain name
    assert names == ["tiny_lora-000001.safetensors", "tiny_lora-step00000050.safetensors",
                     "tiny_lora-step00000100.safetensors", "tiny_lora-step00000150.safetensors",
                     "tiny_lora.safetensors"]


def test_lora_keys_and_metadata(main_run, tiny_default):
    tensors, meta = _read(main_run / "tiny_lora.safetensors")
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in tensors
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"].item() == 2.0
    ups = [v for k, v in tensors.items() if k.endswith("lora_up.weight")]
    assert all(v.abs().sum() > 0 for v in ups)  # every module was trained
    expected = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2.0",
                "ss_num_train_images": "80", "ss_num_reg_images": "80", "ss_steps": "160", "ss_epoch": "2",
                "ss_learning_rate": "0.001", "ss_base_model_version": "sd_v1", "ss_v2": "False",
                "ss_resolution": "(64, 64)", "ss_seed": "1", "ss_training_comment": "hello",
                "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.sai_model_spec": "1.0.1",
                "ss_sd_model_name": "tiny-sd15.safetensors", "ss_cache_latents": "True"}
    for key, value in expected.items():
        assert meta[key] == value, key
    assert json.loads(meta["ss_tag_frequency"])["10_sks shape"] == {"sks shape": 8, "red circle": 8}
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_sks shape": {"n_repeats": 10, "img_count": 8}}
    assert len(meta["sshs_model_hash"]) == 64
    import hashlib
    model_bytes = (tiny_default / "model" / "tiny-sd15.safetensors").read_bytes()
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(model_bytes).hexdigest()
    assert meta["ss_sd_model_hash"] == hashlib.sha256(model_bytes[0x100000:0x110000]).hexdigest()[:8]
    _, epoch1 = _read(main_run / "tiny_lora-000001.safetensors")
    assert epoch1["ss_epoch"] == "1" and epoch1["ss_steps"] == "80"


def test_tensorboard_scalars(main_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = list((main_run / "logs").glob("*/network_train"))
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/current", "loss/average", "lr/unet", "lr/textencoder", "loss/epoch_average"} <= tags
    steps = [e.step for e in acc.Scalars("loss/current")]
    assert steps == list(range(1, 161))
    assert acc.Scalars("lr/unet")[0].value == pytest.approx(1e-3)
    assert len(acc.Tags()["images"]) == 2


def test_sample_images(main_run):
    samples = sorted((main_run / "sample").glob("*.png"))
    assert len(samples) == 4
    assert samples[0].name.startswith("tiny_lora_e000001_00_") and samples[0].name.endswith("_1.png")
    img = Image.open(samples[0])
    assert img.size == (64, 64)
    assert "Negative prompt: blue" in img.text["parameters"] and "Seed: 1" in img.text["parameters"]


def test_legacy_folders_accumulation_checkpointing_unet_only(tiny_default, tmp_path):
    run_script("train_network.py", *tiny_train_args(
        tiny_default, tmp_path, "--dataset_config", "", "--train_data_dir", str(tiny_default / "train"),
        "--reg_data_dir", str(tiny_default / "reg"), "--resolution", "64", "--train_batch_size", "2",
        "--caption_extension", ".caption", "--gradient_accumulation_steps", "2", "--gradient_checkpointing",
        "--color_aug", "--random_crop", "--caption_tag_dropout_rate", "0.1", "--enable_wildcard",
        "--max_train_steps", "3", "--network_train_unet_only", "--optimizer_type", "AdamW",
        "--optimizer_args", "weight_decay=0.05", "betas=0.9,0.99", "--lr_scheduler", "cosine",
        "--lr_warmup_steps", "1", "--max_data_loader_n_workers", "2", "--persistent_data_loader_workers",
        "--no_metadata", "--sample_prompts", str(tiny_default / "prompts.txt"), "--sample_at_first",
        "--sample_every_n_steps", "2", "--sample_sampler", "euler_a"), check=True)
    tensors, meta = _read(tmp_path / "last.safetensors")
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    # --no_metadata keeps kohya's minimum set (plus modelspec)
    assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "sd_v1"
    assert "ss_steps" not in meta and "ss_tag_frequency" not in meta
    assert "modelspec.architecture" in meta
    # samples at step 0 and step 2, two prompts each
    names = sorted(p.name for p in (tmp_path / "sample").glob("*.png"))
    assert len(names) == 4 and names[0].startswith("last_000000_00_") and names[2].startswith("last_000002_00_")


def test_optimizer_args_reach_the_optimizer(tmp_path):
    import torch as _torch

    from library.optim import optimizers as optim

    kwargs = optim.parse_optimizer_args(["weight_decay=0.05", "betas=0.9,0.99", "foreach=False"])
    assert kwargs == {"weight_decay": 0.05, "betas": (0.9, 0.99), "foreach": False}
    opt = optim.build_optimizer("AdamW", [{"params": [_torch.nn.Parameter(_torch.zeros(2))]}], 1e-3, kwargs)
    assert opt.param_groups[0]["betas"] == (0.9, 0.99) and opt.param_groups[0]["weight_decay"] == 0.05


def test_diffusers_folder_bf16_and_network_weights(tiny_default, tmp_path, main_run):
    from library.models.sd_loading import load_sd_model

    parts = load_sd_model(str(tiny_default / "model" / "tiny-sd15.safetensors"))
    folder = tmp_path / "diffusers_model"
    parts.unet.save_pretrained(folder / "unet")
    parts.vae.save_pretrained(folder / "vae")
    parts.text_encoder.save_pretrained(folder / "text_encoder")
    parts.tokenizer.save_pretrained(str(folder / "tokenizer"))
    (folder / "model_index.json").write_text("{}", encoding="utf-8")
    start = main_run / "tiny_lora.safetensors"
    run_script("train_network.py", *tiny_train_args(
        tiny_default, tmp_path, "--pretrained_model_name_or_path", str(folder), "--max_train_steps", "2",
        "--mixed_precision", "bf16", "--network_weights", str(start), "--network_dim", "4", "--network_alpha", "2",
        "--learning_rate", "1e-9", "--save_precision", "fp16"), check=True)
    before, _ = _read(start)
    after, _ = _read(tmp_path / "last.safetensors")
    assert after["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"].dtype == torch.float16
    for key in before:
        torch.testing.assert_close(after[key].float(), before[key].float(), atol=2e-3, rtol=2e-3)


def test_lycoris_plugs_into_the_same_seam(tiny_default, tmp_path):
    pytest.importorskip("lycoris")
    run_script("train_network.py", *tiny_train_args(
        tiny_default, tmp_path, "--network_module", "lycoris.kohya", "--network_args", "algo=lora",
        "preset=attn-mlp", "--network_dim", "4", "--network_alpha", "1", "--max_train_steps", "3"), check=True)
    tensors, meta = _read(tmp_path / "last.safetensors")
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert any(k.startswith("lora_unet_") and k.endswith("lora_up.weight") for k in tensors)
    assert any(k.startswith("lora_te_") for k in tensors)


def _user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert line, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr[-2000:]


def test_bad_input_messages(tiny_default, tmp_path):
    args = tiny_train_args(tiny_default, tmp_path)
    missing = list(args)
    missing[1] = str(tmp_path / "nope.safetensors")
    _user_error(run_in_process("train_network.py", *missing), "nope.safetensors", "file not found")

    empty = tmp_path / "empty" / "5_thing"
    empty.mkdir(parents=True)
    _user_error(run_in_process("train_network.py", *args, "--dataset_config", "", "--train_data_dir",
                           str(empty.parent), "--resolution", "64"), "no usable training images", "5_thing")

    _user_error(run_in_process("train_network.py", *args, "--network_module", "networks.nosuch"),
                "--network_module networks.nosuch")

    prompts = tmp_path / "p.txt"
    prompts.write_text("ok --w 64\nbad --x 1\n", encoding="utf-8")
    _user_error(run_in_process("train_network.py", *args, "--sample_prompts", str(prompts)), "p.txt:2", "--x")

    _user_error(run_in_process("train_network.py", *args, "--v2"), "--v2 was given", "SD1.x")

    cfg = tmp_path / "bad.toml"
    cfg.write_text("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = 'x'\nnum_repeats = 'ten'\n",
                   encoding="utf-8")
    _user_error(run_in_process("train_network.py", *args, "--dataset_config", str(cfg)),
                'datasets[0].subsets[0].num_repeats: expected a positive int, got "ten"')


def test_unreadable_image_is_skipped_or_stops(tiny_default, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_default / "train", data)
    bad = data / "10_sks shape" / "zz_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    args = tiny_train_args(tiny_default, tmp_path / "out", "--dataset_config", "", "--train_data_dir", str(data),
                           "--resolution", "64", "--max_train_steps", "1")
    proc = run_script("train_network.py", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipping" in proc.stderr and "zz_broken.png" in proc.stderr
    _user_error(run_in_process("train_network.py", *args, "--strict_dataset"), "zz_broken.png", "--strict_dataset")


def test_trained_file_loads_in_diffusers_like_a_hand_merge(main_run, tiny_default, caplog):
    """The LoRA written by training, read by diffusers' load_lora_weights, changes the UNet and text
    encoder exactly as merging W + alpha/dim * up @ down by hand; every module is consumed."""
    import logging

    from diffusers import StableDiffusionPipeline

    from library.models.sd_loading import load_sd_model
    from library.sampling.samplers import build_scheduler
    from tests.networks.test_lora import _inputs, _merge_by_hand, _outputs, _path_resolver

    ckpt = str(tiny_default / "model" / "tiny-sd15.safetensors")
    state, _ = _read(main_run / "tiny_lora.safetensors")
    ref = load_sd_model(ckpt)
    _merge_by_hand(ref.text_encoder, state, [("lora_te_text_model_", _path_resolver(ref.text_encoder))])
    _merge_by_hand(ref.unet, state, [("lora_unet_", _path_resolver(ref.unet))])
    x, t, ids = _inputs(ref)
    merged = _outputs(ref, x, t, ids)
    base = load_sd_model(ckpt)
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=base.unet, scheduler=build_scheduler("euler"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(main_run / "tiny_lora.safetensors"))
    complaints = [r.getMessage() for r in caplog.records if r.name.startswith(("diffusers", "peft"))]
    assert not complaints, complaints
    modules = {k.split(".")[0] for k in state}
    wrapped = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith(".lora_A")) + \
        sum(1 for n, _ in pipe.text_encoder.named_modules() if n.endswith(".lora_A"))
    assert wrapped == len(modules)
    loaded = _outputs(pipe, x, t, ids)
    for a, b in zip(loaded, merged):
        assert (a - b).abs().max() / b.abs().max() < 1e-5


def test_noise_and_loss_options_run(tiny_default, tmp_path):
    run_script("train_network.py", *tiny_train_args(
        tiny_default, tmp_path, "--max_train_steps", "3", "--noise_offset", "0.05", "--noise_offset_random_strength",
        "--adaptive_noise_scale", "0.01", "--multires_noise_iterations", "3", "--ip_noise_gamma", "0.1",
        "--min_snr_gamma", "5", "--debiased_estimation_loss", "--loss_type", "huber", "--huber_schedule", "snr",
        "--v_parameterization", "--zero_terminal_snr", "--min_timestep", "100", "--max_timestep", "900",
        "--max_token_length", "150", "--weighted_captions", "--clip_skip", "2",
        "--sample_prompts", str(tiny_default / "prompts.txt"), "--sample_at_first"),
        check=True)
    _, meta = _read(tmp_path / "last.safetensors")
    assert meta["modelspec.prediction_type"] == "v" and meta["modelspec.timestep_range"] == "100,900"
    assert meta["ss_noise_offset"] == "0.05" and meta["ss_min_snr_gamma"] == "5.0"
    assert meta["ss_loss_type"] == "huber" and meta["ss_zero_terminal_snr"] == "True"
    assert meta["ss_max_token_length"] == "150" and meta["ss_weighted_captions"] == "True"
    assert len(list((tmp_path / "sample").glob("*.png"))) == 2


def test_contradictory_flags_stop_before_loading(tiny_default, tmp_path):
    args = tiny_train_args(tiny_default, tmp_path)
    args[1] = str(tmp_path / "not-loaded-yet")  # a missing model: the flag check must come first
    proc = run_script("train_network.py", *args, "--adaptive_noise_scale", "0.1", "--v_pred_like_loss", "0.1",
                      "--v_parameterization")
    _user_error(proc, "--adaptive_noise_scale needs --noise_offset", "--v_pred_like_loss cannot be used")


@pytest.mark.parametrize("optimizer", ["AdamWScheduleFree", "Adafactor"])
def test_special_optimizers_train(tiny_default, tmp_path, optimizer):
    pytest.importorskip("schedulefree")
    run_script("train_network.py", *tiny_train_args(
        tiny_default, tmp_path, "--max_train_steps", "4", "--optimizer_type", optimizer, "--save_every_n_steps", "2",
        "--sample_prompts", str(tiny_default / "prompts.txt"), "--sample_every_n_steps", "2",
        "--logging_dir", str(tmp_path / "logs")), check=True)
    tensors, meta = _read(tmp_path / "last.safetensors")
    assert meta["ss_optimizer"] == optimizer and all(torch.isfinite(v).all() for v in tensors.values())


def test_non_finite_loss_stops_and_keeps_last_good_weights(tiny_default, tmp_path):
    proc = run_script("train_network.py", *tiny_train_args(
        tiny_default, tmp_path, "--max_train_steps", "20", "--learning_rate", "1e30", "--max_grad_norm", "0",
        "--save_state"))
    _user_error(proc, "stopped at step 2", "the weights after step 1 were saved as",
                "last-step00000001.safetensors", "--learning_rate")
    tensors, meta = _read(tmp_path / "last-step00000001.safetensors")
    assert meta["ss_steps"] == "1" and all(torch.isfinite(v).all() for v in tensors.values())
    assert (tmp_path / "last-step00000001-state" / "train_state.json").is_file()
    assert not (tmp_path / "last.safetensors").exists()


def test_config_file_precedence_and_output_config(tiny_default, tmp_path):
    out = tmp_path / "out"
    cfg = tmp_path / "train.toml"
    cfg.write_text(f"""[model]
pretrained_model_name_or_path = "{(tiny_default / 'model' / 'tiny-sd15.safetensors').as_posix()}"
[data]
dataset_config = "{(tiny_default / 'dataset.toml').as_posix()}"
[training]
output_dir = "{out.as_posix()}"
max_train_steps = 2
network_dim = 2
network_args = ["conv_dim=2"]
""", encoding="utf-8")
    # the command line beats the file; the file beats the defaults
    run_script("train_network.py", "--config_file", str(cfg.with_suffix("")), "--max_train_steps", "3",
               "--console_log_level", "WARNING", check=True)
    tensors, meta = _read(out / "last.safetensors")
    assert meta["ss_steps"] == "3" and meta["ss_network_dim"] == "2"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2"}
    assert any("resnets" in k for k in tensors)

    written = tmp_path / "written.toml"
    run_script("train_network.py", "--config_file", str(cfg), "--learning_rate", "3e-4",
               "--output_config", str(written), check=True)
    import toml
    values = toml.loads(written.read_text(encoding="utf-8"))
    assert values["learning_rate"] == 3e-4 and values["max_train_steps"] == 2 and "output_config" not in values
    assert "seed" not in values  # defaults are left out
    again = run_script("train_network.py", "--config_file", str(cfg), "--output_config", str(written))
    _user_error(again, "the file exists")

    bad = tmp_path / "bad.toml"
    bad.write_text("learning_rat = 1e-4\nmax_train_steps = 'many'\n", encoding="utf-8")
    _user_error(run_in_process("train_network.py", "--config_file", str(bad)),
                "unknown key learning_rat (did you mean 'learning_rate'?)", "max_train_steps: expected int")
    _user_error(run_in_process("train_network.py", "--output_dir", str(out)),
                "--pretrained_model_name_or_path required")


def test_loggable_args_drop_paths_and_secrets():
    from library.config.training_config import loggable_args

    raw = {"learning_rate": 1e-4, "wandb_api_key": "secret", "output_dir": "/home/me", "logging_dir": "/x",
           "pretrained_model_name_or_path": "/models/a.safetensors", "network_args": ["a=1"], "seed": 3,
           "sample_prompts": "/p.txt", "optimizer_type": "AdamW", "cache_dir": "/c"}
    assert loggable_args(raw) == {"learning_rate": 1e-4, "seed": 3, "optimizer_type": "AdamW"}


def test_precision_options_and_modelspec_flags(tiny_default, tmp_path):
    run_script("train_network.py", *tiny_train_args(
        tiny_default, tmp_path, "--max_train_steps", "2", "--mixed_precision", "bf16", "--fp8_base", "--full_bf16",
        "--lowram",
        "--mem_eff_attn", "--metadata_title", "Red circles", "--metadata_author", "me",
        "--metadata_trigger_phrase", "sks shape"), check=True)
    tensors, meta = _read(tmp_path / "last.safetensors")
    assert all(v.dtype == torch.bfloat16 for k, v in tensors.items() if "lora_" in k and k.endswith("weight"))
    assert meta["ss_fp8_base"] == "True" and meta["ss_mixed_precision"] == "bf16"
    assert meta["modelspec.title"] == "Red circles" and meta["modelspec.author"] == "me"
    assert meta["modelspec.trigger_phrase"] == "sks shape"
    args = tiny_train_args(tiny_default, tmp_path)
    _user_error(run_in_process("train_network.py", *args, "--full_bf16"), "--full_bf16 needs --mixed_precision bf16")
    _user_error(run_in_process("train_network.py", *args, "--fp8_base"), "--fp8_base computes in the mixed-precision")


def test_attention_modes(tiny_sd1):
    from diffusers.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor

    from library.maths import precision
    from library.utils.errors import UserError

    precision.set_attention(tiny_sd1.unet, "mem_eff")
    assert any(isinstance(p, SlicedAttnProcessor) for p in tiny_sd1.unet.attn_processors.values())
    precision.set_attention(tiny_sd1.unet, "sdpa")
    assert all(isinstance(p, AttnProcessor2_0) for p in tiny_sd1.unet.attn_processors.values())
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="xformers"):
            precision.set_attention(tiny_sd1.unet, "xformers")


def test_save_last_n_epochs_keeps_the_newest(tiny_default, tmp_path):
    run_script("train_network.py", *tiny_train_args(
        tiny_default, tmp_path, "--dataset_config", "", "--train_data_dir", str(tiny_default / "train"),
        "--resolution", "64", "--train_batch_size", "4", "--caption_extension", ".caption", "--cache_latents",
        "--max_train_epochs", "4", "--save_every_n_epochs", "1", "--save_last_n_epochs", "2",
        "--save_state", "--save_model_as", "safetensors"), check=True)
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert names == ["last-000002-state", "last-000002.safetensors", "last-000003-state", "last-000003.safetensors",
                     "last-state", "last.safetensors"]


def test_cache_tool_then_training_reuses_the_files(tiny_default, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_default / "train", data)
    common = ["--pretrained_model_name_or_path", str(tiny_default / "model" / "tiny-sd15.safetensors"),
              "--train_data_dir", str(data), "--resolution", "64", "--caption_extension", ".caption",
              "--vae_batch_size", "4", "--console_log_level", "INFO"]
    proc = run_script("tools/cache_latents.py", *common, check=True)
    assert "0 valid file(s) kept, 8 written" in proc.stdout
    assert len(list((data / "10_sks shape").glob("*_0064x0064_sd.npz"))) == 8
    proc = run_script("train_network.py", *common, "--output_dir", str(tmp_path / "out"), "--max_train_steps", "2",
                      "--cache_latents_to_disk", check=True)
    assert "8 loaded from disk, 0 encoded" in proc.stderr
    refused = run_script("tools/cache_latents.py", *common, "--color_aug")  # the trainer refuses it with caching
    assert refused.returncode == 2 and "tools/cache_latents.py with color_aug" in refused.stderr


def test_masked_loss_training(tiny_default, tmp_path):
    import numpy as np
    from PIL import Image

    masks = tmp_path / "masks"
    masks.mkdir()
    for img in (tiny_default / "train" / "10_sks shape").glob("*.png"):
        m = np.zeros((64, 64, 3), dtype=np.uint8)
        m[16:48, 16:48, 0] = 255
        Image.fromarray(m).save(masks / img.name)
    cfg = _dataset_toml(tmp_path / "masked.toml", [
        {"image_dir": _train(tiny_default), "conditioning_data_dir": str(masks), "caption_extension": ".caption"},
        {"image_dir": _reg(tiny_default), "alpha_mask": True, "class_tokens": "shape"}], batch_size=2)
    args = tiny_train_args(tiny_default, tmp_path / "out", "--dataset_config", str(cfg), "--max_train_steps", "3")
    _user_error(run_in_process("train_network.py", *args), "conditioning_data_dir: add --masked_loss")
    run_script("train_network.py", *args, "--masked_loss", "--cache_latents", check=True)
    assert (tmp_path / "out" / "last.safetensors").is_file()


def test_debug_dataset_prints_batches_without_loading(tiny_default, tmp_path):
    args = tiny_train_args(tiny_default, tmp_path, "--debug_dataset", "--shuffle_caption")
    args[1] = str(tmp_path / "no-model-needed")
    proc = run_script("train_network.py", *args, check=True)
    lines = proc.stdout.splitlines()
    assert lines[0] == "epoch 1 batch 1/80: bucket 64x64, loss weights " + lines[0].split("loss weights ")[1]
    assert any("img0" in ln and "(64x64): 'sks shape, red circle'" in ln for ln in lines)
    assert sum(ln.startswith("epoch 1 batch") for ln in lines) == 80
    assert not (tmp_path / "last.safetensors").exists()


def test_validation_split_and_logging(tiny_default, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _dataset_toml(tmp_path / "val.toml", [
        {"image_dir": _train(tiny_default), "caption_extension": ".caption", "num_repeats": 2},
        {"image_dir": _reg(tiny_default), "is_reg": True}], batch_size=2, validation_split=0.25, validation_seed=3)
    out = tmp_path / "out"
    run_script("train_network.py", *tiny_train_args(
        tiny_default, out, "--dataset_config", str(cfg), "--max_train_epochs", "2", "--validate_every_n_steps", "4",
        "--logging_dir", str(out / "logs"), "--cache_latents"), check=True)
    _, meta = _read(out / "last.safetensors")
    # 8 images: 6 train (ceil(8 * 0.75)) x 2 repeats, 2 validation; the reg set is never split
    assert meta["ss_num_train_images"] == "12" and meta["ss_num_validation_images"] == "2"
    (run_dir,) = list((out / "logs").glob("*/network_train"))
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("loss/validation/step_average")]
    assert steps == [4, 8, 12, 16, 20, 24]  # (12 train + 12 balanced reg samples) / 2 = 12 batches x 2 epochs
    assert "loss/validation/step_divergence" in acc.Tags()["scalars"]
    assert "loss/validation/epoch_average" not in acc.Tags()["scalars"]  # step-based validation only


def test_validation_is_deterministic(tiny_sd1, tiny_default):
    import accelerate

    from library.data.dataset import build_dataset_group
    from library.data.dataset_config import DatasetConfig, SubsetConfig
    from library.families.base import LoadedModels
    from library.families.sd import SDFamily
    from library.training.validation import Validator

    sub = SubsetConfig(str(tiny_default / "train" / "10_sks shape"), caption_extension=".caption")
    group, _ = build_dataset_group([DatasetConfig((64, 64), batch_size=2, validation_split=0.5, subsets=(sub,))],
                                   1, 1.0, False)
    assert len(group.validation.items) == 4 and len(group.items) == 4
    models = LoadedModels(tiny_sd1.unet, tiny_sd1.vae, [tiny_sd1.text_encoder], [tiny_sd1.tokenizer])
    v = Validator(SDFamily(), models, group.validation, 1, None, accelerate.Accelerator(cpu=True), torch.float32)
    net = torch.nn.Linear(1, 1)
    assert v.loss(net) == v.loss(net) and net.training
    assert SDFamily().validation_timesteps() == [200, 400, 600, 800]


def test_in_json_fine_tuning_dataset(tiny_default, tmp_path):
    folder = tiny_default / "train" / "10_sks shape"
    meta = {p.name: {"caption": "red circle", "tags": "sks"} for p in folder.glob("*.png")}
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(meta), encoding="utf-8")
    args = tiny_train_args(tiny_default, tmp_path / "out", "--dataset_config", "", "--in_json", str(path),
                           "--train_data_dir", str(folder), "--dataset_repeats", "2", "--resolution", "64",
                           "--max_train_steps", "2", "--resize_interpolation", "bicubic")
    run_script("train_network.py", *args, check=True)
    _, meta_out = _read(tmp_path / "out" / "last.safetensors")
    assert meta_out["ss_num_train_images"] == "16"
    assert json.loads(meta_out["ss_tag_frequency"]) == {"10_sks shape": {"red circle": 8, "sks": 8}}


def test_text_encoder_cache_tool_training_and_staleness(tiny_default, tmp_path):
    import numpy as np

    data = tmp_path / "data"
    shutil.copytree(tiny_default / "train", data)
    common = ["--pretrained_model_name_or_path", str(tiny_default / "model" / "tiny-sd15.safetensors"),
              "--train_data_dir", str(data), "--resolution", "64", "--caption_extension", ".caption",
              "--console_log_level", "INFO"]
    proc = run_script("tools/cache_text_encoder_outputs.py", *common, check=True)
    assert "0 valid file(s) kept, 8 written" in proc.stdout
    files = sorted((data / "10_sks shape").glob("*_sd_te.npz"))
    assert len(files) == 8
    with np.load(files[0]) as npz:
        assert npz["out"].shape == (77, 32)
    train = [*common, "--output_dir", str(tmp_path / "out"), "--max_train_steps", "2",
             "--cache_text_encoder_outputs_to_disk", "--network_train_unet_only", "--cache_latents"]
    proc = run_script("train_network.py", *train, check=True)
    assert "text-encoder cache: 8 loaded from disk, 0 encoded" in proc.stderr
    # an edited caption and another clip_skip are noticed: those outputs are encoded again
    (data / "10_sks shape" / "img00.caption").write_text("a different caption", encoding="utf-8")
    proc = run_script("train_network.py", *train, check=True)
    assert "text-encoder cache: 7 loaded from disk, 1 encoded" in proc.stderr
    proc = run_script("train_network.py", *train, "--clip_skip", "2", check=True)
    assert "text-encoder cache: 0 loaded from disk, 8 encoded" in proc.stderr
    # refused combinations, before any model is loaded
    bad = list(train)
    bad[1] = str(tmp_path / "nothing")
    _user_error(run_in_process("train_network.py", *bad, "--shuffle_caption"), "needs fixed captions",
                "shuffle_caption")
    bad.remove("--network_train_unet_only")
    _user_error(run_in_process("train_network.py", *bad), "needs --network_train_unet_only")


def test_network_multiplier_per_dataset(tiny_default, tmp_path):
    cfg = _dataset_toml(tmp_path / "mult.toml", [{"image_dir": _train(tiny_default), "caption_extension": ".caption"}],
                        network_multiplier=0.0)
    run_script("train_network.py", *tiny_train_args(tiny_default, tmp_path, "--dataset_config", str(cfg),
                                                    "--max_train_steps", "3"), check=True)
    tensors, _ = _read(tmp_path / "last.safetensors")
    # at strength 0 the network does not touch the output, so it receives no gradient at all
    assert all(v.abs().sum() == 0 for k, v in tensors.items() if k.endswith("lora_up.weight"))


def test_diff_output_preservation_targets_the_base_model(tiny_default, tmp_path):
    cfg = _dataset_toml(tmp_path / "dop.toml", [
        {"image_dir": _reg(tiny_default), "class_tokens": "shape",
         "custom_attributes": {"diff_output_preservation": True, "note": "x"}}], batch_size=2)
    proc = run_script("train_network.py", *tiny_train_args(
        tiny_default, tmp_path, "--dataset_config", str(cfg), "--max_train_steps", "3",
        "--console_log_level", "INFO", "--logging_dir", str(tmp_path / "logs")), check=True)
    assert "custom_attributes ['note'] are not used" in proc.stderr
    tensors, _ = _read(tmp_path / "last.safetensors")
    # every target is the base model's output, which the network (up = 0 at the start) already
    # matches exactly: the loss is 0, so the up matrices never move
    assert all(v.abs().sum() == 0 for k, v in tensors.items() if k.endswith("lora_up.weight"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    (run_dir,) = list((tmp_path / "logs").glob("*/network_train"))
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert [e.value for e in acc.Scalars("loss/current")] == [0.0, 0.0, 0.0]


def test_sd2_single_file_with_v_prediction(tiny_default, tmp_path):
    from library.models.sd_loading import save_sd_single_file
    from library.models.tiny import make_tiny_sd2

    parts = make_tiny_sd2()
    model = tmp_path / "model" / "tiny-sd2.safetensors"
    save_sd_single_file(model, parts)
    parts.tokenizer.save_pretrained(str(model.parent / "tokenizer"))
    run_script("train_network.py", *tiny_train_args(
        tiny_default, tmp_path / "out", "--pretrained_model_name_or_path", str(model), "--v2",
        "--v_parameterization", "--max_train_steps", "2", "--sample_prompts", str(tiny_default / "prompts.txt"),
        "--sample_at_first"), check=True)
    tensors, meta = _read(tmp_path / "out" / "last.safetensors")
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2_v"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight" in tensors
    assert len(list((tmp_path / "out" / "sample").glob("*.png"))) == 2


def test_separate_vae_flag(tiny_default, tmp_path):
    from library.models.tiny import make_tiny_sd1

    other = make_tiny_sd1(seed=5).vae
    other.save_pretrained(str(tmp_path / "my_vae"))
    run_script("train_network.py", *tiny_train_args(tiny_default, tmp_path / "out", "--vae", str(tmp_path / "my_vae"),
                                                    "--max_train_steps", "2", "--cache_latents"), check=True)
    _, meta = _read(tmp_path / "out" / "last.safetensors")
    assert meta["ss_vae_name"] == "my_vae"
    args = tiny_train_args(tiny_default, tmp_path / "out2", "--vae", str(tmp_path / "missing.safetensors"))
    _user_error(run_in_process("train_network.py", *args), "--vae", "not found")
