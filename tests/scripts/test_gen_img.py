"""gen_img.py on tiny SD1, SDXL and SD3 models: prompt lines and ||| files, names and PNG metadata,
fixed-seed reproducibility (also across batch sizes), LoRAs hooked, merged and several at once,
img2img / inpainting / highres fix, and bad input that leaves the other prompts generating."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gen_img
from tests.conftest import run_in_process


def _gen(*args: str) -> int:
    try:
        gen_img.main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def sd1(tiny_default) -> str:
    return str(tiny_default / "model" / "tiny-sd15.safetensors")


@pytest.fixture(scope="module")
def sd1_lora(tmp_path_factory, sd1) -> tuple[str, str]:
    """Two random kohya-format LoRAs for the tiny SD1 model (UNet and text encoder, conv too)."""
    from library.families.sd import SDFamily
    from networks import lora

    out = tmp_path_factory.mktemp("loras")
    paths = []
    for seed in (1, 2):
        models = SDFamily().load(sd1, torch.float32, None)
        net = lora.create_network(1.0, 4, 4, None, models.text_encoders[0], models.denoiser, conv_dim="2")
        torch.manual_seed(seed)
        for m in net.all_loras():
            torch.nn.init.normal_(m.lora_up.weight, std=0.5)
        path = out / f"lora{seed}.safetensors"
        net.save_weights(str(path), torch.float32, {})
        paths.append(str(path))
    return paths[0], paths[1]


def _prompts(tmp_path: Path, text: str) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_names_metadata_and_reproducibility(sd1, tmp_path):
    prompts = _prompts(tmp_path, "# two lines\nsks shape, red circle --n blue --d 7 --l 4\n(red:1.3) square --s 4\n")
    common = ("--ckpt", sd1, "--from_file", prompts, "--W", "64", "--H", "64", "--steps", "3", "--seed", "10",
              "--images_per_prompt", "2", "--sampler", "euler_a")
    assert _gen(*common, "--outdir", str(tmp_path / "a"), "--batch_size", "2") == 0
    assert _gen(*common, "--outdir", str(tmp_path / "b"), "--batch_size", "1", "--sequential_file_name") == 0
    a = sorted((tmp_path / "a").glob("*.png"))
    b = sorted((tmp_path / "b").glob("*.png"))
    assert [p.name for p in b] == ["im_000001.png", "im_000002.png", "im_000003.png", "im_000004.png"]
    assert [p.name.split("_", 2)[-1] for p in a] == ["000_7.png", "001_11.png", "002_12.png", "003_13.png"]
    for x, y in zip(a, b):  # the same images whatever the batch size
        # each image has its own generator, so only the kernels differ: a batch of two may run other
        # CPU matmul paths than a batch of one (seen on this Xeon), which moves a pixel by 1/255 at most
        assert np.abs(_pixels(x).astype(int) - _pixels(y).astype(int)).max() <= 1
    params = Image.open(a[0]).text["parameters"]
    assert params.startswith("sks shape, red circle\nNegative prompt: blue\nSteps: 3, Sampler: euler_a, "
                             "CFG scale: 4.0, Seed: 7, Size: 64x64, Model: tiny-sd15")
    assert Image.open(a[2]).text["steps"] == "4"
    assert not np.array_equal(_pixels(a[0]), _pixels(a[1]))


@pytest.mark.parametrize("sampler", ["ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a",
                                     "dpmsolver", "dpmsolver++", "dpmsingle"])
def test_every_sampler_is_fixed_by_its_seed(sd1, tmp_path, sampler):
    for out in ("x", "y"):
        assert _gen("--ckpt", sd1, "--prompt", "red circle", "--W", "64", "--H", "64", "--steps", "4", "--seed", "3",
                    "--sampler", sampler, "--outdir", str(tmp_path / out), "--sequential_file_name") == 0
    assert np.array_equal(_pixels(tmp_path / "x" / "im_000001.png"), _pixels(tmp_path / "y" / "im_000001.png"))


def test_split_files_use_the_notebook_names(sd1, tmp_path):
    prompts = _prompts(tmp_path, "red circle|||blue square\na sks shape|||\n")
    assert _gen("--ckpt", sd1, "--from_file", prompts, "--W", "64", "--H", "64", "--steps", "2",
                "--images_per_prompt", "2", "--outdir", str(tmp_path / "out")) == 0
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert names == ["prompt000_pos.png", "prompt000_pos_1.png", "prompt001_pos.png", "prompt001_pos_1.png"]
    assert "Negative prompt: blue square" in Image.open(tmp_path / "out" / "prompt000_pos.png").text["parameters"]


def test_loras_hooked_merged_several_and_per_line_strength(sd1, sd1_lora, tmp_path):
    one, two = sd1_lora
    base = ("--ckpt", sd1, "--W", "64", "--H", "64", "--steps", "3", "--seed", "5", "--sequential_file_name")
    runs = {"plain": (), "hooked": ("--network_weights", one, "--network_mul", "0.7"),
            "merged": ("--network_weights", one, "--network_mul", "0.7", "--network_merge"),
            "both": ("--network_weights", one, two, "--network_mul", "0.7", "0.5"),
            "both_merged": ("--network_weights", one, two, "--network_mul", "0.7", "0.5", "--network_merge"),
            "off": ("--network_weights", one, two, "--network_mul", "0.7", "0.5")}
    for name, extra in runs.items():
        prompt = "red circle --am 0" if name == "off" else "red circle"
        assert _gen(*base, "--prompt", prompt, "--outdir", str(tmp_path / name), *extra) == 0
    img = {name: _pixels(tmp_path / name / "im_000001.png") for name in runs}
    assert np.abs(img["hooked"] - img["merged"]).max() <= 2  # merging is the same update
    assert np.abs(img["both"] - img["both_merged"]).max() <= 2
    assert np.abs(img["hooked"] - img["plain"]).max() > 20  # and the LoRA matters
    assert np.abs(img["both"] - img["hooked"]).max() > 10
    assert np.array_equal(img["off"], img["plain"])  # --am 0: both LoRAs off for that line
    assert "Lora: lora1:0.7, lora2:0.5" in Image.open(tmp_path / "both" / "im_000001.png").text["parameters"]


def test_merge_equals_hooks_numerically(tiny_sd1):
    """--network_merge's weight update equals the hooked forward (and W + mul * alpha/dim * up @ down)."""
    from library.models.tiny import make_tiny_sd1
    from networks import lora

    net = lora.create_network(1.0, 4, 2, None, tiny_sd1.text_encoder, tiny_sd1.unet, conv_dim="2", conv_alpha="1")
    net.apply_to(tiny_sd1.text_encoder, tiny_sd1.unet)
    torch.manual_seed(3)
    for m in net.all_loras():
        torch.nn.init.normal_(m.lora_up.weight, std=0.3)
    net.set_multiplier(0.6)
    torch.manual_seed(0)
    x, t, cond = torch.randn(1, 4, 8, 8), torch.tensor([400]), torch.randn(1, 77, 32)
    with torch.no_grad():
        hooked = tiny_sd1.unet(x, t, cond).sample
        name = "lora_unet_down_blocks_0_attentions_0_proj_in"
        module = dict(net.named_modules())[name]
        expected = module._org[0].weight + 0.6 * 0.5 * (module.lora_up.weight.flatten(1) @
                                                         module.lora_down.weight.flatten(1)).view_as(module._org[0].weight)
        net.merge_to()
        merged = tiny_sd1.unet(x, t, cond).sample
        assert torch.allclose(module._org[0].weight, expected, atol=1e-6)
        plain = make_tiny_sd1(seed=0).unet(x, t, cond).sample
    assert (hooked - merged).abs().max() < 1e-5 * hooked.abs().max()
    assert (hooked - plain).abs().max() > 1e-2


