"""Remove duplicate and near-duplicate images from a dataset (the image-pipeline seed's dedup.py).

    python finetune/dedup.py --in_dir raw --out_dir unique --threshold 5

Files with the same bytes are duplicates; the rest are compared by perceptual hash (``--hash``
phash, dhash, ahash or whash from the imagehash library, ``--hash_size`` 8 = 64 bits): an image at most
``--threshold`` bits from a better one is its near-duplicate. Of each group the copy with the most
pixels (then the largest file) is kept and copied into ``--out_dir`` with its caption files (``--move``
moves it instead); duplicates stay where they are: nothing is ever deleted. A report of every group,
what was kept and why, is written to ``--report`` (CSV, or JSON by its suffix; default
``<out_dir>/dedup_report.csv``). Unreadable images are named at the end.
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
    p.add_argument("--in_dir", required=True, help="folder of images")
    p.add_argument("--out_dir", required=True, help="folder for the unique images (outside --in_dir)")
    p.add_argument("--threshold", type=int, default=5, help="largest Hamming distance of near-duplicates (default 5)")
    p.add_argument("--hash", default="phash", help="phash, dhash, ahash or whash (default phash)")
    p.add_argument("--hash_size", type=int, default=8, help="hash side: 8 gives 64 bits (default 8)")
    p.add_argument("--move", action="store_true", help="move the kept images instead of copying them")
    p.add_argument("--report", default=None, help="report file, .csv or .json (default <out_dir>/dedup_report.csv)")
    p.add_argument("--caption_extensions", default=".txt,.caption", help="files that travel with their image")
    p.add_argument("--recursive", action="store_true", help="also read subfolders (kept in the output)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from library.prep.dedup import collect_facts, find_groups, hash_bits, place_kept, write_report
    from library.prep.files import RunSummary, check_out_dir, extension_list, find_images

    bits = hash_bits(args.hash, args.hash_size)
    if not 0 <= args.threshold <= bits:
        raise UserError(f"--threshold {args.threshold}: between 0 and {bits} (the bits of a {args.hash} of size "
                        f"{args.hash_size})")
    out_dir = check_out_dir(args.in_dir, args.out_dir, "--in_dir", "--out_dir")
    report = Path(args.report) if args.report else out_dir / "dedup_report.csv"
    if report.suffix.lower() not in (".csv", ".json"):
        raise UserError(f"--report {report}: a .csv or .json file")
    root = Path(args.in_dir)
    summary = RunSummary()
    groups = find_groups(collect_facts(find_images(root, args.recursive, "--in_dir"), args.hash, args.hash_size,
                                       summary), args.threshold, bits)
    write_report(report, groups, root)  # first: the report says what the copies below come from
    place_kept(groups, root, out_dir, extension_list(args.caption_extensions), args.move, summary)
    duplicates = sum(len(g.duplicates) for g in groups)
    print(summary.report(f"unique images {'moved' if args.move else 'copied'} to {out_dir} ({duplicates} "
                         f"duplicate(s) left in place; report {report})", kept_reason="already there"))


if __name__ == "__main__":
    run_cli(main)
