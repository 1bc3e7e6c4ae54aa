"""Model families by name. A new family is a module plus one entry here."""

from __future__ import annotations

from library.families.base import LoadedModels, ModelFamily, NoisyBatch

__all__ = ["LoadedModels", "ModelFamily", "NoisyBatch"]
