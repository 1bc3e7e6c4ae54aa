"""Does the whole chain learn? A short LoRA run on one distinctive content (red circles, trigger
'sks shape, red circle') must (1) lower the denoising loss on those images at fixed timesteps and
noise, and (2) move generations with the trigger prompt toward the training latents, for every one
of several fixed seeds. A control LoRA with random weights of the same size must do neither, so
the effect comes from training and not from any perturbation."""

from __future__ import annotations

import glob

import torch

from tests.conftest import run_script, tiny_train_args

PROMPT = "sks shape, red circle"
SEEDS = range(6)


def _load(tiny_default, lora_state=None):
    from library.models.sd_loading import load_sd_model
    from networks import lora

    model = load_sd_model(str(tiny_default / "model" / "tiny-sd15.safetensors"))
    if lora_state is not None:
        net, _ = lora.create_network_from_weights(1.0, None, model.vae, model.text_encoder, model.unet,
                                                  weights_sd=lora_state)
        net.apply_to(model.text_encoder, model.unet)
        net.load_state_dict(lora_state)
    return model


def _training_latents(model, tiny_default):
    return _latents_of(model, tiny_default / "train" / "*" / "*.png")


def _latents_of(model, pattern):
    """SD1 posterior-mean latents of the images matching ``pattern``, sorted by path."""
    from library.data.images import load_image_rgb, to_tensor_image

    pixels = torch.stack([to_tensor_image(load_image_rgb(p)) for p in sorted(glob.glob(str(pattern)))])
    with torch.no_grad():
        return model.vae.encode(pixels).latent_dist.mean * 0.18215


@torch.no_grad()
def _denoising_loss(model, latents, prompt: str = PROMPT, v_prediction: bool = False) -> float:
    from library.maths.noise import ddpm_noisy_and_target, scaled_linear_alphas_cumprod

    ids = model.tokenizer([prompt] * len(latents), padding="max_length", max_length=77,
                          return_tensors="pt").input_ids
    cond = model.text_encoder(ids).last_hidden_state
    gen = torch.Generator().manual_seed(0)
    losses = []
    for t in (100, 300, 500, 700, 900):
        noise = torch.randn(latents.shape, generator=gen)
        steps = torch.full((len(latents),), t)
        noisy, target = ddpm_noisy_and_target(scaled_linear_alphas_cumprod(), latents, noise, steps, v_prediction)
        losses.append(((model.unet(noisy, steps, cond).sample - target) ** 2).mean().item())
    return sum(losses) / len(losses)


@torch.no_grad()
def _generation_distances(model, latents, prompt: str = PROMPT, v_prediction: bool = False) -> list[float]:
    """Distance from each seed's generated latents to the nearest training latent."""
    from diffusers import StableDiffusionPipeline

    from library.sampling.samplers import build_scheduler

    scheduler = build_scheduler("euler", "v_prediction" if v_prediction else "epsilon")
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for seed in SEEDS:
        gen = torch.Generator().manual_seed(seed)
        z = pipe(prompt, width=64, height=64, num_inference_steps=20, guidance_scale=1.0, generator=gen,
                 output_type="latent").images[0]
        out.append(torch.cdist(z.flatten()[None], latents.flatten(1)).min().item())
    return out


def _measure(models: dict, latents, capsys, tag: str) -> tuple[dict, dict]:
    """Each SD1 model's denoising loss and generation distances, printed in the test output."""
    loss = {name: _denoising_loss(m, latents) for name, m in models.items()}
    dist = {name: _generation_distances(m, latents) for name, m in models.items()}
    with capsys.disabled():
        print(f"\n[{tag}] denoising loss on the training images: {loss}")
        for name, d in dist.items():
            print(f"[{tag}] {name:8s} distance of generated latents to the training set per seed: "
                  + ", ".join(f"{x:.1f}" for x in d))
    return loss, dist


def _random_like(state: dict) -> dict:
    gen = torch.Generator().manual_seed(99)
    return {k: (torch.randn(v.shape, generator=gen) * v.std() if k.endswith("lora_up.weight") else v.clone())
            for k, v in state.items()}


def test_lora_training_learns_the_content(tiny_default, tmp_path, capsys):
    from safetensors.torch import load_file

    run_script("train_network.py", *tiny_train_args(
        tiny_default, tmp_path, "--output_name", "learned", "--network_dim", "8", "--network_alpha", "4",
        "--learning_rate", "1e-3", "--max_train_epochs", "4", "--cache_latents", "--seed", "42"), check=True)
    trained = load_file(str(tmp_path / "learned.safetensors"))
    base = _load(tiny_default)
    models = {"base": base, "trained": _load(tiny_default, trained),
              "control": _load(tiny_default, _random_like(trained))}
    loss, dist = _measure(models, _training_latents(base, tiny_default), capsys, "learning")
    # the tiny MMDiT learns more slowly than the tiny UNet (a full fine-tune of it gains about as much
    # in as many steps), so the margins are smaller than SD1's; every seed must still move toward the
    # training images, and the control must not
    assert loss["trained"] < 0.9 * loss["base"]
    assert loss["control"] > 0.98 * loss["base"]
    assert all(t < 0.92 * b for t, b in zip(dist["trained"], dist["base"]))
    assert sum(dist["control"]) > 0.98 * sum(dist["base"])


