"""Noise, timesteps, targets and SNR loss weights for DDPM-trained families (SD1/2, SDXL).

Pure tensor functions; randomness comes from a :class:`~library.maths.rng.SampleRNG`, so each
sample's draws depend only on where it sits in training.
Definitions follow kohya-ss/sd-scripts (see docs/train_network.md for the flags).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from library.maths.rng import SampleRNG

#: the DDPM schedule SD1/SD2/SDXL were trained on (diffusers' scheduler config keys)
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "steps_offset": 1}


def scaled_linear_alphas_cumprod(num_timesteps: int = 1000, beta_start: float = 0.00085,
                                 beta_end: float = 0.012, zero_terminal_snr: bool = False) -> torch.Tensor:
    """The cumulative alpha product of SD's "scaled_linear" beta schedule, optionally rescaled to
    zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    algorithm 1: shift and scale sqrt(alpha_bar) so the last step is pure noise and the first unchanged)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if zero_terminal_snr:
        s = alphas_cumprod.sqrt()
        s0, s_last = s[0].clone(), s[-1].clone()
        s = (s - s_last) * s0 / (s0 - s_last)
        alphas_cumprod = s ** 2
    return alphas_cumprod.float()


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep (inf where alpha_bar = 1... never
    for SD; 0 at the last step of a zero-terminal-SNR schedule)."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


def sample_timesteps(rng: SampleRNG, min_timestep: int, max_timestep: int) -> torch.Tensor:
    """Integer timesteps uniform in [min_timestep, max_timestep) (one per sample); equal bounds give
    that constant timestep."""
    if min_timestep == max_timestep:
        return torch.full((len(rng),), min_timestep, device=rng.device, dtype=torch.long)
    return rng.randint(min_timestep, max_timestep)


def offset_noise(noise: torch.Tensor, latents: torch.Tensor, offset: float, random_strength: bool,
                 adaptive_scale: float | None, rng: SampleRNG) -> torch.Tensor:
    """Noise offset (Guttenberg 2023): add a per-sample, per-channel constant ``offset * N(0, 1)``.

    ``random_strength`` draws the offset uniformly from [0, offset] once per batch; ``adaptive_scale``
    raises it by ``adaptive_scale * |mean over H, W of the latents|`` (clamped at 0)."""
    if random_strength:
        offset = rng.batch_uniform() * offset
    strength: torch.Tensor | float = offset
    if adaptive_scale is not None:
        mean = latents.float().mean(dim=(2, 3), keepdim=True).abs()
        strength = (offset + adaptive_scale * mean).clamp(min=0.0)
    per_channel = rng.randn(noise.shape[1], 1, 1)
    return (noise.float() + strength * per_channel).to(noise.dtype)


def multires_noise(noise: torch.Tensor, iterations: int, discount: float, rng: SampleRNG) -> torch.Tensor:
    """Pyramid ("multi-resolution") noise: add N(0, 1) drawn at sizes H/r^i x W/r^i (r ~ U(2, 4) per
    level, shared by the batch), upsampled bilinearly and weighted by discount^i, down to 1 pixel;
    renormalise to unit std."""
    _, c, h, w = noise.shape
    out = noise.float().clone()
    for i in range(1, iterations + 1):
        r = rng.batch_uniform() * 2 + 2
        hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        coarse = rng.randn(c, hn, wn)
        out += F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * discount ** i
        if hn == 1 or wn == 1:
            break
    return (out / out.std()).to(noise.dtype)


def perturbed_input_noise(noise: torch.Tensor, gamma: float, random_strength: bool, rng: SampleRNG) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023): eps + gamma * N(0, 1), used for x_t only."""
    if random_strength:
        gamma = rng.batch_uniform() * gamma
    return noise + gamma * rng.randn(*noise.shape[1:]).to(noise.dtype)


def ddpm_noisy_and_target(alphas_cumprod: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                          timesteps: torch.Tensor, v_prediction: bool,
                          input_noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward diffusion x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps and the target: eps, or for
    v-prediction v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (Salimans & Ho 2022, eq. 9).

    ``input_noise`` (input perturbation, Ning et al. 2023) replaces eps in x_t only; the target keeps eps."""
    a = alphas_cumprod.to(device=latents.device, dtype=torch.float32)[timesteps]
    a = a.view(-1, *([1] * (latents.ndim - 1)))
    sqrt_a, sqrt_1ma = a.sqrt(), (1.0 - a).sqrt()
    x_noise = (input_noise if input_noise is not None else noise).float()
    noisy = (sqrt_a * latents.float() + sqrt_1ma * x_noise).to(latents.dtype)
    if v_prediction:
        target = sqrt_a * noise.float() - sqrt_1ma * latents.float()
    else:
        target = noise.float()
    return noisy, target.to(latents.dtype)


@dataclass(frozen=True)
class SNRWeighting:
    """kohya's SNR-based loss post-processing (each off when None/False)."""

    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation: bool = False


