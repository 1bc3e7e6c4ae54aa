"""networks/merge_lora.py: a LoRA merged into a checkpoint gives what the LoRA gives at run time (the
merged file read by diffusers' own from_single_file), for SD1, SDXL and SD3; LoRAs merged into one
LoRA by stacking ranks (exact) or by kohya's same-rank sum; bad input refused before loading."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.models.sd3_loading import save_sd3_single_file
from library.models.sd_loading import save_sd_single_file
from library.models.sdxl_loading import save_sdxl_single_file
from library.models.tiny import make_tiny_sd1, make_tiny_sd3, make_tiny_sdxl
from library.utils.errors import UserError
from networks import lora, lora_sd3, merge_lora
from networks.lora_merge import lora_modules, update_of
from tests.conftest import kohya_hashes

RATIO = 0.7


def _family(name: str):
    """(fresh parts maker, saver, the parts' text encoders and denoiser, network module)."""
    if name == "sd1":
        return (lambda: make_tiny_sd1(seed=0), save_sd_single_file, lambda p: ([p.text_encoder], p.unet), lora)
    if name == "sdxl":
        return (lambda: make_tiny_sdxl(seed=0), save_sdxl_single_file,
                lambda p: ([p.text_encoder_1, p.text_encoder_2], p.unet), lora)
    return (lambda: make_tiny_sd3(seed=0), save_sd3_single_file,
            lambda p: ([p.clip_l, p.clip_g, p.t5xxl], p.transformer), lora_sd3)


def _denoise(name: str, denoiser, generator_seed=5):
    torch.manual_seed(generator_seed)
    with torch.no_grad():
        if name == "sd3":
            return denoiser(hidden_states=torch.randn(1, 16, 8, 8), encoder_hidden_states=torch.randn(1, 10, 128),
                            pooled_projections=torch.randn(1, 64), timestep=torch.tensor([300.0])).sample
        context = torch.randn(1, 7, denoiser.config.cross_attention_dim)
        extra = {}
        if name == "sdxl":
            extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, 6)}
        return denoiser(torch.randn(1, 4, 8, 8), torch.tensor([300]), context, **extra).sample


def _text(encoder):
    ids = torch.arange(2, 12)[None]
    with torch.no_grad():
        return encoder(ids, output_hidden_states=True).hidden_states[-1]


@pytest.mark.parametrize("name", ["sd1", "sdxl", "sd3"])
def test_merged_checkpoint_equals_the_lora_at_run_time(name, tmp_path):
    make, save, parts_of, module = _family(name)
    base = make()
    save(tmp_path / "model.safetensors", base)
    tes, denoiser = parts_of(base)
    te = tes[0] if len(tes) == 1 else tes
    net = module.create_network(1.0, 4, 2, None, te, denoiser)
    torch.manual_seed(1)
    for m in net.all_loras():
        torch.nn.init.normal_(m.lora_up.weight, std=0.3)
    net.save_weights(str(tmp_path / "lora.safetensors"), None, {})
    net.apply_to(te, denoiser)
    net.set_multiplier(RATIO)
    expected, expected_text = _denoise(name, denoiser), _text(tes[0])
    merge_lora.main(["--sd_model", str(tmp_path / "model.safetensors"), "--models", str(tmp_path / "lora.safetensors"),
                     "--ratios", str(RATIO), "--save_to", str(tmp_path / "merged.safetensors")])
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel  # diffusers' own single-file reader

    denoiser.save_config(str(tmp_path / "cfg"))
    cls = SD3Transformer2DModel if name == "sd3" else UNet2DConditionModel
    theirs = cls.from_single_file(str(tmp_path / "merged.safetensors"), config=str(tmp_path / "cfg"))
    got = _denoise(name, theirs)
    assert (expected - _denoise(name, parts_of(make())[1])).abs().max() > 1e-3  # the LoRA changes the output
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    from library.models.checkpoints import read_checkpoint

    merged_text = _text(read_checkpoint(tmp_path / "merged.safetensors").text_encoders[0])
    torch.testing.assert_close(merged_text, expected_text, rtol=1e-4, atol=1e-5)
    with safe_open(str(tmp_path / "merged.safetensors"), "pt") as f:
        assert '"ratio": 0.7' in f.metadata()["merged_loras"]


def _lora_file(path, tiny, dim, alpha, seed):
    net = lora.create_network(1.0, dim, alpha, None, tiny.text_encoder, tiny.unet)
    torch.manual_seed(seed)
    for m in net.all_loras():
        torch.nn.init.normal_(m.lora_up.weight, std=0.2)
    net.save_weights(str(path), None, {"ss_base_model_version": "sd_v1"})
    return lora_modules(load_file(str(path)), str(path))