class _PosteriorMean:
    """An rng stand-in whose noise is zero: ``encode_images`` then gives the posterior mean."""

    def randn(self, *shape):
        return torch.zeros(shape)


def _family_learns(family, ckpt: str, script: str, data, network_module, extra: tuple, capsys, tag: str):
    """Train with ``script``, then compare base / trained / random-control LoRAs by the family's own
    loss on the training images and by how close generations (diffusers' samplers) come to them."""
    from safetensors.torch import load_file

    from library.data.images import load_image_rgb, to_tensor_image
    from library.maths.rng import SampleRNG
    from library.sampling.generate import GenBatch

    run_script(script, "--pretrained_model_name_or_path", ckpt, "--dataset_config", str(data / "dataset.toml"),
               "--output_dir", str(data / "out"), "--output_name", "learned", "--network_train_unet_only",
               "--cache_latents", "--seed", "42", "--console_log_level", "WARNING", *extra, check=True)
    trained = load_file(str(data / "out" / "learned.safetensors"))

    def load(state=None):
        models = family.load(ckpt, torch.float32, None)
        if state is not None:
            net, _ = network_module.create_network_from_weights(1.0, None, None, models.text_encoders,
                                                                models.denoiser, weights_sd=state)
            net.apply_to(models.text_encoders, models.denoiser)
            net.load_state_dict(state)
        return models

    base = load()
    pixels = torch.stack([to_tensor_image(load_image_rgb(p))
                          for p in sorted(glob.glob(str(data / "train" / "*" / "*.png")))])
    with torch.no_grad():
        latents = family.encode_images(base, pixels, _PosteriorMean())
    models = {"base": base, "trained": load(trained), "control": load(_random_like(trained))}
    cpu = torch.device("cpu")

    @torch.no_grad()
    def denoising_loss(m) -> float:
        cond = family.encode_prompts(m, [PROMPT] * len(latents), cpu)
        keys = [(0, 0, j) for j in range(len(latents))]
        losses = []
        for t in (100, 300, 500, 700, 900):
            batch = family.make_noisy_batch(latents, SampleRNG(0, keys), timestep=t)
            losses.append(family.per_sample_loss(family.denoise(m, batch, cond), batch).mean().item())
        return sum(losses) / len(losses)

    @torch.no_grad()
    def distances(m) -> list[float]:
        pipe = family.pipeline(m, "euler", "txt2img")
        pipe.set_progress_bar_config(disable=True)
        out = []
        for seed in SEEDS:
            batch = GenBatch([PROMPT], [""], [seed], 64, 64, 20, 1.0)
            z = pipe(**family.call_kwargs(m, batch, cpu), width=64, height=64, num_inference_steps=20,
                     guidance_scale=1.0, generator=torch.Generator().manual_seed(seed), output_type="latent").images[0]
            out.append(torch.cdist(z.flatten()[None], latents.flatten(1)).min().item())
        return out

    loss = {name: denoising_loss(m) for name, m in models.items()}
    dist = {name: distances(m) for name, m in models.items()}
    with capsys.disabled():
        print(f"\n[learning {tag}] loss on the training images: {loss}")
        for name, d in dist.items():
            print(f"[learning {tag}] {name:8s} distance of generated latents to the training set per seed: "
                  + ", ".join(f"{x:.1f}" for x in d))
    return loss, dist


def test_sd3_flow_matching_learns_the_content(tmp_path_factory, capsys):
    """SD3 (flow matching), generated with diffusers' flow-matching Euler sampler, which integrates
    the velocity: a sign or convention error in our velocity target would push generations away."""
    from library.families.sd3 import SD3Family, SD3Options
    from networks import lora_sd3

    data = tmp_path_factory.mktemp("sd3_learn")
    run_script("tools/make_tiny_default.py", "--out", str(data), "--family", "sd3", check=True)
    loss, dist = _family_learns(SD3Family(SD3Options(t5xxl_max_token_length=16)),
                                str(data / "model" / "tiny-sd3.safetensors"), "sd3_train_network.py", data,
                                lora_sd3, ("--network_dim", "8", "--network_alpha", "8", "--learning_rate", "3e-3",
                                           "--max_train_epochs", "6", "--t5xxl_max_token_length", "16"), capsys, "sd3")
    # the tiny MMDiT learns more slowly than the tiny UNet (a full fine-tune of it gains about as much
    # in as many steps), so the margins are smaller than SD1's; every seed must still move toward the
    # training images, and the control must not
    assert loss["trained"] < 0.9 * loss["base"]
    assert loss["control"] > 0.98 * loss["base"]
    assert all(t < 0.92 * b for t, b in zip(dist["trained"], dist["base"]))
    assert sum(dist["control"]) > 0.98 * sum(dist["base"])


