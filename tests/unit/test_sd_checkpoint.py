"""SD1 single-file key maps and loading, checked against diffusers' own converters and loaders."""

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file

from library.models import sd_infer, sd_keys
from library.models.sd_loading import load_sd_model, read_state_dict, save_sd_single_file
from library.utils.errors import UserError


def _strip(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _sd15_like_unet():
    # three levels, two layers per block, attention in the first two: the real SD1.5 pattern, narrow
    return UNet2DConditionModel(block_out_channels=(32, 64, 64), layers_per_block=2,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=32, attention_head_dim=8, sample_size=16)


def test_unet_map_matches_diffusers_converter_and_inverts():
    unet = _sd15_like_unet()
    state = unet.state_dict()
    ldm = sd_keys.unet_to_ldm(state, unet.config)
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in ldm
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in ldm  # upsampler after an attention
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in ldm  # upsampler without attention
    ref = convert_ldm_unet_checkpoint(dict(ldm), dict(unet.config))  # diffusers' ldm -> diffusers
    assert set(ref) == set(state) and all(torch.equal(ref[k], state[k]) for k in state)
    back = sd_keys.unet_from_ldm(_strip(ldm, sd_keys.UNET_PREFIX), unet.config)
    assert set(back) == set(state)


def test_vae_map_matches_diffusers_converter_and_inverts():
    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2)
    state = vae.state_dict()
    ldm = sd_keys.vae_to_ldm(state, vae.config)
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    ref = convert_ldm_vae_checkpoint(dict(ldm), dict(vae.config))
    assert set(ref) == set(state) and all(torch.equal(ref[k], state[k]) for k in state)
    back = sd_keys.vae_from_ldm(_strip(ldm, sd_keys.VAE_PREFIX), vae.config)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_inferred_unet_config_matches():
    unet = _sd15_like_unet()
    cfg = sd_infer.infer_unet_config(_strip(sd_keys.unet_to_ldm(unet.state_dict(), unet.config),
                                            sd_keys.UNET_PREFIX), v2=False)
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                "cross_attention_dim", "attention_head_dim", "use_linear_projection", "in_channels"):
        assert list(cfg[key]) == list(unet.config[key]) if isinstance(cfg[key], list) else cfg[key] == unet.config[key]


def test_single_file_round_trip_is_bit_exact(tmp_path, tiny_sd1):
    path = tmp_path / "m.safetensors"
    save_sd_single_file(path, tiny_sd1)
    tiny_sd1.tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    keys = set(load_file(str(path)))
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    loaded = load_sd_model(str(path))
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(tiny_sd1, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    # saving the loaded model again gives the same file contents
    save_sd_single_file(tmp_path / "again.safetensors", loaded)
    again = load_file(str(tmp_path / "again.safetensors"))
    first = load_file(str(path))
    assert set(again) == set(first) and all(torch.equal(again[k], first[k]) for k in first)


def test_diffusers_from_single_file_reads_our_file(tmp_path, tiny_sd1):
    path = tmp_path / "m.safetensors"
    save_sd_single_file(path, tiny_sd1)
    tiny_sd1.unet.save_config(str(tmp_path / "unet_cfg"))
    unet = UNet2DConditionModel.from_single_file(str(path), config=str(tmp_path / "unet_cfg"))
    ours = tiny_sd1.unet.state_dict()
    assert all(torch.equal(unet.state_dict()[k], ours[k]) for k in ours)


def test_bad_files_are_reported(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        read_state_dict(tmp_path / "missing.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\xff" * 64)
    with pytest.raises(UserError, match="corrupt safetensors header"):
        read_state_dict(broken)
    other = tmp_path / "other.safetensors"
    save_file({"conditioner.embedders.0.transformer.x": torch.zeros(1),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(other))
    with pytest.raises(UserError, match="looks like: sdxl.*sdxl_train_network.py"):
        load_sd_model(str(other))


def test_pickle_needing_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this would run on an unsafe load",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": Evil()}}, str(path))
    with pytest.raises(UserError, match="could not be loaded safely"):
        read_state_dict(path)