def test_loras_into_one(tmp_path, tiny_sd1):
    a = _lora_file(tmp_path / "a.safetensors", tiny_sd1, 4, 2, 1)
    b = _lora_file(tmp_path / "b.safetensors", tiny_sd1, 2, 1, 2)
    merge_lora.main(["--models", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--ratios", "0.5",
                     "1.5", "--concat", "--save_to", str(tmp_path / "ab.safetensors")])
    ab = lora_modules(load_file(str(tmp_path / "ab.safetensors")), "ab")
    for name, (down, up, alpha) in ab.items():
        assert down.shape[0] == 6 and alpha == 6
        expected = 0.5 * update_of(*a[name]) + 1.5 * update_of(*b[name])
        torch.testing.assert_close(update_of(down, up, alpha), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="the files have ranks \\[2, 4\\] there; merge with --concat"):
        merge_lora.main(["--models", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                         "--save_to", str(tmp_path / "x.safetensors")])
    c = _lora_file(tmp_path / "c.safetensors", tiny_sd1, 4, 4, 3)
    merge_lora.main(["--models", str(tmp_path / "a.safetensors"), str(tmp_path / "c.safetensors"), "--ratios", "1",
                     "-0.5", "--save_to", str(tmp_path / "ac.safetensors")])
    ac = lora_modules(load_file(str(tmp_path / "ac.safetensors")), "ac")
    name = next(iter(ac))
    (da, ua, _), (dc, uc, _) = a[name], c[name]
    sa, sc = (2 / 4) / (2 / 4) * 1.0, (4 / 4) / (2 / 4) * -0.5  # each file's share of the kept scale 2/4
    root_a, root_c = sa ** 0.5, abs(sc) ** 0.5
    torch.testing.assert_close(ac[name][0], root_a * da + root_c * dc)
    torch.testing.assert_close(ac[name][1], root_a * ua - root_c * uc)
    assert ac[name][2] == 2.0  # rank 4 and the first file's alpha kept
    merge_lora.main(["--models", str(tmp_path / "a.safetensors"), "--ratios", "0.3", "--save_to",
                     str(tmp_path / "a3.safetensors")])
    a3 = lora_modules(load_file(str(tmp_path / "a3.safetensors")), "a3")
    for name, value in a3.items():  # one file: exactly ratio x its update
        torch.testing.assert_close(update_of(*value), 0.3 * update_of(*a[name]), rtol=1e-5, atol=1e-7)
    with safe_open(str(tmp_path / "ab.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sd_v1" and '"ratio": 1.5' in meta["ss_merged_from"]
    assert len(meta["sshs_model_hash"]) == 64


def test_bad_input_is_refused_before_loading(tmp_path, tiny_sd1, monkeypatch):
    _lora_file(tmp_path / "sd1.safetensors", tiny_sd1, 4, 1, 1)
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(4, 2)}, str(sdxl))
    save_sd_single_file(tmp_path / "model.safetensors", tiny_sd1)
    monkeypatch.setattr(merge_lora, "read_checkpoint", lambda *a, **k: pytest.fail("the checkpoint was loaded"))
    cases = [
        (["--models", str(tmp_path / "sd1.safetensors"), str(sdxl)], "LoRAs of different model families"),
        (["--models", str(sdxl), "--sd_model", str(tmp_path / "model.safetensors")],
         "--models are SDXL LoRAs, --sd_model"),
        (["--models", str(sdxl), "--ratios", "1", "2"], "--ratios: 2 values for 1 --models"),
        (["--models", str(sdxl), "--sd_model", str(tmp_path / "model.safetensors"), "--concat"],
         "--concat / --shuffle are for merging LoRAs into one LoRA"),
        (["--models", str(tmp_path / "missing.safetensors")], "missing.safetensors: file not found"),
    ]
    for argv, message in cases:
        with pytest.raises(UserError, match=message):
            merge_lora.main([*argv, "--save_to", str(tmp_path / "out.safetensors")])
    with pytest.raises(UserError, match="is one of the inputs"):
        merge_lora.main(["--models", str(sdxl), "--save_to", str(sdxl)])
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10" * 40)
    with pytest.raises(UserError, match="broken.safetensors: cannot be read as a LoRA file"):
        merge_lora.main(["--models", str(broken), "--save_to", str(tmp_path / "out.safetensors")])
    assert not (tmp_path / "out.safetensors").exists()


