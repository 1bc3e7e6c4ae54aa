"""Adafactor's update of one tensor without full-size temporaries, for the fused backward pass.

transformers' ``Adafactor.step`` builds up to two more tensors of a parameter's size while it
updates it (``grad**2 + eps``, the approximated second moment, ``-update``), so a tensor's step
briefly holds three times its size. After a whole backward that costs little; inside backward
(``--fused_backward_pass``) it lands on the activations that are still alive, and the biggest
SD UNet tensors (118 MB in float32) are stepped first, when the most activations are alive. The
fused pass owns each gradient (it is freed right after the step), so here the update is computed
in the gradient's own memory, a block of rows at a time (16 MB at most): ``grad**2`` for its row
and column means, and the factored second-moment estimate that multiplies the gradient in place
(for a conv weight, whose factors are two thirds of its size, the state update and the factors
too).

The state is transformers' own (same keys, same initial values, same learning rate through its
``_get_lr``), so a state saved by a fused run resumes an unfused one and the other way round, and
the arithmetic is transformers' own, element for element, except that a matrix (2-D) of more
than one block (over 4M elements) has its column means summed block by block: equal to float
rounding.
"""

from __future__ import annotations

import math

import torch

_HALF = (torch.float16, torch.bfloat16)


def _initial_state(state: dict, grad: torch.Tensor, factored: bool, first_moment: bool) -> None:
    """transformers' Adafactor state for a new tensor, or the loaded one moved to the gradient."""
    if not state:
        state["step"], state["RMS"] = 0, 0
        if first_moment:
            state["exp_avg"] = torch.zeros_like(grad)
        if factored:
            state["exp_avg_sq_row"] = torch.zeros(grad.shape[:-1]).to(grad)
            state["exp_avg_sq_col"] = torch.zeros(grad.shape[:-2] + grad.shape[-1:]).to(grad)
        else:
            state["exp_avg_sq"] = torch.zeros_like(grad)
        return
    for key in ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
        if key in state:
            state[key] = state[key].to(grad)


#: elements of ``grad**2`` (and of the second-moment estimate) formed at a time: 16 MB in float32
CHUNK_ELEMENTS = 1 << 22


def _block_rows(grad: torch.Tensor) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, grad[0].numel()))


def _squared_means(grad: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix's ``(grad**2 + eps).mean(-1)`` and ``.mean(-2)``, squaring a block of rows at a
    time. A matrix of one block gets transformers' own operations; a bigger one's column means
    (its columns run through every block) are summed block by block."""
    rows = _block_rows(grad)
    if rows >= grad.shape[0]:
        squared = grad.square().add_(eps)
        return squared.mean(dim=-1), squared.mean(dim=-2)
    row_means, col_sums = [], []
    for block in grad.split(rows):
        squared = block.square().add_(eps)
        row_means.append(squared.mean(dim=-1))
        col_sums.append(squared.sum(dim=0))
    return torch.cat(row_means), torch.stack(col_sums).sum(dim=0).div_(grad.shape[0])


def _factors(row: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``_approx_sq_grad`` before its product: the row and column factors whose
    product is ``1 / sqrt(v)``, ``v`` the factored second moment (the outer product of the row and
    column states over the mean of the rows)."""
    return (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1), col.unsqueeze(-2).rsqrt()


def _scale_blockwise(grad: torch.Tensor, row: torch.Tensor, col: torch.Tensor, beta2t: float, eps: float) -> None:
    """A tensor of more than two dimensions (a conv weight): it is factored over its last two
    dimensions, which lie within each block of first-dimension rows, so the state update and the
    factor are formed a block at a time. Whole, they would not be small: for a 3x3 kernel each
    factor is two thirds of the weight's size, and the means, the factors and their product held
    1.3 times the gradient's size inside backward before (bench/bench_full_train_step.py,
    ``--live_memory``). Every operation is transformers' own on a slice, so the result is too."""
    rows = _block_rows(grad)
    for block, row_block, col_block in zip(grad.split(rows), row.split(rows), col.split(rows)):
        squared = block.square().add_(eps)
        row_block.mul_(beta2t).add_(squared.mean(dim=-1), alpha=1.0 - beta2t)
        col_block.mul_(beta2t).add_(squared.mean(dim=-2), alpha=1.0 - beta2t)
        del squared
        row_factor, col_factor = _factors(row_block, col_block)
        block.mul_(row_factor * col_factor)


def _scaled_by_second_moment(state: dict, grad: torch.Tensor, beta2t: float, eps: float, factored: bool):
    """``grad / sqrt(v)`` with ``v`` the running second moment (factored for matrices and conv
    weights), computed in ``grad``'s memory."""
    if not factored:  # biases and norms: small tensors, so transformers' own sequence of operations
        exp_avg_sq = state["exp_avg_sq"]
        exp_avg_sq.mul_(beta2t).add_(grad.square().add_(eps), alpha=1.0 - beta2t)
        return grad.mul_(exp_avg_sq.rsqrt())
    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
    if grad.dim() > 2:
        _scale_blockwise(grad, row, col, beta2t, eps)
        return grad
    # a matrix: its row factor is over all rows, so the states are updated whole (they are small: a
    # row and a column), then the product multiplies the gradient a block of rows at a time
    row_mean, col_mean = _squared_means(grad, eps)
    row.mul_(beta2t).add_(row_mean, alpha=1.0 - beta2t)
    col.mul_(beta2t).add_(col_mean, alpha=1.0 - beta2t)
    row_factor, col_factor = _factors(row, col)
    rows = _block_rows(grad)
    for block, row_block in zip(grad.split(rows), row_factor.split(rows)):
        block.mul_(row_block * col_factor)  # transformers' (row factor x column factor) x grad, a block at a time
    return grad


@torch.no_grad()
def adafactor_step_in_place(optimizer, group: dict, param: torch.Tensor, grad: torch.Tensor) -> None:
    """One Adafactor step of ``param`` (a parameter of ``optimizer``, a transformers Adafactor, in
    its ``group``) with ``grad``, which is overwritten: the caller frees it afterwards."""
    if grad.dtype in _HALF:
        grad = grad.float()
    state = optimizer.state[param]
    factored, first_moment = grad.dim() >= 2, group["beta1"] is not None
    _initial_state(state, grad, factored, first_moment)
    weights = param.float() if param.dtype in _HALF else param
    state["step"] += 1
    rules = type(optimizer)  # transformers' own helpers: the RMS, and the rate (relative step, parameter scale)
    state["RMS"] = rules._rms(weights)
    lr = rules._get_lr(group, state)
    beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
    update = _scaled_by_second_moment(state, grad, beta2t, group["eps"][0], factored)
    update.div_((rules._rms(update) / group["clip_threshold"]).clamp_(min=1.0))
    update.mul_(lr)
    if first_moment:
        state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
        update = state["exp_avg"]
    if group["weight_decay"] != 0:
        weights.add_(weights, alpha=-group["weight_decay"] * lr)
    weights.sub_(update)
    if weights is not param:
        param.copy_(weights)
