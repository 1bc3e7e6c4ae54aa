"""Re-ranking a LoRA module by SVD: the update ``up @ down`` factored again at another rank.

For a module with update ``scale * up @ down`` (scale = alpha / rank), the product is decomposed
``U S V^T``; the first ``r`` singular triplets give ``up' = U_r S_r^1/2`` and ``down' = S_r^1/2 V_r^T``,
the best rank-``r`` approximation in Frobenius norm (Eckart-Young), and ``alpha' = scale * r`` keeps the
scale, so at rank ``r`` = the old rank the update is reproduced. How ``r`` is chosen:

* fixed: ``new_rank`` (``new_conv_rank`` for 3x3 convolutions);
* ``sv_ratio``: singular values at least ``s_max / param``;
* ``sv_fro``: the fewest that keep ``param`` of the Frobenius norm (sqrt of the sum of s^2);
* ``sv_cumulative``: the fewest whose sum is ``param`` of the sum of all;

the dynamic ones capped at ``new_rank``. Ranks are at least 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from library.utils.errors import UserError

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")


@dataclass(frozen=True)
class Resized:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    kept_fro: float  # share of the update's Frobenius norm the new rank keeps (1.0: all)


def choose_rank(s: torch.Tensor, max_rank: int, method: str | None, param: float | None) -> int:
    """How many singular values (descending ``s``) to keep."""
    n = len(s)
    if method is None:
        return max(1, min(max_rank, n))
    if method == "sv_ratio":
        keep = int((s >= s[0] / param).sum())
    elif method == "sv_fro":
        share = (s.square().cumsum(0) / s.square().sum()).sqrt()
        keep = int((share < param - 1e-7).sum()) + 1
    elif method == "sv_cumulative":
        share = s.cumsum(0) / s.sum()
        keep = int((share < param - 1e-7).sum()) + 1
    else:
        raise UserError(f"--dynamic_method {method}: choose {', '.join(DYNAMIC_METHODS)}")
    return max(1, min(keep, max_rank, n))


def factor(product: torch.Tensor, max_rank: int, method: str | None = None, param: float | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best factors ``up (out, r)``, ``down (r, in)`` of a 2-D update at the chosen rank, and the
    share of its Frobenius norm they keep (an all-zero update gives zero factors of rank 1..max)."""
    u, s, vh = torch.linalg.svd(product.float(), full_matrices=False)
    if not s[0] > 0:
        r = max(1, min(max_rank, len(s)))
        return product.new_zeros(product.shape[0], r), product.new_zeros(r, product.shape[1]), 1.0
    r = choose_rank(s, max_rank, method, param)
    root = s[:r].sqrt()
    kept = float((s[:r].square().sum() / s.square().sum()).sqrt())
    return u[:, :r] * root, root[:, None] * vh[:r], kept


def as_module_shapes(up2d: torch.Tensor, down2d: torch.Tensor, like_down: torch.Tensor, like_up: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D factors reshaped as kohya stores a module like ``like_down`` / ``like_up`` (conv kernels)."""
    r = down2d.shape[0]
    down = down2d.cpu().reshape(r, *like_down.shape[1:])
    up = up2d.cpu().reshape(like_up.shape[0], r, *like_up.shape[2:])
    return down.contiguous(), up.contiguous()


def resize_module(down: torch.Tensor, up: torch.Tensor, alpha: float, max_rank: int, method: str | None = None,
                  param: float | None = None, device: str = "cpu") -> Resized:
    """One module at its new rank (see the module docstring); shapes as kohya's (conv kernels kept)."""
    scale = alpha / down.shape[0]
    product = up.flatten(1).to(device, torch.float32) @ down.flatten(1).to(device, torch.float32)
    up2d, down2d, kept = factor(product, max_rank, method, param)
    new_down, new_up = as_module_shapes(up2d, down2d, down, up)
    return Resized(new_down, new_up, scale * new_down.shape[0], kept)
