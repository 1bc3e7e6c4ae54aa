"""Model families by name. A new family is a module plus one entry in :data:`BUILDERS`."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from library.families.base import LoadedModels, ModelFamily, NoisyBatch


def _sd(args: argparse.Namespace) -> ModelFamily:
    from library.config.training_config import build_ddpm_options
    from library.families.sd import SDFamily, SDOptions

    return SDFamily(SDOptions(ddpm=build_ddpm_options(args), v2=args.v2, clip_skip=args.clip_skip,
                              max_token_length=args.max_token_length or 75, weighted_captions=args.weighted_captions,
                              vae=args.vae))


def _sdxl(args: argparse.Namespace) -> ModelFamily:
    from library.config.training_config import build_ddpm_options
    from library.families.sdxl import SDXLFamily, SDXLOptions
    from library.utils.errors import UserError

    if args.v2:
        raise UserError("--v2 is for SD2.x models; SDXL is trained without it")
    return SDXLFamily(SDXLOptions(ddpm=build_ddpm_options(args), max_token_length=args.max_token_length or 75,
                                  vae=args.vae, weighted_captions=args.weighted_captions, clip_skip=args.clip_skip))


#: family name -> builder from the parsed flags of the shared training parser
BUILDERS: dict[str, Callable[[argparse.Namespace], ModelFamily]] = {"sd": _sd, "sdxl": _sdxl}


def family_from_args(name: str, args: argparse.Namespace) -> ModelFamily:
    """The family ``name`` configured from the training flags."""
    return BUILDERS[name](args)


__all__ = ["BUILDERS", "LoadedModels", "ModelFamily", "NoisyBatch", "family_from_args"]
