"""Image captioning with transformers' image-to-text models (BLIP, BLIP-2, GIT, ...), offline-safe.

A model is a local folder in the hub layout (``config.json``, weights, the processor's files) or a hub
id, found in the local cache first; with the hub offline a missing model is a clear error naming
what to download. kohya's make_captions.py loads its own copy of BLIP from a ``.pth`` URL; here the
same model comes in the transformers layout (``Salesforce/blip-image-captioning-large``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from library.utils.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decoding:
    """How captions are generated: beam search, nucleus sampling, or greedy (``sample=False``,
    one beam). Lengths are in new tokens."""

    sample: bool = True
    num_beams: int = 1
    top_p: float = 0.9
    max_length: int = 75
    min_length: int = 5

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_length, "min_new_tokens": min(self.min_length, self.max_length)}
        if self.num_beams > 1:
            return {**kwargs, "num_beams": self.num_beams, "do_sample": False}
        if self.sample:
            return {**kwargs, "do_sample": True, "top_p": self.top_p, "top_k": 0}
        return {**kwargs, "do_sample": False}


def check_model_name(model: str, flag: str) -> None:
    """Refuse, before any loading, what is no transformers model: kohya's BLIP ``.pth`` weights."""
    if model.endswith((".pth", ".pt", ".ckpt")) or model.startswith(("http://", "https://")):
        raise UserError(f"{flag} {model}: kohya's own BLIP weights (.pth) are not read here; give a model in the "
                        "transformers layout: a hub id such as Salesforce/blip-image-captioning-large, or a local "
                        "folder holding one")


class Captioner:
    """One loaded image-to-text model and its processor."""

    def __init__(self, model: str, flag: str, device: str, require_type: str | None = None,
                 prompt: str | None = None):
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        check_model_name(model, flag)
        try:
            config = AutoConfig.from_pretrained(model)
            if require_type and config.model_type != require_type:
                raise UserError(f"{flag} {model}: a {config.model_type} model, not {require_type}; "
                                "give other kinds of captioner with --model")
            self.processor = AutoProcessor.from_pretrained(model)
            self.model = AutoModelForImageTextToText.from_pretrained(model).eval().to(device)
        except (OSError, ValueError) as exc:
            local = Path(model).exists()
            hint = ("the folder lacks a file or holds another kind of model" if local else
                    "it is not in the local hub cache and the hub cannot be reached; download it first "
                    f"(huggingface-cli download {model}) or give a local folder")
            raise UserError(f"{flag} {model}: cannot load it as an image-to-text model: {hint} "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
        self.device, self.prompt, self._torch = device, prompt, torch
        logger.info("captioner %s (%s) on %s", model, config.model_type, device)

    def caption(self, images: list, decoding: Decoding) -> list[str]:
        """One caption per PIL image, stripped of the prompt when the model repeats it."""
        inputs = {"images": images, "return_tensors": "pt"}
        if self.prompt:
            inputs["text"] = [self.prompt] * len(images)
        batch = self.processor(**inputs).to(self.device)
        with self._torch.no_grad():
            ids = self.model.generate(**batch, **decoding.generate_kwargs())
        texts = [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        if self.prompt:
            texts = [t[len(self.prompt):].strip() if t.lower().startswith(self.prompt.lower()) else t for t in texts]
        return texts


# GIT's text-reading captioners (git-large-textcaps) spell out the writing they see ("a sign that says
# open"); kohya's --remove_words drops those phrases. Kept as data: each pattern is removed where it matches.
WRITING_PHRASES = (
    r"\s*(?:has|with|and) the (?:words?|letters?|name|text) (?:\"[^\"]*\"|'[^']*'|\S+)"
    r"(?: (?:on|in) (?:the |her |his |their |its )?\w+)?",
    r"\s*(?:with a sign )?that (?:says|reads) (?:\"[^\"]*\"|'[^']*'|\S+)(?: on it)?",
    r"\s*with the number \d+(?: on (?:it|\w+ \w+))?",
    r"\s*with the words? (?:\"[^\"]*\"|'[^']*'|\S+)",
)


def remove_writing(caption: str) -> str:
    for pattern in WRITING_PHRASES:
        caption = re.sub(pattern, "", caption, flags=re.IGNORECASE)
    return re.sub(r"\s{2,}", " ", caption).strip(" ,")
