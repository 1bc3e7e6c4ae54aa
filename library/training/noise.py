"""Noise, timesteps and targets for DDPM-trained families (SD1/2, SDXL). Pure tensor functions."""

from __future__ import annotations

import torch


def sample_timesteps(batch_size: int, min_timestep: int, max_timestep: int, device) -> torch.Tensor:
    """Integer timesteps uniform in [min_timestep, max_timestep) (one per sample)."""
    return torch.randint(min_timestep, max_timestep, (batch_size,), device=device, dtype=torch.long)


def ddpm_noisy_and_target(alphas_cumprod: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                          timesteps: torch.Tensor, v_prediction: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward diffusion x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps and the target: eps, or for
    v-prediction v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (Salimans & Ho 2022, eq. 9)."""
    a = alphas_cumprod.to(device=latents.device, dtype=torch.float32)[timesteps]
    a = a.view(-1, *([1] * (latents.ndim - 1)))
    sqrt_a, sqrt_1ma = a.sqrt(), (1.0 - a).sqrt()
    noisy = (sqrt_a * latents.float() + sqrt_1ma * noise.float()).to(latents.dtype)
    if v_prediction:
        target = sqrt_a * noise.float() - sqrt_1ma * latents.float()
    else:
        target = noise.float()
    return noisy, target.to(latents.dtype)


def scaled_linear_alphas_cumprod(num_timesteps: int = 1000, beta_start: float = 0.00085,
                                 beta_end: float = 0.012) -> torch.Tensor:
    """The cumulative alpha product of SD's "scaled_linear" beta schedule."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()