def test_sdxl_learns_the_content(tmp_path_factory, capsys):
    """SDXL: two text encoders, pooled text and size conditioning on the way; generated with
    StableDiffusionXLPipeline."""
    from library.families.sdxl import SDXLFamily
    from networks import lora

    data = tmp_path_factory.mktemp("sdxl_learn")
    run_script("tools/make_tiny_default.py", "--out", str(data), "--family", "sdxl", check=True)
    loss, dist = _family_learns(SDXLFamily(), str(data / "model" / "tiny-sdxl.safetensors"),
                                "sdxl_train_network.py", data, lora,
                                ("--network_dim", "8", "--network_alpha", "8", "--learning_rate", "2e-3",
                                 "--max_train_epochs", "4", "--network_args", "conv_dim=8", "conv_alpha=8"),
                                capsys, "sdxl")
    # SDXL's top level has no attention, so LoRA reaches it only through its convolutions (conv_dim)
    assert loss["trained"] < 0.5 * loss["base"]
    assert loss["control"] > 0.95 * loss["base"]
    assert all(t < 0.7 * b for t, b in zip(dist["trained"], dist["base"]))
    assert sum(dist["control"]) > 0.95 * sum(dist["base"])


def test_full_training_learns_the_content(tiny_default, tmp_path, capsys):
    """train_db.py (the model's own weights): the same two measures. The control is the base UNet
    moved by random noise of each tensor's trained change in size, the full-weight analogue of
    the random LoRA."""
    from library.models.sd_loading import load_sd_model

    run_script("train_db.py", *tiny_train_args(
        tiny_default, tmp_path, "--output_name", "learned", "--learning_rate", "2e-4", "--max_train_epochs", "1",
        "--cache_latents", "--seed", "42", "--stop_text_encoder_training", "-1"), check=True)
    base = _load(tiny_default)
    trained = load_sd_model(str(tmp_path / "learned.safetensors"), tokenizer_dir=str(tiny_default / "model"))
    control = _load(tiny_default)
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for (name, p), q in zip(control.unet.named_parameters(), trained.unet.parameters()):
            change = q - base.unet.state_dict()[name]
            p.add_(torch.randn(p.shape, generator=gen) * change.std() if change.numel() > 1 else change)
    models = {"base": base, "trained": trained, "control": control}
    loss, dist = _measure(models, _training_latents(base, tiny_default), capsys, "learning full")
    assert loss["trained"] < 0.7 * loss["base"]
    assert loss["control"] > 0.95 * loss["base"]
    assert all(t < 0.8 * b for t, b in zip(dist["trained"], dist["base"]))
    assert sum(dist["control"]) > 0.95 * sum(dist["base"])


def _separating_base(tiny_default, folder):
    """The tiny default with its VAE's latent means scaled 20x (the log-variance half untouched), as a
    single file with its tokenizer beside it. The random VAE's latents are otherwise so small (element
    std 0.037) that the noise drowns what tells two images apart, and no prompt can matter."""
    import shutil

    from library.models.sd_loading import load_sd_model, save_sd_single_file

    folder.mkdir()
    model = load_sd_model(str(tiny_default / "model" / "tiny-sd15.safetensors"))
    with torch.no_grad():
        model.vae.quant_conv.weight[:4].mul_(20.0)
        model.vae.quant_conv.bias[:4].mul_(20.0)
        model.vae.post_quant_conv.weight.div_(20.0)
    save_sd_single_file(folder / "separating.safetensors", model, None)
    shutil.copytree(tiny_default / "model" / "tokenizer", folder / "tokenizer")
    return folder / "separating.safetensors"


