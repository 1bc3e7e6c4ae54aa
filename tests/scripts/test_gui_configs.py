"""Config files in the shape the kohya_ss GUI writes (its LoRA tab's key set and value types: it
always writes epoch, dynamo_backend ("no": a flag here, nothing compiled), noise_offset_type and the
huber_* keys, a sample_prompts file,
text_encoder_lr as a two-element list even for SD1, lr_warmup_steps as a ratio, 1/0 for switches,
and leaves out every "", false and 0) run for one step on each family's tiny model."""

from __future__ import annotations

import pytest
import toml
from safetensors import safe_open

from tests.conftest import run_script


def gui_config(model, dataset_toml, out, prompts, network_module: str, network_args: list[str]) -> dict:
    """What the GUI's LoRA tab writes for a basic run (its own filter applied: no "", False, None, 0)."""
    values = {
        "pretrained_model_name_or_path": str(model), "dataset_config": str(dataset_toml), "output_dir": str(out),
        "output_name": "gui", "save_model_as": "safetensors", "save_precision": "fp16", "mixed_precision": "no",
        "epoch": 1, "max_train_steps": 1, "max_train_epochs": 0, "train_batch_size": 1, "seed": 7,
        "learning_rate": 0.0001, "unet_lr": 0.0001, "text_encoder_lr": [5e-05, 5e-05], "lr_scheduler": "cosine",
        "lr_scheduler_args": [], "lr_scheduler_num_cycles": 1, "lr_scheduler_power": 1, "lr_warmup_steps": 0.1,
        "optimizer_type": "AdamW", "optimizer_args": None, "max_grad_norm": 1, "gradient_accumulation_steps": 1,
        "network_module": network_module, "network_dim": 4, "network_alpha": 1, "network_args": network_args,
        "network_dropout": 0, "scale_weight_norms": 0, "network_train_unet_only": False,
        # cache_latents_to_disk left out: it would write into the shared tiny datasets other tests copy
        "cache_latents": True, "caption_extension": ".txt", "enable_bucket": True,
        "bucket_reso_steps": 64, "min_bucket_reso": 256, "max_bucket_reso": 2048, "bucket_no_upscale": True,
        "caption_dropout_every_n_epochs": 0, "caption_dropout_rate": 0, "keep_tokens": 0, "max_token_length": 75,
        "noise_offset_type": "Original", "noise_offset": 0, "adaptive_noise_scale": 0,
        "huber_c": 0.1, "huber_schedule": "snr", "huber_scale": 1, "loss_type": "l2", "min_snr_gamma": 0,
        "prior_loss_weight": 1, "dynamo_backend": "no", "sdpa": True, "xformers": None, "gradient_checkpointing": 1,
        "persistent_data_loader_workers": 0, "max_data_loader_n_workers": 0, "sample_prompts": str(prompts),
        "sample_sampler": "euler_a", "sample_every_n_steps": 0, "save_every_n_epochs": 1, "log_with": "",
        "huggingface_repo_type": "", "wandb_run_name": "gui", "vae": "", "resume": "", "training_comment": "",
    }
    return dict(sorted((k, v) for k, v in values.items() if v not in ("", False, None) and not (
        not isinstance(v, bool) and isinstance(v, (int, float)) and v == 0)))


CASES = {
    "sd-lora": ("sd", "networks.lora", []),
    "sd-locon": ("sd", "networks.lora", ["conv_dim=2", "conv_alpha=1"]),
    "sd-loha": ("sd", "lycoris.kohya", ["algo=loha", "preset=attn-mlp"]),
    "sd-ia3": ("sd", "lycoris.kohya", ["algo=ia3", "preset=attn-mlp"]),
    "sd-loha-full": ("sd", "lycoris.kohya", ["algo=loha"]),  # lycoris's default preset, full
    "sd-dylora": ("sd", "networks.dylora", ["unit=2"]),
    "sdxl-lora-fa": ("sdxl", "networks.lora_fa", []),
    "sdxl-lora": ("sdxl", "networks.lora", []),
    "sdxl-locon": ("sdxl", "networks.lora", ["conv_dim=2", "conv_alpha=1"]),
    "sdxl-loha": ("sdxl", "lycoris.kohya", ["algo=loha", "preset=attn-mlp"]),
    "sdxl-ia3": ("sdxl", "lycoris.kohya", ["algo=ia3", "preset=attn-mlp"]),
    "sd3-lora": ("sd3", "networks.lora_sd3", []),
    "sd3-locon": ("sd3", "networks.lora_sd3", ["conv_dim=2", "conv_alpha=1"]),  # no convs: a warning says so
    "sd3-loha": ("sd3", "lycoris.kohya", ["algo=loha", "preset=attn-mlp"]),
    "sd3-ia3": ("sd3", "lycoris.kohya", ["algo=ia3", "preset=attn-mlp"]),
}
SCRIPTS = {"sd": "train_network.py", "sdxl": "sdxl_train_network.py", "sd3": "sd3_train_network.py"}


@pytest.mark.parametrize("case", list(CASES))
def test_a_gui_config_trains_one_step(case, tiny_default, tiny_family_models, tmp_path):
    family, module, network_args = CASES[case]
    if module.startswith("lycoris"):
        pytest.importorskip("lycoris")
    root = tiny_default if family == "sd" else tiny_family_models[family].parent.parent
    model = next((root / "model").glob("*.safetensors"))
    config = tmp_path / "config_lora-20260101-000000.toml"
    config.write_text(toml.dumps(gui_config(model, root / "dataset.toml", tmp_path / "out", root / "prompts.txt",
                                            module, network_args)), encoding="utf-8")
    extra = ["--t5xxl_max_token_length", "16"] if family == "sd3" else []
    proc = run_script(SCRIPTS[family], "--config_file", str(config), *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not used by this script: epoch (" in proc.stderr and "dynamo_backend" not in proc.stderr
    if case == "sd3-locon":
        assert "conv_dim=2: the MMDiT's blocks have no convolutions, so it changes nothing" in proc.stderr
    with safe_open(str(tmp_path / "out" / "gui.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_steps"] == "1" and meta["ss_network_module"] == module
    assert meta["ss_text_encoder_lr"] == "[5e-05, 5e-05]"
