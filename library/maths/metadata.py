"""Training metadata stored in LoRA files (kohya's ``ss_*`` keys, ModelSpec and model hashes)."""

from __future__ import annotations

import hashlib
import json


def json_value(obj) -> str:
    """Metadata values are strings; nested values are JSON."""
    return json.dumps(obj, ensure_ascii=False)


def file_hashes(path: str) -> tuple[str, str]:
    """kohya's model-file hashes: the legacy one (first 8 hex digits of the SHA-256 of 64 KiB at
    offset 1 MiB) and the SHA-256 of the whole file (what AUTOMATIC1111 shows as the model hash)."""
    full = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        legacy = hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]
        fh.seek(0)
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            full.update(chunk)
    return legacy, full.hexdigest()
