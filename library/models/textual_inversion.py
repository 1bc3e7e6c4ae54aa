"""Textual inversion embedding files and the words they add, shared by gen_img.py's loader and the
textual inversion trainers.

An embedding of N vectors is N tokens: ``name``, ``name1``, ... ``name{N-1}`` (kohya's and
AUTOMATIC1111's naming), and ``name`` in a prompt stands for all of them. Files: AUTOMATIC1111's
``.pt`` (``string_to_param``) and ``.safetensors`` (``emb_params``), kohya's and diffusers' files
(the one tensor in the file); SDXL files hold ``clip_l`` and ``clip_g``, one tensor per text
encoder. A family names the keys it reads (``textual_inversion_keys``; ``""`` is the single tensor).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from library.utils.errors import UserError
from library.utils.files import save_torch
from library.utils.safetensors_io import save_safetensors

#: the tensor name of single-encoder safetensors files (AUTOMATIC1111's and kohya's)
SINGLE_KEY = "emb_params"


def token_names(name: str, count: int) -> list[str]:
    """The tokens of an embedding of ``count`` vectors called ``name``."""
    return [name] + [f"{name}{i}" for i in range(1, count)]


def expand_words(text: str, expansions: dict[str, str]) -> str:
    """Each whole word ``name`` of ``expansions`` replaced by its tokens (``name name1 ...``)."""
    for name, tokens in expansions.items():
        if tokens != name:
            text = re.sub(rf"(?<![\w]){re.escape(name)}(?![\w])", tokens, text)
    return text


def read_vectors(path: Path, keys: tuple[str, ...],
                 flag: str = "--textual_inversion_embeddings") -> list[torch.Tensor]:
    """One (N, width) tensor per text encoder (``keys``; ``""`` means the file's single tensor)."""
    if not path.is_file():
        raise UserError(f"{flag} {path}: file not found")
    try:
        if path.suffix == ".safetensors":
            data = load_file(str(path))
        else:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file; pickles with code in them are refused by weights_only
        raise UserError(f"{flag} {path}: not a readable embedding ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from exc
    if isinstance(data, dict) and "string_to_param" in data:
        data = data["string_to_param"]
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)} if isinstance(data, dict) else {}
    if keys == ("",):
        if not tensors:
            raise UserError(f"{flag} {path}: no tensor in the file")
        if {"clip_l", "clip_g"} <= tensors.keys():
            raise UserError(f"{flag} {path}: an SDXL embedding (clip_l + clip_g); this model takes an SD1.x/2.x "
                            "embedding (one tensor)")
        return [_two_d(next(iter(tensors.values())))]
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise UserError(f"{flag} {path}: this model needs the tensors {list(keys)} "
                        f"(missing {missing}); the file has {sorted(tensors)} - is it for another model family?")
    return [_two_d(tensors[k]) for k in keys]


def _two_d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1) if t.dim() == 1 else t


def write_embedding(path: str | Path, vectors: list[torch.Tensor], keys: tuple[str, ...], name: str,
                    metadata: dict[str, str] | None = None, step: int | None = None) -> None:
    """An embedding file (atomically): ``.safetensors`` with ``emb_params`` (one encoder) or one
    tensor per key (SDXL's ``clip_l`` / ``clip_g``) and ``metadata`` in the header; ``.pt`` in
    AUTOMATIC1111's form (``string_to_param``; SDXL: the per-encoder dict, which it reads too)."""
    tensors = {SINGLE_KEY if key == "" else key: v.detach().cpu().contiguous() for key, v in zip(keys, vectors)}
    if str(path).endswith(".safetensors"):
        save_safetensors(tensors, path, metadata or {})
    elif keys == ("",):
        save_torch({"string_to_token": {"*": 265}, "string_to_param": {"*": tensors[SINGLE_KEY]}, "name": name,
                    "step": step, "sd_checkpoint": None, "sd_checkpoint_name": None}, path)
    else:
        save_torch(tensors, path)


class ExpandingTokenizer:
    """A tokenizer whose input text has each embedding word expanded into its tokens first, so
    training captions, sample prompts and validation captions all see ``name name1 ...`` for
    ``name``; everything else is the wrapped tokenizer's."""

    def __init__(self, tokenizer, expansions: dict[str, str]):
        self._tokenizer, self._expansions = tokenizer, expansions

    def _expand(self, text):
        if isinstance(text, str):
            return expand_words(text, self._expansions)
        if isinstance(text, (list, tuple)):
            return [self._expand(t) for t in text]
        return text

    def __call__(self, text, *args, **kwargs):
        return self._tokenizer(self._expand(text), *args, **kwargs)

    def tokenize(self, text, *args, **kwargs):
        return self._tokenizer.tokenize(self._expand(text), *args, **kwargs)

    def encode(self, text, *args, **kwargs):
        return self._tokenizer.encode(self._expand(text), *args, **kwargs)

    def __len__(self) -> int:
        return len(self._tokenizer)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)
