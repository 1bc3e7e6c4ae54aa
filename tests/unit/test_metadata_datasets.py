"""Fine-tuning datasets from kohya metadata files (JSON and JSONL), and --in_json."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from library.data.dataset import ScanReport, build_dataset_group, scan_subset
from library.data.dataset_config import SubsetConfig, metadata_to_config, parse_dataset_config
from library.data.images import resize_to
from library.utils.errors import UserError


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (64, 64), (10, 20, 30)).save(d / f"{name}.png")
    return d


def test_json_keys_file_names_stems_and_absolute(images, tmp_path):
    meta = {"a.png": {"caption": "a cat", "tags": "red, cute"}, "b": {"tags": "only tags"},
            str(images / "c.png"): {"caption": "absolute"}, "missing.png": {"caption": "gone"}}
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(meta), encoding="utf-8")
    report = ScanReport()
    items = scan_subset(SubsetConfig(str(images), metadata_file=str(path)), report, strict=False)
    captions = {it.path.rsplit("/", 1)[-1]: it.caption for it in items}
    assert captions == {"a.png": "a cat, red, cute", "b.png": "only tags", "c.png": "absolute"}
    assert report.skipped == [("missing.png", f"listed in {path} but no such image file")]


def test_an_entry_without_caption_or_tags_is_skipped_and_named(images, tmp_path):
    path = tmp_path / "meta.json"
    path.write_text(json.dumps({"a": {"caption": "a cat"}, "b": {"tags": " "}, "c": {}}), encoding="utf-8")
    report = ScanReport()
    items = scan_subset(SubsetConfig(str(images), metadata_file=str(path)), report, strict=False)
    assert [it.caption for it in items] == ["a cat"]
    assert [(p.rsplit("/", 1)[-1], "no caption and no tags" in why) for p, why in report.skipped] == \
        [("b.png", True), ("c.png", True)]
    # with class_tokens the subset gives them a caption instead (as for image folders)
    tokens = scan_subset(SubsetConfig(str(images), metadata_file=str(path), class_tokens="sks"), ScanReport(),
                         strict=False)
    assert [it.caption for it in tokens] == ["a cat", "sks", "sks"]


def test_jsonl_and_in_json(images, tmp_path):
    path = tmp_path / "meta.jsonl"
    path.write_text("\n".join(json.dumps({"image_path": str(images / f"{n}.png"), "caption": n}) for n in "abc"),
                    encoding="utf-8")
    (ds,) = parse_dataset_config(metadata_to_config(None, str(path), 3), "--in_json", {"resolution": (64, 64)})
    group, _ = build_dataset_group([ds], 0, 1.0, False)
    assert sorted(it.caption for it in group.items) == ["a", "b", "c"] and ds.subsets[0].num_repeats == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption": "no path"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="bad.jsonl:1: a JSONL line needs image_path"):
        scan_subset(SubsetConfig(None, metadata_file=str(bad)), ScanReport(), False)


def test_mixing_kinds_in_one_dataset_is_refused():
    raw = {"datasets": [{"resolution": 64, "subsets": [{"image_dir": "a"}, {"metadata_file": "m.json"}]}]}
    with pytest.raises(UserError, match="cannot be mixed in the same dataset"):
        parse_dataset_config(raw, "c.toml", {})


def test_resize_interpolation_names():
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    outs = {name: resize_to(img, (16, 16), name) for name in ("nearest", "bilinear", "bicubic", "area", "lanczos",
                                                               "box")}
    assert all(o.shape == (16, 16, 3) for o in outs.values())
    assert np.array_equal(outs["nearest"], img[::2, ::2]) or np.array_equal(outs["nearest"], img[1::2, 1::2])
    assert not np.array_equal(outs["area"], outs["nearest"])
    with pytest.raises(UserError, match="resize_interpolation: expected one of"):
        parse_dataset_config({"datasets": [{"resolution": 64, "subsets": [{"image_dir": "a",
                                                                         "resize_interpolation": "fancy"}]}]},
                             "c.toml", {})


def test_a_malformed_jsonl_line_is_named_by_its_line_in_the_file(tmp_path):
    from library.data.metadata import read_metadata
    from library.utils.errors import UserError

    path = tmp_path / "meta.jsonl"
    path.write_text('{"image_path": "a.png", "caption": "ok"}\n\n{"image_path": "b.png", "caption": }\n')
    with pytest.raises(UserError, match=r"meta.jsonl:3: not valid JSON \(column 36"):
        read_metadata(str(path))
