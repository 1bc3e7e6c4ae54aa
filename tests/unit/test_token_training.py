"""Textual inversion training pieces: only the new vectors change (every original embedding row
and every other weight keeps its bytes), captions and prompts expand the word into its tokens, the
init word and --weights set the start, and templates are drawn from the sample's generator."""

from __future__ import annotations

import random

import pytest
import torch

from library.config.token_training import OBJECT_TEMPLATES, TokenConfig
from library.families.base import LoadedModels
from library.families.sd import SDFamily
from library.models.textual_inversion import write_embedding
from library.models.tiny import make_tiny_sd1
from library.training.token_vectors import CaptionTemplates, TokenVectors
from library.utils.errors import UserError

CPU = torch.device("cpu")


def _models() -> LoadedModels:
    c = make_tiny_sd1(seed=0)
    return LoadedModels(denoiser=c.unet, vae=c.vae, text_encoders=[c.text_encoder], tokenizers=[c.tokenizer])


def _snapshot(models: LoadedModels) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v.clone() for i, m in enumerate([models.denoiser, models.vae, *models.text_encoders])
            for k, v in m.state_dict().items()}


def test_only_the_new_vectors_train():
    family, models = SDFamily(), _models()
    before = _snapshot(models)
    plain = family.encode_prompts(models, ["red circle"], CPU)
    init_row = before["2.embeddings.token_embedding.weight"][
        models.tokenizers[0]("circle", add_special_tokens=False).input_ids[0]]
    vectors = TokenVectors(family, models, TokenConfig("zqshape", "circle", 3, None))
    assert all(torch.equal(v, init_row) for v in vectors.net[0])  # every vector starts as the init word
    ids = models.tokenizers[0]("a zqshape", add_special_tokens=False).input_ids
    assert len(ids) == 4 and ids[1:] == [len(models.tokenizers[0]) - 3 + k for k in range(3)]  # word -> 3 tokens
    optimizer = torch.optim.AdamW(vectors.trainable_params(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        cond = family.encode_prompts(models, ["a zqshape, red circle", "blue square"], CPU)
        cond.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(vectors.net[0][0], init_row)
    after = {k.replace("token_embedding.base.", "token_embedding."): v for k, v in _snapshot(models).items()
             if not k.endswith("token_embedding.vectors")}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(family.encode_prompts(models, ["red circle"], CPU), plain)  # no token: as before


def test_weights_start_and_random_start(tmp_path):
    start = torch.randn(2, 32, generator=torch.Generator().manual_seed(5))
    write_embedding(tmp_path / "e.safetensors", [start], ("",), "e")
    vectors = TokenVectors(SDFamily(), _models(), TokenConfig("zqshape", None, 2, str(tmp_path / "e.safetensors")))
    assert torch.equal(vectors.net[0].detach(), start)
    with pytest.raises(UserError, match=r"\(2, 32\) vectors .* this run needs \(3, 32\)"):
        TokenVectors(SDFamily(), _models(), TokenConfig("zqshape", None, 3, str(tmp_path / "e.safetensors")))
    torch.manual_seed(0)
    randomly = TokenVectors(SDFamily(), _models(), TokenConfig("zqshape", None, 1, None))
    assert randomly.net[0].abs().sum() > 0


def test_templates_are_drawn_from_the_samples_generator():
    templates = CaptionTemplates(OBJECT_TEMPLATES, "zqshape")
    first = [templates("ignored", random.Random(f"7-0-{j}")) for j in range(8)]
    again = [templates("ignored", random.Random(f"7-0-{j}")) for j in range(8)]
    assert first == again and all("zqshape" in c for c in first) and len(set(first)) > 1
