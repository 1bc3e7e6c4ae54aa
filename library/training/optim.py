"""Optimizers and learning-rate schedulers by name (registries, not if-chains)."""

from __future__ import annotations

import ast
import importlib
from collections.abc import Callable

import torch

from library.utils.errors import UserError


def _adamw(groups, lr, **kw):
    return torch.optim.AdamW(groups, lr=lr, **kw)


def _sgd_nesterov(groups, lr, **kw):
    kw.setdefault("momentum", 0.9)
    return torch.optim.SGD(groups, lr=lr, nesterov=True, **kw)


def _from_package(package: str, attr: str, extra: str) -> Callable:
    def make(groups, lr, **kw):
        try:
            module = importlib.import_module(package)
        except ImportError as exc:
            raise UserError(f"--optimizer_type needs the package '{package}': pip install {extra}") from exc
        cls = module
        for part in attr.split("."):
            cls = getattr(cls, part)
        return cls(groups, lr=lr, **kw)
    return make


OPTIMIZERS: dict[str, Callable] = {
    "adamw": _adamw,
    "sgdnesterov": _sgd_nesterov,
    "adamw8bit": _from_package("bitsandbytes", "optim.AdamW8bit", "bitsandbytes"),
    "lion": _from_package("lion_pytorch", "Lion", "lion-pytorch"),
}


def check_optimizer_name(name: str) -> None:
    """Fail early for a name that is neither registered nor a dotted ``module.Class`` path."""
    if name.lower() not in OPTIMIZERS and "." not in name:
        raise UserError(f"--optimizer_type {name}: unknown; choose {', '.join(OPTIMIZERS)} or give module.Class")


def parse_optimizer_args(items) -> dict:
    """``key=value`` strings -> kwargs; values parsed as Python literals (``betas=0.9,0.99`` -> tuple)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--optimizer_args '{item}': expected key=value")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def build_optimizer(name: str, groups: list[dict], lr: float, args: dict):
    """Instantiate the optimizer; a dotted name imports ``module.Class``."""
    factory = OPTIMIZERS.get(name.lower())
    if factory is None:
        module_name, _, cls_name = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError) as exc:
            raise UserError(f"--optimizer_type {name}: cannot import it ({exc})") from exc
        return cls(groups, lr=lr, **args)
    try:
        return factory(groups, lr, **args)
    except TypeError as exc:
        raise UserError(f"--optimizer_args: {exc}") from exc


def warmup_steps(value: str, total_steps: int) -> int:
    """``--lr_warmup_steps``: an int count, or a float below 1 as a ratio of all steps."""
    try:
        number = float(value)
    except ValueError as exc:
        raise UserError(f"--lr_warmup_steps {value!r}: expected a step count or a ratio below 1") from exc
    return int(number * total_steps) if number < 1 else int(number)


def build_lr_scheduler(name: str, optimizer, warmup: int, total_steps: int, num_cycles: int, power: float):
    """A diffusers/transformers schedule by kohya's names."""
    from diffusers.optimization import get_scheduler

    if name == "constant" and warmup > 0:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         num_cycles=num_cycles, power=power)