def test_img2img_inpaint_and_highres(sd1, tmp_path):
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "init.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    base = ("--ckpt", sd1, "--prompt", "red circle --t 0.5", "--W", "64", "--H", "64", "--steps", "4", "--seed", "1",
            "--sequential_file_name")
    assert _gen(*base, "--image_path", str(tmp_path / "init.png"), "--outdir", str(tmp_path / "i2i")) == 0
    assert "Denoising strength: 0.5" in Image.open(tmp_path / "i2i" / "im_000001.png").text["parameters"]
    assert _gen(*base, "--image_path", str(tmp_path / "init.png"), "--mask_path", str(tmp_path / "mask.png"),
                "--outdir", str(tmp_path / "inpaint")) == 0
    inpainted = _pixels(tmp_path / "inpaint" / "im_000001.png")
    assert inpainted.shape == (64, 64, 3)
    assert _gen("--ckpt", sd1, "--prompt", "red circle", "--W", "128", "--H", "128", "--steps", "3",
                "--highres_fix_scale", "0.5", "--highres_fix_steps", "4", "--outdir", str(tmp_path / "hr"),
                "--sequential_file_name") == 0
    assert Image.open(tmp_path / "hr" / "im_000001.png").size == (128, 128)


def test_bad_lines_are_skipped_and_bad_files_stop(sd1, sd1_lora, tmp_path, capsys):
    prompts = _prompts(tmp_path, "good one --s 2\nbad --zz 3\nworse --w 65\nalso good --s 2\n")
    code = _gen("--ckpt", sd1, "--from_file", prompts, "--W", "64", "--H", "64", "--outdir", str(tmp_path / "o"),
                "--sequential_file_name")
    err = capsys.readouterr().err
    assert code == 1 and len(list((tmp_path / "o").glob("*.png"))) == 2
    assert "prompts.txt:2: unknown option --zz" in err and "prompts.txt:3: bad value for --w" in err
    proc = run_in_process("gen_img.py", "--ckpt", sd1, "--prompt", "x", "--outdir", str(tmp_path / "o2"),
                      "--network_weights", str(tmp_path / "missing.safetensors"))
    assert proc.returncode == 2 and "missing.safetensors: file not found" in proc.stderr
    proc = run_in_process("gen_img.py", "--ckpt", sd1, "--prompt", "x", "--outdir", str(tmp_path / "o3"), "--W", "70")
    assert proc.returncode == 2 and "--W 70: image sizes must be multiples of 8" in proc.stderr


