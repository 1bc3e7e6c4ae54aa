"""The images a preparation script works on, the files it writes beside them, and its summary.

Every finetune/ script lists images the same way (sorted, optionally recursive, hidden files and
other extensions left out), names them in metadata the same way (the path relative to the folder,
with its extension, or the absolute path with ``--full_path``: the two forms the trainers'
``metadata_file`` reader resolves), writes each output file atomically, and ends with one summary
that names every image it could not use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from library.data.images import is_image_file
from library.utils.errors import UserError
from library.utils.files import atomic_path

logger = logging.getLogger(__name__)


def find_images(folder: str | Path, recursive: bool, flag: str = "train_data_dir") -> list[Path]:
    """The image files of ``folder`` (and its subfolders with ``recursive``), sorted by path."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{flag} {root}: folder not found")
    pattern = "**/*" if recursive else "*"
    found = sorted(p for p in root.glob(pattern) if p.is_file() and is_image_file(p.name)
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not found:
        hint = "" if recursive else " (add --recursive to look in its subfolders)"
        raise UserError(f"{flag} {root}: no images found ({', '.join(('.png', '.jpg', '.webp', '...'))}){hint}")
    return found


def image_key(path: Path, root: Path, full_path: bool) -> str:
    """The metadata key of an image: relative to ``root`` with its extension (``a.png``,
    ``sub/b.jpg``), or absolute with ``full_path``. kohya's merge scripts wrote extension-less
    stems without --full_path, which its own loader could not find; the trainers here read all three."""
    if full_path:
        return str(path.resolve())
    return path.relative_to(root).as_posix()


def sidecar(path: Path, extension: str) -> Path:
    """The caption/tag file beside an image: ``a.png`` -> ``a.caption`` (kohya's naming)."""
    if not extension.startswith("."):
        extension = "." + extension
    return path.with_suffix(extension)


def write_text(path: Path, text: str) -> None:
    """One output file, written whole or not at all (an interrupted run never leaves half a caption)."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


@dataclass
class RunSummary:
    """What a batch run did: counts by outcome and every image it could not use, with the reason."""

    done: int = 0
    kept: int = 0  # outputs that existed and were left as they were
    failed: list[tuple[str, str]] = field(default_factory=list)

    def fail(self, path: str | Path, reason: str) -> None:
        logger.warning("skipped %s: %s", path, reason)
        self.failed.append((str(path), reason))

    def report(self, what: str, kept_reason: str = "already had one") -> str:
        """The closing lines: counts first, then one line per skipped image."""
        lines = [f"{what}: {self.done} written" + (f", {self.kept} kept ({kept_reason})" if self.kept else "")
                 + (f", {len(self.failed)} skipped" if self.failed else "")]
        lines += [f"  skipped {path}: {reason}" for path, reason in self.failed]
        return "\n".join(lines)


def check_out_dir(in_dir: str | Path, out_dir: str | Path, in_flag: str, out_flag: str) -> Path:
    """An output folder that is not the input folder nor inside it (a later run, or a recursive
    one, would read its own output back); checked before any work."""
    source, target = Path(in_dir).resolve(), Path(out_dir).resolve()
    if target == source or source in target.parents:
        raise UserError(f"{out_flag} {out_dir} is inside {in_flag} {in_dir}: the output would be read back as "
                        "input; choose a folder outside it")
    if target.exists() and not target.is_dir():
        raise UserError(f"{out_flag} {out_dir}: a file, not a folder")
    return target


def copy_sidecars(image: Path, target_image: Path, extensions: list[str]) -> int:
    """Copy the caption/tag files of ``image`` (same stem, one of ``extensions``) beside
    ``target_image`` under its stem; an existing file there is left as it is. Returns how many were copied."""
    import shutil

    copied = 0
    for ext in extensions:
        source = sidecar(image, ext)
        target = sidecar(target_image, ext)
        if source.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            copied += 1
    return copied


def extension_list(text: str) -> list[str]:
    """``".txt,.caption"`` -> [".txt", ".caption"]."""
    return [e if e.startswith(".") else "." + e for e in (t.strip() for t in text.split(",")) if e]
