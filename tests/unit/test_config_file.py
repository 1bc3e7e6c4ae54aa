"""--config_file read as kohya reads it: values coerced the way the kohya_ss GUI writes them, keys
of other tools reported once, misspelt flags refused; --output_config as a path or as kohya's switch."""

from __future__ import annotations

import logging

import pytest
import toml

from library.args.common import network_training_parser
from library.args.config_file import load_config_defaults, parse_args_with_config
from library.utils.errors import UserError


def _load(tmp_path, text: str) -> dict:
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    return load_config_defaults(network_training_parser("t"), str(path))


def test_values_are_coerced_as_the_command_line_would_give_them(tmp_path):
    values = _load(tmp_path, """
persistent_data_loader_workers = 1
gradient_checkpointing = "true"
cache_latents = 0
learning_rate = "1e-4"
max_train_steps = 1600.0
network_dim = "8"
lr_warmup_steps = 0.05
resolution = 512
text_encoder_lr = ["1e-5", "2e-5"]
network_args = "conv_dim=4 conv_alpha=1"
optimizer_args = "weight_decay=0.1"
vae = ""
""")
    assert values["persistent_data_loader_workers"] is True and values["gradient_checkpointing"] is True
    assert values["cache_latents"] is False
    assert values["learning_rate"] == 1e-4 and values["max_train_steps"] == 1600 and values["network_dim"] == 8
    assert values["lr_warmup_steps"] == "0.05" and values["resolution"] == "512"
    assert values["text_encoder_lr"] == [1e-5, 2e-5]
    assert values["network_args"] == ["conv_dim=4", "conv_alpha=1"] and values["optimizer_args"] == ["weight_decay=0.1"]
    assert "vae" not in values  # "" is kohya's "not set"


@pytest.mark.parametrize("text, message", [
    ("learning_rat = 1e-4", "unknown key learning_rat (did you mean 'learning_rate'?)"),
    ("max_train_steps = 'many'", "max_train_steps: expected int, got 'many'"),
    ("max_train_steps = 10.5", "max_train_steps: expected int"),
    ("gradient_checkpointing = 2", "gradient_checkpointing: expected true or false"),
    ("mixed_precision = 'fp64'", "mixed_precision: 'fp64' is not one of"),
    ("resume_from_huggingface = true", "resume_from_huggingface: resuming from the Hub is not available"),
    ("network_dropout = 'lots'", "network_dropout: expected float, got 'lots'"),
    ("config_file = 'x.toml'", "config_file cannot be set in a config file"),
])
def test_bad_values_name_the_key_and_value(tmp_path, text, message):
    with pytest.raises(UserError, match=None) as info:
        _load(tmp_path, text)
    assert message in str(info.value)


def test_keys_of_other_tools_are_reported_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        values = _load(tmp_path, 'epoch = 10\nnoise_offset_type = "Original"\ndynamo_backend = "no"\n'
                                 'huggingface_repo_type = "model"\nsome_future_key = 3\nmax_train_epochs = 10\n')
    assert values == {"max_train_epochs": 10, "dynamo_backend": "no"}  # a flag here: "no" compiles nothing
    (record,) = [r for r in caplog.records if "not used by this script" in r.getMessage()]
    assert "dynamo_backend" not in record.getMessage()
    for key in ("epoch", "noise_offset_type", "huggingface_repo_type", "some_future_key"):
        assert key in record.getMessage()


def test_loraplus_flags_become_network_args(tmp_path):
    from library.config.training_config import _network_args

    args = network_training_parser("t").parse_args(["--network_args", "conv_dim=4", "loraplus_lr_ratio=2",
                                                     "--loraplus_lr_ratio", "16", "--loraplus_unet_lr_ratio", "8"])
    assert _network_args(args) == {"conv_dim": "4", "loraplus_lr_ratio": "16.0", "loraplus_unet_lr_ratio": "8.0"}


def test_output_config_as_a_path_and_as_kohyas_switch(tmp_path):
    parser = network_training_parser("t")
    source = tmp_path / "in.toml"
    source.write_text("learning_rate = 2e-4\nnetwork_dim = 8\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        parse_args_with_config(parser, ["--config_file", str(source), "--network_alpha", "4",
                                        "--output_config", str(tmp_path / "merged.toml")], ())
    assert toml.loads((tmp_path / "merged.toml").read_text()) == {"learning_rate": 2e-4, "network_dim": 8,
                                                                  "network_alpha": 4.0}
    # the switch: the command line is written to the --config_file path (which is not read)
    new = tmp_path / "new"
    with pytest.raises(SystemExit):
        parse_args_with_config(network_training_parser("t"), ["--config_file", str(new), "--network_dim", "16",
                                                              "--output_config"], ())
    assert toml.loads((tmp_path / "new.toml").read_text()) == {"network_dim": 16}
    with pytest.raises(UserError, match="the file exists"):
        parse_args_with_config(network_training_parser("t"), ["--config_file", str(new), "--output_config"], ())
    with pytest.raises(UserError, match="give --config_file too"):
        parse_args_with_config(network_training_parser("t"), ["--output_config"], ())


def test_sd3_takes_clip_skip_1_as_no_skip():
    from library.args.sd3 import add_sd3_args
    from library.config.family_options import training_family

    parser = network_training_parser("t")
    add_sd3_args(parser)
    assert training_family("sd3", parser.parse_args(["--clip_skip", "1"])).name == "sd3"
    with pytest.raises(UserError, match="--clip_skip: not used by SD3"):
        training_family("sd3", parser.parse_args(["--clip_skip", "2"]))


def test_kohyas_old_spellings_on_the_command_line_and_in_files(tmp_path):
    parser = network_training_parser("t")
    args = parser.parse_args(["--use_8bit_adam", "--caption_extention", ".txt"])
    assert args.optimizer_type == "AdamW8bit" and args.caption_extension == ".txt"
    assert parser.parse_args(["--use_lion_optimizer"]).optimizer_type == "Lion"
    values = _load(tmp_path, 'use_lion_optimizer = 1\ncaption_extention = ".cap"\nuse_8bit_adam = false\n')
    assert values == {"optimizer_type": "Lion", "caption_extension": ".cap"}


def test_console_log_file_gets_the_log(tmp_path):
    from library.utils.log import setup_logging

    log = tmp_path / "run.log"
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        setup_logging("INFO", str(log))
        logging.getLogger("library.test").warning("written to the file")
    finally:
        for handler in root.handlers[len(before):]:
            handler.close()
            root.removeHandler(handler)
    assert "WARNING library.test: written to the file" in log.read_text(encoding="utf-8")
