"""Model families by name: the one place a family object is built, for training and generation alike.

A new family is a module (its options dataclass and its :class:`ModelFamily`) plus one entry in
:data:`FAMILIES`. The options come from the training flags or gen_img's flags
(:mod:`library.config.family_options`); families never read the command line themselves.
"""

from __future__ import annotations

from library.families.base import LoadedModels, ModelFamily, NoisyBatch
from library.families.sd import SDFamily, SDOptions
from library.families.sd3 import SD3Family, SD3Options
from library.families.sdxl import SDXLFamily, SDXLOptions

#: family name -> (family class, its options class)
FAMILIES: dict[str, tuple[type[ModelFamily], type]] = {
    "sd": (SDFamily, SDOptions), "sdxl": (SDXLFamily, SDXLOptions), "sd3": (SD3Family, SD3Options)}

# single-file layouts and diffusers pipeline classes -> family name
LAYOUT_FAMILY = {"sd1": "sd", "sd2": "sd", "sdxl": "sdxl", "sd3": "sd3"}
PIPELINE_FAMILY = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
                   "StableDiffusion3Pipeline": "sd3"}


def build_family(name: str, options) -> ModelFamily:
    """The family ``name`` with its ``options`` (an instance of that family's options class)."""
    family_cls, options_cls = FAMILIES[name]
    if not isinstance(options, options_cls):
        raise TypeError(f"family {name} takes {options_cls.__name__}, not {type(options).__name__}")
    return family_cls(options)


__all__ = ["FAMILIES", "LAYOUT_FAMILY", "LoadedModels", "ModelFamily", "NoisyBatch", "PIPELINE_FAMILY",
           "build_family"]
