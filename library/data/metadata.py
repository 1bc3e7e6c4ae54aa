"""Fine-tuning metadata (kohya's ``metadata_file`` / ``--in_json``): captions and tags per image.

JSON: ``{"<image key>": {"caption": ..., "tags": ..., "image_size": [w, h], ...}}``; JSONL: one
``{"image_path": ..., "caption": ..., "tags": ...}`` object per line. A key is an absolute path, a
path relative to the subset's image_dir, or (older files) a file stem there.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from library.data.images import IMAGE_EXTENSIONS
from library.utils.errors import UserError
from library.utils.files import read_user_text


def read_metadata(path: str) -> dict[str, dict]:
    """Entries by image key; a broken file stops with its name and the problem."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"metadata_file not found: {p}")
    text = read_user_text(p, "metadata_file")
    try:
        if p.suffix.lower() == ".jsonl":
            entries = {}
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:  # exc counts lines within this one line: name the file's
                        raise UserError(f"{p}:{n}: not valid JSON (column {exc.colno}: {exc.msg})") from exc
                    if "image_path" not in obj:
                        raise UserError(f"{p}:{n}: a JSONL line needs image_path")
                    entries[obj["image_path"]] = obj
            return entries
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{p}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise UserError(f"{p}: expected an object of image keys")
    return data


def resolve_image(key: str, image_dir: str | None) -> Path | None:
    """The image file a metadata key stands for, or None."""
    p = Path(key)
    if p.is_absolute():
        return p if p.is_file() else None
    if image_dir is None:
        return p if p.is_file() else None
    candidate = Path(image_dir) / key
    if candidate.is_file():
        return candidate
    for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
        if (Path(image_dir) / f"{key}{ext}").is_file():
            return Path(image_dir) / f"{key}{ext}"
    return None


def caption_of(entry: dict) -> str:
    """kohya joins the caption and the tags (either may be missing)."""
    parts = [entry.get("caption"), entry.get("tags")]
    return ", ".join(str(x).strip() for x in parts if x and str(x).strip())


def metadata_images(metadata_file: str, image_dir: str | None) -> Iterator[tuple[str, Path | None, str]]:
    """(key, image path or None when missing, caption) for every entry."""
    for key, entry in read_metadata(metadata_file).items():
        yield key, resolve_image(key, image_dir), caption_of(entry if isinstance(entry, dict) else {})
