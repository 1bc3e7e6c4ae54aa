"""SD3/SD3.5 single files, with bundled or separate text encoders: load from shapes, save bit for bit."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.models.sd3_loading import TE_PREFIXES, load_sd3_single_file, save_sd3_single_file
from library.models.tiny import make_tiny_sd3
from library.utils.errors import UserError


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("sd35", [False, True])
def test_bundled_round_trip(tmp_path, sd35):
    parts = make_tiny_sd3(seed=1, sd35_medium=sd35)
    path = tmp_path / "sd3.safetensors"
    save_sd3_single_file(path, parts)
    original = load_file(str(path))
    assert "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" \
        in original
    assert "first_stage_model.quant_conv.weight" not in original
    loaded = load_sd3_single_file(path)
    for name in ("transformer", "vae", "clip_l", "clip_g", "t5xxl"):
        assert _same(getattr(parts, name), getattr(loaded, name)), name
    assert loaded.vae.config.latent_channels == 16 and loaded.vae.config.shift_factor == pytest.approx(0.0609)
    assert loaded.clip_l.config.hidden_act == "quick_gelu" and loaded.clip_g.config.hidden_act == "gelu"
    assert bool(loaded.transformer.config.qk_norm) == sd35
    save_sd3_single_file(tmp_path / "again.safetensors", loaded)
    again = load_file(str(tmp_path / "again.safetensors"))
    assert set(again) == set(original) and all(torch.equal(again[k], original[k]) for k in original)


def test_separate_encoders_and_missing_ones(tmp_path):
    parts = make_tiny_sd3(seed=2)
    bare = tmp_path / "bare.safetensors"
    save_sd3_single_file(bare, parts, bundle_text_encoders=False)
    with pytest.raises(UserError, match="no bundled clip_l and clip_g: pass --clip_l <file> --clip_g <file>"):
        load_sd3_single_file(bare)
    for name in ("clip_l", "clip_g", "t5xxl"):
        state = {k: v for k, v in getattr(parts, name).state_dict().items() if k != "shared.weight"}  # tied to T5's
        if name == "clip_g":  # one file with the bundled prefix, the others bare
            state = {TE_PREFIXES[name] + k: v for k, v in state.items()}
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / f"{name}.safetensors"))
    files = {name: str(tmp_path / f"{name}.safetensors") for name in ("clip_l", "clip_g", "t5xxl")}
    loaded = load_sd3_single_file(bare, **files)
    for name in ("clip_l", "clip_g", "t5xxl", "transformer"):
        assert _same(getattr(parts, name), getattr(loaded, name)), name
    no_t5 = load_sd3_single_file(bare, clip_l=str(tmp_path / "clip_l.safetensors"),
                                 clip_g=str(tmp_path / "clip_g.safetensors"))
    assert no_t5.t5xxl is None  # T5 is optional (SD3 trains with zeros in its place)


def test_other_families_are_refused(tmp_path, tiny_sd1):
    from library.models.sd_loading import save_sd_single_file

    save_sd_single_file(tmp_path / "sd1.safetensors", tiny_sd1)
    with pytest.raises(UserError, match="not an SD3 checkpoint .*looks like: sd1"):
        load_sd3_single_file(tmp_path / "sd1.safetensors")


def test_separate_encoders_in_original_layouts(tmp_path, tiny_sd1):
    """--clip_g in OpenCLIP's own layout (fused q/k/v, text_projection, SDXL's prefix) and --clip_l
    with the SD single-file prefix load to the same weights; an encoder without projection (SD1's
    CLIP-L) is refused with the reason."""
    from library.models import sd_keys
    from library.models.sd_loading import save_sd_single_file

    parts = make_tiny_sd3(seed=3)
    bare = tmp_path / "bare.safetensors"
    save_sd3_single_file(bare, parts, bundle_text_encoders=False)
    g = dict(parts.clip_g.state_dict())
    projection = g.pop("text_projection.weight").T.contiguous()
    open_clip = sd_keys.open_clip_to_ldm(g, {"text_projection": projection})
    open_clip = {"conditioner.embedders.1.model." + k[len(sd_keys.OPEN_CLIP_PREFIX):]: v for k, v in open_clip.items()}
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in open_clip
    save_file({k: v.contiguous() for k, v in open_clip.items()}, str(tmp_path / "clip_g_openclip.safetensors"))
    clip_l = {"cond_stage_model.transformer." + k: v.contiguous() for k, v in parts.clip_l.state_dict().items()}
    save_file(clip_l, str(tmp_path / "clip_l_ldm.safetensors"))
    loaded = load_sd3_single_file(bare, clip_l=str(tmp_path / "clip_l_ldm.safetensors"),
                                  clip_g=str(tmp_path / "clip_g_openclip.safetensors"))
    assert _same(parts.clip_g, loaded.clip_g) and _same(parts.clip_l, loaded.clip_l)
    save_sd_single_file(tmp_path / "sd1.safetensors", tiny_sd1)
    with pytest.raises(UserError, match="sd1.safetensors: this clip_l has no text_projection"):
        load_sd3_single_file(bare, clip_l=str(tmp_path / "sd1.safetensors"),
                             clip_g=str(tmp_path / "clip_g_openclip.safetensors"))


def test_diffusers_folder_round_trip_and_from_single_file(tmp_path):
    """save_sd3_diffusers writes a folder StableDiffusion3Pipeline opens and our loader reads back bit
    for bit; diffusers' from_single_file reads our single file to the same MMDiT and VAE."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

    from library.models.sd3_loading import load_sd3_model, save_sd3_diffusers

    parts = make_tiny_sd3(seed=4, sd35_medium=True)
    save_sd3_diffusers(tmp_path / "sd3", parts)
    loaded = load_sd3_model(str(tmp_path / "sd3"))
    for name in ("transformer", "vae", "clip_l", "clip_g", "t5xxl"):
        assert _same(getattr(parts, name), getattr(loaded, name)), name
    assert loaded.tokenizers["clip_g"].pad_token == "!" and loaded.model_type() == "5-medium"
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "sd3"))
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.shift == 3.0
    path = tmp_path / "sd3.safetensors"
    save_sd3_single_file(path, parts)
    parts.transformer.save_config(str(tmp_path / "mmdit_cfg"))
    parts.vae.save_config(str(tmp_path / "vae_cfg"))
    theirs = SD3Transformer2DModel.from_single_file(str(path), config=str(tmp_path / "mmdit_cfg"))
    vae = AutoencoderKL.from_single_file(str(path), config=str(tmp_path / "vae_cfg"))
    assert _same(theirs, parts.transformer) and _same(vae, parts.vae)
