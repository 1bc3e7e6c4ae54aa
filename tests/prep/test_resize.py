"""finetune/resize_and_center.py and tools/resize_images_to_resolution.py: sizes, offsets and padding
checked pixel by pixel against hand-worked values."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from finetune import resize_and_center
from library.data.images import load_mask
from library.prep.canvas import centre_offset, fit_inside, shrink_to_area
from library.utils.errors import UserError
from tests.prep.tiny_taggers import solid
from tools import resize_images_to_resolution


def test_size_maths_by_hand():
    assert fit_inside((100, 50), 64) == (64, 32) and centre_offset((64, 32), 64) == (0, 16)
    assert fit_inside((30, 90), 64) == (21, 64) and centre_offset((21, 64), 64) == (21, 0)
    assert fit_inside((20, 10), 64, upscale=False) == (20, 10) and centre_offset((20, 10), 64) == (22, 27)
    # 300x200 into 100x100 of area: sqrt(10000/60000) = 0.408 -> 122x81, cut to multiples of 8 -> 120x80
    assert shrink_to_area((300, 200), 100 * 100, 8) == ((122, 81), (120, 80))
    assert shrink_to_area((60, 40), 100 * 100, 8) == ((60, 40), (56, 40))  # small: only the cut


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGBA"), dtype=np.int16)


def test_centred_on_a_coloured_canvas(tmp_path):
    solid(tmp_path / "raw" / "wide.png", (200, 20, 20), size=(100, 50))
    (tmp_path / "raw" / "wide.txt").write_text("a red band\n")
    resize_and_center.main(["--in_dir", str(tmp_path / "raw"), "--out_dir", str(tmp_path / "sq"), "--size", "64",
                            "--background", "#20a0ff", "--format", "png"])
    px = _pixels(tmp_path / "sq" / "wide.png")
    assert px.shape == (64, 64, 4)
    assert (px[:16] == [32, 160, 255, 255]).all() and (px[48:] == [32, 160, 255, 255]).all()
    assert (np.abs(px[17:47] - [200, 20, 20, 255]) <= 1).all()  # resampling a flat colour keeps it
    assert (tmp_path / "sq" / "wide.txt").read_text() == "a red band\n"
    assert (tmp_path / "raw" / "wide.png").is_file()  # the input is never touched


def test_transparent_padding_is_the_alpha_mask_training_reads(tmp_path):
    solid(tmp_path / "raw" / "tall.png", (10, 200, 10), size=(30, 90))
    resize_and_center.main(["--in_dir", str(tmp_path / "raw"), "--out_dir", str(tmp_path / "sq"), "--size", "64",
                            "--background", "transparent"])
    mask = load_mask(str(tmp_path / "sq" / "tall.png"), from_alpha=True)  # what --alpha_mask trains with
    assert mask.shape == (64, 64)
    assert (mask[:, :21] == 0).all() and (mask[:, 42:] == 0).all() and (mask[:, 22:41] == 1).all()


def test_exif_orientation_no_upscale_jpeg_and_reruns(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    img = Image.new("RGB", (40, 20), (30, 30, 200))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": the upright image is 20 wide, 40 tall
    img.save(raw / "turned.jpg", exif=exif)
    (raw / "broken.png").write_bytes(b"\x89PNG nope")
    args = ["--in_dir", str(raw), "--out_dir", str(tmp_path / "sq"), "--size", "64", "--no_upscale", "--quality", "90"]
    resize_and_center.main(args)
    px = _pixels(tmp_path / "sq" / "turned.jpg")
    assert px.shape == (64, 64, 4)
    # 20x40 centred: left 22, top 12 (JPEG blurs colour edges by a pixel or two: checked away from them)
    assert (np.abs(px[14:50, 24:40, :3] - [30, 30, 200]) < 25).all()
    for y, x in ((8, 32), (56, 32), (32, 17), (32, 46)):  # just outside the pasted image: white
        assert (np.abs(px[y, x, :3] - 255) < 25).all(), (y, x)
    out = capsys.readouterr().out
    assert "1 written, 1 skipped" in out and "broken.png: cannot be read" in out
    resize_and_center.main(args)
    assert "1 kept" in capsys.readouterr().out


def test_bad_input(tmp_path):
    solid(tmp_path / "raw" / "a.png", (1, 2, 3))
    base = ["--in_dir", str(tmp_path / "raw")]
    with pytest.raises(UserError, match="inside --in_dir"):
        resize_and_center.main(base + ["--out_dir", str(tmp_path / "raw" / "out")])
    with pytest.raises(UserError, match="--size 0"):
        resize_and_center.main(base + ["--out_dir", str(tmp_path / "o"), "--size", "0"])
    with pytest.raises(UserError, match="needs --format png"):
        resize_and_center.main(base + ["--out_dir", str(tmp_path / "o"), "--background", "transparent", "--format",
                                       "jpg"])
    with pytest.raises(UserError, match="not a colour"):
        resize_and_center.main(base + ["--out_dir", str(tmp_path / "o"), "--background", "blurple"])
    (tmp_path / "none").mkdir()
    with pytest.raises(UserError, match="no images found"):
        resize_and_center.main(["--in_dir", str(tmp_path / "none"), "--out_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_resize_images_to_resolution(tmp_path, capsys):
    src = tmp_path / "src"
    solid(src / "img.png", (90, 10, 200), size=(300, 200))
    (src / "img.txt").write_text("caption\n")
    (src / "notes.md").write_text("kept\n")
    resize_images_to_resolution.main([str(src), str(tmp_path / "dst"), "--max_resolution", "100x100,64x64",
                                      "--divisible_by", "8", "--copy_associated_files", "--save_as_png"])
    dst = tmp_path / "dst"
    # 64x64 from the original (not from the 100x100 result): sqrt(4096/60000) -> 78x52 -> 72x48
    assert Image.open(dst / "img+100x100.png").size == (120, 80)
    assert Image.open(dst / "img+64x64.png").size == (72, 48)
    assert (np.abs(_pixels(dst / "img+64x64.png")[..., :3] - [90, 10, 200]) <= 1).all()
    assert (dst / "img+100x100.txt").read_text() == "caption\n" and (dst / "img+64x64.txt").is_file()
    assert (dst / "notes.md").is_file() and (dst / "img.txt").is_file()
    assert "1 written" in capsys.readouterr().out
    with pytest.raises(UserError, match="WIDTHxHEIGHT"):
        resize_images_to_resolution.main([str(src), str(tmp_path / "d2"), "--max_resolution", "512"])
    with pytest.raises(UserError, match="inside src_img_folder"):
        resize_images_to_resolution.main([str(src), str(src / "out")])
