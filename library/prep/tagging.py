"""Tag a list of images and write the results: one tag file per image, or entries of a metadata file."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from library.prep.files import RunSummary, image_key, sidecar, write_text
from library.prep.image_batches import image_batches
from library.prep.metadata_files import PeriodicWriter, entry_for
from library.prep.tag_rules import TagRules, choose_tags, merge_with_existing, unknown_replacements, written_tags
from library.prep.tagger_model import OnnxTagger

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TagOutput:
    """Where the tags go and how the images are read."""

    caption_extension: str = ".txt"
    output_path: str | None = None  # a .json/.jsonl metadata file instead of tag files
    full_path: bool = False
    append: bool = False
    batch_size: int = 1
    workers: int | None = None
    debug: bool = False


def run_tagger(tagger: OnnxTagger, rules: TagRules, images: list[Path], root: Path, out: TagOutput,
               metadata: dict[str, dict] | None) -> tuple[RunSummary, Counter]:
    """Tag every image; returns the summary and how often each tag was written."""
    for source in unknown_replacements(tagger.tags, rules):
        logger.warning("--tag_replacement: %r is not a tag of this model, so it never applies", source)
    written = written_tags(tagger.tags, rules)
    summary, frequencies = RunSummary(), Counter()
    writer = PeriodicWriter(out.output_path, metadata) if out.output_path else None

    def prepare(rgb):
        return tagger.prepare(rgb), (rgb.shape[1], rgb.shape[0])

    for batch in image_batches(images, prepare, out.batch_size, out.workers, summary, desc="tagging"):
        probs = tagger.probabilities([x for _, (x, _) in batch])
        for (path, (_, size)), p in zip(batch, probs):
            tags = choose_tags(p, tagger.tags, written, rules)
            if out.debug:
                logger.info("%s: %s", path, "; ".join(f"{c}: {[t for t in tags if t in _names(tagger, written, c)]}"
                                                      for c in sorted(set(tagger.tags.categories))))
            if writer:
                entry = entry_for(metadata, path, root, image_key(path, root, out.full_path))
                if out.append and entry.get("tags"):
                    tags = merge_with_existing(entry["tags"], tags, rules.separator)
                entry.update(tags=rules.separator.join(tags), image_size=list(size))
            else:
                target = sidecar(path, out.caption_extension)
                if out.append and target.is_file():
                    tags = merge_with_existing(target.read_text(encoding="utf-8", errors="replace"), tags,
                                               rules.separator)
                write_text(target, rules.separator.join(tags) + "\n")
            frequencies.update(tags)
            summary.done += 1
        if writer:
            writer.maybe_write()
    if writer:
        writer.write()
    return summary, frequencies


def _names(tagger: OnnxTagger, written: list[list[str]], category: str) -> set[str]:
    return {t for i in tagger.tags.indices(category) for t in written[i]}
