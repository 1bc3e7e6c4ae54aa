"""Finding duplicate and near-duplicate images (finetune/dedup.py): an exact pass by content hash,
then perceptual hashes (imagehash) grouped with :func:`library.prep.near_duplicates.group_near`."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from library.prep.files import RunSummary, sidecar
from library.prep.near_duplicates import group_near
from library.utils.errors import UserError
from library.utils.files import atomic_path

HASHES = ("phash", "dhash", "ahash", "whash")
REPORT_FIELDS = ["group", "file", "action", "why", "pixels", "bytes"]


@dataclass
class ImageFacts:
    path: Path
    sha256: str
    hash: int
    pixels: int
    size_bytes: int


@dataclass
class Group:
    kept: ImageFacts
    duplicates: list[tuple[ImageFacts, str]] = field(default_factory=list)  # (image, why it is one)


def hash_bits(kind: str, hash_size: int) -> int:
    """How many bits a hash of this kind and size has (the largest meaningful threshold)."""
    if kind not in HASHES:
        raise UserError(f"--hash {kind}: one of {', '.join(HASHES)}")
    if hash_size < 2 or (kind == "whash" and hash_size & (hash_size - 1)):
        extra = " and a power of 2 for whash" if kind == "whash" else ""
        raise UserError(f"--hash_size {hash_size}: at least 2{extra}")
    return hash_size * hash_size


def perceptual_hash(path: Path, kind: str, hash_size: int) -> tuple[int, int]:
    """(hash as an int, pixel count) of an image, EXIF orientation applied."""
    import imagehash
    from PIL import Image, ImageOps

    function = {"phash": imagehash.phash, "dhash": imagehash.dhash, "ahash": imagehash.average_hash,
                "whash": imagehash.whash}[kind]
    with Image.open(path) as img:
        img.load()
        upright = ImageOps.exif_transpose(img).convert("RGB")
    return int(str(function(upright, hash_size=hash_size)), 16), upright.width * upright.height


def collect_facts(paths: list[Path], kind: str, hash_size: int, summary: RunSummary) -> list[ImageFacts]:
    facts = []
    for path in tqdm(paths, desc="hashing", unit="img"):
        try:
            data = path.read_bytes()
            value, pixels = perceptual_hash(path, kind, hash_size)
        except Exception as exc:  # noqa: BLE001 - any decoder error makes just this image unusable
            summary.fail(path, f"cannot be read as an image ({type(exc).__name__}: {exc})")
            continue
        facts.append(ImageFacts(path, hashlib.sha256(data).hexdigest(), value, pixels, len(data)))
    return facts


def find_groups(facts: list[ImageFacts], threshold: int, bits: int) -> list[Group]:
    """Every image in exactly one group; each group's kept image is its best copy."""
    by_content: dict[str, list[ImageFacts]] = {}
    for f in facts:
        by_content.setdefault(f.sha256, []).append(f)
    firsts = [members[0] for members in by_content.values()]  # identical bytes: one stands for all
    order = sorted(range(len(firsts)), key=lambda i: (-firsts[i].pixels, -firsts[i].size_bytes, str(firsts[i].path)))
    groups: dict[int, Group] = {}
    for i, kept_i, distance in group_near([f.hash for f in firsts], order, threshold, bits):
        if i == kept_i:
            groups[i] = Group(firsts[i])
        else:
            groups[kept_i].duplicates.append((firsts[i], f"{distance} bits from the kept image"))
        target = groups[kept_i]
        for copy in by_content[firsts[i].sha256][1:]:
            target.duplicates.append((copy, f"same bytes as {firsts[i].path.name}"))
    return [groups[i] for i in sorted(groups, key=lambda i: str(firsts[i].path))]


def write_report(path: Path, groups: list[Group], root: Path) -> None:
    rows = []
    for n, g in enumerate(groups):
        best = "the only copy" if not g.duplicates else "most pixels, then largest file"
        rows.append({"group": n, "file": g.kept.path.relative_to(root).as_posix(), "action": "kept", "why": best,
                     "pixels": g.kept.pixels, "bytes": g.kept.size_bytes})
        rows += [{"group": n, "file": f.path.relative_to(root).as_posix(), "action": "duplicate", "why": why,
                  "pixels": f.pixels, "bytes": f.size_bytes} for f, why in g.duplicates]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            if path.suffix.lower() == ".json":
                json.dump(rows, fh, indent=2)
            else:
                writer = csv.DictWriter(fh, fieldnames=REPORT_FIELDS)
                writer.writeheader()
                writer.writerows(rows)


def place_kept(groups: list[Group], root: Path, out_dir: Path, extensions: list[str], move: bool,
               summary: RunSummary) -> None:
    """Copy (or move) each group's kept image and its caption files under ``out_dir``; a file already
    there is never replaced."""
    transfer = shutil.move if move else shutil.copy2
    for g in groups:
        target = out_dir / g.kept.path.relative_to(root)
        if target.exists():
            summary.kept += 1
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        for ext in extensions:
            source = sidecar(g.kept.path, ext)
            if source.is_file() and not sidecar(target, ext).exists():
                transfer(str(source), str(sidecar(target, ext)))
        transfer(str(g.kept.path), str(target))
        summary.done += 1
