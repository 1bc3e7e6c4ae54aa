"""Optimizers and learning-rate schedulers by kohya's names: registries, not if-chains.

An optimizer entry names where the class lives and which pip extra provides it; anything else is
taken as a dotted ``module.Class`` path. Schedule-free optimizers need ``train()``/``eval()``
switching (see :func:`is_schedule_free`) and use a constant schedule.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import logging
from dataclasses import dataclass

import torch

from library.optim.adafactor_step import adafactor_step_in_place
from library.utils.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizerEntry:
    """Where an optimizer class lives, the pip package that provides it, and fixed defaults."""

    path: str
    package: str | None = None
    defaults: tuple[tuple[str, object], ...] = ()


_BNB = "bitsandbytes"
OPTIMIZERS: dict[str, OptimizerEntry] = {
    "adamw": OptimizerEntry("torch.optim.AdamW"),
    "sgdnesterov": OptimizerEntry("torch.optim.SGD", None, (("nesterov", True), ("momentum", 0.9))),
    "adamw8bit": OptimizerEntry("bitsandbytes.optim.AdamW8bit", _BNB),
    "pagedadamw8bit": OptimizerEntry("bitsandbytes.optim.PagedAdamW8bit", _BNB),
    "pagedadamw": OptimizerEntry("bitsandbytes.optim.PagedAdamW", _BNB),
    "pagedadamw32bit": OptimizerEntry("bitsandbytes.optim.PagedAdamW32bit", _BNB),
    "lion8bit": OptimizerEntry("bitsandbytes.optim.Lion8bit", _BNB),
    "pagedlion8bit": OptimizerEntry("bitsandbytes.optim.PagedLion8bit", _BNB),
    "sgdnesterov8bit": OptimizerEntry("bitsandbytes.optim.SGD8bit", _BNB, (("nesterov", True), ("momentum", 0.9))),
    "lion": OptimizerEntry("lion_pytorch.Lion", "lion-pytorch"),
    "dadaptation": OptimizerEntry("dadaptation.experimental.DAdaptAdamPreprint", "dadaptation"),
    "dadaptadampreprint": OptimizerEntry("dadaptation.experimental.DAdaptAdamPreprint", "dadaptation"),
    "dadaptadagrad": OptimizerEntry("dadaptation.DAdaptAdaGrad", "dadaptation"),
    "dadaptadam": OptimizerEntry("dadaptation.DAdaptAdam", "dadaptation"),
    "dadaptadan": OptimizerEntry("dadaptation.DAdaptAdan", "dadaptation"),
    "dadaptadanip": OptimizerEntry("dadaptation.experimental.DAdaptAdanIP", "dadaptation"),
    "dadaptlion": OptimizerEntry("dadaptation.DAdaptLion", "dadaptation"),
    "dadaptsgd": OptimizerEntry("dadaptation.DAdaptSGD", "dadaptation"),
    "prodigy": OptimizerEntry("prodigyopt.Prodigy", "prodigyopt"),
    "adafactor": OptimizerEntry("transformers.optimization.Adafactor", "transformers"),
    "radamschedulefree": OptimizerEntry("schedulefree.RAdamScheduleFree", "schedulefree"),
    "adamwschedulefree": OptimizerEntry("schedulefree.AdamWScheduleFree", "schedulefree"),
    "sgdschedulefree": OptimizerEntry("schedulefree.SGDScheduleFree", "schedulefree"),
}

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "piecewise_constant", "adafactor")


def check_optimizer_name(name: str) -> None:
    """Fail early for a name that is neither registered nor a dotted ``module.Class`` path."""
    if name.lower() not in OPTIMIZERS and "." not in name:
        raise UserError(f"--optimizer_type {name}: unknown; choose one of {', '.join(sorted(OPTIMIZERS))} "
                        "(any case) or give module.Class")


def parse_kv_args(items, flag: str) -> dict:
    """``key=value`` strings -> kwargs; values parsed as Python literals (``betas=0.9,0.99`` -> tuple)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"{flag} '{item}': expected key=value")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def parse_optimizer_args(items) -> dict:
    """``--optimizer_args`` -> kwargs."""
    return parse_kv_args(items, "--optimizer_args")


