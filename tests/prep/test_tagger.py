"""finetune/tag_images_by_wd14_tagger.py on tiny ONNX taggers whose outputs are known from the colours."""

from __future__ import annotations

import json
import math

import pytest

from finetune.tag_images_by_wd14_tagger import main
from library.utils.errors import UserError
from tests.prep.tiny_taggers import mapping_folder, solid, wd_folder

# WD input is BGR: channel 0 = blue, 1 = green, 2 = red; each tag reads one channel / 255.
# The categories are interleaved on purpose (kohya read four ratings first, then general, then characters).
WD_TAGS = [
    ("general", "9", 1, 1 / 255, 0.0),                  # rating: green
    ("red_thing", "0", 2, 1 / 255, 0.0),                # general: red
    ("hatsune_miku_(vocaloid)", "4", 0, 1 / 255, 0.0),  # character: blue
    ("explicit", "9", 2, 1 / 255, 0.0),                 # rating: red
    ("blue_sky", "0", 0, 1 / 255, 0.0),                 # general: blue
    ("^_^", "0", 1, 1 / 255, 0.0),                      # general: green
    ("some_artist", "1", 2, 1 / 255, 0.0),              # artist: red
    ("long_hair", "0", 1, -1 / 255, 1.0),               # general: 1 - green
]
COLOUR = (204, 102, 51)  # red 0.8, green 0.4, blue 0.2 -> probabilities by the table above:
# general 0.4, red_thing 0.8, miku 0.2, explicit 0.8, blue_sky 0.2, ^_^ 0.4, artist 0.8, long_hair 0.6


@pytest.fixture
def wd(tmp_path):
    return wd_folder(tmp_path / "wd", WD_TAGS)


def _tags(path) -> str:
    return path.read_text(encoding="utf-8").strip()


def test_thresholds_per_category_from_the_csv_column(tmp_path, wd):
    img = solid(tmp_path / "img" / "a.png", COLOUR)
    main([str(img.parent), "--model_dir", str(wd), "--general_threshold", "0.5", "--character_threshold", "0.15",
          "--artist_threshold", "0.9"])
    assert _tags(img.with_suffix(".txt")) == "red_thing, hatsune_miku_(vocaloid), long_hair"
    main([str(img.parent), "--model_dir", str(wd), "--thresh", "0.3", "--use_rating_tags"])
    # every category at 0.3: the ratings are no threshold tags; "explicit" (0.8) beats "general" (0.4) by argmax
    assert _tags(img.with_suffix(".txt")) == "explicit, red_thing, ^_^, some_artist, long_hair"


def test_shaping_flags(tmp_path, wd):
    img = solid(tmp_path / "img" / "a.png", COLOUR)
    main([str(img.parent), "--model_dir", str(wd), "--thresh", "0.3", "--character_threshold", "0.1",
          "--remove_underscore", "--character_tag_expand", "--character_tags_first", "--undesired_tags", "some_artist",
          "--use_rating_tags_as_last_tag", "--tag_replacement", "red thing,crimson\\, bright;long_hair,long locks",
          "--always_first_tags", "long locks,^_^", "--caption_extension", ".tags"])
    # kaomoji keep their underscore; the replacement matches the written form and the model's name alike
    assert _tags(img.with_suffix(".tags")) == ("long locks, ^_^, hatsune miku, vocaloid, crimson, bright, "
                                               "explicit")


def test_pixels_bgr_and_white_padding(tmp_path, wd):
    """A 32x16 image is padded to 32x32 with white: each channel's mean is halfway to 255."""
    img = solid(tmp_path / "img" / "wide.png", (0, 0, 200), size=(32, 16))
    main([str(img.parent), "--model_dir", str(wd), "--thresh", "0.95", "--general_threshold", "0.7"])
    # red (0 + 255)/2/255 = 0.5: red_thing out; blue (200 + 255)/2/255 = 0.89: blue_sky in (the character,
    # also blue, stays under 0.95); green 0.5: long_hair 0.5 out
    assert _tags(img.with_suffix(".txt")) == "blue_sky"