def test_real_sd15_layout_matches_shipped_config():
    """The full-size SD1.5 architecture (on the meta device): our ldm key names are the real file's
    names, and the config inferred from their shapes is the shipped one."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = sd_infer.shipped_config("sd15_unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
        vae = AutoencoderKL(**sd_infer.shipped_config("sd15_vae"))
        clip = CLIPTextModel(CLIPTextConfig(**sd_infer.shipped_config("clip_l_text")))
    ldm = sd_keys.unet_to_ldm(unet.state_dict(), unet.config)
    # a few names every SD1.5 single file has
    for key in ("model.diffusion_model.input_blocks.3.0.op.weight",
                "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
                "model.diffusion_model.middle_block.1.proj_out.weight",
                "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.2.weight",
                "model.diffusion_model.out.2.weight", "model.diffusion_model.time_embed.2.bias"):
        assert key in ldm
    assert len(ldm) == 686  # the number of UNet tensors in v1-5-pruned-emaonly.safetensors
    inferred = sd_infer.infer_unet_config(_strip(ldm, sd_keys.UNET_PREFIX), v2=False)
    for key, value in cfg.items():
        got = inferred[key]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == value, key
    vae_ldm = sd_keys.vae_to_ldm(vae.state_dict(), vae.config)
    assert len(vae_ldm) == 248 and "first_stage_model.encoder.down.3.block.1.conv2.weight" in vae_ldm
    clip_ldm = sd_keys.clip_to_ldm(clip.state_dict())
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in clip_ldm
    assert len(clip_ldm) == 196


def test_sd2_single_file_round_trip_and_diffusers_reference(tmp_path, tiny_sd2):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextModel

    parts = tiny_sd2
    path = tmp_path / "sd2.safetensors"
    save_sd_single_file(path, parts)
    parts.tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    original = load_file(str(path))
    assert "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight" in original  # the unused layer
    assert original["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 2  # linear projection
    loaded = load_sd_model(str(path))
    assert loaded.v2 and loaded.text_encoder.config.num_hidden_layers == 2
    assert loaded.tokenizer.pad_token_id == 0
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(parts, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    save_sd_single_file(tmp_path / "again.safetensors", loaded)
    again = load_file(str(tmp_path / "again.safetensors"))
    assert set(again) == set(original) and all(torch.equal(again[k], original[k]) for k in original)
    # diffusers' own OpenCLIP converter gives the same text-encoder weights
    ref = convert_open_clip_checkpoint(CLIPTextModel(loaded.text_encoder.config), dict(original))
    ref_state = ref if isinstance(ref, dict) else ref.state_dict()
    ours = loaded.text_encoder.state_dict()
    flat_ref = {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in ref_state.items()}
    for key, value in ours.items():
        assert torch.equal(flat_ref[key], value), key


def test_separate_vae_in_every_layout(tmp_path, tiny_sd1):
    from library.models.sd_loading import load_vae

    vae = tiny_sd1.vae
    ref = vae.state_dict()
    ldm = sd_keys.vae_to_ldm(ref, vae.config)
    save_file(dict(ldm), str(tmp_path / "prefixed.safetensors"))
    save_file(_strip(ldm, sd_keys.VAE_PREFIX), str(tmp_path / "bare.safetensors"))  # like vae-ft-mse files
    save_file({k: v.contiguous() for k, v in ref.items()}, str(tmp_path / "diffusers_keys.safetensors"))
    vae.save_pretrained(str(tmp_path / "folder"))
    for source in ("prefixed.safetensors", "bare.safetensors", "diffusers_keys.safetensors", "folder"):
        got = load_vae(str(tmp_path / source)).state_dict()
        assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref), source
    with pytest.raises(UserError, match="makes 16-channel latents, this model needs 4"):
        AutoencoderKL(latent_channels=16, block_out_channels=(32,), norm_num_groups=32).save_pretrained(
            str(tmp_path / "sd3ish"))
        load_vae(str(tmp_path / "sd3ish"))
    save_file({"something.else": torch.zeros(2)}, str(tmp_path / "nothing.safetensors"))
    with pytest.raises(UserError, match="holds no VAE"):
        load_vae(str(tmp_path / "nothing.safetensors"))


def test_diffusers_folder_save_and_load(tmp_path, tiny_sd1):
    from diffusers import StableDiffusionPipeline

    from library.families.sd import SDFamily, SDOptions
    from library.maths.noise import DDPMOptions
    from library.models.sd_loading import save_sd_diffusers

    folder = tmp_path / "pipe"
    save_sd_diffusers(folder, tiny_sd1, prediction_type="v_prediction")
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    loaded = load_sd_model(str(folder))
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(tiny_sd1, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert loaded.prediction_type == "v_prediction" and not loaded.v2
    with pytest.raises(UserError, match="v-prediction model .* add --v_parameterization"):
        SDFamily().load(str(folder), torch.float32, None)
    SDFamily(SDOptions(ddpm=DDPMOptions(v_parameterization=True))).load(str(folder), torch.float32, None)
    save_sd_diffusers(tmp_path / "half", tiny_sd1, dtype=torch.float16)
    half = load_file(str(tmp_path / "half" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float16 for v in half.values())


def test_fp8_stored_weights_load_to_the_compute_dtype(tmp_path, tiny_sd1):
    path = tmp_path / "m.safetensors"
    save_sd_single_file(path, tiny_sd1, dtype=torch.float8_e4m3fn)
    tiny_sd1.tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    loaded = load_sd_model(str(path), torch.bfloat16)
    ref = tiny_sd1.unet.state_dict()
    for key, value in loaded.unet.state_dict().items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, ref[key].to(torch.float8_e4m3fn).to(torch.bfloat16)), key


def test_missing_tokenizer_is_explained(tmp_path, tiny_sd1, monkeypatch):
    from dataclasses import replace

    from library.models import tokenizers

    # a hub id that is in no cache
    monkeypatch.setitem(tokenizers.SPECS, "clip_l", replace(tokenizers.SPECS["clip_l"], hub_id="no-such-org/no-such"))
    path = tmp_path / "m.safetensors"
    save_sd_single_file(path, tiny_sd1)
    with pytest.raises(UserError, match="no clip_l tokenizer found .* --tokenizer_cache_dir"):
        load_sd_model(str(path))
    tiny_sd1.tokenizer.save_pretrained(str(tmp_path / "elsewhere"))
    assert load_sd_model(str(path), tokenizer_dir=str(tmp_path / "elsewhere")).tokenizer is not None


def test_hub_id_loads_from_the_offline_cache(tmp_path, tiny_sd1):
    """A hub id resolves from the Hugging Face cache with HF_HUB_OFFLINE=1 (the layout
    huggingface_hub writes: models--org--name/refs/main + snapshots/<commit>/...)."""
    import shutil
    import subprocess
    import sys

    from library.models.sd_loading import save_sd_diffusers
    from tests.conftest import ROOT

    save_sd_diffusers(tmp_path / "pipe", tiny_sd1)
    repo = tmp_path / "cache" / "models--someone--tiny-sd15"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tmp_path / "pipe", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = ("import torch; from library.models.sd_loading import load_sd_model; "
            "p = load_sd_model('someone/tiny-sd15'); print(p.unet.conv_in.weight.sum().item(), len(p.tokenizer))")
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    total, vocab = proc.stdout.split()
    assert float(total) == pytest.approx(tiny_sd1.unet.conv_in.weight.sum().item(), rel=1e-6)
    assert int(vocab) == len(tiny_sd1.tokenizer)
    env["HF_HUB_CACHE"] = str(tmp_path / "empty")
    missing = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert missing.returncode != 0 and "could not load a diffusers model from someone/tiny-sd15" in missing.stderr


def test_ema_copy_and_other_tensors_are_not_read(tmp_path, tiny_sd1, monkeypatch):
    """An original SD1.5 file also holds an EMA copy of the UNet (``model_ema.*``): the loader reads
    only the tensors its modules are built from, cast to the load dtype as each is read."""
    from library.utils import safetensors_io

    path = tmp_path / "m.safetensors"
    save_sd_single_file(path, tiny_sd1, dtype=torch.float16)
    tiny_sd1.tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    state = load_file(str(path))
    state["model_ema.decay"] = torch.tensor(0.9999)
    state.update({f"model_ema.diffusion_model{k[len('model.diffusion_model'):].replace('.', '')}": v.clone()
                  for k, v in state.items() if k.startswith("model.diffusion_model.")})
    save_file(state, str(path))
    read = []
    original = safetensors_io.iter_tensors

    def spy(*args, **kwargs):
        for key, tensor in original(*args, **kwargs):
            read.append(key)
            yield key, tensor

    monkeypatch.setattr(safetensors_io, "iter_tensors", spy)
    loaded = load_sd_model(str(path), torch.float32)
    assert read and not [k for k in read if k.startswith("model_ema")]
    unet = loaded.unet.state_dict()
    assert all(v.dtype == torch.float32 for v in unet.values())
    ours = tiny_sd1.unet.state_dict()
    assert all(torch.equal(unet[k], ours[k].half().float()) for k in ours)
