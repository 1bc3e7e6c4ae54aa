"""Create the built-in tiny default: a random-weight SD1-architecture model in the real single-file
layout (with an offline tokenizer), a small captioned dataset in kohya's ``N_identifier class``
folders, a dataset TOML and a sample prompt file. Nothing is downloaded.

    python tools/make_tiny_default.py --out tiny_default
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def draw_shape(size: int, rng: np.random.Generator, color: tuple[int, int, int], shape: str) -> Image.Image:
    """A filled shape of one colour on a light, slightly noisy background."""
    bg = rng.integers(200, 256, size=(size, size, 3), dtype=np.uint8)
    img = Image.fromarray(bg)
    draw = ImageDraw.Draw(img)
    r = int(size * rng.uniform(0.25, 0.4))
    cx, cy = (int(size / 2 + rng.uniform(-0.1, 0.1) * size) for _ in range(2))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    else:
        draw.rectangle(box, fill=color)
    return img


def make_dataset(root: Path, size: int = 64, count: int = 8, seed: int = 0) -> None:
    """Training images: red circles (trigger 'sks'); regularization: blue squares."""
    rng = np.random.default_rng(seed)
    train = root / "train" / "10_sks shape"
    reg = root / "reg" / "1_shape"
    for folder in (train, reg):
        folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        draw_shape(size, rng, (220, 30, 30), "circle").save(train / f"img{i:02d}.png")
        (train / f"img{i:02d}.caption").write_text("sks shape, red circle\n", encoding="utf-8")
        draw_shape(size, rng, (30, 30, 220), "square").save(reg / f"reg{i:02d}.png")


def write_configs(root: Path, size: int) -> None:
    (root / "dataset.toml").write_text(f"""[general]
enable_bucket = false
caption_extension = ".caption"

[[datasets]]
resolution = {size}
batch_size = 2

  [[datasets.subsets]]
  image_dir = "{(root / 'train' / '10_sks shape').as_posix()}"
  class_tokens = "sks shape"
  num_repeats = 10

  [[datasets.subsets]]
  image_dir = "{(root / 'reg' / '1_shape').as_posix()}"
  class_tokens = "shape"
  is_reg = true
""", encoding="utf-8")
    (root / "prompts.txt").write_text(
        f"# kohya prompt lines: --n negative, --w/--h size, --d seed, --l CFG scale, --s steps\n"
        f"sks shape, red circle --n blue --w {size} --h {size} --d 1 --l 4 --s 10\n"
        f"a photo of shape --w {size} --h {size} --d 2 --s 10\n", encoding="utf-8")


def write_sd1(model_dir: Path, seed: int) -> str:
    """A tiny SD1 single file with its tokenizer folder next to it; returns the file name."""
    # the write_* functions import the models when called, so --help does not wait for torch
    from library.models.sd_loading import save_sd_single_file
    from library.models.tiny import make_tiny_sd1

    parts = make_tiny_sd1(seed)
    save_sd_single_file(model_dir / "tiny-sd15.safetensors", parts)
    parts.tokenizer.save_pretrained(str(model_dir / "tokenizer"))
    return "tiny-sd15.safetensors"


def write_sdxl(model_dir: Path, seed: int) -> str:
    """A tiny SDXL single file with both tokenizer folders next to it."""
    from library.models.sdxl_loading import save_sdxl_single_file
    from library.models.tiny import make_tiny_sdxl

    parts = make_tiny_sdxl(seed)
    save_sdxl_single_file(model_dir / "tiny-sdxl.safetensors", parts)
    parts.tokenizer_1.save_pretrained(str(model_dir / "tokenizer"))
    parts.tokenizer_2.save_pretrained(str(model_dir / "tokenizer_2"))
    return "tiny-sdxl.safetensors"


def write_sd3(model_dir: Path, seed: int) -> str:
    """A tiny SD3 single file with CLIP-L, CLIP-G and T5 bundled, and the three tokenizer folders."""
    from library.models.sd3_loading import save_sd3_single_file
    from library.models.tiny import make_tiny_sd3

    parts = make_tiny_sd3(seed)
    save_sd3_single_file(model_dir / "tiny-sd3.safetensors", parts)
    for folder, key in (("tokenizer", "clip_l"), ("tokenizer_2", "clip_g"), ("tokenizer_3", "t5xxl")):
        parts.tokenizers[key].save_pretrained(str(model_dir / folder))
    return "tiny-sd3.safetensors"


WRITERS = {"sd1": write_sd1, "sdxl": write_sdxl, "sd3": write_sd3}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tiny_default", help="output folder")
    parser.add_argument("--size", type=int, default=64, help="image size in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=sorted(WRITERS), default="sd1",
                        help="tiny model family: sd1, sdxl or sd3 (for train_network.py, sdxl_/sd3_train_network.py)")
    args = parser.parse_args(argv)
    root = Path(args.out).resolve()
    model_dir = root / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    name = WRITERS[args.family](model_dir, args.seed)
    make_dataset(root, args.size, seed=args.seed)
    write_configs(root, args.size)
    print(f"tiny default written to {root}: model/{name}, dataset.toml, prompts.txt")


if __name__ == "__main__":
    main()
