"""An exponential moving average (EMA) of the trained weights, for full-weight runs (``--ema``).

kohya's trainers have none; OneTrainer and diffusers do. After every ``update_every``-th optimizer
step each average moves toward its weight: ``ema = d * ema + (1 - d) * weight``, with
``d = min(decay, (1 + n) / (10 + n))`` for the n-th update (diffusers' warm-up, so a short run's
average is not stuck at the starting weights). The averages are float32, on the weights' device or
in CPU memory (``--ema_cpu``), and are swapped into the model for sample images and for saving.

With sharded weights (``--deepspeed``: DTensor parameters) each process averages its own shard;
only state files hold whole tensors, gathered from every process (so :meth:`WeightEMA.state_dict`
and :meth:`WeightEMA.load_state_dict` are collective there).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def ema_decay(decay: float, updates: int) -> float:
    """The decay of update number ``updates`` (counted from 0), warmed up as diffusers' EMAModel does."""
    return min(decay, (1 + updates) / (10 + updates))


class WeightEMA:
    """Moving averages of ``params`` (named, for state files)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float, update_every: int, on_cpu: bool):
        self.params, self.decay, self.update_every = params, decay, update_every
        self.averages = {name: _local(p).detach().to("cpu" if on_cpu else p.device, torch.float32, copy=True)
                         for name, p in params.items()}
        self.updates = 0

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """After optimizer step ``step`` (counted from 1): update every ``update_every`` steps."""
        if step % self.update_every:
            return
        d = ema_decay(self.decay, self.updates)
        for name, p in self.params.items():
            average = self.averages[name]
            average.mul_(d).add_(_local(p).detach().to(average.device, torch.float32), alpha=1 - d)
        self.updates += 1

    @contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The averages copied into the weights for the block (a copy of the weights is kept
        meanwhile), the weights copied back afterwards. Copies, not a swap of tensors: block swap
        moves weights between devices while the block runs, so the tensor a parameter holds
        afterwards may not be the one it held before."""
        kept = {}
        for name, p in self.params.items():
            kept[name] = _local(p).detach().clone()
            _local(p).copy_(self.averages[name])
        try:
            yield
        finally:
            for name, p in self.params.items():
                _local(p).copy_(kept[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        whole = {f"ema.{k}": _whole(v, self.params[k]) for k, v in self.averages.items()}
        return {**whole, "ema_updates": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [k for k in self.averages if f"ema.{k}" not in state]
        if missing or "ema_updates" not in state:
            raise KeyError(f"the state has no moving averages for {missing[:3] or ['ema_updates']}")
        for name, average in self.averages.items():
            average.copy_(_shard(state[f"ema.{name}"], self.params[name]))
        self.updates = int(state["ema_updates"])


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter: its shard when sharded (a DTensor), else itself. The
    shard is a view, so writing into it writes into the parameter."""
    return t.to_local() if hasattr(t, "to_local") else t


def _whole(average: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The whole average of a sharded parameter, gathered from every process (collective)."""
    if not hasattr(param, "to_local"):
        return average
    from torch.distributed.tensor import DTensor

    mesh = param.device_mesh  # the gather runs where the process group does (not in host memory)
    sharded = DTensor.from_local(average.to(mesh.device_type), mesh, param.placements, shape=param.shape,
                                 stride=param.stride())
    return sharded.full_tensor().cpu()


def _shard(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This process's part of a whole average read from a state file (every process has read it)."""
    if not hasattr(param, "to_local"):
        return whole
    from torch.distributed.tensor import distribute_tensor

    mesh = param.device_mesh
    return distribute_tensor(whole.to(mesh.device_type), mesh, param.placements, src_data_rank=None).to_local()