def test_sdxl_and_sd3_with_their_loras(tiny_family_models, sd1_lora, tmp_path):
    from library.families.sd3 import SD3Family, SD3Options
    from library.families.sdxl import SDXLFamily
    from networks import lora, lora_sd3
    from networks.lora_export import write_diffusers_lora

    xl = SDXLFamily().load(str(tiny_family_models["sdxl"]), torch.float32, None)
    net = lora.create_network(1.0, 4, 4, None, xl.text_encoders, xl.denoiser)
    s3 = SD3Family(SD3Options(t5xxl_max_token_length=16)).load(str(tiny_family_models["sd3"]), torch.float32, None)
    net3 = lora_sd3.create_network(1.0, 4, 4, None, s3.text_encoders, s3.denoiser)
    for i, n in enumerate((net, net3)):
        torch.manual_seed(i)
        for m in n.all_loras():
            torch.nn.init.normal_(m.lora_up.weight, std=0.5)
        n.save_weights(str(tmp_path / f"lora{i}.safetensors"), torch.float32, {})
    write_diffusers_lora(net3, tmp_path / "sd3-diffusers")
    images = {}
    for label, family, extra in (("xl", "sdxl", ()), ("xl_lora", "sdxl", (tmp_path / "lora0.safetensors",)),
                                 ("sd3", "sd3", ()), ("sd3_lora", "sd3", (tmp_path / "lora1.safetensors",)),
                                 ("sd3_diffusers", "sd3",
                                  (tmp_path / "sd3-diffusers" / "pytorch_lora_weights.safetensors",))):
        lora_args = ("--network_weights", str(extra[0])) if extra else ()
        assert _gen("--ckpt", str(tiny_family_models[family]), "--prompt", "red circle --n blue", "--W", "64",
                    "--H", "64", "--steps", "3", "--seed", "2", "--t5xxl_max_token_length", "16",
                    "--outdir", str(tmp_path / label), "--sequential_file_name", *lora_args) == 0
        images[label] = _pixels(tmp_path / label / "im_000001.png")
    assert images["xl"].shape == (64, 64, 3) and np.abs(images["xl"] - images["xl_lora"]).max() > 5
    assert np.abs(images["sd3"] - images["sd3_lora"]).max() > 5
    # our kohya SD3 file (our hooks) and its diffusers form (diffusers' PEFT loader) give the same image
    assert np.abs(images["sd3_lora"] - images["sd3_diffusers"]).max() <= 2
    proc = run_in_process("gen_img.py", "--ckpt", str(tiny_family_models["sd3"]), "--prompt", "x", "--W", "64", "--H",
                          "64", "--outdir", str(tmp_path / "wrong"), "--network_weights", sd1_lora[0])
    assert proc.returncode == 2 and "another model" in proc.stderr


