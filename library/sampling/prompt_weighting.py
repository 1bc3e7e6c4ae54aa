"""AUTOMATIC1111-style prompt emphasis: ``(word)`` x1.1, ``[word]`` /1.1, ``(word:1.3)`` sets the
weight, ``\\(`` and ``\\)`` are literal brackets. Pure functions."""

from __future__ import annotations

import re

_TOKEN = re.compile(r"\\[()\[\]\\]|\(|\[|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|\)|\]|[^\\()\[\]:]+|:")
ROUND_UP, SQUARE_DOWN = 1.1, 1 / 1.1


def parse_weighted_prompt(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into (segment, weight) pairs; neighbouring segments of equal weight are merged.
    Unbalanced brackets are closed at the end, as in AUTOMATIC1111."""
    out: list[list] = []
    round_stack: list[int] = []
    square_stack: list[int] = []

    def scale(start: int, factor: float) -> None:
        for seg in out[start:]:
            seg[1] *= factor

    for m in _TOKEN.finditer(text):
        tok, explicit = m.group(0), m.group(1)
        if tok.startswith("\\"):
            out.append([tok[1:], 1.0])
        elif tok == "(":
            round_stack.append(len(out))
        elif tok == "[":
            square_stack.append(len(out))
        elif explicit is not None and round_stack:
            scale(round_stack.pop(), float(explicit))
        elif tok == ")" and round_stack:
            scale(round_stack.pop(), ROUND_UP)
        elif tok == "]" and square_stack:
            scale(square_stack.pop(), SQUARE_DOWN)
        else:
            out.append([tok, 1.0])
    for start in round_stack:
        scale(start, ROUND_UP)
    for start in square_stack:
        scale(start, SQUARE_DOWN)
    merged: list[tuple[str, float]] = []
    for seg, weight in out:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + seg, weight)
        elif seg:
            merged.append((seg, weight))
    return merged or [("", 1.0)]
