"""Grouping images whose perceptual hashes are close, with a BK-tree (no all-pairs loop).

Images are taken best first (most pixels, then largest file); each joins the group of the nearest
kept image at most ``threshold`` bits away, or starts a group of its own and is kept. So every group
holds its best copy, and no chain of small steps joins two images that are far apart (each member is
within the threshold of the kept one). Hashes are Python ints; distances are popcounts of the XOR.
"""

from __future__ import annotations

from collections.abc import Sequence


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class BKTree:
    """A metric tree over ints under the Hamming distance: ``nearest`` visits only the subtrees
    the triangle inequality leaves possible."""

    def __init__(self):
        self._root: list | None = None  # [value, payload, {distance: child}]

    def add(self, value: int, payload) -> None:
        node = [value, payload, {}]
        if self._root is None:
            self._root = node
            return
        current = self._root
        while True:
            d = hamming(value, current[0])
            child = current[2].get(d)
            if child is None:
                current[2][d] = node
                return
            current = child

    def nearest(self, value: int, limit: int):
        """(distance, payload) of the closest value at most ``limit`` away, or None."""
        if self._root is None:
            return None
        best, stack = None, [self._root]
        while stack:
            node = stack.pop()
            d = hamming(value, node[0])
            if d <= limit and (best is None or d < best[0]):
                best = (d, node[1])
                limit = d  # nothing farther can win now
            for edge, child in node[2].items():
                if d - limit <= edge <= d + limit:
                    stack.append(child)
        return best


def group_near(hashes: Sequence[int], order: Sequence[int], threshold: int) -> list[tuple[int, int, int]]:
    """For every index of ``hashes``: (index, index of its kept image, distance). ``order`` lists the
    indices best first; a kept image points to itself with distance 0."""
    tree, out = BKTree(), []
    for i in order:
        found = tree.nearest(hashes[i], threshold)
        if found is None:
            tree.add(hashes[i], i)
            out.append((i, i, 0))
        else:
            out.append((i, found[1], found[0]))
    return out
