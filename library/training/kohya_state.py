"""Resuming from a state folder written by kohya-ss/sd-scripts (``--save_state`` there).

kohya's folder is accelerate's ``save_state`` layout with only the network kept: ``model.safetensors``
(or ``pytorch_model.bin``), ``optimizer.bin``, ``scheduler.bin``, ``random_states_0.pkl`` and, since
v0.9, ``train_state.json`` with ``current_epoch`` (1-based) and ``current_step``. From it we take
the network weights (they must fit this network exactly), the optimizer state where its parameter
layout matches ours (else the optimizer starts fresh, with a warning), and the step: the LR
schedule is advanced to it and the data continues at that step's place in our epoch order
(kohya stores no data position; its order was its own). The RNG pickle is not read: our noise and
augmentations are keyed by (seed, epoch, index), not by a global generator.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from library.utils.errors import UserError

logger = logging.getLogger(__name__)

NETWORK_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class KohyaState:
    folder: Path
    global_step: int
    epoch: int  # kohya's current_epoch: 1-based


def read_kohya_state(folder: Path) -> KohyaState | None:
    """The kohya state in ``folder``, or None when the folder is not in kohya's layout."""
    folder = Path(folder)
    state_file = folder / "train_state.json"
    if not state_file.is_file():
        return None
    try:
        data = json.loads(state_file.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if not isinstance(data, dict) or "current_step" not in data:
        return None
    if not any((folder / name).is_file() for name in NETWORK_FILES):
        raise UserError(f"--resume {folder}: a kohya state folder without its network weights "
                        f"({' or '.join(NETWORK_FILES)})")
    try:
        return KohyaState(folder, int(data["current_step"]), int(data.get("current_epoch", 1)))
    except (TypeError, ValueError) as exc:
        raise UserError(f"--resume {folder}: train_state.json has no usable current_step ({exc})") from exc


def _network_weights(folder: Path) -> dict[str, torch.Tensor]:
    path = next(folder / n for n in NETWORK_FILES if (folder / n).is_file())
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def load_network(state: KohyaState, network: torch.nn.Module) -> None:
    """The state's network weights into ``network``; refused unless every tensor fits."""
    weights, ours = _network_weights(state.folder), network.state_dict()
    missing = sorted(set(ours) - set(weights))
    extra = sorted(set(weights) - set(ours))
    shapes = sorted(k for k in set(ours) & set(weights) if ours[k].shape != weights[k].shape)
    if missing or extra or shapes:
        detail = "; ".join(part for part in (
            f"{len(missing)} of this network's tensors are not in it, e.g. {missing[:2]}" if missing else "",
            f"{len(extra)} of its tensors are not in this network, e.g. {extra[:2]}" if extra else "",
            f"{len(shapes)} differ in shape, e.g. {shapes[0]} {tuple(weights[shapes[0]].shape)} vs "
            f"{tuple(ours[shapes[0]].shape)}" if shapes else "") if part)
        raise UserError(f"--resume {state.folder}: the state's network does not match this one ({detail}); use the "
                        "--network_module, --network_dim, --network_alpha and --network_args it was trained with")
    network.load_state_dict(weights, strict=True)


def _layout_fits(saved: dict, optimizer) -> str | None:
    """Why a saved optimizer state cannot go into ``optimizer`` (None: it fits)."""
    groups = optimizer.param_groups
    saved_groups = saved.get("param_groups", [])
    if len(saved_groups) != len(groups):
        return f"{len(saved_groups)} parameter groups, this run has {len(groups)}"
    for i, (ours, theirs) in enumerate(zip(groups, saved_groups)):
        if len(ours["params"]) != len(theirs.get("params", [])):
            return f"group {i} has {len(theirs.get('params', []))} parameters, this run's {len(ours['params'])}"
    params = [p for g in groups for p in g["params"]]
    index_of = {i: p for i, p in zip([i for g in saved_groups for i in g["params"]], params)}
    for index, entry in saved.get("state", {}).items():
        param = index_of.get(index)
        for value in entry.values() if param is not None else ():
            if torch.is_tensor(value) and value.ndim > 0 and value.shape != param.shape:
                return f"a state tensor of shape {tuple(value.shape)} for a parameter of shape {tuple(param.shape)}"
    return None


def load_optimizer(state: KohyaState, optimizer) -> bool:
    """kohya's optimizer state, when its layout is this run's; returns whether it was used."""
    path = state.folder / "optimizer.bin"
    if not path.is_file():
        logger.warning("--resume %s: no optimizer.bin; the optimizer starts fresh", state.folder)
        return False
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled objects of an optimizer package we cannot load safely
        logger.warning("--resume %s: optimizer.bin cannot be read safely (%s); the optimizer starts fresh",
                       state.folder, exc)
        return False
    why = _layout_fits(saved, optimizer) if isinstance(saved, dict) else "not an optimizer state"
    if why:
        logger.warning("--resume %s: optimizer state not used (%s); the optimizer starts fresh", state.folder, why)
        return False
    optimizer.load_state_dict(saved)
    return True
