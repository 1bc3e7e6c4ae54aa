"""Textual inversion embeddings for gen_img.py (``--textual_inversion_embeddings``), as kohya reads them.

An embedding file adds a word to the prompt vocabulary: its file name. A file with N vectors adds
N tokens (``name``, ``name1``, ... ``name{N-1}``), and ``name`` in a prompt stands for all of them.
Files: AUTOMATIC1111's ``.pt`` (``string_to_param``) and ``.safetensors`` (``emb_params``), kohya's
and diffusers' files (the one tensor in the file); SDXL files hold ``clip_l`` and ``clip_g``, one
tensor per text encoder. The family says which keys it reads (``textual_inversion_keys``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AddedToken

from library.models.textual_inversion import expand_words, read_vectors, token_names
from library.utils.errors import UserError


class TextualInversion:
    """The embeddings added to a model's tokenizers and text encoders, and the prompt rewriting."""

    def __init__(self):
        self.expansions: dict[str, str] = {}

    def add(self, path: Path, keys: tuple[str, ...], tokenizers: list, text_encoders: list) -> None:
        name = path.stem
        vectors = read_vectors(path, keys)
        count = vectors[0].shape[0]
        if any(v.shape[0] != count for v in vectors):
            raise UserError(f"--textual_inversion_embeddings {path}: the tensors have different vector counts")
        tokens = token_names(name, count)
        for tokenizer, encoder, v in zip(tokenizers, text_encoders, vectors):
            embeddings = encoder.get_input_embeddings()
            if v.shape[1] != embeddings.weight.shape[1]:
                raise UserError(f"--textual_inversion_embeddings {path}: vectors of width {v.shape[1]}, but this "
                                f"text encoder's are {embeddings.weight.shape[1]} wide (another model family?)")

            if tokenizer.add_tokens([AddedToken(t, normalized=False) for t in tokens]) != len(tokens):
                raise UserError(f"--textual_inversion_embeddings {path}: '{name}' (or a numbered token after it) "
                                "is already a token; rename the file (its name is the word used in prompts)")
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows set below
            ids = tokenizer.convert_tokens_to_ids(tokens)
            with torch.no_grad():
                encoder.get_input_embeddings().weight[ids] = v.to(embeddings.weight)
        self.expansions[name] = " ".join(tokens)

    def expand(self, text: str) -> str:
        """``name`` -> ``name name1 ...`` for every embedding with several vectors (whole words only)."""
        return expand_words(text, self.expansions)


def load_textual_inversions(paths: list[str], family, models) -> TextualInversion:
    keys = family.textual_inversion_keys
    if not keys:
        raise UserError(f"--textual_inversion_embeddings: not available for {family.name} models")
    ti = TextualInversion()
    for path in paths:
        ti.add(Path(path), keys, models.tokenizers[:len(keys)], models.text_encoders[:len(keys)])
    return ti
