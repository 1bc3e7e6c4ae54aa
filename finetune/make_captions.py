"""Caption images with BLIP, or any transformers image-to-text model (kohya's finetune/make_captions.py).

    python finetune/make_captions.py images --batch_size 8 --beam_search --num_beams 3

Writes one caption file per image beside it (``a.png`` -> ``a.caption``, ``--caption_extension``). Images
that already have one are kept, so an interrupted run continues where it stopped (``--overwrite`` to
caption them again). ``--caption_weights`` is a BLIP captioning model in the transformers layout (default
Salesforce/blip-image-captioning-large): a hub id, found in the local cache when offline, or a local
folder. ``--model`` takes any other image-to-text model (BLIP-2, GIT, ...). kohya's BLIP ``.pth`` weights
are not read. Unreadable images are skipped and named at the end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.utils.errors import UserError, run_cli  # noqa: E402

DEFAULT_BLIP = "Salesforce/blip-image-captioning-large"


def add_output_args(p: argparse.ArgumentParser, max_length: int) -> None:
    """The flags both captioning scripts share."""
    p.add_argument("train_data_dir", help="folder of images to caption")
    p.add_argument("--caption_extension", default=".caption", help="caption file extension (default .caption)")
    p.add_argument("--batch_size", type=int, default=1, help="images per model call")
    p.add_argument("--max_data_loader_n_workers", type=int, default=None, help="processes decoding images")
    p.add_argument("--max_length", type=int, default=max_length,
                   help=f"most tokens in a caption (default {max_length})")
    p.add_argument("--recursive", action="store_true", help="also caption images in subfolders")
    p.add_argument("--overwrite", action="store_true", help="caption images that already have a caption file")
    p.add_argument("--prefix", default="", help="text put before every caption")
    p.add_argument("--suffix", default="", help="text put after every caption")
    p.add_argument("--device", default=None, help="torch device (default cuda when available, else cpu)")
    p.add_argument("--debug", action="store_true", help="print every caption")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output_args(p, max_length=75)
    p.add_argument("--caption_weights", default=None, help=f"BLIP captioning model (default {DEFAULT_BLIP})")
    p.add_argument("--model", default=None, help="any other transformers image-to-text model (hub id or folder)")
    p.add_argument("--prompt", default=None, help="text the model continues (e.g. 'a picture of'); removed from "
                   "the caption")
    p.add_argument("--beam_search", action="store_true", help="beam search instead of nucleus sampling")
    p.add_argument("--num_beams", type=int, default=1, help="beams with --beam_search (default 1)")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling's top_p (default 0.9)")
    p.add_argument("--min_length", type=int, default=5, help="fewest tokens in a caption (default 5)")
    p.add_argument("--seed", type=int, default=42, help="seed of the sampling (default 42)")
    return p


def check_output_args(args: argparse.Namespace) -> None:
    for flag in ("batch_size", "max_length"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: at least 1")
    if args.max_data_loader_n_workers is not None and args.max_data_loader_n_workers < 0:
        raise UserError(f"--max_data_loader_n_workers {args.max_data_loader_n_workers}: 0 or more")


def caption_output(args: argparse.Namespace, clean=None):
    from library.prep.captioning import CaptionOutput

    return CaptionOutput(args.caption_extension, args.overwrite, args.prefix, args.suffix, args.batch_size,
                         args.max_data_loader_n_workers, args.debug, clean)


def device_of(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from library.utils.log import setup_logging
    setup_logging()
    check_output_args(args)
    if args.caption_weights and args.model:
        raise UserError("--caption_weights (a BLIP model) and --model (any captioner): give one of them")
    if not 0.0 < args.top_p <= 1.0:
        raise UserError(f"--top_p {args.top_p}: between 0 (exclusive) and 1")
    if args.num_beams < 1 or args.min_length < 0:
        raise UserError("--num_beams must be at least 1 and --min_length 0 or more")
    from library.prep.captioner import check_model_name
    from library.prep.files import find_images

    flag, model = ("--model", args.model) if args.model else ("--caption_weights", args.caption_weights or DEFAULT_BLIP)
    check_model_name(model, flag)
    images = find_images(args.train_data_dir, args.recursive)
    import torch

    from library.prep.captioner import Captioner, Decoding
    from library.prep.captioning import run_captioner

    torch.manual_seed(args.seed)
    captioner = Captioner(model, flag, device_of(args), None if args.model else "blip", args.prompt)
    decoding = Decoding(sample=not args.beam_search, num_beams=args.num_beams if args.beam_search else 1,
                        top_p=args.top_p, max_length=args.max_length, min_length=args.min_length)
    print(run_captioner(captioner, decoding, images, caption_output(args)).report("captions"))


if __name__ == "__main__":
    run_cli(main)
