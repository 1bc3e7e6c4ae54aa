"""Clean the captions and tags of a fine-tuning metadata file (kohya's finetune/clean_captions_and_tags.py).

    python finetune/clean_captions_and_tags.py meta_cap_dd.json meta_clean.json
    python finetune/clean_captions_and_tags.py images meta_cap_dd.json meta_clean.json   # kohya's form

Tags: underscores to spaces (kaomoji kept), DeepDanbooru rating tags dropped, contradicting attribute
tags dropped when several people are shown, ``shirt`` dropped beside ``white shirt``. Captions: BLIP's
"anime woman"/"cartoon lady"/... phrasings normalised (whole words). The rules are data in
library/prep/cleaning.py. The input file is never changed; out_json is written atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.utils.errors import UserError, run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", metavar="[train_data_dir] in_json out_json",
                   help="the metadata file to read and the one to write (kohya's leading image folder is accepted)")
    p.add_argument("--caption_separator", default=", ", help="between tags (default ', ')")
    p.add_argument("--debug", action="store_true", help="print every entry that changed")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if len(args.files) not in (2, 3):
        raise UserError(f"expected in_json out_json (optionally after the image folder), got {len(args.files)} paths")
    in_json, out_json = args.files[-2:]
    from library.prep.merging import clean_entries
    from library.prep.metadata_files import check_metadata_path, read_or_empty, write_metadata

    check_metadata_path(out_json, "out_json")
    if not Path(in_json).is_file():
        raise UserError(f"in_json {in_json}: file not found")
    entries = read_or_empty(in_json, "in_json")
    before = {k: dict(v) for k, v in entries.items()} if args.debug else {}
    changed = clean_entries(entries, args.caption_separator)
    for key in before:
        if before[key] != entries[key]:
            print(f"{key}: {before[key]} -> {entries[key]}")
    write_metadata(out_json, entries)
    print(f"cleaned {len(entries)} entries into {out_json}: {changed['caption']} caption(s) and "
          f"{changed['tags']} tag list(s) changed")


if __name__ == "__main__":
    run_cli(main)
