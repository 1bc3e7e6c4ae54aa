"""kohya's clean-up of captions and tags (finetune/clean_captions_and_tags.py), its rules kept as data.

Tags: underscores become spaces (kaomoji such as ``^_^`` keep theirs); DeepDanbooru's ``rating:*`` tags
are dropped; when the image shows several people (a tag with ``girls`` or ``boys``), any group of
attributes with more than one tag (two eye colours, two hair colours, ...) cannot say who has which, so
the whole group is dropped (a single hair length is kept: it may hold for all); a one-word tag that a
longer tag ends with (``shirt`` beside ``white shirt``) is dropped. Captions: BLIP's phrasings are
normalised by :data:`CAPTION_REPLACEMENTS`, applied in order until nothing changes. Where kohya replaced
substrings (so ``lady`` also changed ``ladybug``), the replacements here match whole words.
"""

from __future__ import annotations

import re

from library.prep.tag_rules import written_form

SEVERAL_PEOPLE = re.compile(r"girls|boys")
RATING_TAG = re.compile(r"rating[:_ ]\w+")
HAIR_LENGTH = r"(?:long|short|medium) hair"
# attribute groups that contradict each other across several people: (what, full-tag pattern)
GROUPS_IN_COMPANY = (
    ("hair length", HAIR_LENGTH),
    ("hair cut", r"(?:bob|hime) cut"),
    ("eye colour", r"[\w\-]+ eyes"),
    ("sleeves", r"[\w\-]+ sleeves|sleeveless"),
    ("hairstyle", r"ponytail|braid|ahoge|twintails|[\w\-]+ bun|single hair bun|single side bun|two side up|"
                  r"two tails|[\w\-]+ braid|sidelocks"),
)
HAIR_COLOUR = r"[\w\-]+ hair"  # a hair length also matches this shape; it is not a colour
ONE_WORD = r"[\w\-]+|hair ornament"
CAPTION_REPLACEMENTS = (
    ("anime anime", "anime"), ("young ", ""), ("anime girl", "girl"), ("cartoon female", "girl"),
    ("cartoon lady", "girl"), ("cartoon character", "girl"), ("cartoon woman", "girl"), ("cartoon women", "girls"),
    ("cartoon girl", "girl"), ("anime female", "girl"), ("anime lady", "girl"), ("anime character", "girl"),
    ("anime woman", "girl"), ("anime women", "girls"), ("lady", "girl"), ("female", "girl"), ("woman", "girl"),
    ("women", "girls"), ("people", "girls"), ("person", "girl"), ("a cartoon figure", "a figure"),
    ("a cartoon image", "an image"), ("a cartoon picture", "a picture"), ("an anime cartoon image", "an image"),
    ("a cartoon anime drawing", "a drawing"), ("a cartoon drawing", "a drawing"), ("girl girl", "girl"),
)


def _matching(tags: list[str], pattern: str) -> list[str]:
    return [t for t in tags if re.fullmatch(pattern, t)]


def clean_tags(tags: list[str]) -> list[str]:
    """The cleaned tag list (order kept)."""
    tags = [written_form(t, True) for t in tags if not RATING_TAG.fullmatch(t)]
    if any(SEVERAL_PEOPLE.search(t) for t in tags):
        for _, pattern in GROUPS_IN_COMPANY:
            found = _matching(tags, pattern)
            if len(found) > 1:
                tags = [t for t in tags if t not in found]
        colours = [t for t in _matching(tags, HAIR_COLOUR) if not re.fullmatch(HAIR_LENGTH, t)]
        if len(colours) > 1:
            tags = [t for t in tags if t not in colours]
    redundant = {w for w in _matching(tags, ONE_WORD) if any(t != w and t.endswith(" " + w) for t in tags)}
    return list(dict.fromkeys(t for t in tags if t not in redundant))


def clean_caption(caption: str) -> str:
    for source, target in CAPTION_REPLACEMENTS:
        pattern = re.compile(r"\b" + re.escape(source.strip()) + r"\b" + (r"\s*" if source.endswith(" ") else ""))
        before = None
        while before != caption:
            before, caption = caption, pattern.sub(target, caption)
    # "an anime woman" became "an girl": the article follows the new word
    caption = re.sub(r"\b([Aa])n (girls?|figure|picture|drawing)\b", r"\1 \2", caption)
    return re.sub(r"\s{2,}", " ", caption).strip()
