"""The network plug-in contract (kohya's ``--network_module`` seam), written down once.

A network module is any importable module with

    create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, **network_args)
        -> a torch.nn.Module implementing :class:`TrainableNetwork` (or None to stop)
    create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None,
                                for_inference=False, **kwargs) -> (network, weights_sd)

``text_encoder`` is one module or a list (one per text encoder); ``network_args`` values are the
strings given with ``--network_args key=value``. Third-party modules such as ``lycoris.kohya``
implement the same functions. The trainer talks to every network through :class:`NetworkAdapter`,
which supplies the defaults of the optional methods, so it never probes with ``hasattr``.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

import torch

from library.utils.errors import UserError


@runtime_checkable
class TrainableNetwork(Protocol):
    """Methods the trainer needs from a network (kohya's names and signatures)."""

    def apply_to(self, text_encoder, unet, apply_text_encoder: bool = True, apply_unet: bool = True) -> None: ...

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr): ...

    def prepare_grad_etc(self, text_encoder, unet) -> None: ...

    def on_epoch_start(self, text_encoder, unet) -> None: ...

    def get_trainable_params(self): ...

    def save_weights(self, file: str, dtype, metadata: dict | None) -> None: ...

    def load_weights(self, file: str): ...


class NetworkAdapter:
    """Wraps a plug-in's network object; optional methods fall back to documented defaults."""

    def __init__(self, network: torch.nn.Module):
        missing = [name for name in ("apply_to", "prepare_optimizer_params", "save_weights", "get_trainable_params")
                   if not callable(getattr(network, name, None))]
        if missing:
            raise UserError(f"network object {type(network).__name__} lacks required method(s) {missing}")
        self.net = network

    def optimizer_groups(self, text_encoder_lr: float | None, unet_lr: float | None,
                         default_lr: float) -> tuple[list[dict], list[str]]:
        """Parameter groups and their log names; old plug-ins return only the groups."""
        result = self.net.prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)
        if isinstance(result, tuple):
            groups, names = result
        else:
            groups, names = result, [f"group{i}" for i in range(len(result))]
        kept = [(g, n) for g, n in zip(groups, names) if g.get("lr", default_lr) not in (0, None)]
        return [g for g, _ in kept], [n for _, n in kept]

    def _optional(self, name: str, *args) -> Any:
        fn = getattr(self.net, name, None)
        return fn(*args) if callable(fn) else None

    def prepare_grad_etc(self, text_encoder, unet) -> None:
        """Default: make the network's parameters trainable."""
        fn = getattr(self.net, "prepare_grad_etc", None)
        if callable(fn):
            fn(text_encoder, unet)
        else:
            self.net.requires_grad_(True)

    def on_epoch_start(self, text_encoder, unet) -> None:
        """Default: put the network in training mode."""
        fn = getattr(self.net, "on_epoch_start", None)
        if callable(fn):
            fn(text_encoder, unet)
        else:
            self.net.train()

    def on_step_start(self, text_encoder, unet) -> None:
        self._optional("on_step_start", text_encoder, unet)

    def set_multiplier(self, multiplier: float) -> None:
        """The network's strength (kohya's ``set_multiplier``); required only when it is not 1."""
        fn = getattr(self.net, "set_multiplier", None)
        if not callable(fn):
            raise UserError(f"network_multiplier {multiplier}: the network {type(self.net).__name__} has no "
                            "set_multiplier(); leave network_multiplier at 1")
        fn(multiplier)

    def enable_gradient_checkpointing(self) -> None:
        self._optional("enable_gradient_checkpointing")

    def load_weights(self, path: str):
        if not callable(getattr(self.net, "load_weights", None)):
            raise UserError(f"--network_weights: the network {type(self.net).__name__} cannot load weights")
        return self.net.load_weights(path)

    def trainable_params(self):
        return list(self.net.get_trainable_params())

    def save(self, path: str, dtype, metadata: dict | None) -> None:
        self.net.save_weights(path, dtype, metadata)


def import_network_module(name: str):
    """Import ``--network_module`` and check it has ``create_network``."""
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        hint = " (pip install lycoris-lora)" if name.startswith("lycoris") else ""
        raise UserError(f"--network_module {name}: cannot import it ({exc}){hint}; "
                        "the built-in one is networks.lora") from exc
    if not callable(getattr(module, "create_network", None)):
        raise UserError(f"--network_module {name}: the module has no create_network() function")
    return module


def parse_network_args(items: list[str] | None) -> dict[str, str]:
    """``--network_args k=v ...`` -> dict of strings (split at the first '=')."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--network_args '{item}': expected key=value")
        out[key.strip()] = value.strip()
    return out
