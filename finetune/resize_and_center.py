"""Fit every image onto a square canvas, centred, keeping its aspect (the image-pipeline seed's
resize_and_center.py).

    python finetune/resize_and_center.py --in_dir raw --out_dir square --size 512

Each image is scaled to fit a ``--size`` square (only down with ``--no_upscale``), EXIF orientation
applied, and pasted at the centre of a canvas of ``--background`` (white, as in the seed; any colour;
or ``transparent``, which writes PNGs whose alpha marks the padding so ``--alpha_mask`` training
ignores it). Written to ``--out_dir`` under the same relative path, as JPEG (``--quality``) or PNG
(``--format``); caption and tag files (``--caption_extensions``) are copied beside. The input folder is
never changed; outputs that exist are kept unless ``--overwrite``; unreadable images are named at the end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.utils.errors import UserError, run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                                epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in_dir", required=True, help="folder of images")
    p.add_argument("--out_dir", required=True, help="folder for the square images (outside --in_dir)")
    p.add_argument("--size", type=int, default=512, help="side of the square canvas (default 512)")
    p.add_argument("--background", default="white", help="canvas colour, or 'transparent' (default white)")
    p.add_argument("--format", choices=("jpg", "png"), default=None,
                   help="output format (default jpg; png with a transparent background)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality 1-100 (default 95)")
    p.add_argument("--no_upscale", action="store_true", help="never enlarge a small image (it is centred as it is)")
    p.add_argument("--caption_extensions", default=".txt,.caption", help="sidecar files copied (default .txt,.caption)")
    p.add_argument("--recursive", action="store_true", help="also read subfolders (kept in the output)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    return p


def check_args(args: argparse.Namespace):
    from library.prep.canvas import parse_background
    from library.prep.files import check_out_dir

    if args.size < 1:
        raise UserError(f"--size {args.size}: the canvas side must be at least 1 pixel")
    if not 1 <= args.quality <= 100:
        raise UserError(f"--quality {args.quality}: between 1 and 100")
    background = parse_background(args.background)
    fmt = args.format or ("png" if background is None else "jpg")
    if background is None and fmt == "jpg":
        raise UserError("--background transparent needs --format png (JPEG has no alpha channel)")
    return check_out_dir(args.in_dir, args.out_dir, "--in_dir", "--out_dir"), background, fmt


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out_dir, background, fmt = check_args(args)
    from tqdm import tqdm

    from library.prep.canvas import on_square_canvas, open_upright
    from library.prep.files import RunSummary, copy_sidecars, extension_list, find_images
    from library.utils.files import atomic_path

    root = Path(args.in_dir)
    summary, claimed = RunSummary(), {}
    for path in tqdm(find_images(root, args.recursive, "--in_dir"), desc="resizing", unit="img"):
        target = out_dir / path.relative_to(root).with_suffix(f".{fmt}")
        if target in claimed:
            summary.fail(path, f"{claimed[target].name} is written to the same {target.name}; rename one")
            continue
        claimed[target] = path
        if target.exists() and not args.overwrite:
            summary.kept += 1
            continue
        try:
            square = on_square_canvas(open_upright(str(path)), args.size, background, not args.no_upscale)
        except Exception as exc:  # noqa: BLE001 - any decoder error makes just this image unusable
            summary.fail(path, f"cannot be read as an image ({type(exc).__name__}: {exc})")
            continue
        with atomic_path(target) as tmp:
            square.save(tmp, format="PNG" if fmt == "png" else "JPEG",
                        **({} if fmt == "png" else {"quality": args.quality}))
        copy_sidecars(path, target, extension_list(args.caption_extensions))
        summary.done += 1
    print(summary.report(f"square images in {out_dir}", kept_reason="already there; --overwrite to redo"))


if __name__ == "__main__":
    run_cli(main)
