"""Collect images for a search query with icrawler's Bing crawler (the image-pipeline seed's crawl_images.py).

    python finetune/crawl_images.py --query "cat illustration" --type clipart --color color --max_num 200 \
        --out_dir raw

Saves up to ``--max_num`` new images into ``--out_dir`` as 000001.jpg, 000002.png, ... (a re-run into
the same folder continues the numbering and skips every URL it already fetched), and appends one line
per saved file to ``<out_dir>/sources.jsonl`` (file, URL, query, time) for licences and re-runs.
Downloads that do not decode fully as images are not saved and are counted. ``--type`` and ``--color``
are Bing's filters as icrawler names them. The search host must be reachable: without a network the
script stops at once. Respect the sites' terms and the images' licences.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.utils.errors import UserError, run_cli  # noqa: E402

TYPES = ("photo", "clipart", "linedrawing", "transparent", "animated")
COLORS = ("color", "blackandwhite", "red", "orange", "yellow", "green", "teal", "blue", "purple", "pink", "white",
          "gray", "black", "brown")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--query", required=True, help="search words")
    p.add_argument("--type", choices=TYPES, default=None, help="kind of image (Bing's filter)")
    p.add_argument("--color", choices=COLORS, default=None, help="colour filter (Bing's)")
    p.add_argument("--max_num", type=int, default=100, help="new images to save (default 100, at most 1000)")
    p.add_argument("--out_dir", default="images", help="folder for the images (default images)")
    p.add_argument("--min_size", default=None, help="smallest accepted image: 256 or 320x240")
    p.add_argument("--threads", type=int, default=4, help="download threads (default 4)")
    p.add_argument("--search_host", default="https://www.bing.com", help="the search host (a mirror, or a test server)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not 1 <= args.max_num <= 1000:
        raise UserError(f"--max_num {args.max_num}: between 1 and 1000 (Bing returns at most 1000 results)")
    if args.threads < 1:
        raise UserError(f"--threads {args.threads}: at least 1")
    from library.prep.crawling import check_reachable, crawl, parse_min_size

    min_size = parse_min_size(args.min_size)
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out_dir {out_dir}: a file, not a folder")
    check_reachable(args.search_host)
    filters = {k: v for k, v in (("type", args.type), ("color", args.color)) if v}
    record = crawl(args.query, out_dir, args.max_num, filters, min_size, args.threads, args.search_host)
    print(f"crawl {args.query!r}: {record.saved} image(s) saved in {out_dir}, {record.broken} download(s) that were "
          f"not images refused, {record.known} URL(s) already fetched skipped; sources in {record.sources}")


if __name__ == "__main__":
    run_cli(main)
