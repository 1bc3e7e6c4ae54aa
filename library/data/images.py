"""Image reading and resizing with PIL/numpy/OpenCV (torchvision cannot be installed here)."""

from __future__ import annotations

import os

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# 12000x12000 images are legitimate training sources; PIL's default limit would reject them
Image.MAX_IMAGE_PIXELS = 20000 * 20000


def is_image_file(name: str) -> bool:
    """True for a visible file with a supported image extension (macOS ``._*`` files excluded)."""
    base = os.path.basename(name)
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def load_image_rgb(path: str) -> np.ndarray:
    """Decode an image fully: EXIF orientation applied, any mode converted to 8-bit RGB (H, W, 3).

    Transparent pixels are composited on white so RGBA/palette images do not turn black.
    Raises ``OSError``/``ValueError`` for unreadable files; callers decide whether to skip.
    """
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float64)
            arr = (arr / (65535.0 if arr.max() > 255 else 255.0) * 255.0).clip(0, 255).astype(np.uint8)
            img = Image.fromarray(arr, mode="L")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def load_mask(path: str, from_alpha: bool) -> np.ndarray:
    """A loss mask in [0, 1], (H, W) float32: the alpha channel of ``path`` (all ones without one),
    or the red channel of a mask image."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if from_alpha:
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                return np.asarray(img.convert("RGBA"), dtype=np.float32)[:, :, 3] / 255.0
            return np.ones((img.height, img.width), dtype=np.float32)
        return np.asarray(img.convert("RGB"), dtype=np.float32)[:, :, 0] / 255.0


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a float mask to (width, height) with area averaging (bilinear when enlarging)."""
    height, width = mask.shape
    if (width, height) == tuple(size):
        return mask
    shrink = size[0] < width and size[1] < height
    return cv2.resize(mask, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def image_size(path: str) -> tuple[int, int]:
    """(width, height) after EXIF orientation, read from the header only."""
    with Image.open(path) as img:
        width, height = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


_CV2 = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "linear": cv2.INTER_LINEAR,
        "bicubic": cv2.INTER_CUBIC, "cubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA}
_PIL = {"lanczos": Image.LANCZOS, "box": Image.BOX}


def resize_to(image: np.ndarray, size: tuple[int, int], interpolation: str | None = None) -> np.ndarray:
    """Resize to (width, height) with kohya's ``resize_interpolation`` names; by default the area
    filter when shrinking and Lanczos when enlarging."""
    height, width = image.shape[:2]
    if (width, height) == tuple(size):
        return image
    if interpolation is None:
        interpolation = "area" if size[0] < width and size[1] < height else "lanczos"
    if interpolation in _PIL:
        return np.asarray(Image.fromarray(image).resize(size, _PIL[interpolation]))
    return cv2.resize(image, size, interpolation=_CV2[interpolation])


def to_tensor_image(image: np.ndarray):
    """uint8 (H, W, 3) -> float tensor (3, H, W) in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)


def color_augment(image: np.ndarray, rng) -> np.ndarray:
    """kohya's colour augmentation: with probability 1/3, either shift the hue by up to 8 degrees
    (OpenCV's 0-180 hue scale) or apply a gamma between 0.95 and 1.05; otherwise unchanged."""
    if rng.random() > 0.33:
        return image
    if rng.random() > 0.5:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        shift = rng.uniform(-8, 8)
        hsv[:, :, 0] = ((hsv[:, :, 0].astype(np.float32) + shift) % 180).astype(np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    gamma = rng.uniform(0.95, 1.05)
    return np.clip(255.0 * (image / 255.0) ** gamma, 0, 255).astype(np.uint8)


def face_crop(image: np.ndarray, target: tuple[int, int], face: tuple[int, int, int, int],
              scale_range: tuple[float, float], random_crop: bool, rng) -> np.ndarray:
    """kohya's face crop augmentation. ``face`` is (centre x, centre y, width, height) in the
    original image. The image is scaled so the face's larger side is between 1/scale_range[1] and
    1/scale_range[0] of the target's shorter side (never enlarged, always covering the target),
    then a target-sized window is cut around the face: with random_crop the window wanders widely
    (to show background), otherwise it moves by at most a twentieth of the face size."""
    height, width = image.shape[:2]
    tw, th = target
    cx, cy, fw, fh = face
    face_size, short = max(fw, fh), min(tw, th)
    cover = max(th / height, tw / width)
    lo = min(1.0, max(cover, short / (face_size * scale_range[1])))
    hi = min(1.0, max(lo, short / (face_size * scale_range[0])))
    scale = lo if lo >= hi else rng.uniform(lo, hi)
    nw, nh = int(width * scale + 0.5), int(height * scale + 0.5)
    image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA) if (nw, nh) != (width, height) else image
    cx, cy = int(cx * scale + 0.5), int(cy * scale + 0.5)
    starts = []
    for size, length, centre in ((th, nh, cy), (tw, nw, cx)):
        start = centre - size // 2
        if random_crop:
            reach = max(length - centre, centre)
            start += rng.randint(0, reach) + rng.randint(0, reach) - reach
        elif scale_range[0] != scale_range[1] and face_size > short // 10 and face_size >= 40:
            start += rng.randint(-(face_size // 20), face_size // 20)
        starts.append(max(0, min(start, length - size)))
    top, left = starts
    return image[top:top + th, left:left + tw]


def face_info(stem: str) -> tuple[tuple[int, int, int, int], str] | None:
    """kohya's face annotation in a file name: ``name_cx_cy_w_h`` -> ((cx, cy, w, h), name)."""
    parts = stem.rsplit("_", 4)
    if len(parts) == 5 and all(p.isdigit() for p in parts[1:]):
        cx, cy, w, h = (int(p) for p in parts[1:])
        if w > 0 and h > 0:
            return (cx, cy, w, h), parts[0]
    return None
