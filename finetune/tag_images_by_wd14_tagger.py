"""Tag images with a WD14-style ONNX tagger (kohya's finetune/tag_images_by_wd14_tagger.py, on onnxruntime).

    python finetune/tag_images_by_wd14_tagger.py images --repo_id SmilingWolf/wd-swinv2-tagger-v3 \
        --model_dir wd14_tagger_model --general_threshold 0.35 --character_threshold 0.85

Writes one tag file per image beside it (``a.png`` -> ``a.txt``, ``--caption_extension``), or with
``--output_path meta.json`` (or ``.jsonl``) the tags into that metadata file under ``tags``, with each
image's size; an existing metadata file is updated, its other fields kept. The tagger is the folder
``--model_dir`` itself when it holds ``model.onnx`` and ``selected_tags.csv`` (or ``tag_mapping.json``),
else ``--model_dir/<repo_id with / as _>``, downloaded from the hub when a file is missing. Only ONNX
models run (the Keras files of the old WD repos are not supported; every WD v2/v3 repo has model.onnx);
onnxruntime uses CUDA when its GPU build is installed, else the CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.utils.errors import UserError, run_cli  # noqa: E402

DEFAULT_REPO = "SmilingWolf/wd-v1-4-convnext-tagger-v2"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train_data_dir", help="folder of images to tag")
    p.add_argument("--repo_id", default=DEFAULT_REPO, help=f"tagger repo on the hub (default {DEFAULT_REPO})")
    p.add_argument("--model_dir", default="wd14_tagger_model",
                   help="folder with model.onnx + selected_tags.csv, or the parent of <repo_id with / as _>")
    p.add_argument("--force_download", action="store_true", help="download the tagger again")
    p.add_argument("--onnx", action="store_true", help="accepted for kohya's commands: ONNX is the only backend")
    p.add_argument("--batch_size", type=int, default=1, help="images per model call (split to the graph's batch)")
    p.add_argument("--max_data_loader_n_workers", type=int, default=None, help="processes decoding images")
    p.add_argument("--caption_extension", default=".txt", help="tag file extension (default .txt)")
    p.add_argument("--output_path", default=None, help="write tags into this .json/.jsonl metadata file instead")
    p.add_argument("--full_path", action="store_true", help="metadata keys are absolute paths")
    p.add_argument("--recursive", action="store_true", help="also tag images in subfolders")
    p.add_argument("--thresh", type=float, default=0.35, help="threshold of every category (default 0.35)")
    for category in ("general", "character", "meta", "model", "copyright", "artist"):
        p.add_argument(f"--{category}_threshold", type=float, default=None,
                       help=f"threshold of {category} tags (default --thresh)")
    p.add_argument("--remove_underscore", action="store_true", help="write tags with spaces (kaomoji kept)")
    p.add_argument("--undesired_tags", default="", help="tags never written, separated by --caption_separator")
    p.add_argument("--character_tags_first", action="store_true", help="character tags before the others")
    p.add_argument("--character_tag_expand", action="store_true",
                   help="name_(series) is written as two tags: name, series")
    p.add_argument("--always_first_tags", default=None, help="tags put first when present, in this order")
    p.add_argument("--tag_replacement", default=None, help="'from,to;from2,to2' (\\, and \\; for literal ones)")
    p.add_argument("--use_rating_tags", action="store_true", help="the most likely rating tag, first")
    p.add_argument("--use_rating_tags_as_last_tag", action="store_true", help="the most likely rating tag, last")
    p.add_argument("--use_quality_tags", action="store_true", help="the most likely quality tag, first")
    p.add_argument("--use_quality_tags_as_last_tag", action="store_true", help="the most likely quality tag, last")
    p.add_argument("--append_tags", action="store_true", help="add to the tags already there instead of replacing")
    p.add_argument("--caption_separator", default=", ", help="between tags (default ', ')")
    p.add_argument("--frequency_tags", action="store_true", help="print how often each tag was written")
    p.add_argument("--debug", action="store_true", help="print each image's tags by category")
    return p


def tag_rules(args: argparse.Namespace):
    from library.prep.tag_rules import THRESHOLD_CATEGORIES, TagRules, parse_replacements, split_tags, written_form

    thresholds = {c: args.thresh if getattr(args, f"{c}_threshold") is None else getattr(args, f"{c}_threshold")
                  for c in THRESHOLD_CATEGORIES}
    for c, value in thresholds.items():
        if not 0.0 <= value <= 1.0:
            raise UserError(f"--{c}_threshold (or --thresh) {value}: a probability between 0 and 1")
    for kind in ("rating", "quality"):
        if getattr(args, f"use_{kind}_tags") and getattr(args, f"use_{kind}_tags_as_last_tag"):
            raise UserError(f"--use_{kind}_tags and --use_{kind}_tags_as_last_tag: choose first or last, not both")
    placement = {k: "first" if getattr(args, f"use_{k}_tags") else "last" for k in ("rating", "quality")
                 if getattr(args, f"use_{k}_tags") or getattr(args, f"use_{k}_tags_as_last_tag")}
    undesired = split_tags(args.undesired_tags, args.caption_separator)
    return TagRules(thresholds=thresholds, separator=args.caption_separator, remove_underscore=args.remove_underscore,
                    character_expand=args.character_tag_expand, character_first=args.character_tags_first,
                    undesired=frozenset(undesired + [written_form(t, args.remove_underscore) for t in undesired]),
                    always_first=tuple(split_tags(args.always_first_tags or "", args.caption_separator)),
                    replacements=parse_replacements(args.tag_replacement), placement=placement)


def check_args(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: at least 1")
    if args.max_data_loader_n_workers is not None and args.max_data_loader_n_workers < 0:
        raise UserError(f"--max_data_loader_n_workers {args.max_data_loader_n_workers}: 0 or more")
    if args.output_path:
        from library.prep.metadata_files import check_metadata_path
        check_metadata_path(args.output_path, "--output_path")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from library.utils.log import setup_logging
    setup_logging()
    check_args(args)
    rules = tag_rules(args)
    from library.prep.files import find_images
    from library.prep.metadata_files import read_or_empty

    root = Path(args.train_data_dir)
    images = find_images(root, args.recursive)
    metadata = read_or_empty(args.output_path, "--output_path") if args.output_path else None
    from library.prep.tagger_model import OnnxTagger, locate_tagger  # after the checks: onnxruntime loads here
    from library.prep.tagging import TagOutput, run_tagger

    out = TagOutput(args.caption_extension, args.output_path, args.full_path, args.append_tags, args.batch_size,
                    args.max_data_loader_n_workers, args.debug)
    tagger = OnnxTagger(locate_tagger(args.model_dir, args.repo_id, args.force_download))
    summary, frequencies = run_tagger(tagger, rules, images, root, out, metadata)
    print(summary.report("tags"))
    if args.frequency_tags:
        print("tag frequencies:")
        for tag, count in sorted(frequencies.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"  {tag}: {count}")


if __name__ == "__main__":
    run_cli(main)