def test_block_weights(tmp_path, tiny_sd1):
    """--lbws: each module's update times its block's strength (LoRA Block Weight names: BASE = text
    encoders, IN01 = down_blocks.0.attentions.0, ...), into a LoRA and into a checkpoint alike."""
    from networks.block_lr import lbw_block, parse_lbw

    a = _lora_file(tmp_path / "a.safetensors", tiny_sd1, 4, 2, 1)
    assert lbw_block("lora_unet_down_blocks_0_attentions_0_proj_in", False) == "IN01"
    assert lbw_block("lora_unet_up_blocks_1_attentions_2_proj_out", False) == "OUT05"
    assert lbw_block("lora_unet_mid_block_attentions_0_proj_in", False) == "MID"
    assert lbw_block("lora_unet_output_blocks_2_1_proj_in", True) == "OUT02"
    weights = "[0.5,0,1,1,1,1,1,2,1,1,1,1,1,1,1,1,1]"  # BASE 0.5, IN01 0, MID 2
    assert parse_lbw(weights, False)["IN00"] == 1.0  # blocks the short form leaves out
    merge_lora.main(["--models", str(tmp_path / "a.safetensors"), "--lbws", weights, "--save_to",
                     str(tmp_path / "w.safetensors")])
    w = lora_modules(load_file(str(tmp_path / "w.safetensors")), "w")
    strength = parse_lbw(weights, False)
    for name, value in a.items():
        torch.testing.assert_close(update_of(*w[name]), strength[lbw_block(name, False)] * update_of(*value),
                                   rtol=1e-5, atol=1e-7)
    with pytest.raises(UserError, match="--lbws \\(a.safetensors\\) \\[1,1\\]: 2 values; SD1/SD2 LoRAs take 26 or 17"):
        merge_lora.main(["--models", str(tmp_path / "a.safetensors"), "--lbws", "[1,1]", "--save_to",
                         str(tmp_path / "x.safetensors")])


def test_a_lora_of_another_model_is_named(tmp_path, tiny_sd1, tiny_sd2, monkeypatch):
    """Found on a skeleton of the checkpoint built from its header: no weight is read."""
    _lora_file(tmp_path / "sd1.safetensors", tiny_sd1, 4, 1, 1)
    save_sd_single_file(tmp_path / "sd2.safetensors", tiny_sd2)
    real = merge_lora.read_checkpoint
    monkeypatch.setattr(merge_lora, "read_checkpoint", lambda *a, skeleton=False, **k: real(*a, skeleton=True, **k)
                        if skeleton else pytest.fail("the checkpoint was loaded"))
    with pytest.raises(UserError, match="sd1.safetensors: its tensors do not fit"):
        merge_lora.main(["--sd_model", str(tmp_path / "sd2.safetensors"), "--models", str(tmp_path / "sd1.safetensors"),
                         "--save_to", str(tmp_path / "x.safetensors")])
    assert not (tmp_path / "x.safetensors").exists()


def test_a_half_precision_file_is_rounded_once(tmp_path, tiny_sd1):
    """An fp16 checkpoint is held in fp16 (memory of one model); each merged weight is the float32
    sum rounded once to fp16, and the file carries its own hashes."""
    save_sd_single_file(tmp_path / "model.safetensors", tiny_sd1, dtype=torch.float16)
    modules = _lora_file(tmp_path / "lora.safetensors", tiny_sd1, 4, 1, 1)
    merge_lora.main(["--sd_model", str(tmp_path / "model.safetensors"), "--models", str(tmp_path / "lora.safetensors"),
                     "--ratios", "0.5", "--save_to", str(tmp_path / "merged.safetensors")])
    before, after = load_file(str(tmp_path / "model.safetensors")), load_file(str(tmp_path / "merged.safetensors"))
    assert all(v.dtype == torch.float16 for v in after.values())
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"  # down_blocks.0.attentions.0.proj_in
    update = update_of(*modules["lora_unet_down_blocks_0_attentions_0_proj_in"]).float()
    expected = (before[key].float() + 0.5 * update.reshape(before[key].shape)).half()
    # our merge and this reference form the float32 update with other kernels, so a sum lying on an fp16
    # rounding boundary may round the other way: allow that for a few elements, by one fp16 step at most
    differ = after[key] != expected
    assert differ.float().mean() < 0.01
    step = torch.finfo(torch.float16).eps * expected.float().abs().clamp_min(2 ** -14)
    assert ((after[key].float() - expected.float()).abs() <= step).all()
    with safe_open(str(tmp_path / "merged.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == kohya_hashes(after, meta)
    assert '"ratio": 0.5' in meta["merged_loras"]
