"""SD3.5 positional-embedding options (kohya's ``--pos_emb_random_crop_rate`` and
``--enable_scaled_pos_embed``), installed on a diffusers SD3 ``PatchEmbed``.

The MMDiT adds a window of a large fixed sin-cos table (``pos_embed_max_size`` patches square) to
the patched latents; diffusers always takes the centred window.

* Random crop: for a step chosen with probability ``rate``, the window sits at a random place in
  the table instead, so the model sees other absolute positions (helps multi-resolution training).
* Scaled embeddings: per training resolution of side P patches, a table of side int(1.5 P) whose
  coordinates are scaled so that its centred P x P window spans the same coordinate range
  [0, base) as the model's base resolution; a latent uses the table of the nearest resolution by
  area (the thresholds halfway between consecutive areas, as kohya picks them).
"""

from __future__ import annotations

import contextlib
import math

import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed_from_grid

MAX_RATIO = 1.5
BASE_SIZE = 16


def scaled_sincos_table(dim: int, grid_size: int, sample_size: int, base_size: int = BASE_SIZE) -> torch.Tensor:
    """(1, G*G, dim) sin-cos embeddings of a G x G grid whose centred ``sample_size`` window maps to
    coordinates [0, base_size)."""
    coords = (torch.arange(grid_size, dtype=torch.float64) - (grid_size - sample_size) / 2) * base_size / sample_size
    grid = torch.stack(torch.meshgrid(coords, coords, indexing="xy"), dim=0).reshape(2, 1, grid_size, grid_size)
    return get_2d_sincos_pos_embed_from_grid(dim, grid.float(), output_type="pt").float().unsqueeze(0)


def window(table: torch.Tensor, side: int, height: int, width: int, crop: tuple[float, float] | None) -> torch.Tensor:
    """The (1, height*width, dim) window of a (1, side*side, dim) table: centred, or at the place
    given by ``crop`` (two fractions in [0, 1) for top and left)."""
    if crop is None:
        top, left = (side - height) // 2, (side - width) // 2
    else:
        top, left = int(crop[0] * (side - height + 1)), int(crop[1] * (side - width + 1))
    grid = table.reshape(1, side, side, -1)[:, top:top + height, left:left + width, :]
    return grid.reshape(1, height * width, -1)


class PosEmbedOptions:
    """Replaces ``patch_embed.cropped_pos_embed``; a training forward runs inside :meth:`cropped`."""

    def __init__(self, patch_embed, scaled_sizes: tuple[int, ...] = ()):
        self.patch_embed = patch_embed
        self.crop: tuple[float, float] | None = None
        dim = patch_embed.pos_embed.shape[-1]
        sizes = sorted(set(scaled_sizes))
        self.tables = {p: scaled_sincos_table(dim, int(p * MAX_RATIO), p) for p in sizes}
        # an area up to each threshold uses that size's table (halfway between consecutive areas)
        self.thresholds = [((a * a + b * b) // 2, a) for a, b in zip(sizes, sizes[1:])] + \
            ([(int((sizes[-1] * MAX_RATIO) ** 2), sizes[-1])] if sizes else [])
        patch_embed.cropped_pos_embed = self

    @contextlib.contextmanager
    def cropped(self, crop: tuple[float, float] | None):
        """The window at ``crop`` (fractions of the free space; None: centred) for the forwards inside."""
        self.crop = crop
        try:
            yield
        finally:
            self.crop = None

    def _table(self, height: int, width: int) -> tuple[torch.Tensor, int]:
        if not self.tables:
            pe = self.patch_embed
            return pe.pos_embed, pe.pos_embed_max_size
        size = next((p for area, p in self.thresholds if height * width <= area), self.thresholds[-1][1])
        side = int(size * MAX_RATIO)
        if height > side or width > side:  # a bucket much longer than any training resolution
            size = max(height, width)
            side = int(size * MAX_RATIO)
            self.tables[size] = scaled_sincos_table(self.patch_embed.pos_embed.shape[-1], side, size)
        return self.tables[size], side

    def __call__(self, height: int, width: int) -> torch.Tensor:
        p = self.patch_embed.patch_size
        h, w = height // p, width // p
        table, side = self._table(h, w)
        if h > side or w > side:
            raise ValueError(f"latent of {h}x{w} patches exceeds the positional table ({side}); use smaller images")
        return window(table.to(self.patch_embed.pos_embed.device), side, h, w, self.crop)


def patched_side(width: int, height: int, patch: int = 2) -> int:
    """The square side in patches with the area of a ``width`` x ``height`` training resolution."""
    return int(math.sqrt((width // 8) * (height // 8))) // patch
