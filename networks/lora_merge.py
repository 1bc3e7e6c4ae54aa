"""LoRA files combined without a model: kohya-format state dicts (``<module>.lora_down.weight`` /
``.lora_up.weight`` / ``.alpha``) merged module by module.

Each file's update of a module is ``ratio * alpha / rank * up @ down``. Two ways to combine them:

* :func:`merge_concat` (``--concat``): the ranks are stacked, so the result's update is exactly
  the sum of the inputs' (its rank is the sum of theirs; alpha = rank, i.e. scale 1).
* :func:`merge_sum` (kohya's default): same-rank factors are added, each scaled by the square root
  of its share of the scale, which keeps the rank. It is exact for one file; for several the cross
  products ``up_i @ down_j`` are added as well, as in kohya (``--shuffle`` permutes each file's
  ranks first, so those cross terms do not line up rank by rank).
"""

from __future__ import annotations

import math
import os
import pickle

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.utils.errors import UserError
from library.utils.files import save_torch
from library.utils.safetensors_io import save_safetensors
from networks.block_lr import lbw_block

_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def lora_modules(state: dict[str, torch.Tensor], file: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{module: (down, up, alpha)}`` of a kohya-format LoRA; other keys are refused, naming one."""
    names = {k[: -len(s)] for k in state for s in _SUFFIXES if k.endswith(s)}
    stray = sorted(k for k in state if not k.endswith(_SUFFIXES))
    if stray:
        raise UserError(f"{file}: {stray[0]} is not a kohya LoRA key (is it a diffusers/PEFT or LyCORIS file? "
                        "merge it into a checkpoint, or convert it to kohya's format first)")
    out = {}
    for name in sorted(names):
        down, up = state.get(f"{name}.lora_down.weight"), state.get(f"{name}.lora_up.weight")
        if down is None or up is None:
            raise UserError(f"{file}: {name} has no {'lora_down' if down is None else 'lora_up'} weight")
        alpha = state.get(f"{name}.alpha")
        out[name] = (down.float(), up.float(), float(alpha) if alpha is not None else float(down.shape[0]))
    return out


def _put(out: dict, name: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> None:
    out[f"{name}.lora_down.weight"] = down.contiguous()
    out[f"{name}.lora_up.weight"] = up.contiguous()
    out[f"{name}.alpha"] = torch.tensor(alpha)


def merge_concat(loras: list[tuple[dict, float]]) -> dict[str, torch.Tensor]:
    """Stack the ranks: the merged update is exactly ``sum(ratio_i * update_i)``."""
    names = sorted({n for modules, _ in loras for n in modules})
    out: dict[str, torch.Tensor] = {}
    for name in names:
        downs, ups = [], []
        for modules, ratio in loras:
            if name in modules:
                down, up, alpha = modules[name]
                downs.append(down)
                ups.append(up * (ratio * alpha / down.shape[0]))
        down, up = torch.cat(downs, 0), torch.cat(ups, 1)
        _put(out, name, down, up, float(down.shape[0]))  # alpha = rank: the scale is in `up`
    return out


def merge_sum(loras: list[tuple[dict, float]], shuffle: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Add same-rank factors (kohya's merge): rank and the first file's alpha kept."""
    generator = torch.Generator().manual_seed(seed)
    names = sorted({n for modules, _ in loras for n in modules})
    out: dict[str, torch.Tensor] = {}
    for name in names:
        present = [(modules[name], ratio) for modules, ratio in loras if name in modules]
        ranks = {down.shape[0] for (down, _, _), _ in present}
        if len(ranks) > 1:
            raise UserError(f"{name}: the files have ranks {sorted(ranks)} there; merge with --concat (the ranks are "
                            "stacked) or resize them to one rank first")
        (first_down, _, target_alpha), _ = present[0]
        rank = first_down.shape[0]
        target_scale = target_alpha / rank
        down_sum = torch.zeros_like(first_down)
        up_sum = torch.zeros_like(present[0][0][1])
        for (down, up, alpha), ratio in present:
            share = ratio * (alpha / rank) / target_scale
            if shuffle:
                order = torch.randperm(rank, generator=generator)
                down, up = down[order], up[:, order]
            root = math.sqrt(abs(share))
            down_sum += root * down
            up_sum += math.copysign(root, share) * up
        _put(out, name, down_sum, up_sum, target_alpha)
    return out


def update_of(down: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha / rank * up @ down`` flattened to (out, in * kernel) (for checks and tests)."""
    return (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1))


def read_lora(path: str, flag: str = "--models") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA file's tensors and metadata (.safetensors, or a torch pickle without metadata)."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: file not found")
    try:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                metadata = dict(f.metadata() or {})
            return load_file(path), metadata
        return torch.load(path, map_location="cpu", weights_only=True), {}
    except UserError:
        raise
    except pickle.UnpicklingError as exc:  # weights_only refuses a pickle that would build Python objects
        raise UserError(f"{flag} {path}: this pickle holds more than tensors and could run code when loaded, so it "
                        "is not read; use a .safetensors version of it") from exc
    except Exception as exc:  # a truncated or foreign file: the readers' errors vary
        raise UserError(f"{flag} {path}: cannot be read as a LoRA file ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); is it complete?") from exc


def scale_by_blocks(state: dict[str, torch.Tensor], strengths: dict[str, float], sgm: bool) -> dict[str, torch.Tensor]:
    """A kohya-named LoRA with each module's update multiplied by its block's strength (--lbws;
    see :func:`networks.block_lr.parse_lbw`); modules outside the named blocks are kept."""
    out = dict(state)
    for key, value in state.items():
        if key.endswith(".lora_up.weight"):
            block = lbw_block(key[: -len(".lora_up.weight")], sgm)
            if block is not None and strengths.get(block, 1.0) != 1.0:
                out[key] = value * strengths[block]
    return out


def write_lora(state: dict[str, torch.Tensor], path, metadata: dict[str, str] | None) -> None:
    """A kohya-format LoRA file, atomically: safetensors with the metadata and kohya's hashes of
    this file's tensors (what AUTOMATIC1111 shows), or a torch pickle (no metadata) for other suffixes."""
    if str(path).endswith(".safetensors"):
        save_safetensors(state, path, metadata, model_hashes=True)
    else:
        save_torch(state, path)
