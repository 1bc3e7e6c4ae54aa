"""From a tagger's probabilities to the tag text of one image: thresholds per category, the
one rating / quality tag by argmax, and kohya's tag-shaping flags. Pure functions.

Where this departs from kohya on purpose: ``--tag_replacement`` matches the tag as it is written
(after ``--remove_underscore`` and ``--character_tag_expand``) as well as the model's own name, so a
replacement always applies (kohya compared the raw name only after renaming, so most did nothing);
``--always_first_tags`` and ``--character_tags_first`` keep the order given / the model's order
(kohya inserted each at the front, reversing them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from library.prep.tagger_model import TagList
from library.utils.errors import UserError

THRESHOLD_CATEGORIES = ("general", "character", "copyright", "artist", "meta", "model")
ARGMAX_CATEGORIES = ("rating", "quality")
_WORDY = re.compile(r"[^\W_]{2,}")  # two letters or digits in a row: a word, not a kaomoji like ^_^ or o_o


@dataclass(frozen=True)
class TagRules:
    thresholds: dict[str, float]  # by THRESHOLD_CATEGORIES
    separator: str = ", "
    remove_underscore: bool = False
    character_expand: bool = False
    character_first: bool = False
    undesired: frozenset[str] = frozenset()
    always_first: tuple[str, ...] = ()
    replacements: dict[str, str] = field(default_factory=dict)
    placement: dict[str, str] = field(default_factory=dict)  # rating/quality -> "first" or "last"


def split_tags(text: str, separator: str) -> list[str]:
    """Tags of a list written with ``separator`` (split on its non-space part, each stripped)."""
    cut = separator.strip() or separator
    return [t.strip() for t in text.split(cut) if t.strip()]


def parse_replacements(text: str | None) -> dict[str, str]:
    """kohya's ``--tag_replacement "from,to;from2,to2"`` (``\\,`` and ``\\;`` for literal ones)."""
    if not text:
        return {}
    comma, semi = "\x00", "\x01"
    escaped = text.replace("\\,", comma).replace("\\;", semi)
    pairs = {}
    for item in escaped.split(";"):
        if not item.strip():
            continue
        parts = item.split(",")
        if len(parts) != 2 or not parts[0].strip():
            raise UserError(f"--tag_replacement {text!r}: each item must be 'source,target' (use \\, or \\; for "
                            f"a literal comma or semicolon); got {item.replace(comma, ',').replace(semi, ';')!r}")
        source, target = (p.replace(comma, ",").replace(semi, ";").strip() for p in parts)
        pairs[source] = target
    return pairs


def written_form(name: str, remove_underscore: bool) -> str:
    """A tag as written: underscores as spaces with ``remove_underscore``, except in kaomoji."""
    if remove_underscore and _WORDY.search(name):
        return name.replace("_", " ")
    return name


def expand_character(name: str) -> list[str]:
    """``name_(series)`` -> ``[name, series]``; ``name_(costume)_(series)`` -> ``[name_(costume), series]``."""
    if not name.endswith(")") or "(" not in name:
        return [name]
    head, _, series = name.rpartition("(")
    head = head[:-1] if head.endswith("_") else head
    return [head, series[:-1]] if head else [name]


def written_tags(tags: TagList, rules: TagRules) -> list[list[str]]:
    """Per output index, the tag(s) it writes: expanded, underscores removed, replaced."""
    out = []
    for name, category in zip(tags.names, tags.categories):
        if name in rules.replacements:
            out.append([rules.replacements[name]])
            continue
        parts = expand_character(name) if rules.character_expand and category == "character" else [name]
        parts = [written_form(p, rules.remove_underscore) for p in parts]
        out.append([rules.replacements.get(p, p) for p in parts])
    return out


def unknown_replacements(tags: TagList, rules: TagRules) -> list[str]:
    """Replacement sources that are no tag of this model (to warn about: they can never apply)."""
    known = set(tags.names)
    rules_without = TagRules(rules.thresholds, rules.separator, rules.remove_underscore, rules.character_expand)
    for parts in written_tags(tags, rules_without):
        known.update(parts)
    return [s for s in rules.replacements if s not in known]


def choose_tags(probs: np.ndarray, tags: TagList, written: list[list[str]], rules: TagRules) -> list[str]:
    """The tags of one image (``probs``: one probability per output), in their final order."""
    chosen = {c: [i for i in tags.indices(c) if probs[i] >= rules.thresholds[c]] for c in THRESHOLD_CATEGORIES}
    ordered = sorted(i for c in THRESHOLD_CATEGORIES for i in chosen[c])
    if rules.character_first:
        ordered = chosen["character"] + [i for i in ordered if tags.categories[i] != "character"]
    first, last = [], []
    for category in ARGMAX_CATEGORIES:
        where = rules.placement.get(category)
        candidates = tags.indices(category)
        if where and candidates:
            best = max(candidates, key=lambda i: probs[i])
            (first if where == "first" else last).append(best)
    names = [t for i in first + ordered + last for t in written[i]]
    names = [t for t in dict.fromkeys(names) if t not in rules.undesired]
    leading = [t for t in rules.always_first if t in names]
    return leading + [t for t in names if t not in leading]


def merge_with_existing(existing: str, new: list[str], separator: str) -> list[str]:
    """``--append_tags``: the tags already in the file, then the new ones not among them."""
    old = split_tags(existing, separator)
    return old + [t for t in new if t not in old]
