"""Image geometry for the resizing scripts: fitting into a square canvas (resize_and_center.py) and
shrinking to an area (tools/resize_images_to_resolution.py). The size maths are pure functions."""

from __future__ import annotations

import math

from PIL import Image, ImageColor, ImageOps

from library.utils.errors import UserError

Size = tuple[int, int]


def fit_inside(size: Size, side: int, upscale: bool = True) -> Size:
    """The largest size of the same aspect that fits a ``side`` square (never larger than ``size``
    itself without ``upscale``); each side at least 1 pixel."""
    width, height = size
    scale = side / max(width, height)
    if not upscale:
        scale = min(scale, 1.0)
    return max(1, round(width * scale)), max(1, round(height * scale))


def centre_offset(inner: Size, side: int) -> tuple[int, int]:
    """(left, top) that centres ``inner`` on a ``side`` square (an odd margin puts the extra pixel
    right / below)."""
    return (side - inner[0]) // 2, (side - inner[1]) // 2


def parse_background(text: str) -> tuple[int, int, int, int] | None:
    """A canvas colour: any name or notation PIL knows (``white``, ``#20a0ff``, ``rgb(0,0,0)``) as
    RGBA, or None for ``transparent``."""
    if text.lower() == "transparent":
        return None
    try:
        rgb = ImageColor.getrgb(text)
    except ValueError as exc:
        raise UserError(f"--background {text!r}: not a colour (a name such as white, #rrggbb, or transparent)") from exc
    return (*rgb[:3], 255)


def open_upright(path: str) -> Image.Image:
    """An image decoded fully, EXIF orientation applied, as RGBA (transparency kept)."""
    with Image.open(path) as img:
        img.load()
        return ImageOps.exif_transpose(img).convert("RGBA")


def _resample(shrinking: bool):
    return Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC


def on_square_canvas(img: Image.Image, side: int, background: tuple | None, upscale: bool) -> Image.Image:
    """``img`` (RGBA) scaled to fit a ``side`` square and pasted at its centre. With a colour the
    result is RGB (the image's own transparency composited on that colour); with ``background`` None
    it is RGBA, transparent where the padding is."""
    inner = fit_inside(img.size, side, upscale)
    scaled = img if inner == img.size else img.resize(inner, _resample(inner[0] < img.size[0]))
    canvas = Image.new("RGBA", (side, side), background or (0, 0, 0, 0))
    canvas.alpha_composite(scaled, centre_offset(inner, side))
    return canvas if background is None else canvas.convert("RGB")


def parse_resolutions(text: str) -> list[tuple[str, int]]:
    """kohya's ``--max_resolution "512x512,384x384"``: (label, pixel area) per entry."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise UserError(f"--max_resolution {text!r}: each entry is WIDTHxHEIGHT, e.g. 512x512; got {item!r}")
        out.append((item, int(parts[0]) * int(parts[1])))
    return out


def shrink_to_area(size: Size, max_area: int, divisible_by: int) -> tuple[Size, Size]:
    """(resized size, final size): an image above ``max_area`` pixels is scaled down keeping its
    aspect; both sides are then cut down to a multiple of ``divisible_by`` by a centre crop."""
    width, height = size
    if width * height > max_area:
        scale = math.sqrt(max_area / (width * height))
        width, height = max(1, int(width * scale)), max(1, int(height * scale))
    final = (max(divisible_by, width - width % divisible_by), max(divisible_by, height - height % divisible_by))
    return (width, height), (min(final[0], width), min(final[1], height))
