"""Fold caption files into a fine-tuning metadata file (kohya's finetune/merge_captions_to_metadata.py).

    python finetune/merge_captions_to_metadata.py images meta_cap.json [--in_json meta.json]

Each image's ``<stem>.caption`` (``--caption_extension``) goes under ``caption`` in the entry of that
image; the entries of ``--in_json`` (or of ``out_json`` itself when it exists) are kept and updated.
Keys are the image path relative to the folder with its extension (``a.png``, ``sub/b.png``), or the
absolute path with ``--full_path``: both forms fine_tune.py and ``metadata_file`` subsets read. The file
is written atomically; images without a caption file keep their entry as it was.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.utils.errors import run_cli  # noqa: E402


def build_parser(field: str, extension: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train_data_dir", help="folder of images")
    p.add_argument("out_json", help="metadata file to write (.json or .jsonl)")
    p.add_argument("--in_json", default=None, help="metadata file to start from (default: out_json if it exists)")
    p.add_argument("--caption_extension", default=extension,
                   help=f"file extension of the {field} files (default {extension})")
    p.add_argument("--full_path", action="store_true", help="keys are absolute paths")
    p.add_argument("--recursive", action="store_true", help="also read images in subfolders")
    p.add_argument("--debug", action="store_true", help="print every entry")
    return p


def merge_main(argv: list[str] | None, field: str, extension: str, doc: str) -> None:
    args = build_parser(field, extension, doc).parse_args(argv)
    from library.prep.files import find_images
    from library.prep.merging import merge_sidecars
    from library.prep.metadata_files import check_metadata_path, read_or_empty, write_metadata
    from library.utils.log import setup_logging

    setup_logging()
    check_metadata_path(args.out_json, "out_json")
    source = args.in_json or (args.out_json if Path(args.out_json).exists() else None)
    entries = read_or_empty(source, "--in_json" if args.in_json else "out_json")
    root = Path(args.train_data_dir)
    summary = merge_sidecars(find_images(root, args.recursive), root, entries, field, args.caption_extension,
                             args.full_path)
    if args.debug:
        for key, entry in entries.items():
            print(f"{key}: {entry}")
    write_metadata(args.out_json, entries)
    print(summary.report(f"{field} merged into {args.out_json}", kept_reason=f"no {args.caption_extension} file"))


def main(argv: list[str] | None = None) -> None:
    merge_main(argv, "caption", ".caption", __doc__)


if __name__ == "__main__":
    run_cli(main)
