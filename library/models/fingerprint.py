"""A short identity of a module's weights, recorded in caches so a changed model is never served stale."""

from __future__ import annotations

import hashlib
import json

import torch


def module_fingerprint(module: torch.nn.Module) -> str:
    """A short identity of a module's weights: its class, config, and the first values of every
    tensor (a fine-tune or a merged LoRA changes the inner layers and leaves the embeddings and
    last norms as they were, so a few whole tensors are not enough)."""
    h = hashlib.sha256(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        items = config.to_dict() if hasattr(config, "to_dict") else dict(config)  # transformers / diffusers
        public = {k: v for k, v in items.items() if not k.startswith("_")}  # "_" keys vary by process
        h.update(json.dumps(public, sort_keys=True, default=str).encode())
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().flatten()[:16].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