def _flat_concepts(root, concepts: dict[str, tuple[str, str]]):
    """Six images per folder of ``concepts`` (folder: look, caption): a "red circle" or "blue square"
    of one colour (jittered) at one place on grey, so each look's latents lie close together and far
    from the other's."""
    from PIL import Image, ImageDraw

    gen = torch.Generator().manual_seed(0)
    colours = {"red circle": (220, 30, 30), "blue square": (30, 30, 220)}
    for folder, concept in concepts.items():
        (root / folder).mkdir(parents=True)
        for i in range(6):
            image = Image.new("RGB", (64, 64), (245, 245, 245))
            fill = tuple(int(c) + int(torch.randint(-15, 16, (), generator=gen)) for c in colours[concept[0]])
            draw = ImageDraw.Draw(image)
            (draw.ellipse if "circle" in concept[0] else draw.rectangle)((12, 12, 52, 52), fill=fill)
            image.save(root / folder / f"{i}.png")
    subsets = "".join(f'\n  [[datasets.subsets]]\n  image_dir = "{(root / f).as_posix()}"\n  class_tokens = "{c}"\n'
                      f"  num_repeats = 5\n" for f, (_, c) in concepts.items())
    toml = root / "dataset.toml"
    toml.write_text('[general]\nenable_bucket = false\ncaption_extension = ".none"\n\n[[datasets]]\n'
                    f"resolution = 64\nbatch_size = 2\n{subsets}", encoding="utf-8")
    return toml


def test_textual_inversion_learns_the_content(tiny_default, tmp_path, capsys):
    """train_textual_inversion.py on red circles, its token starting as the word "square". A frozen
    model can only be steered by its prompt if it has learnt to read prompts, which the random tiny
    model has not: so the base is the tiny model taught "red circle" and "blue square" by train_db.py
    (v-prediction, where the prompt decides most of the target at high noise, on latents that keep
    the two apart). After the run the token's loss on the circles is far below the init word's and
    as low as the words "red circle" give, its generations come closer to them for every seed, and a
    random vector of the same norm does neither."""
    import shutil

    from library.families.base import LoadedModels
    from library.families.sd import SDFamily
    from library.generation.textual_inversion import load_textual_inversions
    from library.models.sd_loading import load_sd_model
    from library.models.textual_inversion import read_vectors, write_embedding

    common = ("--cache_latents", "--seed", "1", "--v_parameterization", "--console_log_level", "WARNING")
    two = _flat_concepts(tmp_path / "two", {"circles": ("red circle", "red circle"),
                                                "squares": ("blue square", "blue square")})
    run_script("train_db.py", "--pretrained_model_name_or_path", str(_separating_base(tiny_default, tmp_path / "sep")),
               "--dataset_config", str(two), "--output_dir", str(tmp_path / "base"), "--output_name", "taught",
               "--learning_rate", "5e-4", "--max_train_epochs", "20", "--stop_text_encoder_training", "-1", *common,
               check=True)
    base = tmp_path / "base" / "taught.safetensors"
    shutil.copytree(tmp_path / "sep" / "tokenizer", tmp_path / "base" / "tokenizer")
    circles = _flat_concepts(tmp_path / "ti", {"circles": ("red circle", "zqshape")})
    run_script("train_textual_inversion.py", "--pretrained_model_name_or_path", str(base), "--dataset_config",
               str(circles), "--output_dir", str(tmp_path / "emb"), "--output_name", "zqshape", "--token_string",
               "zqshape", "--init_word", "square", "--learning_rate", "5e-3", "--max_train_epochs", "6", *common,
               check=True)
    trained = tmp_path / "emb" / "zqshape.safetensors"
    (vector,) = read_vectors(trained, ("",), "trained")
    gen = torch.Generator().manual_seed(5)
    random = torch.randn(vector.shape, generator=gen)
    write_embedding(tmp_path / "zqrand.safetensors", [random * vector.norm() / random.norm()], ("",), "zqrand")

    model = load_sd_model(str(base))
    load_textual_inversions([str(trained), str(tmp_path / "zqrand.safetensors")], SDFamily(), LoadedModels(
        denoiser=model.unet, vae=model.vae, text_encoders=[model.text_encoder], tokenizers=[model.tokenizer]))
    latents = _latents_of(model, tmp_path / "ti" / "circles" / "*.png")
    prompts = {"token": "zqshape", "init word": "square", "control": "zqrand", "taught words": "red circle"}
    loss = {name: _denoising_loss(model, latents, p, v_prediction=True) for name, p in prompts.items()}
    dist = {name: _generation_distances(model, latents, prompts[name], v_prediction=True)
            for name in ("token", "init word", "control")}
    with capsys.disabled():
        print(f"\n[learning textual inversion] v-prediction loss on the circles: {loss}")
        for name, d in dist.items():
            print(f"[learning textual inversion] {name:9s} distance of generated latents to the circles per seed: "
                  + ", ".join(f"{x:.1f}" for x in d))
    # the token reaches what the taught words give; a random vector lands between the two concepts
    # (below "square", which points at the other one) but nowhere near the circles
    assert loss["token"] < 0.5 * loss["init word"] and loss["token"] < 1.2 * loss["taught words"]
    assert loss["control"] > 2 * loss["token"]
    assert all(t < 0.9 * b for t, b in zip(dist["token"], dist["init word"]))
    assert sum(dist["control"]) > 0.9 * sum(dist["init word"])

