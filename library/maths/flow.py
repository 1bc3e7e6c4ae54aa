"""Rectified-flow (flow matching) training maths for SD3/SD3.5, as pure functions.

    x_t = (1 - sigma) * x0 + sigma * noise          the noisy input at noise level sigma in [0, 1]
    v   = noise - x0                                the velocity the MMDiT predicts

Timesteps are drawn as kohya does: u in [0, 1) from the weighting scheme's density, shifted by
``--training_shift`` k (u <- k u / (1 + (k - 1) u); k > 1 favours noisier steps), mapped to an
integer timestep t in [min_timestep, max_timestep), and sigma = t / 1000.

The loss follows kohya: the prediction is preconditioned to x0_hat = x_t - sigma * v_pred and
compared with x0. Since x_t - x0 = sigma * v, that is the loss between sigma * v_pred and
sigma * v for every loss type (for l2: sigma^2 * |v_pred - v|^2), times the scheme's loss
weighting (``sigma_sqrt``: sigma^-2, which gives back plain velocity MSE; ``cosmap``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEMES = ("uniform", "none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


@dataclass(frozen=True)
class FlowOptions:
    """Flow-matching options from the command line (kohya's names)."""

    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    training_shift: float = 1.0
    min_timestep: int = 0
    max_timestep: int = 1000
    loss_type: str = "l2"
    huber_c: float = 0.1

    def problems(self) -> list[str]:
        out = []
        if self.weighting_scheme not in SCHEMES:
            out.append(f"--weighting_scheme {self.weighting_scheme}: choose one of {', '.join(SCHEMES)}")
        if self.training_shift <= 0:
            out.append(f"--training_shift {self.training_shift}: must be positive")
        if not 0 <= self.min_timestep < self.max_timestep <= 1000:
            out.append(f"--min_timestep {self.min_timestep} / --max_timestep {self.max_timestep}: need "
                       "0 <= min < max <= 1000")
        if self.loss_type not in ("l2", "l1", "huber", "smooth_l1"):
            out.append(f"--loss_type {self.loss_type}: choose l2, l1, huber or smooth_l1")
        return out

    def metadata(self) -> dict[str, str]:
        return {"ss_weighting_scheme": self.weighting_scheme, "ss_logit_mean": str(self.logit_mean),
                "ss_logit_std": str(self.logit_std), "ss_mode_scale": str(self.mode_scale),
                "ss_training_shift": str(self.training_shift), "ss_min_timestep": str(self.min_timestep),
                "ss_max_timestep": str(self.max_timestep), "ss_loss_type": self.loss_type}


def density_sample(scheme: str, uniform: torch.Tensor, normal: torch.Tensor, logit_mean: float = 0.0,
                   logit_std: float = 1.0, mode_scale: float = 1.29) -> torch.Tensor:
    """u in [0, 1) from one uniform and one standard-normal draw per sample (SD3 paper, section 3.1):
    ``logit_normal`` sigmoid(mean + std * n); ``mode`` 1 - u - s (cos^2(pi u / 2) - 1 + u);
    every other scheme uniform (their weighting is applied to the loss instead)."""
    if scheme == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * normal)
    if scheme == "mode":
        return 1 - uniform - mode_scale * (torch.cos(math.pi * uniform / 2) ** 2 - 1 + uniform)
    return uniform


def shift_u(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The timestep shift k u / (1 + (k - 1) u) (identity for k = 1)."""
    return u * shift / (1 + (shift - 1) * u)


def timesteps_from_u(u: torch.Tensor, min_timestep: int, max_timestep: int) -> torch.Tensor:
    """Integer timesteps int(u (max - min) + min), as kohya quantises them."""
    return (u * (max_timestep - min_timestep) + min_timestep).long()


def sigmas_from_timesteps(timesteps: torch.Tensor) -> torch.Tensor:
    return timesteps.float() / 1000.0


def noisy_and_velocity(latents: torch.Tensor, noise: torch.Tensor,
                       sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, v): the interpolated input and the velocity target for per-sample ``sigmas`` (B,)."""
    s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1 - s) * latents + s * noise, noise - latents


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights: sigma^-2 (``sigma_sqrt``), 2 / (pi (1 - 2 sigma + 2 sigma^2))
    (``cosmap``), else 1. At timestep 0 (sigma 0) the preconditioned loss is exactly 0; sigma is
    floored at 1/1000 there so sigma^-2 gives 0 instead of 0 * inf = NaN."""
    if scheme == "sigma_sqrt":
        return sigmas.float().clamp(min=1e-3) ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2))
    return torch.ones_like(sigmas, dtype=torch.float32)
