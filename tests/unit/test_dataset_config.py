"""Dataset config validation (all errors, with paths) and value precedence."""

import pytest

from library.data.dataset_config import folders_to_config, parse_dataset_config
from library.utils.errors import UserError

CLI_NONE = {"resolution": None, "batch_size": None}


def test_all_errors_reported_with_paths():
    raw = {"general": {"shuffle_caption": "yes"},
           "datasets": [{"resolution": 512, "batch_sise": 2,
                         "subsets": [{"image_dir": "a"}, {"image_dir": "b", "num_repeats": "ten"},
                                     {"num_repeats": 1, "flip_augment": True}]}]}
    with pytest.raises(UserError) as exc:
        parse_dataset_config(raw, "cfg.toml", CLI_NONE)
    msg = str(exc.value)
    assert "cfg.toml: 5 problem(s)" in msg
    assert 'general.shuffle_caption: expected true or false, got "yes"' in msg
    assert "datasets[0].batch_sise: unknown key (did you mean 'batch_size'?)" in msg
    assert 'datasets[0].subsets[1].num_repeats: expected a positive int, got "ten"' in msg
    assert "datasets[0].subsets[2].flip_augment: unknown key (did you mean 'flip_aug'?)" in msg
    assert "datasets[0].subsets[2].image_dir: required key missing" in msg


def test_precedence_subset_dataset_general_cli_default():
    raw = {"general": {"num_repeats": 3, "shuffle_caption": True, "keep_tokens": 2},
           "datasets": [{"resolution": [640, 512], "num_repeats": 5,
                         "subsets": [{"image_dir": "a", "num_repeats": 7}, {"image_dir": "b"}]}]}
    cli = {"resolution": (256, 256), "batch_size": 4, "keep_tokens": 9, "caption_extension": ".txt", "flip_aug": None}
    (ds,) = parse_dataset_config(raw, "cfg", cli)
    assert ds.resolution == (640, 512)           # dataset beats CLI
    assert ds.batch_size == 4                    # CLI beats default
    assert ds.subsets[0].num_repeats == 7        # subset beats dataset
    assert ds.subsets[1].num_repeats == 5        # dataset beats general
    assert ds.subsets[1].caption.keep_tokens == 2  # general beats CLI
    assert ds.subsets[1].caption_extension == ".txt"
    assert ds.subsets[1].flip_aug is False       # default


def test_missing_resolution_is_reported():
    with pytest.raises(UserError, match="no resolution"):
        parse_dataset_config({"datasets": [{"subsets": [{"image_dir": "a"}]}]}, "cfg", CLI_NONE)


def test_legacy_folders(tmp_path):
    (tmp_path / "10_sks dog").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "0_skip").mkdir()
    raw = folders_to_config(str(tmp_path), None)
    (sub,) = raw["datasets"][0]["subsets"]
    assert sub["num_repeats"] == 10 and sub["class_tokens"] == "sks dog" and sub["is_reg"] is False
    with pytest.raises(UserError, match="no sub-folder named"):
        folders_to_config(str(tmp_path / "notes"), None)


def test_two_datasets_keep_their_own_resolution_and_batch_size(tmp_path):
    from PIL import Image

    from library.data.dataset import build_dataset_group

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(4):
            Image.new("RGB", (128, 128)).save(tmp_path / name / f"{i}.png")
    raw = {"datasets": [{"resolution": 64, "batch_size": 2, "subsets": [{"image_dir": str(tmp_path / "a")}]},
                        {"resolution": 128, "batch_size": 4, "subsets": [{"image_dir": str(tmp_path / "b")}]}]}
    group, _ = build_dataset_group(parse_dataset_config(raw, "c.toml", {}), 0, 1.0, False)
    assert len(group) == 2 + 1
    shapes = sorted(tuple(group[(0, i)].images.shape) for i in range(len(group)))
    assert shapes == [(2, 3, 64, 64), (2, 3, 64, 64), (4, 3, 128, 128)]


def test_json_config_files_read_like_toml(tmp_path):
    import json

    from library.data.dataset_config import load_config_file

    raw = {"general": {"shuffle_caption": True}, "datasets": [{"resolution": [640, 512],
                                                               "subsets": [{"image_dir": "a", "num_repeats": 3}]}]}
    (tmp_path / "d.json").write_text(json.dumps(raw), encoding="utf-8")
    (ds,) = parse_dataset_config(load_config_file(str(tmp_path / "d.json")), "d.json", {})
    assert ds.resolution == (640, 512) and ds.subsets[0].num_repeats == 3 and ds.subsets[0].caption.shuffle_caption
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="bad.json: cannot parse"):
        load_config_file(str(tmp_path / "bad.json"))
