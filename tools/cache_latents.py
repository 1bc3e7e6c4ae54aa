"""Pre-compute the latent cache files of a dataset, with the same code and flags as training.

    python tools/cache_latents.py --pretrained_model_name_or_path model.safetensors \
        --dataset_config dataset.toml [--vae_batch_size 4]

Writes ``<image stem>_<WWWW>x<HHHH>_sd.npz`` (``_sdxl.npz`` with ``--sdxl``) next to each image; files
that are still valid for the current settings are kept, stale or broken ones are rebuilt. Training with
``--cache_latents_to_disk`` then starts without encoding.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.args.common import network_training_parser
from library.args.config_file import parse_args_with_config
from library.utils.errors import run_cli  # noqa: E402
from library.utils.log import setup_logging


def main(argv: list[str] | None = None) -> None:
    parser = network_training_parser("Pre-compute latent cache files (SD1.x/2.x, or SDXL with --sdxl)")
    parser.add_argument("--sdxl", action="store_true", help="the model is SDXL (files end in _sdxl*.npz)")
    args = parse_args_with_config(parser, argv, required=("pretrained_model_name_or_path",))
    setup_logging(args.console_log_level, args.console_log_file)
    from library.training.latent_prep import cache_dataset_latents  # after parsing: torch loads here

    _, counts, report = cache_dataset_latents(args, "sdxl" if args.sdxl else "sd", "tools/cache_latents.py")
    print(f"latent cache: {counts['loaded']} valid file(s) kept, {counts['encoded']} written; "
          f"{len(report.skipped)} unusable image(s) skipped")


if __name__ == "__main__":
    run_cli(main)
