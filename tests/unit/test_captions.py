"""Caption reading and processing with fixed seeds."""

import random

import pytest

from library.data.captions import CaptionError, CaptionOptions, process_caption, read_caption_file


def test_shuffle_keeps_first_tokens_and_all_tags():
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=1)
    caption = "sks, red, circle, white background, simple"
    seen = set()
    for seed in range(20):
        out = process_caption(caption, opts, random.Random(seed))
        tags = out.split(", ")
        assert tags[0] == "sks"
        assert sorted(tags) == sorted(t.strip() for t in caption.split(","))
        seen.add(out)
    assert len(seen) > 5  # it really shuffles


def test_same_seed_same_caption():
    opts = CaptionOptions(shuffle_caption=True)
    assert process_caption("a, b, c, d, e", opts, random.Random(3)) == process_caption("a, b, c, d, e", opts,
                                                                                       random.Random(3))


def test_prefix_suffix_and_dropout():
    opts = CaptionOptions(caption_prefix="masterpiece,", caption_suffix=", best")
    assert process_caption("cat", opts, random.Random(0)) == "masterpiece, cat , best"
    assert process_caption("cat", CaptionOptions(caption_dropout_rate=1.0), random.Random(0)) == ""
    assert process_caption("cat", CaptionOptions(caption_dropout_rate=0.0), random.Random(0)) == "cat"


def test_read_caption_file(tmp_path):
    img = tmp_path / "a.png"
    (tmp_path / "a.txt").write_text("\n  first line \nsecond\n", encoding="utf-8")
    assert read_caption_file(str(img), ".txt") == "first line"
    assert read_caption_file(str(img), "txt") == "first line"
    assert read_caption_file(str(img), ".caption") is None
    (tmp_path / "a.caption").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CaptionError, match="not UTF-8"):
        read_caption_file(str(img), ".caption")
    (tmp_path / "a.empty").write_text("  \n", encoding="utf-8")
    with pytest.raises(CaptionError, match="empty"):
        read_caption_file(str(img), ".empty")
