"""The textual inversion trainers' own choices (train_textual_inversion.py and its SDXL twin),
checked before any model loads."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from library.config.model_training import refuse_network_keys
from library.data.dataset_config import DatasetConfig
from library.utils.errors import UserError

#: --save_model_as for an embedding: safetensors (AUTOMATIC1111, kohya, diffusers, ComfyUI read it)
#: or AUTOMATIC1111's .pt
SAVE_FORMATS = ("safetensors", "pt")

# Caption templates for --use_object_template / --use_style_template: kohya's options replace every
# caption with a phrase around the token, drawn per sample. These are this project's own phrases.
OBJECT_TEMPLATES = (
    "a photo of {}", "a picture of {}", "a close-up photo of {}", "a bright photo of {}", "a dark photo of {}",
    "a cropped photo of {}", "a photo of the {}", "a good photo of {}", "a photo of one {}", "a rendering of {}",
    "a photo of a small {}", "a photo of a large {}", "an image showing {}", "a snapshot of {}",
    "a clean photo of {}", "a blurry photo of {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a picture in the style of {}", "an artwork in the style of {}",
    "a rendering in the style of {}", "a drawing in the style of {}", "a cropped painting in the style of {}",
    "a small painting in the style of {}", "a large painting in the style of {}", "an image in the style of {}",
    "a sketch in the style of {}", "a detailed painting in the style of {}", "a bright painting in the style of {}",
)


@dataclass(frozen=True)
class TokenConfig:
    """What a textual inversion run trains and how it is written."""

    token_string: str  # the word captions use for the new concept
    init_word: str | None  # the vectors start as this word's embedding (repeated over the vectors)
    num_vectors: int  # tokens (vectors) the concept gets
    weights: str | None  # an embedding file to continue from
    templates: tuple[str, ...] = ()  # caption templates replacing every caption ("{}" is the token)
    save_as: str = "safetensors"


def token_training_config(args: argparse.Namespace, datasets: list[DatasetConfig]) -> TokenConfig:
    token = (args.token_string or "").strip()
    if not token:
        raise UserError("--token_string is required: the new word your captions use for the concept (e.g. mychar)")
    if any(c.isspace() for c in token):
        raise UserError(f"--token_string {token!r}: one word, without spaces (it becomes a token of its own)")
    if args.num_vectors_per_token < 1:
        raise UserError(f"--num_vectors_per_token {args.num_vectors_per_token}: must be 1 or more")
    if args.weights and not Path(args.weights).is_file():
        raise UserError(f"--weights {args.weights}: file not found")
    if args.use_object_template and args.use_style_template:
        raise UserError("--use_object_template and --use_style_template: choose one template set")
    templates = OBJECT_TEMPLATES if args.use_object_template else STYLE_TEMPLATES if args.use_style_template else ()
    if args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk:
        raise UserError("--cache_text_encoder_outputs: textual inversion trains the token's vectors, which change the "
                        "text encoder's output every step; remove the flag")
    refuse_network_keys(datasets, "a textual inversion run")
    return TokenConfig(token, args.init_word, args.num_vectors_per_token, args.weights, templates,
                       args.save_model_as)
