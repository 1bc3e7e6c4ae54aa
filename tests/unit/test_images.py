"""Image decoding of every mode users have, and the augmentations."""

import random

import numpy as np
import pytest
from PIL import Image

from library.data.images import color_augment, image_size, load_image_rgb


def test_modes_convert_to_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 6), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.save(tmp_path / "rgba.png")
    out = load_image_rgb(str(tmp_path / "rgba.png"))
    assert out.shape == (6, 8, 3) and out.dtype == np.uint8
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[5, 7]) == (255, 255, 255)

    gray16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    gray16.save(tmp_path / "g16.png")
    assert tuple(load_image_rgb(str(tmp_path / "g16.png"))[0, 0]) == (255, 255, 255)

    Image.new("L", (4, 4), 128).save(tmp_path / "l.png")
    assert tuple(load_image_rgb(str(tmp_path / "l.png"))[0, 0]) == (128, 128, 128)

    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.save(tmp_path / "p.png")
    assert tuple(load_image_rgb(str(tmp_path / "p.png"))[0, 0]) == (0, 255, 0)

    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    r, g, b = load_image_rgb(str(tmp_path / "cmyk.jpg"))[0, 0]
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (8, 4), (0, 0, 255))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image_rgb(str(tmp_path / "rot.jpg")).shape == (8, 4, 3)
    assert image_size(str(tmp_path / "rot.jpg")) == (4, 8)


class _Forced(random.Random):
    """random() returns the given values in turn; uniform() the midpoint of its range plus ``u``."""

    def __init__(self, values, u):
        super().__init__(0)
        self.values, self.u = list(values), u

    def random(self):
        return self.values.pop(0)

    def uniform(self, a, b):
        return self.u


def test_color_augment_paths():
    img = np.zeros((4, 4, 3), dtype=np.uint8)
    img[..., 0] = 200  # red
    img[..., 1] = 50
    assert np.array_equal(color_augment(img, _Forced([0.9], 0)), img)  # 2 of 3 times: unchanged
    shifted = color_augment(img, _Forced([0.1, 0.9], 8.0))  # hue shift by +8
    assert shifted.shape == img.shape and not np.array_equal(shifted, img)
    gamma = color_augment(img, _Forced([0.1, 0.1], 1.05))
    expected = np.clip(255.0 * (img / 255.0) ** 1.05, 0, 255).astype(np.uint8)
    assert np.array_equal(gamma, expected)


def test_random_crop_moves_the_window(tmp_path):
    from library.data.dataset import BucketBatchDataset, ImageItem
    from library.data.dataset_config import DatasetConfig, SubsetConfig

    arr = np.arange(96 * 64 * 3, dtype=np.uint32).reshape(64, 96, 3) % 251
    Image.fromarray(arr.astype(np.uint8)).save(tmp_path / "wide.png")
    sub = SubsetConfig(str(tmp_path), random_crop=True)
    ds = BucketBatchDataset(DatasetConfig((64, 64)), [ImageItem(str(tmp_path / "wide.png"), "", sub, (96, 64))], [])
    item = ds.items[0]
    assert item.bucket == (64, 64) and item.resized == (96, 64)
    crops = {ds.load_pixels(item, False, random.Random(s))[0, 0, 0].item() for s in range(20)}
    assert len(crops) > 3
    centre = ds.load_pixels(item, False, None)
    assert centre.shape == (3, 64, 64)


def test_size_conditioning_follows_the_crop_and_flip(tmp_path):
    """SDXL's (original h, w, crop top, left, target h, w): the window actually cut, mirrored with a flip."""
    from library.data.dataset import BucketBatchDataset, ImageItem, size_conditioning
    from library.data.dataset_config import DatasetConfig, SubsetConfig

    Image.new("RGB", (96, 64)).save(tmp_path / "wide.png")
    sub = SubsetConfig(str(tmp_path), random_crop=True, flip_aug=True)
    ds = BucketBatchDataset(DatasetConfig((64, 64)), [ImageItem(str(tmp_path / "wide.png"), "", sub, (96, 64))], [])
    item = ds.items[0]
    assert size_conditioning(item, (16, 0, 80, 64), False) == [64, 96, 0, 16, 64, 64]
    assert size_conditioning(item, (10, 0, 74, 64), True) == [64, 96, 0, 22, 64, 64]  # 96 - 74
    rows = set()
    for epoch in range(6):
        batch = ds.make_batch([item], (0, epoch, 0), rank=0)
        row = batch.size_conditioning[0].tolist()
        assert row[:2] == [64, 96] and row[4:] == [64, 64] and row[2] == 0 and 0 <= row[3] <= 32
        rows.add(row[3])
    assert len(rows) > 1  # random crops show up as different crop offsets


@pytest.mark.parametrize("key", ["color_aug", "random_crop"])
def test_cache_conflicts_are_refused(key, tmp_path):
    from library.args.common import network_training_parser
    from library.config.training_config import build_training_config
    from library.utils.errors import UserError

    (tmp_path / "3_x").mkdir()
    args = network_training_parser("t").parse_args([
        "--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path), "--train_data_dir", str(tmp_path),
        "--resolution", "64", "--cache_latents", f"--{key}"])
    with pytest.raises(UserError, match=f"--cache_latents with {key}"):
        build_training_config(args)


def test_face_info_from_file_names():
    from library.data.images import face_info

    assert face_info("portrait_120_80_40_50") == ((120, 80, 40, 50), "portrait")
    assert face_info("no_face_here") is None and face_info("a_1_2_3_0") is None


def test_face_crop_keeps_the_face_inside_and_scales_it():
    from library.data.images import face_crop

    img = np.zeros((400, 600, 3), dtype=np.uint8)
    img[180:220, 430:470] = 255  # a 40x40 "face" centred at (450, 200)
    for seed in range(10):
        out = face_crop(img, (128, 128), (450, 200, 40, 40), (2.0, 4.0), False, random.Random(seed))
        assert out.shape == (128, 128, 3)
        ys, xs = np.nonzero(out[..., 0] > 128)
        # the face's size is between 1/4 and 1/2 of the 128 crop, and it is near the centre
        assert 128 / 4 - 2 <= xs.max() - xs.min() + 1 <= 128 / 2 + 2
        assert abs((xs.max() + xs.min()) / 2 - 64) < 10 and abs((ys.max() + ys.min()) / 2 - 64) < 10


def test_face_crop_needs_no_buckets():
    from library.data.dataset_config import parse_dataset_config
    from library.utils.errors import UserError

    raw = {"datasets": [{"resolution": 512, "enable_bucket": True,
                         "subsets": [{"image_dir": "x", "face_crop_aug_range": [2.0, 4.0]}]}]}
    with pytest.raises(UserError, match="face_crop_aug_range works without buckets only"):
        parse_dataset_config(raw, "c.toml", {})
    raw["datasets"][0]["subsets"][0]["face_crop_aug_range"] = [4.0, 2.0]
    with pytest.raises(UserError, match="face_crop_aug_range: expected \\[low, high\\]"):
        parse_dataset_config(raw, "c.toml", {})
