"""Which frozen models stay in memory once training starts.

After the latents are cached, nothing in a step runs the VAE; after the captions' text outputs are
cached (and no text encoder trains), nothing runs the text encoders. Kept resident they cost their
whole size for the whole run (an SD1.5 VAE and CLIP-L: 0.8 GiB in fp32; SDXL's two text encoders:
1.6 GiB in fp16). Here a part that nothing uses again is released: its tensors go to the meta
device (the module object stays, so hooks and ``train()``/``eval()`` calls on it still work, but
its memory is freed), and calling it raises a clear error instead of computing on empty tensors.
A part that only sample images use is parked in CPU memory between samples when training runs on
an accelerator, and stays where it is when training runs on the CPU (parking would save nothing).

kohya moves the VAE to the CPU after caching and SDXL's text encoders after caching their outputs;
it never frees them, so CPU memory still holds them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartUse:
    """What still needs one frozen part after set-up: a training step / saving, or sample images."""

    steps: bool
    samples: bool


def _refuse_call(name: str):
    def hook(module, args):
        raise RuntimeError(f"the {name} was released from memory after its outputs were cached, yet something "
                           "called it; this is a bug in the trainer (please report it with the command line)")
    return hook


def _release(module: torch.nn.Module, name: str) -> None:
    """Free ``module``'s tensors (moved to the meta device) and make any later call an error."""
    module.to("meta")
    for sub in [module, *module.children()]:
        sub.register_forward_pre_hook(_refuse_call(name))


def _device_of(module: torch.nn.Module) -> torch.device:
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()] if not t.is_meta)


@dataclass
class Residency:
    """The parts parked off the training device between sample images, and what was released."""

    device: torch.device
    #: each parked module with the device it was on (a family may keep a part on the CPU on purpose)
    parked: list[tuple[torch.nn.Module, torch.device]] = field(default_factory=list)
    released: list[str] = field(default_factory=list)

    @contextmanager
    def for_sampling(self) -> Iterator[None]:
        """The parked parts back where the family placed them while sample images are made."""
        for module, home in self.parked:
            module.to(home)
        try:
            yield
        finally:
            for module, _ in self.parked:
                module.to("cpu")
            if self.parked and self.device.type == "cuda":
                torch.cuda.empty_cache()


def settle_frozen_parts(parts: dict[str, tuple[list[torch.nn.Module], PartUse]], device: torch.device) -> Residency:
    """Release or park each named group of modules by what still uses it (see the module doc).
    ``parts``: name -> (modules, use). Returns what sampling needs to bring back."""
    residency = Residency(device)
    for name, (modules, use) in parts.items():
        if use.steps or not modules:
            continue
        size = sum(module_bytes(m) for m in modules) / 2**30
        if not use.samples:
            for module in modules:
                _release(module, name)
            residency.released.append(name)
            logger.info("%s released from memory (%.2f GiB): nothing later in the run needs %s", name, size,
                        "them" if len(modules) > 1 else "it")
        elif device.type != "cpu":
            for module in modules:
                residency.parked.append((module, _device_of(module)))
                module.to("cpu")
            logger.info("%s kept in CPU memory between sample images (%.2f GiB off %s)", name, size, device)
    if residency.parked and device.type == "cuda":
        torch.cuda.empty_cache()
    return residency
