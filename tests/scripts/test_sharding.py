"""Sharded full-weight training (--deepspeed, run on torch FSDP2) with two CPU processes (gloo):
the checkpoint and its moving average (--ema) match one process with the summed batch, state
folders hold whole tensors (a resumed run, with another ZeRO stage and offloading, ends
bit-identical to the uninterrupted one), and saving, sample images and validation run
collectively with rank 0 writing."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from tests.conftest import launch_two_processes, run_script


def _norm(tensors) -> float:
    return sum((t.double() ** 2).sum() for t in tensors).sqrt().item()


def test_sharded_train_db_matches_one_process_and_resumes_bit_identically(tiny_default, tmp_path):
    def args(out, *extra):
        return ["--pretrained_model_name_or_path", str(tiny_default / "model" / "tiny-sd15.safetensors"),
                "--train_data_dir", str(tiny_default / "train"), "--resolution", "64", "--caption_extension",
                ".caption", "--shuffle_caption", "--flip_aug", "--cache_latents", "--max_train_steps", "6",
                "--learning_rate", "1e-4", "--seed", "11", "--output_dir", str(tmp_path / out),
                "--console_log_level", "INFO", "--ema", "--ema_decay", "0.5", "--ema_save_mode", "both", *extra]

    run_script("train_db.py", *args("one", "--train_batch_size", "4"), check=True)
    sharded = ["--train_batch_size", "2", "--deepspeed", "--save_state"]
    two_args = args("two", *sharded, "--zero_stage", "3", "--save_every_n_steps", "3")
    proc = launch_two_processes("train_db.py", two_args, tmp_path, 29551)
    assert "sharded over 2 processes (FSDP2, ZeRO stage 3" in proc.stderr
    base = load_file(str(tiny_default / "model" / "tiny-sd15.safetensors"))
    for name in ("last", "last-ema"):  # the weights, and their moving average
        one, two = (load_file(str(tmp_path / run / f"{name}.safetensors")) for run in ("one", "two"))
        assert set(one) == set(two) and all(t.dtype == torch.float32 for t in two.values())
        apart, moved = _norm(one[k] - two[k] for k in one), _norm(one[k] - base[k] for k in one)
        moved_te = _norm(one[k] - base[k] for k in one if k.startswith("cond_stage_model."))
        print(f"{name}: |one - sharded| = {apart:.2e}, |one - base| = {moved:.2e} (text encoder {moved_te:.2e})")
        # as for unsharded data-parallel (test_multiprocess.py): equal up to float summation order over
        # the whole model; a gradient not averaged over the processes lands far from the one-process run
        assert moved_te > 0 and apart < 0.01 * moved
    state = tmp_path / "two" / "last-step00000003-state"
    optimizer = torch.load(state / "optimizer.pt", weights_only=False)
    assert optimizer["param_groups"][0]["params"][0] == "unet.conv_in.weight"  # whole, keyed by name
    assert len([line for line in proc.stderr.splitlines() if "saved state" in line]) == 2  # rank 0 wrote

    resumed_args = args("resumed", *sharded, "--zero_stage", "2", "--offload_param_device", "cpu", "--ema_cpu",
                        "--resume", str(state))
    resumed = launch_two_processes("train_db.py", resumed_args, tmp_path, 29552)
    assert "shards offloaded to host memory" in resumed.stderr
    for name in ("last", "last-ema"):
        final, two = (load_file(str(tmp_path / run / f"{name}.safetensors")) for run in ("resumed", "two"))
        assert all(torch.equal(final[k], two[k]) for k in two), name

    unsharded = run_script("train_db.py", *args("plain", "--train_batch_size", "4", "--resume", str(state)))
    assert unsharded.returncode == 2 and "saved by a sharded run (with --deepspeed)" in unsharded.stderr


def test_sharded_sdxl_samples_validates_and_writes_a_diffusers_folder(tiny_family_models, tiny_default, tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of shape --w 64 --h 64 --s 3 --d 5\n", encoding="utf-8")
    model = tiny_family_models["sdxl"]
    out = tmp_path / "out"
    proc = launch_two_processes("sdxl_train.py", [
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(tiny_default / "train"),
        "--resolution", "64", "--caption_extension", ".caption", "--cache_latents", "--max_train_steps", "2",
        "--learning_rate", "1e-4", "--seed", "3", "--train_batch_size", "2", "--train_text_encoder",
        "--gradient_checkpointing", "--deepspeed", "--offload_optimizer_device", "cpu", "--save_model_as",
        "diffusers", "--sample_prompts", str(prompts), "--sample_every_n_steps", "2", "--validation_split", "0.25",
        "--validate_every_n_steps", "2", "--output_dir", str(out), "--console_log_level", "INFO"], tmp_path, 29553)
    assert "validation loss at step 2" in proc.stderr
    assert len(list((out / "sample").glob("*.png"))) == 1  # every process drew it, rank 0 wrote it
    folder = out / "last"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]  # not FSDP's generated class
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"))
    te = CLIPTextModel.from_pretrained(str(folder / "text_encoder"))
    base = load_file(str(model))
    # the file's UNet conv_in and first text-encoder layer moved from the base model's
    assert not torch.equal(unet.conv_in.weight, base["model.diffusion_model.input_blocks.0.0.weight"])
    key = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(te.encoder.layers[0].mlp.fc1.weight, base[key])
