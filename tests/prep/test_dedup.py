"""finetune/dedup.py on generated images with known relations (resized, re-encoded, slightly cropped,
byte-identical and unrelated), and the multi-index grouping against a brute-force reference."""

from __future__ import annotations

import csv
import random

import numpy as np
import pytest
from PIL import Image

from finetune import dedup
from library.prep.near_duplicates import group_near, hamming
from library.utils.errors import UserError


def smooth(seed: int, size: int = 256) -> Image.Image:
    """A smooth random picture (sums of sinusoids): perceptual hashes of such images survive resizing,
    JPEG and small crops, while two seeds differ by 20-30 of 64 bits."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size, 3))
    for c in range(3):
        for _ in range(4):
            fx, fy = rng.uniform(0.5, 3, 2)
            img[..., c] += np.sin(6.28 * (fx * x + fy * y) + rng.uniform(0, 6.28))
    return Image.fromarray(((img - img.min()) / (img.max() - img.min()) * 255).astype(np.uint8))


@pytest.fixture
def raw(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    a = smooth(1)
    a.save(root / "a.png")
    (root / "a.txt").write_text("the original\n")
    a.resize((128, 128), Image.LANCZOS).save(root / "a_small.png")
    (root / "a_small.txt").write_text("the small copy\n")
    a.save(root / "a_jpeg.jpg", quality=70)
    a.crop((3, 2, 253, 254)).save(root / "a_crop.png")
    smooth(2).save(root / "b.png")
    (root / "b_copy.png").write_bytes((root / "b.png").read_bytes())
    smooth(3).save(root / "c.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    return root


def _report(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_groups_best_copy_kept_captions_follow_nothing_deleted(raw, tmp_path, capsys):
    before = sorted(p.name for p in raw.iterdir())
    dedup.main(["--in_dir", str(raw), "--out_dir", str(tmp_path / "unique")])
    assert sorted(p.name for p in (tmp_path / "unique").iterdir()) == ["a.png", "a.txt", "b.png", "c.png",
                                                                       "dedup_report.csv"]
    assert (tmp_path / "unique" / "a.txt").read_text() == "the original\n"
    assert sorted(p.name for p in raw.iterdir()) == before
    rows = _report(tmp_path / "unique" / "dedup_report.csv")
    groups = {}
    for r in rows:
        groups.setdefault(r["group"], []).append((r["file"], r["action"]))
    assert sorted(sorted(g) for g in groups.values()) == [
        [("a.png", "kept"), ("a_crop.png", "duplicate"), ("a_jpeg.jpg", "duplicate"), ("a_small.png", "duplicate")],
        [("b.png", "kept"), ("b_copy.png", "duplicate")], [("c.png", "kept")]]
    assert next(r["why"] for r in rows if r["file"] == "b_copy.png") == "same bytes as b.png"
    out = capsys.readouterr().out
    assert "3 written" in out and "4 duplicate(s) left in place" in out and "broken.png: cannot be read" in out


def test_threshold_zero_and_move(raw, tmp_path):
    dedup.main(["--in_dir", str(raw), "--out_dir", str(tmp_path / "u"), "--threshold", "0", "--move",
                "--report", str(tmp_path / "r.json"), "--hash", "dhash"])
    moved = sorted(p.name for p in (tmp_path / "u").iterdir())
    assert "a.png" in moved and "a_crop.png" in moved and "b_copy.png" not in moved  # only exact copies left
    assert not (raw / "a.png").exists() and (raw / "b_copy.png").exists() and (raw / "a_small.png").exists()


@pytest.mark.parametrize("bits", [64, 256])
def test_grouping_equals_brute_force(bits):
    rng = random.Random(0)
    centres = [rng.getrandbits(bits) for _ in range(40)]
    hashes = [c ^ sum(1 << b for b in rng.sample(range(bits), rng.randrange(5))) for c in centres for _ in range(5)]
    hashes += [rng.getrandbits(bits) for _ in range(300)]
    order = list(range(len(hashes)))
    rng.shuffle(order)
    kept, expect = [], {}
    for i in order:  # the reference: compare with every kept hash, nearest wins (ties: first kept)
        near = [(hamming(hashes[i], hashes[k]), n, k) for n, k in enumerate(kept)]
        near = [t for t in near if t[0] <= 6]
        if near:
            d, _, k = min(near)
            expect[i] = (k, d)
        else:
            kept.append(i)
            expect[i] = (i, 0)
    got = {i: (k, d) for i, k, d in group_near(hashes, order, 6, bits)}
    assert got == expect and sum(k != i for i, (k, _) in got.items()) > 100


def test_bad_input(raw, tmp_path):
    base = ["--in_dir", str(raw), "--out_dir", str(tmp_path / "u")]
    with pytest.raises(UserError, match="--threshold 65: between 0 and 64"):
        dedup.main(base + ["--threshold", "65"])
    with pytest.raises(UserError, match="power of 2 for whash"):
        dedup.main(base + ["--hash", "whash", "--hash_size", "6"])
    with pytest.raises(UserError, match="inside --in_dir"):
        dedup.main(["--in_dir", str(raw), "--out_dir", str(raw / "unique")])
    (tmp_path / "none").mkdir()
    with pytest.raises(UserError, match="no images found"):
        dedup.main(["--in_dir", str(tmp_path / "none"), "--out_dir", str(tmp_path / "u")])
    assert not (tmp_path / "u").exists()
