"""kohya's network flags end to end: --network_dropout / rank_dropout / module_dropout,
--scale_weight_norms (logged, and the cap holds in the saved file), block_dims, --dim_from_weights,
--base_weights (equal to a merged base), and their bad-input messages before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.config.training_config import NetworkConfig
from library.families.base import LoadedModels
from library.training.network_setup import merge_base_weights
from networks import lora
from tests.conftest import run_script, tiny_train_args

BLOCK_DIMS = ",".join(str((i % 3) + 1) for i in range(25))


def _norms(state: dict) -> dict[str, float]:
    """Each module's update norm ``alpha / rank * |up @ down|`` from a saved kohya file."""
    out = {}
    for key, down in state.items():
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            up = state[f"{name}.lora_up.weight"].float()
            scale = float(state[f"{name}.alpha"]) / down.shape[0]
            out[name] = scale * (up.flatten(1) @ down.float().flatten(1)).norm().item()
    return out


@pytest.fixture(scope="module")
def runs(tiny_default, tmp_path_factory) -> Path:
    """A LoRA with per-block ranks, then a run that starts from it with every regulariser on."""
    out = tmp_path_factory.mktemp("kohya_flags")
    run_script("train_network.py", *tiny_train_args(
        tiny_default, out, "--output_name", "blocks", "--max_train_steps", "3", "--learning_rate", "1e-2",
        "--network_args", f"block_dims={BLOCK_DIMS}"), check=True)
    run_script("train_network.py", *tiny_train_args(
        tiny_default, out, "--output_name", "regularised", "--max_train_steps", "4", "--learning_rate", "1e-2",
        "--network_weights", str(out / "blocks.safetensors"), "--dim_from_weights", "--network_dim", "16",
        "--base_weights", str(out / "blocks.safetensors"), "--base_weights_multiplier", "0.5",
        "--network_dropout", "0.1", "--network_args", "rank_dropout=0.2", "module_dropout=0.1",
        "--scale_weight_norms", "0.05", "--logging_dir", str(out / "logs")), check=True)
    return out


def test_block_dims_and_dim_from_weights_keep_the_ranks(runs):
    first = load_file(str(runs / "blocks.safetensors"))
    second = load_file(str(runs / "regularised.safetensors"))
    ranks = {k: v.shape for k, v in first.items()}
    assert {k: v.shape for k, v in second.items()} == ranks  # not --network_dim 16
    assert {v[0] for k, v in ranks.items() if k.startswith("lora_unet") and k.endswith("lora_down.weight")} == {1, 2, 3}


