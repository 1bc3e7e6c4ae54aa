"""Bucket the images of a metadata file and write their latents ahead of training
(kohya's finetune/prepare_buckets_latents.py).

    python finetune/prepare_buckets_latents.py images meta_clean.json meta_lat.json model.safetensors \
        --max_resolution 512,512 --batch_size 4 --mixed_precision fp16

For every image listed in in_json (and found in train_data_dir; ``--recursive`` for subfolders) this
assigns the bucket training will use and writes the latents beside the image as the trainers' cache file
``<stem>_<WWWW>x<HHHH>_sd.npz`` (``_sdxl.npz`` for SDXL: from the file's keys, or ``--sdxl``), with the
record of what they were made from. out_json is in_json with ``train_resolution`` (the bucket) per image.
Train with ``--in_json out_json --cache_latents --cache_latents_to_disk`` and the same resolution, bucket,
``--flip_aug`` and ``--mixed_precision`` flags: the trainer then reads these files instead of encoding
(a file made with other settings, or from a changed image or VAE, is encoded again, never used stale).
kohya's version wrote no latent files at all. Valid files are re-encoded unless ``--skip_existing``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.utils.errors import UserError, run_cli  # noqa: E402

FAMILIES = ("sd", "sdxl")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                                epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train_data_dir", help="folder of the images")
    p.add_argument("in_json", help="metadata file to read (.json or .jsonl)")
    p.add_argument("out_json", help="metadata file to write, with train_resolution")
    p.add_argument("model_name_or_path", help="the model whose VAE encodes (single file or diffusers folder)")
    p.add_argument("--v2", action="store_true", help="the model is SD2.x")
    p.add_argument("--sdxl", action="store_true", help="the model is SDXL (found from a single file's keys)")
    p.add_argument("--vae", default=None, help="a VAE to use instead of the model's (as in training)")
    p.add_argument("--batch_size", type=int, default=1, help="images per VAE call")
    p.add_argument("--max_data_loader_n_workers", type=int, default=None,
                   help="accepted for kohya's commands; images are decoded in this process, batch by batch")
    p.add_argument("--max_resolution", default="512,512", help="training resolution 'W,H' or 'S' (default 512,512)")
    p.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side (default 256)")
    p.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side (default 1024)")
    p.add_argument("--bucket_reso_steps", type=int, default=64, help="bucket sides are multiples of this (default 64)")
    p.add_argument("--bucket_no_upscale", action="store_true", help="do not enlarge small images to fill a bucket")
    p.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no",
                   help="VAE precision: use the value you train with (default no)")
    p.add_argument("--no_half_vae", action="store_true", help="encode in float32 under fp16/bf16 (as in training)")
    p.add_argument("--full_path", action="store_true", help="out_json keys are absolute paths")
    p.add_argument("--flip_aug", action="store_true", help="also write the latents of the mirrored image")
    p.add_argument("--alpha_mask", action="store_true", help="the images' alpha channels are loss masks")
    p.add_argument("--skip_existing", action="store_true", help="keep cache files that are still valid")
    p.add_argument("--recursive", action="store_true", help="also use images in subfolders of train_data_dir")
    p.add_argument("--tokenizer_cache_dir", default=None, help="folder with the model's tokenizer (offline use)")
    return p


def resolution(text: str) -> str:
    parts = text.replace("x", ",").split(",")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"--max_resolution {text!r}: give 'W,H' or one side, e.g. 512,512 or 1024")
    return ",".join(p.strip() for p in parts)


def family_name(args: argparse.Namespace) -> str:
    from library.families.detect import family_of_model

    found = family_of_model(args.model_name_or_path, "model_name_or_path")
    wanted = "sdxl" if args.sdxl else None
    if found == "sd3":
        raise UserError(f"model_name_or_path {args.model_name_or_path}: an SD3 model; this script prepares SD1/SD2 "
                        "and SDXL latents (sd3_train.py caches SD3's with --cache_latents_to_disk)")
    if wanted and found and found != wanted:
        raise UserError(f"--sdxl, but {args.model_name_or_path} is an SD1/SD2 model: remove --sdxl")
    return wanted or found or "sd"


def listed_entries(args: argparse.Namespace, root: Path, summary) -> dict[str, dict]:
    """The in_json entries of the images found in the folder; found images without an entry are named."""
    from library.data.metadata import resolve_image
    from library.prep.files import find_images
    from library.prep.metadata_files import read_or_empty

    if not Path(args.in_json).is_file():
        raise UserError(f"in_json {args.in_json}: file not found")
    entries = read_or_empty(args.in_json, "in_json")
    by_image = {}
    for key in entries:
        path = resolve_image(key, str(root))
        if path is not None:
            by_image[path.resolve()] = key
    listed = {}
    for path in find_images(root, args.recursive):
        key = by_image.get(path.resolve())
        if key is None:
            summary.fail(path, f"not listed in {args.in_json}")
        else:
            listed[key] = entries[key]
    if not listed:
        raise UserError(f"none of the images in {root} is listed in {args.in_json}")
    return listed


def training_args(args: argparse.Namespace, metadata: str):
    """The training flags that describe the same data and model, parsed by the trainers' parser."""
    from library.args.common import network_training_parser

    argv = ["--pretrained_model_name_or_path", args.model_name_or_path, "--in_json", metadata,
            "--train_data_dir", args.train_data_dir, "--resolution", resolution(args.max_resolution),
            "--enable_bucket", "--min_bucket_reso", str(args.min_bucket_reso),
            "--max_bucket_reso", str(args.max_bucket_reso), "--bucket_reso_steps", str(args.bucket_reso_steps),
            "--mixed_precision", args.mixed_precision, "--vae_batch_size", str(args.batch_size),
            "--cache_latents", "--cache_latents_to_disk"]
    for flag in ("v2", "bucket_no_upscale", "flip_aug", "alpha_mask", "no_half_vae"):
        if getattr(args, flag):
            argv.append(f"--{flag}")
    for flag in ("vae", "tokenizer_cache_dir"):
        if getattr(args, flag):
            argv += [f"--{flag}", getattr(args, flag)]
    return network_training_parser("prepare_buckets_latents").parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from library.prep.files import RunSummary
    from library.prep.metadata_files import check_metadata_path, write_metadata
    from library.utils.log import setup_logging

    setup_logging()
    check_metadata_path(args.out_json, "out_json")
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: at least 1")
    family = family_name(args)
    root = Path(args.train_data_dir)
    summary = RunSummary()
    entries = listed_entries(args, root, summary)
    from library.data.metadata import resolve_image
    from library.training.latent_prep import cache_dataset_latents  # after the checks: torch loads here

    with tempfile.TemporaryDirectory() as tmp:
        chosen = Path(tmp) / "listed.json"
        write_metadata(chosen, entries)
        group, counts, report = cache_dataset_latents(training_args(args, str(chosen)), family,
                                                      "finetune/prepare_buckets_latents.py",
                                                      refresh=not args.skip_existing)
    key_of = {resolve_image(k, str(root)).resolve(): k for k in entries}
    out = {}
    for item in group.items:
        key = key_of[Path(item.path).resolve()]
        entry = dict(entries[key], train_resolution=list(item.bucket), image_size=list(item.size))
        out[str(Path(item.path).resolve()) if args.full_path else key] = entry
    for path, reason in report.skipped:
        summary.fail(path, reason)
    write_metadata(args.out_json, out)
    summary.done, summary.kept = counts["encoded"], counts["loaded"]
    print(summary.report(f"latents ({len(out)} images in {args.out_json})", kept_reason="valid files kept"))


if __name__ == "__main__":
    run_cli(main)
