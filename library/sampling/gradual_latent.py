"""Gradual Latent (kohya's hires fix that grows the latent during sampling), for euler_a.

Sampling starts on a latent shrunk to ``ratio`` of the full size (the initial noise, resized
bicubically), so the composition forms at the size the model knows. Once the timestep drops below
``start_timesteps``, every ``every_n_steps`` steps the ancestral Euler step enlarges its result by
``ratio_step`` of the full size (never beyond it; sides kept multiples of 8 latent pixels) and then
adds that step's fresh noise at the new size, scaled by ``s_noise``. Unlike kohya's, the last step
always reaches the full size, so too few steps cannot leave the image smaller than asked. An optional unsharp mask
(``ksize, sigma, strength[, target_x]``) sharpens what was enlarged: the step's result when
``target_x`` (the default), else the sample before the step (the step's direction is enlarged too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import EulerAncestralDiscreteScheduler
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from library.sampling.deep_shrink import resize
from library.utils.errors import UserError


@dataclass(frozen=True)
class Unsharp:
    """kohya's ``--gradual_latent_unsharp_params ksize,sigma,strength[,target_x]``."""

    ksize: int
    sigma: float
    strength: float
    target_x: bool = True

    @classmethod
    def parse(cls, text: str) -> Unsharp:
        """Read ``ksize,sigma,strength[,target_x]``; ValueError saying what is wrong."""
        parts = [p.strip() for p in text.split(",")]
        if len(parts) not in (3, 4):
            raise ValueError(f"'{text}': give ksize,sigma,strength[,target_x] such as 3,0.5,0.5,1")
        ksize, sigma, strength = int(float(parts[0])), float(parts[1]), float(parts[2])
        target_x = bool(int(parts[3])) if len(parts) == 4 else True
        if ksize < 1 or ksize % 2 == 0 or sigma <= 0:
            raise ValueError(f"'{text}': the kernel size must be odd and sigma above 0")
        return cls(ksize, sigma, strength, target_x)


@dataclass(frozen=True)
class GradualLatent:
    """kohya's ``--gradual_latent_*`` options (per line ``--glt --glr --gls --gle --glsn --glus``)."""

    start_timesteps: float
    ratio: float = 0.5
    ratio_step: float = 0.125
    every_n_steps: int = 3
    s_noise: float = 1.0
    unsharp: Unsharp | None = None

    def check(self) -> None:
        if not 0 < self.ratio <= 1 or not 0 < self.ratio_step <= 1 or self.every_n_steps < 1:
            raise UserError(f"Gradual Latent needs 0 < ratio <= 1, 0 < ratio step <= 1 and "
                            f"every n steps >= 1 (got {self.ratio}, {self.ratio_step}, {self.every_n_steps})")


def gaussian_kernel(ksize: int, sigma: float) -> torch.Tensor:
    """The normalised 1-D Gaussian of ``ksize`` taps centred on the middle one."""
    x = torch.arange(ksize, dtype=torch.float32) - (ksize - 1) / 2
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def unsharp_mask(x: torch.Tensor, u: Unsharp) -> torch.Tensor:
    """x + strength * (x - gaussian_blur(x)), the blur separable with reflected borders."""
    k = gaussian_kernel(u.ksize, u.sigma).to(x.device)
    c = x.shape[1]
    pad = u.ksize // 2
    blurred = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect")
    blurred = F.conv2d(blurred, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    blurred = F.conv2d(blurred, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return (x.float() + u.strength * (x.float() - blurred)).to(x.dtype)


def grow(x: torch.Tensor, size, unsharp: Unsharp | None, sharpen: bool = True) -> torch.Tensor:
    x = resize(x, size=size)
    return unsharp_mask(x, unsharp) if unsharp is not None and sharpen else x


def initial_latents(noise: torch.Tensor, gl: GradualLatent) -> torch.Tensor:
    """The unit noise a pipeline would start from, shrunk to the first size (and sharpened)."""
    h, w = noise.shape[-2:]
    return grow(noise, (max(1, int(h * gl.ratio)), max(1, int(w * gl.ratio))), gl.unsharp)


class GradualLatentEulerA(EulerAncestralDiscreteScheduler):
    """diffusers' ancestral Euler whose steps enlarge the latent on Gradual Latent's schedule.

    Set ``gradual_latent`` and ``full_size`` (the latent's (height, width)) before sampling; a step
    that does not grow is the parent's step unchanged."""

    gradual_latent: GradualLatent | None = None
    full_size: tuple[int, int] | None = None

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self._ratio = self.gradual_latent.ratio if self.gradual_latent else 1.0
        self._since_growth = 10**9  # the first eligible step grows at once

    def _next_size(self, t: float) -> tuple[int, int] | None:
        gl = self.gradual_latent
        if gl is None or self._ratio >= 1.0:
            return None
        last = self.step_index is not None and self.step_index == len(self.timesteps) - 1
        grow_now = t < gl.start_timesteps and self._since_growth >= gl.every_n_steps
        self._since_growth += 1
        if not (grow_now or last):
            return None
        # the last step always reaches the full size (kohya would decode a smaller image)
        self._ratio = 1.0 if last else min(1.0, self._ratio + gl.ratio_step)
        self._since_growth = 1
        h, w = self.full_size
        return max(8, int(h * self._ratio) // 8 * 8), max(8, int(w * self._ratio) // 8 * 8)

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
        if self.step_index is None:
            self._init_step_index(timestep)
        size = self._next_size(float(timestep))
        if size is None:
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        gl = self.gradual_latent
        x0 = self._predicted_original(model_output, sample.float())
        sigma_from, sigma_to = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        direction = (sample.float() - x0) / sigma_from
        if gl.unsharp is None or gl.unsharp.target_x:
            prev = grow(sample.float() + direction * (sigma_down - sigma_from), size, gl.unsharp)
        else:
            prev = grow(sample.float(), size, gl.unsharp) + grow(direction, size, None) * (sigma_down - sigma_from)
        noise = randn_tensor((*model_output.shape[:2], *size), generator=generator, device=model_output.device,
                             dtype=model_output.dtype)
        prev = (prev + noise * sigma_up * gl.s_noise).to(model_output.dtype)
        self._step_index += 1
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict \
            else (prev,)

    def _predicted_original(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        sigma = self.sigmas[self.step_index]
        if self.config.prediction_type == "epsilon":
            return sample - sigma * model_output
        if self.config.prediction_type == "v_prediction":
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        raise UserError(f"Gradual Latent: prediction type {self.config.prediction_type} is not supported")


def use_gradual_latent(pipe, gl: GradualLatent, height: int, width: int) -> None:
    """Give ``pipe`` a Gradual Latent euler_a scheduler for a ``height`` x ``width`` image."""
    scheduler = GradualLatentEulerA.from_config(pipe.scheduler.config)
    scheduler.gradual_latent = gl
    scheduler.full_size = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    pipe.scheduler = scheduler