def snr_loss_scale(snr_t: torch.Tensor, w: SNRWeighting, v_prediction: bool) -> torch.Tensor | None:
    """The per-sample factor the loss is multiplied by, applied in kohya's order: min-SNR
    (Hang et al. 2023: min(SNR, g)/SNR, or min(SNR, g)/(SNR + 1) for v-prediction), v-pred-like
    scaling (SNR/(SNR + 1)), v-pred-like loss (1 + w (SNR + 1)/SNR), debiased estimation
    (1/sqrt(SNR), or 1/(SNR + 1) for v-prediction). SNR is clamped at 1000 where kohya clamps it.
    Returns None when nothing is enabled."""
    scale = torch.ones_like(snr_t)
    used = False
    if w.min_snr_gamma:
        gamma = torch.minimum(snr_t, torch.full_like(snr_t, w.min_snr_gamma))
        scale = scale * (gamma / (snr_t + 1) if v_prediction else gamma / snr_t)
        used = True
    clamped = snr_t.clamp(max=1000)
    if w.scale_v_pred_loss_like_noise_pred:
        scale = scale * clamped / (clamped + 1)
        used = True
    if w.v_pred_like_loss:
        scale = scale * (1 + w.v_pred_like_loss * (clamped + 1) / clamped)
        used = True
    if w.debiased_estimation:
        scale = scale * (1 / (clamped + 1) if v_prediction else 1 / clamped.sqrt())
        used = True
    return scale if used else None


def huber_c(schedule: str, c0: float, scale: float, timesteps: torch.Tensor,
            alphas_cumprod: torch.Tensor, num_timesteps: int = 1000) -> torch.Tensor:
    """Per-sample Huber parameter: ``snr``: (1 - c0)/(1 + sigma)^2 + c0 with sigma = sqrt((1 - a)/a);
    ``exponential``: exp(-t ln(1/c0)/T) * scale; ``constant``: c0 * scale."""
    t = timesteps.float()
    if schedule == "snr":
        a = alphas_cumprod.to(timesteps.device)[timesteps].float()
        sigma = ((1.0 - a) / a).sqrt()
        return (1 - c0) / (1 + sigma) ** 2 + c0
    if schedule == "exponential":
        return torch.exp(-t * math.log(1.0 / c0) / num_timesteps) * scale
    if schedule == "constant":
        return torch.full_like(t, c0 * scale)
    raise ValueError(f"unknown huber_schedule {schedule!r}")


@dataclass(frozen=True)
class DDPMOptions:
    """The noise and loss options of DDPM-trained families (kohya's flags of the same names)."""

    v_parameterization: bool = False
    min_timestep: int = 0
    max_timestep: int = 1000
    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    zero_terminal_snr: bool = False
    snr_weighting: SNRWeighting = SNRWeighting()
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0

    def metadata(self) -> dict[str, str]:
        """kohya's ``ss_*`` keys for these options."""
        w = self.snr_weighting
        meta = {
            "ss_noise_offset": str(self.noise_offset), "ss_noise_offset_random_strength": str(
                self.noise_offset_random_strength), "ss_adaptive_noise_scale": str(self.adaptive_noise_scale),
            "ss_multires_noise_iterations": str(self.multires_noise_iterations),
            "ss_multires_noise_discount": str(self.multires_noise_discount),
            "ss_ip_noise_gamma": str(self.ip_noise_gamma),
            "ss_ip_noise_gamma_random_strength": str(self.ip_noise_gamma_random_strength),
            "ss_zero_terminal_snr": str(self.zero_terminal_snr), "ss_min_snr_gamma": str(w.min_snr_gamma),
            "ss_scale_v_pred_loss_like_noise_pred": str(w.scale_v_pred_loss_like_noise_pred),
            "ss_v_pred_like_loss": str(w.v_pred_like_loss), "ss_debiased_estimation": str(w.debiased_estimation),
            "ss_loss_type": self.loss_type, "ss_huber_schedule": self.huber_schedule,
            "ss_huber_c": str(self.huber_c), "ss_huber_scale": str(self.huber_scale),
            "ss_min_timestep": str(self.min_timestep), "ss_max_timestep": str(self.max_timestep),
        }
        if (self.min_timestep, self.max_timestep) != (0, 1000):
            meta["modelspec.timestep_range"] = f"{self.min_timestep},{self.max_timestep}"
        return meta

    def problems(self) -> list[str]:
        """Contradictory settings, as messages naming the flags (empty when all is well)."""
        out = []
        if self.adaptive_noise_scale is not None and not self.noise_offset:
            out.append("--adaptive_noise_scale needs --noise_offset")
        if self.snr_weighting.scale_v_pred_loss_like_noise_pred and not self.v_parameterization:
            out.append("--scale_v_pred_loss_like_noise_pred needs --v_parameterization")
        if self.snr_weighting.v_pred_like_loss and self.v_parameterization:
            out.append("--v_pred_like_loss cannot be used with --v_parameterization")
        if not 0 <= self.min_timestep <= self.max_timestep <= 1000:
            out.append("--min_timestep/--max_timestep must satisfy 0 <= min <= max <= 1000")
        if self.zero_terminal_snr and self.snr_weighting.min_snr_gamma and not self.v_parameterization:
            out.append("--zero_terminal_snr makes the last step's SNR 0, which --min_snr_gamma divides by "
                       "without --v_parameterization; add --v_parameterization")
        return out
