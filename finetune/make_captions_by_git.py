"""Caption images with GIT through transformers (kohya's finetune/make_captions_by_git.py).

    python finetune/make_captions_by_git.py images --model_id microsoft/git-large-textcaps --remove_words

Writes one caption file per image beside it (``a.png`` -> ``a.caption``); images that already have one
are kept (``--overwrite`` to caption them again). ``--model_id`` is a hub id (found in the local cache
when offline) or a local folder in the hub layout. ``--remove_words`` drops the phrases in which the
text-reading GIT models spell out writing ("with the words ...", "that says ..."). Greedy decoding, as
kohya's. Unreadable images are skipped and named at the end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.make_captions import add_output_args, caption_output, check_output_args, device_of  # noqa: E402
from library.utils.errors import run_cli  # noqa: E402

DEFAULT_GIT = "microsoft/git-large-textcaps"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output_args(p, max_length=50)
    p.add_argument("--model_id", default=DEFAULT_GIT, help=f"GIT model (default {DEFAULT_GIT})")
    p.add_argument("--remove_words", action="store_true", help="drop phrases that spell out writing in the image")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from library.utils.log import setup_logging
    setup_logging()
    check_output_args(args)
    from library.prep.captioner import check_model_name
    from library.prep.files import find_images

    check_model_name(args.model_id, "--model_id")
    images = find_images(args.train_data_dir, args.recursive)
    from library.prep.captioner import Captioner, Decoding, remove_writing
    from library.prep.captioning import run_captioner

    captioner = Captioner(args.model_id, "--model_id", device_of(args), "git")
    decoding = Decoding(sample=False, max_length=args.max_length, min_length=0)
    out = caption_output(args, remove_writing if args.remove_words else None)
    print(run_captioner(captioner, decoding, images, out).report("captions"))


if __name__ == "__main__":
    run_cli(main)