def _import_path(path: str, package: str | None, flag: str):
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        hint = f"; pip install {package} (or the project's [optimizers] extra)" if package else ""
        raise UserError(f"{flag}: cannot import {path} ({exc}){hint}") from exc
    except AttributeError as exc:
        raise UserError(f"{flag}: {module_name} has no {attr}") from exc


def is_schedule_free(optimizer) -> bool:
    """Schedule-free optimizers must be put in eval mode for sampling/saving and train mode for steps."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return type(inner).__module__.startswith("schedulefree")


@contextlib.contextmanager
def optimizer_eval_mode(optimizer):
    """Within the block a schedule-free optimizer holds its evaluation weights (for sampling and saving)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not is_schedule_free(optimizer):
        yield
        return
    inner.eval()
    try:
        yield
    finally:
        inner.train()


def prepare_optimizer_for_training(optimizer) -> None:
    """Schedule-free optimizers start in training mode."""
    if is_schedule_free(optimizer):
        getattr(optimizer, "optimizer", optimizer).train()


def build_optimizer(name: str, groups: list[dict], lr: float | None, args: dict):
    """Instantiate the optimizer for ``name`` with the parameter groups and ``--optimizer_args``."""
    entry = OPTIMIZERS.get(name.lower())
    if entry is None:
        cls, kwargs = _import_path(name, None, "--optimizer_type"), dict(args)
    else:
        cls = _import_path(entry.path, entry.package, "--optimizer_type")
        kwargs = {**dict(entry.defaults), **args}
    if name.lower().startswith(("dadapt", "prodigy")) and lr is not None and lr <= 0.1:
        logger.warning("%s adapts the step size itself; a learning rate around 1.0 is usual (got %s)", name, lr)
    if name.lower() == "adafactor" and kwargs.setdefault("relative_step", True):
        # relative-step Adafactor computes its own step size; the lr only seeds its schedule
        kwargs.setdefault("scale_parameter", True)
        kwargs.setdefault("warmup_init", False)
        lr = None
        groups = [{k: v for k, v in g.items() if k != "lr"} for g in groups]
    if lr is not None or "lr" in inspect.signature(cls).parameters:
        kwargs["lr"] = lr
    try:
        return cls(groups, **kwargs)
    except TypeError as exc:
        raise UserError(f"--optimizer_args for {name}: {exc}") from exc


def warmup_steps(value: str, total_steps: int) -> int:
    """``--lr_warmup_steps``: an int count, a float below 1 as a ratio of all steps, or ``"10%"``."""
    text = str(value).strip()
    try:
        if text.endswith("%"):
            return int(float(text[:-1]) / 100 * total_steps)
        number = float(text)
    except ValueError as exc:
        raise UserError(f"--lr_warmup_steps {value!r}: expected a step count, a ratio below 1, or N%") from exc
    return int(number * total_steps) if number < 1 else int(number)


@dataclass(frozen=True)
class SchedulerSpec:
    """What ``--lr_scheduler*`` asked for."""

    name: str
    warmup: int
    total_steps: int
    num_cycles: int = 1
    power: float = 1.0
    min_lr_ratio: float | None = None
    decay_steps: int = 0
    custom_type: str | None = None
    args: tuple[str, ...] = ()