def test_img2img_and_inpaint_for_sdxl_and_sd3(tiny_family_models, tmp_path):
    Image.new("RGB", (64, 64), (30, 30, 200)).save(tmp_path / "init.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "mask.png")
    for family in ("sdxl", "sd3"):
        for kind, extra in (("i2i", ()), ("inpaint", ("--mask_path", str(tmp_path / "mask.png")))):
            out = tmp_path / f"{family}-{kind}"
            assert _gen("--ckpt", str(tiny_family_models[family]), "--prompt", "red circle --t 0.6", "--W", "64",
                        "--H", "64", "--steps", "4", "--seed", "1", "--t5xxl_max_token_length", "16",
                        "--image_path", str(tmp_path / "init.png"), *extra, "--outdir", str(out),
                        "--sequential_file_name") == 0, (family, kind)
            image = Image.open(out / "im_000001.png")
            assert image.size == (64, 64) and "Denoising strength: 0.6" in image.text["parameters"]


def test_vae_flags_change_how_the_vae_decodes(sd1, tmp_path, monkeypatch):
    """--no_half_vae decodes in float32 under --bf16, --vae_slices one image per decoder call,
    --vae_tiling in tiles (their size lowered to 64 px here, so the 128 px image has four); each
    keeps the image close to the plain bf16 one."""
    from diffusers import AutoencoderKL

    calls: list[tuple] = []
    real_decode, real_tiled, real_enable = AutoencoderKL._decode, AutoencoderKL.tiled_decode, \
        AutoencoderKL.enable_tiling

    def small_tiles(self):
        real_enable(self)
        self.tile_sample_min_size, self.tile_latent_min_size = 64, 8

    def spy_decode(self, z, *args, **kwargs):
        calls.append(("decode", z.shape[0], z.dtype))
        return real_decode(self, z, *args, **kwargs)

    def spy_tiled(self, z, *args, **kwargs):
        calls.append(("tiles", z.shape[0], z.dtype))
        return real_tiled(self, z, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "_decode", spy_decode)
    monkeypatch.setattr(AutoencoderKL, "tiled_decode", spy_tiled)
    monkeypatch.setattr(AutoencoderKL, "enable_tiling", small_tiles)
    seen, images = {}, {}
    for name, flags in (("plain", ()), ("fp32_vae", ("--no_half_vae",)), ("slices", ("--vae_slices", "1")),
                        ("tiles", ("--vae_tiling",)), ("other_seed", ("--seed", "5"))):
        calls.clear()
        out = tmp_path / name
        assert _gen("--ckpt", sd1, "--prompt", "red circle", "--W", "128", "--H", "128", "--steps", "2", "--seed",
                    "4", "--bf16", "--batch_size", "2", "--images_per_prompt", "2", "--outdir", str(out),
                    "--sequential_file_name", *flags) == 0
        seen[name] = list(calls)
        images[name] = [_pixels(out / f"im_00000{i}.png") for i in (1, 2)]
    assert seen["plain"] == [("decode", 2, torch.bfloat16)]
    assert seen["fp32_vae"] == [("decode", 2, torch.float32)]
    assert seen["slices"] == [("decode", 1, torch.bfloat16)] * 2
    assert seen["tiles"] == [("decode", 2, torch.bfloat16), ("tiles", 2, torch.bfloat16)]
    # the same image: float32 / per-image decoding move pixels by rounding only (measured: mean 0.4, max
    # 3); tiles of a random-weight VAE leave visible seams (mean 11, correlation 0.93), while another
    # seed is another image (mean 42, correlation 0.2)
    for name in ("fp32_vae", "slices", "tiles"):
        for got, ref in zip(images[name], images["plain"]):
            diff, corr = np.abs(got - ref), np.corrcoef(got.ravel(), ref.ravel())[0, 1]
            if name == "tiles":
                assert diff.mean() < 20 and corr > 0.85, (name, diff.mean(), corr)
            else:
                assert diff.mean() < 1 and diff.max() <= 8, (name, diff.mean(), diff.max())
    other = np.abs(images["other_seed"][0] - images["plain"][0]).mean()
    assert other > 30  # the tolerances above tell images apart


def test_negative_scale_is_kohyas_three_prediction_guidance(tiny_sd1):
    """diffusers combines the wrapper's (a, c) as a + g (c - a); with a from the wrapper that is
    u + g (c - u) - n (neg - u), kohya's formula with the empty-prompt prediction u."""
    from library.sampling.negative_scale import NegativeScaleUNet

    torch.manual_seed(0)
    unet = tiny_sd1.unet
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    empty, neg, pos = torch.randn(1, 77, 32), torch.randn(1, 77, 32), torch.randn(1, 77, 32)
    g, n = 7.0, 3.0
    wrapped = NegativeScaleUNet(unet, {"prompt_embeds": empty}, g, n)
    with torch.no_grad():
        a, c = wrapped(torch.cat([x, x]), t, torch.cat([neg, pos]), return_dict=False)[0].chunk(2)
        u, nn_, cc = (unet(x, t, e).sample for e in (empty, neg, pos))
    combined = a + g * (c - a)
    assert torch.allclose(combined, u + g * (cc - u) - n * (nn_ - u), atol=1e-5)
    assert wrapped.config is unet.config and wrapped.dtype == unet.dtype  # the pipeline sees the UNet


def test_negative_scale_lines(sd1, tiny_family_models, tmp_path):
    base = ("--ckpt", sd1, "--W", "64", "--H", "64", "--steps", "3", "--seed", "2", "--scale", "5",
            "--sequential_file_name")
    prompts = _prompts(tmp_path, "red circle --n blue --d 2\nred circle --n blue --nl none --d 2\n"
                                 "red circle --n blue --nl 1 --d 2\n")
    # (negative_scale = scale - 1 would be plain CFG again: u + g(c - u) - (g - 1)(n - u) = n + g(c - n))
    assert _gen(*base, "--from_file", prompts, "--negative_scale", "2", "--outdir", str(tmp_path / "ns")) == 0
    assert _gen(*base, "--prompt", "red circle --n blue", "--outdir", str(tmp_path / "plain")) == 0
    ns = [_pixels(tmp_path / "ns" / f"im_00000{i}.png") for i in (1, 2, 3)]
    plain = _pixels(tmp_path / "plain" / "im_000001.png")
    # the tiny random model reacts weakly to its prompts, so the images differ only a little; the
    # formula itself is checked exactly in the test above
    assert np.abs(ns[0] - plain).max() > 0  # the negative prompt at strength 2 instead of through the CFG
    assert np.array_equal(ns[1], plain)  # --nl none: plain CFG for that line
    assert Image.open(tmp_path / "ns" / "im_000001.png").text["negative-scale"] == "2.0"
    assert np.abs(ns[2] - ns[0]).max() > 0  # --nl 1 on the third line
    assert _gen("--ckpt", str(tiny_family_models["sdxl"]), "--prompt", "red circle --n blue", "--W", "64", "--H", "64",
                "--steps", "2", "--scale", "5", "--negative_scale", "2", "--batch_size", "2", "--images_per_prompt",
                "2", "--outdir", str(tmp_path / "xl"), "--sequential_file_name") == 0  # pooled text, time ids
    assert len(list((tmp_path / "xl").glob("*.png"))) == 2
    code = _gen("--ckpt", str(tiny_family_models["sd3"]), "--prompt", "x --nl 2", "--W", "64", "--H", "64",
                "--steps", "2", "--t5xxl_max_token_length", "16", "--outdir", str(tmp_path / "sd3"))
    assert code == 1 and not list((tmp_path / "sd3").glob("*.png"))


def test_sdxl_size_options_reach_the_pipeline(tiny_family_models):
    """--ow/--oh/--nw/--nh/--ct/--cl become SDXL's (original, negative original, crop) conditioning."""
    from library.families.sdxl import SDXLFamily
    from library.generation import jobs as gen_run
    from library.generation.prompt_lines import parse_gen_line

    line = parse_gen_line("red circle --w 64 --h 64 --ow 128 --oh 96 --nw 32 --nh 48 --ct 8 --cl 4", "test:1")
    job = gen_run.make_jobs([line], gen_run.Settings(seed=1))[0]
    family = SDXLFamily()
    models = family.load(str(tiny_family_models["sdxl"]), torch.float32, None)
    kwargs = family.call_kwargs(models, gen_run.to_batch([job]), torch.device("cpu"))
    assert kwargs["original_size"] == (96, 128) and kwargs["negative_original_size"] == (48, 32)
    assert kwargs["crops_coords_top_left"] == (8, 4) and kwargs["target_size"] == (64, 64)


def test_dynamic_prompts_are_drawn_per_image_seed(sd1, tmp_path):
    import random

    from library.generation.dynamic_prompts import expand_dynamic

    drawn = {expand_dynamic(r"a {red|blue} {circle|{square|star}} \{x\}", random.Random(s)) for s in range(40)}
    assert drawn == {f"a {c} {s} {{x}}" for c in ("red", "blue") for s in ("circle", "square", "star")}
    for out in ("a", "b"):
        assert _gen("--ckpt", sd1, "--prompt", "a {red|blue} shape", "--W", "64", "--H", "64", "--steps", "2",
                    "--seed", "7", "--images_per_prompt", "4", "--outdir", str(tmp_path / out),
                    "--sequential_file_name") == 0
    texts = [Image.open(tmp_path / "a" / f"im_00000{i}.png").text for i in range(1, 5)]
    assert all(t["raw-prompt"] == "a {red|blue} shape" for t in texts)
    assert {t["prompt"] for t in texts} <= {"a red shape", "a blue shape"}
    again = [Image.open(tmp_path / "b" / f"im_00000{i}.png").text["prompt"] for i in range(1, 5)]
    assert [t["prompt"] for t in texts] == again  # the choice follows the image's seed
