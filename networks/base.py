"""The network plug-in contract (kohya's ``--network_module`` seam), written down once.

A network module is any importable module with

    create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, **network_args)
        -> a torch.nn.Module implementing :class:`TrainableNetwork` (or None to stop)
    create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None,
                                for_inference=False, **kwargs) -> (network, weights_sd)

and optionally

    check_network_args(network_args, family, neuron_dropout=None)
        raises UserError for args that cannot work; called before any model loads ("sd", "sdxl", "sd3")

``text_encoder`` is one module or a list (one per text encoder); ``network_args`` values are the
strings given with ``--network_args key=value``. Third-party modules such as ``lycoris.kohya``
implement the same functions. The trainer and gen_img talk to every network through
:class:`NetworkAdapter`, which reads the object's methods once, declares what it can do
(:class:`Capabilities`) and supplies the defaults of the optional methods, so no other code probes a
plug-in with ``hasattr``.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from library.utils.errors import UserError
from library.utils.files import atomic_path

logger = logging.getLogger(__name__)


@runtime_checkable
class TrainableNetwork(Protocol):
    """Methods the trainer needs from a network (kohya's names and signatures)."""

    def apply_to(self, text_encoder, unet, apply_text_encoder: bool = True, apply_unet: bool = True) -> None: ...

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr): ...

    def get_trainable_params(self): ...

    def save_weights(self, file: str, dtype, metadata: dict | None) -> None: ...


#: what a network must have for each use (training: the methods of :class:`TrainableNetwork`);
#: everything else is optional (see :class:`Capabilities`)
REQUIRED = {"train": tuple(name for name in vars(TrainableNetwork) if not name.startswith("_")
                           and callable(vars(TrainableNetwork)[name])),
            "generate": ()}
_OPTIONAL = ("apply_to", "prepare_optimizer_params", "save_weights", "get_trainable_params", "prepare_grad_etc",
             "on_epoch_start", "on_step_start", "set_multiplier", "enable_gradient_checkpointing", "load_weights",
             "merge_to", "pre_calculation", "restore_weights", "apply_max_norm_regularization")


@dataclass(frozen=True)
class Capabilities:
    """What a network can do beyond training, read once from the object when it is wrapped."""

    can_merge: bool  # kohya's merge_to(text_encoder, unet, weights_sd, dtype, device) (--network_merge)
    can_pre_calculate: bool  # pre_calculation() / restore_weights() (--network_pre_calc)
    can_set_multiplier: bool  # set_multiplier(value): per-line strengths, network_multiplier
    #: text_encoder_loras / unet_loras of modules with ``lora_name``, ``enabled``, ``region``
    #: and ``org_module`` (regional LoRA switches and masks them one by one)
    per_module: bool
    #: ``targets`` (networks.lora's Target list): the diffusers/PEFT form can be written
    exports_diffusers: bool
    #: ``per_encoder_lr = True``: prepare_optimizer_params takes one text-encoder rate per encoder
    per_encoder_lr: bool = False
    #: kohya's apply_max_norm_regularization(max_norm, device) (--scale_weight_norms)
    can_max_norm: bool = False


