"""gen_img.py's kohya extras end to end on tiny models: Deep Shrink and Gradual Latent from the
command line and per prompt line, the start-noise tricks, the highres fix's latent upscaling and
first-pass images, and the messages for what they cannot do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import gen_img
from library.utils.errors import run_cli
from tests.scripts.test_gen_img import _pixels, _prompts


def _gen(*args: str) -> int:
    """gen_img as from the shell (a UserError is exit status 2), in this process."""
    try:
        run_cli(gen_img.main, list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture(scope="module")
def sd1(tiny_default) -> str:
    return str(tiny_default / "model" / "tiny-sd15.safetensors")


def _run(ckpt: str, out: Path, *args: str) -> int:
    return _gen("--ckpt", ckpt, "--W", "128", "--H", "128", "--steps", "6", "--seed", "3", "--sampler", "euler_a",
                "--outdir", str(out), "--sequential_file_name", *args)


def test_deep_shrink_and_gradual_latent_lines(sd1, tmp_path, capsys):
    lines = ("red circle --d 3\n"
             "red circle --dsd1 3 --dst1 500 --d 3\n"
             "red circle --glt 900 --gle 1 --glus 3,0.5,0.5 --d 3\n"
             "red circle --glt 900 --ss ddim\n"
             "red circle --dsd1 9\n")
    for out in ("a", "b"):
        assert _run(sd1, tmp_path / out, "--from_file", _prompts(tmp_path, lines)) == 1
    err = capsys.readouterr().err
    assert "prompts.txt:4: Gradual Latent needs the euler_a sampler" in err
    assert "prompts.txt:5: Deep Shrink depth 1 is 9; this UNet's input blocks are 1-3" in err
    names = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert names == ["im_000001.png", "im_000002.png", "im_000003.png"]
    images = [_pixels(tmp_path / "a" / n) for n in names]
    for n, image in zip(names, images):
        assert image.shape == (128, 128, 3) and np.array_equal(image, _pixels(tmp_path / "b" / n))
    assert np.abs(images[1] - images[0]).max() > 5 and np.abs(images[2] - images[0]).max() > 5
    params = [Image.open(tmp_path / "a" / n).text["parameters"] for n in names]
    assert "Deep Shrink: depth 3 t>=500 ratio 0.5" in params[1]
    assert "Gradual Latent: t<900.0 ratio 0.5 step 0.125 every 1 s_noise 1.0 unsharp 3,0.5,0.5,1" in params[2]
    # the command line's flags give what the same values on a line give
    assert _run(sd1, tmp_path / "cli_ds", "--prompt", "red circle", "--ds_depth_1", "3", "--ds_timesteps_1", "500") == 0
    assert np.array_equal(_pixels(tmp_path / "cli_ds" / "im_000001.png"), images[1])
    assert _run(sd1, tmp_path / "cli_gl", "--prompt", "red circle", "--gradual_latent_timesteps", "900",
                "--gradual_latent_every_n_steps", "1", "--gradual_latent_unsharp_params", "3,0.5,0.5") == 0
    assert np.array_equal(_pixels(tmp_path / "cli_gl" / "im_000001.png"), images[2])


def test_deep_shrink_on_sdxl_and_refused_for_sd3(tiny_family_models, tmp_path, capsys):
    xl = str(tiny_family_models["sdxl"])
    assert _run(xl, tmp_path / "plain", "--prompt", "red circle") == 0
    assert _run(xl, tmp_path / "ds", "--prompt", "red circle --dsd1 2 --dst1 300 --dsr 0.5") == 0
    plain, shrunk = _pixels(tmp_path / "plain" / "im_000001.png"), _pixels(tmp_path / "ds" / "im_000001.png")
    assert shrunk.shape == plain.shape and np.abs(shrunk - plain).max() > 5
    sd3 = str(tiny_family_models["sd3"])
    assert _run(sd3, tmp_path / "sd3", "--prompt", "x", "--ds_depth_1", "3", "--t5xxl_max_token_length", "16") == 2
    assert "work on UNet models (SD1/SD2/SDXL), not on this sd3 model" in capsys.readouterr().err
    assert _run(sd3, tmp_path / "sd3line", "--prompt", "x --glt 800", "--t5xxl_max_token_length", "16") == 1
    assert "Deep Shrink and Gradual Latent work on UNet models" in capsys.readouterr().err


def test_start_noise_tricks(sd1, tmp_path):
    assert _run(sd1, tmp_path / "plain", "--prompt", "red circle") == 0
    # drawn but never applied: the pipeline's own start noise, so the same image
    assert _run(sd1, tmp_path / "never", "--prompt", "red circle", "--noise_offset_prob", "0.0000001") == 0
    plain = _pixels(tmp_path / "plain" / "im_000001.png")
    assert np.array_equal(_pixels(tmp_path / "never" / "im_000001.png"), plain)
    for out in ("t1", "t2"):
        assert _run(sd1, tmp_path / out, "--prompt", "red circle", "--pyramid_noise_prob", "1", "--noise_offset_prob",
                    "1", "--noise_offset_range", "0.5", "0.6") == 0
    tricked = _pixels(tmp_path / "t1" / "im_000001.png")
    assert np.abs(tricked - plain).max() > 5 and np.array_equal(tricked, _pixels(tmp_path / "t2" / "im_000001.png"))


def test_highres_fix_latent_upscaling_and_first_pass_images(sd1, tmp_path):
    for label, extra in (("image", ()), ("latent", ("--highres_fix_latents_upscaling",))):
        assert _run(sd1, tmp_path / label, "--prompt", "red circle", "--highres_fix_scale", "0.5",
                    "--highres_fix_steps", "4", "--highres_fix_save_1st", *extra) == 0
        assert Image.open(tmp_path / label / "im_000001.png").size == (128, 128)
        assert Image.open(tmp_path / label / "im_000001_1st.png").size == (64, 64)
    # both ways start from the same first pass; the second passes differ
    assert np.array_equal(_pixels(tmp_path / "image" / "im_000001_1st.png"),
                          _pixels(tmp_path / "latent" / "im_000001_1st.png"))
    finals = [_pixels(tmp_path / label / "im_000001.png") for label in ("image", "latent")]
    assert np.abs(finals[0] - finals[1]).max() > 0


@pytest.mark.parametrize("args, message", [
    (("--gradual_latent_timesteps", "800", "--sampler", "ddim"), "--gradual_latent_timesteps needs --sampler euler_a"),
    (("--gradual_latent_unsharp_params", "3,0.5"), "--gradual_latent_unsharp_params '3,0.5'"),
    (("--pyramid_noise_prob", "2"), "--pyramid_noise_prob 2.0: a probability between 0 and 1"),
    (("--noise_offset_prob", "1", "--noise_offset_range", "0.2", "0.1"), "give the smaller value first"),
    (("--ds_depth_1", "0"), "input block depths start at 1"),
    (("--ds_ratio", "1.5"), "--ds_ratio 1.5"),
])
def test_bad_trick_flags_stop_before_loading(sd1, tmp_path, capsys, args, message):
    assert _gen("--ckpt", str(tmp_path / "no-model.safetensors"), "--prompt", "x", "--outdir", str(tmp_path / "o"),
                *args) == 2
    assert message in capsys.readouterr().err


def test_shuffle_prompts_reorders_each_iteration_reproducibly(sd1, tmp_path):
    prompts = _prompts(tmp_path, "".join(f"prompt {c}\n" for c in "abcdef"))
    orders = []
    for out in ("a", "b"):
        assert _gen("--ckpt", sd1, "--from_file", prompts, "--W", "64", "--H", "64", "--steps", "1", "--n_iter", "2",
                    "--seed", "1", "--shuffle_prompts", "--outdir", str(tmp_path / out), "--sequential_file_name") == 0
        orders.append([Image.open(tmp_path / out / f"im_{i:06d}.png").text["prompt"][-1] for i in range(1, 13)])
    assert orders[0] == orders[1]  # drawn from the seed
    first, second = orders[0][:6], orders[0][6:]
    assert sorted(first) == sorted(second) == list("abcdef") and first != second and first != list("abcdef")


def test_interactive_lines_generate_as_typed(sd1, tmp_path, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("red circle --d 5\n\nbad --zz 1\nblue square --d 6\n"))
    code = _gen("--ckpt", sd1, "--interactive", "--W", "64", "--H", "64", "--steps", "2", "--outdir",
                str(tmp_path / "o"), "--sequential_file_name")
    assert code == 1 and "interactive prompt 2: unknown option --zz" in capsys.readouterr().err
    texts = [Image.open(tmp_path / "o" / f"im_00000{i}.png").text for i in (1, 2)]
    assert [(t["prompt"], t["seed"]) for t in texts] == [("red circle", "5"), ("blue square", "6")]


def test_from_module_uses_kohyas_prompter_protocol(sd1, tmp_path, capsys):
    module = tmp_path / "prompter.py"
    module.write_text(
        "class Prompter:\n"
        "    def __init__(self):\n"
        "        self.index = 0\n"
        "    def __call__(self, args, pipe, seed_random, iter_seed, prompt_index, global_step):\n"
        "        lines = ['red circle', 'blue square --s 2']\n"
        "        if self.index >= len(lines):\n"
        "            self.index = 0\n"
        "            return None\n"
        "        self.index += 1\n"
        "        return f'{lines[self.index - 1]} --d {iter_seed + 100 * global_step}'\n"
        "def get_prompter(args, pipe, networks):\n"
        "    assert pipe.models.denoiser is not None and networks == []\n"
        "    assert args.prompter_module_args == 'style=flat'\n"
        "    return Prompter()\n", encoding="utf-8")
    assert _gen("--ckpt", sd1, "--from_module", str(module), "--n_iter", "2", "--seed", "10", "--W", "64", "--H", "64",
                "--steps", "3", "--outdir", str(tmp_path / "o"), "--sequential_file_name",
                "--prompter_module_args", "style=flat") == 0
    texts = [Image.open(tmp_path / "o" / f"im_00000{i}.png").text for i in range(1, 5)]
    assert [(t["prompt"], t["seed"], t["steps"]) for t in texts] == [
        ("red circle", "10", "3"), ("blue square", "110", "2"), ("red circle", "211", "3"), ("blue square", "311", "2")]
    (tmp_path / "empty.py").write_text("x = 1\n", encoding="utf-8")
    assert _gen("--ckpt", sd1, "--from_module", str(tmp_path / "empty.py"), "--outdir", str(tmp_path / "e")) == 2
    assert "has no get_prompter(args, pipe, networks) function" in capsys.readouterr().err


def test_textual_inversion_embeddings(sd1, tiny_family_models, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(0)) * 3},
              str(tmp_path / "shiny.safetensors"))
    assert _run(sd1, tmp_path / "plain", "--prompt", "shiny red circle") == 0
    assert _run(sd1, tmp_path / "ti", "--prompt", "shiny red circle", "--textual_inversion_embeddings",
                str(tmp_path / "shiny.safetensors")) == 0
    image = Image.open(tmp_path / "ti" / "im_000001.png")
    assert image.text["prompt"] == "shiny red circle"  # the user's words, not the expanded tokens
    assert np.abs(_pixels(tmp_path / "ti" / "im_000001.png") - _pixels(tmp_path / "plain" / "im_000001.png")).max() > 5
    assert _run(str(tiny_family_models["sd3"]), tmp_path / "sd3", "--prompt", "shiny", "--t5xxl_max_token_length",
                "16", "--textual_inversion_embeddings", str(tmp_path / "shiny.safetensors")) == 2
    assert "--textual_inversion_embeddings: not available for sd3 models" in capsys.readouterr().err


def test_highres_fix_upscaler_module(sd1, tmp_path, monkeypatch, capsys):
    """kohya's upscaler protocol; an upscaler that enlarges latents bilinearly gives exactly what
    --highres_fix_latents_upscaling gives, and one that works on images what the default does."""
    (tmp_path / "toy_upscaler.py").write_text(
        "import torch\n"
        "class Upscaler(torch.nn.Module):\n"
        "    def __init__(self, latents='1'):\n"
        "        super().__init__()\n"
        "        self.latents = latents == '1'\n"
        "    def support_latents(self):\n"
        "        return self.latents\n"
        "    def upscale(self, vae, images, latents, dtype, width, height, batch_size, vae_batch_size):\n"
        "        if self.latents:\n"
        "            return torch.nn.functional.interpolate(latents.float(), size=(height // 8, width // 8),\n"
        "                                                   mode='bilinear', align_corners=False).to(latents.dtype)\n"
        "        return [im.resize((width, height)) for im in images]\n"
        "def create_upscaler(**kwargs):\n"
        "    return Upscaler(**kwargs)\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    hr = ("--prompt", "red circle", "--highres_fix_scale", "0.5", "--highres_fix_steps", "3")
    finals = {}
    for label, extra in (("latent", ("--highres_fix_latents_upscaling",)), ("image", ()),
                         ("toy_latent", ("--highres_fix_upscaler", "toy_upscaler")),
                         ("toy_image", ("--highres_fix_upscaler", "toy_upscaler",
                                        "--highres_fix_upscaler_args", "latents=0"))):
        assert _run(sd1, tmp_path / label, *hr, *extra) == 0
        finals[label] = _pixels(tmp_path / label / "im_000001.png")
    assert np.array_equal(finals["toy_latent"], finals["latent"])
    assert np.array_equal(finals["toy_image"], finals["image"])
    assert _run(sd1, tmp_path / "x", "--prompt", "x", "--highres_fix_save_1st") == 2
    assert "--highres_fix_save_1st: parts of the highres fix; add --highres_fix_scale" in capsys.readouterr().err


def test_enumerated_dynamic_prompt_makes_one_image_per_variant(sd1, tmp_path):
    assert _gen("--ckpt", sd1, "--prompt", "a {e$$red|blue|green} {circle|square}", "--images_per_prompt", "5",
                "--W", "64", "--H", "64", "--steps", "1", "--seed", "3", "--outdir", str(tmp_path / "o"),
                "--sequential_file_name") == 0
    texts = [Image.open(p).text for p in sorted((tmp_path / "o").glob("*.png"))]
    assert [t["prompt"].split()[1] for t in texts] == ["red", "blue", "green"]  # not 5: one per variant
    assert all(t["prompt"].split()[2] in ("circle", "square") for t in texts)
    assert all(t["raw-prompt"] == "a {e$$red|blue|green} {circle|square}" for t in texts)


@pytest.mark.parametrize("args, message", [
    (("--clip_vision_model", "some/model"), "--clip_vision_model is only used with --clip_vision_strength"),
    (("--noise_offset_range", "0", "0.2"), "--noise_offset_range is only used with --noise_offset_prob"),
    (("--guide_image_path", "g.png"), "--guide_image_path is only used with --control_net_models or "
                                      "--control_net_lllite_models"),
    (("--prompter_module_args", "a=1"), "--prompter_module_args is only used with --from_module"),
])
def test_flags_that_would_be_ignored_are_refused(tmp_path, capsys, args, message):
    assert _gen("--ckpt", str(tmp_path / "no-model.safetensors"), "--prompt", "x", "--outdir", str(tmp_path / "o"),
                *args) == 2
    assert message in capsys.readouterr().err
