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


def _r(seed=0):
    return random.Random(seed)


def test_keep_tokens_separator_fixed_prefix_and_suffix():
    opts = CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||")
    for seed in range(10):
        out = process_caption("sks, 1girl ||| red, blue, green ||| masterpiece, best", opts, _r(seed)).split(", ")
        assert out[:2] == ["sks", "1girl"] and out[-2:] == ["masterpiece", "best"]
        assert sorted(out[2:5]) == ["blue", "green", "red"]
    # without shuffling the marker is removed, never trained on
    assert process_caption("a ||| b", CaptionOptions(keep_tokens_separator="|||"), _r()) == "a   b"


def test_secondary_separator_glues_tags():
    opts = CaptionOptions(shuffle_caption=True, secondary_separator=";;;")
    for seed in range(10):
        out = process_caption("a;;;b, c, d", opts, _r(seed))
        assert "a,b" in out  # moved as one tag, then the glue becomes the separator


def test_wildcards_lines_and_braces():
    opts = CaptionOptions(enable_wildcard=True)
    seen = {process_caption("a {red|blue} {{x}} cat\nline two", opts, _r(s)) for s in range(40)}
    assert seen == {"a red {x} cat", "a blue {x} cat", "line two"}
    # without wildcards only the first line counts and braces stay
    assert process_caption("a {red|blue}\nline two", CaptionOptions(), _r()) == "a {red|blue}"


def test_dropout_every_n_epochs_and_tag_dropout():
    opts = CaptionOptions(caption_dropout_every_n_epochs=3)
    assert process_caption("cat", opts, _r(), epoch=3) == "" and process_caption("cat", opts, _r(), epoch=4) == "cat"
    tags = ", ".join(f"t{i}" for i in range(200))
    kept = process_caption(tags, CaptionOptions(caption_tag_dropout_rate=0.25, keep_tokens=1), _r(1)).split(", ")
    assert kept[0] == "t0" and 120 < len(kept) < 180  # about 3/4 of the 199 flexible tags


def test_token_warmup_hand_computed():
    from library.data.captions import warmup_tag_count

    # floor(step * (n - min) / warmup) + min
    assert warmup_tag_count(10, 0, 1, 100) == 1
    assert warmup_tag_count(10, 50, 1, 100) == 5  # floor(50 * 9 / 100) + 1
    assert warmup_tag_count(10, 100, 1, 100) == 10
    opts = CaptionOptions(token_warmup_step=0.5, token_warmup_min=2, keep_tokens=1)
    out = process_caption("k, a, b, c, d, e, f", opts, _r(), step=0, max_train_steps=100)
    assert out == "k, a, b"  # warm-up of 50 steps (ratio 0.5): 2 flexible tags at step 0
    assert process_caption("k, a, b, c, d, e, f", opts, _r(), step=60, max_train_steps=100).count(",") == 6


def test_read_all_lines_for_wildcards(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n", encoding="utf-8")
    assert read_caption_file(str(tmp_path / "a.png"), ".txt", all_lines=True) == "one\ntwo"