def build_lr_scheduler(spec: SchedulerSpec, optimizer, initial_lr: float | None = None):
    """The LR schedule for ``spec`` (kohya's names), or any ``--lr_scheduler_type module.Class``."""
    kwargs = parse_kv_args(spec.args, "--lr_scheduler_args")
    if spec.custom_type:
        path = spec.custom_type if "." in spec.custom_type else f"torch.optim.lr_scheduler.{spec.custom_type}"
        return _import_path(path, None, "--lr_scheduler_type")(optimizer, **kwargs)
    if is_schedule_free(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    name = spec.name
    if name == "adafactor" or is_adafactor_relative(optimizer):
        # lazy here and below: the parsers import this module for the names, so --help stays fast
        from transformers.optimization import AdafactorSchedule
        return AdafactorSchedule(optimizer, initial_lr=initial_lr or 0.0)
    if name == "constant" and spec.warmup > 0:
        name = "constant_with_warmup"
    if name in ("inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay"):
        from transformers.optimization import get_scheduler as tf_get_scheduler
        if name == "cosine_with_min_lr":
            kwargs.setdefault("min_lr_rate", spec.min_lr_ratio or 0.0)
        if name == "warmup_stable_decay":
            kwargs.setdefault("num_decay_steps", spec.decay_steps)
            kwargs.setdefault("min_lr_ratio", spec.min_lr_ratio or 0.0)
        return tf_get_scheduler(name, optimizer, num_warmup_steps=spec.warmup, num_training_steps=spec.total_steps,
                                scheduler_specific_kwargs=kwargs)
    from diffusers.optimization import get_scheduler

    extra = {"step_rules": kwargs["step_rules"]} if name == "piecewise_constant" and "step_rules" in kwargs else {}
    return get_scheduler(name, optimizer, num_warmup_steps=spec.warmup, num_training_steps=spec.total_steps,
                         num_cycles=spec.num_cycles, power=spec.power, **extra)


def is_adafactor_relative(optimizer) -> bool:
    inner = getattr(optimizer, "optimizer", optimizer)
    return type(inner).__name__ == "Adafactor" and bool(inner.defaults.get("relative_step"))


FUSED_OPTIMIZERS = ("adafactor", "transformers.optimization.adafactor")


def check_fused_backward(optimizer_type: str, gradient_accumulation_steps: int) -> None:
    """``--fused_backward_pass`` steps each tensor during the backward pass: Adafactor only (its
    state is per tensor), and no accumulation (the gradient is gone once it is applied)."""
    if optimizer_type.lower() not in FUSED_OPTIMIZERS:
        raise UserError(f"--fused_backward_pass works with --optimizer_type Adafactor only (got {optimizer_type})")
    if gradient_accumulation_steps != 1:
        raise UserError("--fused_backward_pass cannot accumulate gradients: use --gradient_accumulation_steps 1")


#: optimizers whose step looks at every parameter at once (a global estimate of the step size),
#: which stepping a part of the model at a time would change
_GLOBAL_STEP_OPTIMIZERS = ("dadapt", "prodigy")


def check_fused_optimizer_groups(groups: int, optimizer_type: str, gradient_accumulation_steps: int,
                                 fused_backward: bool) -> None:
    """kohya's ``--fused_optimizer_groups N``: N parts of the model, each stepped as soon as its
    gradients are complete."""
    if groups < 1:
        raise UserError(f"--fused_optimizer_groups {groups}: must be 1 or more")
    if fused_backward:
        raise UserError("--fused_optimizer_groups and --fused_backward_pass both step the optimizer inside "
                        "backward; use one of them")
    if gradient_accumulation_steps != 1:
        raise UserError("--fused_optimizer_groups cannot accumulate gradients: use --gradient_accumulation_steps 1")
    if optimizer_type.lower().startswith(_GLOBAL_STEP_OPTIMIZERS):
        raise UserError(f"--fused_optimizer_groups: {optimizer_type} estimates its step size from all parameters "
                        "at once, which stepping one part at a time would change; use AdamW, Adafactor, Lion, ...")


class FusedBackwardPass:
    """Apply the optimizer to each parameter as soon as its gradient is complete, then free that
    gradient, so the gradients of the whole network are never held at once (kohya's
    ``--fused_backward_pass``). Clipping is per tensor (``max_norm``), as in kohya: the global norm
    is not known until every gradient exists. transformers' Adafactor steps the tensor directly
    with :func:`adafactor_step_in_place` (its update in the gradient's memory: no temporaries of
    the tensor's size on top of the live activations). Otherwise ``optimizer.step()`` runs: only
    parameters with a gradient are touched by a step, and every other gradient is None at that
    moment, so it updates exactly the tensor whose hook fired."""

    def __init__(self, optimizer, params: list[torch.Tensor], max_norm: float):
        self.optimizer, self.max_norm = optimizer, max_norm
        self.non_finite: list[int] = []
        self.handles = [p.register_post_accumulate_grad_hook(self._apply) for p in params]
        self.index = {id(p): i for i, p in enumerate(params)}
        #: (the Adafactor, {id(parameter): its group}) for the in-place step, or None
        self.lean_adafactor = _lean_adafactor_groups(optimizer)

    def _apply(self, param: torch.Tensor) -> None:
        # the tensor's norm is finite when its gradient is (the plain step checks the total norm,
        # which overflows with it), and needs no mask of the gradient's size, as isfinite().all() would
        norm = torch.nn.utils.clip_grad_norm_([param], self.max_norm) if self.max_norm > 0 else param.grad.norm()
        if not torch.isfinite(norm):
            self.non_finite.append(self.index[id(param)])
            param.grad = None
            return
        self._state_beside(param)
        if self.lean_adafactor:  # transformers' Adafactor update, in the gradient's memory
            adafactor, group_of = self.lean_adafactor
            grad, param.grad = param.grad, None
            adafactor_step_in_place(adafactor, group_of[id(param)], param, grad)
            return
        self.optimizer.step()
        param.grad = None

    def _state_beside(self, param: torch.Tensor) -> None:
        """The parameter's optimizer state where it is stepped now: a resumed state is loaded where
        the parameter was at load time, which for a swapped block (host memory) is not where its
        fused step runs (the device, while the block is resident)."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        state = inner.state.get(param)
        for key, value in (state or {}).items():
            if isinstance(value, torch.Tensor) and value.device != param.device:
                state[key] = value.to(param.device)

    def finish(self) -> None:
        """After backward: nothing left (every gradient was applied as it came)."""

    def take_non_finite(self) -> list[int]:
        """Indices of the tensors whose gradient was not finite since the last call (not applied)."""
        found, self.non_finite = self.non_finite, []
        return found

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _lean_adafactor_groups(optimizer):
    """(the Adafactor, {id(parameter): its group}) when the fused pass may step tensors with
    :func:`adafactor_step_in_place`: a transformers Adafactor without a gradient scaler (fp16's
    scaler unscales and checks gradients inside the wrapped optimizer's ``step``, so that case
    keeps calling it)."""
    from transformers.optimization import Adafactor

    inner = getattr(optimizer, "optimizer", optimizer)
    if type(inner) is not Adafactor or getattr(optimizer, "scaler", None) is not None:
        return None
    return inner, {id(p): group for group in inner.param_groups for p in group["params"]}


class FusedOptimizerGroups(FusedBackwardPass):
    """kohya's ``--fused_optimizer_groups N`` with any per-parameter optimizer (AdamW, ...): the
    trained tensors in N consecutive parts, and a part is stepped, and its gradients freed, as soon
    as the last of its gradients is complete, so about one part's gradients exist at a time instead
    of the whole model's. One optimizer and one LR schedule, not kohya's N of each: a part's step
    hides the other parts' gradients for its duration, so the optimizer touches that part only.
    Clipping is per tensor, as in kohya. A part holding tensors that got no gradient this step
    (a layer whose output is not used) is stepped by :meth:`finish` after backward."""

    def __init__(self, optimizer, params: list[torch.Tensor], groups: int, max_norm: float):
        self.optimizer, self.max_norm, self.params = optimizer, max_norm, params
        self.non_finite: list[int] = []
        size = -(-len(params) // groups)
        self.parts = [params[i:i + size] for i in range(0, len(params), size)]
        self.part_of = {id(p): k for k, part in enumerate(self.parts) for p in part}
        self.index = {id(p): i for i, p in enumerate(params)}
        self.pending = [len(part) for part in self.parts]
        self.handles = [p.register_post_accumulate_grad_hook(self._ready) for p in params]

    def _ready(self, param: torch.Tensor) -> None:
        k = self.part_of[id(param)]
        self.pending[k] -= 1
        if self.pending[k] == 0:
            self._step_part(k)

    def _step_part(self, k: int) -> None:
        part = [p for p in self.parts[k] if p.grad is not None]
        for p in part:
            if not torch.isfinite(p.grad).all():
                self.non_finite.append(self.index[id(p)])
                p.grad = None
            elif self.max_norm > 0:
                torch.nn.utils.clip_grad_norm_([p], self.max_norm)
        hidden = [(p, p.grad) for p in self.params if p.grad is not None and self.part_of[id(p)] != k]
        for p, _ in hidden:
            p.grad = None
        self.optimizer.step()
        for p in self.parts[k]:
            p.grad = None
        for p, grad in hidden:
            p.grad = grad
        self.pending[k] = len(self.parts[k])

    def finish(self) -> None:
        for k, part in enumerate(self.parts):
            if self.pending[k] != len(part):
                self._step_part(k)
