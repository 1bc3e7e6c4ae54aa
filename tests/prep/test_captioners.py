"""finetune/make_captions.py and make_captions_by_git.py on tiny random BLIP and GIT models (hub layout)."""

from __future__ import annotations

import pytest

from finetune import make_captions, make_captions_by_git
from library.prep.captioner import remove_writing
from library.utils.errors import UserError
from tests.prep.tiny_captioners import tiny_blip, tiny_git
from tests.prep.tiny_taggers import solid


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioners")
    return {"blip": tiny_blip(root / "blip"), "git": tiny_git(root / "git")}


@pytest.fixture
def images(tmp_path):
    for i, rgb in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        solid(tmp_path / "img" / f"{i}.png", rgb, size=(40 + 8 * i, 32))
    solid(tmp_path / "img" / "sub" / "deep.png", (90, 90, 90))
    return tmp_path / "img"


def _captions(folder, ext=".caption"):
    return {p.relative_to(folder).as_posix(): p.read_text(encoding="utf-8").strip()
            for p in sorted(folder.rglob(f"*{ext}"))}


def _direct(model_dir, folder, names, **generate):
    """What transformers itself writes for these images: the reference for the beam path."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    imgs = [Image.open(folder / n).convert("RGB") for n in names]
    with torch.no_grad():
        ids = model.generate(**processor(images=imgs, return_tensors="pt"), **generate)
    return [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]


def test_blip_beam_search_matches_transformers_and_skips_existing(models, images, capsys):
    make_captions.main([str(images), "--caption_weights", str(models["blip"]), "--beam_search", "--num_beams", "3",
                        "--max_length", "6", "--min_length", "2", "--batch_size", "2", "--prefix", "pre: "])
    got = _captions(images)
    assert sorted(got) == ["0.caption", "1.caption", "2.caption"]  # not recursive: sub/ untouched
    expect = _direct(models["blip"], images, ["0.png", "1.png", "2.png"], num_beams=3, do_sample=False,
                     max_new_tokens=6, min_new_tokens=2)
    assert [got[f"{i}.caption"] for i in range(3)] == [f"pre: {e}" for e in expect]
    (images / "1.caption").write_text("mine\n")
    make_captions.main([str(images), "--caption_weights", str(models["blip"]), "--recursive", "--max_length", "5"])
    after = _captions(images)
    assert after["1.caption"] == "mine" and after["0.caption"] == got["0.caption"]  # kept, not redone
    assert "sub/deep.caption" in after
    assert "captions: 1 written, 3 kept" in capsys.readouterr().out
    make_captions.main([str(images), "--caption_weights", str(models["blip"]), "--overwrite", "--max_length", "5"])
    assert _captions(images)["1.caption"] != "mine"


def test_blip_nucleus_sampling_is_seeded(models, images):
    runs = []
    for _ in range(2):
        make_captions.main([str(images), "--caption_weights", str(models["blip"]), "--overwrite", "--top_p", "0.9",
                            "--max_length", "8", "--seed", "3", "--caption_extension", ".txt"])
        runs.append(_captions(images, ".txt"))
    assert runs[0] == runs[1] and all(1 <= len(c.split()) <= 8 for c in runs[0].values())


def test_git_and_any_model_through_model_flag(models, images):
    make_captions_by_git.main([str(images), "--model_id", str(models["git"]), "--max_length", "5", "--batch_size", "3"])
    got = _captions(images)
    expect = _direct(models["git"], images, ["0.png", "1.png", "2.png"], max_new_tokens=5, do_sample=False)
    assert [got[f"{i}.caption"] for i in range(3)] == expect
    make_captions.main([str(images), "--model", str(models["git"]), "--beam_search", "--num_beams", "2",
                        "--max_length", "4", "--caption_extension", ".git"])
    assert len(_captions(images, ".git")) == 3
    with pytest.raises(UserError, match="a git model, not blip"):
        make_captions.main([str(images), "--caption_weights", str(models["git"])])


def test_remove_words_drops_spelled_out_writing():
    assert remove_writing('a red sign with the words "open late" on the door') == "a red sign"
    assert remove_writing('a poster that says "hello world" on it, in a room') == "a poster, in a room"
    assert remove_writing("a jersey with the number 23 on it") == "a jersey"
    assert remove_writing("a cat on a table") == "a cat on a table"


def test_bad_input(models, images, tmp_path):
    (images / "broken.png").write_bytes(b"\x89PNG broken")
    make_captions_by_git.main([str(images), "--model_id", str(models["git"]), "--max_length", "3"])
    assert not (images / "broken.caption").exists() and (images / "0.caption").exists()
    with pytest.raises(UserError, match=r"\.pth\) are not read"):
        make_captions.main([str(images), "--caption_weights", "https://example.com/model_large_caption.pth"])
    with pytest.raises(UserError, match="not in the local hub cache"):
        make_captions.main([str(images), "--caption_weights", "nobody/no-such-captioner"])
    with pytest.raises(UserError, match="lacks a file"):
        make_captions.main([str(images), "--model", str(tmp_path)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        make_captions.main([str(tmp_path / "empty"), "--caption_weights", str(models["blip"])])
