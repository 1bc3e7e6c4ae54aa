"""Per-sample random draws keyed by where a sample sits in training, not by call order.

Noise, timesteps and every other training-time draw for a sample come from a generator seeded by
(seed, epoch, batch index, position in the global batch). The same sample therefore gets the same
noise however the global batch is split over processes, and after a resume.
"""

from __future__ import annotations

import hashlib

import torch


def _seed_of(*parts) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class SampleRNG:
    """Random draws for one (local) batch; ``keys`` are the samples' (epoch, batch, position) keys."""

    def __init__(self, seed: int, keys: list[tuple[int, int, int]], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._gens = [torch.Generator().manual_seed(_seed_of(seed, *key)) for key in keys]
        # draws shared by the whole global batch (kohya draws these once per batch)
        epoch, batch, _ = keys[0]
        self._batch_gen = torch.Generator().manual_seed(_seed_of(seed, epoch, batch, "batch"))

    def __len__(self) -> int:
        return len(self._gens)

    def randn(self, *shape: int) -> torch.Tensor:
        """(B, *shape) standard normal, each sample from its own generator."""
        return torch.stack([torch.randn(shape, generator=g) for g in self._gens]).to(self.device)

    def rand(self) -> torch.Tensor:
        """(B,) uniform [0, 1)."""
        return torch.cat([torch.rand(1, generator=g) for g in self._gens]).to(self.device)

    def randint(self, low: int, high: int) -> torch.Tensor:
        """(B,) integers in [low, high)."""
        return torch.cat([torch.randint(low, high, (1,), generator=g) for g in self._gens]).to(self.device)

    def batch_uniform(self) -> float:
        """One uniform [0, 1) number shared by every sample of the global batch."""
        return torch.rand(1, generator=self._batch_gen).item()


def sample_keys(epoch: int, batch_index: int, positions: range) -> list[tuple[int, int, int]]:
    """Keys of the samples at ``positions`` of global batch ``batch_index`` in ``epoch``."""
    return [(epoch, batch_index, j) for j in positions]
