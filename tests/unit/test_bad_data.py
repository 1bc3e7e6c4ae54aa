"""A generated corpus of bad data: every problem gets a clear message naming the file or key; unusable
files are skipped and listed (or stop the run with --strict_dataset); nothing raises a traceback."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from library.data.dataset import ScanReport, build_dataset_group, scan_subset
from library.data.dataset_config import DatasetConfig, SubsetConfig, parse_dataset_config
from library.utils.errors import UserError


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "5_thing"
    d.mkdir()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(d / "good.png")
    (d / "good.txt").write_text("a good caption", encoding="utf-8")
    Image.new("RGB", (64, 64)).save(d / "nocaption.png")
    (d / "zero.png").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "text.png").write_text("not an image", encoding="utf-8")
    (d / "._good.png").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork
    (d / ".hidden.png").write_bytes(b"")
    Image.new("RGB", (64, 64)).save(d / "latin1.png")
    (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    Image.new("RGB", (64, 64)).save(d / "empty_caption.png")
    (d / "empty_caption.txt").write_text("  \n", encoding="utf-8")
    Image.new("RGB", (10, 10)).save(d / "tiny.png")
    Image.new("RGB", (64, 64)).save(d / "twin.png")
    Image.new("RGB", (64, 64)).save(d / "twin.webp")  # same stem: would share twin.png's caption and cache
    (d / "gone.png").symlink_to(tmp_path / "deleted.png")  # a dangling link
    return d


def test_corpus_is_skipped_with_reasons(corpus):
    report = ScanReport()
    items = scan_subset(SubsetConfig(str(corpus), caption_extension=".txt", class_tokens="thing"), report, False)
    names = sorted(p.rsplit("/", 1)[-1] for p in (it.path for it in items))
    assert names == ["good.png", "nocaption.png", "tiny.png", "twin.png"]
    reasons = {p.rsplit("/", 1)[-1]: why for p, why in report.skipped}
    assert set(reasons) == {"zero.png", "truncated.jpg", "text.png", "latin1.png", "empty_caption.png", "twin.webp",
                            "gone.png"}
    assert "cannot be read as an image" in reasons["zero.png"] and "not UTF-8" in reasons["latin1.png"]
    assert "is empty" in reasons["empty_caption.png"]
    assert "same name as twin.png" in reasons["twin.webp"] and "link whose target does not exist" in reasons["gone.png"]
    assert report.class_token_fallbacks == 3  # nocaption.png, tiny.png and twin.png use class_tokens
    assert next(it for it in items if it.path.endswith("nocaption.png")).caption == "thing"


def test_strict_stops_at_the_first_bad_file(corpus):
    # the folder listing is checked first (links, same-stem twins), then each file in order
    with pytest.raises(UserError, match=r"gone.png: a link whose target does not exist.*--strict_dataset"):
        scan_subset(SubsetConfig(str(corpus), caption_extension=".txt"), ScanReport(), True)


def test_tiny_images_with_no_upscale_and_huge_images(corpus, tmp_path):
    cfg = DatasetConfig((64, 64), enable_bucket=True, bucket_no_upscale=True, bucket_reso_steps=64,
                        subsets=(SubsetConfig(str(corpus), caption_extension=".txt"),))
    group, report = build_dataset_group([cfg], 0, 1.0, False)
    assert any("tiny.png" in p and "smaller than one bucket step" in why for p, why in report.skipped)
    big = tmp_path / "big"
    big.mkdir()
    Image.new("RGB", (12000, 12000), (1, 2, 3)).save(big / "huge.png")
    cfg = DatasetConfig((512, 512), enable_bucket=True, subsets=(SubsetConfig(str(big)),))
    group, _ = build_dataset_group([cfg], 0, 1.0, False)
    item = group.items[0]
    assert item.size == (12000, 12000) and item.bucket == (512, 512)


def test_tiny_images_are_named_when_enlarged(tmp_path, caplog):
    import logging

    Image.new("RGB", (40, 40)).save(tmp_path / "small.png")
    cfg = DatasetConfig((512, 512), enable_bucket=True, subsets=(SubsetConfig(str(tmp_path)),))
    with caplog.at_level(logging.WARNING):
        group, _ = build_dataset_group([cfg], 0, 1.0, False)
    assert group.items[0].bucket == (512, 512)
    assert any("small.png is enlarged 12.8x" in r.getMessage() for r in caplog.records)


def test_empty_subsets_and_datasets(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "ok").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "ok" / "a.png")
    cfg = DatasetConfig((64, 64), subsets=(SubsetConfig(str(tmp_path / "empty")), SubsetConfig(str(tmp_path / "ok"))))
    group, report = build_dataset_group([cfg], 0, 1.0, False)
    assert report.empty_subsets == [str(tmp_path / "empty")] and len(group.items) == 1
    only_empty = DatasetConfig((64, 64), subsets=(SubsetConfig(str(tmp_path / "empty")),))
    with pytest.raises(UserError, match="no usable training images"):
        build_dataset_group([only_empty], 0, 1.0, False)


def test_bucket_rules(caplog):
    raw = {"datasets": [{"resolution": 512, "enable_bucket": True, "min_bucket_reso": 300, "max_bucket_reso": 1000,
                         "subsets": [{"image_dir": "x"}]}]}
    (ds,) = parse_dataset_config(raw, "c.toml", {})
    assert (ds.min_bucket_reso, ds.max_bucket_reso) == (256, 1024)  # rounded to the 64 step
    raw["datasets"][0]["resolution"] = [512, 650]  # kohya warns; the sides round down as bucket sides do
    (ds,) = parse_dataset_config(raw, "c.toml", {})
    assert ds.resolution == (512, 640)
    assert "resolution 512x650 is not a multiple of bucket_reso_steps 64: trained as 512x640" in caplog.text
    raw["datasets"][0].update(resolution=512, min_bucket_reso=640)
    with pytest.raises(UserError, match="must lie between min_bucket_reso 640"):
        parse_dataset_config(raw, "c.toml", {})
    for bad in ({"num_repeats": 0}, {"num_repeats": -3}):
        raw = {"datasets": [{"resolution": 512, "subsets": [{"image_dir": "x", **bad}]}]}
        with pytest.raises(UserError, match="num_repeats: expected a positive int"):
            parse_dataset_config(raw, "c.toml", {})


def test_sizes_fit_the_family(caplog):
    """What a model needs (SD/SDXL: multiples of 8, the VAE; SD3: 16) is made to hold, naming the value
    used; kohya's advice (64 for SD, 32 for SDXL) only warns."""
    from library.data.dataset_config import fit_to_family

    (ds,) = fit_to_family([DatasetConfig((512, 768))], 8, 64, "SD1.x/2.x")
    assert ds.resolution == (512, 768) and not caplog.text
    (ds,) = fit_to_family([DatasetConfig((520, 516))], 8, 64, "SD1.x/2.x")
    assert ds.resolution == (520, 512)
    assert "resolution 520x516: SD1.x/2.x images must have sides that are multiples of 8; trained as 520x512" \
        in caplog.text
    assert "kohya advises" not in caplog.text
    caplog.clear()
    (ds,) = fit_to_family([DatasetConfig((512, 512), enable_bucket=True, bucket_reso_steps=32)], 8, 64, "SD1.x/2.x")
    assert ds.bucket_reso_steps == 32
    assert "bucket_reso_steps 32 is not a multiple of 64, which kohya advises for SD1.x/2.x models" in caplog.text
    caplog.clear()
    (ds,) = fit_to_family([DatasetConfig((512, 512), enable_bucket=True, bucket_reso_steps=24, min_bucket_reso=240,
                                         max_bucket_reso=1000)], 16, 16, "SD3")
    assert (ds.bucket_reso_steps, ds.min_bucket_reso, ds.max_bucket_reso) == (32, 224, 1024)
    assert "bucket_reso_steps 24: SD3 images must have sides that are multiples of 16, so 32 is used" in caplog.text


def test_cache_info_skips_decoding_unchanged_images(tmp_path, monkeypatch):
    import os

    from library.data import dataset as ds_mod

    for name in ("a", "b"):
        Image.new("RGB", (64, 32)).save(tmp_path / f"{name}.png")
    sub = SubsetConfig(str(tmp_path), cache_info=True)
    first = scan_subset(sub, ScanReport(), False)
    assert (tmp_path / "metadata_cache.json").is_file() and [it.size for it in first] == [(64, 32), (64, 32)]
    decoded = []
    real = ds_mod.load_image_rgb
    monkeypatch.setattr(ds_mod, "load_image_rgb", lambda p: decoded.append(p) or real(p))
    again = scan_subset(sub, ScanReport(), False)
    assert decoded == [] and [it.size for it in again] == [(64, 32), (64, 32)]
    st = os.stat(tmp_path / "b.png")
    os.utime(tmp_path / "b.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    scan_subset(sub, ScanReport(), False)
    assert [p.rsplit("/", 1)[-1] for p in decoded] == ["b.png"]  # only the changed image is decoded again
