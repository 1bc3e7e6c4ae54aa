"""Tokenizer lookup for every encoder: next to the checkpoint, in --tokenizer_cache_dir, or a clear error."""

from dataclasses import replace

import pytest

from library.models import tokenizers
from library.models.tiny_tokenizer import build_tiny_clip_tokenizer, build_tiny_t5_tokenizer
from library.utils.errors import UserError


def test_diffusers_folder_names_next_to_the_checkpoint(tmp_path):
    ckpt = tmp_path / "model.safetensors"
    build_tiny_clip_tokenizer().save_pretrained(str(tmp_path / "tokenizer"))
    build_tiny_clip_tokenizer().save_pretrained(str(tmp_path / "tokenizer_2"))
    build_tiny_t5_tokenizer().save_pretrained(str(tmp_path / "tokenizer_3"))
    clip_l = tokenizers.resolve_tokenizer("clip_l", ckpt, None)
    clip_g = tokenizers.resolve_tokenizer("clip_g", ckpt, None)
    t5 = tokenizers.resolve_tokenizer("t5xxl", ckpt, None)
    assert clip_l("a red circle").input_ids[0] == clip_l.bos_token_id
    assert clip_g.pad_token == "!" and clip_g.pad_token_id == 0  # OpenCLIP-G pads with "!"
    ids = t5("a red circle").input_ids
    assert ids[-1] == t5.eos_token_id == 1 and t5.pad_token_id == 0


def test_cache_dir_and_missing(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    build_tiny_t5_tokenizer().save_pretrained(str(cache / "tokenizer_3"))
    assert tokenizers.resolve_tokenizer("t5xxl", tmp_path / "m.safetensors", str(cache)) is not None
    monkeypatch.setitem(tokenizers.SPECS, "t5xxl", replace(tokenizers.SPECS["t5xxl"], hub_id="no-such-org/no-such"))
    with pytest.raises(UserError, match="no t5xxl tokenizer found .*'tokenizer_3' folder next to the checkpoint"):
        tokenizers.resolve_tokenizer("t5xxl", tmp_path / "elsewhere" / "m.safetensors", None)
