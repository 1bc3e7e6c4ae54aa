"""--torch_compile / --dynamo_backend, checked once for the trainers and gen_img.py."""

from __future__ import annotations

import argparse

from library.models.compiling import check_backend
from library.utils.errors import UserError


def compile_backend(args: argparse.Namespace) -> str | None:
    """The backend the denoiser's blocks are compiled with, or None without --torch_compile. A
    backend that is missing, or a combination that cannot trace, is refused here, before any model
    loads."""
    if not getattr(args, "torch_compile", False):
        return None
    backend = args.dynamo_backend.lower()  # accelerate's config spells them in capitals (INDUCTOR)
    check_backend(backend)
    if getattr(args, "blocks_to_swap", None):
        # swapped blocks change device every step: each move would invalidate their compiled code
        raise UserError("--torch_compile cannot be combined with --blocks_to_swap in this version (swapped blocks "
                        "move between devices every step, which recompiles them); use one of the two")
    return backend
