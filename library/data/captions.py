"""Caption reading and per-sample caption processing (pure functions, randomness passed in).

The order is kohya's: prefix/suffix, whole-caption dropout, wildcards, then (when shuffling, tag
dropout or token warm-up is on) splitting into fixed and flexible tags, warm-up, shuffle and tag
dropout, and finally the secondary separator.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path


class CaptionError(ValueError):
    """A caption file that exists but cannot be used."""


def read_caption_file(image_path: str, extension: str, all_lines: bool = False) -> str | None:
    """The first non-empty line of ``<image stem><extension>`` (all of them, joined with newlines,
    when ``all_lines`` — for wildcards), or None if there is no such file.

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
    return "\n".join(lines) if all_lines else lines[0]


@dataclass(frozen=True)
class CaptionOptions:
    """The caption settings of one subset (kohya's keys)."""

    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_separator: str = ","
    secondary_separator: str | None = None
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    enable_wildcard: bool = False
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0


_WILDCARD = re.compile(r"(?<!\{)\{([^{}]+)\}(?!\})")


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """One random line of a multi-line caption, and one random choice per ``{a|b|c}``;
    ``{{`` and ``}}`` stand for literal braces."""
    lines = caption.split("\n")
    caption = rng.choice(lines) if len(lines) > 1 else lines[0]
    caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace("{{", "{").replace("}}", "}")


def _split(text: str, sep: str) -> list[str]:
    return [t.strip() for t in text.split(sep) if t.strip()]


def warmup_tag_count(n_flexible: int, step: int, warmup_min: int, warmup_steps: int) -> int:
    """How many flexible tags token warm-up keeps at ``step`` (all of them once warm-up is over)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return n_flexible
    return min(n_flexible, math.floor(step * (n_flexible - warmup_min) / warmup_steps) + warmup_min)


def process_caption(caption: str, opts: CaptionOptions, rng: random.Random, epoch: int = 0, step: int = 0,
                    max_train_steps: int = 0) -> str:
    """The caption as it is trained for one sample (see the module docstring for the order)."""
    if opts.caption_prefix:
        caption = f"{opts.caption_prefix} {caption}"
    if opts.caption_suffix:
        caption = f"{caption} {opts.caption_suffix}"
    dropped = opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate
    every = opts.caption_dropout_every_n_epochs
    if dropped or (every > 0 and epoch % every == 0):
        return ""
    caption = expand_wildcards(caption, rng) if opts.enable_wildcard else caption.split("\n")[0]
    warmup = opts.token_warmup_step
    warmup_steps = math.floor(warmup * max_train_steps) if 0 < warmup < 1 else int(warmup)
    sep = opts.caption_separator
    if opts.shuffle_caption or warmup_steps > 0 or opts.caption_tag_dropout_rate > 0:
        if opts.keep_tokens_separator and opts.keep_tokens_separator in caption:
            parts = caption.split(opts.keep_tokens_separator)
            fixed, flexible = _split(parts[0], sep), _split(parts[1], sep)
            suffix = _split(opts.keep_tokens_separator.join(parts[2:]), sep) if len(parts) > 2 else []
        else:
            tags = _split(caption, sep)
            fixed, flexible, suffix = tags[:opts.keep_tokens], tags[opts.keep_tokens:], []
        flexible = flexible[:warmup_tag_count(len(flexible), step, opts.token_warmup_min, warmup_steps)]
        if opts.shuffle_caption:
            rng.shuffle(flexible)
        if opts.caption_tag_dropout_rate > 0:
            flexible = [t for t in flexible if rng.random() >= opts.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flexible + suffix)
    elif opts.keep_tokens_separator:
        caption = caption.replace(opts.keep_tokens_separator, " ").strip()
    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, sep)
    return caption
