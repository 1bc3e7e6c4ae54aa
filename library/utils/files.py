"""Crash-safe file writing: every file is written to a temporary name, then renamed."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import toml
import torch

from library.utils.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    A crash or exception inside the block leaves any previous ``path`` untouched and removes
    the partial temporary file. The temporary name keeps the suffix, for writers that choose the
    format by it (kohya's ``save_weights``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield str(tmp)
        with open(tmp, "rb") as fh:  # make the bytes durable before the rename publishes them
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_torch(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` atomically (used for ``.ckpt``/``.pt`` outputs)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def check_writable_folder(path: str | os.PathLike, flag: str) -> None:
    """Refuse, before any work, a folder a run will write into that cannot be: an existing file, a
    path under a file, or a folder without write permission (the nearest existing one is checked,
    as missing folders are created)."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise UserError(f"{flag} {target}: it is a file, not a folder; give a folder (it is made if missing)")
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{flag} {target}: {probe} is a file, so the folder cannot be made there")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {target}: {probe} is not writable (check its permissions, or choose another folder)")


def read_user_text(path: str | os.PathLike, what: str) -> str:
    """A text file a user wrote (prompts, configs, metadata) as UTF-8, a BOM allowed; a missing,
    unreadable or non-UTF-8 file is a UserError naming ``what`` (the flag or key), the file, the
    line and what to do."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError as exc:
        raise UserError(f"{what} {p}: file not found") from exc
    except IsADirectoryError as exc:
        raise UserError(f"{what} {p}: a folder, not a file") from exc
    except OSError as exc:
        raise UserError(f"{what} {p}: cannot be read ({exc.strerror or exc})") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line, column = data[: exc.start].count(b"\n") + 1, exc.start - data.rfind(b"\n", 0, exc.start)
        raise UserError(f"{what} {p}: not UTF-8 text (line {line}, column {column}); re-save it as UTF-8") from exc


def parse_user_file(path: str | os.PathLike, what: str, kind: str | None = None):
    """A JSON or TOML file a user wrote (by ``kind`` or the suffix), parsed; a syntax error is a
    UserError naming ``what``, the file and the parser's position."""
    text = read_user_text(path, what)
    kind = kind or ("json" if Path(path).suffix.lower() == ".json" else "toml")
    try:
        return json.loads(text) if kind == "json" else toml.loads(text)
    except (ValueError, toml.TomlDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise UserError(f"{what} {path}: cannot parse as {kind.upper()}: {exc}") from exc
