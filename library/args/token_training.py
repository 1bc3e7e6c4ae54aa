"""argparse for the textual inversion trainers (train_textual_inversion.py, its SDXL twin): the
shared training flags without the network ones, plus kohya's textual inversion flags."""

from __future__ import annotations

import argparse

from library.args.common import shared_training_parser
from library.config.token_training import SAVE_FORMATS


def add_token_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("textual inversion")
    g.add_argument("--token_string", help="the new word captions use for the concept (required; a made-up word)")
    g.add_argument("--init_word", help="start the vectors as this word's embedding (its tokens repeated over them)")
    g.add_argument("--num_vectors_per_token", type=int, default=1,
                   help="vectors (tokens) the concept gets: the word stands for <word> <word>1 ... <word>N-1")
    g.add_argument("--weights", help="continue from an embedding file (same vector count and model family)")
    g.add_argument("--use_object_template", action="store_true",
                   help="ignore the captions: each sample gets an object template around the word ('a photo of ...')")
    g.add_argument("--use_style_template", action="store_true",
                   help="ignore the captions: each sample gets a style template ('a painting in the style of ...')")


def token_training_parser(description: str) -> argparse.ArgumentParser:
    p = shared_training_parser(description, SAVE_FORMATS, network=False)
    add_token_args(p)
    p.set_defaults(log_tracker_name="textual_inversion")
    return p


def run_token_trainer(family: str, description: str, argv: list[str] | None) -> None:
    """An entry script's main(): parse, build the config, train the new token's vectors."""
    from library.args.config_file import parse_args_with_config
    from library.utils.log import setup_logging

    args = parse_args_with_config(token_training_parser(description), argv,
                                  required=("pretrained_model_name_or_path", "output_dir", "token_string"))
    setup_logging(args.console_log_level, args.console_log_file)
    # imported after parsing, so --help and argument errors do not wait for torch and diffusers
    from library.config.family_options import training_family
    from library.config.token_training import token_training_config
    from library.config.training_config import build_training_config
    from library.training.token_vectors import TokenTraining
    from library.training.trainer import Trainer

    config = build_training_config(args, "textual_inversion")
    tokens = token_training_config(args, config.datasets)
    what = TokenTraining(tokens, config.model_path, config.tokenizer_dir)
    Trainer(training_family(family, args, config.datasets), config, what).run()
