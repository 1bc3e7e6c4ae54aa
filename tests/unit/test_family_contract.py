"""The model-family contract (library/families/base.py), checked the same way for every family, plus
SDXL's own facts against diffusers' StableDiffusionXLPipeline as the independent reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from library.families.sd import SDFamily
from library.families.sdxl import SDXLFamily
from library.maths.rng import SampleRNG

CPU = torch.device("cpu")


def _write_sd1(folder: Path) -> Path:
    from library.models.sd_loading import save_sd_single_file
    from library.models.tiny import make_tiny_sd1

    parts = make_tiny_sd1(seed=0)
    save_sd_single_file(folder / "sd1.safetensors", parts)
    parts.tokenizer.save_pretrained(str(folder / "tokenizer"))
    return folder / "sd1.safetensors"


def _write_sdxl(folder: Path) -> Path:
    from library.models.sdxl_loading import save_sdxl_single_file
    from library.models.tiny import make_tiny_sdxl

    parts = make_tiny_sdxl(seed=0)
    save_sdxl_single_file(folder / "sdxl.safetensors", parts)
    parts.tokenizer_1.save_pretrained(str(folder / "tokenizer"))
    parts.tokenizer_2.save_pretrained(str(folder / "tokenizer_2"))
    return folder / "sdxl.safetensors"


def _write_sd3(folder: Path) -> Path:
    from library.models.sd3_loading import save_sd3_single_file
    from library.models.tiny import make_tiny_sd3

    parts = make_tiny_sd3(seed=0)
    save_sd3_single_file(folder / "sd3.safetensors", parts)
    for name, key in (("tokenizer", "clip_l"), ("tokenizer_2", "clip_g"), ("tokenizer_3", "t5xxl")):
        parts.tokenizers[key].save_pretrained(str(folder / name))
    return folder / "sd3.safetensors"


def _sd3_family():
    from library.families.sd3 import SD3Family, SD3Options

    return SD3Family(SD3Options(t5xxl_max_token_length=16))


FAMILIES = {"sd": (SDFamily, _write_sd1), "sdxl": (SDXLFamily, _write_sdxl), "sd3": (_sd3_family, _write_sd3)}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def loaded(request, tmp_path_factory):
    cls, write = FAMILIES[request.param]
    family = cls()
    path = write(tmp_path_factory.mktemp(request.param))
    return family, family.load(str(path), torch.float32, None)


def _rows(outputs, index):
    if isinstance(outputs, dict):
        return {k: v[index] for k, v in outputs.items()}
    return outputs[index]


def _same(a, b, tol=1e-5):
    if isinstance(a, dict):
        return set(a) == set(b) and all(_same(a[k], b[k], tol) for k in a)
    return a.shape == b.shape and torch.allclose(a, b, atol=tol)


def test_prompt_encoding_is_per_caption(loaded):
    family, models = loaded
    with torch.no_grad():
        both = family.encode_prompts(models, ["red circle", "a blue square on grass"], CPU)
        alone = family.encode_prompts(models, ["a blue square on grass"], CPU)
    assert _same(_rows(both, 1), _rows(alone, 0))
    assert not _same(_rows(both, 0), _rows(both, 1))
    json.dumps(family.text_encoder_settings(models))  # recorded in cache files


def test_noise_is_keyed_per_sample_and_prediction_has_latent_shape(loaded):
    family, models = loaded
    latents = family.encode_images(models, torch.rand(2, 3, 64, 64) * 2 - 1, SampleRNG(0, [(0, 0, 0), (0, 0, 1)], CPU))
    assert latents.shape == (2, family.latent_channels, 8, 8)
    pair = family.make_noisy_batch(latents, SampleRNG(3, [(0, 0, 0), (0, 0, 1)], CPU))
    single = family.make_noisy_batch(latents[1:], SampleRNG(3, [(0, 0, 1)], CPU))
    assert torch.equal(pair.noisy_latents[1], single.noisy_latents[0]) and pair.timesteps[1] == single.timesteps[0]
    with torch.no_grad():
        cond = family.encode_prompts(models, ["a", "b"], CPU)
        pred = family.denoise(models, pair, cond)
    assert pred.shape == latents.shape
    loss = family.per_sample_loss(pred, pair)
    assert loss.shape == (2,) and loss.dtype == torch.float32 and torch.isfinite(loss).all()
    fixed = family.make_noisy_batch(latents, SampleRNG(3, [(0, 0, 0), (0, 0, 1)], CPU), timestep=500)
    assert fixed.timesteps.tolist() == [500, 500]


def test_generate_and_metadata(loaded):
    from library.sampling.prompts import SamplePrompt

    family, models = loaded
    prompt = SamplePrompt("red circle", "blue", width=64, height=96, seed=4, scale=5.0, steps=3, sampler=None)
    first = family.generate(models, prompt, "euler", CPU)
    again = family.generate(models, prompt, "euler", CPU)
    assert isinstance(first, Image.Image) and first.size == (64, 96)
    assert (torch.tensor(list(first.getdata())) == torch.tensor(list(again.getdata()))).all()  # seeded
    meta = family.metadata(models)
    assert meta["ss_base_model_version"] in ("sd_v1", "sdxl_base_v1-0", "sd3_medium")
    assert meta["modelspec.architecture"].startswith("stable-diffusion-")  # a network adds "/lora"


def test_sdxl_prompt_embeddings_match_diffusers_pipeline(tmp_path):
    """Our SDXL encoding (both encoders' penultimate states, bigG's pooled projection) equals what
    StableDiffusionXLPipeline.encode_prompt computes for a prompt within 75 tokens."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    family = SDXLFamily()
    models = family.load(str(_write_sdxl(tmp_path)), torch.float32, None)
    (tok1, tok2), (te1, te2) = models.tokenizers, models.text_encoders
    pipe = StableDiffusionXLPipeline(vae=models.vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                     tokenizer_2=tok2, unet=models.denoiser, scheduler=EulerDiscreteScheduler())
    captions = ["sks shape, red circle", "a photo of a blue square"]
    with torch.no_grad():
        ours = family.encode_prompts(models, captions, CPU)
        embeds, _, pooled, _ = pipe.encode_prompt(captions, device=CPU, do_classifier_free_guidance=False)
    assert torch.allclose(ours["hidden"], embeds, atol=1e-6)
    assert torch.allclose(ours["pooled"], pooled, atol=1e-6)


