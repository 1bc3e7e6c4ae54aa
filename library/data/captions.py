"""Caption reading and per-sample caption processing (pure functions, randomness passed in)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path


class CaptionError(ValueError):
    """A caption file that exists but cannot be used."""


def read_caption_file(image_path: str, extension: str) -> str | None:
    """The first non-empty line of ``<image stem><extension>``, or None if there is no such file.

    Raises :class:`CaptionError` for files that are not UTF-8 or hold no text.
    """
    if not extension.startswith("."):
        extension = "." + extension
    path = Path(image_path).with_suffix(extension)
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CaptionError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8") from exc
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise CaptionError(f"{path} is empty; write a caption or delete the file to use class_tokens")
    return lines[0]


@dataclass(frozen=True)
class CaptionOptions:
    """The caption settings of one subset."""

    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_separator: str = ","
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0


def process_caption(caption: str, opts: CaptionOptions, rng: random.Random) -> str:
    """Apply prefix/suffix, whole-caption dropout and tag shuffling (first ``keep_tokens`` fixed).

    Shuffled tags are joined with ``", "`` as kohya does, whatever the separator.
    """
    if opts.caption_prefix:
        caption = f"{opts.caption_prefix} {caption}"
    if opts.caption_suffix:
        caption = f"{caption} {opts.caption_suffix}"
    if opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate:
        return ""
    if opts.shuffle_caption:
        tags = [t.strip() for t in caption.split(opts.caption_separator)]
        fixed, flexible = tags[:opts.keep_tokens], tags[opts.keep_tokens:]
        rng.shuffle(flexible)
        caption = ", ".join(t for t in fixed + flexible if t)
    return caption
