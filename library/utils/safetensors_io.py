"""safetensors files read and written one tensor at a time.

``safetensors.torch.load_file`` maps the whole file and keeps the mapping while every tensor is
copied out of it, and ``save_file`` builds the whole file's bytes before writing them: both hold
about two copies of a model at their peak (the "RAM blow-up" kohya's users meet merging SDXL
files). Here a tensor is read with a plain ``readinto`` into its own buffer and written as soon as
it is produced, so the memory a tool needs stays near the one model it holds.

The files are byte-for-byte those of safetensors' own writer (same tensor order, header and
padding; the tests compare) except that the metadata keeps the order it is given in (safetensors'
writer orders it at random), so kohya's model hashes, which are defined on that serialisation,
can be computed while the bytes stream past instead of from a second copy in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from library.utils.errors import UserError
from library.utils.files import atomic_path

#: safetensors' dtype names, in the order of its dtype enum (the writer sorts by it, descending)
_DTYPES = [("BOOL", torch.bool), ("U8", torch.uint8), ("I8", torch.int8),
           ("F8_E5M2", torch.float8_e5m2), ("F8_E4M3", torch.float8_e4m3fn), ("I16", torch.int16),
           ("U16", torch.uint16), ("F16", torch.float16), ("BF16", torch.bfloat16), ("I32", torch.int32),
           ("U32", torch.uint32), ("F32", torch.float32), ("F64", torch.float64), ("I64", torch.int64),
           ("U64", torch.uint64)]
_NAME_OF = {dtype: name for name, dtype in _DTYPES}
_DTYPE_OF = dict(_DTYPES)
_RANK = {dtype: rank for rank, (_, dtype) in enumerate(_DTYPES)}

MAX_HEADER = 100 << 20  # safetensors' own limit
_LEGACY_OFFSET, _LEGACY_SIZE = 0x100000, 0x10000  # kohya's legacy hash: 64 KiB at 1 MiB
_CHUNK = 64 << 20  # large tensors are read and hashed in pieces of this many bytes


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a file (offsets from the start of the data section)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # file offset of the data section


def read_header(path: str | os.PathLike) -> Header:
    """The tensors' dtypes, shapes and places and the metadata, from the header alone."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: too short to be a safetensors file ({size} bytes); is it complete?")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER or length + 8 > size:
                raise UserError(f"{path}: corrupt safetensors header (declares {length} bytes in a file of {size});"
                                " is the file complete?")
            raw = json.loads(fh.read(length))
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a safetensors file (its header is not JSON)") from exc
    metadata = raw.pop("__metadata__", None) or {}
    tensors = {}
    for key, entry in raw.items():
        try:
            start, end = entry["data_offsets"]
            tensors[key] = TensorInfo(_DTYPE_OF[entry["dtype"]], tuple(entry["shape"]), start, end)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: tensor {key!r} has a malformed header entry ({entry!r})") from exc
        if end > size - 8 - length:
            raise UserError(f"{path}: tensor {key!r} lies past the end of the file; is the file complete?")
    return Header(tensors, metadata, 8 + length)


