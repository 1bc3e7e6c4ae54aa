"""Caption a list of images and write one caption file per image beside it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from library.prep.captioner import Captioner, Decoding
from library.prep.files import RunSummary, sidecar, write_text
from library.prep.image_batches import image_batches

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptionOutput:
    """Where captions go and what is done to them."""

    extension: str = ".caption"
    overwrite: bool = False  # default: an image that has a caption file keeps it (an interrupted run continues)
    prefix: str = ""
    suffix: str = ""
    batch_size: int = 1
    workers: int | None = None
    debug: bool = False
    clean: Callable[[str], str] | None = None


def _to_pil(rgb) -> Image.Image:
    return Image.fromarray(rgb)


def run_captioner(captioner: Captioner, decoding: Decoding, images: list[Path], out: CaptionOutput) -> RunSummary:
    summary = RunSummary()
    todo = []
    for path in images:
        if not out.overwrite and sidecar(path, out.extension).exists():
            summary.kept += 1
        else:
            todo.append(path)
    if summary.kept:
        logger.info("%d image(s) already have a %s file and are kept (--overwrite to caption them again)",
                    summary.kept, out.extension)
    for batch in image_batches(todo, _to_pil, out.batch_size, out.workers, summary, desc="captioning"):
        captions = captioner.caption([img for _, img in batch], decoding)
        for (path, _), caption in zip(batch, captions):
            if out.clean:
                caption = out.clean(caption)
            text = f"{out.prefix}{caption}{out.suffix}"
            if out.debug:
                logger.info("%s: %s", path, text)
            write_text(sidecar(path, out.extension), text + "\n")
            summary.done += 1
    return summary
