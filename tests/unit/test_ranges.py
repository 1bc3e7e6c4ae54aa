"""One table of ranges: every numeric training and gen_img flag named there is a real flag, values
outside the range are refused naming the flag (or file and line) and the range, before any model."""

from __future__ import annotations

import pytest

import gen_img
from library.args.common import network_training_parser
from library.args.model_training import model_training_parser
from library.args.sd3 import add_sd3_args
from library.config.training_config import build_training_config
from library.generation.prompt_lines import parse_gen_line
from library.sampling.prompts import load_prompt_file, parse_prompt_line
from library.utils.errors import UserError
from library.utils.ranges import GENERATION, TRAINING
from sdxl_train_network import add_sdxl_args


def test_every_flag_in_the_tables_exists():
    training = network_training_parser("t")
    add_sdxl_args(training)
    dests = {a.dest for a in training._actions}
    sd3 = network_training_parser("t")
    add_sd3_args(sd3)
    dests |= {a.dest for a in sd3._actions}
    for kind in ("dreambooth", "fine_tune"):  # the full-weight trainers
        dests |= {a.dest for a in model_training_parser("t", kind)._actions}
    assert set(TRAINING) <= dests, set(TRAINING) - dests
    gen = {a.dest for a in gen_img.build_parser()._actions}
    assert set(GENERATION) <= gen, set(GENERATION) - gen


@pytest.mark.parametrize("flag, value, message", [
    ("--train_batch_size", "0", "--train_batch_size 0: must be at least 1"),
    ("--learning_rate", "-1e-4", "--learning_rate -0.0001: must be at least 0"),
    ("--text_encoder_lr", "-1", "--text_encoder_lr -1.0: must be at least 0"),
    ("--caption_dropout_rate", "1.5", "--caption_dropout_rate 1.5: must be at least 0 and at most 1"),
    ("--max_timestep", "1200", "--max_timestep 1200: must be at least 0 and at most 1000"),
    ("--seed", "-3", "--seed -3: must be at least 0"),
    ("--min_snr_gamma", "0", "--min_snr_gamma 0.0: must be above 0"),
    ("--validation_split", "1", "--validation_split 1.0: must be at least 0 and below 1"),
])
def test_training_flags_out_of_range(tmp_path, flag, value, message):
    parser = network_training_parser("t")
    args = parser.parse_args(["--pretrained_model_name_or_path", "m.safetensors", "--output_dir", str(tmp_path),
                              "--train_data_dir", str(tmp_path), f"{flag}={value}"])
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_training_config(args)


def test_gen_flags_out_of_range(tmp_path):
    from library.generation.config import build_gen_config

    for flag, value, message in (("--steps", "0", "--steps 0: must be at least 1 and at most 1000"),
                                 ("--batch_size", "0", "--batch_size 0: must be at least 1"),
                                 ("--strength", "2", "--strength 2.0: must be at least 0 and at most 1")):
        args = gen_img.build_parser().parse_args(["--ckpt", "m.safetensors", "--outdir", str(tmp_path), "--prompt",
                                                  "a", flag, value])
        with pytest.raises(UserError, match=message):
            build_gen_config(args)


def test_prompt_line_options_out_of_range(tmp_path):
    assert parse_prompt_line("a cat --s 28 --w 516").width == 512  # sizes round down to a multiple of 8, as kohya
    bad = tmp_path / "prompts.txt"
    bad.write_text("a cat --s 20\n# a comment\na dog --s -1\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"prompts.txt:3: --s -1.0: must be at least 1 and at most 1000"):
        load_prompt_file(str(bad))
    with pytest.raises(UserError, match=r"p.txt:4: --w 32.0: must be at least 64"):
        parse_gen_line("a cat --w 32", "p.txt:4")
    with pytest.raises(UserError, match=r"p.txt:4: --d -5.0: must be at least 0"):
        parse_gen_line("a cat --d 1,-5", "p.txt:4")
