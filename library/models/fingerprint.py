"""A short identity of a module's weights, recorded in caches so a changed model is never served stale."""

from __future__ import annotations

import hashlib
import json

import torch


def module_fingerprint(module: torch.nn.Module) -> str:
    """A short identity of a module's weights: its class, config and a hash of a few tensors."""
    h = hashlib.sha256(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        items = config.to_dict() if hasattr(config, "to_dict") else dict(config)  # transformers / diffusers
        public = {k: v for k, v in items.items() if not k.startswith("_")}  # "_" keys vary by process
        h.update(json.dumps(public, sort_keys=True, default=str).encode())
    params = list(module.state_dict().values())
    for t in params[:2] + params[-2:]:
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
