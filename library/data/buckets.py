"""Aspect-ratio buckets, as kohya-ss/sd-scripts defines them. Pure functions on sizes.

Sizes are (width, height) tuples in pixels.
"""

from __future__ import annotations

import math

Size = tuple[int, int]


def make_bucket_resolutions(resolution: Size, min_size: int, max_size: int, steps: int) -> list[Size]:
    """All buckets for a training resolution: area at most ``w*h``, sides in [min_size, max_size],
    multiples of ``steps``. The square bucket is always present."""
    max_area = resolution[0] * resolution[1]
    side = int(math.sqrt(max_area) // steps) * steps
    buckets = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // steps) * steps)
        if height >= min_size:
            buckets.add((width, height))
            buckets.add((height, width))
        width += steps
    return sorted(buckets)


def select_bucket(image_size: Size, buckets: list[Size]) -> tuple[Size, Size]:
    """Choose the bucket whose aspect ratio is closest to the image's; return (bucket, resized size).

    The resized size covers the bucket (it is cropped to it afterwards, never padded).
    """
    width, height = image_size
    if image_size in buckets:
        return image_size, image_size
    aspect = width / height
    bucket = min(buckets, key=lambda b: abs(b[0] / b[1] - aspect))
    if aspect > bucket[0] / bucket[1]:
        scale = bucket[1] / height
    else:
        scale = bucket[0] / width
    resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    return bucket, resized


def _round_to_steps(x: float, steps: int) -> int:
    x = int(x + 0.5)
    return x - x % steps


def no_upscale_bucket(image_size: Size, max_area: int, steps: int) -> tuple[Size, Size]:
    """``bucket_no_upscale``: shrink only images larger than ``max_area`` (keeping their aspect),
    then crop each side down to a multiple of ``steps``. Returns (bucket, resized size)."""
    width, height = image_size
    aspect = width / height
    if width * height > max_area:
        w_target = math.sqrt(max_area * aspect)
        h_target = max_area / w_target
        b_width_rounded = _round_to_steps(w_target, steps)
        b_height_in_wr = _round_to_steps(b_width_rounded / aspect, steps)
        ar_width_rounded = b_width_rounded / b_height_in_wr if b_height_in_wr else float("inf")
        b_height_rounded = _round_to_steps(h_target, steps)
        b_width_in_hr = _round_to_steps(b_height_rounded * aspect, steps)
        ar_height_rounded = b_width_in_hr / b_height_rounded if b_height_rounded else float("inf")
        if abs(ar_width_rounded - aspect) < abs(ar_height_rounded - aspect):
            resized = (b_width_rounded, int(b_width_rounded / aspect + 0.5))
        else:
            resized = (int(b_height_rounded * aspect + 0.5), b_height_rounded)
    else:
        resized = (width, height)
    bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
    return bucket, resized


def center_crop_box(resized: Size, bucket: Size) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box that center-crops ``resized`` to ``bucket``."""
    left = (resized[0] - bucket[0]) // 2
    top = (resized[1] - bucket[1]) // 2
    return left, top, left + bucket[0], top + bucket[1]
