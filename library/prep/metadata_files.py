"""Reading and writing the fine-tuning metadata that the finetune/ scripts pass along.

One shape in memory: ``{image key: {"caption": ..., "tags": ..., "image_size": [w, h],
"train_resolution": [w, h]}}``. On disk ``.json`` is that object; ``.jsonl`` is one object per line with
the key as ``image_path`` and the same fields (kohya's tagger wrote tags under ``caption`` in JSONL;
here the field names are the same in both formats, so captions and tags merge in either). Both are read
by the trainers' ``metadata_file`` / ``--in_json`` reader (library/data/metadata.py), which this module
uses, so the two cannot disagree.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from library.data.metadata import read_metadata
from library.utils.errors import UserError
from library.utils.files import atomic_path

SUFFIXES = (".json", ".jsonl")


def check_metadata_path(path: str, flag: str) -> Path:
    p = Path(path)
    if p.suffix.lower() not in SUFFIXES:
        raise UserError(f"{flag} {p}: the metadata file must end in .json or .jsonl")
    if p.is_dir():
        raise UserError(f"{flag} {p}: a folder, not a file")
    return p


def read_or_empty(path: str | None, flag: str) -> dict[str, dict]:
    """The entries of an existing metadata file (a broken one stops the run before any work),
    or nothing when ``path`` is None or does not exist yet."""
    if not path or not Path(path).exists():
        return {}
    check_metadata_path(path, flag)
    entries = read_metadata(path)
    for key, entry in entries.items():
        if not isinstance(entry, dict):
            raise UserError(f"{flag} {path}: the entry of {key!r} is {type(entry).__name__}, expected an object")
    return {k: {f: v for f, v in e.items() if f != "image_path"} for k, e in entries.items()}


def write_metadata(path: str | Path, entries: dict[str, dict]) -> None:
    """The whole file, atomically (a crash keeps the previous version)."""
    p = Path(path)
    if p.suffix.lower() == ".jsonl":
        text = "".join(json.dumps({"image_path": key, **entry}, ensure_ascii=False) + "\n"
                       for key, entry in entries.items())
    else:
        text = json.dumps(entries, indent=2, ensure_ascii=False) + "\n"
    with atomic_path(p) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


class PeriodicWriter:
    """Rewrites a metadata file now and then during a long run (so an interrupted run keeps what
    it finished) and once at the end."""

    def __init__(self, path: str | Path, entries: dict[str, dict], every_s: float = 60.0):
        self.path, self.entries, self.every_s = path, entries, every_s
        self._last = time.monotonic()

    def maybe_write(self) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self.write()

    def write(self) -> None:
        write_metadata(self.path, self.entries)
        self._last = time.monotonic()


def entry_for(entries: dict[str, dict], path: Path, root: Path, key: str) -> dict:
    """The entry of an image, created under ``key`` when the file has none. An entry the file
    already has under another spelling of the same image (the absolute path, the relative path,
    or kohya's extension-less stem) is reused, so merging never lists one image twice."""
    relative = path.relative_to(root)
    for spelling in (key, str(path.resolve()), str(path), relative.as_posix(), relative.with_suffix("").as_posix()):
        if spelling in entries:
            return entries[spelling]
    return entries.setdefault(key, {})