def test_fixed_batch_graph_gets_split_batches(tmp_path):
    folder = wd_folder(tmp_path / "wd2", WD_TAGS, batch=2)
    colours = {"a": (230, 0, 0), "b": (0, 0, 230), "c": (230, 0, 230), "d": (0, 0, 0), "e": (230, 0, 0)}
    for name, rgb in colours.items():
        solid(tmp_path / "img" / f"{name}.png", rgb)
    main([str(tmp_path / "img"), "--model_dir", str(folder), "--batch_size", "3", "--general_threshold", "0.5",
          "--thresh", "0.95"])
    expect = {"a": "red_thing, long_hair", "b": "blue_sky, long_hair", "c": "red_thing, blue_sky, long_hair",
              "d": "long_hair", "e": "red_thing, long_hair"}
    assert {n: _tags(tmp_path / "img" / f"{n}.txt") for n in colours} == expect


def test_mapping_layout_nchw_logits_and_quality(tmp_path):
    # input (v / 127.5 - 1): red 204 -> 0.6, green 102 -> -0.2, blue 51 -> -0.6; output = sigmoid(5 * that)
    tags = [("cat_ears", "General", 2, 5.0, 0.0), ("best_quality", "Quality", 1, 5.0, 0.0),
            ("dog", "General", 0, 5.0, 0.0), ("worst_quality", "Quality", 0, -5.0, 0.0),
            ("sensitive", "Rating", 2, 5.0, 0.0), ("general", "Rating", 0, 5.0, 0.0),
            ("some_copyright", "Copyright", 2, 5.0, 0.0)]
    folder = mapping_folder(tmp_path / "cl", tags)
    img = solid(tmp_path / "img" / "a.png", COLOUR)
    sig = [1 / (1 + math.exp(-5 * v)) for v in (0.6, -0.2, -0.6)]  # red, green, blue
    assert sig[0] > 0.9 > 0.1 > sig[2]
    main([str(img.parent), "--model_dir", str(folder), "--general_threshold", "0.5", "--copyright_threshold", "0.96",
          "--use_quality_tags", "--use_rating_tags_as_last_tag"])
    # worst_quality sigmoid(3) beats best_quality sigmoid(-1); copyright sigmoid(3) = 0.953 < 0.96
    assert _tags(img.with_suffix(".txt")) == "worst_quality, cat_ears, sensitive"


def test_metadata_output_json_and_jsonl_and_append(tmp_path, wd):
    img = solid(tmp_path / "img" / "sub" / "a.png", COLOUR)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"sub/a.png": {"caption": "a photo"}}), encoding="utf-8")
    main([str(tmp_path / "img"), "--model_dir", str(wd), "--recursive", "--general_threshold", "0.7",
          "--thresh", "0.95", "--output_path", str(meta)])
    assert json.loads(meta.read_text()) == {"sub/a.png": {"caption": "a photo", "tags": "red_thing",
                                                          "image_size": [32, 32]}}
    assert not img.with_suffix(".txt").exists()
    main([str(tmp_path / "img"), "--model_dir", str(wd), "--recursive", "--general_threshold", "0.5",
          "--thresh", "0.95", "--output_path", str(meta), "--append_tags"])
    assert json.loads(meta.read_text())["sub/a.png"]["tags"] == "red_thing, long_hair"
    lines = tmp_path / "meta.jsonl"
    main([str(tmp_path / "img"), "--model_dir", str(wd), "--recursive", "--general_threshold", "0.7",
          "--thresh", "0.95", "--output_path", str(lines), "--full_path"])
    rows = [json.loads(x) for x in lines.read_text().splitlines()]
    assert rows == [{"image_path": str(img.resolve()), "tags": "red_thing", "image_size": [32, 32]}]
    from library.data.metadata import metadata_images  # what the trainers read from it

    assert [(p, c) for _, p, c in metadata_images(str(lines), None)] == [(img.resolve(), "red_thing")]


