"""Training state for exact resume: saved as a folder, published atomically, validated on load.

A state folder holds the network weights, the optimizer and scheduler states, every RNG state and
``train_state.json`` (global step, epoch, batches done in that epoch, loss windows, and what the
run was made with). It is written under a temporary name and renamed into place only when
complete, so a crash while saving leaves the previous state intact; a folder without
``train_state.json`` is never used.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from library.utils.errors import UserError
from library.utils.safetensors_io import read_tensors, save_safetensors

STATE_FILE = "train_state.json"
#: the trained weights: a network's, or the model's own (full training)
WEIGHT_FILES = ("network.safetensors", "model.safetensors", "embeddings.safetensors")
EXTRA_FILE = "extra.safetensors"
_FILES = ("optimizer.pt", "scheduler.pt", "rng.pt", STATE_FILE)


@dataclass
class TrainState:
    """Where a run is, and what it was made with (checked when resuming)."""

    global_step: int
    epoch: int
    batches_done: int  # batches of ``epoch`` already trained
    seed: int
    num_batches_per_epoch: int
    network: dict
    recent_losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    log_dir: str | None = None


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()),
                                                   *np_state[2:]),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(folder: Path, network: torch.nn.Module, optimizer, scheduler, state: TrainState,
               weights: str = "network.safetensors", extra: dict[str, torch.Tensor] | None = None,
               whole: tuple[dict, dict] | None = None) -> None:
    """Write a complete state folder atomically (temporary folder, then rename); ``network`` is
    what is trained (its weights go to ``weights``, one of :data:`WEIGHT_FILES`); ``extra``: more
    tensors the run needs to continue (the moving averages of ``--ema``), in ``extra.safetensors``.
    ``whole``: the network's and the optimizer's state gathered from a sharded run (the optimizer's
    keyed by parameter name), written instead of this process's own."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    network_state, optimizer_state = whole or (network.state_dict(), optimizer.state_dict())
    save_safetensors(network_state, tmp / weights)  # tensor by tensor: no second copy of a full model
    written = [weights]
    if extra:
        save_safetensors(extra, tmp / EXTRA_FILE)
        written.append(EXTRA_FILE)
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")  # written last
    for name in (*written, *_FILES):
        with open(tmp / name, "rb") as fh:
            os.fsync(fh.fileno())
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)


def read_train_state(folder: Path) -> TrainState:
    """Read and check a state folder's ``train_state.json``; refuse incomplete folders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--resume {folder}: not a folder")
    missing = [name for name in _FILES if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.insert(0, " or ".join(WEIGHT_FILES))
    if missing:
        raise UserError(f"--resume {folder}: incomplete state folder (missing {', '.join(missing)}); "
                        "it was probably interrupted while saving. Resume from an earlier state.")
    try:
        return TrainState(**json.loads((folder / STATE_FILE).read_text(encoding="utf-8")))
    except (ValueError, TypeError) as exc:
        raise UserError(f"--resume {folder}: {STATE_FILE} is unreadable ({exc})") from exc


def load_state(folder: Path, network: torch.nn.Module, optimizer, scheduler,
               weights: str = "network.safetensors", sharding=None) -> None:
    """Restore the trained weights, optimizer, scheduler and every RNG from a state folder.
    With ``sharding`` (library/training/sharding.py) each process keeps its shard of them."""
    folder = Path(folder)
    check_weights_kind(folder, weights)
    network_state = _read(folder, weights, read_tensors)
    optimizer_state = _read(folder, "optimizer.pt", _torch_file)
    saved_sharded = is_sharded_optimizer_state(optimizer_state)
    if saved_sharded != (sharding is not None):
        raise UserError(f"--resume {folder}: saved by a{' sharded' if saved_sharded else 'n unsharded'} run "
                        f"({'with' if saved_sharded else 'without'} --deepspeed); resume it "
                        f"{'with' if saved_sharded else 'without'} --deepspeed, or start a new run from its model file")
    if sharding is not None:
        sharding.load(network, optimizer, network_state, optimizer_state)
    else:
        network.load_state_dict(network_state, strict=True)
        optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(_read(folder, "scheduler.pt", _torch_file))
    _set_rng_state(_read(folder, "rng.pt", _torch_file))


def is_sharded_optimizer_state(state: dict) -> bool:
    """Whether an optimizer state names its parameters (a sharded run's, gathered whole) rather
    than numbering them (``optimizer.state_dict()``)."""
    groups = (state.get("param_groups") if isinstance(state, dict) else None) or [{}]
    params = groups[0].get("params") or [0]
    return isinstance(params[0], str)


def read_extra_state(folder: Path) -> dict[str, torch.Tensor] | None:
    """The state folder's extra tensors (see :func:`save_state`), or None when it has none."""
    path = Path(folder) / EXTRA_FILE
    return _read(Path(folder), EXTRA_FILE, read_tensors) if path.is_file() else None


def check_weights_kind(folder: Path, weights: str) -> None:
    """Refuse a state of the other kind of run (a network's state for a full run, or back)."""
    if not (Path(folder) / weights).is_file():
        other = next((w for w in WEIGHT_FILES if (Path(folder) / w).is_file()), None)
        kind = {"network.safetensors": "a network", "model.safetensors": "the model's own weights",
                "embeddings.safetensors": "textual inversion vectors"}
        raise UserError(f"--resume {folder}: this state trained {kind.get(other, 'something else')}, this run "
                        f"trains {kind[weights]}; resume it with the script that made it")


def _torch_file(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _read(folder: Path, name: str, reader):
    """One file of a state folder; a damaged one is named (a truncated copy, a disk error)."""
    try:
        return reader(folder / name)
    except Exception as exc:  # safetensors' and torch's errors for a damaged file vary
        raise UserError(f"--resume {folder}: {name} is damaged ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); resume from an earlier state "
                        "folder") from exc


def find_latest_state(output_dir: Path, output_name: str) -> Path:
    """The complete state folder of ``output_name`` in ``output_dir`` with the highest global step."""
    best: tuple[int, Path] | None = None
    for folder in Path(output_dir).glob(f"{output_name}*-state"):
        try:
            state = read_train_state(folder)
        except UserError:
            continue
        if best is None or state.global_step > best[0]:
            best = (state.global_step, folder)
    if best is None:
        raise UserError(f"--resume latest: no complete state folder '{output_name}*-state' in {output_dir}")
    return best[1]


def check_compatible(state: TrainState, network: dict, num_batches: int, folder: Path) -> None:
    """Refuse a state made with another network or another dataset size."""
    if state.network != network:
        diffs = {k: (state.network.get(k), network.get(k)) for k in set(state.network) | set(network)
                 if state.network.get(k) != network.get(k)}
        detail = ", ".join(f"{k}: state {a!r} vs now {b!r}" for k, (a, b) in sorted(diffs.items()))
        raise UserError(f"--resume {folder}: the state was made with another network ({detail}); "
                        "use the same --network_module/--network_dim/--network_alpha/--network_args")
    if state.num_batches_per_epoch != num_batches:
        raise UserError(f"--resume {folder}: the dataset now has {num_batches} batches per epoch, the state "
                        f"{state.num_batches_per_epoch}; exact resume needs the same data and batch settings")
