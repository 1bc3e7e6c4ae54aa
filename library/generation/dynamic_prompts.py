"""kohya's dynamic prompts in gen_img.py prompt lines.

``{a|b|c}`` becomes one of its options, drawn per image from the image's seed; groups nest (inner
ones first) and ``\\{ \\}`` are literal braces. A group may start with ``$$``-separated settings:

* ``{2$$a|b|c}``: two different options, joined by ``, ``; ``{1-3$$a|b|c}``: one to three;
* ``{2$$ and $$a|b|c}``: joined by `` and `` instead;
* ``{e$$a|b|c}``: enumerate - the line makes one image per option (per combination, with a count)
  instead of ``--images_per_prompt`` images; several ``e$$`` groups multiply.
"""

from __future__ import annotations

import itertools
import random
import re

_ESCAPES = {"\\{": "\x00", "\\}": "\x01"}
_GROUP = re.compile(r"\{([^{}]*)\}")
_COUNT = re.compile(r"(\d+)(?:-(\d+))?")


def _escape(text: str) -> str:
    for escape, mark in _ESCAPES.items():
        text = text.replace(escape, mark)
    return text


def _unescape(text: str) -> str:
    return text.replace("\x00", "{").replace("\x01", "}")


def _parse(content: str) -> tuple[bool, tuple[int, int], str, list[str]]:
    """(enumerate, (least, most) options, separator, options) of a group's content."""
    *settings, body = content.split("$$")
    options = body.split("|")
    enumerate_all = bool(settings) and settings[0] in ("e", "E")
    if enumerate_all:
        settings = settings[1:]
    count = (1, 1)
    if settings and (m := _COUNT.fullmatch(settings[0].strip())):
        least = int(m.group(1))
        count = (least, int(m.group(2)) if m.group(2) else least)
        settings = settings[1:]
    separator = settings[0] if settings else ", "
    least, most = min(count[0], len(options)), min(max(count), len(options))
    return enumerate_all, (least, most), separator, options


def _draw(content: str, rng: random.Random) -> str:
    _, (least, most), separator, options = _parse(content)
    return separator.join(rng.sample(options, rng.randint(least, most)))


def expand_dynamic(text: str, rng: random.Random) -> str:
    """Every group replaced by a draw from ``rng`` (seeded per image), inner groups first."""
    text = _escape(text)
    while (expanded := _GROUP.sub(lambda m: _draw(m.group(1), rng), text, count=1)) != text:
        text = expanded
    return _unescape(text)


def enumerate_dynamic(text: str) -> list[str]:
    """The line's prompts after its ``e$$`` groups (innermost, not nested in others) are enumerated:
    one prompt per option or combination, in order; one prompt (unchanged) without them."""
    original, text = text, _escape(text)
    groups = [m for m in _GROUP.finditer(text) if _parse(m.group(1))[0]]
    if not groups:
        return [original]
    choices = []
    for m in groups:
        _, (least, most), separator, options = _parse(m.group(1))
        choices.append([separator.join(c) for k in range(least, most + 1) for c in itertools.combinations(options, k)])
    prompts = []
    for picked in itertools.product(*choices):
        out, last = [], 0
        for m, value in zip(groups, picked):
            out += [text[last:m.start()], value]
            last = m.end()
        # literal braces stay escaped: the result is drawn from again per image
        prompts.append(("".join(out) + text[last:]).replace("\x00", "\\{").replace("\x01", "\\}"))
    return prompts