def test_append_tags_to_tag_files_and_frequencies(tmp_path, wd, capsys):
    for name in ("a", "b"):
        solid(tmp_path / "img" / f"{name}.png", COLOUR)
    (tmp_path / "img" / "a.txt").write_text("my_tag, long_hair\n", encoding="utf-8")
    main([str(tmp_path / "img"), "--model_dir", str(wd), "--general_threshold", "0.5", "--thresh",
          "0.95", "--append_tags", "--frequency_tags"])
    assert _tags(tmp_path / "img" / "a.txt") == "my_tag, long_hair, red_thing"
    assert _tags(tmp_path / "img" / "b.txt") == "red_thing, long_hair"
    out = capsys.readouterr().out
    assert "tags: 2 written" in out and "red_thing: 2" in out


def test_bad_images_are_skipped_and_named(tmp_path, wd, capsys):
    solid(tmp_path / "img" / "good.png", COLOUR)
    (tmp_path / "img" / "broken.png").write_bytes(b"not an image")
    main([str(tmp_path / "img"), "--model_dir", str(wd), "--general_threshold", "0.5", "--max_data_loader_n_workers",
          "1", "--batch_size", "2"])
    assert _tags(tmp_path / "img" / "good.txt").startswith("red_thing")
    assert not (tmp_path / "img" / "broken.txt").exists()
    out = capsys.readouterr().out
    assert "1 written, 1 skipped" in out and "broken.png: cannot be read as an image" in out


def test_bad_folders_and_files(tmp_path, wd):
    solid(tmp_path / "img" / "a.png", COLOUR)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        main([str(tmp_path / "empty"), "--model_dir", str(wd)])
    half = tmp_path / "half"
    half.mkdir()
    (half / "selected_tags.csv").write_text((wd / "selected_tags.csv").read_text())
    with pytest.raises(UserError, match=r"half: missing model\.onnx; copy it there"):
        main([str(tmp_path / "img"), "--model_dir", str(half)])
    with pytest.raises(UserError, match=r"missing model\.onnx, selected_tags\.csv.*offline"):
        main([str(tmp_path / "img"), "--model_dir", str(tmp_path / "no_tagger_here")])
    (half / "model.onnx").write_bytes((wd / "model.onnx").read_bytes())
    (half / "selected_tags.csv").rename(half / "tags.bak")
    with pytest.raises(UserError, match=r"missing selected_tags\.csv \(or tag_mapping\.json\)"):
        main([str(tmp_path / "img"), "--model_dir", str(half)])
    (half / "tags.bak").rename(half / "selected_tags.csv")
    (half / "selected_tags.csv").write_text("\n".join((wd / "selected_tags.csv").read_text().splitlines()[:-1]))
    with pytest.raises(UserError, match="lists 7 tags but .* has 8 outputs"):
        main([str(tmp_path / "img"), "--model_dir", str(half)])
    (half / "selected_tags.csv").write_text("id,tag\n1,a\n")
    with pytest.raises(UserError, match="expected the header tag_id,name,category"):
        main([str(tmp_path / "img"), "--model_dir", str(half)])
    bad_meta = tmp_path / "bad.json"
    bad_meta.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        main([str(tmp_path / "img"), "--model_dir", str(wd), "--output_path", str(bad_meta)])
    with pytest.raises(UserError, match="'source,target'"):
        main([str(tmp_path / "img"), "--model_dir", str(wd), "--tag_replacement", "a,b,c"])
    with pytest.raises(UserError, match="choose first or last"):
        main([str(tmp_path / "img"), "--model_dir", str(wd), "--use_rating_tags", "--use_rating_tags_as_last_tag"])
