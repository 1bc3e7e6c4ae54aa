"""Fold caption or tag files into a metadata file (kohya's merge_captions_to_metadata.py and
merge_dd_tags_to_metadata.py), and clean a metadata file (clean_captions_and_tags.py)."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from library.data.captions import CaptionError, read_caption_file
from library.prep.cleaning import clean_caption, clean_tags
from library.prep.files import RunSummary, image_key
from library.prep.metadata_files import entry_for
from library.prep.tag_rules import split_tags


def merge_sidecars(images: list[Path], root: Path, entries: dict[str, dict], field: str, extension: str,
                   full_path: bool) -> RunSummary:
    """Put each image's ``<stem><extension>`` text into its entry under ``field``. Images without the
    file are counted as kept (their entry, if any, is left as it was); unreadable files are named."""
    summary = RunSummary()
    for path in tqdm(images, desc=f"merging {field}", unit="img"):
        try:
            text = read_caption_file(str(path), extension, all_lines=True)
        except CaptionError as exc:
            summary.fail(path, str(exc))
            continue
        if text is None:
            summary.kept += 1
            continue
        entry_for(entries, path, root, image_key(path, root, full_path))[field] = " ".join(text.splitlines())
        summary.done += 1
    return summary


def clean_entries(entries: dict[str, dict], separator: str = ", ") -> dict[str, int]:
    """Clean every caption and tag list in place; returns how many of each changed."""
    changed = {"caption": 0, "tags": 0}
    for entry in entries.values():
        if isinstance(entry.get("tags"), str):
            cleaned = separator.join(clean_tags(split_tags(entry["tags"], separator)))
            changed["tags"] += cleaned != entry["tags"]
            entry["tags"] = cleaned
        if isinstance(entry.get("caption"), str):
            cleaned = clean_caption(entry["caption"])
            changed["caption"] += cleaned != entry["caption"]
            entry["caption"] = cleaned
    return changed