def test_sdxl_size_conditioning_reaches_the_unet(tmp_path):
    family = SDXLFamily()
    models = family.load(str(_write_sdxl(tmp_path)), torch.float32, None)
    latents = torch.randn(1, 4, 8, 8)
    batch = family.make_noisy_batch(latents, SampleRNG(1, [(0, 0, 0)], CPU))
    with torch.no_grad():
        cond = family.encode_prompts(models, ["red circle"], CPU)
        default = family.denoise(models, batch, cond)
        batch.size_conditioning = torch.tensor([[64, 64, 0, 0, 64, 64]])
        same = family.denoise(models, batch, cond)
        batch.size_conditioning = torch.tensor([[128, 96, 16, 0, 64, 64]])
        cropped = family.denoise(models, batch, cond)
    assert torch.equal(default, same)  # without a data batch: the latents' size, uncropped
    assert not torch.allclose(default, cropped)


def test_sdxl_scaling_factor_and_size_multiple():
    assert SDXLFamily.scaling_factor == 0.13025 and SDXLFamily.advised_size_multiple == 32
    assert SDXLFamily.cache_suffix == "sdxl" and SDXLFamily.latent_channels == 4


def test_sd3_prompt_embeddings_match_diffusers_pipeline(tmp_path):
    """Our SD3 conditioning (CLIP-L/G penultimate states padded to T5's width, then T5's states;
    pooled CLIP-L + CLIP-G projections) equals StableDiffusion3Pipeline.encode_prompt."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    family = _sd3_family()
    models = family.load(str(_write_sd3(tmp_path)), torch.float32, None)
    te, tok = models.text_encoders, models.tokenizers
    pipe = StableDiffusion3Pipeline(transformer=models.denoiser, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=models.vae, text_encoder=te[0], tokenizer=tok[0], text_encoder_2=te[1],
                                    tokenizer_2=tok[1], text_encoder_3=te[2], tokenizer_3=tok[2])
    captions = ["sks shape, red circle", "a photo of a blue square"]
    with torch.no_grad():
        context, pooled = family._mmdit_inputs(models, family.encode_prompts(models, captions, CPU))
        embeds, _, ref_pooled, _ = pipe.encode_prompt(captions, captions, captions, device=CPU,
                                                      do_classifier_free_guidance=False, max_sequence_length=16)
    assert context.shape == embeds.shape and torch.allclose(context, embeds, atol=1e-6)
    assert torch.allclose(pooled, ref_pooled, atol=1e-6)


def test_sd3_dropout_zeroes_one_encoder_per_sample():
    from library.families.sd3 import SD3Family, SD3Options

    family = SD3Family(SD3Options(clip_l_dropout_rate=1.0, t5_dropout_rate=0.5))
    cond = {k: torch.ones(64, 3, 4) for k in ("clip_l", "clip_g", "t5")}
    cond.update({f"{k}_pooled": torch.ones(64, 4) for k in ("clip_l", "clip_g")})
    keys = [(0, 0, j) for j in range(64)]
    dropped = family.drop_conditioning(cond, SampleRNG(1, keys, CPU))
    assert dropped["clip_l"].abs().sum() == 0 and dropped["clip_l_pooled"].abs().sum() == 0
    assert torch.equal(dropped["clip_g"], cond["clip_g"])
    kept_t5 = dropped["t5"].flatten(1).sum(1) > 0
    assert 10 < kept_t5.sum() < 54  # about half
    again = family.drop_conditioning(cond, SampleRNG(1, keys, CPU))
    assert torch.equal(again["t5"], dropped["t5"])  # keyed per sample: reproducible