def iter_tensors(path: str | os.PathLike, keys: list[str] | None = None, header: Header | None = None,
                 dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` in file order (or ``keys``' order), each read into its own memory.

    ``dtype`` casts floating tensors stored in another precision as each is read: the stored bytes
    go through one staging buffer, reused for every tensor, so a file is never held in its own
    precision and the wanted one at once (an fp16 checkpoint loaded in fp32 costs its fp32 size).
    """
    header = header or read_header(path)
    names = sorted(header.tensors, key=lambda k: header.tensors[k].start) if keys is None else keys
    staging = torch.empty(0, dtype=torch.uint8)
    with open(path, "rb") as fh:
        for key in names:
            info = header.tensors[key]
            size = info.end - info.start
            if size != math.prod(info.shape) * info.dtype.itemsize:
                raise UserError(f"{path}: tensor {key!r} has {size} bytes for shape {list(info.shape)}; "
                                "the file is damaged")
            if not (dtype is not None and info.dtype.is_floating_point and info.dtype != dtype):
                tensor = torch.empty(info.shape, dtype=info.dtype)
                _read_into(fh, header.data_start + info.start, tensor.view(-1).view(torch.uint8), path, key)
                yield key, tensor
                continue
            if staging.numel() < size:
                staging = torch.empty(size, dtype=torch.uint8)
            _read_into(fh, header.data_start + info.start, staging[:size], path, key)
            yield key, torch.empty(info.shape, dtype=dtype).copy_(staging[:size].view(info.dtype).view(info.shape))


def _read_into(fh, offset: int, buffer: torch.Tensor, path, key: str) -> None:
    """Fill the uint8 ``buffer`` with the file's bytes at ``offset``; a short read is an error."""
    if not buffer.numel():
        return
    view = buffer.numpy()
    fh.seek(offset)
    if fh.readinto(view) != view.nbytes:
        raise UserError(f"{path}: tensor {key!r} is cut short; is the file complete?")


def read_tensors(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 prefixes: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a file, read one by one (no mapping of the whole file is kept): all of them,
    or those whose keys start with one of ``prefixes``; floating ones cast to ``dtype`` if given."""
    header = read_header(path)
    keys = sorted((k for k in header.tensors if prefixes is None or k.startswith(prefixes)),
                  key=lambda k: header.tensors[k].start)
    move = str(device) != "cpu"
    return {k: (v.to(device) if move else v) for k, v in iter_tensors(path, keys, header, dtype)}


def _order(tensors: Mapping[str, torch.Tensor], dtype_of: Callable) -> list[str]:
    """safetensors' order: dtypes from the end of its enum to the start, then by name."""
    return sorted(tensors, key=lambda k: (-_RANK[dtype_of(k)], k))


def _header_bytes(entries: dict, metadata: Mapping[str, str] | None) -> bytes:
    # an empty metadata is written as {} and None not at all, as safetensors does
    body = ({} if metadata is None else {"__metadata__": dict(metadata)}) | entries
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(text)) + text


class _Window:
    """SHA-256 of the bytes ``[start, start + size)`` of a stream fed in pieces."""

    def __init__(self, start: int, size: int):
        self.start, self.end, self.sha = start, start + size, hashlib.sha256()

    def feed(self, offset: int, data) -> None:
        lo, hi = max(offset, self.start), min(offset + len(data), self.end)
        if lo < hi:
            self.sha.update(data[lo - offset: hi - offset])


def _tensor_bytes(tensor: torch.Tensor):
    flat = tensor.detach().contiguous().view(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else memoryview(b"")


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None, *, dtype: torch.dtype | None = None,
                     model_hashes: bool = False, progress: Callable[[int], None] | None = None) -> None:
    """Write ``tensors`` as a safetensors file atomically, one tensor at a time.

    ``dtype`` casts floating tensors as each is written (so no cast copy of the whole model
    exists); ``model_hashes`` adds kohya's ``sshs_model_hash`` (SHA-256 of the data section) and
    ``sshs_legacy_hash`` (first 8 hex digits of the SHA-256 of 64 KiB at 1 MiB of the same file
    with only its ``ss_*`` metadata), computed from the bytes as they are written. ``progress`` is
    called with the bytes of each tensor written.
    """
    def dtype_of(key: str) -> torch.dtype:
        t = tensors[key]
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    order, entries, offset = _order(tensors, dtype_of), {}, 0
    for key in order:
        size = tensors[key].numel() * dtype_of(key).itemsize
        entries[key] = {"dtype": _NAME_OF[dtype_of(key)], "shape": list(tensors[key].shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata is not None or model_hashes:
        metadata = {k: v for k, v in (metadata or {}).items() if not (model_hashes and k.startswith("sshs_"))}
    legacy = None
    if model_hashes:  # the legacy window is placed in the file as it would be with ss_* metadata only
        ss_head = _header_bytes(entries, {k: v for k, v in metadata.items() if k.startswith("ss_")})
        legacy = _Window(_LEGACY_OFFSET - len(ss_head), _LEGACY_SIZE)  # in data-section offsets
        legacy.feed(-len(ss_head), ss_head)  # counts only for a header of over 1 MiB
        # placeholders of the hashes' own length, overwritten once the data has been hashed
        metadata |= {"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8}
    head = _header_bytes(entries, metadata)
    data_sha = hashlib.sha256()
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(head)
        for key in order:
            value = tensors[key]
            if value.dtype != dtype_of(key):
                value = value.to(dtype_of(key))
            data = _tensor_bytes(value.cpu())
            fh.write(data)
            if model_hashes:
                data_sha.update(data)
                legacy.feed(entries[key]["data_offsets"][0], data)
            if progress is not None:
                progress(len(data))
            del value, data
        if model_hashes:
            metadata |= {"sshs_model_hash": data_sha.hexdigest(), "sshs_legacy_hash": legacy.sha.hexdigest()[:8]}
            fh.seek(0)
            fh.write(_header_bytes(entries, metadata))
