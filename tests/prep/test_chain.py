"""The preparation chain from a folder of images to a fine_tune.py run: tag + caption + merge + clean +
prepare_buckets_latents, then fine_tune.py trains from the result reading the prepared latents (no
image is encoded again: the log says so and the files are not rewritten)."""

from __future__ import annotations

import json
import re

import pytest

from finetune import (
    clean_captions_and_tags,
    make_captions,
    merge_captions_to_metadata,
    merge_dd_tags_to_metadata,
    prepare_buckets_latents,
    tag_images_by_wd14_tagger,
)
from library.utils.errors import UserError
from tests.conftest import run_script
from tests.prep.test_tagger import WD_TAGS
from tests.prep.tiny_captioners import tiny_blip
from tests.prep.tiny_taggers import solid, wd_folder

BUCKETS = ["--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "16"]
SIZES = {"wide": (96, 48), "tall": (48, 80), "square": (64, 64)}


@pytest.fixture(scope="module")
def prepared(tiny_default, tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    images = root / "images"
    for i, (name, size) in enumerate(SIZES.items()):
        solid(images / f"{name}.png", (200, 40 * i, 30), size=size)
    tag_images_by_wd14_tagger.main([str(images), "--model_dir", str(wd_folder(root / "wd", WD_TAGS)),
                                    "--thresh", "0.5"])
    make_captions.main([str(images), "--caption_weights", str(tiny_blip(root / "blip")), "--max_length", "6"])
    merge_captions_to_metadata.main([str(images), str(root / "meta_cap.json")])
    merge_dd_tags_to_metadata.main([str(images), str(root / "meta_cap_dd.json"), "--in_json",
                                    str(root / "meta_cap.json")])
    clean_captions_and_tags.main([str(root / "meta_cap_dd.json"), str(root / "meta_clean.json")])
    model = tiny_default / "model" / "tiny-sd15.safetensors"
    prepare_buckets_latents.main([str(images), str(root / "meta_clean.json"), str(root / "meta_lat.json"), str(model),
                                  "--max_resolution", "64,64", "--batch_size", "2", "--tokenizer_cache_dir",
                                  str(tiny_default / "model"), *BUCKETS])
    return root, images, model


def test_metadata_has_captions_tags_and_buckets(prepared):
    root, images, _ = prepared
    meta = json.loads((root / "meta_lat.json").read_text())
    assert sorted(meta) == ["square.png", "tall.png", "wide.png"]
    assert all(e["caption"] and "red thing" in e["tags"] for e in meta.values())  # cleaned: no underscores
    assert meta["square.png"]["train_resolution"] == [64, 64]
    wide, tall = meta["wide.png"]["train_resolution"], meta["tall.png"]["train_resolution"]
    assert wide[0] > wide[1] and tall[0] < tall[1] and wide[0] * wide[1] <= 64 * 64
    for name, entry in meta.items():
        w, h = SIZES[name.removesuffix(".png")]
        assert entry["image_size"] == [w, h]
        assert (images / f"{name.removesuffix('.png')}_{w:04d}x{h:04d}_sd.npz").is_file()


def test_fine_tune_reads_the_prepared_latents(prepared, tiny_default, tmp_path):
    root, images, model = prepared
    caches = sorted(images.glob("*.npz"))
    stamps = [p.stat().st_mtime_ns for p in caches]
    proc = run_script("fine_tune.py", "--pretrained_model_name_or_path", str(model), "--in_json",
                      str(root / "meta_lat.json"), "--train_data_dir", str(images), "--resolution", "64,64",
                      "--enable_bucket", *BUCKETS, "--cache_latents", "--cache_latents_to_disk",
                      "--tokenizer_cache_dir", str(tiny_default / "model"), "--output_dir", str(tmp_path / "out"),
                      "--max_train_steps", "2", "--learning_rate", "1e-3", check=True)
    assert re.search(r"latent cache: 3 loaded from disk, 0 encoded", proc.stdout + proc.stderr)
    assert [p.stat().st_mtime_ns for p in caches] == stamps
    assert (tmp_path / "out" / "last.safetensors").is_file()


def test_skip_existing_keeps_valid_files_and_a_changed_image_is_redone(prepared, capsys):
    root, images, model = prepared
    args = [str(images), str(root / "meta_clean.json"), str(root / "meta_lat2.json"), str(model),
            "--max_resolution", "64,64", "--skip_existing", *BUCKETS]
    prepare_buckets_latents.main(args)
    assert "0 written, 3 kept (valid files kept)" in capsys.readouterr().out
    solid(images / "square.png", (10, 10, 10), size=(64, 64))  # a changed image: its file is stale
    prepare_buckets_latents.main(args)
    assert "1 written, 2 kept" in capsys.readouterr().out


def test_bad_input(prepared, tiny_family_models, tmp_path, capsys):
    root, images, model = prepared
    base = [str(images), str(root / "meta_clean.json"), str(tmp_path / "out.json")]
    with pytest.raises(UserError, match="an SD3 model"):
        prepare_buckets_latents.main(base + [str(tiny_family_models["sd3"])])
    with pytest.raises(UserError, match="--sdxl, but .* is an SD1/SD2 model"):
        prepare_buckets_latents.main(base + [str(model), "--sdxl"])
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(UserError, match="not valid JSON"):
        prepare_buckets_latents.main([str(images), str(tmp_path / "bad.json"), str(tmp_path / "o.json"), str(model)])
    with pytest.raises(UserError, match="--max_resolution"):
        prepare_buckets_latents.main(base + [str(model), "--max_resolution", "512x"])
    (tmp_path / "other.json").write_text(json.dumps({"nothing.png": {"caption": "x"}}))
    with pytest.raises(UserError, match="none of the images"):
        prepare_buckets_latents.main([str(images), str(tmp_path / "other.json"), str(tmp_path / "o.json"), str(model)])
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "o.json").exists()


def test_sdxl_found_from_the_file_and_a_broken_image_named(tiny_family_models, tmp_path, capsys):
    images = tmp_path / "images"
    for name, size in SIZES.items():
        solid(images / f"{name}.png", (90, 160, 40), size=size)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    meta = {f"{n}.png": {"caption": "a shape"} for n in [*SIZES, "broken"]}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    model = tiny_family_models["sdxl"]
    prepare_buckets_latents.main([str(images), str(tmp_path / "meta.json"), str(tmp_path / "out.json"), str(model),
                                  "--max_resolution", "64", "--flip_aug", "--full_path",
                                  "--tokenizer_cache_dir", str(model.parent), *BUCKETS])
    out = json.loads((tmp_path / "out.json").read_text())
    assert sorted(out) == sorted(str((images / f"{n}.png").resolve()) for n in SIZES)  # --full_path keys
    assert len(list(images.glob("*_sdxl.npz"))) == 3
    import numpy as np

    with np.load(next(images.glob("square_*_sdxl.npz"))) as cached:
        assert cached["latents"].shape == cached["latents_flipped"].shape == (4, 8, 8)
    report = capsys.readouterr().out
    assert "3 written" in report and "broken.png" in report