def test_max_norm_is_logged_and_holds_in_the_saved_file(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    norms = _norms(load_file(str(runs / "regularised.safetensors")))
    assert max(norms.values()) <= 0.05 * (1 + 1e-3)
    (run_dir,) = list((runs / "logs").glob("*/network_train"))
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    scaled = [e.value for e in acc.Scalars("max_norm/keys_scaled")]
    assert len(scaled) == 4 and max(scaled) > 0
    assert all(e.value <= 0.05 * (1 + 1e-3) for e in acc.Scalars("max_norm/max_key_norm"))
    assert "norm/avg_key_norm" in acc.Tags()["scalars"]


def test_metadata_records_the_options(runs):
    from safetensors import safe_open

    with safe_open(str(runs / "regularised.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dropout"] == "0.1" and meta["ss_scale_weight_norms"] == "0.05"
    assert '"rank_dropout": "0.2"' in meta["ss_network_args"]


def test_base_weights_equal_a_merged_base(tiny_sd1, tmp_path):
    net = lora.create_network(1.0, 4, 2, None, tiny_sd1.text_encoder, tiny_sd1.unet)
    torch.manual_seed(4)
    for m in net.all_loras():
        torch.nn.init.normal_(m.lora_up.weight, std=0.2)
    file = tmp_path / "base.safetensors"
    net.save_weights(str(file), None, {})
    state = load_file(str(file))
    before = {n: p.detach().clone() for n, p in tiny_sd1.unet.named_parameters()}
    te_before = {n: p.detach().clone() for n, p in tiny_sd1.text_encoder.named_parameters()}
    models = LoadedModels(tiny_sd1.unet, tiny_sd1.vae, [tiny_sd1.text_encoder], [tiny_sd1.tokenizer])
    cfg = NetworkConfig("networks.lora", None, None, {}, None, True, True, base_weights=((str(file), 0.7),))
    merge_base_weights(cfg, models, "cpu")
    checks = [(tiny_sd1.unet, before, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
               "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"),
              (tiny_sd1.text_encoder, te_before, "lora_te_text_model_encoder_layers_1_mlp_fc2",
               "encoder.layers.1.mlp.fc2.weight")]
    for model, old, name, param in checks:
        up, down = state[f"{name}.lora_up.weight"], state[f"{name}.lora_down.weight"]
        expected = old[param] + 0.7 * (float(state[f"{name}.alpha"]) / down.shape[0]) * (up @ down)
        torch.testing.assert_close(dict(model.named_parameters())[param].detach(), expected, rtol=1e-5, atol=1e-6)
    untouched = "down_blocks.0.resnets.0.conv1.weight"
    assert torch.equal(dict(tiny_sd1.unet.named_parameters())[untouched], before[untouched])


def _stops_before_loading(monkeypatch, argv: list[str]) -> str:
    """Run train_network.py in this process with model loading made to fail; return the UserError."""
    import train_network
    from library.families.sd import SDFamily
    from library.utils.errors import UserError

    def no_loading(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(SDFamily, "load", no_loading)
    with pytest.raises(UserError) as info:
        train_network.main(argv)
    return str(info.value)


@pytest.mark.parametrize("extra, message", [
    (["--dim_from_weights"], "--dim_from_weights reads the ranks from --network_weights"),
    (["--base_weights", "missing.safetensors"], "--base_weights missing.safetensors: file not found"),
    (["--base_weights_multiplier", "0.5"], "--base_weights_multiplier: 1 values for 0 --base_weights"),
    (["--network_dropout", "1.0"], "--network_dropout 1.0: must be at least 0 and below 1"),
    (["--network_args", "block_dims=1,2,3"], "block_dims: 3 values given; this model has 25 blocks"),
    (["--network_args", "rank_dropout=x"], "rank_dropout 'x': expected a probability"),
    (["--scale_weight_norms", "0"], "--scale_weight_norms 0.0: must be above 0"),
])
def test_bad_network_flags_stop_before_loading(tiny_default, tmp_path, monkeypatch, extra, message):
    assert message in _stops_before_loading(monkeypatch, tiny_train_args(tiny_default, tmp_path, *extra))


def test_lora_files_of_another_family_are_refused_early(tiny_default, tmp_path, monkeypatch):
    sdxl = tmp_path / "sdxl_lora.safetensors"
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(4, 2)}, str(sdxl))
    for flag in ("--base_weights", "--network_weights"):
        message = _stops_before_loading(monkeypatch, tiny_train_args(tiny_default, tmp_path, flag, str(sdxl)))
        assert f"{flag} {sdxl}: its keys are those of a SDXL LoRA, but this script trains SD1.x/2.x" in message


def test_sizes_kohya_only_warns_about_train(tiny_default, tmp_path):
    """bucket_reso_steps 32 on SD1 and a resolution that is not a multiple of it: kohya's warnings,
    then training at the sizes named."""
    import toml

    config = tmp_path / "dataset.toml"
    config.write_text(toml.dumps({"datasets": [{
        "resolution": [64, 72], "enable_bucket": True, "bucket_reso_steps": 32, "min_bucket_reso": 32,
        "max_bucket_reso": 128, "subsets": [{"image_dir": str(tiny_default / "train" / "10_sks shape"),
                                             "caption_extension": ".caption"}]}]}))
    proc = run_script("train_network.py", "--pretrained_model_name_or_path",
                      str(tiny_default / "model" / "tiny-sd15.safetensors"), "--dataset_config", str(config),
                      "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1", "--seed", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resolution 64x72 is not a multiple of bucket_reso_steps 32: trained as 64x64" in proc.stderr
    assert "bucket_reso_steps 32 is not a multiple of 64, which kohya advises for SD1.x/2.x models" in proc.stderr
    assert (tmp_path / "out" / "last.safetensors").is_file()


def test_folders_that_cannot_be_written_stop_before_loading(tiny_default, tmp_path, monkeypatch):
    """An --output_dir or --logging_dir that is a file (or under one) is named at once, not at the
    first save after the whole run."""
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    message = _stops_before_loading(monkeypatch, tiny_train_args(tiny_default, a_file))
    assert f"--output_dir {a_file}: it is a file, not a folder" in message
    message = _stops_before_loading(monkeypatch, tiny_train_args(tiny_default, tmp_path / "out", "--logging_dir",
                                                                 str(a_file / "logs")))
    assert f"--logging_dir {a_file / 'logs'}: {a_file} is a file, so the folder cannot be made there" in message


def test_gen_img_outdir_that_is_a_file(tmp_path):
    import gen_img
    from library.generation.config import build_gen_config
    from library.utils.errors import UserError

    a_file = tmp_path / "taken"
    a_file.write_text("x")
    args = gen_img.build_parser().parse_args(["--ckpt", "m.safetensors", "--outdir", str(a_file), "--prompt", "a"])
    with pytest.raises(UserError, match=f"--outdir {a_file}: it is a file"):
        build_gen_config(args)
