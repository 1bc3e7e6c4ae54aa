"""Training metadata stored in LoRA files (kohya's ``ss_*`` keys, ModelSpec and model hashes)."""

from __future__ import annotations

import hashlib
import io
import json
import struct

import torch
from safetensors.torch import save


def add_model_hashes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Add kohya's ``sshs_model_hash`` and ``sshs_legacy_hash`` to ``metadata`` (in place).

    Both hash a safetensors serialisation of ``state`` that carries only the ``ss_*`` metadata:
    the model hash is the SHA-256 of the bytes after the header, the legacy hash the first 8 hex
    digits of the SHA-256 of 64 KiB at offset 1 MiB of the whole buffer.
    """
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = save({k: v.contiguous() for k, v in state.items()}, metadata=ss_only)
    (header_len,) = struct.unpack("<Q", data[:8])
    metadata["sshs_model_hash"] = hashlib.sha256(data[8 + header_len:]).hexdigest()
    buf = io.BytesIO(data)
    buf.seek(0x100000)
    metadata["sshs_legacy_hash"] = hashlib.sha256(buf.read(0x10000)).hexdigest()[:8]


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