class NetworkAdapter:
    """Wraps a plug-in's network object: the one place that looks at which methods it has.

    Trainer and generation call every network through this, including third-party ones such as
    ``lycoris.kohya``; optional methods fall back to documented defaults, and a use the network
    cannot serve is refused with a message naming it."""

    def __init__(self, network: TrainableNetwork | torch.nn.Module, purpose: str = "train"):
        self.net = network
        self._methods = {name: fn for name in _OPTIONAL if callable(fn := getattr(network, name, None))}
        missing = [name for name in REQUIRED[purpose] if name not in self._methods]
        if missing:
            raise UserError(f"network object {type(network).__name__} lacks required method(s) {missing}")
        modules = [getattr(network, part, None) for part in ("text_encoder_loras", "unet_loras")]
        self.capabilities = Capabilities(
            can_merge="merge_to" in self._methods,
            can_pre_calculate="pre_calculation" in self._methods and "restore_weights" in self._methods,
            can_set_multiplier="set_multiplier" in self._methods,
            per_module=all(isinstance(m, list) for m in modules)
            and all(hasattr(lora, "org_module") and hasattr(lora, "region") for m in modules for lora in m),
            exports_diffusers=bool(getattr(network, "targets", None)),
            per_encoder_lr=bool(getattr(network, "per_encoder_lr", False)),
            can_max_norm="apply_max_norm_regularization" in self._methods)

    @property
    def name(self) -> str:
        return type(self.net).__name__

    # --------------------------------------------------------------- training
    def apply_to(self, text_encoder, unet, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Hook the network into the models (a network that injects itself has nothing to do here)."""
        if "apply_to" in self._methods:
            self._methods["apply_to"](text_encoder, unet, apply_text_encoder, apply_unet)

    def optimizer_groups(self, text_encoder_lr: float | None, unet_lr: float | None,
                         default_lr: float) -> tuple[list[dict], list[str]]:
        """Parameter groups and their log names; old plug-ins return only the groups."""
        if isinstance(text_encoder_lr, (list, tuple)) and not self.capabilities.per_encoder_lr:
            # kohya's prepare_optimizer_params takes one rate (lycoris.kohya makes it the groups' lr)
            rates = [r for r in text_encoder_lr if r is not None]
            if len(set(rates)) > 1:
                logger.warning("--text_encoder_lr %s: %s takes one text-encoder rate; using %s", list(text_encoder_lr),
                               self.name, rates[0])
            text_encoder_lr = rates[0] if rates else None
        result = self._methods["prepare_optimizer_params"](text_encoder_lr, unet_lr, default_lr)
        if isinstance(result, tuple):
            groups, names = result
        else:
            groups, names = result, [f"group{i}" for i in range(len(result))]
        kept = [(g, n) for g, n in zip(groups, names) if g.get("lr", default_lr) not in (0, None)]
        return [g for g, _ in kept], [n for _, n in kept]

    def prepare_grad_etc(self, text_encoder, unet) -> None:
        """Default: make the network's parameters trainable."""
        if "prepare_grad_etc" in self._methods:
            self._methods["prepare_grad_etc"](text_encoder, unet)
        else:
            self.net.requires_grad_(True)

    def on_epoch_start(self, text_encoder, unet) -> None:
        """Default: put the network in training mode."""
        if "on_epoch_start" in self._methods:
            self._methods["on_epoch_start"](text_encoder, unet)
        else:
            self.net.train()

    def on_step_start(self, text_encoder, unet) -> None:
        if "on_step_start" in self._methods:
            self._methods["on_step_start"](text_encoder, unet)

    def enable_gradient_checkpointing(self) -> None:
        if "enable_gradient_checkpointing" in self._methods:
            self._methods["enable_gradient_checkpointing"]()

    def max_norm_regularize(self, max_norm: float, device) -> tuple[int, float, float]:
        """--scale_weight_norms after an optimizer step: (modules scaled, mean and largest key norm)."""
        if not self.capabilities.can_max_norm:
            raise UserError(f"--scale_weight_norms: the network {self.name} has no apply_max_norm_regularization(); "
                            "train without --scale_weight_norms")
        scaled, mean, largest = self._methods["apply_max_norm_regularization"](max_norm, device)
        return int(scaled), float(mean), float(largest)

    def trainable_params(self):
        return list(self._methods["get_trainable_params"]())

    def save(self, path: str, dtype, metadata: dict | None) -> None:
        """The network's own ``save_weights``, into a temporary file renamed into place (so a
        plug-in that writes in place cannot leave a torn file; the folder is made if missing)."""
        with atomic_path(path) as tmp:
            self._methods["save_weights"](tmp, dtype, metadata)

    # --------------------------------------------------------------- both
    def set_multiplier(self, multiplier: float) -> None:
        """The network's strength (kohya's ``set_multiplier``); required only when it is not 1."""
        if not self.capabilities.can_set_multiplier:
            if multiplier == 1:
                return
            raise UserError(f"strength {multiplier}: the network {self.name} has no set_multiplier(); "
                            "leave its strength (network_multiplier, --network_mul, --am) at 1")
        self._methods["set_multiplier"](multiplier)

    def load_weights(self, path: str):
        if "load_weights" not in self._methods:
            raise UserError(f"--network_weights: the network {self.name} cannot load weights")
        return self._methods["load_weights"](path)

    def load_for_generation(self, path: str, weights_sd: dict | None):
        """The file's weights into the network: through its own ``load_weights`` when it has one
        (ours name a file of another shape or family), else kohya gen_img's
        ``load_state_dict(weights_sd, strict=False)`` with what ``create_network_from_weights`` read."""
        if "load_weights" in self._methods:
            return self._methods["load_weights"](path)
        if weights_sd is None or not isinstance(self.net, torch.nn.Module):
            raise UserError(f"--network_weights {path}: the network {self.name} has no load_weights() and its "
                            "create_network_from_weights returned no weights")
        info = self.net.load_state_dict(weights_sd, strict=False)
        return f"{len(weights_sd) - len(info.unexpected_keys)} tensors loaded"

    def to(self, device, dtype=None) -> NetworkAdapter:
        if isinstance(self.net, torch.nn.Module):
            self.net.to(device, dtype)
        return self

    # --------------------------------------------------------------- generation
    def merge_to(self, text_encoder, unet, weights_sd: dict | None, dtype, device) -> None:
        """Add the network into the base weights at the strength it was built with (kohya's
        ``merge_to`` signature, which lycoris.kohya has too; ``--network_merge``)."""
        if not self.capabilities.can_merge:
            raise UserError(f"--network_merge: the network {self.name} cannot be merged (no merge_to); "
                            "leave it hooked")
        self._methods["merge_to"](text_encoder, unet, weights_sd, dtype, device)

    def pre_calculation(self) -> None:
        self._methods["pre_calculation"]()

    def restore_weights(self) -> None:
        self._methods["restore_weights"]()

    def text_encoder_modules(self) -> list:
        """The per-module LoRAs of the text encoders (``capabilities.per_module`` networks)."""
        return list(self.net.text_encoder_loras) if self.capabilities.per_module else []

    def unet_modules(self) -> list:
        """The per-module LoRAs of the denoiser (``capabilities.per_module`` networks)."""
        return list(self.net.unet_loras) if self.capabilities.per_module else []


def takes_generation_args(module) -> bool:
    """Whether a network module's ``create_network_from_weights`` takes ``--network_args`` at
    generation time; modules that read their whole shape from the file say so with
    ``SHAPE_FROM_FILE = True`` (ours do)."""
    return not getattr(module, "SHAPE_FROM_FILE", False)


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
