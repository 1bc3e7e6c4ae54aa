"""kohya sampler names -> diffusers schedulers, shared by gen_img.py and training-time samples."""

from __future__ import annotations

import inspect

from library.maths.noise import SD_SCHEDULE
from library.utils.errors import UserError

# name -> (diffusers class name, extra constructor arguments)
_SAMPLERS = {
    "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}
_ALIASES = {"k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_a"}

SAMPLER_NAMES = tuple(_SAMPLERS) + tuple(_ALIASES)


def canonical_sampler(name: str) -> str:
    """Normalise a sampler name (case-insensitive, ``k_`` aliases); UserError for unknown names."""
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in _SAMPLERS:
        raise UserError(f"unknown sampler '{name}'; choose one of: {', '.join(SAMPLER_NAMES)}")
    return key


def build_scheduler(name: str, prediction_type: str = "epsilon", zero_terminal_snr: bool = False):
    """A fresh diffusers scheduler for ``name`` with the SD training schedule (rescaled to zero
    terminal SNR, with trailing timestep spacing, when the model was trained that way)."""
    import diffusers  # lazy: the parsers import this module for the names, so --help stays fast

    cls_name, extra = _SAMPLERS[canonical_sampler(name)]
    cls = getattr(diffusers, cls_name)
    accepted = inspect.signature(cls.__init__).parameters
    common = dict(SD_SCHEDULE)
    if zero_terminal_snr:
        common.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    common = {k: v for k, v in common.items() if k in accepted}  # not every scheduler has every option
    return cls(**common, prediction_type=prediction_type, **extra)
