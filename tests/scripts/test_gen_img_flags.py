"""gen_img.py's remaining kohya flags on the tiny models: each changes what it says it changes (or
gives the same images where it only changes how they are computed), and is refused where it cannot
apply."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from tests.scripts.test_gen_img import sd1_lora  # noqa: F401  (fixture)
from tests.scripts.test_gen_img_tricks import _gen, _pixels


@pytest.fixture(scope="module")
def sd1(tiny_default) -> str:
    return str(tiny_default / "model" / "tiny-sd15.safetensors")


def _images(ckpt: str, out, *args: str, prompt: str = "red circle") -> list[np.ndarray]:
    assert _gen("--ckpt", ckpt, "--prompt", prompt, "--W", "64", "--H", "64", "--steps", "4", "--seed", "7",
                "--outdir", str(out), "--sequential_file_name", *args) == 0
    return [_pixels(p) for p in sorted(out.glob("im_*.png"))]


def _diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


def test_sampler_flags(sd1, tmp_path):
    plain = _images(sd1, tmp_path / "plain")[0]
    assert "original-width" not in Image.open(tmp_path / "plain" / "im_000001.png").text  # SDXL's fields only
    assert np.array_equal(_images(sd1, tmp_path / "eta0", "--ddim_eta", "0")[0], plain)  # ddim's default eta
    eta = _images(sd1, tmp_path / "eta1", "--ddim_eta", "1")[0]
    assert _diff(eta, plain) > 5 and np.array_equal(eta, _images(sd1, tmp_path / "eta1b", "--ddim_eta", "1")[0])
    assert _diff(_images(sd1, tmp_path / "zero", "--force_scheduler_zero_steps_offset")[0], plain) > 0
    # how things are computed, not what: the same images
    assert _diff(_images(sd1, tmp_path / "cl", "--opt_channels_last", "--no_preview")[0], plain) <= 1


def test_vae_batch_size_decodes_in_parts_with_the_same_images(sd1, tmp_path):
    whole = _images(sd1, tmp_path / "whole", "--images_per_prompt", "3", "--batch_size", "3")
    for size in ("1", "0.5"):
        parts = _images(sd1, tmp_path / f"parts{size}", "--images_per_prompt", "3", "--batch_size", "3",
                        "--vae_batch_size", size)
        assert len(parts) == 3 and all(_diff(a, b) <= 1 for a, b in zip(whole, parts))


def test_emb_normalize_mode_runs_and_leaves_plain_prompts_alone(sd1, tmp_path):
    # the modes' maths: tests/unit/test_clip_text.py; here the flag reaches generation
    weighted = "(red:1.6) circle"
    assert _diff(_images(sd1, tmp_path / "abs", "--emb_normalize_mode", "abs", prompt=weighted)[0],
                 _images(sd1, tmp_path / "orig", prompt=weighted)[0]) > 0
    assert np.array_equal(_images(sd1, tmp_path / "none_plain", "--emb_normalize_mode", "none")[0],
                          _images(sd1, tmp_path / "plain")[0])


def test_sdxl_size_flags_are_line_defaults(tiny_family_models, sd1, tmp_path, capsys):
    from library.generation.checks import with_size_defaults
    from library.generation.prompt_lines import parse_gen_line

    args = type("A", (), {"original_width": 512, "original_height": 384, "original_width_negative": None,
                          "original_height_negative": 256, "crop_top": 8, "crop_left": None})()
    plain, own = with_size_defaults([parse_gen_line("x"), parse_gen_line("x --ow 1024 --cl 4")], args)
    assert (plain.original_size, plain.negative_original_size, plain.crop) == ((512, 384), (None, 256), (8, 0))
    assert (own.original_size, own.crop) == ((1024, 384), (8, 4))
    xl = str(tiny_family_models["sdxl"])
    base = _images(xl, tmp_path / "xl")[0]
    sized = _images(xl, tmp_path / "xl_sized", "--original_width", "256", "--original_height", "256")[0]
    text = Image.open(tmp_path / "xl_sized" / "im_000001.png").text  # kohya's SDXL PNG fields
    assert {k: text[k] for k in ("original-width", "original-height", "original-width-negative", "crop-top")} == \
        {"original-width": "256", "original-height": "256", "original-width-negative": "256", "crop-top": "0"}
    assert np.array_equal(sized, _images(xl, tmp_path / "xl_line", prompt="red circle --ow 256 --oh 256")[0])
    assert _diff(sized, base) > 0
    assert _gen("--ckpt", sd1, "--prompt", "x", "--outdir", str(tmp_path / "o"), "--crop_top", "8") == 2
    assert "--crop_top: SDXL's size conditioning; this sd model has none" in capsys.readouterr().err


def test_sd3_refuses_the_unet_sampler_flags(tiny_family_models, tmp_path, capsys):
    sd3 = str(tiny_family_models["sd3"])
    assert _gen("--ckpt", sd3, "--prompt", "x", "--outdir", str(tmp_path / "o"), "--ddim_eta", "0.5",
                "--emb_normalize_mode", "abs") == 2
    assert "--ddim_eta, --emb_normalize_mode: for SD1/SD2/SDXL models" in capsys.readouterr().err


def test_use_original_file_name(sd1, tmp_path):
    folder = tmp_path / "inits"
    folder.mkdir()
    for name, colour in (("apple", (200, 0, 0)), ("sky", (0, 0, 200))):
        Image.new("RGB", (64, 64), colour).save(folder / f"{name}.png")
    assert _gen("--ckpt", sd1, "--prompt", "red circle", "--images_per_prompt", "2", "--W", "64", "--H", "64",
                "--steps", "2", "--image_path", str(folder), "--use_original_file_name",
                "--outdir", str(tmp_path / "o")) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["apple.png", "sky_1.png"]


def test_lora_flags(sd1, sd1_lora, tmp_path, caplog, capsys):  # noqa: F811
    one, two = sd1_lora
    both = ("--network_weights", one, two, "--network_mul", "0.7", "0.5")
    hooked = _images(sd1, tmp_path / "hooked", *both)[0]
    with caplog.at_level(logging.INFO):
        first_merged = _images(sd1, tmp_path / "n1", *both, "--network_merge_n_models", "1", "--network_show_meta")[0]
    assert _diff(first_merged, hooked) <= 2
    assert "lora1.safetensors metadata: {" in caplog.text and "sshs_model_hash" in caplog.text
    # the second LoRA is still hooked: --am may change it, not the merged first one
    second_off = _images(sd1, tmp_path / "am", *both, "--network_merge_n_models", "1", prompt="red circle --am 0.7,0")
    assert np.array_equal(second_off, _images(sd1, tmp_path / "only1", "--network_weights", one,
                                              "--network_mul", "0.7", "--network_merge"))
    code = _gen("--ckpt", sd1, "--prompt", "x --am 0,0", "--W", "64", "--H", "64", "--steps", "2",
                "--outdir", str(tmp_path / "bad"), *both, "--network_merge_n_models", "1")
    assert code == 1 and "cannot change the strength of merged LoRA lora1" in capsys.readouterr().err
    assert _gen("--ckpt", sd1, "--prompt", "x", "--outdir", str(tmp_path / "args"), "--network_weights", one,
                "--network_args", "conv_dim=4") == 2
    assert "networks.lora takes its shape from the file" in capsys.readouterr().err


def test_network_pre_calc_equals_hooks_and_follows_line_strengths(sd1, sd1_lora, tmp_path):  # noqa: F811
    from tests.scripts.test_gen_img import _prompts

    one, two = sd1_lora
    lines = _prompts(tmp_path, "red circle --d 7\nred circle --d 7 --am 0.3,1\nred circle --d 7 --am 0\n")
    runs = {}
    for label, extra in (("hooked", ()), ("pre", ("--network_pre_calc",))):
        assert _gen("--ckpt", sd1, "--from_file", lines, "--W", "64", "--H", "64", "--steps", "4",
                    "--outdir", str(tmp_path / label), "--sequential_file_name", "--network_weights", one, two,
                    "--network_mul", "0.7", "0.5", *extra) == 0
        runs[label] = [_pixels(tmp_path / label / f"im_00000{i}.png") for i in (1, 2, 3)]
    plain = _images(sd1, tmp_path / "plain")[0]
    for hooked, pre in zip(runs["hooked"], runs["pre"]):
        assert _diff(hooked, pre) <= 2
    assert _diff(runs["pre"][0], runs["pre"][1]) > 5  # the second line's strengths were used
    assert np.array_equal(runs["pre"][2], plain)  # --am 0 after two additions: the weights were restored


def test_lycoris_generates_hooked_and_merged_through_the_adapter(sd1, tmp_path):
    """A third-party plug-in (lycoris.kohya, LoHa) goes through the same NetworkAdapter: hooked, at a
    line strength (--am 0 gives the plain image), and merged by kohya's merge_to signature."""
    pytest.importorskip("lycoris")
    import torch
    from lycoris import kohya

    from library.families.sd import SDFamily

    models = SDFamily().load(sd1, torch.float32, None)
    net = kohya.create_network(1.0, 4, 4, models.vae, models.text_encoders[0], models.denoiser, algo="loha",
                               preset="attn-mlp")
    net.apply_to(models.text_encoders[0], models.denoiser, True, True)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(("hada_w1_a", "hada_w2_a", "hada_w1_b", "hada_w2_b")):
                p.normal_(std=0.3)
    path = str(tmp_path / "loha.safetensors")
    net.save_weights(path, torch.float32, {})
    flags = ("--network_module", "lycoris.kohya", "--network_weights", path)
    plain = _images(sd1, tmp_path / "plain")[0]
    hooked = _images(sd1, tmp_path / "hooked", *flags)[0]
    off = _images(sd1, tmp_path / "off", *flags, prompt="red circle --am 0")[0]
    merged = _images(sd1, tmp_path / "merged", *flags, "--network_merge")[0]
    assert _diff(hooked, plain) > 5
    assert np.array_equal(off, plain)
    assert _diff(merged, hooked) <= 2
