"""Textual inversion embeddings: our loader and prompt rewriting give the prompt embeddings that
diffusers' own ``load_textual_inversion`` + ``encode_prompt`` give, for SD1 (A1111 .pt and
.safetensors forms) and SDXL (clip_l + clip_g); wrong files are refused with the reason."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from library.families.base import LoadedModels
from library.families.sd import SDFamily
from library.families.sdxl import SDXLFamily
from library.generation.textual_inversion import load_textual_inversions
from library.models.tiny import make_tiny_sd1, make_tiny_sdxl
from library.utils.errors import UserError

CPU = torch.device("cpu")
PROMPT = "a photo of myemb, red circle"


def _sd1_models() -> LoadedModels:
    c = make_tiny_sd1(seed=0)
    return LoadedModels(denoiser=c.unet, vae=c.vae, text_encoders=[c.text_encoder], tokenizers=[c.tokenizer])


def _sdxl_models() -> LoadedModels:
    c = make_tiny_sdxl(seed=0)
    return LoadedModels(denoiser=c.unet, vae=c.vae, text_encoders=[c.text_encoder_1, c.text_encoder_2],
                        tokenizers=[c.tokenizer_1, c.tokenizer_2])


@pytest.mark.parametrize("form", ["a1111.pt", "safetensors"])
def test_sd1_embedding_equals_diffusers_loader(tmp_path, form):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    if form == "a1111.pt":
        path = tmp_path / "myemb.pt"
        torch.save({"string_to_param": {"*": vectors}, "name": "myemb", "step": 100}, path)
    else:
        path = tmp_path / "myemb.safetensors"
        save_file({"emb_params": vectors}, str(path))
    family, ours = SDFamily(), _sd1_models()
    embeddings = load_textual_inversions([str(path)], family, ours)
    assert embeddings.expand(PROMPT) == "a photo of myemb myemb1 myemb2, red circle"
    assert embeddings.expand("myembx and xmyemb") == "myembx and xmyemb"  # whole words only
    theirs = _sd1_models()
    pipe = StableDiffusionPipeline(vae=theirs.vae, text_encoder=theirs.text_encoders[0],
                                   tokenizer=theirs.tokenizers[0], unet=theirs.denoiser,
                                   scheduler=EulerDiscreteScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.load_textual_inversion(vectors, token="myemb")
    with torch.no_grad():
        mine = family.encode_prompts(ours, [embeddings.expand(PROMPT)], CPU)
        reference, _ = pipe.encode_prompt(PROMPT, CPU, 1, False)
        plain = family.encode_prompts(_sd1_models(), [PROMPT], CPU)
    assert torch.allclose(mine, reference, atol=1e-6)
    assert (mine - plain).abs().max() > 1e-3  # the embedding changed the prompt


def test_sdxl_embedding_equals_diffusers_loader(tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    g = torch.Generator().manual_seed(2)
    clip_l, clip_g = torch.randn(2, 32, generator=g), torch.randn(2, 64, generator=g)
    path = tmp_path / "myemb.safetensors"
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(path))
    family, ours = SDXLFamily(), _sdxl_models()
    embeddings = load_textual_inversions([str(path)], family, ours)
    theirs = _sdxl_models()
    (tok1, tok2), (te1, te2) = theirs.tokenizers, theirs.text_encoders
    pipe = StableDiffusionXLPipeline(vae=theirs.vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                     tokenizer_2=tok2, unet=theirs.denoiser, scheduler=EulerDiscreteScheduler())
    pipe.load_textual_inversion(clip_l, token="myemb", text_encoder=te1, tokenizer=tok1)
    pipe.load_textual_inversion(clip_g, token="myemb", text_encoder=te2, tokenizer=tok2)
    with torch.no_grad():
        mine = family.encode_prompts(ours, [embeddings.expand(PROMPT)], CPU)
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device=CPU, do_classifier_free_guidance=False)
    assert torch.allclose(mine["hidden"], embeds, atol=1e-6)
    assert torch.allclose(mine["pooled"], pooled, atol=1e-6)


def test_wrong_embedding_files_are_refused(tmp_path):
    save_file({"emb_params": torch.randn(1, 32)}, str(tmp_path / "sd1emb.safetensors"))
    with pytest.raises(UserError, match=r"needs the tensors \['clip_l', 'clip_g'\].*another model family"):
        load_textual_inversions([str(tmp_path / "sd1emb.safetensors")], SDXLFamily(), _sdxl_models())
    save_file({"emb_params": torch.randn(1, 768)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(UserError, match="vectors of width 768, but this text encoder's are 32 wide"):
        load_textual_inversions([str(tmp_path / "wide.safetensors")], SDFamily(), _sd1_models())
    save_file({"emb_params": torch.randn(1, 32)}, str(tmp_path / "red.safetensors"))
    models = _sd1_models()
    load_textual_inversions([str(tmp_path / "sd1emb.safetensors")], SDFamily(), models)
    with pytest.raises(UserError, match="already a token"):
        load_textual_inversions([str(tmp_path / "sd1emb.safetensors")], SDFamily(), models)
    with pytest.raises(UserError, match="file not found"):
        load_textual_inversions([str(tmp_path / "missing.pt")], SDFamily(), models)


def test_text_encoder_widths_without_loading(tmp_path):
    """The widths an embedding must have come from a safetensors header or a diffusers folder's
    configs (what the trainer checks --weights against before loading); a .ckpt is not read."""
    from library.models.checkpoints import text_encoder_widths
    from library.models.sdxl_loading import save_sdxl_diffusers, save_sdxl_single_file

    c = make_tiny_sdxl(seed=0)
    expected = [c.text_encoder_1.config.hidden_size, c.text_encoder_2.config.hidden_size]
    save_sdxl_single_file(tmp_path / "xl.safetensors", c, None)
    save_sdxl_diffusers(tmp_path / "xl_folder", c, None)
    (tmp_path / "model.ckpt").write_bytes(b"")
    assert expected[0] != expected[1]
    assert text_encoder_widths(tmp_path / "xl.safetensors") == expected
    assert text_encoder_widths(tmp_path / "xl_folder") == expected
    assert text_encoder_widths(tmp_path / "model.ckpt") is None and text_encoder_widths("org/model-id") is None
