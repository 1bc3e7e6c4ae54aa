"""merge_captions_to_metadata.py, merge_dd_tags_to_metadata.py and clean_captions_and_tags.py: the keys
they write are the ones the trainers' metadata reader resolves, and kohya's clean-up rules hold."""

from __future__ import annotations

import json

import pytest

from finetune import clean_captions_and_tags, merge_captions_to_metadata, merge_dd_tags_to_metadata
from library.data.metadata import metadata_images
from library.prep.cleaning import clean_caption, clean_tags
from library.utils.errors import UserError
from tests.prep.tiny_taggers import solid


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "img"
    for name in ("a", "b", "sub/c"):
        solid(root / f"{name}.png", (100, 100, 100))
    (root / "a.caption").write_text("a photo of a woman\n", encoding="utf-8")
    (root / "sub" / "c.caption").write_text("\ufeffa red cat\n", encoding="utf-8")  # a BOM is fine
    (root / "a.txt").write_text("1girl, long_hair, ^_^\n", encoding="utf-8")
    (root / "b.txt").write_text("shirt, white_shirt\n", encoding="utf-8")
    return root


def test_merge_chain_keys_read_by_the_trainers(folder, tmp_path, capsys):
    caps, both = tmp_path / "meta_cap.json", tmp_path / "meta_cap_dd.json"
    merge_captions_to_metadata.main([str(folder), str(caps), "--recursive"])
    assert json.loads(caps.read_text()) == {"a.png": {"caption": "a photo of a woman"},
                                            "sub/c.png": {"caption": "a red cat"}}
    assert "2 written, 1 kept (no .caption file)" in capsys.readouterr().out
    merge_dd_tags_to_metadata.main([str(folder), str(both), "--in_json", str(caps), "--recursive"])
    assert json.loads(both.read_text())["a.png"] == {"caption": "a photo of a woman", "tags": "1girl, long_hair, ^_^"}
    assert json.loads(caps.read_text()) == {"a.png": {"caption": "a photo of a woman"},
                                            "sub/c.png": {"caption": "a red cat"}}  # --in_json itself untouched
    read = {p.relative_to(folder).as_posix(): c for _, p, c in metadata_images(str(both), str(folder))}
    assert read == {"a.png": "a photo of a woman, 1girl, long_hair, ^_^", "b.png": "shirt, white_shirt",
                    "sub/c.png": "a red cat"}


def test_full_path_jsonl_and_old_stem_keys_are_not_doubled(folder, tmp_path):
    out = tmp_path / "meta.jsonl"
    merge_captions_to_metadata.main([str(folder), str(out), "--full_path"])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows == [{"image_path": str((folder / "a.png").resolve()), "caption": "a photo of a woman"}]
    assert [p for _, p, _ in metadata_images(str(out), None)] == [(folder / "a.png").resolve()]
    old = tmp_path / "old.json"  # kohya's merge wrote extension-less stems: the entry is reused, not doubled
    old.write_text(json.dumps({"a": {"tags": "x"}}))
    merge_captions_to_metadata.main([str(folder), str(old)])
    assert json.loads(old.read_text()) == {"a": {"tags": "x", "caption": "a photo of a woman"}}


def test_clean_rules():
    assert clean_tags(["1girl", "long_hair", "^_^", "rating:safe", "shirt", "white_shirt"]) == \
        ["1girl", "long hair", "^_^", "white shirt"]
    # two people: the two eye colours and the two hair colours cannot be attributed, the one length can
    assert clean_tags(["2girls", "blue_eyes", "red_eyes", "long_hair", "blonde_hair", "black_hair", "smile"]) == \
        ["2girls", "long hair", "smile"]
    assert clean_tags(["1girl", "blue_eyes", "red_eyes"]) == ["1girl", "blue eyes", "red eyes"]  # one person: kept
    assert clean_caption("an anime woman sitting with a young lady") == "a girl sitting with a girl"
    assert clean_caption("a ladybug on a leaf") == "a ladybug on a leaf"  # whole words only


def test_clean_script_writes_a_new_file(tmp_path):
    src, dst = tmp_path / "in.json", tmp_path / "out.json"
    src.write_text(json.dumps({"a.png": {"caption": "a cartoon drawing of a woman", "tags": "1girl, rating:safe"}}))
    clean_captions_and_tags.main([str(tmp_path), str(src), str(dst)])  # kohya's three-path form
    assert json.loads(dst.read_text()) == {"a.png": {"caption": "a drawing of a girl", "tags": "1girl"}}
    assert "rating:safe" in src.read_text()
    with pytest.raises(UserError, match="file not found"):
        clean_captions_and_tags.main([str(tmp_path / "missing.json"), str(dst)])
    (tmp_path / "broken.json").write_text("{oops")
    with pytest.raises(UserError, match="not valid JSON"):
        clean_captions_and_tags.main([str(tmp_path / "broken.json"), str(dst)])


def test_bad_caption_file_is_named_and_the_rest_merged(folder, tmp_path, capsys):
    (folder / "b.caption").write_bytes(b"\xff\xfe bad")
    merge_captions_to_metadata.main([str(folder), str(tmp_path / "m.json")])
    assert json.loads((tmp_path / "m.json").read_text()) == {"a.png": {"caption": "a photo of a woman"}}
    out = capsys.readouterr().out
    assert "1 written, 1 skipped" in out and "b.caption is not UTF-8" in out
    with pytest.raises(UserError, match="must end in .json or .jsonl"):
        merge_captions_to_metadata.main([str(folder), str(tmp_path / "m.txt")])


SCRIPTS = ("make_captions", "make_captions_by_git", "tag_images_by_wd14_tagger", "merge_captions_to_metadata",
           "merge_dd_tags_to_metadata", "clean_captions_and_tags", "prepare_buckets_latents")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_says_what_it_writes_and_bad_input_is_one_line(script, tmp_path, capsys):
    import importlib

    from library.utils.errors import run_cli
    from tests.conftest import run_script

    shown = run_script(f"finetune/{script}.py", "--help", check=True).stdout  # as a script: its imports work
    assert "usage:" in shown and "writ" in shown  # the epilog says what is written where
    (tmp_path / "empty").mkdir()
    args = {"clean_captions_and_tags": [str(tmp_path / "none.json"), str(tmp_path / "out.json")],
            "merge_captions_to_metadata": [str(tmp_path / "empty"), str(tmp_path / "out.json")],
            "merge_dd_tags_to_metadata": [str(tmp_path / "empty"), str(tmp_path / "out.json")],
            "prepare_buckets_latents": [str(tmp_path / "empty"), str(tmp_path / "none.json"),
                                        str(tmp_path / "out.json"), str(tmp_path / "model.safetensors")]}
    with pytest.raises(SystemExit) as stop:  # as the command line runs it, in this process (fast)
        run_cli(importlib.import_module(f"finetune.{script}").main, args.get(script, [str(tmp_path / "empty")]))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and "Traceback" not in err
