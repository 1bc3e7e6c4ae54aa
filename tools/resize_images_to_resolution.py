"""Shrink images to at most a pixel area, keeping their aspect (kohya's tools/resize_images_to_resolution.py).

    python tools/resize_images_to_resolution.py raw resized --max_resolution 1024x1024,512x512 \
        --divisible_by 8 --copy_associated_files

For every image and every ``--max_resolution`` entry, writes ``<stem>+<entry>.jpg`` (``.png`` with
``--save_as_png``) in the destination folder: scaled down when larger than that area, then centre-cropped
to sides divisible by ``--divisible_by``. For users who keep aspect ratios and train with buckets. Each
entry is made from the original image (kohya's resized the previous entry's result again); transparency
is composited on white. Other files of the source folder are copied as they are, and with
``--copy_associated_files`` an image's caption files also under each ``<stem>+<entry>`` name. The source
folder is never changed; unreadable images are named at the end.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.utils.errors import UserError, run_cli  # noqa: E402

INTERPOLATIONS = ("area", "cubic", "lanczos4", "nearest", "linear", "box")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src_img_folder", help="folder of the images")
    p.add_argument("dst_img_folder", help="folder for the resized images (outside the source)")
    p.add_argument("--max_resolution", default="512x512,384x384,256x256,128x128",
                   help="largest areas, as WxH entries (default 512x512,384x384,256x256,128x128)")
    p.add_argument("--divisible_by", type=int, default=1, help="sides are cut down to a multiple of this (default 1)")
    p.add_argument("--interpolation", choices=INTERPOLATIONS, default=None,
                   help="resampling (default: area when shrinking)")
    p.add_argument("--save_as_png", action="store_true", help="write PNG instead of JPEG")
    p.add_argument("--copy_associated_files", action="store_true",
                   help="copy each image's other files (captions, ...) under every new name")
    return p


def _resample(name: str | None):
    import cv2

    return {None: cv2.INTER_AREA, "area": cv2.INTER_AREA, "cubic": cv2.INTER_CUBIC, "lanczos4": cv2.INTER_LANCZOS4,
            "nearest": cv2.INTER_NEAREST, "linear": cv2.INTER_LINEAR, "box": cv2.INTER_AREA}[name]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from library.prep.canvas import parse_resolutions, shrink_to_area
    from library.prep.files import RunSummary, check_out_dir, find_images

    if args.divisible_by < 1:
        raise UserError(f"--divisible_by {args.divisible_by}: at least 1")
    resolutions = parse_resolutions(args.max_resolution)
    src = Path(args.src_img_folder)
    dst = check_out_dir(src, args.dst_img_folder, "src_img_folder", "dst_img_folder")
    images = find_images(src, recursive=False, flag="src_img_folder")
    import cv2
    from PIL import Image

    from library.data.dataset import glob_escape
    from library.data.images import load_image_rgb
    from library.utils.files import atomic_path

    dst.mkdir(parents=True, exist_ok=True)
    for other in sorted(p for p in src.iterdir() if p.is_file() and p not in images):
        if not (dst / other.name).exists():
            shutil.copy2(other, dst / other.name)  # captions and the rest, as kohya does
    summary, suffix = RunSummary(), ".png" if args.save_as_png else ".jpg"
    for path in images:
        try:
            rgb = load_image_rgb(str(path))
        except Exception as exc:  # noqa: BLE001 - any decoder error makes just this image unusable
            summary.fail(path, f"cannot be read as an image ({type(exc).__name__}: {exc})")
            continue
        for label, area in resolutions:
            resized, final = shrink_to_area((rgb.shape[1], rgb.shape[0]), area, args.divisible_by)
            same = resized == (rgb.shape[1], rgb.shape[0])
            img = rgb if same else cv2.resize(rgb, resized, interpolation=_resample(args.interpolation))
            left, top = (resized[0] - final[0]) // 2, (resized[1] - final[1]) // 2
            img = img[top:top + final[1], left:left + final[0]]
            target = dst / f"{path.stem}+{label}{suffix}"
            with atomic_path(target) as tmp:
                Image.fromarray(img).save(tmp, format="PNG" if args.save_as_png else "JPEG",
                                          **({} if args.save_as_png else {"quality": 100}))
            if args.copy_associated_files:
                for other in src.glob(f"{glob_escape(path.stem)}.*"):
                    if other not in images:
                        shutil.copy2(other, dst / f"{path.stem}+{label}{other.suffix}")
        summary.done += 1
    print(summary.report(f"images resized into {dst} ({len(resolutions)} size(s) each)"))


if __name__ == "__main__":
    run_cli(main)
